"""Sharded checkpoints, exact resume, fault tolerance and Hugging Face export, per backend.

Real 2-rank runs on gloo (``torchrun --standalone``), no mocks, once with DeepSpeed ZeRO-3 and
once with FSDP2 (the ``backend`` fixture). Per backend, one uninterrupted reference run
(``reference``) is shared: every interrupted run must reproduce its metrics rows bit for bit
after the step it resumed from, and its final checkpoint is the one exported and compared
against the distributed model's logits. What differs between the backends' checkpoint files
(which file is a rank's shard, how to read the model and the AdamW moments back in one
process) is in the helpers below; the tests themselves are shared.

Signals: ``torchrun`` forwards a SIGTERM it receives to the workers (they checkpoint and exit
0) but then exits 1 itself (``SignalException``); a SIGTERM sent to the workers makes them
checkpoint and exit 0, and ``torchrun`` then exits 0. The test sends it to the workers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest
import torch

from migu_dist.fsdp2_backend import consolidate
from tests.launch_util import ENGINES, fill, launch_env, mount_tmpfs
from train.checkpoint import MANIFEST, WRITE_DELAY_ENV, Checkpointer, read_rank_state, tag_for

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/tiny-cpu.yaml"
# 12 steps over three phases of 4; a checkpoint every 3 steps and at each phase end (pinned).
BASE = [
    "train.max_steps=12",
    "data.phases.0.steps=4",
    "data.phases.1.steps=4",
    "logging.wandb=false",
    "logging.progress_bar=false",
    "eval.at_phase_end=false",
    "eval.tasks=[]",
    "checkpoint.every_steps=3",
    "engine.dist_timeout_minutes=2",  # a collective mismatch fails the test, not hangs it
]
TIMEOUT = 240


@pytest.fixture(scope="module", params=list(ENGINES))
def backend(request) -> str:
    """The backend every test of this module runs with (module scope: one reference each)."""
    return request.param


def start(
    out: Path, backend: str, extra: list[str] = (), script: str = "launch/cpt.py", nproc: int = 2
):
    """Launch a run in its own process group; output goes to ``out``.log."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", script, "--config", CONFIG, f"output_dir={out}"]
    log = open(f"{out}.log", "ab")  # noqa: SIM115 - closed by finish()
    env = launch_env(PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        cmd + BASE + ENGINES[backend] + list(extra),
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def finish(proc, out: Path, timeout: float = TIMEOUT) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc, signal.SIGKILL)
        rc = proc.wait()
        pytest.fail(f"run {out} timed out:\n{Path(f'{out}.log').read_text()[-3000:]}")
    proc.log.close()
    return rc, Path(f"{out}.log").read_text()


def run(out: Path, backend: str, extra: list[str] = (), **kw) -> tuple[int, str]:
    return finish(start(out, backend, extra, **kw), out)


def rows(out: Path) -> dict[int, dict]:
    """Metrics rows by step; after a resume the re-run steps replace the first attempt's."""
    by_step = {}
    path = out / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        row.pop("tokens_per_s")  # wall clock
        by_step[row["step"]] = row
    return by_step


def wait_for_step(proc, out: Path, step: int, timeout: float = TIMEOUT) -> None:
    t0 = time.monotonic()
    while max(rows(out), default=0) < step:
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            pytest.fail(f"run {out} ended or stalled before step {step}")
        time.sleep(0.05)


def workers(proc) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # a child already gone (a zombie)
            if "cpt.py" in " ".join(p.cmdline()):
                found.append(p)
    return found


def kill_all(proc, sig: int) -> None:
    """torchrun starts each worker in its own session: killing torchrun's process group
    would leave the workers running. Signal them all, workers first."""
    ranks = workers(proc)
    for p in ranks:
        p.send_signal(sig)
    psutil.wait_procs(ranks, timeout=30)
    proc.send_signal(sig)


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def resumed_step(log: str) -> int:
    line = next(ln for ln in log.splitlines() if ln.startswith("Resumed from"))
    return int(line.rsplit(" ", 1)[1])


def assert_same_trajectory(out: Path, ref: dict[int, dict], after: int) -> None:
    got = rows(out)
    assert sorted(got) == sorted(ref), "steps differ"
    for step in range(after + 1, max(ref) + 1):
        assert got[step] == ref[step], f"step {step} differs after resuming at {after}"


def flip_bytes(path: Path, at_end: bool = False) -> None:
    """Corrupt a shard without changing its size (only the checksum can tell): 16 bytes in
    its middle, or its last 16 (a zip's end of central directory: torch.load fails)."""
    with path.open("r+b") as f:
        f.seek(path.stat().st_size - 16 if at_end else path.stat().st_size // 2)
        b = f.read(16)
        f.seek(-16, 1)
        f.write(bytes(x ^ 0xFF for x in b))


# ------------------------------------------------------------------------------ per backend


def shard(d: Path, backend: str, rank: int) -> Path:
    """Rank ``rank``'s shard file in checkpoint directory ``d`` (its weights and moments)."""
    if backend == "fsdp2":  # torch.distributed.checkpoint: one file per rank
        return d / f"__{rank}_0.distcp"
    return d / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def model_state(root: Path, tag: str, backend: str) -> dict[str, torch.Tensor]:
    """The whole fp32 model of checkpoint ``root/tag``, read back in this one process."""
    if backend == "fsdp2":
        return consolidate(root / tag)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)


def adam_moments(d: Path, backend: str) -> dict[str, torch.Tensor]:
    """Every AdamW ``exp_avg``/``exp_avg_sq`` tensor of checkpoint ``d``, by a readable name.

    DeepSpeed: each rank's flat fp32 partition moments in its ``*_optim_states.pt``; FSDP2:
    the DCP entries ``optim.state.<fqn>.<moment>`` reassembled whole (no process group)."""
    moments = ("exp_avg", "exp_avg_sq")
    if backend == "fsdp2":
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        from migu_dist.dcp_raw import RawReader

        keys = RawReader(str(d)).read_metadata().state_dict_metadata
        wanted = {
            k for k in keys if k.startswith("optim.state.") and k.rsplit(".", 1)[1] in moments
        }
        with warnings.catch_warnings():  # "no process group": a one-process load is the intent
            warnings.simplefilter("ignore", UserWarning)
            state = _load_state_dict_from_keys(wanted, storage_reader=RawReader(str(d)))
        state = state["optim"]["state"]
        return {f"{fqn}.{m}": s[m] for fqn, s in state.items() for m in moments}
    out = {}
    for rank in (0, 1):
        saved = torch.load(shard(d, backend, rank), weights_only=False)
        state = saved["optimizer_state_dict"]["optimizer_state_dict"]["state"]
        out.update({f"rank{rank}.{i}.{m}": s[m] for i, s in state.items() for m in moments})
    return out


@pytest.fixture(scope="module")
def reference(backend, reference_runs, tmp_path_factory) -> Path:
    """Uninterrupted run through ``build_trainer`` + logits of the final sharded model, with
    a Hugging Face export at every phase end. One per backend and session (tests/
    test_resume.py compares against the same run); read it, never write into it."""
    if backend not in reference_runs:
        out = tmp_path_factory.mktemp(f"ckpt-{backend}") / "ref"
        rc, log = run(
            out,
            backend,
            ["checkpoint.export_hf_at_phase_end=true"],
            script="tests/workers/ckpt_train.py",
        )
        assert rc == 0, log[-3000:]
        reference_runs[backend] = out
    return reference_runs[backend]


# ------------------------------------------------------------------------------ resume


@pytest.mark.slow
def test_sigterm_sigkill_corruption_resume_bit_identical(backend, reference, tmp_path):
    """One run, interrupted twice, always restarted with the same command:

    1. SIGTERM to the workers at step >= 5: checkpoint at the next step boundary, exit 0
       (torchrun too). The restart resumes there, in the middle of a phase.
    2. SIGKILL of everything at step >= 10 (latest: step 9). The newest checkpoint is then
       corrupted (same size, flipped bytes) and a half-written one (no manifest) lies next to
       it. The restart warns, falls back to the previous complete checkpoint (step 8, the
       phase-2 boundary) and finishes. The bytes flipped are rank 1's shard's last: for
       DeepSpeed its zip's directory, so that rank's read ahead (``Backend.prefetch``, while
       it checksums) fails while rank 0's succeeds, and must be agreed on, not raised alone.
    Every metrics row (loss, lr, grad norm, phase, tokens by domain/phase, MIGU statistics)
    equals the uninterrupted reference run's, bit for bit."""
    ref = rows(reference)
    out = tmp_path / "interrupted"
    ck = out / "checkpoints"
    proc = start(out, backend)
    wait_for_step(proc, out, 5)
    ranks = workers(proc)
    assert len(ranks) == 2
    for w in ranks:
        w.send_signal(signal.SIGTERM)
    rc, log = finish(proc, out)
    assert rc == 0, log[-3000:]
    stopped = max(rows(out))
    assert f"Stop signal: checkpoint at step {stopped}, then exit." in log
    assert "exit=signal" in log
    assert latest(out) == tag_for(stopped) and stopped < 9
    assert Checkpointer.verify(ck / tag_for(stopped)) is None

    proc = start(out, backend)
    wait_for_step(proc, out, 10)
    kill_all(proc, signal.SIGKILL)
    rc, log = finish(proc, out)
    assert f"Resumed from {ck / tag_for(stopped)} at step {stopped}" in log
    newest = latest(out)
    assert newest == tag_for(9)
    flip_bytes(shard(ck / newest, backend, rank=1), at_end=True)
    half = ck / tag_for(10)  # a save that died before its manifest
    half.mkdir(exist_ok=True)
    shard(half, backend, rank=0).write_bytes(b"partial")

    Path(f"{out}.log").unlink()
    rc, log = run(out, backend)
    assert rc == 0, log[-3000:]
    assert f"checkpoint {ck / newest} is damaged" in log and "checksum mismatch" in log
    assert resumed_step(log) == 8
    assert_same_trajectory(out, ref, after=0)
    assert {tag_for(4), tag_for(8), tag_for(12)} <= Checkpointer(ck).pinned()
    assert not half.exists(), "a later save cleans up the half-written directory"
    assert all(Checkpointer.verify(ck / t) is None for t in Checkpointer(ck).complete_tags())


@pytest.mark.slow
def test_async_save_killed_mid_write_resumes_like_the_sync_run(backend, reference, tmp_path):
    """checkpoint.async_save with the write of every save held back by 6 s (the documented
    test-only knob ``MIGU_CKPT_TEST_WRITE_DELAY_S``): training runs on past step 6 while the
    step-6 checkpoint is still being written, and a SIGKILL of everything then leaves it
    without a manifest and ``latest`` at the previous checkpoint (step 4, written
    asynchronously as well). The restart, asynchronous without the delay, resumes from it and
    ends with every metrics row and the final checkpoint's weights and AdamW moments bit-equal
    to the synchronous reference run's: an asynchronous checkpoint holds the same state."""
    ref = rows(reference)
    out = tmp_path / "async"
    ck = out / "checkpoints"
    os.environ[WRITE_DELAY_ENV] = "6"
    try:
        proc = start(out, backend, ["checkpoint.async_save=true"])
    finally:
        del os.environ[WRITE_DELAY_ENV]
    t0 = time.monotonic()
    # Step 6's save starts once step 4's write is complete (one in flight): then ``latest``
    # is step 4, and the step-7 row means the loop went on while step 6 is being written.
    while not ((ck / "latest").is_file() and latest(out) == tag_for(4) and max(rows(out)) >= 7):
        if proc.poll() is not None or time.monotonic() - t0 > TIMEOUT:
            pytest.fail(f"run ended or stalled:\n{Path(f'{out}.log').read_text()[-3000:]}")
        time.sleep(0.05)
    kill_all(proc, signal.SIGKILL)
    finish(proc, out)
    assert latest(out) == tag_for(4)
    # Step 6's files may be partly there (DeepSpeed) or not yet (DCP creates the directory
    # when it writes); no manifest either way.
    assert not (ck / tag_for(6) / MANIFEST).exists()
    assert Checkpointer.verify(ck / tag_for(4)) is None

    Path(f"{out}.log").unlink()
    rc, log = run(out, backend, ["checkpoint.async_save=true"])
    assert rc == 0, log[-3000:]
    assert resumed_step(log) == 4
    assert_same_trajectory(out, ref, after=4)
    assert latest(out) == tag_for(12)
    assert Checkpointer.verify(ck / tag_for(12)) is None
    for name, fn in [("weights", model_state), ("moments", None)]:
        if fn is not None:
            got = fn(ck, tag_for(12), backend)
            want = fn(reference / "checkpoints", tag_for(12), backend)
        else:
            got = adam_moments(ck / tag_for(12), backend)
            want = adam_moments(reference / "checkpoints" / tag_for(12), backend)
        assert got.keys() == want.keys() and got, name
        for k in want:
            assert torch.equal(got[k], want[k]), f"{name} {k}"


# ------------------------------------------------------------------------------ faults


@pytest.mark.slow
def test_nonfinite_loss_skip_then_stop(backend, tmp_path):
    """lr=1e30 blows the weights up after the first step, so every later loss is NaN/inf.
    skip: the skipped step leaves weights and optimizer untouched and the run goes on;
    after max_skipped_steps consecutive skips it stops non-zero with the last good
    checkpoint intact."""
    out = tmp_path / "nan"
    extra = [
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "train.max_steps=6",
        "train.nonfinite_loss=skip",
        "train.max_skipped_steps=2",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=10",
    ]
    rc, log = run(out, backend, extra)
    assert rc != 0, log[-3000:]  # torchrun exits 1 whenever a worker fails (workers: 3)
    got = rows(out)
    skipped = [s for s, r in got.items() if r.get("skipped")]
    assert skipped, f"no non-finite loss was produced: {got}"
    first = skipped[0]
    assert skipped == [first, first + 1], "two skips, then the third non-finite loss stops"
    assert "Non-finite loss" in log and "stopping" in log
    ck = out / "checkpoints"
    # The stopping step writes nothing: latest is the last skipped step, complete and valid.
    assert latest(out) == tag_for(first + 1)
    assert Checkpointer.verify(ck / tag_for(first + 1)) is None
    good, skip = tag_for(first - 1), tag_for(first + 1)
    before, after = model_state(ck, good, backend), model_state(ck, skip, backend)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed in a skipped step"
    before, after = adam_moments(ck / good, backend), adam_moments(ck / skip, backend)
    assert before and before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} moved when skipped"


@pytest.mark.slow
def test_nonfinite_loss_stop_policy(backend, tmp_path):
    out = tmp_path / "nanstop"
    extra = [
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "train.max_steps=4",
        "train.nonfinite_loss=stop",
        "checkpoint.every_steps=1",
    ]
    rc, log = run(out, backend, extra)
    assert rc != 0, log[-3000:]
    assert "Non-finite loss" in log and "stopping" in log
    last_good = max(rows(out))
    assert last_good < 4 and latest(out) == tag_for(last_good)
    assert Checkpointer.verify(out / "checkpoints" / tag_for(last_good)) is None


@pytest.mark.slow
def test_nonfinite_gradient_norm_with_finite_loss_is_skipped(backend, tmp_path, monkeypatch):
    """Gradients made inf in backward at steps 2 and 3 while the loss stays finite
    (``tests/workers/poison_grads.py``): both steps are skipped like a non-finite loss, the
    weights and AdamW moments after them are bit-identical to before, and the run goes on
    (ZeRO-3 in fp32 used to apply the NaN update: DeepSpeed checks for overflow with fp16
    loss scaling only)."""
    out = tmp_path / "gradinf"
    monkeypatch.setenv("POISON_STEPS", "1,2")  # 0-based: logged steps 2 and 3
    extra = ["train.max_steps=4", "checkpoint.every_steps=1", "checkpoint.keep_last=10"]
    rc, log = run(out, backend, extra, script="tests/workers/poison_grads.py")
    assert rc == 0, log[-3000:]
    got = rows(out)
    assert [s for s, r in got.items() if r.get("skipped")] == [2, 3]
    assert all(math.isfinite(got[s]["loss"]) for s in got)
    assert not any(math.isfinite(got[s]["grad_norm"]) for s in (2, 3))
    assert "Non-finite gradient norm" in log and "step skipped" in log
    ck = out / "checkpoints"
    before, after = model_state(ck, tag_for(1), backend), model_state(ck, tag_for(3), backend)
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step moved weights"
    assert all(torch.isfinite(v).all() for v in after.values())
    m1, m3 = adam_moments(ck / tag_for(1), backend), adam_moments(ck / tag_for(3), backend)
    assert m1 and all(torch.equal(m1[k], m3[k]) for k in m1), "a skipped step moved moments"
    last = model_state(ck, tag_for(4), backend)
    assert any(not torch.equal(last[k], after[k]) for k in last), "step 4 trained"


@pytest.mark.slow
def test_torn_log_line_is_cut_at_resume(backend, reference, tmp_path):
    """A kill or a full disk during a log write leaves a torn last line in metrics.jsonl
    and evals.jsonl; every later resume used to fail on it (JSONDecodeError). Now it is cut
    off, warned, and the resumed run's rows equal the uninterrupted run's."""
    out = tmp_path / "torn"
    out.mkdir()
    ref = rows(reference)
    kept = "".join(json.dumps(ref[s] | {"tokens_per_s": 1.0}) + "\n" for s in range(1, 11))
    (out / "metrics.jsonl").write_text(kept + '{"step": 11, "lo')
    (out / "evals.jsonl").write_text('{"step": 4, "phase": "gen')
    src = reference / "checkpoints" / tag_for(9)
    rc, log = run(out, backend, [f"resume={src}"])
    assert rc == 0, log[-3000:]
    assert "metrics.jsonl: dropped 1 line(s) that are not JSON rows" in log
    assert "evals.jsonl: dropped 1 line(s) that are not JSON rows" in log
    assert_same_trajectory(out, ref, after=9)
    assert (out / "evals.jsonl").read_text() == ""


@pytest.mark.slow
def test_full_disk_fails_the_save_cleanly(backend, tmp_path):
    """checkpoints/ on an 80 MB tmpfs; one checkpoint is ~50 MB, so the second save hits a
    real ENOSPC mid-write (typically on one rank only: the other's shard fits). That save
    fails on every rank without a hang, its directory is removed, the first checkpoint stays
    complete and ``latest``; a failed final save exits non-zero."""
    out = tmp_path / "full"
    ck = out / "checkpoints"
    if not mount_tmpfs(ck, "80m"):
        pytest.skip("needs root to mount a small tmpfs (a real full disk)")
    try:
        rc, log = run(out, backend, ["train.max_steps=3", "checkpoint.every_steps=1"])
        listing = sorted(p.name for p in ck.iterdir())
        ok_tag = tag_for(1)
        assert rc != 0, log[-3000:]  # the final save failed too
        assert f"checkpoint {tag_for(2)} was not saved; earlier checkpoints are intact" in log
        assert f"checkpoint {tag_for(2)} failed" in log and "MB free" in log, log[-4000:]
        assert latest(out) == ok_tag
        assert [t for t in listing if t.startswith("step_")] == [ok_tag], listing
        assert Checkpointer.verify(ck / ok_tag) is None
        assert max(rows(out)) == 3, "training went on after the failed save"
    finally:
        subprocess.run(["umount", str(ck)])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["deepspeed"], indirect=True)
def test_full_log_disk_is_not_fatal_and_a_failed_signal_save_exits_nonzero(backend, tmp_path):
    """metrics.jsonl, evals.jsonl and checkpoints/ on a 40 MB tmpfs filled to the last page
    before the run starts (the logs are links into it). Training goes on while no log row
    can be written (warned once per file); once the filler is removed the delayed rows are
    written, each step exactly once, in order. A SIGTERM then asks for a checkpoint (~50
    MB), which cannot fit: the run exits non-zero instead of 0 as if it had been saved."""
    out, disk = tmp_path / "run", tmp_path / "disk"
    if not mount_tmpfs(disk, "40m"):
        pytest.skip("needs root to mount a small tmpfs (a real full disk)")
    try:
        out.mkdir()
        (disk / "checkpoints").mkdir()
        for name in ("metrics.jsonl", "evals.jsonl", "checkpoints"):
            (out / name).symlink_to(disk / name)
        filler = fill(disk)
        extra = ["train.max_steps=60", "eval.every_steps=2", "eval.heldout_tokens=128"]
        proc = start(out, backend, extra)
        t0 = time.monotonic()
        while log_text(out).count("WARNING: cannot write") < 2:  # both logs
            assert proc.poll() is None and time.monotonic() - t0 < TIMEOUT, log_text(out)
            time.sleep(0.05)
        time.sleep(2)  # a few more steps with the disk full
        filler.unlink()
        while log_text(out).count("writing again") < 2:
            assert proc.poll() is None and time.monotonic() - t0 < TIMEOUT, log_text(out)
            time.sleep(0.05)
        for w in workers(proc):
            w.send_signal(signal.SIGTERM)
        rc, log = finish(proc, out)
        logged = {n: (out / n).read_text().splitlines() for n in ("metrics.jsonl", "evals.jsonl")}
    finally:
        subprocess.run(["umount", str(disk)])
    assert rc != 0, log[-3000:]
    assert "exit=checkpoint_failed" in log
    stopped = int(log.split("Stop signal: checkpoint at step ")[1].split(",")[0])
    assert f"checkpoint {tag_for(stopped)} was not saved" in log
    assert log.count("WARNING: cannot write") == 2 and log.count("writing again") == 2
    steps = [json.loads(x)["step"] for x in logged["metrics.jsonl"]]
    assert steps == list(range(1, stopped + 1))
    evals = [json.loads(x)["step"] for x in logged["evals.jsonl"]]
    assert evals == list(range(0, stopped + 1, 2))


def log_text(out: Path) -> str:
    path = Path(f"{out}.log")
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["deepspeed"], indirect=True)
def test_sigterm_during_setup_exits_without_a_checkpoint(backend, tmp_path):
    """SIGTERM to the workers while they set up (model, backend, data): each says so and
    exits 143 at once; no checkpoint, no metrics (the default action killed them without a
    word, and the loop's handler would have trained a step and saved it)."""
    out = tmp_path / "setup"
    proc = start(out, backend)
    t0 = time.monotonic()
    while not (out / "config.yaml").exists():  # written first thing in set-up
        assert proc.poll() is None and time.monotonic() - t0 < TIMEOUT, log_text(out)
        time.sleep(0.02)
    ranks = workers(proc)
    for w in ranks:
        w.send_signal(signal.SIGTERM)
    rc, log = finish(proc, out)
    assert rc != 0
    assert log.count("SIGTERM during set-up, before the first step: exiting (code 143)") == 2
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoints/step_*"))


def universal_state(d: Path, out: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own per-parameter consolidation of checkpoint ``d`` (``ds_to_universal``:
    ``<out>/zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt``), as {"<name>.<state>": tensor}."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(
        input_folder=str(d), output_folder=str(out), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
    )  # fmt: skip
    ds_to_universal(args)
    found = {}
    for f in (out / "zero").glob("*/*.pt"):
        if f.stem in ("fp32", "exp_avg", "exp_avg_sq"):
            t = torch.load(f, weights_only=False)
            found[f"{f.parent.name}.{f.stem}"] = t["param"] if isinstance(t, dict) else t
    return found


def assert_resumed_like(got: dict[int, dict], ref: dict[int, dict], after: int) -> None:
    """Steps after ``after`` against the uninterrupted run on the other number of ranks.

    What "the same" means: the global batch is the same 8 sequences, but its loss is a mean
    of per-rank means on 2 ranks and of per-micro-batch means on 1, and the gradient is summed
    in another order (all-reduce of the ranks' halves vs local accumulation). In fp32 that
    changes the last bits (relative ~1e-7 per step); AdamW's update, normalised by its second
    moment, does not amplify it over 4 steps. Measured: |d loss| / loss <= 5e-8. Allowed: 1e-5.
    The LR (the schedule's step) and MIGU's masks (the Jaccard index of consecutive masks,
    a function of every mask) must be exactly equal: a mask computed from magnitudes that
    differ in the last bits only changes at an exact tie, which this data does not have.
    """
    assert sorted(got) == [s for s in sorted(ref) if s > after], "steps differ"
    for step in range(after + 1, max(ref) + 1):
        a, b = got[step], ref[step]
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (step, a["loss"], b["loss"])
        assert a["lr"] == b["lr"] and a["tokens"] == b["tokens"], step
        keys = [k for k in b if k.startswith("migu/")]
        assert keys and all(a[k] == b[k] for k in keys), (step, keys)


@pytest.mark.slow
def test_resume_on_another_number_of_ranks(backend, reference, tmp_path):
    """2 -> 1 -> 2 ranks, the global batch kept through grad_accum (2 ranks x 4 x 1 = 1 rank
    x 4 x 2). The state restored on 1 rank (weights, AdamW moments and step, LR, MIGU, data
    position) equals the 2-rank checkpoint as read by the library's own offline tools
    (DeepSpeed: zero_to_fp32 and ds_to_universal; FSDP2: DCP without a process group), bit
    for bit; then the losses follow the uninterrupted 2-rank run (see assert_resumed_like),
    and MIGU's masks at the end are those of that run."""
    src = reference / "checkpoints" / tag_for(8)
    out = tmp_path / "one"
    rc, log = run(out, backend, [f"resume={src}", "train.grad_accum=2"],
                  script="tests/workers/elastic_state.py", nproc=1)  # fmt: skip
    assert rc == 0, log[-3000:]
    assert "world size: 2 -> 1 ranks (global batch 8 kept" in log
    restored = torch.load(out / "restored.pt", weights_only=False)
    state = restored["state"]
    weights = model_state(reference / "checkpoints", tag_for(8), backend)
    if backend == "fsdp2":
        moments = adam_moments(src, backend)
    else:
        uni = universal_state(src, tmp_path / "universal")
        moments = {k: v for k, v in uni.items() if not k.endswith(".fp32")}
        assert all(torch.equal(state[k], v.view_as(state[k])) for k, v in uni.items())
    assert moments and set(moments) <= set(state)
    for k, v in moments.items():
        assert torch.equal(state[k], v.view_as(state[k])), k
    for name, w in weights.items():
        assert torch.equal(state[f"{name}.fp32"], w.float()), name
    saved = json.loads((src / "trainer_state.json").read_text())
    rank0 = read_rank_state(src / "rank_00000.pt")
    assert restored["step"] == saved["train"]["step"] == 8
    assert restored["adam_steps"] == [8.0] and restored["sched_epoch"] == 8
    assert restored["data"] == rank0["data"]
    for k in ("last_keep", "prev_domain_keep", "domain_sum"):
        a, b = restored["migu"][k], rank0["migu"][k]
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), k
    ref_rows = rows(reference)
    assert restored["lr"] == ref_rows[9]["lr"]  # the LR of the next step
    assert_resumed_like(rows(out), ref_rows, after=8)

    # ... and back to 2 ranks from the checkpoint the 1-rank run wrote at step 9.
    back = tmp_path / "two"
    rc, log = run(back, backend, [f"resume={out / 'checkpoints' / tag_for(9)}"])
    assert rc == 0, log[-3000:]
    assert "world size: 1 -> 2 ranks" in log
    assert_resumed_like(rows(back), ref_rows, after=9)
    # MIGU's masks at the end: what the uninterrupted run ended with, on every new rank.
    end_ref = read_rank_state(reference / "checkpoints" / tag_for(12) / "rank_00000.pt")["migu"]
    for r in (0, 1):
        end = read_rank_state(back / "checkpoints" / tag_for(12) / f"rank_{r:05d}.pt")["migu"]
        for k in ("last_keep", "domain_sum"):
            assert all(torch.equal(end[k][n], end_ref[k][n]) for n in end_ref[k]), (r, k)


# ------------------------------------------------------------------------------ offline


def _copy_tags(reference: Path, dst: Path, tags: list[str]) -> Path:
    import shutil

    root = dst / "checkpoints"
    for t in tags:
        shutil.copytree(reference / "checkpoints" / t, root / t)
    (root / "latest").write_text(tags[-1])
    return root


def test_truncated_latest_falls_back_and_manifestless_dir_is_ignored(
    backend, reference, tmp_path, capsys
):
    root = _copy_tags(reference, tmp_path, [tag_for(8), tag_for(9), tag_for(12)])
    path = shard(root / tag_for(12), backend, rank=0)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
    assert "truncated" in Checkpointer.verify(root / tag_for(12))
    (root / tag_for(9) / MANIFEST).unlink()  # an incomplete save: never a candidate
    assert Checkpointer(root).find_latest_good() == tag_for(8)
    err = capsys.readouterr().out
    assert f"checkpoint {root / tag_for(12)} is damaged" in err
    # latest pointing at a directory without manifest: warn, take the newest complete one.
    (root / "latest").write_text(tag_for(9))
    assert Checkpointer(root).find_latest_good() == tag_for(8)
    assert "missing or incomplete" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["deepspeed"], indirect=True)
def test_offline_tools_verify_a_step_directory(reference, tmp_path):
    """launch/evaluate.py and launch/export_hf.py given one step directory check its files
    against the manifest (evaluate.py used to evaluate a corrupt checkpoint silently)."""
    root = _copy_tags(reference, tmp_path, [tag_for(12)])
    flip_bytes(shard(root / tag_for(12), "deepspeed", rank=1))
    for tool in (["launch/evaluate.py"], ["launch/export_hf.py", "--out", str(tmp_path / "hf")]):
        cmd = [sys.executable, *tool, "--checkpoint", str(root / tag_for(12))]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 1, (tool, r.stdout[-2000:], r.stderr[-2000:])
        assert f"checkpoint {root / tag_for(12)} is damaged" in r.stderr
        assert "checksum mismatch" in r.stderr


# ------------------------------------------------------------------------------ export


def test_export_matches_trained_model_logits_and_generates(backend, reference, tmp_path):
    """launch/export_hf.py on checkpoints/ (latest = final step), one process, no GPU: the
    exported model's logits equal the distributed (sharded) model's, and it generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    cmd = [sys.executable, "launch/export_hf.py"]
    cmd += ["--checkpoint", str(reference / "checkpoints"), "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"config.json", "generation_config.json", "model.safetensors"} <= {
        p.name for p in out.iterdir()
    }
    trained = torch.load(reference / "logits.pt", weights_only=False)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    for k, v in trained["state_dict"].items():
        assert torch.equal(model.state_dict()[k], v), k
    with torch.no_grad():
        logits = model(input_ids=trained["input_ids"]).logits
    torch.testing.assert_close(logits, trained["logits"], rtol=1e-5, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The court", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 4)
    # The phase-end exports are the pinned checkpoints (final phase = the final step).
    science = AutoModelForCausalLM.from_pretrained(reference / "hf" / "science").state_dict()
    assert all(torch.equal(science[k], v) for k, v in trained["state_dict"].items())
    general = AutoModelForCausalLM.from_pretrained(reference / "hf" / "general").state_dict()
    at4 = model_state(reference / "checkpoints", tag_for(4), backend)
    assert all(torch.equal(general[k], v) for k, v in at4.items())
    assert not torch.equal(general["lm_head.weight"], science["lm_head.weight"])


@pytest.mark.parametrize("backend", ["deepspeed"], indirect=True)
def test_deepspeed_zero_to_fp32_script_reads_our_checkpoints(reference, tmp_path):
    """The zero_to_fp32.py DeepSpeed copies into checkpoints/ follows our ``latest``."""
    from safetensors.torch import load_file

    ck = reference / "checkpoints"
    cmd = [
        sys.executable,
        str(ck / "zero_to_fp32.py"),
        str(ck),
        str(tmp_path),
        "--safe_serialization",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    sd = load_file(tmp_path / "model.safetensors")
    trained = torch.load(reference / "logits.pt", weights_only=False)["state_dict"]
    assert sd.keys() == trained.keys()
    assert all(torch.equal(sd[k], v) for k, v in trained.items())


def test_stager_copies_are_a_snapshot_in_reused_buffers():
    """What an asynchronous save writes is the state at the snapshot, not what training did
    to it since; the second snapshot reuses the first one's host buffers (no new allocation)
    and structure and non-tensor leaves are kept."""
    from migu_dist.backend import Stager

    w = torch.arange(6.0).reshape(2, 3)
    state = {"model": {"w": w}, "optim": [{"step": torch.tensor(3.0), "lr": 0.1}], "t": (w[0],)}
    stager = Stager()
    first = stager.stage(state)
    w.add_(100.0)  # training goes on
    assert torch.equal(first["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert first["optim"][0]["lr"] == 0.1 and isinstance(first["t"], tuple)
    assert first["model"]["w"].data_ptr() != w.data_ptr()
    second = stager.stage(state)
    assert second["model"]["w"].data_ptr() == first["model"]["w"].data_ptr()
    assert torch.equal(second["model"]["w"], w) and torch.equal(second["t"][0], w[0])


def test_each_rank_verifies_the_files_it_loads():
    """Checksumming at save and verification at load go to the rank that reads a file
    (DeepSpeed's and DCP's shards, our per-rank state), modulo the current world size; the
    other files are shared round-robin, and every file is covered."""
    from train.checkpoint import _owners

    files = [
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt",
        "__1_0.distcp",
        "rank_00000.pt",
        "rank_00003.pt",
        ".metadata",
        "trainer_state.json",
        "zero_to_fp32.py",
    ]
    owner = _owners(files, world=2)
    assert set(owner) == set(files)
    assert owner["zero_pp_rank_1_mp_rank_00_optim_states.pt"] == 1
    assert owner["zero_pp_rank_0_mp_rank_00_model_states.pt"] == 0
    assert owner["bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt"] == 0
    assert owner["__1_0.distcp"] == 1 and owner["rank_00003.pt"] == 1
    rest = [owner[f] for f in (".metadata", "trainer_state.json", "zero_to_fp32.py")]
    assert sorted(rest) == [0, 0, 1]


def test_manifests_of_earlier_versions_zlib_crc32_still_verify(tmp_path):
    """New manifests carry CRC32C; a checkpoint written before (zlib CRC32) still verifies,
    and a flipped byte is still caught under either checksum."""
    import zlib

    import crc32c

    data = bytes(range(256)) * 64
    for kind, fn in [("crc32", zlib.crc32), ("crc32c", crc32c.crc32c)]:
        d = tmp_path / kind
        d.mkdir()
        (d / "shard.pt").write_bytes(data)
        files = {"shard.pt": {"size": len(data), kind: fn(data)}}
        (d / MANIFEST).write_text(json.dumps({"files": files}))
        assert Checkpointer.verify(d) is None, kind
        flip_bytes(d / "shard.pt")
        assert "checksum mismatch" in (Checkpointer.verify(d) or ""), kind


def test_durable_file_reports_the_size_and_crc32c_of_what_reached_the_file(tmp_path, monkeypatch):
    """The checksums in a manifest come from the writer (``migu_dist.durable``), not from
    reading the file back: they must be the file's, for raw bytes written in pieces and for
    ``torch.save`` through it, with the early writeback taken every 1 kB."""
    import crc32c

    from migu_dist import durable

    monkeypatch.setattr(durable, "WRITEBACK_BYTES", 1024)
    pieces = [bytes(range(256)) * 9, b"", memoryview(bytes(5000)), bytearray(b"tail")]
    with durable.DurableFile(tmp_path / "raw") as f:
        for piece in pieces:
            f.write(piece)
        got = f.close()
    data = (tmp_path / "raw").read_bytes()
    assert data == b"".join(bytes(p) for p in pieces)
    assert got == {"size": len(data), "crc32c": crc32c.crc32c(data)}

    state = {"w": torch.randn(300, 7), "step": 3, "m": [torch.arange(5)]}
    got = durable.write_durable(tmp_path / "obj.pt", state)
    data = (tmp_path / "obj.pt").read_bytes()
    assert got == {"size": len(data), "crc32c": crc32c.crc32c(data)}
    back = torch.load(tmp_path / "obj.pt", weights_only=True)
    assert torch.equal(back["w"], state["w"]) and back["step"] == 3
    assert torch.equal(back["m"][0], state["m"][0])
