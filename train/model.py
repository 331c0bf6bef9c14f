"""Build the model: a Llama from a shape config (tiny tests, demo), or the transformers class of
a local Hugging Face directory's ``model_type`` (the normal continual pre-training start: Llama
2/3, Mistral, Qwen2; see ``train.config.MODEL_FAMILIES``), loaded strictly.

The model never imports distributed code: the backend passes ``init_context`` (DeepSpeed's
``zero.Init`` under ZeRO-3) so a 7B model is partitioned as it is created and never
materialises whole on one rank.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, LlamaConfig, PretrainedConfig, PreTrainedModel

from train.config import (
    HF_WEIGHT_FILES,
    MODEL_FAMILIES,
    LoraConfig,
    ModelConfig,
    model_family_problem,
)


def resolve_attn_implementation(requested: str) -> str:
    """auto -> flash_attention_2 when flash-attn imports and a GPU is present, else sdpa."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def llama_config(cfg: ModelConfig) -> LlamaConfig:
    """The transformers config for a model built from shape (init_from unset)."""
    return LlamaConfig(  # type: ignore[call-arg]  # rope_theta is a kwarg in transformers 5
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.init_std,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )


def hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """The transformers config of the model: ``init_from``'s config.json (of a supported
    ``model_type``, else ValueError), or a Llama of the shape fields."""
    if not cfg.init_from:
        return llama_config(cfg)
    problem = model_family_problem(cfg.init_from)
    if problem:  # config validation reports it first; this guards direct callers
        raise ValueError(problem)
    return AutoConfig.from_pretrained(cfg.init_from)


def causal_lm_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The transformers causal-LM class of ``config.model_type`` (LlamaForCausalLM, ...)."""
    return getattr(transformers, MODEL_FAMILIES[config.model_type])


def empty_init(cfg: ModelConfig, lora: LoraConfig | None = None) -> bool:
    """Whether the model can be built empty (``build_model(empty=True)``) for a backend that
    loads each rank's shard of ``init_from`` itself (``Backend.loads_hf_shards``): only from a
    Hugging Face directory with safetensors weights and untied embeddings. Random init and
    LoRA build the whole model on every rank first (small models, or adapters whose init peft
    does at creation); .bin weights load through ``from_pretrained`` on every rank."""
    if not cfg.init_from or (lora is not None and lora.enabled):
        return False
    if weight_files(cfg.init_from)[0].suffix != ".safetensors":
        return False
    return not AutoConfig.from_pretrained(cfg.init_from).tie_word_embeddings


def build_model(
    cfg: ModelConfig,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    init_context: ContextManager | None = None,
    lora: LoraConfig | None = None,
    empty: bool = False,
) -> PreTrainedModel:
    """Create the model on every rank identically (same seed), inside ``init_context``; with
    ``lora.enabled``, inject LoRA adapters and freeze everything else.

    From ``init_from``: the class of its ``model_type``, and every weight of the directory
    must fit it (:func:`check_weights`, raised before anything is loaded, on every rank alike).

    ``empty``: only the skeleton (of ``init_from``'s config or of the shape), its parameters
    on the meta device, neither initialised nor loaded; the backend materialises each rank's
    shard and loads it (FSDP2: a 7B model then never exists whole on a rank). Buffers that
    are computed, not loaded (the rotary frequencies), are real.

    Activation checkpointing and compilation (``model.activation_checkpointing``,
    ``model.compile``) are not applied here: ``migu_dist.parallelize`` does, in its order."""
    attn = resolve_attn_implementation(cfg.attn_implementation)
    torch.manual_seed(seed)
    config = hf_config(cfg)
    cls = causal_lm_class(config)
    if empty:
        if lora is not None and lora.enabled:
            raise ValueError("build_model(empty=True) does not support LoRA adapters")
        with torch.device("meta"):
            model = cls._from_config(config, dtype=dtype, attn_implementation=attn)
        if cfg.init_from:
            check_weights(cfg.init_from, model)
        _real_rotary_buffers(model)
    else:
        if cfg.init_from:
            # A meta skeleton built outside ``init_context`` and outside transformers' own
            # ZeRO-3 construction (``cls(config)`` never enters it): costs nothing.
            with torch.device("meta"):
                check_weights(cfg.init_from, cls(config))
        with init_context or contextlib.nullcontext():
            # Both constructors below honour a sharded-construction context that transformers
            # recognises (DeepSpeed ZeRO-3's, see DeepSpeedBackend.init_context): they
            # partition parameters as they are created AND still run the weight init / weight
            # loading on them, which a bare ``deepspeed.zero.Init`` around
            # ``LlamaForCausalLM(cfg)`` does not.
            if cfg.init_from:
                loaded: Any = cls.from_pretrained(
                    cfg.init_from,
                    config=config,
                    dtype=dtype,
                    attn_implementation=attn,
                    output_loading_info=True,
                )
                model, info = loaded  # (model, {missing, unexpected, mismatched, errors})
                # check_weights already compared names and shapes; this also catches what
                # only transformers' loader sees (conversion errors). Under ZeRO-3 it reports
                # missing keys on every rank and load errors on rank 0 only: check_weights has
                # ruled both out on every rank by then, so no rank raises alone.
                problems = {k: v for k, v in info.items() if v}
                if problems:
                    raise ValueError(
                        f"model.init_from: loading {cfg.init_from!r} into {cls.__name__} "
                        f"reported {problems}; the directory does not fit its config.json."
                    )
            else:
                model = cls._from_config(config, dtype=dtype, attn_implementation=attn)
    # from_pretrained returns a model in eval mode; training (and MIGU's statistics, which
    # are only collected in training mode) needs train mode.
    model.train()
    model.config.use_cache = False
    if lora is not None and lora.enabled:
        add_lora(model, lora, seed=seed)
    return model


def _real_rotary_buffers(model: PreTrainedModel) -> None:
    """Rebuild (on CPU) the modules whose buffers were created on the meta device: the rotary
    embeddings, whose frequencies are computed from the config."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not type(module).__name__.endswith("RotaryEmbedding"):
                raise ValueError(f"{name}: buffers on the meta device that cannot be rebuilt")
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, type(module)(config=model.config))


# Stored by older conversions but computed from the config (transformers ignores them too).
COMPUTED_BUFFERS = re.compile(r"rotary_emb\.inv_freq$")


def weight_files(path: str | Path) -> list[Path]:
    """The files holding the model's weights in Hugging Face directory ``path``."""
    d = Path(path)
    for name in HF_WEIGHT_FILES:
        if not (d / name).is_file():
            continue
        if name.endswith(".index.json"):  # sharded: the index maps each tensor to its file
            weight_map = json.loads((d / name).read_text())["weight_map"]
            return [d / f for f in sorted(set(weight_map.values()))]
        return [d / name]
    raise ValueError(
        f"model.init_from: {str(path)!r} holds none of {list(HF_WEIGHT_FILES)}; point it to a "
        "complete Hugging Face model directory."
    )


def stored_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in ``path``'s weight files, read without loading them
    (safetensors headers; .bin files mapped to the meta device)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in weight_files(path):
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():  # noqa: SIM118 - a safetensors handle is no dict
                    shapes[k] = tuple(h.get_slice(k).get_shape())
        else:
            sd = torch.load(f, map_location="meta", weights_only=True, mmap=True)
            shapes.update({k: tuple(v.shape) for k, v in sd.items()})
    return shapes


def check_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Raise ValueError unless the weights stored in ``path`` are exactly ``model``'s: none
    missing (a tied ``lm_head.weight`` may be), none extra, every shape equal.

    transformers only warns about missing weights (it initialises them randomly) and extra
    ones (it drops them, e.g. Qwen2's q/k/v biases loaded into a Llama); under ZeRO-3 it does
    not even look for extra ones, and FSDP2's sharded loader ignores them. Comparing names and
    shapes from the file headers covers every path alike, and every rank raises the same."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    stored = {k: v for k, v in stored_shapes(path).items() if not COMPUTED_BUFFERS.search(k)}
    missing = sorted(set(expected) - set(stored) - tied)
    extra = sorted(set(stored) - set(expected))
    shapes = sorted(
        f"{k}: stored {stored[k]}, model {expected[k]}"
        for k in set(stored) & set(expected)
        if stored[k] != expected[k]
    )
    if missing or extra or shapes:

        def few(xs: list[str]) -> str:
            return ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "")

        found = [f"missing: {few(missing)}" if missing else "",
                 f"not in the model: {few(extra)}" if extra else "",
                 f"shape mismatches: {few(shapes)}" if shapes else ""]  # fmt: skip
        raise ValueError(
            f"model.init_from: the weights in {str(path)!r} do not fit the "
            f"{type(model).__name__} its config.json describes; "
            + "; ".join(x for x in found if x)
            + ". Loading it would not reproduce the saved model: fix the directory or its "
            "config.json."
        )


def add_lora(model: PreTrainedModel, cfg: LoraConfig, *, seed: int) -> None:
    """Inject peft LoRA adapters in place (module names gain ``.base_layer``/``.lora_A.default``/
    ``.lora_B.default``) and freeze every non-adapter parameter.

    Called outside ``zero.Init`` on purpose: peft initialises A (Kaiming) and B (zeros) after
    creating them, which would be a no-op on already-partitioned tensors. The adapters are
    small and identical on every rank (same seed); ZeRO-3 partitions them in its setup.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    torch.manual_seed(seed + 1)
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # peft accepts float scales
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
    )
    inject_adapter_in_model(peft_cfg, model)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token, PaLM appendix B: 6 * N + 12 * layers * d_model * seq_len, with
    N the non-embedding parameters (partitioned ZeRO-3 parameters count whole)."""
    n = sum(
        getattr(p, "ds_numel", p.numel())
        for name, p in model.named_parameters()
        if "embed_tokens" not in name
    )
    c: Any = model.config
    return 6.0 * n + 12.0 * c.num_hidden_layers * c.hidden_size * seq_len
