"""launch/evaluate.py on a saved checkpoint (DeepSpeed ZeRO-3 or FSDP2) reproduces the in-job
evaluation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.launch_util import ENGINES, ROOT, run_cpt


@pytest.mark.parametrize("backend", list(ENGINES))
def test_offline_evaluation_matches_in_job_evaluation(tmp_path, backend):
    out = tmp_path / "run"
    run_cpt(
        out,
        *ENGINES[backend],
        "train.max_steps=3",
        "data.phases.0.steps=3",
        "eval.at_phase_end=true",
        "eval.heldout_tokens=512",
        "eval.tasks=[{name: arc_easy, path: data/tasks/arc_easy.jsonl, limit: 12}]",
    )
    in_job = [json.loads(x) for x in (out / "evals.jsonl").read_text().splitlines()]
    final = in_job[-1]
    assert final["step"] == 3 and final["phase_end"]
    proc = subprocess.run(
        [sys.executable, "launch/evaluate.py", "--checkpoint", str(out / "checkpoints")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    offline = json.loads(proc.stdout.strip().splitlines()[-1])
    assert offline["step"] == 3 and offline["phase"] == final["phase"]
    assert offline["n"] == final["n"] and offline["tokens"] == final["tokens"]
    for domain, ppl in final["ppl"].items():
        assert offline["ppl"][domain] == pytest.approx(ppl, rel=1e-4), domain
    assert offline["acc"] == final["acc"]
    assert (out / "offline_eval" / "evals.jsonl").is_file()
