"""The spine end to end: launch/cpt.py under torchrun, the deepspeed launcher and plain python."""

from __future__ import annotations

import json

import pytest

from tests.launch_util import metrics, run_cpt

SHORT = ["train.max_steps=4", "data.phases.0.steps=4"]


def test_two_rank_zero3_equals_one_rank_same_global_batch(tmp_path):
    """2 ranks x micro 4 x accum 1 == 1 rank x micro 4 x accum 2, MIGU on, ZeRO-3."""
    run_cpt(tmp_path / "r2", *SHORT, "train.grad_accum=1", nproc=2)
    run_cpt(tmp_path / "r1", *SHORT, "train.grad_accum=2", nproc=1, launcher="python")
    two, one = metrics(tmp_path / "r2"), metrics(tmp_path / "r1")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(two, one):
        assert a["tokens_by_domain"] == b["tokens_by_domain"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["migu/kept_frac"] == b["migu/kept_frac"]
        if "migu/jaccard_prev_step" in b:
            assert a["migu/jaccard_prev_step"] == pytest.approx(b["migu/jaccard_prev_step"])


@pytest.mark.slow
def test_demo_config_trains_through_three_domains_and_loss_falls(tmp_path):
    """The README's demo (make demo) as it ships, under the deepspeed launcher."""
    out = tmp_path / "demo"
    run_cpt(out, "logging.wandb=true", launcher="deepspeed", quiet=False, timeout=900)
    rows = metrics(out)
    assert rows[-1]["step"] == 90
    phases = [r["phase"] for r in rows]
    assert phases.index("legal") < phases.index("science")
    assert set(phases) == {"general", "legal", "science"}
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 1.0, (first, last)
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "tokens_by_domain"):
        assert key in rows[-1]
    assert (out / "config.yaml").is_file()
    evals = [json.loads(x) for x in (out / "evals.jsonl").read_text().splitlines()]
    assert [e["phase"] for e in evals] == ["initial", "general", "legal", "science"]
    report = json.loads((out / "cl_report.json").read_text())
    assert report
    assert list((out / "plots").glob("*.png"))
    assert (out / "checkpoints" / "latest").is_file()
    assert list((out / "wandb").glob("offline-run-*"))
