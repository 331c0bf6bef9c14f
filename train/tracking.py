"""Where step metrics go: ``metrics.jsonl``, a rank-0 progress bar, and wandb.

Only rank 0 gets a real :class:`Tracker`; other ranks get :class:`NullTracker`, so the loop
never asks which rank it is on.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from train.config import Config


def print0(*args: Any, rank: int | None = None) -> None:
    """Print on rank 0 only."""
    if (rank if rank is not None else int(os.environ.get("RANK", 0))) == 0:
        print(*args, flush=True)


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop rows with ``step > max_step``: a resumed run re-runs those steps and logs them
    again. Written to a temporary file and renamed, so a crash never loses the log."""
    if not path.is_file():
        return
    rows = path.read_text().splitlines(keepends=True)
    kept = [r for r in rows if r.strip() and json.loads(r).get("step", 0) <= max_step]
    if len(kept) != len(rows):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


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
        self.path = Path(cfg.output_dir, "metrics.jsonl")
        self.file = self.path.open("a")
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
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
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
        self.file.close()
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
