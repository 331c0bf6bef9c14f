"""What runs between the last backward of a step and the optimizer step.

A :class:`StepHook` acts on this rank's part of the reduced gradient (``Backend.grad_fragments``)
before ``backend.step()``: MIGU masks rows (``migu_dist/migu.py``), the L2 anchor pulls every
weight back towards the phase start (``migu_dist/regularize.py``). The trainer keeps a list of
hooks and calls them in list order, so MIGU comes first: it selects which rows the data
gradient moves, then the penalty is added to every row. Gradient clipping acts on the sum.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from migu_dist.backend import Backend


class StepHook(Protocol):
    """The trainer's side of a pre-step hook."""

    name: str
    """Key of the hook's state in each rank's checkpoint (``rank_*.pt``)."""

    def active(self, step: int, phase: str | None) -> bool:
        """Whether :meth:`apply` acts at this optimizer step (0-based) of this phase."""
        ...

    def apply(self, backend: Backend, step: int, phase: str | None) -> dict[str, float]:
        """Change this rank's gradient fragments (a step whose loss and gradients are finite,
        :meth:`active` true); returns telemetry for the step's metrics."""
        ...

    def end_step(self) -> None:
        """After every step, taken or skipped."""
        ...

    def end_phase(self) -> None:
        """At a phase boundary, after the phase's last step."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """This rank's state to checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
