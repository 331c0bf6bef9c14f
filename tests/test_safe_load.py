"""Files this project writes are loaded without running code from them: a crafted pickle
in a per-rank state file or in a DCP checkpoint's non-tensor entries is refused, while
the real contents (RNG states with NumPy's ndarray, data-loader state, optimizer param
groups, scheduler state) load."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from migu_dist.fsdp2_backend import SafeLoadPlanner
from train.checkpoint import read_rank_state
from train.trainer import rng_state


class Payload:
    """Unpickling this touches a file: what arbitrary code execution would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_rank_state_loads_real_contents_and_refuses_code(tmp_path):
    state = {"rng": rng_state(), "data": {"step": 3, "streams": {"a": {"offset": 7}}}}
    torch.save(state, tmp_path / "rank_00000.pt")
    back = read_rank_state(tmp_path / "rank_00000.pt")
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert back["rng"]["python"] == state["rng"]["python"]
    assert (back["rng"]["numpy"][1] == state["rng"]["numpy"][1]).all()
    assert back["data"] == state["data"]

    marker = tmp_path / "pwned"
    torch.save(dict(state, data=Payload(marker)), tmp_path / "rank_00001.pt")
    with pytest.raises(pickle.UnpicklingError):
        read_rank_state(tmp_path / "rank_00001.pt")
    assert not marker.exists()


def test_dcp_non_tensor_entries_load_plain_data_and_refuse_code(tmp_path):
    """One process, no process group (DCP allows it): the entries FSDP2Backend writes."""
    groups = [{"lr": 1e-3, "betas": (0.9, 0.95), "params": ["w"], "fused": None}]
    good = {"w": torch.arange(4.0), "groups": groups, "client": "{}"}
    dcp.save(good, checkpoint_id=str(tmp_path / "good"), no_dist=True)
    blank = [{"lr": 0.0, "betas": None, "params": None, "fused": False}]  # the keys to fill
    back = {"w": torch.zeros(4), "groups": blank, "client": None}
    dcp.load(back, checkpoint_id=str(tmp_path / "good"), planner=SafeLoadPlanner(), no_dist=True)
    assert torch.equal(back["w"], good["w"]) and back["groups"] == groups and back["client"] == "{}"

    marker = tmp_path / "pwned"
    dcp.save(dict(good, client=Payload(marker)), checkpoint_id=str(tmp_path / "bad"), no_dist=True)
    back = {"w": torch.zeros(4), "groups": blank, "client": None}
    with pytest.raises(CheckpointException, match="Weights only load failed"):
        dcp.load(back, checkpoint_id=str(tmp_path / "bad"), planner=SafeLoadPlanner(), no_dist=True)
    assert not marker.exists()
    # What DCP does by default: the file runs its code.
    dcp.load(back, checkpoint_id=str(tmp_path / "bad"), no_dist=True)
    assert marker.exists()
