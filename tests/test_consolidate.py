"""``migu_dist.consolidate``: the backend that wrote a checkpoint reads it back whole, in one
process. ZeRO-3 and FSDP2 are covered by the export tests (tests/test_checkpoint.py,
tests/test_fsdp2.py); here the DeepSpeed layout without partitions, ZeRO-0 (the whole module
in one file), told apart from ZeRO 1-3 by its files (ZeRO-1 passes too: add it to the
parameters to check, 50 s)."""

from __future__ import annotations

import pytest
import torch

from migu_dist import consolidate
from tests.launch_util import run_cpt
from train.checkpoint import tag_for


@pytest.mark.parametrize("zero_stage", [0])
def test_consolidate_returns_the_trained_weights(tmp_path, zero_stage):
    """Against the weights the sharded model held at the end of training
    (``backend.full_state_dict()``, saved by tests/workers/ckpt_train.py)."""
    out = tmp_path / "run"
    run_cpt(
        out, "train.max_steps=2", "data.phases.0.steps=2", "engine.backend=deepspeed",
        f"engine.zero_stage={zero_stage}", nproc=1,
        script="tests/workers/ckpt_train.py",
    )  # fmt: skip
    want = torch.load(out / "logits.pt", weights_only=False)["state_dict"]
    ckpt = out / "checkpoints" / tag_for(2)
    assert any(ckpt.glob("*zero_pp_rank_*")) == (zero_stage > 0)
    got = consolidate(ckpt)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == torch.float32
        assert torch.equal(got[k], v.float()), k
