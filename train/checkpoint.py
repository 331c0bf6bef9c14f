"""Step-numbered sharded checkpoints with a manifest and an atomic ``latest`` pointer.

Layout of ``<output_dir>/checkpoints/``::

    step_00000040/            the backend's shards (DeepSpeed: one file set per rank)
        trainer_state.json    step, phase, tokens, wandb id, world size (rank 0)
        rank_00000.pt ...     per-rank state: RNG of every generator, data-loader state
        manifest.json         every file with its size and CRC32C; written last
    latest                    "step_00000040", replaced atomically after every rank is done
    pinned                    tags kept forever (phase boundaries)
    history                   tags in the order they were written (or resumed from)

A checkpoint is complete only once its manifest exists and every file matches it, so a crash
or a full disk during a save leaves an incomplete directory that load skips (falling back to
the previous complete one) and the next save replaces.

Asynchronous saves (``checkpoint.async_save``): ``save`` returns once every rank holds a copy
of its state in host memory (the backend's ``snapshot``); a background thread writes the
files (checksummed on their way to the disk, ``migu_dist.durable``), fsyncs them and, once
every rank's thread is done, writes the manifest, ``latest``, ``pinned`` and ``history`` and
rotates, exactly as a synchronous save does. Until then the step directory has no manifest,
so a crash (SIGKILL, preemption) during the write leaves the previous checkpoint as
``latest`` and the run resumes from it. One save is in flight at a time: the next ``save``
(and ``wait``) first waits for the previous one. The background threads agree among
themselves on a process group of their own (gloo), so their collectives never interleave with
the training loop's.

Checksums are CRC32C (hardware-accelerated, the ``crc32c`` package); manifests of earlier
versions with zlib CRC32 (``"crc32"``) are still verified. A save takes the checksums of
the shards from their writers, which compute them as the bytes go to the disk; only the few
other files are read back. Verification on load is shared so that every rank checksums the
files it is about to read (its own shards: a rank's number is in their names) and the rest
round-robin. Before a resume the backend reads those same files meanwhile
(``Backend.prefetch``: DeepSpeed deserialises its files while they are checksummed, one read
of the disk); nothing is restored until every rank's checksums and reads have succeeded.

Test-only knob: the environment variable ``MIGU_CKPT_TEST_WRITE_DELAY_S`` delays the write of
every save by that many seconds (after the snapshot), to make a crash during an asynchronous
write deterministic in tests; never set it in a real run.

Rotation goes by recency of writing, not by step: after a resume from an earlier step the
checkpoints of the abandoned later steps are the oldest, and the checkpoint resumed from
counts as just written, so the newest checkpoints of the current timeline are never the ones
deleted.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import crc32c
import torch
import torch.distributed as dist

from migu_dist.backend import Backend
from migu_dist.dist import all_gather_objects, barrier, print0
from migu_dist.durable import write_durable

MANIFEST = "manifest.json"


WRITE_DELAY_ENV = "MIGU_CKPT_TEST_WRITE_DELAY_S"


def _checksum(path: Path, kind: str = "crc32c") -> int:
    """CRC32C (or, for manifests of earlier versions, zlib's CRC32) of a file, read in 16 MB
    chunks (crc32c releases the GIL on them: a background thread does not stall the loop)."""
    update = crc32c.crc32c if kind == "crc32c" else zlib.crc32
    crc = 0
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(1 << 24):
            crc = update(chunk, crc)
    return crc


_RANK_IN_NAME = re.compile(r"(?:pp_rank_|^__|^rank_)(\d+)")


def _owners(rels: list[str], world: int) -> dict[str, int]:
    """Which rank checksums which file: a file with a rank number in its name (DeepSpeed's
    ``zero_pp_rank_R_*``, DCP's ``__R_0.distcp``, our ``rank_R.pt``) goes to that rank (modulo
    the current world size, so any number of ranks covers every file), the rest round-robin.
    At load, a rank so verifies what it is about to read."""
    out, rest = {}, []
    for rel in sorted(rels):
        m = _RANK_IN_NAME.search(Path(rel).name)
        if m:
            out[rel] = int(m.group(1)) % world
        else:
            rest.append(rel)
    out.update({rel: i % world for i, rel in enumerate(rest)})
    return out


def _free(path: Path) -> str:
    try:
        return f" ({shutil.disk_usage(path).free / 2**20:.0f} MB free on {path})"
    except OSError:
        return ""


def _check_file(p: Path, rel: str, meta: dict[str, int]) -> str | None:
    """None if ``p`` has the manifest's size and checksum, else what is wrong."""
    try:
        size = p.stat().st_size
        if size != meta["size"]:
            return f"{rel}: size {size} != {meta['size']} (truncated?)"
        kind = "crc32c" if "crc32c" in meta else "crc32"  # "crc32": written before CRC32C
        if _checksum(p, kind) != meta[kind]:
            return f"{rel}: checksum mismatch (corrupt)"
    except FileNotFoundError:
        return f"missing file {rel}"
    except OSError as e:
        return f"{rel}: unreadable ({e})"
    return None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _safe_globals() -> list[Any]:
    """The types in ``rank_*.pt`` besides plain data and tensors, allowed to
    ``torch.load(weights_only=True)``: NumPy's RNG state (a uint32 ndarray)."""
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core  # NumPy 2 / 1
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_rank_state(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A ``rank_*.pt`` file: plain data, tensors and the allowed NumPy types only. A file that
    would run code on loading is refused (``pickle.UnpicklingError``). ``mmap``: tensors are
    read from disk only where touched."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, weights_only=True, mmap=mmap)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointError(RuntimeError):
    pass


ShardWriter = Callable[[Any], dict[str, dict[str, int]]]
"""What a backend's ``snapshot`` returns: writes this rank's shards when called with the
process group to use for the write's own collectives (None: the default group), and returns
each file it wrote with its size and CRC32C."""


class Checkpointer:
    """Save, validate, rotate and load checkpoints of a run."""

    def __init__(
        self,
        root: str | Path,
        backend: Backend | None = None,
        keep_last: int = 2,
        async_save: bool = False,
    ):
        """``backend`` None: a single-process reader (find/verify only, e.g. for export).
        ``async_save``: ``save`` returns after the copy to host memory (see the module doc)."""
        self.root = Path(root)
        self.backend = backend
        self.keep_last = keep_last
        self.async_save = async_save
        self.rank = backend.rank if backend is not None else 0
        self.world = backend.world_size if backend is not None else 1
        self._thread: threading.Thread | None = None
        self._result = True  # of the last save written in the background
        self._error: Exception | None = None  # a writer's unexpected exception, for ``wait``
        self._pg: Any = None
        self._prefetched: tuple[str, Any] | None = None  # (tag, what the backend read)

    # ---------------------------------------------------------------- save

    def save(
        self, step: int, trainer_state: dict[str, Any], rank_state: dict[str, Any], pinned: bool
    ) -> bool:
        """Collective. Returns False (and keeps every earlier checkpoint) if the save failed.
        Asynchronous: True once the write has started; its outcome comes from ``wait()``.

        Every rank runs the same sequence of collectives whatever fails where: an I/O error
        (full disk, quota, read-only mount) is caught per rank, the ranks agree on the outcome,
        and a failed attempt's directory is removed. The backend's shard writer must complete
        its collectives even when its writes fail (see ``Backend.snapshot``).
        """
        self.wait()  # one save in flight at a time; a failure was reported when it happened
        tag = tag_for(step)
        d = self.root / tag
        ok = True
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if d.exists():  # an earlier, incomplete (or damaged) attempt at this step
                    shutil.rmtree(d)
            except OSError as e:
                print(f"checkpoint {tag}: cannot prepare {d}: {e}", flush=True)
                ok = False
        ok = all(all_gather_objects(ok))
        if ok:
            try:
                assert self.backend is not None, "a Checkpointer without a backend only reads"
                # The step loop waits only for this: the shards copied to host memory (when
                # asynchronous) and the small per-rank and trainer state serialised.
                write = self.backend.snapshot(
                    str(self.root), tag, client_state={}, copy=self.async_save
                )
                buf = io.BytesIO()
                torch.save(rank_state, buf)
                state = json.dumps(dict(trainer_state, world_size=self.world, tag=tag), indent=1)
            except (OSError, RuntimeError) as e:
                print(
                    f"[rank {self.rank}] checkpoint {tag} failed: {e}{_free(self.root)}", flush=True
                )
                ok = False
            ok = all(all_gather_objects(ok))
        if not ok:
            self._give_up(tag, d, None)
            return False
        job = (d, tag, write, buf.getbuffer(), state, pinned)
        if not self.async_save:
            ok = self._write(*job, group=None)
            return self.wait() and ok  # wait(): raises a writer's unexpected exception
        group = self._group()
        self._thread = threading.Thread(
            target=lambda: setattr(self, "_result", self._write(*job, group=group)),
            name=f"checkpoint-{tag}",
            daemon=True,  # a crashing run must not hang in a half-done save; SIGKILL-safe anyway
        )
        self._thread.start()
        return True

    def wait(self) -> bool:
        """Block until the save in flight (if any) is complete; whether it succeeded (True
        when there was none). Collective in effect: every rank's writer takes part."""
        ok = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            ok, self._result = self._result, True
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return ok

    def _group(self) -> Any:
        """The background writers' own process group (gloo: they gather Python objects and
        their collectives must not interleave with the training loop's on the default group)."""
        if self._pg is None and dist.is_initialized():
            self._pg = dist.new_group(backend="gloo")
        return self._pg

    def _write(
        self,
        d: Path,
        tag: str,
        write: ShardWriter,
        rank_bytes: memoryview,
        state_json: str,
        pinned: bool,
        group: Any,
    ) -> bool:
        """The files, the manifest and ``latest``; in the background when asynchronous."""
        ok = True
        written: dict[str, dict[str, int]] = {}  # file: size and CRC32C, as written
        try:
            delay = float(os.environ.get(WRITE_DELAY_ENV, "0"))
            if delay:
                time.sleep(delay)
            written.update(write(group))
            rank_file = d / f"rank_{self.rank:05d}.pt"
            written[str(rank_file)] = write_durable(rank_file, rank_bytes)
            if self.rank == 0:
                _atomic_write(d / "trainer_state.json", state_json)
        except (OSError, RuntimeError) as e:
            # torch.save reports a full disk as a RuntimeError ("unexpected pos").
            print(f"[rank {self.rank}] checkpoint {tag} failed: {e}{_free(self.root)}", flush=True)
            ok = False
        except Exception as e:  # a bug: agree and clean up first, then raise it (``wait``)
            self._error = e
            ok = False
        ok = all(all_gather_objects(ok, group))
        if ok:
            ok = self._write_manifest(d, written, group)
        if not ok:
            self._give_up(tag, d, group)
            return False
        if self.rank == 0:
            try:
                if pinned:
                    pins = self.pinned() | {tag}
                    _atomic_write(self.root / "pinned", "\n".join(sorted(pins)) + "\n")
                self.adopt(tag)
                self._rotate(keep=tag)
            except OSError as e:  # the checkpoint itself is complete; load finds it anyway
                print(f"checkpoint {tag}: updating latest/pinned failed: {e}", flush=True)
        barrier(group)
        return True

    def _give_up(self, tag: str, d: Path, group: Any) -> None:
        if self.rank == 0:
            shutil.rmtree(d, ignore_errors=True)
            print(
                f"WARNING: checkpoint {tag} was not saved; earlier checkpoints are intact "
                f"(latest: {self.latest_tag()}).",
                flush=True,
            )
        barrier(group)

    def latest_tag(self) -> str | None:
        """What ``latest`` points to (not verified), or None."""
        p = self.root / "latest"
        return p.read_text().strip() if p.is_file() else None

    def _write_manifest(
        self, d: Path, written: dict[str, dict[str, int]], group: Any = None
    ) -> bool:
        # The writers checksummed the shards as they wrote them (``written``, each rank its
        # own); the few other files (DCP's .metadata, trainer_state.json) are read back and
        # checksummed, shared round-robin. Rank 0 writes the manifest.
        barrier(group)
        mine = {str(Path(p).relative_to(d)): meta for p, meta in written.items()}
        known = {rel for part in all_gather_objects(sorted(mine), group) for rel in part}
        files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
        owner = _owners([f for f in files if f != MANIFEST and f not in known], self.world)
        try:
            for rel, r in owner.items():
                if r == self.rank:
                    p = d / rel
                    mine[rel] = {"size": p.stat().st_size, "crc32c": _checksum(p)}
        except OSError:
            mine = None  # type: ignore[assignment]  # "this rank failed", gathered below
        parts = all_gather_objects(mine, group)
        if any(p is None for p in parts):
            return False
        ok = True
        if self.rank == 0:
            entries: dict[str, Any] = {}
            for part in parts:
                entries.update(part)
            try:
                _atomic_write(d / MANIFEST, json.dumps({"files": entries}, indent=1))
            except OSError as e:
                print(f"checkpoint manifest failed: {e}", flush=True)
                ok = False
        return all(all_gather_objects(ok, group))

    def pinned(self) -> set[str]:
        p = self.root / "pinned"
        return set(p.read_text().split()) if p.exists() else set()

    def adopt(self, tag: str) -> None:
        """Rank 0: make ``tag`` the newest checkpoint (``latest`` and the end of ``history``),
        after writing it or resuming from it."""
        history = [t for t in self.history() if t != tag and (self.root / t).is_dir()]
        _atomic_write(self.root / "history", "".join(f"{t}\n" for t in [*history, tag]))
        _atomic_write(self.root / "latest", tag)

    def history(self) -> list[str]:
        """Tags in the order they were written or resumed from, oldest first."""
        p = self.root / "history"
        return p.read_text().split() if p.is_file() else []

    def by_recency(self) -> list[str]:
        """Complete tags, least recently written first (tags missing from ``history``, from
        runs before it existed, count as oldest, in step order)."""
        complete = self.complete_tags()
        written = [t for t in self.history() if t in complete]
        return [t for t in complete if t not in written] + written

    def _rotate(self, keep: str) -> None:
        """Delete unpinned checkpoints beyond keep_last, least recently written first (never
        ``keep``, the one just written), and leftovers of failed saves."""
        pins = self.pinned()
        tags = [t for t in self.by_recency() if t not in pins and t != keep]
        room = self.keep_last - (keep not in pins)  # an unpinned ``keep`` is one of keep_last
        for old in tags[: max(0, len(tags) - room)]:
            shutil.rmtree(self.root / old, ignore_errors=True)
        complete = set(self.complete_tags())
        for p in self.root.glob("step_*"):
            # A directory without manifest older than the checkpoint just written is what a
            # crash or a full disk left behind: never loadable, only taking space.
            if p.is_dir() and p.name < keep and p.name not in complete:
                shutil.rmtree(p, ignore_errors=True)

    # ---------------------------------------------------------------- validate & load

    def complete_tags(self) -> list[str]:
        """Tags that have a manifest, oldest first (not yet checksummed)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.glob("step_*") if (p / MANIFEST).is_file() and p.is_dir()
        )

    @staticmethod
    def verify(d: Path) -> str | None:
        """None if every file of the checkpoint matches its manifest, else the problem."""
        try:
            manifest = json.loads((d / MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError) as e:
            return f"unreadable manifest ({e})"
        for rel, meta in manifest.items():
            problem = _check_file(d / rel, rel, meta)
            if problem:
                return problem
        return None

    def verify_collective(self, d: Path, prefetch: bool = False) -> str | None:
        """``verify`` with the checksumming shared among the ranks: each checksums the files it
        is about to load (its own shards), the rest round-robin. Collective; every rank gets
        the same answer.

        ``prefetch``: meanwhile, the backend reads what its load of ``d`` will read
        (``Backend.prefetch``; the same files, so the disk is read once), kept for
        ``load`` when ``d`` verifies."""
        self._prefetched = None
        try:
            manifest = json.loads((d / MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError) as e:
            problem: str | None = f"unreadable manifest ({e})"
        else:

            def my_share() -> str | None:
                for rel, r in _owners(list(manifest), self.world).items():
                    if r == self.rank:
                        problem = _check_file(d / rel, rel, manifest[rel])
                        if problem:
                            return problem
                return None

            if prefetch and self.backend is not None:
                with ThreadPoolExecutor(1, thread_name_prefix="verify") as pool:
                    checked = pool.submit(my_share)  # reads and CRCs release the GIL
                    fetched, problem = self.backend.prefetch(str(d.parent), d.name)
                    problem = checked.result() or problem
            else:
                fetched, problem = None, my_share()
        problems = [p for p in all_gather_objects(problem) if p]
        if problems:
            return problems[0]
        if prefetch:
            self._prefetched = (d.name, fetched)
        return None

    def find_latest_good(self, prefetch: bool = False) -> str | None:
        """The newest checkpoint that verifies, starting from ``latest``; warns on fallback.

        Collective: the ranks share the checksumming and agree on the tag. ``prefetch``: the
        caller will ``load`` the tag found, so the backend reads it while it is checksummed
        (``verify_collective``)."""
        candidates = self.complete_tags()
        pointed = self.latest_tag()
        if pointed is not None:
            if pointed not in candidates:
                print0(
                    f"WARNING: latest points to {pointed}, which is missing or incomplete (no "
                    f"{MANIFEST}); looking for an earlier complete checkpoint.",
                    rank=self.rank,
                )
            candidates = [t for t in candidates if t <= pointed]
        for tag in reversed(candidates):
            problem = self.verify_collective(self.root / tag, prefetch)
            if problem is None:
                return tag
            print0(
                f"WARNING: checkpoint {self.root / tag} is damaged ({problem}); falling back "
                "to the previous complete checkpoint.",
                rank=self.rank,
            )
        return None

    def load(self, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore the backend and return (trainer_state, this rank's state). Collective.

        A checkpoint written by another number of ranks is resharded (``train/elastic.py``);
        its ``rng`` is then None, for the caller to derive from seed, step and rank."""
        d = self.root / tag
        state = json.loads((d / "trainer_state.json").read_text())
        assert self.backend is not None, "a Checkpointer without a backend only reads"
        prefetched, self._prefetched = self._prefetched, None
        self.backend.load(
            str(self.root), tag, prefetched[1] if prefetched and prefetched[0] == tag else None
        )
        if state["world_size"] != self.world:
            from train.elastic import load_rank_state

            return state, load_rank_state(d, state["world_size"], self.backend)
        rank_state = read_rank_state(d / f"rank_{self.rank:05d}.pt")
        return state, rank_state
