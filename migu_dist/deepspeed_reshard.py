"""Resume a DeepSpeed ZeRO-1/2/3 checkpoint on a different number of ranks.

DeepSpeed's own ``load_checkpoint`` needs the world size the checkpoint was written with
(ZeRO-3 refuses outright; ZeRO-1/2 only with ``elastic_checkpoint``, which ZeRO-3 lacks).
Here each new rank reads the ranges it now owns straight from the old partitions:

1. :func:`scan` indexes, without reading them, every old rank's
   ``*zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` (memory-mapped): its flat fp32 partition
   and the AdamW moments in the same layout (ZeRO-3: ``fp32_flat_groups`` and
   ``optimizer_state_dict.state[i]``, one flat tensor per sub-group; ZeRO-1/2 and the bf16
   optimizer: ``single_partition_of_fp32_groups`` and ``base_optimizer_state``). A
   parameter's pieces are contiguous flat ranges in rank order: ZeRO-3 puts ``ceil(numel /
   N)`` elements of every parameter on each rank, in the order of the sub-group's
   ``param_shapes``; ZeRO-1/2 records each piece's place (``param_slice_mappings``).
2. :func:`load_resharded` copies each parameter's new local range (ZeRO-3: ``[r * part,
   (r + 1) * part)``; ZeRO-1/2: the ``_hp_mapping`` fragment) of the fp32 weight and both
   moments into the engine's partitions (ZeRO-3 through DeepSpeed's public
   ``safe_set_local_fp32_param`` / ``safe_set_local_optimizer_state``), then the
   low-precision model weights from them. AdamW's step, the LR schedule and the engine's
   counters come from the old rank 0's files. Each rank reads about 1/M of the checkpoint
   and holds one parameter's range at a time beyond the engine's own memory.

Why this and not DeepSpeed's universal checkpoint (``ds_to_universal`` + ``load_universal``,
which does work here with our optimizer at ZeRO-3): the conversion is an extra pass over the
whole checkpoint that writes a second copy of it, one file per parameter and state (plus
per-rank temporary slices), before any rank can load, and its loader then reads every
parameter's whole file on every rank. Measured on a SmolLM2-135M ZeRO-3 checkpoint (1.6 GB,
``bench/bench_reshard.py``, BENCHMARKS.md): the conversion took 80 s and wrote 2.4 GB in 819
files, against 29 s for reading the whole checkpoint once per parameter here (and a resuming
rank reads only its share); its process-pool mode (``--num_extract_workers 2``) hung on this
machine. Reading the partitions directly needs no extra disk space and no extra step for the
user, and the same code serves ZeRO-1, 2 and 3 (tested with MIGU and the L2 anchor: the
restored weights and moments equal DeepSpeed's ``zero_to_fp32`` and ``ds_to_universal``
output bit for bit, ``tests/test_checkpoint.py``).

Frozen parameters (LoRA's base weights) have no optimizer state and never change: the new
run's model already holds them (from ``model.init_from``).
ZeRO-0 checkpoints are whole on every rank (``mp_rank_00_model_states.pt``) and load with
DeepSpeed's own loader at any world size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

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


@dataclass
class Saved:
    """Where a checkpoint keeps every trainable parameter, without reading it: per name, its
    shape and the old ranks' pieces ``(first flat element, {state: flat view})`` in rank
    order (views into memory-mapped files)."""

    shapes: dict[str, torch.Size]
    pieces: dict[str, list[tuple[int, dict[str, torch.Tensor]]]]
    step: int
    model_states: dict[str, Any]  # old rank 0's: LR schedule, engine counters

    def read(self, name: str, start: int, n: int) -> dict[str, torch.Tensor]:
        """Flat elements ``[start, start + n)`` of parameter ``name``'s fp32 weight and
        moments; reads only the pages that hold them."""
        out = {k: torch.empty(n, dtype=torch.float32) for k in STATES}
        for first, views in self.pieces[name]:
            lo, hi = max(start, first), min(start + n, first + views["fp32"].numel())
            if lo < hi:
                for k in STATES:
                    out[k][lo - start : hi - start] = views[k][lo - first : hi - first]
        return out


def scan(d: Path) -> Saved:
    """Index checkpoint directory ``d`` (ZeRO-1/2/3, any number of ranks)."""
    files = optim_files(d)
    if not files:
        raise FileNotFoundError(f"{d}: no ZeRO optimizer files (a ZeRO-0 checkpoint?)")
    optim = [_load(f)["optimizer_state_dict"] for f in files]
    stage3 = "fp32_flat_groups" in optim[0]
    model_file = (
        "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage3 else "mp_rank_00_model_states.pt"
    )
    model_states = _load(d / model_file)
    groups: list[dict[str, torch.Size]] = model_states["param_shapes"]
    shapes = {name: torch.Size(shape) for g in groups for name, shape in g.items()}
    pieces: dict[str, list[tuple[int, dict[str, torch.Tensor]]]] = {n: [] for n in shapes}
    steps: set[float] = set()
    world = len(files)
    for r, o in enumerate(optim):
        if stage3:
            # Sub-group i's flat tensors hold ceil(numel / N) elements of each of its
            # parameters in turn (the last rank's tail is padding).
            states = o["optimizer_state_dict"]["state"]
            steps.update(float(st["step"]) for st in states.values())
            for i, group in enumerate(groups):
                flats = {"fp32": o["fp32_flat_groups"][i]}
                flats.update({k: states[i][k] for k in STATES[1:]})
                offset = 0
                for name, shape in group.items():
                    numel = math.prod(shape)
                    part = -(-numel // world)
                    valid = max(0, min(part, numel - r * part))
                    views = {k: t.narrow(0, offset, valid) for k, t in flats.items()}
                    pieces[name].append((r * part, views))
                    offset += part
        else:
            # Each group's flat partition; param_slice_mappings places each parameter's
            # piece in it. A parameter's pieces follow each other over the ranks in order.
            states = _group_states(o)
            steps.update(float(st["step"]) for st in states if "step" in st)
            if "base_optimizer_state_step" in o:  # elastic_checkpoint: the step kept aside
                steps.add(float(o["base_optimizer_state_step"]))
            for g, mapping in enumerate(o["param_slice_mappings"]):
                flats = {"fp32": o["single_partition_of_fp32_groups"][g]}
                flats.update({k: states[g][k] for k in STATES[1:]})
                for name, frag in mapping.items():
                    done = sum(v["fp32"].numel() for _, v in pieces[name])
                    views = {k: t.narrow(0, frag.start, frag.numel) for k, t in flats.items()}
                    pieces[name].append((done, views))
    for name, shape in shapes.items():
        held = sum(v["fp32"].numel() for _, v in pieces[name])
        if held != math.prod(shape):
            raise RuntimeError(f"{d}: {name} has {held} of {math.prod(shape)} elements saved")
    if len(steps) != 1:
        raise RuntimeError(f"{d}: AdamW step counts differ between partitions ({sorted(steps)})")
    return Saved(shapes, pieces, int(steps.pop()), model_states)


def consolidate(d: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Per trainable parameter name, its whole ``fp32`` weight and ``exp_avg``/``exp_avg_sq``
    (each shaped like the parameter), in one process. For inspection and tests; a resume
    reads only each rank's own ranges (:func:`load_resharded`)."""
    saved = scan(d)
    return {
        name: {k: v.view(shape) for k, v in saved.read(name, 0, math.prod(shape)).items()}
        for name, shape in saved.shapes.items()
    }


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
        device = t.device if fused else torch.device("cpu")
        st["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)
    # ZeRO-1/2 and the bf16 optimizer link each parameter's view of the moments
    # (``_hp_mapping.optim_fragment``) lazily, at the first step: link now.
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def load_resharded(engine: Any, optimizer: torch.optim.Optimizer, scheduler: Any, d: Path) -> None:
    """Restore ``engine`` (ZeRO stage 1-3, any world size) from checkpoint directory ``d``
    written with the same stage by any number of ranks: weights, AdamW moments and step, the
    LR schedule and the engine's step counters. Each rank reads only the flat ranges it now
    owns. Collective (ZeRO-1/2 all-gather the updated weights at the end)."""
    saved = scan(d)
    _init_state(engine, optimizer, saved.step)
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if name not in saved.shapes:
            raise RuntimeError(f"{d}: no saved optimizer state for parameter {name}")
        if hasattr(p, "ds_id"):  # ZeRO-3: rank r owns [r * part, (r + 1) * part), padded
            part = p.partition_numel()
            start = p._z3_optimizer._get_param_partition_rank(p) * part
            n = max(0, min(part, p.ds_numel - start))
            local = saved.read(name, start, n)
            for k in STATES:
                padded = torch.zeros(p.ds_tensor.numel(), dtype=torch.float32)
                padded[:n] = local[k]
                padded = padded.to(engine.device)
                if k == "fp32":
                    safe_set_local_fp32_param(p, padded)
                else:
                    safe_set_local_optimizer_state(p, padded, k)
            with torch.no_grad():  # the (low-precision) weight partition the forward gathers
                p.ds_tensor.data.view(-1)[:n].copy_(local["fp32"])
        elif getattr(p, "_hp_mapping", None) is not None:  # ZeRO-1/2: this rank's fragment
            m = p._hp_mapping
            local = saved.read(name, m.lp_fragment_address.start, m.lp_fragment_address.numel)
            with torch.no_grad():
                m.get_hp_fragment().data.copy_(local["fp32"])
                for k in STATES[1:]:
                    m.get_hp_fragment(k).data.copy_(local[k])
    # ZeRO-1/2 (and the bf16 optimizer): every rank holds the whole low-precision weights;
    # each writes its fp32 partition into them and they are all-gathered.
    update_lp = getattr(engine.optimizer, "update_lp_params", None)
    if update_lp is not None:
        update_lp()
    scheduler.load_state_dict(saved.model_states["lr_scheduler"])
    engine.global_steps = saved.model_states.get("global_steps", engine.global_steps)
    engine.global_samples = saved.model_states.get("global_samples", engine.global_samples)
    engine.skipped_steps = saved.model_states.get("skipped_steps", engine.skipped_steps)
