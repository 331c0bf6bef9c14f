"""Continual-learning metrics on hand-made matrices with hand-computed values."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from train import cl_metrics

REPO = Path(__file__).resolve().parents[1]

# After phase i (rows), score on item j (columns); item j is learned in phase j.
ACC = [
    [0.8, 0.3, 0.2],
    [0.6, 0.9, 0.4],
    [0.5, 0.7, 0.95],
]
ACC_BASE = [0.1, 0.2, 0.3]

# Perplexities, same layout; a fourth domain "d" is never trained on.
PPL = [
    [10.0, 50.0, 40.0, 100.0],
    [20.0, 12.0, 30.0, 90.0],
    [25.0, 15.0, 8.0, 80.0],
]
PPL_BASE = [60.0, 60.0, 60.0, 120.0]
DOMAINS = ["a", "b", "c", "d"]
ITEM_PHASE = {"a": 0, "b": 1, "c": 2}


def test_gem_definitions_on_accuracy_matrix():
    phases = [0, 1, 2]
    assert cl_metrics.average(ACC) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    # BWT = mean(R[2][0] - R[0][0], R[2][1] - R[1][1]) = mean(-0.3, -0.2)
    assert cl_metrics.backward_transfer(ACC, phases) == pytest.approx(-0.25)
    # FWT = mean(R[0][1] - b1, R[1][2] - b2) = mean(0.1, 0.1)
    assert cl_metrics.forward_transfer(ACC, phases, ACC_BASE) == pytest.approx(0.1)
    assert cl_metrics.forward_transfer(ACC, phases, None) is None


def test_partial_run_uses_last_completed_phase():
    partial = [ACC[0], ACC[1], [None, None, None]]
    assert cl_metrics.final_row_index(partial) == 1
    # only item 0 was learned before the final row: 0.6 - 0.8
    assert cl_metrics.backward_transfer(partial, [0, 1, 2]) == pytest.approx(-0.2)
    # item 2 (phase 2) is not reached yet: only R[0][1] - b1
    assert cl_metrics.forward_transfer(partial, [0, 1, 2], ACC_BASE) == pytest.approx(0.1)
    assert cl_metrics.average(partial) == pytest.approx((0.6 + 0.9 + 0.4) / 3)
    assert cl_metrics.backward_transfer([[None] * 3], [0, 1, 2]) is None


def test_perplexity_signs_positive_means_improvement():
    rep = cl_metrics.perplexity_report(PPL, DOMAINS, ITEM_PHASE, PPL_BASE)
    assert rep["average"] == pytest.approx((25 + 15 + 8 + 80) / 4)
    assert rep["average_nll"] == pytest.approx(
        (3.2188758248682006 + 2.70805020110221 + 2.0794415416798357 + 4.382026634673881) / 4
    )
    # a: 10 -> 25 and b: 12 -> 15 after learning: forgetting, so negative.
    # mean(ln(10/25), ln(12/15)) = mean(-0.9162907, -0.2231436)
    assert rep["bwt"] == pytest.approx(-0.5697171415941824)
    assert rep["bwt_ppl"] == pytest.approx(-9.0)  # mean(10 - 25, 12 - 15)
    # b: 60 -> 50 and c: 60 -> 30 before being trained on: positive transfer.
    # mean(ln(60/50), ln(60/30)) = mean(0.1823216, 0.6931472)
    assert rep["fwt"] == pytest.approx(0.43773436867695)
    assert rep["fwt_ppl"] == pytest.approx(20.0)
    assert rep["bwt_per_domain"] == pytest.approx({"a": math.log(0.4), "b": math.log(0.8)})
    assert rep["final"] == {"a": 25.0, "b": 15.0, "c": 8.0, "d": 80.0}
    assert rep["matrix"] == PPL and rep["initial"] == PPL_BASE
    json.dumps(rep, allow_nan=False)
    # improvement on earlier domains gives positive BWT
    better = [PPL[0], PPL[1], [5.0, 6.0, 8.0, 80.0]]
    assert cl_metrics.perplexity_report(better, DOMAINS, ITEM_PHASE)["bwt"] > 0


def test_task_report_changes():
    acc = [[0.25, 0.5], [0.3, 0.4], [0.3, 0.45]]
    rep = cl_metrics.task_report(acc, ["x", "y"], baseline=[0.2, 0.5])
    assert rep["average"] == pytest.approx(0.375)
    assert rep["change"] == pytest.approx({"x": 0.05, "y": -0.05})
    assert rep["average_change"] == pytest.approx(0.0)
    assert rep["change_from_initial"] == pytest.approx({"x": 0.1, "y": -0.05})
    assert rep["average_change_from_initial"] == pytest.approx(0.025)
    assert "change_from_initial" not in cl_metrics.task_report(acc, ["x", "y"])


def _report(ppl, acc):
    return {
        "phases": ["p0", "p1", "p2"],
        "domains": DOMAINS,
        "tasks": ["x", "y"],
        "ppl": cl_metrics.perplexity_report(ppl, DOMAINS, ITEM_PHASE, PPL_BASE),
        "acc": cl_metrics.task_report(acc, ["x", "y"]),
        "acc_norm": cl_metrics.task_report(acc, ["x", "y"]),
    }


def test_compare_script(tmp_path):
    runs = []
    for name, last in (("base", [25.0, 15.0, 8.0, 80.0]), ("migu", [12.0, 13.0, 8.5, 80.0])):
        run = tmp_path / name
        run.mkdir()
        rep = _report([PPL[0], PPL[1], last], [[0.25, 0.5], [0.3, 0.45]])
        (run / "cl_report.json").write_text(json.dumps(rep))
        runs.append(str(run))
    rows = dict(cl_metrics.compare_rows({"a": _report(PPL, [[0.3, 0.4]])}))
    assert rows["ppl BWT (nats, +better)"] == [pytest.approx(-0.5697171415941824)]
    assert rows["acc x"] == [0.3]
    out = tmp_path / "cmp.png"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "compare.py"), *runs, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "base" in proc.stdout and "migu" in proc.stdout and "ppl BWT" in proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
