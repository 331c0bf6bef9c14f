"""Where step metrics go: ``metrics.jsonl``, a rank-0 progress bar, and wandb.

Only rank 0 gets a real :class:`Tracker`; other ranks get :class:`NullTracker`, so the loop
never asks which rank it is on.

The run's logs (``metrics.jsonl``, ``evals.jsonl``) are written through :class:`JsonlLog`: a
kill or a full disk during a write can neither corrupt them for a later resume nor stop the
training (the checkpoint is what matters; a log row is retried at the next step).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from pathlib import Path
from typing import Any

from train.config import Config


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop rows with ``step > max_step``: a resumed run re-runs those steps and logs them
    again. Lines that are not JSON rows (the torn last line a kill or a full disk during a
    write leaves) are dropped with a warning. Written to a temporary file and renamed, so a
    crash never loses the log; if that fails (full disk) the log is left as it is, warned."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    kept = [line + "\n" for line, row in _rows(path, text) if row.get("step", 0) <= max_step]
    if "".join(kept) == text:
        return
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        print(
            f"WARNING: {path}: could not drop the rows after step {max_step} ({e}); they "
            "will appear twice.",
            flush=True,
        )


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a log written by :class:`JsonlLog`, skipping (with a warning) lines that
    are not JSON rows, such as a torn last line."""
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    return [row for _, row in _rows(path, text)]


def _rows(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) of every line of ``text`` that is a JSON object; warns about the others."""
    out, broken = [], 0
    for line in text.split("\n"):
        try:
            row = json.loads(line)
        except ValueError:
            broken += bool(line.strip())
            continue
        if isinstance(row, dict):
            out.append((line, row))
        else:
            broken += 1
    if broken:
        print(
            f"WARNING: {path}: dropped {broken} line(s) that are not JSON rows (a write cut "
            "short by a kill or a full disk).",
            flush=True,
        )
    return out


class JsonlLog:
    """An append-only JSON Lines file that a kill or a full disk cannot corrupt, and whose
    failed writes are not fatal.

    Each :meth:`append` writes every row not yet written as whole lines in one ``write`` to
    an ``O_APPEND`` descriptor. A write that fails (full disk, quota, I/O error) is reported
    once, its rows are kept and retried with the next append (so they come late, in order,
    never twice), and the partial line it may have left is cut off first; the same cut
    happens when the file is opened, for the torn line an earlier process died writing. The
    file is opened at the first append, after any resume truncation has replaced it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None
        self._pending: list[str] = []
        self._failing = False

    def append(self, row: dict[str, Any]) -> bool:
        """Queue ``row`` and write everything queued; False if it stays queued (reported)."""
        self._pending.append(json.dumps(row) + "\n")
        return self.flush()

    def flush(self) -> bool:
        """Write the queued rows; False (reported on the first failure) if that failed."""
        if not self._pending:
            return True
        data = "".join(self._pending).encode("utf-8")
        size = None
        try:
            if self._fd is None or self._failing:
                self._open()
            assert self._fd is not None
            size = os.fstat(self._fd).st_size
            written = os.write(self._fd, data)
            if written != len(data):  # a short write: the disk filled up during it
                raise OSError(errno.ENOSPC, f"only {written} of {len(data)} bytes written")
        except OSError as e:
            if self._fd is not None and size is not None:  # take back a partial line now
                with contextlib.suppress(OSError):  # (else: cut at the retry)
                    os.ftruncate(self._fd, size)
            if not self._failing:
                print(
                    f"WARNING: cannot write {self.path} ({e}); training goes on, the rows "
                    "are kept and retried at the next step.",
                    flush=True,
                )
            self._failing = True
            return False
        if self._failing:
            print(
                f"{self.path}: writing again ({len(self._pending)} delayed row(s) written).",
                flush=True,
            )
            self._failing = False
        self._pending.clear()
        return True

    def _open(self) -> None:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        end = _end_of_last_line(self._fd)
        size = os.fstat(self._fd).st_size
        if end < size:
            os.ftruncate(self._fd, end)
            print(
                f"WARNING: {self.path}: cut off a torn last line ({size - end} bytes) left "
                "by an interrupted write.",
                flush=True,
            )

    def close(self) -> None:
        """Last try at the queued rows, then close; says how many rows were lost."""
        if not self.flush():
            print(
                f"WARNING: {self.path}: {len(self._pending)} row(s) could not be written.",
                flush=True,
            )
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _end_of_last_line(fd: int, block: int = 1 << 16) -> int:
    """Size of ``fd``'s content up to and including its last newline (0 if none)."""
    end = os.fstat(fd).st_size
    pos = end
    while pos > 0:
        start = max(0, pos - block)
        chunk = os.pread(fd, pos - start, start)
        if pos == end and chunk.endswith(b"\n"):
            return end
        i = chunk.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


class NullTracker:
    """Accepts everything, writes nothing (ranks other than 0)."""

    wandb_id: str | None = None

    def log(self, row: dict[str, Any]) -> None:
        pass

    def log_eval(self, row: dict[str, Any]) -> None:
        pass

    def set_phase(self, name: str, total: int, done: int) -> None:
        pass

    def close(self) -> None:
        pass


class Tracker(NullTracker):
    """metrics.jsonl + tqdm + wandb (offline automatically when no API key is set)."""

    def __init__(self, cfg: Config, wandb_id: str | None = None):
        self.log_file = JsonlLog(Path(cfg.output_dir, "metrics.jsonl"))
        self.cfg = cfg
        self.bar = None
        self.run: Any = None
        self.wandb_id = wandb_id
        if cfg.logging.wandb:
            self._init_wandb(cfg, wandb_id)

    def _init_wandb(self, cfg: Config, wandb_id: str | None) -> None:
        import wandb

        has_key = bool(os.environ.get("WANDB_API_KEY")) or Path("~/.netrc").expanduser().exists()
        if not has_key and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
        self.wandb_id = wandb_id or uuid.uuid4().hex[:8]  # kept in checkpoints: resume
        # continues the same wandb run
        self.run = wandb.init(
            project=cfg.logging.wandb_project,
            name=cfg.logging.wandb_run_name or Path(cfg.output_dir).name,
            id=self.wandb_id,
            resume="allow",
            dir=cfg.output_dir,
            config=cfg.to_dict(),
        )

    def set_phase(self, name: str, total: int, done: int) -> None:
        if not self.cfg.logging.progress_bar:
            return
        from tqdm import tqdm

        if self.bar is not None:
            self.bar.close()
        self.bar = tqdm(total=total, initial=done, desc=f"phase {name}", dynamic_ncols=True)

    def log(self, row: dict[str, Any]) -> None:
        self.log_file.append(row)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
        if self.run is not None:
            self.run.log(_flatten(row), step=row["step"])

    def log_eval(self, row: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(_flatten({"eval": row}), step=row["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.log_file.close()
        if self.run is not None:
            self.run.finish()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float)):
            out[key] = v
    return out
