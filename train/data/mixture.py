"""Phases in optimizer steps, and which domain feeds each row of a global batch.

The mixture RNG is counter-based: step ``s`` draws from a generator seeded with
``(seed, s)``. Its whole state is therefore the step counter, a resumed run draws exactly
what an uninterrupted one would, and appending a phase later changes no earlier draw.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from train.config import DataConfig

log = logging.getLogger(__name__)

# Salt of the mixture RNG, so that it never coincides with another use of the run seed.
_MIXTURE_STREAM = 0x6D6978


@dataclass
class PhasePlan:
    """A phase placed on the step axis: steps ``[start_step, end_step)``."""

    name: str
    index: int
    start_step: int
    end_step: int


def plan_phases(cfg: DataConfig, tokens_per_step: int, max_steps: int) -> list[PhasePlan]:
    """Step ranges of the phases: a token budget becomes ``ceil(tokens / tokens_per_step)``
    steps; a phase without budget (only the last may omit it) runs to ``max_steps``.

    Training stops at ``max_steps``, so a phase reaching past it is cut there and phases
    starting at or after it are left out (both logged).
    """
    plans: list[PhasePlan] = []
    start = 0
    for i, ph in enumerate(cfg.phases):
        if ph.steps is not None:
            steps = ph.steps
        elif ph.tokens is not None:
            steps = math.ceil(ph.tokens / tokens_per_step)
        else:
            steps = max(max_steps - start, 0)
        end = start + steps
        if start >= max_steps:
            log.warning(
                "phase %r starts at step %d >= max_steps=%d: not run", ph.name, start, max_steps
            )
            break
        if end > max_steps:
            log.warning(
                "phase %r is cut from %d to %d steps by max_steps",
                ph.name,
                steps,
                max_steps - start,
            )
            end = max_steps
        plans.append(PhasePlan(ph.name, i, start, end))
        start = end
    return plans


def replay_domains(cfg: DataConfig, phase_index: int) -> list[str]:
    """Domains of all earlier phases, in order of first use."""
    seen: dict[str, None] = {}
    for ph in cfg.phases[:phase_index]:
        seen.update(dict.fromkeys(ph.domains))
    return list(seen)


def step_domains(cfg: DataConfig, phase_index: int, step: int, seed: int, rows: int) -> list[str]:
    """The domain of each of the ``rows`` sequences of the global batch of ``step``.

    A share ``replay`` of the rows (rounded randomly, so exact in expectation and within one
    row per batch) comes uniformly from earlier phases' domains; the others are drawn
    independently by the phase's mixture weights.
    """
    ph = cfg.phases[phase_index]
    rng = np.random.default_rng([_MIXTURE_STREAM, seed % 2**63, step])
    names = list(ph.domains)
    weights = np.array([ph.domains[n] for n in names], dtype=np.float64)
    picks = [names[i] for i in rng.choice(len(names), size=rows, p=weights / weights.sum())]
    earlier = replay_domains(cfg, phase_index)
    if ph.replay > 0 and earlier:
        n_replay = int(math.floor(ph.replay * rows + rng.random()))
        replay_rows = rng.permutation(rows)[:n_replay]
        for row, d in zip(replay_rows, rng.integers(len(earlier), size=n_replay), strict=True):
            picks[row] = earlier[d]
    return picks
