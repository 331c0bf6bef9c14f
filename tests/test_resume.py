"""Resume guards (train/resume.py, rotation in train/checkpoint.py): no silent restart from
step 0, rotation by recency, config changes classified at resume, data changed under a run,
one writer per output_dir, and runs killed and restarted many times.

Launch tests reuse tests/test_checkpoint.py's helpers and its uninterrupted ``reference`` run
per backend (shared through the session fixture ``reference_runs``): real 2-rank DeepSpeed
ZeRO-3 / FSDP2 runs on gloo. Logic that needs no launch (rotation order, change
classification, the lock, the output_dir rules) is tested in this process on real files.
"""

# ruff: noqa: F811 - the fixtures ``backend`` and ``reference`` are imported, then requested

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.launch_util import ENGINES
from tests.test_checkpoint import (  # noqa: F401 - backend and reference are fixtures
    BASE,
    CONFIG,
    ROOT,
    assert_same_trajectory,
    backend,
    finish,
    flip_bytes,
    kill_all,
    latest,
    model_state,
    reference,
    rows,
    run,
    shard,
    start,
    wait_for_step,
    workers,
)
from train.checkpoint import MANIFEST, Checkpointer, tag_for
from train.config import Config, load_config
from train.resume import (
    LOCK,
    ResumeError,
    RunLock,
    check_changes,
    claim_output_dir,
    data_fingerprint,
    resume_source,
)
from train.schedule import lr_lambda


def copy_run(reference: Path, dst: Path) -> Path:
    """The reference run's checkpoints and metrics, as if ``dst`` had trained them."""
    shutil.copytree(reference / "checkpoints", dst / "checkpoints")
    shutil.copy(reference / "metrics.jsonl", dst / "metrics.jsonl")
    return dst


def saved_state(reference: Path, step: int) -> dict:
    return json.loads(
        (reference / "checkpoints" / tag_for(step) / "trainer_state.json").read_text()
    )


# ------------------------------------------------------------------------------ no launch


def _fake_checkpoint(root: Path, tag: str, damaged: bool = False) -> None:
    """A complete checkpoint directory of one file, listed in its manifest (or, damaged, a
    manifest naming a file that is not there)."""
    d = root / tag
    shutil.rmtree(d, ignore_errors=True)  # as a save does with an earlier attempt
    d.mkdir(parents=True)
    (d / "shard.pt").write_bytes(b"x")
    files = {"shard.pt": {"size": 1, "crc32": 2363233923}}  # zlib.crc32(b"x")
    if damaged:
        files["lost.pt"] = {"size": 1, "crc32": 0}
    (d / MANIFEST).write_text(json.dumps({"files": files}))


def _save(ck: Checkpointer, step: int, pinned: bool = False) -> None:
    """What ``Checkpointer.save`` does on rank 0 once the shards and manifest are written."""
    _fake_checkpoint(ck.root, tag_for(step))
    if pinned:
        (ck.root / "pinned").write_text("\n".join(sorted(ck.pinned() | {tag_for(step)})))
    ck.adopt(tag_for(step))
    ck._rotate(keep=tag_for(step))


def _tags(root: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in root.glob("step_*"))


def test_rotation_by_recency_keeps_the_resumed_timeline(tmp_path):
    """Reproduction 2: a run saves 3 (pinned), 6, 9, 12, 15 with keep_last=2; resumed from
    step 3 it saves 6 and 7. Going by step order, rotation deleted 6 and 7 (9... were
    "newer") and the next resume went back to 3; by recency, 6 and 7 stay, the abandoned
    12 and 15 go, and ``latest`` (7) is what a resume finds."""
    ck = Checkpointer(tmp_path / "a", keep_last=2)
    for step in (3, 6, 9, 12, 15):
        _save(ck, step, pinned=step == 3)
    assert _tags(ck.root) == [3, 12, 15]
    ck.adopt(tag_for(3))  # what build_trainer does after resuming from step 3
    for step in (6, 7):
        _save(ck, step)
    assert _tags(ck.root) == [3, 6, 7]
    assert ck.latest_tag() == tag_for(7) and ck.find_latest_good() == tag_for(7)

    # keep_last=1 and a resume from a pinned earlier step: the one save left is the new one.
    ck = Checkpointer(tmp_path / "b", keep_last=1)
    for step in (3, 6, 7):
        _save(ck, step, pinned=step == 3)
    ck.adopt(tag_for(3))
    _save(ck, 4)
    assert _tags(ck.root) == [3, 4] and ck.find_latest_good() == tag_for(4)

    # keep_last=1 after a fallback past a damaged checkpoint: one save still leaves one.
    ck = Checkpointer(tmp_path / "c", keep_last=1)
    _fake_checkpoint(ck.root, tag_for(8))
    _fake_checkpoint(ck.root, tag_for(9), damaged=True)
    ck.adopt(tag_for(9))
    assert ck.find_latest_good() == tag_for(8)
    ck.adopt(tag_for(8))
    _save(ck, 9)
    assert _tags(ck.root) == [9] and ck.find_latest_good() == tag_for(9)


def test_no_silent_fresh_start_when_the_run_cannot_be_resumed(tmp_path, capsys):
    """Reproduction 1 without a launch: resume=auto refuses, naming what it found and both
    ways on, when no checkpoint verifies, when ``latest`` names a missing checkpoint, or when
    metrics were logged but no checkpoint exists; an empty directory starts at step 0."""
    out = tmp_path / "run"
    cfg = Config(output_dir=str(out))
    ck = Checkpointer(out / "checkpoints")
    assert resume_source(cfg, ck) is None  # nothing there: a new run

    _fake_checkpoint(ck.root, tag_for(3), damaged=True)
    _fake_checkpoint(ck.root, tag_for(6), damaged=True)
    ck.adopt(tag_for(6))
    with pytest.raises(ResumeError) as e:
        resume_source(cfg, ck)
    msg = str(e.value)
    assert "no checkpoint" in msg and "verifies" in msg
    assert f"{tag_for(3)}, {tag_for(6)}" in msg
    assert "resume=<output_dir>/checkpoints/step_XXXXXXXX" in msg and "resume=fresh" in msg

    shutil.rmtree(ck.root / tag_for(6))  # latest now names a checkpoint that is not there
    with pytest.raises(ResumeError, match=f"latest names {tag_for(6)}, which is not there"):
        resume_source(cfg, ck)

    shutil.rmtree(ck.root)
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    with pytest.raises(ResumeError, match=r"metrics.jsonl \(2 rows\)"):
        resume_source(cfg, ck)


def test_resume_never_touches_nothing_and_fresh_moves_the_run_aside(tmp_path):
    out = tmp_path / "run"
    _fake_checkpoint(out / "checkpoints", tag_for(3))
    (out / "config.yaml").write_text("old: config\n")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ResumeError, match="resume=never, but .* holds an earlier run"):
        claim_output_dir(Config(output_dir=str(out), resume="never"), rank=0)
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert after == before, "resume=never must not write anything"

    lock = claim_output_dir(Config(output_dir=str(out), resume="fresh"), rank=0)
    try:
        (aside,) = out.glob("old-*")
        assert sorted(p.name for p in out.iterdir()) == sorted([LOCK, aside.name])
        assert (aside / "config.yaml").read_text() == "old: config\n"
        assert (aside / "checkpoints" / tag_for(3) / MANIFEST).is_file()
    finally:
        lock.release()
    assert not (out / LOCK).exists()


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, capsys):
    """Reproduction 6 without a launch, on a real lock file: a holder alive on this host is
    named and refused; one whose pid is gone, or on another host whose heartbeat stopped, is
    taken over with a warning; a remote holder whose heartbeat moves is refused."""
    path = tmp_path / "run" / LOCK
    alive = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        holder = {"host": socket.gethostname(), "pid": alive.pid, "started": "then"}
        holder["pid_start"] = psutil.Process(alive.pid).create_time()
        path.parent.mkdir()
        path.write_text(json.dumps(holder))
        why = RunLock(path).acquire()
        assert why and f"pid {alive.pid}" in why and socket.gethostname() in why
        assert f"delete {path}" in why

        path.write_text(json.dumps(dict(holder, pid=dead.pid)))
        lock = RunLock(path)
        assert lock.acquire() is None
        assert f"pid {dead.pid} no longer runs" in capsys.readouterr().out
        assert json.loads(path.read_text())["pid"] == os.getpid()
        lock.release()
        assert not path.exists()

        path.write_text(json.dumps(dict(holder, host="elsewhere")))
        assert RunLock(path, heartbeat_s=0.1).acquire() is None  # no heartbeat: stale
        assert "heartbeat stopped" in capsys.readouterr().out

        path.write_text(json.dumps(dict(holder, host="elsewhere")))
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(0.05):
                os.utime(path)

        t = threading.Thread(target=beat)
        t.start()
        try:
            why = RunLock(path, heartbeat_s=0.1).acquire()
        finally:
            stop.set()
            t.join()
        assert why and "host elsewhere" in why
    finally:
        alive.kill()
        alive.wait()


def test_resume_overrides_must_name_config_keys(monkeypatch):
    from train.config import ConfigError

    monkeypatch.chdir(ROOT)
    assert load_config(CONFIG, ["resume_overrides=[optim, migu.keep_ratio]"]).resume_overrides
    with pytest.raises(ConfigError, match="resume_overrides: 'optim.lrr' is not a config key. "
                       "Did you mean 'optim.lr'"):  # fmt: skip
        load_config(CONFIG, ["resume_overrides=[optim.lrr]", "resume=fresh"])


@pytest.mark.parametrize("backend", ["deepspeed"], indirect=True)
def test_change_classes(reference, monkeypatch):
    """Reproduction 3 without a launch: each kind of change against the reference's step-6
    checkpoint (phase 'legal', steps 4-8, after 'general')."""
    monkeypatch.chdir(ROOT)
    saved = saved_state(reference, 6)
    fp = saved["data_fingerprint"]

    def classify(*overrides: str) -> dict[str, list[str]]:
        over = [*BASE, *ENGINES["deepspeed"], "checkpoint.export_hf_at_phase_end=true", *overrides]
        cfg = load_config(CONFIG, over, world_size=2)
        ch = check_changes(saved, cfg, 2, fp)
        return {k: [line.split(":")[0] for line in v] for k, v in vars(ch).items()}

    assert classify() == {"safe": [], "taken": [], "need_override": [], "refused": []}
    got = classify("logging.log_every=5", "eval.every_steps=2", "checkpoint.every_steps=2",
                   "train.max_steps=20", "engine.dist_timeout_minutes=3")  # fmt: skip
    assert sorted(got["safe"]) == [
        "checkpoint.every_steps", "engine.dist_timeout_minutes", "eval.every_steps",
        "logging.log_every", "train.max_steps",
    ]  # fmt: skip
    assert got["refused"] == got["need_override"] == []
    got = classify("optim.lr=0.03", "migu.keep_ratio=0.5", "train.max_steps=10")
    assert got["need_override"] == ["migu.keep_ratio", "optim.lr", "train.max_steps"]
    got = classify("optim.lr=0.03", "migu.keep_ratio=0.5", "resume_overrides=[optim,migu]")
    assert got["taken"] == ["migu.keep_ratio", "optim.lr"] and got["need_override"] == []
    got = classify("data.phases.0.steps=5", "train.micro_batch_size=2", "train.seed=1",
                   "model.hidden_size=32", "train.max_steps=5")  # fmt: skip
    assert set(got["refused"]) >= {
        "data.phases[0].steps", "global batch", "train.seed",
        "model.hidden_size", "train.max_steps",
    }  # fmt: skip
    assert got["need_override"] == []
    # Later phases may change or be added; the current one (legal) may not.
    got = classify("data.phases.2.steps=9", "data.phases.3={name: more, domains: {code: 1}}")
    assert got["refused"] == [] and "data.phases" in got["safe"]
    assert classify("data.phases.1.replay=0.2")["refused"] == ["data.phases[1].replay"]


@pytest.mark.parametrize("backend", ["deepspeed"], indirect=True)
def test_world_size_change_keeps_or_refuses_the_global_batch(reference, monkeypatch):
    """The reference's 2-rank checkpoint (4 x 1 x 2 = 8 sequences per step) on other world
    sizes: taken when micro_batch_size x grad_accum x ranks is still 8, else refused with
    the settings that keep it (or the world sizes that can)."""
    monkeypatch.chdir(ROOT)
    saved = saved_state(reference, 6)
    fp = saved["data_fingerprint"]

    def changes(world: int, *overrides: str):
        over = [*BASE, *ENGINES["deepspeed"], "checkpoint.export_hf_at_phase_end=true", *overrides]
        return check_changes(saved, load_config(CONFIG, over, world_size=world), world, fp)

    ch = changes(1, "train.grad_accum=2")
    assert ch.refused == ch.need_override == [] and ch.problem(Path("c")) is None
    assert [line.split(":")[0] for line in ch.safe] == ["world size", "train.grad_accum"]
    assert "2 -> 1 ranks (global batch 8 kept" in ch.safe[0]
    ch = changes(4, "train.micro_batch_size=2")
    assert ch.refused == [] and ch.need_override == []
    # Same per-rank settings on 1 or 4 ranks: the batch would change.
    (line,) = changes(1).refused
    assert "8 sequences per step (4 x 1 x 2 ranks) -> 4 (4 x 1 x 1 ranks)" in line
    assert line.endswith("on 1 ranks set train.micro_batch_size=4 train.grad_accum=2 "
                         "(4 x 2 x 1 = 8)")  # fmt: skip
    assert (
        changes(4)
        .refused[0]
        .endswith("set train.micro_batch_size=2 train.grad_accum=1 (2 x 1 x 4 = 8)")
    )
    # 8 sequences cannot go evenly over 3 ranks whatever the per-rank settings.
    (line,) = changes(3).refused
    assert "8 sequences cannot be split evenly over 3 ranks; run on 2 or 4 ranks" in line
    # The same world size: micro_batch_size x grad_accum must stay (as before).
    assert changes(2, "train.grad_accum=2").refused[0].startswith("global batch: 8 ")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["deepspeed"], indirect=True)
def test_global_batch_that_cannot_be_kept_is_refused(backend, reference, tmp_path):
    """As a user meets it: 3 ranks on a 2-rank run of 8 sequences per step. Every rank stops
    before anything is written, naming the world sizes that can keep the batch. (The
    decision is train/resume.py's, the same for both backends.)"""
    src = reference / "checkpoints" / tag_for(12)
    out = tmp_path / "ws"
    rc, log = run(out, backend, [f"resume={src}"], nproc=3)
    assert rc != 0
    assert "global batch: 8 sequences per step (4 x 1 x 2 ranks) -> 12" in log
    assert "8 sequences cannot be split evenly over 3 ranks; run on 2 or 4 ranks" in log
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


@pytest.mark.parametrize("backend", ["deepspeed"], indirect=True)
def test_data_fingerprint_sees_rewrites_not_moves(reference, tmp_path, monkeypatch):
    """Reproduction 4 without a launch: a training file of a domain already read, rewritten
    in place at the same size, is refused; the same bytes at a new path are fine; a domain
    not read yet may change."""
    saved = saved_state(reference, 6)  # read: literature, speeches (general), legal
    monkeypatch.chdir(ROOT)  # the config's and the fingerprint's paths are relative to it
    src = ROOT / "data" / "demo"
    for dom in ("literature", "science"):
        shutil.copytree(src / dom, tmp_path / dom)
    moved = [f"data.domains.{d}.train=[{tmp_path}/{d}/train-*.jsonl]" for d in ("literature",
             "science")]  # fmt: skip
    cfg = load_config(CONFIG, [*BASE, *ENGINES["deepspeed"], *moved], world_size=2)
    ch = check_changes(saved, cfg, 2, data_fingerprint(cfg))
    assert ch.refused == [] and any("same files at new paths" in c for c in ch.safe)
    for dom in ("literature", "science"):  # same size, other bytes at the very end
        f = tmp_path / dom / "train-00001.jsonl"
        data = bytearray(f.read_bytes())
        data[-5:-2] = b"XYZ"
        f.write_bytes(bytes(data))
    ch = check_changes(saved, cfg, 2, data_fingerprint(cfg))
    assert len(ch.refused) == 1, ch.refused
    assert "data.domains.literature.train" in ch.refused[0] and "(content;" in ch.refused[0]


# ------------------------------------------------------------------------------ launches


@pytest.mark.slow
def test_damaged_run_refuses_then_fresh_moves_it_aside(backend, reference, tmp_path):
    """Reproduction 1: every checkpoint damaged (every rank's shard) → the job exits non-zero
    naming what it found and the ways on, and touches nothing; ``resume=fresh`` then moves
    the run aside and trains from step 0 (the same rows as the reference's first steps).
    On both backends: each writes its own shard files, and the refusal must come before
    either backend's loader touches them."""
    out = copy_run(reference, tmp_path / "run")
    ck = out / "checkpoints"
    for tag in Checkpointer(ck).complete_tags():
        for rank in (0, 1):
            flip_bytes(shard(ck / tag, backend, rank))
    metrics = (out / "metrics.jsonl").read_bytes()
    rc, log = run(out, backend)
    assert rc != 0, log[-3000:]
    assert "no checkpoint in" in log and "verifies" in log and "metrics.jsonl (12 rows)" in log
    assert "resume=fresh" in log and "resume=<output_dir>/checkpoints/step_" in log
    assert (out / "metrics.jsonl").read_bytes() == metrics and not (out / "config.yaml").exists()
    assert not (out / LOCK).exists()

    rc, log = run(out, backend, ["resume=fresh", "train.max_steps=2"])
    assert rc == 0, log[-3000:]
    (aside,) = out.glob("old-*")
    assert (aside / "metrics.jsonl").read_bytes() == metrics
    assert (
        Checkpointer(aside / "checkpoints").complete_tags()
        == Checkpointer(reference / "checkpoints").complete_tags()
    )
    ref = rows(reference)
    assert rows(out) == {1: ref[1], 2: ref[2]}  # warmup: the LR does not depend on max_steps


@pytest.mark.slow
def test_refused_changes_are_all_named_and_nothing_is_written(backend, reference, tmp_path):
    """Reproductions 3 and 4 as a user meets them: a changed LR (needs resume_overrides), an
    earlier phase changed and a training file rewritten under the run (refused), and a safe
    change, in one resume: all reported at once, non-zero exit, nothing written."""
    data = tmp_path / "literature"
    shutil.copytree(ROOT / "data" / "demo" / "literature", data)
    f = data / "train-00000.jsonl"
    f.write_bytes(f.read_bytes()[:-1] + b" ")  # rewritten in place, same size
    out = tmp_path / "run"
    src = reference / "checkpoints" / tag_for(8)
    extra = [f"resume={src}", "optim.lr=0.03", "data.phases.0.steps=5", "logging.log_every=2",
             f"data.domains.literature.train=[{data}/train-*.jsonl]"]  # fmt: skip
    rc, log = run(out, backend, extra)
    assert rc != 0, log[-3000:]
    assert "optim.lr: 0.003 -> 0.03" in log and "resume_overrides=[optim.lr]" in log
    assert "data.phases[0].steps: 4 -> 5" in log
    assert f"{f} changed (content; recorded as data/demo/literature/train-00000.jsonl)" in log
    assert "logging.log_every" not in log.split("ERROR:", 1)[1]  # safe: not a problem
    assert sorted(p.name for p in out.iterdir()) == [], "nothing written into output_dir"


@pytest.mark.slow
def test_override_applied_for_real_and_rotation_keeps_the_resumed_timeline(
    backend, reference, tmp_path
):
    """Reproductions 2 and 3 in one resume of a copy of the reference run from step 4, with
    max_steps 12 -> 7, optim.lr 0.003 -> 0.03 (both named in resume_overrides) and
    keep_last=1. The optimizer really steps with the new LR (the logged LR, read from its
    param groups, is 0.03 x the schedule over 7 steps; losses match the reference at step 5,
    before the first update, and differ after). Rotation by step order deleted the
    checkpoints of steps 6 and 7 just written (the old 9 was "newer"); by recency they are
    kept, and ``latest`` (7) is what the next resume finds."""
    out = copy_run(reference, tmp_path / "run")
    ck = out / "checkpoints"
    extra = [
        f"resume={ck / tag_for(4)}",
        "train.max_steps=7",
        "optim.lr=0.03",
        "resume_overrides=[optim.lr,train.max_steps]",
        "checkpoint.at_phase_end=false",
        "checkpoint.keep_last=1",
    ]
    rc, log = run(out, backend, extra)
    assert rc == 0, log[-3000:]
    assert "resume: taking override optim.lr: 0.003 -> 0.03" in log
    cfg = load_config(CONFIG, [*BASE, *ENGINES[backend], *extra[1:]], world_size=2)
    schedule = lr_lambda(cfg.optim, 7)
    got, ref = rows(out), rows(reference)
    assert sorted(got) == [1, 2, 3, 4, 5, 6, 7]
    for step in (5, 6, 7):
        assert got[step]["lr"] == 0.03 * schedule(step - 1), step
    assert got[5]["loss"] == ref[5]["loss"]
    assert got[6]["loss"] != ref[6]["loss"] and got[7]["loss"] != ref[7]["loss"]

    assert latest(out) == tag_for(7)
    assert _tags(ck) == [4, 7, 8, 12], "the pinned ones and the newest written"
    assert Checkpointer(ck).find_latest_good() == tag_for(7)


def _signal_rank(proc, rank: int, sig: int) -> None:
    (w,) = [p for p in workers(proc) if p.environ().get("RANK") == str(rank)]
    w.send_signal(sig)


def _wait_for(proc, done, what: str, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not done():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            pytest.fail(f"the run ended or stalled before {what}")
        time.sleep(0.05)


def _log_has(out: Path, text: str):
    log = Path(f"{out}.log")
    return lambda: log.is_file() and text in log.read_text(errors="replace")


SAVES = (3, 4, 6, 8, 9, 12)  # every 3 steps and at each phase end (BASE)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # six launches and a refused one; about 2 min per backend when idle
def test_killed_and_restarted_five_times_ends_like_the_uninterrupted_run(
    backend, reference, tmp_path
):
    """The "done when" kill tests, and reproduction 6, on one run restarted with the same
    command after each of five interruptions at seeded random points:

    - three SIGKILLs of ONE rank's worker while a checkpoint is being written (a random rank,
      a random delay of up to 0.4 s after the save's step is logged: before, during or after
      the shards, manifest and ``latest``), each at a random save point;
    - a SIGKILL of every process and a SIGTERM to the workers, each at a random step.
    While the first job runs, a second job on the same output_dir is refused, naming the
    holder; a restart after rank 0 was killed takes its stale lock over. In the end
    metrics.jsonl holds every step exactly once, every row equals the reference's, and so do
    the final weights."""
    rng = random.Random(15)
    events = ["kill_rank_in_save"] * 3 + ["sigkill", "sigterm"]
    rng.shuffle(events)
    out = tmp_path / "run"
    ck = out / "checkpoints"
    resumed, stale = 0, False
    for i, event in enumerate(events):
        proc = start(out, backend)
        if i == 0:  # a second job on the same output_dir, while the first one holds it
            _wait_for(proc, (out / LOCK).exists, "taking the lock")
            holder = json.loads((out / LOCK).read_text())
            first = workers(proc)
            for w in first:  # paused (alive): the second must meet it whatever the timing
                with contextlib.suppress(psutil.NoSuchProcess):  # a child already gone (zombie)
                    w.suspend()
            try:
                rc, refused = run(tmp_path / "second", backend, [f"output_dir={out}"])
            finally:
                for w in first:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        w.resume()
            assert rc != 0 and "is in use by another job" in refused, refused[-3000:]
            assert f"pid {holder['pid']}" in refused and holder["host"] in refused
        else:  # rows after the resumed step are from this job only once it says so
            _wait_for(proc, _log_has(out, "Resumed from"), "resuming")
        low = max(resumed, 3)  # the first interruption comes after the first checkpoint
        if event == "kill_rank_in_save":
            wait_for_step(proc, out, rng.choice([s for s in SAVES if low < s <= low + 5]))
            time.sleep(rng.uniform(0.0, 0.4))
            rank = rng.randrange(2)
            _signal_rank(proc, rank, signal.SIGKILL)
        else:
            wait_for_step(proc, out, rng.randint(low + 1, min(low + 3, 11)))
            rank = 0
            if event == "sigkill":
                kill_all(proc, signal.SIGKILL)
            else:
                for w in workers(proc):
                    w.send_signal(signal.SIGTERM)
        rc, log = finish(proc, out)
        assert (rc == 0) == (event == "sigterm"), log[-3000:]
        if stale:
            assert "taking over the stale lock" in log
        stale = event != "sigterm" and rank == 0
        resumed = int(latest(out)[5:])
        Path(f"{out}.log").unlink()
    rc, log = run(out, backend)
    assert rc == 0, log[-3000:]
    assert not stale or "taking over the stale lock" in log
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 13)), "each step once"
    assert_same_trajectory(out, rows(reference), after=0)
    final = model_state(ck, tag_for(12), backend)
    expect = model_state(reference / "checkpoints", tag_for(12), backend)
    assert final.keys() == expect.keys()
    assert all(torch.equal(final[k], expect[k]) for k in final)


def test_derived_rng_depends_on_seed_step_and_rank_only():
    """After a resume on another number of ranks each rank's generators are seeded from
    (seed, step, rank): the same triple draws the same numbers, another rank others."""
    import random as pyrandom

    import numpy as np

    from train.elastic import derive_rng

    def draw(seed: int, step: int, rank: int) -> tuple:
        derive_rng(seed, step, rank)
        return (torch.rand(3).tolist(), np.random.rand(3).tolist(), pyrandom.random())

    a = draw(1234, 8, 0)
    torch.rand(5)  # whatever was drawn in between does not matter
    assert draw(1234, 8, 0) == a
    assert all(draw(*other)[i] != a[i] for other in [(1234, 8, 1), (1234, 9, 0), (1, 8, 0)]
               for i in range(3))  # fmt: skip


@pytest.mark.slow
def test_zero2_l2_anchor_resumes_on_one_rank(tmp_path):
    """The ZeRO-1/2 path of migu_dist/deepspeed_reshard.py and the L2 anchor's resharding
    (train/elastic.py): a 2-rank ZeRO-2 run with the anchor on from phase 2, resumed on 1 rank
    mid-phase (step 6: the anchor, taken at the phase's first step, comes from the
    checkpoint). The penalty's distance from the anchor, a function of every anchor element,
    and the gradient norm that includes it follow the uninterrupted run (relative 1e-6; the
    losses within assert_resumed_like's tolerance)."""
    from tests.test_checkpoint import assert_resumed_like

    extra = ["engine.zero_stage=2", "regularization.kind=l2", "regularization.strength=0.5",
             "checkpoint.keep_last=10", "train.max_steps=8"]  # fmt: skip
    ref = tmp_path / "two"
    rc, log = run(ref, "deepspeed", extra)
    assert rc == 0, log[-3000:]
    one = tmp_path / "one"
    src = ref / "checkpoints" / tag_for(6)
    rc, log = run(one, "deepspeed", [*extra, f"resume={src}", "train.grad_accum=2"], nproc=1)
    assert rc == 0, log[-3000:]
    got, want = rows(one), rows(ref)
    assert_resumed_like(got, want, after=6)
    for step in (7, 8):
        for key in ("reg/l2_dist", "grad_norm"):
            assert math.isclose(got[step][key], want[step][key], rel_tol=1e-6), (step, key)
