"""Resuming on a different number of ranks: the per-rank state and the global batch.

The backends restore their own shards at any world size (DCP reshards natively; DeepSpeed via
``migu_dist/deepspeed_reshard.py``). What the loop keeps per rank (``rank_*.pt``) is mapped
here:

- data position: the same on every rank (each rank reads the whole global batch and keeps
  its rows), so rank 0's is every new rank's;
- MIGU: masks and domain summaries are identical on every rank (all-reduced statistics), so
  rank 0's;
- L2 anchor: each rank keeps the phase-start copy of the elements it owns; the old ranks'
  pieces are concatenated (ownership is contiguous and rank-ordered on every backend) and
  cut to the new ranks' ranges;
- RNG: the old streams belong to old ranks; each new rank's generators (torch, CUDA, NumPy,
  Python) are seeded from (seed, step, new rank) by :func:`derive_rng`. Training as set up
  here draws no random numbers per step (Llama without dropout; the data order comes from
  the seed and the step, not from these generators), so the trajectory does not depend on it.

The global batch (``micro_batch_size * grad_accum * world_size`` sequences) must stay the
same, or the batch sequence and the schedule's meaning change: :func:`batch_settings` gives
the nearest settings that keep it, for the refusal message in ``train/resume.py``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from migu_dist.dist import all_gather_objects

if TYPE_CHECKING:
    from migu_dist.backend import Backend


def derive_rng(seed: int, step: int, rank: int) -> None:
    """Seed this process's torch, CUDA, NumPy and Python generators from (seed, step, rank):
    the same numbers for the same triple, independent streams for different ranks."""
    ss = np.random.SeedSequence([seed, step, rank])
    torch_seed, np_seed, py_seed = (int(x) for x in ss.generate_state(3, dtype=np.uint64))
    torch.manual_seed(torch_seed)  # CPU and every CUDA device
    np.random.seed(np_seed % 2**32)
    random.seed(py_seed)


def load_rank_state(d: Path, written_by: int, backend: Backend) -> dict[str, Any]:
    """This rank's loop state from checkpoint ``d`` written by ``written_by`` ranks (any
    number). ``rng`` is None: the caller derives it (:func:`derive_rng`). Collective."""
    from train.checkpoint import read_rank_state

    first = read_rank_state(d / "rank_00000.pt")
    state = {"data": first["data"], "migu": first.get("migu"), "rng": None}
    reg = first.get("regularizer")
    state["regularizer"] = None
    if reg is not None:
        pieces = [reg["anchor"]] + [
            read_rank_state(d / f"rank_{r:05d}.pt", mmap=True)["regularizer"]["anchor"]
            for r in range(1, written_by)
        ]
        anchor = reshard_pieces(pieces, backend) if any(pieces) else {}
        state["regularizer"] = {"anchor_phase": reg["anchor_phase"], "anchor": anchor}
    return state


def reshard_pieces(
    pieces: list[dict[str, torch.Tensor]], backend: Backend
) -> dict[str, torch.Tensor]:
    """Per-rank flat pieces of parameters (``pieces[r][name]``: old rank r's elements, as
    ``Backend.local_params`` gives them) -> this rank's pieces on the current world.

    Every backend gives a rank one contiguous flat range of a parameter, the ranges in rank
    order (ZeRO-0 gives every rank the whole parameter). Collective (one all-gather of the
    local sizes)."""
    from train.checkpoint import CheckpointError

    mine = {name: (p, m.numel()) for name, p, m in backend.local_params()}
    sizes = all_gather_objects({name: n for name, (_, n) in mine.items()})
    out = {}
    for name, (param, n) in mine.items():
        numel = int(getattr(param, "ds_numel", param.numel()))  # the whole parameter's
        old = [p[name].reshape(-1) for p in pieces if name in p]
        if len(old) > 1 and all(t.numel() == numel for t in old):
            whole = old[0]  # replicated (ZeRO-0): every old rank held all of it
        else:
            whole = torch.cat(old) if old else torch.empty(0)
        if whole.numel() != numel:
            raise CheckpointError(
                f"{name}: the saved per-rank pieces hold {whole.numel()} elements, the "
                f"parameter has {numel}"
            )
        start = 0 if n == numel else sum(s.get(name, 0) for s in sizes[: backend.rank])
        out[name] = whole[start : start + n].clone()
    return out


def batch_settings(global_batch: int, world: int, micro: int) -> str:
    """How to keep ``global_batch`` sequences per step on ``world`` ranks: the
    ``micro_batch_size``/``grad_accum`` nearest to ``micro``, or the nearest world sizes
    that can when none can on ``world``."""
    if global_batch % world:
        near = sorted(
            (w for w in range(1, global_batch + 1) if global_batch % w == 0),
            key=lambda w: (abs(w - world), w),
        )[:2]
        return (
            f"{global_batch} sequences cannot be split evenly over {world} ranks; run on "
            f"{' or '.join(str(w) for w in sorted(near))} ranks (the nearest that divide "
            f"{global_batch}), or start a new run with a new global batch from exported "
            "weights"
        )
    per_rank = global_batch // world
    # The largest micro batch <= the old one that divides the rows each rank now needs.
    m = max(x for x in range(1, min(micro, per_rank) + 1) if per_rank % x == 0)
    return (
        f"on {world} ranks set train.micro_batch_size={m} train.grad_accum={per_rank // m} "
        f"({m} x {per_rank // m} x {world} = {global_batch})"
    )
