"""Checkpoint -> Hugging Face directory of the model's own class (``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``: that of ``init_from``'s config.json, else a Llama),
in one process, on CPU.

The backend that wrote the checkpoint consolidates its shards (``migu_dist.consolidate``), with
neither the original number of ranks nor a GPU: DeepSpeed's own ``zero_to_fp32`` reader
stitches every rank's fp32 master partition back together, FSDP2's DCP files hold each shard
with its global offsets. The exported directory
holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (sharded above 5 GB)
and the tokenizer, and loads with ``AutoModelForCausalLM.from_pretrained``.

    python launch/export_hf.py --checkpoint runs/x/checkpoints --out hf/x     # latest good
    python launch/export_hf.py --checkpoint runs/x/checkpoints/step_00000040 --out hf/x
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from migu_dist import consolidate
from train.checkpoint import MANIFEST, Checkpointer
from train.config import Config, ConfigError, load_config, parse_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(RuntimeError):
    pass


def resolve_checkpoint(path: str | Path, verify: bool = True) -> tuple[Path, str]:
    """``(checkpoints root, tag)`` for a step directory, or a root's newest good checkpoint.

    Either way the checkpoint's files are checked against its manifest (sizes and CRC32)
    unless ``verify`` is False: a damaged checkpoint raises :class:`ExportError`."""
    p = Path(path)
    if (p / MANIFEST).is_file() or (p / "trainer_state.json").is_file():
        problem = Checkpointer.verify(p) if verify else None
        if problem:
            raise ExportError(f"checkpoint {p} is damaged ({problem}); use another one.")
        return p.parent, p.name
    tag = Checkpointer(p).find_latest_good()
    if tag is None:
        raise ExportError(
            f"{p} holds no complete checkpoint (a step_* directory with {MANIFEST} whose files "
            "verify); pass a run's checkpoints/ directory or one of its step directories."
        )
    return p, tag


def run_config(root: Path, world_size: int, config_path: str | Path | None = None) -> Config:
    """The run's resolved config (``<output_dir>/config.yaml`` next to ``checkpoints/``).

    Falls back to the unvalidated file when validation fails only because, say, the training
    data is not on this machine: export needs just the model shape and the tokenizer."""
    path = Path(config_path) if config_path else root.parent / "config.yaml"
    if not path.is_file():
        raise ExportError(f"no run config at {path}; pass --config <output_dir>/config.yaml.")
    try:
        return load_config(path, world_size=world_size)
    except ConfigError as e:
        try:
            cfg = parse_config(yaml.safe_load(path.read_text()) or {})
        except ConfigError:
            raise e from None  # the file itself is wrong: the full validation says how
        print(f"note: {path} does not validate on this machine ({e}); using it as written.")
        return cfg


def hf_config(cfg: Config, dtype: torch.dtype):
    """The transformers config the run trained: ``init_from``'s config.json, else the shape."""
    from train.model import hf_config as model_hf_config

    config = model_hf_config(cfg.model)
    config.use_cache = True  # training turns it off; generation wants it
    config.dtype = dtype
    return config


def export_hf(
    checkpoint: str | Path,
    out: str | Path,
    *,
    cfg: Config | None = None,
    dtype: str = "float32",
    tokenizer: bool = True,
    verify: bool = True,
) -> Path:
    """Write checkpoint ``checkpoint`` (a step dir, or a checkpoints/ root meaning its newest
    good one) as a Hugging Face directory ``out`` of the run's model class. Single process,
    CPU only."""
    from transformers import GenerationConfig

    from train.model import causal_lm_class

    root, tag = resolve_checkpoint(checkpoint, verify=verify)
    d = root / tag
    state = json.loads((d / "trainer_state.json").read_text())
    cfg = cfg or run_config(root, world_size=state["world_size"])
    torch_dtype = DTYPES[dtype]

    sd = consolidate(root / tag)
    config = hf_config(cfg, torch_dtype)
    with torch.device("meta"):  # no random init of a model we overwrite anyway
        model = causal_lm_class(config)(config)
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ExportError(
            f"{d}: weights do not fit the model: missing {missing}, extra {unexpected}."
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(torch_dtype)  # type: ignore[arg-type]  # transformers' wrapped .to

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="5GB")
    GenerationConfig.from_model_config(config).save_pretrained(out)
    if tokenizer:
        from train.tokenizer import load_tokenizer

        load_tokenizer(cfg.data.tokenizer).save_pretrained(str(out))
    train = state.get("train", {})
    info = {
        "checkpoint": str(d.resolve()),
        "step": train.get("step"),
        "finished_phases": train.get("finished_phases"),
        "tokens": train.get("tokens"),
        "dtype": dtype,
    }
    (out / "migu_cpt_export.json").write_text(json.dumps(info, indent=1) + "\n")
    return out
