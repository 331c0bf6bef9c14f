"""The experiment runner (scripts/run_experiments.py) end to end, and its aggregation math.

One ``--quick`` experiment on a tiny random Llama (not SmolLM2: the machinery is what is under
test): 2 variants x 2 seeds, 2 ranks each, interrupted by SIGTERM once the first run has
finished and the second has a checkpoint, then rerun with the same command. The finished run
is reused (not relaunched), the interrupted one resumes from its checkpoint, every result file
is committed on its own, and the aggregate equals a hand computation from the raw evaluations.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train import experiment

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "scripts" / "run_experiments.py"


# ------------------------------------------------------------------ aggregation, by hand


def test_mean_std_and_spread_by_hand():
    m, sd = experiment.mean_std([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3)
    # sum of squares: (4/3)^2 + (1/3)^2 + (5/3)^2 = 42/9; / (n - 1) = 7/3
    assert sd == pytest.approx(math.sqrt(7 / 3))
    assert experiment.mean_std([5.0]) == (5.0, None)
    agg = experiment.aggregate([{"a": 1.0, "b": 3.0}, {"a": 3.0}])
    assert agg["a"] == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert agg["b"] == {"mean": 3.0, "std": None, "n": 1}
    ref = {"mean": 0.0, "std": 1.0, "n": 3}
    # 2 * sqrt(1/3 + 1/3) = 1.633: a difference of 1.7 is beyond it, 1.6 is not
    assert experiment.beyond_spread({"mean": 1.7, "std": 1.0, "n": 3}, ref) is True
    assert experiment.beyond_spread({"mean": 1.6, "std": 1.0, "n": 3}, ref) is False
    # one seed borrows the reference's spread: 2 * sqrt(1 + 1/3) = 2.309
    assert experiment.beyond_spread({"mean": 2.4, "std": None, "n": 1}, ref) is True
    assert experiment.beyond_spread({"mean": 2.2, "std": None, "n": 1}, ref) is False
    assert experiment.beyond_spread({"mean": 9, "std": None, "n": 1}, {**ref, "std": None}) is None


def test_run_summary_by_hand():
    initial = {"ppl": {"lit": 10.0, "sp": 40.0, "new": 100.0}, "acc": {"t": 0.5}}
    end = {"phase": "p", "phase_index": 0, "phase_end": True,
           "ppl": {"lit": 20.0, "sp": 40.0, "new": 25.0}, "acc": {"t": 0.4}}  # fmt: skip
    s = experiment.run_summary(initial, [end], {"p": ["new"]}, ["lit", "sp"], {"p": 3.0})
    assert s["forgetting"] == pytest.approx(math.log(2) / 2)  # lit doubled, sp unchanged
    assert s["general_ppl/initial"] == pytest.approx(20.0)  # sqrt(10 * 40)
    assert s["general_ppl/p"] == pytest.approx(math.sqrt(800))
    assert s["learned_ppl"] == pytest.approx(25.0)
    assert s["acc_change"] == pytest.approx(-0.1)
    assert s["dw_total"] == 3.0
    with pytest.raises(ValueError, match="unfinished"):
        experiment.run_summary(initial, [], {"p": ["new"]}, ["lit"])


def test_weight_change_merges_lora():
    w0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    start = {"l.weight": w0, "n.weight": torch.ones(2)}
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0], [0.0]])  # (r=1, in), (out, r)
    end = {"l.base_layer.weight": w0, "l.lora_A.default.weight": a,
           "l.lora_B.default.weight": b, "n.weight": torch.ones(2) * 2}  # fmt: skip
    # merged: w0 + 0.5 * b @ a changes one element by 1; the norm weight moves by 1, twice
    assert experiment.weight_change(start, end, lora_scale=0.5) == pytest.approx(math.sqrt(3))


def test_every_variant_is_a_valid_config_with_equal_tokens(monkeypatch):
    """base.yaml + each variant's overrides validates (2 ranks); every variant trains the same
    steps of the same batch, with weight decay 0; quick mode too."""
    from train.config import load_config

    monkeypatch.chdir(ROOT)
    rx = _runner()
    seen = set()
    for name, v in rx.VARIANTS.items():
        for extra in ([], rx.QUICK):
            cfg = load_config(rx.BASE, [*v.overrides, *extra], world_size=2)
            steps = [p.steps for p in cfg.data.phases]
            seen.add((tuple(steps), cfg.global_batch(2), cfg.train.seq_len, bool(extra)))
            assert cfg.optim.weight_decay == 0.0, name
            assert [p.name for p in cfg.data.phases] == list(rx.PHASES)
    assert {s[-1] for s in seen} == {False, True} and len(seen) == 2  # one shape per mode


def test_matched_lr_from_measured_weight_change(tmp_path):
    """plain_lrmatch's LR = 5e-4 x mean dw of migu_grad / mean dw of plain (seeds finished)."""
    rx = _runner()
    with pytest.raises(SystemExit, match="needs a finished migu_grad run"):
        rx.matched_lr(tmp_path)
    for name, dw in [("plain-s1", 4.0), ("plain-s2", 6.0), ("migu_grad-s1", 2.0)]:
        (tmp_path / f"{name}.json").write_text(json.dumps({"summary": {"dw_total": dw}}))
    (tmp_path / "plain_lr1e-4-s1.json").write_text(json.dumps({"summary": {"dw_total": 1.0}}))
    assert rx.matched_lr(tmp_path) == pytest.approx(5e-4 * 2.0 / 5.0)


# ------------------------------------------------------------------ the runner end to end


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                          check=True).stdout  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~2 min on 2 idle cores; 10 min seen on a machine loaded 10x
def test_quick_pipeline_interrupt_resume_aggregate(tiny_model, tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    out.mkdir()
    _git(out, "init", "-q")
    _git(out, "config", "user.email", "t@t")
    _git(out, "config", "user.name", "t")
    cmd = [sys.executable, str(RUNNER), "--quick", "--commit", "--model", str(tiny_model),
           "--tokenizer", str(ROOT / "data/tokenizer/tokenizer.model"),
           "--runs", str(runs), "--out", str(out)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.time()
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        second_ckpt = runs / "migu_grad-s1" / "checkpoints" / "latest"
        while not ((out / "plain-s1.json").is_file() and second_ckpt.is_file()):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() - t0 < 400, "no checkpoint of the second run in time"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    first = (tmp_path / "first.log").read_text()
    assert rc != 0 and "rerun the same command" in first, first[-3000:]
    assert not (out / "migu_grad-s1.json").exists()
    assert "Stop signal: checkpoint at step" in (runs / "migu_grad-s1" / "train.log").read_text()
    plain_s1 = (out / "plain-s1.json").read_bytes()

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"[plain-s1] reused {out / 'plain-s1.json'}" in again.stdout
    assert "[migu_grad-s1] resuming" in again.stdout
    assert (out / "plain-s1.json").read_bytes() == plain_s1
    assert (runs / "plain-s1" / "train.log").read_text().count("\n$ ") == 1  # never relaunched
    log2 = (runs / "migu_grad-s1" / "train.log").read_text()
    assert "Resumed from" in log2 and log2.count("\n$ ") == 2

    # every result file committed on its own (the first one with the shared initial eval)
    rx = _runner()
    names = [r.name for r in rx.plan(rx.QUICK_VARIANTS, rx.QUICK_SEEDS)]
    assert names == ["plain-s1", "migu_grad-s1", "plain-s2", "migu_grad-s2"]
    commits = _git(out, "log", "--reverse", "--name-only", "--format=@%s").split("@")[1:]
    files = [sorted(c.split("\n\n", 1)[1].split()) for c in commits]  # subject, blank, files
    assert files == [["initial.json", "plain-s1.json"], *[[f"{n}.json"] for n in names[1:]]]

    # the starting model is evaluated once, by the first run (eval.at_start=false after it)
    def initial_rows(name: str) -> list[dict]:
        lines = (runs / name / "evals.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["phase_index"] == -1]

    assert len(initial_rows("plain-s1")) == 1 and not any(map(initial_rows, names[1:]))

    # aggregation equals a hand computation from the raw evaluations of the result files
    initial = json.loads((out / "initial.json").read_text())["row"]
    assert initial["phase_index"] == -1 and initial["n"] == {"arc_easy": 8, "piqa": 8}
    agg = json.loads((out / "results.json").read_text())["aggregate"]
    for variant in ("plain", "migu_grad"):
        vals = []
        for seed in (1, 2):
            res = json.loads((out / f"{variant}-s{seed}.json").read_text())
            final = next(r for r in res["evals"] if r["phase"] == "science")
            after_legal = next(r for r in res["evals"] if r["phase"] == "legal")
            # eval.tasks_at=start_and_end: tasks at the end only, perplexity at both ends
            assert after_legal["acc"] == {} and set(final["acc"]) == {"arc_easy", "piqa"}
            assert set(after_legal["ppl"]) == set(final["ppl"]) == set(initial["ppl"])
            vals.append(sum(math.log(final["ppl"][d] / initial["ppl"][d])
                            for d in ("literature", "speeches")) / 2)  # fmt: skip
            assert set(res["weight_change"]) == {"legal", "science"}
            assert all(v > 0 for v in res["weight_change"].values())
        mean = (vals[0] + vals[1]) / 2
        std = abs(vals[0] - vals[1]) / math.sqrt(2)  # sample std of two values
        assert agg[variant]["forgetting"]["mean"] == pytest.approx(mean, rel=1e-12)
        assert agg[variant]["forgetting"]["std"] == pytest.approx(std, rel=1e-9)
        assert agg[variant]["forgetting"]["n"] == 2
    assert vals[0] != vals[1]  # the seeds differ (data order, masks)
    # runs of another setup are never mixed into this experiment
    other = subprocess.run([*cmd, "--precision", "fp32"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert other.returncode != 0 and "use the same options to continue it" in other.stderr

    md = (out / "results.md").read_text()
    assert "| plain | 2 |" in md and "| migu_grad | 2 |" in md and "spread" in md
    assert (out / "forgetting.png").stat().st_size > 0 and (out / "sweep.png").stat().st_size > 0
    assert not (runs / "plain-s1" / "checkpoints").exists()  # cleaned up once recorded


def _runner():
    """scripts/run_experiments.py as a module (its tables of variants and phases); loaded from
    its file (scripts/ is no package), registered so that its dataclasses resolve."""
    if "run_experiments" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "run_experiments", ROOT / "scripts" / "run_experiments.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["run_experiments"] = module
        spec.loader.exec_module(module)
    return sys.modules["run_experiments"]
