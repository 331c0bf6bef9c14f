"""Step-numbered sharded checkpoints with a manifest and an atomic ``latest`` pointer.

Layout of ``<output_dir>/checkpoints/``::

    step_00000040/            the backend's shards (DeepSpeed: one file set per rank)
        trainer_state.json    step, phase, tokens, wandb id, world size (rank 0)
        rank_00000.pt ...     per-rank state: RNG of every generator, data-loader state
        manifest.json         every file with its size and CRC32; written last
    latest                    "step_00000040", replaced atomically after every rank is done
    pinned                    tags kept forever (phase boundaries)
    history                   tags in the order they were written (or resumed from)

A checkpoint is complete only once its manifest exists and every file matches it, so a crash
or a full disk during a save leaves an incomplete directory that load skips (falling back to
the previous complete one) and the next save replaces.

Rotation goes by recency of writing, not by step: after a resume from an earlier step the
checkpoints of the abandoned later steps are the oldest, and the checkpoint resumed from
counts as just written, so the newest checkpoints of the current timeline are never the ones
deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from migu_dist.backend import Backend

MANIFEST = "manifest.json"


def _all_gather_objects(obj: Any) -> list[Any]:
    if dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _free(path: Path) -> str:
    try:
        return f" ({shutil.disk_usage(path).free / 2**20:.0f} MB free on {path})"
    except OSError:
        return ""


def _check_file(p: Path, rel: str, meta: dict[str, int]) -> str | None:
    """None if ``p`` has the manifest's size and CRC32, else what is wrong."""
    try:
        size = p.stat().st_size
        if size != meta["size"]:
            return f"{rel}: size {size} != {meta['size']} (truncated?)"
        if _crc32(p) != meta["crc32"]:
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


class Checkpointer:
    """Save, validate, rotate and load checkpoints of a run."""

    def __init__(self, root: str | Path, backend: Backend | None = None, keep_last: int = 2):
        """``backend`` None: a single-process reader (find/verify only, e.g. for export)."""
        self.root = Path(root)
        self.backend = backend
        self.keep_last = keep_last
        self.rank = backend.rank if backend is not None else 0
        self.world = backend.world_size if backend is not None else 1

    # ---------------------------------------------------------------- save

    def save(
        self, step: int, trainer_state: dict[str, Any], rank_state: dict[str, Any], pinned: bool
    ) -> bool:
        """Collective. Returns False (and keeps every earlier checkpoint) if the save failed.

        Every rank runs the same sequence of collectives whatever fails where: an I/O error
        (full disk, quota, read-only mount) is caught per rank, the ranks agree on the outcome,
        and a failed attempt's directory is removed. The backend's own save must complete its
        collectives even when its writes fail (see ``Backend.save``).
        """
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
        ok = all(_all_gather_objects(ok))
        if ok:
            try:
                assert self.backend is not None, "a Checkpointer without a backend only reads"
                self.backend.save(str(self.root), tag, client_state={})
                torch.save(rank_state, d / f"rank_{self.rank:05d}.pt")
                if self.rank == 0:
                    state = dict(trainer_state, world_size=self.world, tag=tag)
                    _atomic_write(d / "trainer_state.json", json.dumps(state, indent=1))
            except (OSError, RuntimeError) as e:
                # torch.save reports a full disk as a RuntimeError ("unexpected pos").
                print(
                    f"[rank {self.rank}] checkpoint {tag} failed: {e}{_free(self.root)}", flush=True
                )
                ok = False
            ok = all(_all_gather_objects(ok))
        if ok:
            ok = self._write_manifest(d)
        if not ok:
            if self.rank == 0:
                shutil.rmtree(d, ignore_errors=True)
                print(
                    f"WARNING: checkpoint {tag} was not saved; earlier checkpoints are intact "
                    f"(latest: {self.latest_tag()}).",
                    flush=True,
                )
            _barrier()
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
        _barrier()
        return True

    def latest_tag(self) -> str | None:
        """What ``latest`` points to (not verified), or None."""
        p = self.root / "latest"
        return p.read_text().strip() if p.is_file() else None

    def _write_manifest(self, d: Path) -> bool:
        # Every rank checksums a share of the files, in parallel; rank 0 writes the manifest.
        _barrier()
        files = sorted(p for p in d.rglob("*") if p.is_file() and p.name != MANIFEST)
        mine = {}
        try:
            for i, p in enumerate(files):
                if i % self.world == self.rank:
                    mine[str(p.relative_to(d))] = {"size": p.stat().st_size, "crc32": _crc32(p)}
        except OSError:
            mine = None  # type: ignore[assignment]  # "this rank failed", gathered below
        parts = _all_gather_objects(mine)
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
        return all(_all_gather_objects(ok))

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

    def verify_collective(self, d: Path) -> str | None:
        """``verify`` with the checksumming shared among the ranks (each reads ~1/world of the
        bytes). Collective; every rank gets the same answer."""
        try:
            manifest = json.loads((d / MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError) as e:
            problem: str | None = f"unreadable manifest ({e})"
        else:
            problem = None
            for i, (rel, meta) in enumerate(sorted(manifest.items())):
                if i % self.world == self.rank:
                    problem = _check_file(d / rel, rel, meta)
                    if problem:
                        break
        problems = [p for p in _all_gather_objects(problem) if p]
        return problems[0] if problems else None

    def find_latest_good(self) -> str | None:
        """The newest checkpoint that verifies, starting from ``latest``; warns on fallback.

        Collective: the ranks share the checksumming and agree on the tag."""
        candidates = self.complete_tags()
        pointed = self.latest_tag()
        if pointed is not None:
            if self.rank == 0 and pointed not in candidates:
                print(
                    f"WARNING: latest points to {pointed}, which is missing or incomplete (no "
                    f"{MANIFEST}); looking for an earlier complete checkpoint.",
                    flush=True,
                )
            candidates = [t for t in candidates if t <= pointed]
        for tag in reversed(candidates):
            problem = self.verify_collective(self.root / tag)
            if problem is None:
                return tag
            if self.rank == 0:
                print(
                    f"WARNING: checkpoint {self.root / tag} is damaged ({problem}); falling back "
                    "to the previous complete checkpoint.",
                    flush=True,
                )
        return None

    def load(self, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore the backend and return (trainer_state, this rank's state). Collective.

        A checkpoint written by another number of ranks is resharded (``train/elastic.py``);
        its ``rng`` is then None, for the caller to derive from seed, step and rank."""
        d = self.root / tag
        state = json.loads((d / "trainer_state.json").read_text())
        assert self.backend is not None, "a Checkpointer without a backend only reads"
        self.backend.load(str(self.root), tag)
        if state["world_size"] != self.world:
            from train.elastic import load_rank_state

            return state, load_rank_state(d, state["world_size"], self.backend)
        rank_state = read_rank_state(d / f"rank_{self.rank:05d}.pt")
        return state, rank_state
