"""FSDP2 built empty from a Hugging Face directory: what ``setup`` loads, per rank.

:func:`load_empty` runs on every rank under ``tests/conftest.py::run_distributed``. It builds
the tiny-cpu model as ``train.run.build_trainer`` does (``build_model_for``) with
``engine.backend=fsdp2 model.init_from=INIT_DIR``, sets it up, and returns whether the build
was empty (meta parameters before setup) and the rank's local shard shapes; rank 0 also the
consolidated state dict and the logits of a fixed batch.
"""

import os
from pathlib import Path

import torch

from migu_dist import build_backend
from train.config import load_config
from train.run import build_model_for

ROOT = Path(__file__).resolve().parents[2]


def load_empty(init: str) -> dict:
    overrides = ["engine.backend=fsdp2", f"model.init_from={init}", "train.seed=0"]
    world = int(os.environ["WORLD_SIZE"])
    cfg = load_config(ROOT / "configs" / "tiny-cpu.yaml", overrides, world_size=world)
    backend = build_backend(cfg.backend_config())
    model = build_model_for(cfg, backend)
    was_meta = all(p.is_meta for p in model.parameters())
    backend.setup(model, lambda s: 1.0)
    out: dict = {
        "was_meta": was_meta,
        "shapes": {n: tuple(p.to_local().shape) for n, p in model.named_parameters()},
    }
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.model.vocab_size, (2, 16), generator=gen)
    with torch.no_grad():
        logits = backend.module(input_ids=ids).logits
    full = backend.full_state_dict()
    if backend.rank == 0:
        out.update(state_dict=full, input_ids=ids, logits=logits)
    backend.barrier()
    backend.close()
    return out
