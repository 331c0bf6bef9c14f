"""migu_dist/dist.py: the collectives act on this process alone without a process group."""

from __future__ import annotations

import torch

from migu_dist import dist


def test_world_of_one_without_process_group(capsys, monkeypatch):
    assert not torch.distributed.is_initialized()
    assert dist.world() == (0, 1)
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert dist.all_reduce_mean(t) is t and t.tolist() == [1.0, 2.0]
    assert dist.all_gather_objects({"a": 1}) == [{"a": 1}]
    dist.barrier()
    dist.print0("shown")
    dist.print0("hidden", rank=1)
    monkeypatch.setenv("RANK", "1")
    dist.print0("hidden too")
    assert capsys.readouterr().out == "shown\n"
