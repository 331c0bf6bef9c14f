"""Shared by the MIGU tests and their distributed worker: a tiny config and fixed batches."""

from __future__ import annotations

import torch

from train.config import Config, MiguConfig, ModelConfig, TrainConfig, parse_config, parse_overrides

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
