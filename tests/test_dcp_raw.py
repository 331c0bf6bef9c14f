"""``migu_dist.dcp_raw``: DCP checkpoints whose tensors are raw bytes read back exactly, earlier
(``torch.save`` per tensor) checkpoints still load, and the stock reader refuses the new ones.

One process (``no_dist``); what changes with the number of ranks (chunks read whole and
narrowed) is covered on 2 ranks by ``test_checkpoint.py::test_resume_on_another_number_of_ranks``
and ``test_fsdp2.py``."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from migu_dist.dcp_raw import RawReader, RawWriter


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # "no process group": a one-process save is the intent
        warnings.simplefilter("ignore", UserWarning)
        yield


def sample() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(7, 5, generator=g),
        "half": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "ids": torch.arange(11, dtype=torch.int64) * 3,
        "step": torch.tensor(42.0),  # 0-d, like AdamW's step
        "empty": torch.empty(0, 4),
        "groups": [{"lr": 0.5, "betas": (0.9, 0.95)}],  # a non-tensor entry
        "client": '{"a": 1}',
    }


def blank(state: dict) -> dict:
    """The same structure, every value different (DCP loads into an existing structure)."""
    out = {k: torch.zeros_like(v) for k, v in state.items() if isinstance(v, torch.Tensor)}
    return dict(out, groups=[{"lr": 0.0, "betas": (0.0, 0.0)}], client="")


def test_raw_round_trip_is_exact_for_every_dtype_and_shape(tmp_path):
    state = sample()
    dcp.save(state, storage_writer=RawWriter(tmp_path), no_dist=True)
    back = blank(state)
    dcp.load(back, storage_reader=RawReader(tmp_path), no_dist=True)
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
        else:
            assert back[k] == v, k


def test_a_tensor_takes_its_bytes_and_nothing_more(tmp_path):
    state = {k: v for k, v in sample().items() if torch.is_tensor(v)}
    dcp.save(state, storage_writer=RawWriter(tmp_path), no_dist=True)
    size = (tmp_path / "__0_0.distcp").stat().st_size
    assert size == sum(v.numel() * v.element_size() for v in state.values())


def test_a_target_of_another_dtype_is_converted_like_dcp_does(tmp_path):
    state = {"w": torch.randn(4, 3)}
    dcp.save(state, storage_writer=RawWriter(tmp_path), no_dist=True)
    back = {"w": torch.zeros(4, 3, dtype=torch.bfloat16)}
    dcp.load(back, storage_reader=RawReader(tmp_path), no_dist=True)
    assert torch.equal(back["w"], state["w"].to(torch.bfloat16))


def test_checkpoints_written_by_the_stock_writer_still_load(tmp_path):
    state = sample()
    dcp.save(state, checkpoint_id=str(tmp_path), no_dist=True)  # torch.save per tensor
    back = blank(state)
    dcp.load(back, storage_reader=RawReader(tmp_path), no_dist=True)
    assert all(
        torch.equal(back[k], v) if torch.is_tensor(v) else back[k] == v for k, v in state.items()
    )


def test_the_stock_reader_refuses_raw_items_rather_than_misread_them(tmp_path):
    dcp.save({"w": torch.ones(3)}, storage_writer=RawWriter(tmp_path), no_dist=True)
    with pytest.raises(CheckpointException, match="migu-raw-v1"):
        dcp.load({"w": torch.zeros(3)}, checkpoint_id=str(tmp_path), no_dist=True)


def test_a_truncated_file_is_an_error_naming_the_entry(tmp_path):
    dcp.save({"a": torch.ones(8), "b": torch.ones(1000)}, storage_writer=RawWriter(tmp_path),
             no_dist=True)  # fmt: skip
    f = tmp_path / "__0_0.distcp"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointException, match="ends inside b"):
        dcp.load({"a": torch.zeros(8), "b": torch.zeros(1000)},
                 storage_reader=RawReader(tmp_path), no_dist=True)  # fmt: skip
