"""migu_dist/dist.py on one process (no process group) and on two ranks; the two-rank helper
``tests/conftest.py::run_distributed`` itself."""

from __future__ import annotations

import time

import pytest
import torch

from migu_dist import dist
from tests.conftest import run_distributed


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


def _collectives() -> dict:
    rank, size = dist.world()
    total = dist.all_reduce_sum(torch.tensor([float(rank + 1), 10.0 * rank]))
    mean = dist.all_reduce_mean(torch.tensor([float(rank + 1)]))
    gathered = dist.all_gather_objects({"rank": rank})
    dist.barrier()
    return {"world": (rank, size), "sum": total, "mean": mean, "gathered": gathered}


def test_collectives_on_two_ranks():
    """Against hand-computed values: ranks 0 and 1 contribute [1, 0] and [2, 10]."""
    got = run_distributed(_collectives, world_size=2)
    for rank, r in enumerate(got):
        assert r["world"] == (rank, 2)
        assert r["sum"].tolist() == [3.0, 10.0]
        assert r["mean"].tolist() == [1.5]
        assert r["gathered"] == [{"rank": 0}, {"rank": 1}]


def _fails_on_rank_one() -> None:
    if dist.world()[0] == 1:
        raise ValueError("boom on rank 1")
    time.sleep(600)  # rank 0 hangs (a collective would notice the peer's exit and raise)


def test_run_distributed_reports_every_rank():
    """A rank that raises is reported with its traceback, a rank that hangs as killed; the test
    fails after the grace period, not at the timeout."""
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as e:
        run_distributed(_fails_on_rank_one, world_size=2, timeout=120, grace=3)
    msg = str(e.value)
    assert "2 of 2 ranks failed" in msg
    assert "rank 1: Traceback" in msg and "ValueError: boom on rank 1" in msg
    assert "rank 0: no result after 3 s (killed)" in msg
    assert time.monotonic() - start < 60
