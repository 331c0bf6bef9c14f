"""Guards around resuming a run: one writer per output_dir, never a silent fresh start, and
what a resumed run may change.

- :class:`RunLock`: an advisory lock file ``<output_dir>/.lock`` (host, pid, start time) that
  rank 0 takes before anything is written, so that a second job on the same run is refused.
- :func:`claim_output_dir`: the lock plus the ``resume: never`` / ``resume: fresh`` rules.
- :func:`resume_source`: which checkpoint to resume from; refuses rather than starting from
  step 0 when the directory shows earlier work that cannot be resumed.
- :func:`prepare_resume`: all of the above, in the order ``build_trainer`` needs.
- :func:`check_changes`: the resolved config and a cheap data fingerprint are recorded with
  every checkpoint; at resume each difference is safe, taken only when named in
  ``resume_overrides``, or refused.

Every decision is made on rank 0 and shared (:func:`agree`), so all ranks stop together with
the same message.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import json
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from migu_dist.dist import all_gather_objects
from train.checkpoint import Checkpointer
from train.config import Config
from train.elastic import batch_settings

LOCK = ".lock"
HEARTBEAT_S = 30.0
"""Rank 0 touches the lock this often; a holder on another host whose lock did not move for
2.5 heartbeats is taken to be gone (a shared filesystem cannot tell us whether a remote pid
lives)."""
FINGERPRINT_BLOCK = 1 << 16
"""Bytes hashed at the head and at the tail of every training file (cheap at TB scale)."""


class ResumeError(RuntimeError):
    """The run cannot start as asked; the message names what was found and the ways on."""


def agree(problem: str | None) -> None:
    """Collective: raise :class:`ResumeError` on every rank if rank 0 found a problem."""
    first = all_gather_objects(problem)[0]
    if first:
        raise ResumeError(first)


def ways_on(out: Path) -> str:
    return (
        f"Either resume from a checkpoint you choose (resume=<output_dir>/checkpoints/"
        f"step_XXXXXXXX, e.g. one of an earlier copy), or start over on purpose with "
        f"resume=fresh, which moves everything now in {out} into {out}/old-<timestamp>/."
    )


# ------------------------------------------------------------------------------ the lock


@dataclass
class RunLock:
    """``<output_dir>/.lock``: created with O_EXCL, holds ``{"host", "pid", "pid_start",
    "started"}``, touched every :data:`HEARTBEAT_S` s by a daemon thread, removed on exit.

    A lock whose holder is gone is taken over with a warning: on the same host when the pid
    no longer runs (or runs a different process); from another host when the lock's mtime
    did not move for 2.5 heartbeats (we wait that long once, at start-up)."""

    path: Path
    heartbeat_s: float = HEARTBEAT_S
    _stop: threading.Event = field(default_factory=threading.Event)
    _held: bool = False

    def acquire(self) -> str | None:
        """Take the lock; None on success, else why not (naming the holder)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = _me()
        for _ in range(3):  # a takeover raced with another job: look again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_json(self.path)
                why = self._stale(holder)
                if why is None:
                    return (
                        f"{self.path.parent} is in use by another job: {_describe(holder)}. "
                        "Two jobs writing one run would interleave its checkpoints and logs. "
                        f"Wait for it to end; if you are sure it is gone, delete {self.path}."
                    )
                print(
                    f"WARNING: taking over the stale lock {self.path} ({_describe(holder)}): "
                    f"{why}.",
                    flush=True,
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
                f.flush()
                os.fsync(f.fileno())
            self._held = True
            atexit.register(self.release)  # any exit but SIGKILL; that one leaves a stale lock
            threading.Thread(target=self._beat, daemon=True, name="run-lock").start()
            return None
        return f"could not take {self.path}: other jobs keep replacing it."

    def _stale(self, holder: dict[str, Any] | None) -> str | None:
        """Why the holder is gone, or None if it may still run."""
        if holder is None:
            return "the lock file is unreadable (a crash while writing it)"
        if holder.get("host") == socket.gethostname():
            pid = int(holder.get("pid", -1))
            try:
                if abs(psutil.Process(pid).create_time() - holder.get("pid_start", 0)) < 1:
                    return None
                return f"pid {pid} is now a different process"
            except psutil.NoSuchProcess:
                return f"pid {pid} no longer runs"
        wait = 2.5 * self.heartbeat_s
        print(
            f"Lock {self.path} is held from another host ({_describe(holder)}); watching its "
            f"heartbeat for {wait:.0f} s.",
            flush=True,
        )
        before = _mtime(self.path)
        time.sleep(wait)
        if before is not None and _mtime(self.path) == before:
            return f"its heartbeat stopped (not touched for {wait:.0f} s)"
        return None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            # A filesystem hiccup must not kill training; the next beat retries.
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        if not self._held:
            return
        self._held = False
        self._stop.set()
        holder = _read_json(self.path)
        if holder is not None and (holder.get("host"), holder.get("pid")) == (
            socket.gethostname(),
            os.getpid(),
        ):
            self.path.unlink(missing_ok=True)


def _me() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": psutil.Process().create_time(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "job": os.environ.get("SLURM_JOB_ID"),
    }


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "holder unknown"
    job = f", SLURM job {holder['job']}" if holder.get("job") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {holder.get('started')}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


# ------------------------------------------------------------------------------ output_dir


def earlier_work(out: Path) -> list[str]:
    """What in ``out`` shows an earlier run (checkpoint directories, logged metrics)."""
    found = []
    ck = out / "checkpoints"
    tags = sorted(p.name for p in ck.glob("step_*")) if ck.is_dir() else []
    if tags:
        found.append(f"{len(tags)} checkpoint director{'y' if len(tags) == 1 else 'ies'} "
                     f"({', '.join(tags)})")  # fmt: skip
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(f"{metrics} ({len(metrics.read_bytes().splitlines())} rows)")
    return found


def claim_output_dir(cfg: Config, rank: int) -> RunLock | None:
    """Collective. Rank 0 checks ``resume: never`` (touching nothing), takes the lock, and
    with ``resume: fresh`` moves an earlier run aside. Returns rank 0's lock."""
    out = Path(cfg.output_dir)
    lock = None
    problem = None
    if rank == 0:
        found = earlier_work(out)
        if cfg.resume == "never" and found:
            problem = (
                f"resume=never, but {out} holds an earlier run: {'; '.join(found)}. Nothing was "
                f"touched. Use resume=auto to continue it, or a new output_dir. " + ways_on(out)
            )
        else:
            lock = RunLock(out / LOCK)
            problem = lock.acquire()
            if problem is None and cfg.resume == "fresh" and found:
                aside = _move_aside(out)
                print(f"resume=fresh: moved the earlier run ({'; '.join(found)}) to {aside}")
    agree(problem)
    return lock


def _move_aside(out: Path) -> Path:
    """Every entry of ``out`` but the lock (and earlier ``old-*`` folders) into
    ``out/old-<UTC timestamp>/``."""
    aside = out / time.strftime("old-%Y%m%dT%H%M%SZ", time.gmtime())
    aside.mkdir()
    for p in out.iterdir():
        if p.name != LOCK and not p.name.startswith("old-"):
            shutil.move(str(p), aside / p.name)
    return aside


def resume_source(cfg: Config, ckpt: Checkpointer) -> tuple[Checkpointer, str] | None:
    """(checkpointer, tag) to resume from per ``resume``, or None to start at step 0.

    Collective. ``auto`` falls back past damaged checkpoints to the newest one that verifies,
    but refuses (rather than starting over) when ``latest`` names a checkpoint that is not
    there, when no checkpoint verifies, or when metrics were logged but no checkpoint exists.
    """
    out = Path(cfg.output_dir)
    if cfg.resume in ("never", "fresh"):
        return None  # claim_output_dir made sure there is no earlier run
    if cfg.resume != "auto":
        path = Path(cfg.resume).resolve()
        source = Checkpointer(path.parent, ckpt.backend)
        # The ranks share the checksumming, while the backend reads what it will load.
        problem = source.verify_collective(path, prefetch=True)
        if problem:
            raise ResumeError(f"resume={cfg.resume}: checkpoint is damaged ({problem}).")
        return source, path.name
    complete = ckpt.complete_tags()
    pointed = ckpt.latest_tag()
    problem = None
    if pointed is not None and pointed not in complete:
        problem = (
            f"{ckpt.root}/latest names {pointed}, which is "
            f"{'incomplete (no manifest)' if (ckpt.root / pointed).is_dir() else 'not there'} "
            f"(a shared filesystem hiccup, or a node-local disk?). Complete checkpoints: "
            f"{', '.join(complete) or 'none'}. " + ways_on(out)
        )
    agree(problem)
    tag = ckpt.find_latest_good(prefetch=True)  # the backend reads it meanwhile
    if tag is None:
        found = earlier_work(out)
        if found:
            agree(
                f"resume=auto, but no checkpoint in {ckpt.root} verifies, while {out} holds an "
                f"earlier run: {'; '.join(found)}. Starting from step 0 would silently redo "
                "(and log twice) work already done. " + ways_on(out)
            )
    return (ckpt, tag) if tag else None


def prepare_resume(
    cfg: Config, ckpt: Checkpointer
) -> tuple[RunLock | None, tuple[Checkpointer, str] | None, dict[str, Any]]:
    """Collective, before anything is written: claim ``output_dir``, pick the checkpoint to
    resume from and check what changed since it was written. Returns rank 0's lock, the
    source (or None: step 0) and the record every checkpoint of this run keeps (the resolved
    config and, from rank 0, the data fingerprint). Raises :class:`ResumeError`."""
    rank = ckpt.rank
    lock = claim_output_dir(cfg, rank)
    source = resume_source(cfg, ckpt)
    record = {
        "config": cfg.to_dict(),
        "data_fingerprint": data_fingerprint(cfg) if rank == 0 else None,
    }
    if source is not None:
        changes = None
        where = source[0].root / source[1]
        if rank == 0:
            saved = json.loads((where / "trainer_state.json").read_text())
            changes = check_changes(saved, cfg, ckpt.world, record["data_fingerprint"])
        agree(changes.problem(where) if changes else None)
        for what, lines in (
            (("safe change", changes.safe), ("override", changes.taken)) if changes else ()
        ):
            for line in lines:
                print(f"resume: taking {what} {line}", flush=True)
    return lock, source, record


# ------------------------------------------------------------------------------ fingerprint


def data_fingerprint(cfg: Config) -> dict[str, list[dict[str, Any]]]:
    """Per training domain, every file (in reading order) with its size and a hash of its
    first and last :data:`FINGERPRINT_BLOCK` bytes. A token store is one entry: its token
    count and ``store_id`` (a hash over its shards' checksums); a ``datasets`` directory is
    its data files."""
    from train.data.loader import expand_globs
    from train.data.store import source_signature

    out: dict[str, list[dict[str, Any]]] = {}
    for name, dom in cfg.data.domains.items():
        if dom.store:
            from train.data.store import read_manifest

            m = read_manifest(dom.store)
            out[name] = [{"path": dom.store, "size": m["num_tokens"], "head_tail": m["store_id"]}]
            continue
        if dom.dataset:
            paths = sorted(str(p) for p in Path(dom.dataset).glob("*.*") if p.is_file())
        else:
            paths = expand_globs(dom.train)
        files = []
        for path in paths:
            files.append({"path": path, **source_signature(path, FINGERPRINT_BLOCK)})
        out[name] = files
    return out


# ------------------------------------------------------------------------------ changes

_SOURCES = (".train", ".store", ".dataset")
_ADDED_UNSET = (".store", ".dataset", ".heldout_store")
"""Domain keys added after checkpoints were first written; None means what their absence did."""
"""A domain's data keys: where the data lives may change (a store copied to s3://), what it
holds may not, which the data fingerprint decides."""

NOT_COMPARED = ("output_dir", "resume", "resume_overrides")
"""Where and how this job runs, not what the run is (a run directory may move)."""
SAFE = (
    "logging", "eval", "checkpoint",
    "engine.dist_timeout_minutes", "data.num_workers", "model.activation_checkpointing",
    "model.compile", "model.attn_implementation", "train.nonfinite_loss",
    "train.max_skipped_steps",
)  # fmt: skip
"""Keys that never change what the run computes (or only how fast / how often it reports)."""
OVERRIDABLE = (
    "optim", "migu", "regularization", "lora.alpha", "lora.dropout", "engine.precision",
    "engine.deepspeed_config", "model.init_from", "train.micro_batch_size",
    "train.grad_accum", "train.global_batch_size", "data.document_position_ids",
    "data.cross_document_attention",
)  # fmt: skip
"""Keys a resumed run takes only when named in ``resume_overrides`` (the trajectory changes
from the resumed step on); everything else not SAFE is refused."""
ADDED = {"data.cross_document_attention": True}
"""Keys added since runs were first recorded -> the value that does what a run recorded
without the key did (compared as that value, not as unset)."""


@dataclass
class Changes:
    """Differences between a checkpoint's recorded run and this config, by class."""

    safe: list[str] = field(default_factory=list)
    taken: list[str] = field(default_factory=list)
    need_override: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def problem(self, checkpoint: Path) -> str | None:
        """The refusal message, or None when the resume may go on."""
        text = ""
        if self.refused:
            text += (
                "\n  Refused (they change work already done, or the shape of what was saved):\n"
                + "".join(f"    {c}\n" for c in self.refused)
                + "  Revert them, or start a new run from these weights: python "
                f"launch/export_hf.py --checkpoint {checkpoint} --out DIR, then "
                "model.init_from=DIR with a new output_dir (or resume=fresh)."
            )
        if self.need_override:
            keys = sorted({c.split(":", 1)[0] for c in self.need_override})
            text += (
                "\n  Taken only when asked for (they change the training from here on):\n"
                + "".join(f"    {c}\n" for c in self.need_override)
                + f"  To take them add resume_overrides=[{','.join(keys)}]; or revert them."
            )
        if not text:
            return None
        return f"resume from {checkpoint}: the config differs from the run it continues." + text


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def _under(key: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def check_changes(
    saved: dict[str, Any], cfg: Config, world: int, fingerprint: dict[str, Any] | None
) -> Changes:
    """Classify every difference between a checkpoint's ``trainer_state.json`` (``saved``:
    its ``config``, ``data_fingerprint`` and ``train`` state) and ``cfg``."""
    ch = Changes()
    if saved.get("config") is None:  # written before configs were recorded: nothing to compare
        return ch
    old_cfg = copy.deepcopy(saved["config"])
    train = saved["train"]
    step = train["step"]
    touched = set(train["finished_phases"]) | {p for p, n in train["tokens_by_phase"].items() if n}
    consumed = {d for d, n in train["tokens_by_domain"].items() if n}
    new_cfg = cfg.to_dict()
    compare_data = fingerprint is not None and saved.get("data_fingerprint") is not None
    old_phases, new_phases = old_cfg["data"].pop("phases"), new_cfg["data"].pop("phases")
    old, new = _flat(old_cfg), _flat(new_cfg)

    def add(key: str, what: str) -> None:
        line = f"{key}: {what}"
        held_out = key.startswith("data.domains.") and key.endswith((".heldout", ".heldout_store"))
        if _under(key, SAFE) or held_out:
            ch.safe.append(line)
        elif _under(key, OVERRIDABLE) or key == "train.max_steps":
            (ch.taken if _under(key, cfg.resume_overrides) else ch.need_override).append(line)
        else:
            ch.refused.append(line)

    tr, old_tr = new_cfg["train"], old_cfg["train"]
    rows, old_rows = (t["micro_batch_size"] * t["grad_accum"] for t in (tr, old_tr))
    old_world = saved.get("world_size", world)
    batch, old_batch = rows * world, old_rows * old_world
    if batch != old_batch:
        ch.refused.append(
            f"global batch: {old_batch} sequences per step ({old_tr['micro_batch_size']} x "
            f"{old_tr['grad_accum']} x {old_world} ranks) -> {batch} ({tr['micro_batch_size']} x "
            f"{tr['grad_accum']} x {world} ranks); the sequence of global batches (the data "
            f"position) is tied to it. To keep it, "
            + batch_settings(old_batch, world, old_tr["micro_batch_size"])
        )
    elastic = world != old_world and batch == old_batch
    if elastic:
        ch.safe.append(
            f"world size: {old_world} -> {world} ranks (global batch {batch} kept; the shards "
            "are resharded and each rank's RNG is derived from seed, step and rank)"
        )
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, ADDED.get(key, "<unset>")), new.get(key, "<unset>")
        if a == b or _under(key, NOT_COMPARED):
            continue
        if a == "<unset>" and b is None and key.endswith(_ADDED_UNSET):
            continue  # a key added since the checkpoint, at its default: the same data
        if batch != old_batch and key in ("train.micro_batch_size", "train.grad_accum"):
            continue  # refused above as one change
        if elastic and key in ("train.micro_batch_size", "train.grad_accum"):
            ch.safe.append(f"{key}: {a!r} -> {b!r} (the same global batch on {world} ranks)")
            continue
        what = f"{a!r} -> {b!r}"
        if key == "train.max_steps" and isinstance(b, int) and b >= a:
            ch.safe.append(f"{key}: {what} (extended)")
        elif key == "train.max_steps" and isinstance(b, int) and b <= step:
            ch.refused.append(f"{key}: {what}, but the checkpoint is at step {step}")
        elif key.startswith("data.domains.") and key.split(".")[2] not in consumed:
            ch.safe.append(f"{key}: {what} (domain not read yet)")
        elif key.startswith("data.domains.") and key.endswith(_SOURCES) and compare_data:
            ch.safe.append(f"{key}: {what} (the data is compared by content below)")
        else:
            add(key, what)
    _check_phases(ch, old_phases, new_phases, touched)
    if compare_data:
        assert fingerprint is not None
        _check_data(ch, saved["data_fingerprint"], fingerprint, consumed)
    return ch


def _check_phases(ch: Changes, old: list[dict], new: list[dict], touched: set[str]) -> None:
    """Phases already (partly) trained must stay as they were; later ones may change."""
    for i, ph in enumerate(old):
        if ph["name"] not in touched:
            continue
        if i >= len(new):
            ch.refused.append(f"data.phases[{i}] ({ph['name']}): removed, but already trained")
            continue
        for k in sorted(ph.keys() | new[i].keys()):
            if ph.get(k) != new[i].get(k):
                ch.refused.append(
                    f"data.phases[{i}].{k}: {ph.get(k)!r} -> {new[i].get(k)!r} (phase "
                    f"{ph['name']!r} is already trained)"
                )
    if len(new) > len(old):
        ch.safe.append(f"data.phases: {len(new) - len(old)} phase(s) added after the last")


def _check_data(ch: Changes, old: dict, new: dict, consumed: set[str]) -> None:
    """Files of domains already read must hold the same bytes in the same reading order;
    they may have moved."""
    for domain in sorted(consumed & old.keys()):
        a, b = old[domain], new.get(domain, [])
        key = f"data.domains.{domain}.train"
        if len(a) != len(b):
            ch.refused.append(
                f"{key}: {len(a)} -> {len(b)} files under a run that already read this domain "
                f"({[f['path'] for f in a]} -> {[f['path'] for f in b]})"
            )
            continue
        moved = []
        for x, y in zip(a, b, strict=True):
            if (x["size"], x["head_tail"]) != (y["size"], y["head_tail"]):
                how = f"size {x['size']} -> {y['size']}" if x["size"] != y["size"] else "content"
                ch.refused.append(
                    f"{key}: {y['path']} changed ({how}; recorded as {x['path']}) under a run "
                    "that already read it: the saved read position no longer points at the "
                    "same data"
                )
            elif x["path"] != y["path"]:
                moved.append(f"{x['path']} -> {y['path']}")
        if moved:
            ch.safe.append(f"{key}: same files at new paths ({'; '.join(moved)})")
