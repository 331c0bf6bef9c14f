"""Shared by the MIGU tests and their distributed workers: a tiny config and fixed batches."""

from __future__ import annotations

from typing import Any

import torch

from train.config import Config, MiguConfig, ModelConfig, TrainConfig, parse_config, parse_overrides
from train.data import Batch, PhasePlan
from train.tracking import NullTracker

VOCAB = 97


def tiny_config(overrides: list[str] | None = None) -> Config:
    """hidden 48, 2 layers, intermediate 37 (odd: rows straddle ZeRO-3 partitions)."""
    cfg = Config(
        model=ModelConfig(
            vocab_size=VOCAB,
            hidden_size=48,
            intermediate_size=37,
            num_layers=2,
            num_heads=4,
            max_position_embeddings=64,
        ),
        train=TrainConfig(max_steps=3, micro_batch_size=2, grad_accum=2, seq_len=16, seed=7),
        migu=MiguConfig(enabled=True, keep_ratio=0.3),
    )
    cfg.optim.grad_clip = 0.5  # small enough that clipping acts on the masked gradients
    cfg.optim.lr = 1e-2
    tree, problems = parse_overrides(overrides or [])
    assert not problems, problems
    return parse_config(_merge_into(cfg.to_dict(), tree))


def _merge_into(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge_into(base[k], v)
        else:
            base[k] = v
    return base


def global_batch(cfg: Config, step: int, world: int) -> torch.Tensor:
    """The global batch of ``step``: (world * grad_accum * micro_batch_size, seq_len)."""
    g = torch.Generator().manual_seed(1000 + step)
    rows = world * cfg.train.grad_accum * cfg.train.micro_batch_size
    return torch.randint(0, cfg.model.vocab_size, (rows, cfg.train.seq_len), generator=g)


PHASES = ["p0", "p1"]  # fixed batches: step 0 is phase p0, every later step p1


class FixedBatches:
    """The trainer's data source for the 2-rank worker tests: step ``s`` gives this rank's rows
    of :func:`global_batch` (labels = inputs), in phase p0 at step 0 and p1 after, so that a
    single-process reference can replay the same batches."""

    def __init__(self, cfg: Config, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.step = 0

    def phases(self) -> list[PhasePlan]:
        last = max(self.cfg.train.max_steps, 2)
        return [PhasePlan(PHASES[0], 0, 0, 1), PhasePlan(PHASES[1], 1, 1, last)]

    def next_batch(self) -> Batch:
        t = self.cfg.train
        local = t.micro_batch_size * t.grad_accum
        rows = global_batch(self.cfg, self.step, self.world)[self.rank * local :][:local]
        index = min(self.step, 1)
        self.step += 1
        tokens = rows.numel() * self.world
        return Batch(
            input_ids=rows,
            labels=rows.clone(),
            position_ids=None,
            document_ids=None,
            phase=PHASES[index],
            phase_index=index,
            tokens_by_domain={"fixed": tokens},
        )

    def epoch_by_domain(self) -> dict[str, int]:
        return {}

    def state_dict(self) -> dict:
        return {"step": self.step}


class StepRecorder:
    """A last pre-step hook for the worker tests: the rows MIGU kept at every step it masked
    and, with ``snapshots``, the full weights before and after every step (skipped ones too;
    ``backend.full_state_dict()`` is collective, and every rank runs the hooks)."""

    name = "step_recorder"

    def __init__(self, migu: Any, backend: Any, *, snapshots: bool = False):
        self.migu, self.backend = migu, backend
        self.masks: list[list[torch.Tensor]] = []
        self.snapshots: list[tuple[dict, dict]] = []
        self._before = backend.full_state_dict() if snapshots else None

    def active(self, step: int, phase: str | None) -> bool:
        return self.migu is not None and self.migu.active(step, phase)

    def apply(self, backend: Any, step: int, phase: str | None) -> dict[str, float]:
        self.masks.append([layer.keep.clone() for layer in self.migu.layers])
        return {}

    def end_step(self) -> None:
        if self._before is not None:
            after = self.backend.full_state_dict()
            self.snapshots.append((self._before, after))
            self._before = after

    def end_phase(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class RowRecorder(NullTracker):
    """The metrics rows the trainer logs, kept in memory."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))
