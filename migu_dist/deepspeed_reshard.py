"""Resume a DeepSpeed ZeRO-1/2/3 checkpoint on a different number of ranks.

DeepSpeed's own ``load_checkpoint`` needs the world size the checkpoint was written with
(ZeRO-3 refuses outright; ZeRO-1/2 only with ``elastic_checkpoint``, which ZeRO-3 lacks).
Here the checkpoint is consolidated per parameter and repartitioned on the new world:

1. Every old rank's ``*zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` holds its flat fp32
   partition and the AdamW moments in the same layout (ZeRO-3: ``fp32_flat_groups`` and
   ``optimizer_state_dict.state[i]``, one flat tensor per sub-group; ZeRO-1/2 and the bf16
   optimizer: ``single_partition_of_fp32_groups`` and ``base_optimizer_state.state[g]``).
   For each trainable parameter the old ranks' pieces are cut out and concatenated in rank
   order (every backend partitions a parameter into contiguous, rank-ordered ranges):
   ZeRO-3 puts ``ceil(numel / N)`` elements of every parameter on each rank, in the order of
   the sub-group's ``param_shapes``; ZeRO-1/2 records each piece's place
   (``param_slice_mappings``).
2. The whole fp32 weight and both moments go into the new engine's partitions through
   DeepSpeed's public ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state`` (each
   rank keeps the elements it now owns), and the low-precision model weights are written
   from the fp32 value. AdamW's step count, the LR schedule and the engine's counters come
   from the old rank 0's files.

Why this and not DeepSpeed's universal checkpoint (``ds_to_universal`` + ``load_universal``):
the conversion is an extra offline pass that writes one file per parameter, state and old
rank (here 3 x N x parameters) and a second copy of the whole state, and its loader is tied
to DeepSpeed's optimizer wrappers' private layout at load time. Reading the partitions
directly needs no extra disk space, no extra step for the user, and the same code serves
ZeRO-1, 2 and 3 (tested with MIGU in ``tests/test_checkpoint.py``: the restored weights and
moments are compared with DeepSpeed's ``zero_to_fp32`` and ``ds_to_universal`` output).
Files are memory-mapped, so a rank touches only the pages it concatenates.

Frozen parameters (LoRA's base weights) have no optimizer state and never change: the new
run's model already holds them (from ``model.init_from``).
ZeRO-0 checkpoints are whole on every rank (``mp_rank_00_model_states.pt``) and load with
DeepSpeed's own loader at any world size.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

STATES = ("fp32", "exp_avg", "exp_avg_sq")
_RANK = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def optim_files(d: Path) -> list[Path]:
    """The per-rank ZeRO optimizer files of checkpoint directory ``d``, in rank order
    (none for ZeRO-0)."""
    found = {int(m.group(1)): p for p in d.iterdir() if (m := _RANK.search(p.name))}
    if sorted(found) != list(range(len(found))):
        raise FileNotFoundError(f"{d}: ZeRO optimizer files of ranks {sorted(found)} (gaps)")
    return [found[r] for r in range(len(found))]


def _load(path: Path) -> Any:
    # DeepSpeed's files hold its own classes (fragment addresses, enums): not loadable with
    # weights_only, as in DeepSpeed's own loader. mmap: only the pages sliced below are read.
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def _group_states(o: dict[str, Any]) -> list[dict[str, Any]]:
    """ZeRO-1/2 and bf16: the torch optimizer's state per parameter group (one flat tensor
    each): ``state_dict()["state"]``, or a plain list with ``zero_optimization.
    elastic_checkpoint``."""
    base = o["base_optimizer_state"]
    if isinstance(base, list):
        return base
    return [base["state"][g] for g in range(len(base["state"]))]


def consolidate(d: Path) -> tuple[dict[str, dict[str, torch.Tensor]], int, dict[str, Any]]:
    """Per trainable parameter name, its whole ``fp32`` weight and ``exp_avg``/``exp_avg_sq``
    (each shaped like the parameter); AdamW's step; and rank 0's model-states file (LR
    schedule, engine counters). In one process, from the files alone."""
    files = optim_files(d)
    if not files:
        raise FileNotFoundError(f"{d}: no ZeRO optimizer files (a ZeRO-0 checkpoint?)")
    optim = [_load(f)["optimizer_state_dict"] for f in files]
    stage3 = "fp32_flat_groups" in optim[0]
    model_file = d / (
        "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage3 else "mp_rank_00_model_states.pt"
    )
    model_states = _load(model_file)
    shapes: list[dict[str, torch.Size]] = model_states["param_shapes"]
    full: dict[str, dict[str, torch.Tensor]] = {}
    steps: set[float] = set()
    world = len(files)
    if stage3:
        # rank r's flats: [sub-group i] -> (sum over its params of ceil(numel / N),)
        flats = [
            {
                "fp32": o["fp32_flat_groups"],
                **{
                    k: [
                        o["optimizer_state_dict"]["state"][i][k]
                        for i in range(len(o["fp32_flat_groups"]))
                    ]
                    for k in STATES[1:]
                },
            }
            for o in optim
        ]
        for o in optim:
            steps.update(float(s["step"]) for s in o["optimizer_state_dict"]["state"].values())
        for i, group in enumerate(shapes):
            offset = 0
            for name, shape in group.items():
                numel = math.prod(shape)
                part = -(-numel // world)  # ceil: every rank holds this many, the last padded
                full[name] = {
                    k: torch.cat([f[k][i].narrow(0, offset, part) for f in flats])[:numel]
                    .view(shape)
                    .clone()
                    for k in STATES
                }
                offset += part
    else:
        for name in (n for group in shapes for n in group):
            pieces: dict[str, list[torch.Tensor]] = {k: [] for k in STATES}
            for o in optim:
                base = _group_states(o)
                for g, mapping in enumerate(o["param_slice_mappings"]):
                    if name in mapping:
                        frag = mapping[name]
                        src = {
                            "fp32": o["single_partition_of_fp32_groups"][g],
                            **{k: base[g][k] for k in STATES[1:]},
                        }
                        for k in STATES:
                            pieces[k].append(src[k].narrow(0, frag.start, frag.numel))
            shape = next(group[name] for group in shapes if name in group)
            full[name] = {k: torch.cat(v).view(shape).clone() for k, v in pieces.items()}
        for o in optim:
            steps.update(float(s["step"]) for s in _group_states(o) if "step" in s)
            if "base_optimizer_state_step" in o:  # elastic_checkpoint: the step kept aside
                steps.add(float(o["base_optimizer_state_step"]))
    if len(steps) != 1:
        raise RuntimeError(f"{d}: AdamW step counts differ between partitions ({sorted(steps)})")
    return full, int(steps.pop()), model_states


def _init_state(engine: Any, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Give every flat fp32 tensor the optimizer steps an AdamW state at ``step`` (moments
    zero until set per parameter). A fresh ZeRO-3 engine has none before its first step (and
    its torch optimizer's param groups are empty between steps: the tensors are the
    engine's ``fp32_partitioned_groups_flat``); ZeRO-1/2 do at construction."""
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flats is None:
        flats = [t for g in optimizer.param_groups for t in g["params"]]
    fused = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for t in flats:
        st = optimizer.state[t]
        for k in STATES[1:]:
            if k not in st:
                st[k] = torch.zeros_like(t, memory_format=torch.preserve_format)
        # torch's AdamW: a float32 scalar step, on the parameter's device when fused.
        st["step"] = torch.tensor(
            float(step), dtype=torch.float32, device=t.device if fused else "cpu"
        )
    # ZeRO-1/2 and the bf16 optimizer link each parameter's view of the moments (what
    # safe_set_full_optimizer_state writes through) lazily, at the first step: link now.
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def load_resharded(engine: Any, optimizer: torch.optim.Optimizer, scheduler: Any, d: Path) -> None:
    """Restore ``engine`` (any ZeRO stage 1-3, any world size) from checkpoint directory ``d``
    written with ZeRO-1/2/3 by any number of ranks: weights, AdamW moments and step, the LR
    schedule and the engine's step counters. Collective under ZeRO-3 (the moments of a
    parameter are set on every rank's partition at once)."""
    full, step, model_states = consolidate(d)
    _init_state(engine, optimizer, step)
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if name not in full:
            raise RuntimeError(f"{d}: no saved optimizer state for parameter {name}")
        st = full[name]
        value = st["fp32"].to(engine.device)
        safe_set_full_fp32_param(p, value)
        for k in STATES[1:]:
            safe_set_full_optimizer_state(p, st[k].to(engine.device), k)
        # The model's (low-precision, or fp32 copy) weights: what the partitions' owner would
        # have written after the step that produced the checkpoint.
        with torch.no_grad():
            if hasattr(p, "ds_id"):  # ZeRO-3: this rank's slice of the flat weight
                part = p.partition_numel()
                start = p._z3_optimizer._get_param_partition_rank(p) * part
                n = max(0, min(part, p.ds_numel - start))
                p.ds_tensor.data.view(-1)[:n].copy_(value.view(-1)[start : start + n])
            else:  # ZeRO-1/2: every rank holds the whole weight
                p.data.copy_(value.view_as(p))
    scheduler.load_state_dict(model_states["lr_scheduler"])
    engine.global_steps = model_states.get("global_steps", engine.global_steps)
    engine.global_samples = model_states.get("global_samples", engine.global_samples)
    engine.skipped_steps = model_states.get("skipped_steps", engine.skipped_steps)
