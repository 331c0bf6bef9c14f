"""Learning-rate schedule: linear warmup, then cosine / linear / constant / WSD decay.

Phases with ``lr_at_start: rewarm`` start a new segment (warmup and decay again over that
phase's steps); ``continue`` phases extend the current segment, so a run with only
``continue`` phases has one schedule over ``max_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from train.config import OptimConfig


def segment_factor(o: OptimConfig, step: int, length: int) -> float:
    """LR multiplier at ``step`` (0-based) of a segment of ``length`` steps."""
    if o.warmup_steps > 0 and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    lo = o.min_lr_ratio
    decay_steps = max(1, length - o.warmup_steps)
    t = min(1.0, (step - o.warmup_steps) / decay_steps)  # progress through the decay in [0, 1]
    if o.schedule == "constant":
        return 1.0
    if o.schedule == "linear":
        return lo + (1 - lo) * (1 - t)
    if o.schedule == "cosine":
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))
    # wsd: stable at 1.0, then linear to min over the last decay_fraction of the segment
    decay_len = max(1, round(o.decay_fraction * length))
    start = length - decay_len
    if step < start:
        return 1.0
    return lo + (1 - lo) * (1 - min(1.0, (step - start + 1) / decay_len))


def lr_lambda(
    o: OptimConfig, max_steps: int, segment_starts: Sequence[int] = (0,)
) -> Callable[[int], float]:
    """``LambdaLR`` function: step -> multiplier of the peak lr, restarting at each start."""
    starts = sorted(set(segment_starts) | {0})
    bounds = [*starts, max_steps]

    def fn(step: int) -> float:
        for i in range(len(starts)):
            if bounds[i] <= step < bounds[i + 1] or i == len(starts) - 1:
                return segment_factor(o, step - bounds[i], max(1, bounds[i + 1] - bounds[i]))
        return 1.0

    return fn
