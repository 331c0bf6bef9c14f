"""Collectives that also work in a world of one, and rank-zero printing.

Every function here is safe without a process group (a plain ``python`` run, a unit test, the
offline evaluation): it then acts on this process alone. With one, each is a collective that
every rank must call.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place; returns ``t``."""
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average ``t`` over the ranks, in place; returns ``t``."""
    size = world()[1]
    if size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= size
    return t


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; over ``group`` (default: all ranks)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        out: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out
    return [obj]


def barrier(group: Any = None) -> None:
    """Wait for every rank (of ``group``, default all)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def print0(*args: Any, rank: int | None = None) -> None:
    """Print (flushed) on rank 0 only; ``rank`` defaults to the launcher's ``RANK``."""
    if (rank if rank is not None else int(os.environ.get("RANK", 0))) == 0:
        print(*args, flush=True)
