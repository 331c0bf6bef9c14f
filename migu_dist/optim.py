"""AdamW that can leave chosen elements completely untouched in a step (MIGU ``mode: update``).

The backend registers, per optimizer tensor, which elements are frozen for the next step.
``step()`` copies those elements of the weight and both moments aside, runs the stock
AdamW step, and writes them back, so frozen elements are bit-identical before and after
(including decoupled weight decay). The transient copy is (1 - keep_ratio) of the frozen
tensors' weights and moments.

Tensors may be DTensors (FSDP2 parameters and their moments): offsets and masks then refer to
this rank's local shard, ``to_local()``, and the copies never leave the rank.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of a DTensor, else ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class FreezableAdamW(torch.optim.AdamW):
    """torch AdamW + per-step element freezing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.frozen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (tensor, mask)

    def freeze(self, tensor: torch.Tensor, offset: int, frozen: torch.Tensor) -> None:
        """Freeze ``frozen`` (bool (n,)) elements ``[offset, offset+n)`` of flat ``tensor``
        (of its local shard, for a DTensor)."""
        entry = self.frozen.get(id(tensor))
        if entry is None:
            t = local(tensor)
            mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
            self.frozen[id(tensor)] = (tensor, mask)
        else:
            mask = entry[1]
        mask[offset : offset + frozen.numel()] = frozen.to(mask.device)

    @torch.no_grad()
    def step(self, closure=None):
        # DeepSpeed ZeRO-3 steps one sub-group at a time: only handle the tensors in this call.
        current = {id(p) for g in self.param_groups for p in g["params"]}
        entries = [(k, v) for k, v in self.frozen.items() if k in current]
        saved = []
        for _, (tensor, mask) in entries:
            flat = local(tensor.data).view(-1)
            st = self.state.get(tensor, {})
            moments = {
                k: local(st[k]).view(-1)[mask].clone() for k in ("exp_avg", "exp_avg_sq") if k in st
            }
            saved.append((tensor, mask, flat[mask].clone(), moments))
        loss = super().step(closure)
        for tensor, mask, weight, moments in saved:
            local(tensor.data).view(-1)[mask] = weight
            st = self.state[tensor]
            for k in ("exp_avg", "exp_avg_sq"):
                # A fresh state (first step) starts at zero for frozen elements too.
                local(st[k]).view(-1)[mask] = moments.get(k, 0.0)
        for k, _ in entries:
            del self.frozen[k]
        return loss
