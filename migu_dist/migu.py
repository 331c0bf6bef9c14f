"""MIGU: Magnitude-based Gradient Updating (Du et al. 2024), on sharded gradients.

During each optimizer step only the output rows of each selected ``nn.Linear`` whose outputs
had the largest L1 magnitude on the current batch keep their gradient.

Per step:
1. A forward hook on every selected linear adds, per output unit, sum_tokens |y| (fp32) over
   every micro-batch of the step. Skipped in eval mode, under no_grad, and while autograd
   recomputes a checkpointed block in backward (so activation checkpointing does not count
   a micro-batch twice). Positions where ``token_mask`` is 0 (padding) are excluded.
2. At the accumulation boundary the per-layer vectors are concatenated and all-reduced once
   (mean over data-parallel ranks), so every rank derives the same mask.
3. Per layer, the top ``k = ceil(keep_ratio * rows)`` rows are kept. Ties are broken by row
   index (lower index wins): a stable descending sort, no randomness. ``threshold: quantile``
   (the reference code) keeps instead every row whose magnitude is >= the layer's
   ``1 - keep_ratio`` quantile (linear interpolation), tied rows included.
4. Each rank masks only the gradient elements it owns (a :class:`GradFragment` from the
   backend: a flat range of the row-major weight), mapping flat index -> row
   (``row = flat // in_features``); a row that straddles two ranks' partitions is masked by
   both, each on its own part. No full gradient is ever gathered.

A masked linear's bias (Qwen2's q/k/v projections have one) is masked with the same rows as
its weight: bias[i] is part of output unit i, whose magnitude decided the mask, so a masked
unit's bias stays as still as its weights (its gradient is zeroed; ``mode: update`` freezes it).

With LoRA adapters (peft ``lora.Linear`` modules, selected by the same include regexes as the
linear they wrap) only the adapters train, and their rows are masked instead: B
(out_features, r) by the magnitude of the wrapped layer's combined output (base + adapter:
B's rows are the layer's output units), A (r, in_features) by the magnitude of A's own
(r,)-dim output. The frozen base weight and a linear nested in an adapter are never
selected on their own.

``normalize: l1_token`` divides each token's |y| by its L1 norm over the layer's units before
summing, so that every token weighs the same; with ``none`` (the reference code), tokens with
large activations dominate. A per-layer rescaling (the paper's L1 normalisation of the summed
vector) would not change which rows are kept, so it is not offered separately.

``mode: grad`` masks gradients only: AdamW momentum still moves masked rows (the reference
behaviour; the masked weights get their own weight decay, ``migu.weight_decay``, by default 0
as in the reference runs, else decay alone would shrink every masked row each step).
``mode: update`` also freezes masked rows inside the optimizer for that step (moments and
weight untouched): over a long continual pre-training run, momentum from earlier domains
otherwise keeps moving rows that the current domain does not use, which is exactly the drift
MIGU tries to prevent.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from migu_dist import parallelize
from migu_dist.config import MiguConfig
from migu_dist.dist import all_reduce_mean

if TYPE_CHECKING:
    from migu_dist.backend import Backend


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. recomputing a checkpointed block)."""
    return torch._C._current_graph_task_id() != -1


def topk_row_mask(stat: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """(rows,) magnitudes -> (rows,) bool keep mask of the top ceil(keep_ratio*rows) rows.

    Ties go to the lower row index (stable sort), so the result is deterministic.
    """
    rows = stat.numel()
    k = min(rows, max(1, math.ceil(keep_ratio * rows - 1e-9)))
    order = torch.sort(stat, descending=True, stable=True).indices
    keep = torch.zeros(rows, dtype=torch.bool, device=stat.device)
    keep[order[:k]] = True
    return keep


def quantile_row_mask(stat: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """(rows,) magnitudes -> (rows,) bool: the reference code's rule, rows whose magnitude is
    >= the ``1 - keep_ratio`` quantile of the layer's magnitudes (``torch.quantile``, linear
    interpolation between the two nearest order statistics). Without ties at the threshold
    that keeps ``rows - ceil((1 - keep_ratio) * (rows - 1))`` rows (11 of 37 at 0.3, where
    top-k keeps 12); rows tied at the threshold are all kept."""
    return stat >= torch.quantile(stat.float(), 1.0 - keep_ratio)


def row_mask_for_range(keep: torch.Tensor, start: int, numel: int, cols: int) -> torch.Tensor:
    """The (numel,) element mask of flat range [start, start+numel) of a (rows, cols) weight.

    Only the rows the range touches are expanded, so the cost is O(numel + 2*cols).
    """
    first = start // cols
    last = (start + numel - 1) // cols
    expanded = keep[first : last + 1].repeat_interleave(cols)  # ((last-first+1)*cols,)
    offset = start - first * cols
    return expanded[offset : offset + numel]


@dataclass
class _Layer:
    name: str
    module: nn.Module  # whose output is measured
    owner: nn.Linear  # its .weight (rows, cols) is masked by rows; rows = the module's outputs.
    # The parameter is looked up at every step: a backend may replace it (FSDP2 does).
    cols: int
    stat: torch.Tensor  # (rows,) fp32 sum of |y| over this step's tokens
    kind: str  # e.g. "q_proj" or "q_proj.lora_B", for per-type telemetry
    keep: torch.Tensor | None = None  # (out_features,) bool, the last step's mask
    domain_sum: torch.Tensor | None = None  # running sum of keep over the current domain
    handle: Any = field(default=None, repr=False)


class Migu:
    """Collects output magnitudes and masks gradient rows before each optimizer step: a
    :class:`migu_dist.hooks.StepHook`.

    Usage per optimizer step: forward/backward every micro-batch (the hooks collect; a
    forward's ``labels`` of -100 mark the positions left out), then ``apply(backend, step,
    phase)`` between the last backward and ``backend.step()``, which returns telemetry, then
    ``end_step()``.
    """

    name = "migu"

    def __init__(self, cfg: MiguConfig, model: nn.Module, *, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.layers: list[_Layer] = []
        self.token_mask: torch.Tensor | None = None  # (B, T) 1 = count this position
        self.collecting = True  # bench/bench_train.py times steps with the statistics off
        self.prev_domain_keep: dict[str, torch.Tensor] = {}  # layer -> mean mask of last domain
        self._domain_steps = 0
        self._keep = quantile_row_mask if cfg.quantile_rule() else topk_row_mask
        self.layers = select_layers(cfg, model)
        for layer in self.layers:
            layer.handle = layer.module.register_forward_hook(self._make_hook(layer))
        model.register_forward_pre_hook(self._read_token_mask, with_kwargs=True)
        if not self.layers:
            raise ValueError(
                f"migu.include {cfg.include} matched no trainable nn.Linear or LoRA module; "
                "check the regexes against model.named_modules()."
            )

    # ---------------------------------------------------------------- statistics

    def _read_token_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the whole model: the positions of this forward to count are
        those whose ``labels`` are not -100 (padding); None (all) without labels. One bool
        read per micro-batch decides, so that an unpadded batch takes the plain reduction."""
        labels = kwargs.get("labels")
        ignored = labels == -100 if isinstance(labels, torch.Tensor) else None
        self.token_mask = (~ignored).float() if ignored is not None and ignored.any() else None

    def _make_hook(self, layer: _Layer):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if not (self.collecting and module.training and torch.is_grad_enabled()):
                return
            # A recompute for backward (activation checkpointing) must not count twice. In
            # eager code autograd's graph-task id says so; a compiled block (model.compile)
            # cannot read it, and its checkpoint sets a flag that dynamo guards on instead.
            if parallelize.RECOMPUTING or (not torch.compiler.is_compiling() and _in_backward()):
                return
            with torch.no_grad():
                y = output.detach()
                if self.cfg.normalize == "l1_token":
                    a = y.abs().float()  # (B, T, d_out)
                    a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
                else:
                    a = None
                if self.token_mask is not None:
                    w = self.token_mask.to(device=y.device, dtype=torch.float32)  # (B, T)
                    a = a if a is not None else y.abs().float()
                    s = torch.einsum("bt,bto->o", w, a)  # (d_out,)
                elif a is not None:
                    s = a.reshape(-1, a.shape[-1]).sum(0)
                else:
                    # One fp32-accumulating reduction over all tokens: (B, T, d_out) -> (d_out,)
                    s = torch.linalg.vector_norm(
                        y.reshape(-1, y.shape[-1]), ord=1, dim=0, dtype=torch.float32
                    )
                if layer.stat.device != s.device:
                    layer.stat = layer.stat.to(s.device)
                layer.stat += s

        return hook

    def reset(self) -> None:
        """Start a new optimizer step's statistics."""
        for layer in self.layers:
            layer.stat.zero_()

    def end_step(self) -> None:
        self.reset()

    # ---------------------------------------------------------------- masking

    def active(self, step: int, phase: str | None) -> bool:
        """Whether masking applies at this optimizer step (0-based) in this phase."""
        if not self.cfg.enabled or step < self.cfg.start_step:
            return False
        return self.cfg.phases is None or phase in self.cfg.phases

    def compute_masks(self, step: int) -> list[torch.Tensor]:
        """All-reduce the statistics once (fused) and derive every layer's keep mask."""
        flat = torch.cat([layer.stat for layer in self.layers])  # (sum of d_out,)
        all_reduce_mean(flat)
        masks = []
        offset = 0
        gen = None
        if self.cfg.selection == "random":
            # Same seed on every rank -> the same random mask everywhere.
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        for layer in self.layers:
            n = layer.stat.numel()
            stat = flat[offset : offset + n]
            offset += n
            if gen is not None:
                stat = torch.rand(n, generator=gen).to(stat.device)
            masks.append(self._keep(stat, self.cfg.keep_ratio))
        return masks

    def apply(self, backend: Backend, step: int, phase: str | None) -> dict[str, float]:
        """Mask this rank's gradient fragments; returns telemetry for the step's metrics."""
        masks = self.compute_masks(step)
        freeze = self.cfg.mode == "update"
        for layer, keep in zip(self.layers, masks):
            # (param, elements per row): the weight (rows, cols) and its bias (rows,), if any.
            params = [(layer.owner.weight, layer.cols)]
            if layer.owner.bias is not None and layer.owner.bias.requires_grad:
                params.append((layer.owner.bias, 1))
            for param, cols in params:
                for frag in backend.grad_fragments(cast(nn.Parameter, param)):
                    grad = frag.get()  # (>= numel,) flat, this rank's part
                    elem = row_mask_for_range(keep, frag.param_start, frag.numel, cols)
                    grad[: frag.numel].mul_(elem.to(grad.dtype))
                    frag.set(grad)
                    if freeze:
                        backend.freeze_elements(frag, ~elem)
        return self._telemetry(masks)

    # ---------------------------------------------------------------- telemetry & state

    def _telemetry(self, masks: list[torch.Tensor]) -> dict[str, float]:
        # One device->host copy of every mask (not one sync per layer); the rest is on CPU.
        on_cpu = torch.cat(masks).cpu().split([m.numel() for m in masks])
        kept = sum(int(m.sum()) for m in on_cpu)
        total = sum(m.numel() for m in on_cpu)
        out: dict[str, float] = {"migu/kept_frac": kept / total}
        by_kind: dict[str, list[int]] = {}
        jac_prev, jac_dom = [], []
        for layer, keep_cpu in zip(self.layers, on_cpu):
            k = by_kind.setdefault(layer.kind, [0, 0])
            k[0] += int(keep_cpu.sum())
            k[1] += keep_cpu.numel()
            if layer.keep is not None:
                jac_prev.append(_jaccard(layer.keep, keep_cpu))
            if layer.name in self.prev_domain_keep:
                # Mean mask of the previous domain, thresholded at its own top-k.
                ref = topk_row_mask(self.prev_domain_keep[layer.name], self.cfg.keep_ratio)
                jac_dom.append(_jaccard(ref, keep_cpu))
            layer.keep = keep_cpu
            ds = keep_cpu.float()
            layer.domain_sum = ds if layer.domain_sum is None else layer.domain_sum + ds
        self._domain_steps += 1
        for kind, (a, b) in sorted(by_kind.items()):
            out[f"migu/kept_frac/{kind}"] = a / b
        if jac_prev:
            out["migu/jaccard_prev_step"] = sum(jac_prev) / len(jac_prev)
        if jac_dom:
            out["migu/jaccard_prev_domain"] = sum(jac_dom) / len(jac_dom)
        return out

    def end_phase(self) -> None:
        """At a phase boundary: the current domain's mean mask becomes the reference."""
        if self._domain_steps == 0:
            return
        self.prev_domain_keep = {
            layer.name: layer.domain_sum / self._domain_steps
            for layer in self.layers
            if layer.domain_sum is not None
        }
        for layer in self.layers:
            layer.domain_sum = None
        self._domain_steps = 0

    def state_dict(self) -> dict:
        """What matters across steps: masks and domain summaries (identical on every rank)."""
        return {
            "prev_domain_keep": {k: v.cpu() for k, v in self.prev_domain_keep.items()},
            "last_keep": {x.name: x.keep for x in self.layers if x.keep is not None},
            "domain_sum": {x.name: x.domain_sum for x in self.layers if x.domain_sum is not None},
            "domain_steps": self._domain_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.prev_domain_keep = dict(state.get("prev_domain_keep", {}))
        self._domain_steps = int(state.get("domain_steps", 0))
        for layer in self.layers:
            layer.keep = state.get("last_keep", {}).get(layer.name)
            layer.domain_sum = state.get("domain_sum", {}).get(layer.name)


def select_layers(cfg: MiguConfig, model: nn.Module) -> list[_Layer]:
    """The layers ``cfg.include``/``cfg.exclude`` select, in module order (no hooks yet)."""
    inc = [re.compile(r) for r in cfg.include]
    exc = [re.compile(r) for r in cfg.exclude]
    return [
        layer
        for name, mod in model.named_modules()
        if any(r.search(name) for r in inc) and not any(r.search(name) for r in exc)
        for layer in _targets(name, mod)
    ]


def masked_weights(cfg: MiguConfig, model: nn.Module) -> list[nn.Parameter]:
    """The weights MIGU masks by rows (for their own weight decay, ``migu.weight_decay``)."""
    return [cast(nn.Parameter, layer.owner.weight) for layer in select_layers(cfg, model)]


def _targets(name: str, mod: nn.Module) -> list[_Layer]:
    """The masked weights a selected module stands for: a trainable ``nn.Linear`` itself, or
    a peft LoRA layer's B (rows = the layer's outputs) and A (rows = its r outputs)."""

    def layer(lname: str, hooked: nn.Module, lin: nn.Linear, kind: str) -> _Layer:
        stat = torch.zeros(lin.out_features, dtype=torch.float32)
        return _Layer(lname, hooked, lin, lin.in_features, stat, kind)

    kind = name.rsplit(".", 1)[-1]
    lora_a = getattr(mod, "lora_A", None)
    if isinstance(lora_a, nn.ModuleDict):  # peft lora.Linear: adapters train, base is frozen
        out = []
        for adapter, a in lora_a.items():
            b = cast(nn.Linear, cast(nn.ModuleDict, mod.lora_B)[adapter])
            out.append(layer(f"{name}.lora_B.{adapter}", mod, b, f"{kind}.lora_B"))
            a = cast(nn.Linear, a)
            out.append(layer(f"{name}.lora_A.{adapter}", a, a, f"{kind}.lora_A"))
        return out
    if isinstance(mod, nn.Linear) and mod.weight.requires_grad and ".lora_" not in name:
        return [layer(name, mod, mod, kind)]
    return []


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    inter = int((a & b).sum())
    union = int((a | b).sum())
    return inter / union if union else 1.0
