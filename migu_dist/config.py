"""The config sections of the distributed layer: optimizer, engine, MIGU, regularisation.

``migu_dist`` is the layer under the trainer and imports nothing from ``train``: its own
settings are declared here, and ``train/config.py`` composes them into the run's
:class:`train.config.Config` (same YAML keys; loading and validation live there).
:class:`BackendConfig` is the part of a run a backend reads (``Config.backend_config()``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts, declared with it (``Annotated[int, Range(ge=1)]``)
    and checked by ``train.config.validate``; every float is also checked to be finite."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def problem(self, value: float) -> str | None:
        """What is wrong with ``value``, or None."""
        bounds = [
            (self.ge, ">=", value >= self.ge if self.ge is not None else True),
            (self.gt, ">", value > self.gt if self.gt is not None else True),
            (self.le, "<=", value <= self.le if self.le is not None else True),
            (self.lt, "<", value < self.lt if self.lt is not None else True),
        ]
        if all(ok for _, _, ok in bounds):
            return None
        return "must be " + " and ".join(f"{op} {b:g}" for b, op, _ in bounds if b is not None)


PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: PositiveFloat = 1e-3
    """Peak learning rate."""
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1
    """Final learning rate as a fraction of lr (cosine/linear/wsd)."""
    weight_decay: NonNegativeFloat = 0.1
    """Decoupled weight decay of AdamW (not applied to norms and biases)."""
    beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9
    """AdamW beta1."""
    beta2: Annotated[float, Range(ge=0, lt=1)] = 0.95
    """AdamW beta2."""
    eps: PositiveFloat = 1e-8
    """AdamW epsilon."""
    grad_clip: NonNegativeFloat = 1.0
    """Global gradient-norm clipping threshold; 0 disables clipping."""
    warmup_steps: NonNegativeInt = 10
    """Linear warmup steps from 0 to lr."""
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    """Decay after warmup. wsd: warmup-stable-decay, constant until the last decay_fraction of
    the steps, then linear to min_lr."""
    decay_fraction: Annotated[float, Range(gt=0, le=1)] = 0.2
    """wsd only: fraction of the steps spent decaying."""


@dataclass
class EngineConfig:
    """The sharding backend."""

    backend: Literal["deepspeed", "fsdp2"] = "deepspeed"
    """Which backend trains the model: deepspeed (ZeRO, engine.zero_stage) or fsdp2 (PyTorch
    fully_shard per decoder block; engine.zero_stage and engine.deepspeed_config are ignored)."""
    zero_stage: Annotated[int, Range(ge=0, le=3)] = 3
    """DeepSpeed ZeRO stage, 0-3. Stage 3 shards parameters, gradients and optimizer state."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU. bf16: bf16 weights, activations and gradients, with fp32
    master weights and fp32 AdamW states on every engine. Gradients accumulate over
    micro-batches and are reduced in fp32 under DeepSpeed ZeRO-1/2/3 (ZeRO-1 through DeepSpeed's
    BF16_Optimizer) and FSDP2 (reduce_dtype fp32). DeepSpeed ZeRO-0 supports no fp32
    accumulation for bf16 weights: there gradients accumulate and are all-reduced in bf16
    (grad_accum_dtype bf16), then cast to fp32 for clipping and the step."""
    deepspeed_config: str | None = None
    """Path to your own DeepSpeed JSON. Its batch sizes, optimizer and scheduler keys are
    overwritten from this config so that the two never disagree."""
    dist_timeout_minutes: PositiveInt = 30
    """How long a collective waits for the other ranks before the job fails: what a hung rank
    (alive, stuck) costs. It must exceed the longest work one rank does while the others wait
    in a collective: checksumming or exporting a checkpoint (rank 0, phase-end Hugging Face
    export of a 7B model: minutes), an evaluation. A rank that dies ends the job sooner
    (torchrun stops its node, srun --kill-on-bad-exit=1 the others: launch/slurm_cpt.sh)."""


@dataclass
class MiguConfig:
    """Magnitude-based Gradient Updating (Du et al. 2024)."""

    enabled: bool = False
    """Mask gradient rows by output magnitude."""
    keep_ratio: Annotated[float, Range(gt=0, le=1)] = 0.3
    """Fraction of output rows of each masked linear layer that keep their gradient
    (reference code: 0.3, i.e. it masks the lowest 70%)."""
    recipe: Literal["custom", "reference"] = "custom"
    """reference: the paper's code (Du et al. 2024), one line away. It leaves the first phase
    unmasked (migu.phases, when unset, becomes every phase but the first), keeps rows by the
    quantile rule (migu.threshold: quantile) and, being mode grad, trains the masked weights
    without weight decay (its AdamW had none). Set fields must agree with it (mode grad,
    normalize none, selection magnitude, threshold quantile, weight_decay 0). custom: the
    fields as given."""
    mode: Literal["grad", "update"] = "grad"
    """grad: mask gradients only (AdamW momentum still moves masked rows, as in the reference
    code; see migu.weight_decay). update: masked rows do not move at all in that step."""
    threshold: Literal["topk", "quantile"] | None = None
    """Which rows are kept. topk: exactly ceil(keep_ratio * rows), ties to the lower row index.
    quantile (the reference code): rows whose magnitude is >= torch.quantile(magnitudes,
    1 - keep_ratio) (linear interpolation), every tied row included, so more than
    keep_ratio can be kept. None: quantile under recipe reference, else topk."""
    weight_decay: NonNegativeFloat | None = None
    """AdamW weight decay of the weights MIGU masks (the selected linears, or LoRA's A and B).
    None: 0 in mode grad, optim.weight_decay in mode update. In mode grad a masked row gets no
    gradient but decoupled decay would still shrink it every step (lr * weight_decay * w),
    which the reference runs (AdamW, weight decay 0) never did; in mode update masked rows are
    frozen anyway, so only kept rows decay. Other weights keep optim.weight_decay."""
    normalize: Literal["none", "l1_token"] = "none"
    """none: per-unit sum of |y| over tokens (reference code). l1_token: each token's |y| is
    divided by its L1 norm over units first, so every token weighs the same."""
    include: list[str] = field(default_factory=lambda: [r"layers\.\d+\.(self_attn|mlp)\.\w+_proj$"])
    """Regexes (re.search on module names) of nn.Linear modules to mask; default all linear
    layers of the transformer blocks of every supported family (Llama, Mistral, Qwen2 name
    them alike). A masked linear's bias (Qwen2's q/k/v) is masked with the same rows as its
    weight. Add 'lm_head$' to mask the output head too."""
    exclude: list[str] = field(default_factory=list)
    """Regexes of module names never masked, applied after include."""
    start_step: NonNegativeInt = 0
    """Optimizer steps before masking starts (statistics are still not collected before)."""
    phases: list[str] | None = None
    """Names of data phases in which masking is on; None means every phase (every phase but
    the first under recipe reference, as in the reference code)."""
    selection: Literal["magnitude", "random"] = "magnitude"
    """magnitude: the method. random: the paper's ablation, a random mask with the same ratio."""

    def masked_weight_decay(self, optim_weight_decay: float) -> float:
        """The weight decay of the masked weights (see ``weight_decay``)."""
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.0 if self.mode == "grad" else optim_weight_decay

    def quantile_rule(self) -> bool:
        """Whether rows are kept by the reference's quantile rule (see ``threshold``)."""
        return (self.threshold or ("quantile" if self.recipe == "reference" else "topk")) == (
            "quantile"
        )


@dataclass
class RegularizationConfig:
    """A penalty keeping the weights close to where the current phase started."""

    kind: Literal["none", "l2"] = "none"
    """none, or l2: adds strength/2 * ||w - w_phase_start||^2 to the loss, applied as the
    gradient term strength * (w - w_phase_start) on each rank's own shard before the step."""
    strength: NonNegativeFloat = 0.0
    """Coefficient of the penalty (per element; the gradient term is strength * (w - w0))."""
    phases: list[str] | None = None
    """Names of phases in which the penalty is on; None means every phase but the first (the
    first phase has no earlier knowledge to keep)."""


@dataclass
class BackendConfig:
    """What a backend needs of the run, and nothing more (``Config.backend_config()`` builds
    it from the whole config)."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    """The engine section."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW's hyper-parameters and gradient clipping (the schedule comes as a function)."""
    migu: MiguConfig = field(default_factory=MiguConfig)
    """For the masked weights' own weight-decay group in AdamW."""
    micro_batch_size: int = 1
    """Sequences per rank per forward/backward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each rank."""
    init_from: str | None = None
    """Hugging Face directory the model starts from: a backend that loads shards itself
    (:attr:`migu_dist.backend.Backend.loads_hf_shards`) reads each rank's part of it."""

    def global_batch(self, world_size: int) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.micro_batch_size * self.grad_accum * world_size
