"""L2 towards the phase-start weights, on each rank's own shard (a continual-learning baseline).

The penalty ``strength / 2 * ||w - w0||^2`` with ``w0`` the weights at the start of the current
phase is applied as its exact gradient, ``grad += strength * (w - w0)``, added to this rank's
partition of the reduced gradient between the last backward of a step and the optimizer step.
It is element-wise, so no rank needs any element it does not own: each rank keeps the fp32
phase-start copy of its own shard only (``Backend.local_params``; about one extra fp32 copy of
the optimizer's master shard, 1/world of the model), and nothing is gathered or all-reduced
except one scalar for telemetry.

Timing. The snapshot is taken at the first step of each phase in which the penalty is on,
before that step's update: weights only change in ``backend.step()``, so these are exactly the
weights the phase started from (also after a resume that lands mid-phase, where the snapshot
comes from the checkpoint instead). The term is added after MIGU's masking: MIGU selects which
rows the data gradient moves, while the penalty pulls every row back towards its anchor (under
``migu.mode: update`` masked rows stay frozen anyway). Gradient clipping then acts on the sum.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from migu_dist.config import RegularizationConfig
from migu_dist.dist import all_reduce_sum

if TYPE_CHECKING:
    from migu_dist.backend import Backend


class L2Anchor:
    """Sharded L2-to-phase-start penalty, a :class:`migu_dist.hooks.StepHook`. Per step:
    ``apply(backend, step, phase)`` just before ``backend.step()``; its state (this rank's
    anchor shard) goes into the rank's checkpoint."""

    name = "regularizer"

    def __init__(self, cfg: RegularizationConfig, phase_names: list[str]):
        self.cfg = cfg
        if cfg.phases is not None:
            self.phases = set(cfg.phases)
        else:
            self.phases = set(phase_names[1:])
        self.anchor_phase: str | None = None  # the phase whose start weights ``anchor`` holds
        self.anchor: dict[str, torch.Tensor] = {}  # name -> (local numel,) fp32

    def active(self, step: int, phase: str | None) -> bool:
        return self.cfg.kind == "l2" and self.cfg.strength > 0 and phase in self.phases

    def snapshot(self, backend: Backend, phase: str) -> None:
        """Copy this rank's shard of every trainable weight as the anchor of ``phase``."""
        self.anchor = {n: m.detach().float().clone() for n, _, m in backend.local_params()}
        self.anchor_phase = phase

    def apply(self, backend: Backend, step: int, phase: str | None) -> dict[str, float]:
        """Add ``strength * (w - w0)`` to this rank's gradient elements; returns telemetry
        (the penalty and the distance from the anchor, over all ranks)."""
        if not self.active(step, phase):
            return {}
        if self.anchor_phase != phase:
            self.snapshot(backend, phase or "")
        sq = torch.zeros((), dtype=torch.float64)
        for name, param, master in backend.local_params():
            diff = master.float() - self.anchor[name]  # (local numel,)
            frags = list(backend.grad_fragments(param))
            if len(frags) != 1 or frags[0].numel != diff.numel():
                raise RuntimeError(
                    f"{name}: local_params and grad_fragments disagree on this rank's elements"
                )
            frag = frags[0]
            grad = frag.get()  # (>= numel,) flat
            grad[: frag.numel].add_(diff.to(grad.dtype), alpha=self.cfg.strength)
            frag.set(grad)
            sq += diff.double().pow(2).sum().cpu()
        total = all_reduce_sum(sq.to(backend.device)).item()
        return {"reg/l2_penalty": 0.5 * self.cfg.strength * total, "reg/l2_dist": math.sqrt(total)}

    def end_step(self) -> None:
        pass

    def end_phase(self) -> None:
        pass  # the next phase's anchor is taken at its first active step

    def state_dict(self) -> dict[str, Any]:
        """Per rank: this rank's anchor shard."""
        return {"anchor_phase": self.anchor_phase, "anchor": dict(self.anchor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor_phase = state.get("anchor_phase")
        self.anchor = dict(state.get("anchor", {}))
