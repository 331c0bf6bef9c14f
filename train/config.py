"""Typed run configuration: defaults here, YAML overrides them, dotted CLI overrides last.

Every field is documented where it is declared. ``load_config`` validates the whole tree
and raises one :class:`ConfigError` listing every problem (unknown key, wrong type,
impossible value, batch/world-size arithmetic), each naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

# The distributed layer's own sections (and the numeric-range types they share), composed into
# Config below and importable from here as part of the run's config tree.
from migu_dist.config import (
    BackendConfig,
    EngineConfig,
    MiguConfig,
    NonNegativeFloat,
    NonNegativeInt,
    OptimConfig,
    PositiveFloat,
    PositiveInt,
    Range,
    RegularizationConfig,
)


class ConfigError(ValueError):
    """All problems found in a config, reported at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            f"{len(problems)} problem(s) in the config:\n" + "\n".join(f"  - {p}" for p in problems)
        )


# --------------------------------------------------------------------------------------
# The config tree
# --------------------------------------------------------------------------------------


# ``model_type`` of a Hugging Face config.json -> the transformers class that ``init_from``
# builds for it. Each is a decoder whose blocks are ``model.layers.N`` with ``self_attn`` and
# ``mlp`` linears named ``*_proj``: MIGU's default include, LoRA's default targets and FSDP2's
# per-block sharding rely on that layout. A type is added here only with a test that loads a
# tiny model of it on 2 ranks (tests/test_families.py).
MODEL_FAMILIES: dict[str, str] = {
    "llama": "LlamaForCausalLM",  # Llama 2 and 3 (3.1+ rope scaling), SmolLM2, TinyLlama...
    "mistral": "MistralForCausalLM",  # Mistral 7B (sliding-window attention)
    "qwen2": "Qwen2ForCausalLM",  # Qwen2 / Qwen2.5 (q/k/v biases, often tied embeddings)
}


# A Hugging Face directory's weight files, in the order transformers looks for them (other
# *.safetensors files, e.g. Mistral's consolidated.safetensors, are not the model's).
HF_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def model_family_problem(init_from: str) -> str | None:
    """Why ``init_from``'s config.json cannot be trained faithfully (None: it can)."""
    path = Path(init_from, "config.json")
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        return f"model.init_from: cannot read {path} ({e}); point it to a Hugging Face model."
    if model_type not in MODEL_FAMILIES:
        supported = ", ".join(f"{t} ({c})" for t, c in MODEL_FAMILIES.items())
        return (
            f"model.init_from: {init_from!r} holds a model of type {model_type!r}, which this "
            f"trainer does not support; supported model types: {supported}. Convert the "
            "checkpoint to one of them or start from a supported model."
        )
    return None


@dataclass
class ModelConfig:
    """Shape of the (Llama) model built from scratch, or a Hugging Face directory to start from."""

    init_from: str | None = None
    """Local Hugging Face directory (config.json + safetensors or .bin weights) to initialise
    from. Weights only: optimizer, data position and step start fresh. When set, the shape
    fields below are ignored: the model is the transformers class of config.json's
    ``model_type``, one of ``llama`` (Llama 2 and 3), ``mistral``, ``qwen2``; any other type is
    refused when the config is validated. Loading is strict: a weight missing from the
    directory, one the model does not have, or one of another shape is an error (a tied
    ``lm_head.weight`` may be absent; stored ``rotary_emb.inv_freq`` buffers are ignored, as
    they are computed from the config). A leading ``~`` is expanded."""
    vocab_size: PositiveInt = 32000
    """Vocabulary size; must cover the tokenizer's ids."""
    hidden_size: PositiveInt = 64
    """Model width d_model."""
    intermediate_size: PositiveInt = 176
    """Width of the SwiGLU MLP."""
    num_layers: PositiveInt = 2
    """Number of transformer blocks."""
    num_heads: PositiveInt = 4
    """Attention heads; must divide hidden_size."""
    num_kv_heads: PositiveInt | None = None
    """Key/value heads for grouped-query attention; None means num_heads (multi-head)."""
    max_position_embeddings: PositiveInt = 4096
    """Longest sequence the rotary embedding is set up for."""
    rope_theta: PositiveFloat = 10000.0
    """Rotary embedding base."""
    rms_norm_eps: PositiveFloat = 1e-5
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the LM head (Llama-2 does not)."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel. auto: flash_attention_2 when flash-attn imports and a GPU is present,
    else sdpa."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward to save memory (MIGU statistics are
    collected once per micro-batch, not again during recompute)."""
    compile: bool = False
    """``torch.compile`` each decoder block's forward (torchtitan's per-block recipe; MIGU's
    statistics hooks are traced into the compiled graph). The first steps pay the compile
    time (about a minute per distinct shape on CPU). Supported with engine.backend fsdp2 and
    DeepSpeed ZeRO 0-2; not with ZeRO-3, whose per-module parameter fetch hooks run inside
    the block."""
    init_std: NonNegativeFloat = 0.02
    """Standard deviation of the random initialisation (models built from shape only)."""


@dataclass
class TrainConfig:
    """Batch sizes, step budget and seeding."""

    max_steps: PositiveInt = 100
    """Optimizer steps to run in total (across all phases). Phases with a token budget end
    earlier or later than this; training stops at whichever comes first."""
    seed: Annotated[int, Range(ge=0, le=2**32 - 1)] = 1234
    """Seed for model init, data mixture and every rank's RNG."""
    micro_batch_size: PositiveInt = 4
    """Sequences per rank per forward/backward."""
    grad_accum: PositiveInt = 1
    """Micro-batches per optimizer step on each rank."""
    global_batch_size: PositiveInt | None = None
    """Sequences per optimizer step over all ranks. If set it must equal
    micro_batch_size * grad_accum * world_size; None derives it."""
    seq_len: PositiveInt = 128
    """Tokens per packed training sequence."""
    nonfinite_loss: Literal["skip", "stop"] = "skip"
    """What to do when the loss or the gradient norm (before clipping, the same on every
    rank) is NaN/inf: skip the step (weights and optimizer state untouched) or stop the run
    with the last good checkpoint intact."""
    max_skipped_steps: NonNegativeInt = 10
    """With nonfinite_loss: skip, stop after this many consecutive skipped steps."""


_LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the linear layers; only the adapters train when enabled."""

    enabled: bool = False
    """Wrap the model's target linears with LoRA adapters and freeze every base weight. MIGU
    (when on) then masks the rows of the adapters' A and B matrices."""
    r: PositiveInt = 8
    """Adapter rank: A is (r, in_features), B is (out_features, r)."""
    alpha: PositiveFloat = 16.0
    """Scaling numerator: the adapter output is multiplied by alpha / r."""
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Dropout on the adapter's input."""
    target_modules: list[str] = field(default_factory=lambda: list(_LLAMA_LINEARS))
    """Module-name suffixes that get an adapter (peft's target_modules); default every linear
    layer of the transformer blocks."""


@dataclass
class DomainConfig:
    """One text domain: where its documents are. Training data comes from exactly one of
    ``train`` (files, tokenised by every rank as it trains), ``store`` (tokenised once by
    ``launch/pretokenize.py``) or ``dataset`` (a ``datasets`` directory); domains of one run may
    use different ones. Paths may be ``fsspec`` URLs (``s3://``, ``gs://``, ``hf://``) except
    ``dataset``; credentials never go here (see README, "Data at scale")."""

    train: list[str] = field(default_factory=list)
    """Globs of training files (.jsonl, .json, .parquet, .txt, optionally .gz/.zst), local or
    ``fsspec`` URLs, read in glob order (pattern by pattern, sorted)."""
    store: str | None = None
    """Token store directory or URL written by ``launch/pretokenize.py`` from this domain's
    files: the same batches as ``train`` with those files, without tokenising. Its tokenizer
    must be ``data.tokenizer`` and its add_bos/add_eos this config's (both checked)."""
    dataset: str | None = None
    """Local ``datasets`` directory: a ``save_to_disk`` dataset (one split), a directory of
    ``.arrow`` files or of ``.parquet`` files; read by row index (exact O(1) resume)."""
    heldout: list[str] = field(default_factory=list)
    """Globs of held-out files for perplexity evaluation (local or URLs)."""
    heldout_store: str | None = None
    """Instead of ``heldout``: a token store of the held-out files (the same tokens)."""
    text_field: str = "text"
    """Field holding the document text (JSON/Parquet/datasets column)."""


@dataclass
class PhaseConfig:
    """One ordered phase of continual pre-training."""

    name: str = ""
    """Phase name, logged with every step."""
    domains: dict[str, PositiveFloat] = field(default_factory=dict)
    """Domain name -> mixture weight (normalised within the phase)."""
    tokens: PositiveInt | None = None
    """Token budget of the phase (rounded up to whole steps). Exactly one of tokens/steps."""
    steps: PositiveInt | None = None
    """Step budget of the phase."""
    replay: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Share of each batch drawn from earlier phases' domains (uniformly over them)."""
    lr_at_start: Literal["continue", "rewarm"] = "continue"
    """continue: one schedule over the whole run. rewarm: warm up and decay again over this
    phase's steps."""


@dataclass
class DataConfig:
    """Tokenizer, domains and the ordered phases."""

    tokenizer: str = "data/tokenizer"
    """SentencePiece .model file or a Hugging Face tokenizer directory (a leading ``~`` is
    expanded)."""
    domains: dict[str, DomainConfig] = field(default_factory=dict)
    """Named domains."""
    phases: list[PhaseConfig] = field(default_factory=list)
    """Phases in training order."""
    num_workers: NonNegativeInt = 0
    """Background tokenisation workers per rank (0: in the training process)."""
    document_position_ids: bool = False
    """Restart position ids at each document inside a packed sequence."""
    cross_document_attention: bool = False
    """Let a token attend to the earlier documents packed into its sequence. false (the
    default): each token attends only to its own document's earlier tokens (a block-diagonal
    causal mask under sdpa/eager, flash-attn's variable-length kernel under
    flash_attention_2; ``train/packing.py``), in training and in held-out perplexity alike;
    independent of ``document_position_ids``. true: plain causal attention over the whole
    packed sequence, as before this option existed (runs recorded without it resume as
    true)."""
    add_bos: bool = True
    """Prepend BOS to each document, when the tokenizer has one. Tokenizers without a BOS
    token (Qwen2's: ``bos_token: null``) get none: their documents are separated by EOS alone,
    as in the model's own pre-training."""
    add_eos: bool = True
    """Append EOS to each document. With a tokenizer without BOS it is the only document
    separator, so turning it off is refused there."""
    max_document_bytes: PositiveInt = 64 * 2**20
    """Longest document (a line of a .jsonl/.txt file, or a record's text) read, in bytes;
    longer ones are skipped and counted as ``too_long`` in the bad-input report. Bounds the
    memory a single line without newline can take (a broken or binary file)."""


@dataclass
class TaskConfig:
    """A downstream multiple-choice task from a local JSONL file."""

    name: str = ""
    """Task name used in logs and reports."""
    path: str = ""
    """JSONL with {"context": str, "choices": [str], "gold": int} per line."""
    fewshot_path: str | None = None
    """JSONL of the same schema to draw few-shot examples from."""
    num_fewshot: NonNegativeInt = 0
    """Few-shot examples prepended to each context."""
    limit: PositiveInt | None = None
    """Use only the first N examples."""


@dataclass
class EvalConfig:
    """Periodic evaluations inside the job."""

    every_steps: NonNegativeInt = 0
    """Evaluate every N optimizer steps; 0 only at phase ends."""
    at_phase_end: bool = True
    """Evaluate at every phase boundary (needed for the continual-learning report)."""
    at_start: bool = True
    """Evaluate the starting model once before the first step (the baseline of forward
    transfer). false when that evaluation is shared, e.g. by many runs from one model
    (scripts/run_experiments.py evaluates SmolLM2 once for all its runs)."""
    heldout_tokens: PositiveInt = 4096
    """Held-out tokens per domain for perplexity; the same tokens every time."""
    batch_size: PositiveInt = 4
    """Sequences per rank per evaluation forward."""
    max_len: NonNegativeInt = 0
    """Longest model input, in tokens, when scoring tasks; a longer prompt loses its oldest
    tokens. 0: the model's ``max_position_embeddings``, as lm-evaluation-harness does (not
    ``train.seq_len``: cutting long prompts, e.g. SciQ's, to the training length changes the
    answers)."""
    tasks: list[TaskConfig] = field(default_factory=list)
    """Downstream tasks."""
    tasks_at: Literal["every", "start_and_end"] = "every"
    """every: tasks at every evaluation. start_and_end: only when evaluating the starting
    model and at the end of the run; the other evaluations are perplexity only (tasks can
    cost far more than perplexity; scripts/run_experiments.py)."""


@dataclass
class CheckpointConfig:
    """Sharded checkpoints and resume."""

    every_steps: NonNegativeInt = 0
    """Save every N optimizer steps; 0 only at phase ends and on exit signals."""
    at_phase_end: bool = True
    """Save at every phase boundary (such checkpoints are pinned: never rotated)."""
    keep_last: PositiveInt = 2
    """Unpinned checkpoints to keep."""
    export_hf_at_phase_end: bool = False
    """Also write a Hugging Face directory at each phase boundary."""
    async_save: bool = False
    """Write checkpoints in the background: the step loop waits only for a copy of the state
    in host memory (needs that much free RAM per rank: its shards with the AdamW moments),
    then training goes on while a thread writes, fsyncs and checksums the files; ``latest``
    moves only once every rank's files are written. One save in flight at a time; the final
    save and a stop signal's save complete before the run exits. A crash during the write
    resumes from the previous checkpoint."""


@dataclass
class LoggingConfig:
    """Metrics, progress bar and Weights & Biases."""

    wandb: bool = True
    """Log to wandb (offline mode automatically when no API key is configured)."""
    wandb_project: str = "migu-cpt"
    """wandb project name."""
    wandb_run_name: str | None = None
    """wandb run name; None uses the output directory's name."""
    log_every: PositiveInt = 1
    """Write a metrics row every N steps."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""
    peak_tflops: NonNegativeFloat = 0.0
    """Peak dense TFLOPS of one accelerator in the training dtype (H100 SXM bf16: 989). When
    > 0, each metrics row carries ``mfu`` (model FLOPs utilisation, PaLM's 6N + 12·L·d·T
    FLOPs per token)."""


@dataclass
class Config:
    """The whole run."""

    output_dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, evals.jsonl, cl_report.json, checkpoints/."""
    resume: str = "auto"
    """auto: resume from output_dir/checkpoints if it holds one (refusing, rather than starting
    from step 0, when an earlier run there cannot be resumed); never: start fresh, refusing
    (and touching nothing) if output_dir holds checkpoints or metrics; fresh: start over on
    purpose, moving an earlier run in output_dir into output_dir/old-<UTC timestamp>/ (use
    it once, on the command line, not in a config a scheduler requeues); or a path to a
    checkpoint directory. See README, "Resuming"."""
    resume_overrides: list[str] = field(default_factory=list)
    """Config keys (dotted; a section name covers its keys) whose change since the checkpoint
    a resumed run may take, e.g. [optim.lr, migu.keep_ratio]: optimizer, schedule, MIGU,
    regularisation and the micro-batch split. Taken changes are applied (the optimizer really
    uses the new LR) and logged; other such changes are refused at resume."""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    migu: MiguConfig = field(default_factory=MiguConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def global_batch(self, world_size: int) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.train.micro_batch_size * self.train.grad_accum * world_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def backend_config(self) -> BackendConfig:
        """The part of this config a backend reads (``migu_dist.build_backend``)."""
        return BackendConfig(
            engine=self.engine,
            optim=self.optim,
            migu=self.migu,
            micro_batch_size=self.train.micro_batch_size,
            grad_accum=self.train.grad_accum,
            init_from=self.model.init_from,
        )


# --------------------------------------------------------------------------------------
# Loading: dict -> dataclasses with every type problem collected
# --------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Convert ``value`` to type ``tp``; on mismatch record a problem and return None."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], key, problems)
    if origin is Literal:
        if value not in args:
            problems.append(f"{key}: {value!r} is not one of {list(args)}; pick one of those.")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}.")
            return tp()
        return _build(tp, value, key, problems)
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {value!r}; write it as [a, b, ...].")
            return []
        return [_convert(v, args[0], f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}.")
            return {}
        return {str(k): _convert(v, args[1], f"{key}.{k}", problems) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool or not isinstance(value, tp):
            problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}.")
            return None
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            close = difflib.get_close_matches(str(key), sorted(names), n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            problems.append(f"{where}: unknown key.{hint} Known keys: {sorted(names)}.")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            where = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _convert(data[f.name], hints[f.name], where, problems)
    obj = cls(**{k: v for k, v in kwargs.items() if v is not None or _optional(hints[k])})
    return obj


def _optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``["train.max_steps=20", ...]`` -> nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key=value, e.g. train.max_steps=20.")
            continue
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw else "")
    return tree, problems


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge; ``{"phases": {"0": {...}}}`` merges into element 0 of a list."""
    out = dict(base)
    for k, v in over.items():
        cur = out.get(k)
        if isinstance(v, dict) and isinstance(cur, dict):
            out[k] = _merge(cur, v)
        elif isinstance(v, dict) and isinstance(cur, list) and all(str(i).isdigit() for i in v):
            items = list(cur)
            for i, sub in v.items():
                i = int(i)
                if i < len(items) and isinstance(items[i], dict) and isinstance(sub, dict):
                    items[i] = _merge(items[i], sub)
                elif i < len(items):
                    items[i] = sub
                else:
                    items.append(sub)
            out[k] = items
        else:
            out[k] = v
    return out


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, world_size: int = 1
) -> Config:
    """Defaults < YAML file < dotted overrides; validated for ``world_size`` ranks."""
    problems: list[str] = []
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError([f"--config {path}: file not found."]) from None
        except yaml.YAMLError as e:
            raise ConfigError([f"--config {path}: not valid YAML: {e}"]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"--config {path}: top level must be a mapping of keys."])
        data = loaded or {}
    over, over_problems = parse_overrides(overrides or [])
    problems += over_problems
    cfg = _build(Config, _merge(data, over), "", problems)
    resolve(cfg)
    problems += validate(cfg, world_size)
    if problems:
        raise ConfigError(problems)
    return cfg


def resolve(cfg: Config) -> None:
    """Fill the fields a recipe decides and expand ``~`` in the paths that usually point
    outside the repository (a model cache), so that the saved config states them."""
    if isinstance(cfg.model.init_from, str):
        cfg.model.init_from = os.path.expanduser(cfg.model.init_from)
    if isinstance(cfg.data.tokenizer, str):
        cfg.data.tokenizer = os.path.expanduser(cfg.data.tokenizer)
    mg = cfg.migu
    if mg.recipe == "reference":
        if mg.threshold is None:
            mg.threshold = "quantile"
        if mg.phases is None:
            mg.phases = [ph.name for ph in cfg.data.phases[1:]]


def parse_config(data: dict[str, Any]) -> Config:
    """``data`` (a config as a plain dict, e.g. a run's saved config.yaml) as a :class:`Config`,
    keys and types checked but neither resolved nor validated (:func:`load_config` does both):
    for reading a config whose files may not exist on this machine. Raises :class:`ConfigError`
    listing every unknown key and wrong type."""
    problems: list[str] = []
    cfg = _build(Config, data, "", problems)
    if problems:
        raise ConfigError(problems)
    return cfg


# --------------------------------------------------------------------------------------
# Semantic validation
# --------------------------------------------------------------------------------------


def validate(cfg: Config, world_size: int) -> list[str]:
    """Every semantic problem of an already type-checked config."""
    p = _check_ranges(cfg, Config, "")
    m, t = cfg.model, cfg.train
    if m.init_from is None:
        if m.num_heads > 0 and m.hidden_size % m.num_heads:
            p.append(
                f"model.hidden_size: {m.hidden_size} is not divisible by model.num_heads="
                f"{m.num_heads}; pick sizes where hidden_size % num_heads == 0."
            )
        kv = m.num_kv_heads or m.num_heads
        if m.num_heads > 0 and kv > 0 and m.num_heads % kv:
            p.append(f"model.num_kv_heads: {kv} must divide model.num_heads={m.num_heads}.")
    elif not Path(m.init_from, "config.json").is_file():
        p.append(
            f"model.init_from: {m.init_from!r} has no config.json; point it to a local Hugging "
            "Face model directory."
        )
    else:
        family = model_family_problem(m.init_from)
        if family:
            p.append(family)
        if not any(Path(m.init_from, f).is_file() for f in HF_WEIGHT_FILES):
            p.append(
                f"model.init_from: {m.init_from!r} holds none of {list(HF_WEIGHT_FILES)}; "
                "point it to a complete Hugging Face model directory."
            )
    if t.seq_len > m.max_position_embeddings and m.init_from is None:
        p.append(
            f"train.seq_len: {t.seq_len} exceeds model.max_position_embeddings="
            f"{m.max_position_embeddings}; lower seq_len or raise max_position_embeddings."
        )
    if t.global_batch_size is not None:
        expect = cfg.global_batch(world_size)
        if t.global_batch_size != expect:
            p.append(
                f"train.global_batch_size: {t.global_batch_size} != micro_batch_size "
                f"({t.micro_batch_size}) x grad_accum ({t.grad_accum}) x world_size "
                f"({world_size}) = {expect}; set grad_accum so the product matches, or leave "
                "global_batch_size unset."
            )
    if cfg.model.compile and cfg.engine.backend == "deepspeed" and cfg.engine.zero_stage == 3:
        p.append(
            "model.compile: not supported with DeepSpeed ZeRO-3 (its parameter-fetch hooks "
            "run inside each block); use engine.backend=fsdp2, a ZeRO stage 0-2, or "
            "model.compile=false."
        )
    if cfg.engine.deepspeed_config and not Path(cfg.engine.deepspeed_config).is_file():
        p.append(f"engine.deepspeed_config: {cfg.engine.deepspeed_config!r} does not exist.")
    p += _validate_recipe(cfg.migu)
    import re

    for i, rx in enumerate(cfg.migu.include + cfg.migu.exclude):
        try:
            re.compile(rx)
        except re.error as e:
            p.append(f"migu.include/exclude[{i}]: {rx!r} is not a valid regex ({e}).")
    p += _validate_baselines(cfg)
    p += _validate_data(cfg)
    for i, task in enumerate(cfg.eval.tasks):
        if not task.name:
            p.append(f"eval.tasks[{i}].name: required.")
        if not Path(task.path).is_file():
            p.append(f"eval.tasks[{i}].path: {task.path!r} does not exist.")
        if task.num_fewshot and not (task.fewshot_path and Path(task.fewshot_path).is_file()):
            p.append(f"eval.tasks[{i}].fewshot_path: needed (an existing file) for num_fewshot>0.")
    if cfg.resume not in ("auto", "never", "fresh") and not Path(cfg.resume).is_dir():
        p.append(
            f"resume: {cfg.resume!r} is neither auto, never, fresh, nor a checkpoint directory."
        )
    keys = _dotted_keys(cfg.to_dict())
    for key in cfg.resume_overrides:
        if key not in keys:
            close = difflib.get_close_matches(key, sorted(keys), n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            p.append(f"resume_overrides: {key!r} is not a config key.{hint}")
    return p


def _dotted_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    """Every section and field of a config dict as a dotted key ("optim", "optim.lr")."""
    keys = set()
    for k, v in tree.items():
        key = f"{prefix}{k}"
        keys.add(key)
        if isinstance(v, dict):
            keys |= _dotted_keys(v, key + ".")
    return keys


def _check_ranges(value: Any, tp: Any, key: str) -> list[str]:
    """Problems of ``value`` (declared as ``tp``) and everything inside it: a number outside
    its field's :class:`Range`, or a float that is NaN or infinite."""
    rng = None
    if typing.get_origin(tp) is Annotated:
        tp, *meta = typing.get_args(tp)
        rng = next((m for m in meta if isinstance(m, Range)), None)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        return [] if value is None else _check_ranges(value, inner, key)
    if dataclasses.is_dataclass(value):
        hints = typing.get_type_hints(type(value), include_extras=True)
        return [
            q
            for f in dataclasses.fields(value)
            for q in _check_ranges(getattr(value, f.name), hints[f.name], _join(key, f.name))
        ]
    if origin is list and isinstance(value, list):
        return [q for i, v in enumerate(value) for q in _check_ranges(v, args[0], f"{key}[{i}]")]
    if origin is dict and isinstance(value, dict):
        return [q for k, v in value.items() for q in _check_ranges(v, args[1], f"{key}.{k}")]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return []
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{key}: must be a finite number, got {value}."]
    why = rng.problem(value) if rng is not None else None
    return [f"{key}: {why}, got {value}."] if why else []


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _validate_recipe(mg: MiguConfig) -> list[str]:
    """Fields that contradict ``migu.recipe: reference``."""
    if mg.recipe != "reference":
        return []
    reference = {"mode": "grad", "normalize": "none", "selection": "magnitude"}
    reference["threshold"] = "quantile"
    p = [
        f"migu.{key}: {getattr(mg, key)} is not the reference recipe's ({value}); set {value} "
        "or drop migu.recipe: reference."
        for key, value in reference.items()
        if getattr(mg, key) != value
    ]
    if mg.weight_decay:
        p.append(
            f"migu.weight_decay: {mg.weight_decay}; the reference recipe trains the masked "
            "weights without weight decay: unset it or drop migu.recipe: reference."
        )
    return p


def _validate_baselines(cfg: Config) -> list[str]:
    """LoRA and regularisation sections."""
    p: list[str] = []
    lo, reg = cfg.lora, cfg.regularization
    if lo.enabled and not lo.target_modules:
        p.append("lora.target_modules: name at least one module, e.g. [q_proj, v_proj].")
    if reg.kind != "none" and reg.strength == 0:
        p.append(
            f"regularization.strength: 0 makes kind={reg.kind} a no-op; set a positive "
            "strength (e.g. 0.1) or kind: none."
        )
    names = {ph.name for ph in cfg.data.phases}
    for name in reg.phases or []:
        if name not in names:
            p.append(f"regularization.phases: {name!r} is not a phase; known: {sorted(names)}.")
    return p


def _validate_data(cfg: Config) -> list[str]:
    import glob

    from train.data.fs import is_url, url_problem

    p: list[str] = []
    d = cfg.data
    tok = Path(d.tokenizer)
    if not (tok.is_file() or tok.is_dir()):
        p.append(f"data.tokenizer: {d.tokenizer!r} does not exist; give a .model file or HF dir.")
    for name, dom in d.domains.items():
        key = f"data.domains.{name}"
        given = [k for k in ("train", "store", "dataset") if getattr(dom, k)]
        if not given:
            p.append(f"{key}.train: no files given; list one or more globs (or set store/dataset).")
        elif len(given) > 1:
            p.append(
                f"{key}: {' and '.join(given)} are both set; a domain reads exactly one of "
                "train (files), store (token store) or dataset (datasets directory)."
            )
        stores = {"store": dom.store, "heldout_store": dom.heldout_store}
        urls = [*dom.train, *dom.heldout, *(v for v in stores.values() if v)]
        p += [x for x in (url_problem(u, key) for u in urls) if x]
        for k, v in stores.items():
            if v and not is_url(v) and not Path(v, "manifest.json").is_file():
                p.append(
                    f"{key}.{k}: {v!r} has no manifest.json; write the store with "
                    f"launch/pretokenize.py --config <this config> --domain {name} --out {v}."
                )
        if dom.heldout and dom.heldout_store:
            p.append(f"{key}: heldout and heldout_store are both set; keep one.")
        if dom.dataset:
            if is_url(dom.dataset):
                p.append(f"{key}.dataset: must be a local directory; copy it or use train/store.")
            else:
                from train.data.hfdatasets import dataset_kind

                try:
                    dataset_kind(dom.dataset)
                except ValueError as e:
                    p.append(f"{key}.dataset: {e}.")
        for k, globs in (("train", dom.train), ("heldout", dom.heldout)):
            for g in globs:
                if is_url(g):  # checked when read: listing a bucket needs its credentials
                    continue
                if not glob.glob(g, recursive=True):
                    p.append(
                        f"{key}.{k}: {g!r} matches no file; fix the path or run from the "
                        "repository root."
                    )
    if not d.phases:
        p.append("data.phases: at least one phase is needed, e.g. [{name: p1, domains: {x: 1}}].")
    seen = set()
    for i, ph in enumerate(d.phases):
        key = f"data.phases[{i}]"
        if not ph.name:
            p.append(f"{key}.name: required.")
        if ph.name in seen:
            p.append(f"{key}.name: {ph.name!r} is used twice; phase names must be unique.")
        seen.add(ph.name)
        if not ph.domains:
            p.append(f"{key}.domains: name at least one domain with a weight.")
        for dn in ph.domains:
            if dn not in d.domains:
                p.append(f"{key}.domains.{dn}: unknown domain; define it under data.domains.")
        if (ph.tokens is None) == (ph.steps is None) and i < len(d.phases) - 1:
            p.append(f"{key}: give exactly one of tokens or steps (only the last may omit both).")
        if ph.replay > 0 and i == 0:
            p.append(f"{key}.replay: the first phase has no earlier domains to replay; set 0.")
    if cfg.migu.phases is not None:
        for name in cfg.migu.phases:
            if name not in seen:
                p.append(f"migu.phases: {name!r} is not a phase name; known: {sorted(seen)}.")
    return p


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with ``load_config``)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
