"""``launch/cpt.py`` plus the trained model's logits on a fixed input, for export parity.

    torchrun --standalone --nproc_per_node 2 tests/workers/ckpt_train.py --config C [k=v ...]

Builds the trainer exactly as the entry point does (``train.run.build_trainer``), runs one
forward of a fixed (2, 16) batch through the sharded model (collective under ZeRO-3 and FSDP2
alike) before and after training, and saves ``<output_dir>/logits.pt`` on rank 0: the input
ids, the (2, 16, vocab) logits before (``init_logits``) and after training (``logits``) and
the full consolidated state dict. Exits like ``launch/cpt.py``.
"""

import os
from pathlib import Path

import torch

from launch.cpt import parse_args
from tests.workers import exit_now
from train.config import load_config
from train.run import build_trainer


def fixed_input(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


def sharded_logits(backend, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``ids`` through the sharded model (every rank the whole batch), mode kept."""
    was_training = backend.module.training
    backend.module.eval()
    with torch.no_grad():
        logits = backend.module(input_ids=ids.to(backend.device)).logits.float().cpu()
    backend.module.train(was_training)
    return logits


def main() -> int:
    args = parse_args()
    cfg = load_config(args.config, args.overrides, world_size=int(os.environ["WORLD_SIZE"]))
    trainer = build_trainer(cfg)
    backend = trainer.backend
    ids = fixed_input(cfg.model.vocab_size)
    init_logits = sharded_logits(backend, ids)
    trainer.fit()
    logits = sharded_logits(backend, ids)
    full = backend.full_state_dict()
    if backend.rank == 0:
        out = {"input_ids": ids, "init_logits": init_logits, "logits": logits, "state_dict": full}
        torch.save(out, Path(cfg.output_dir, "logits.pt"))
    backend.close()
    return 0 if trainer.exit_reason in ("finished", "signal") else 3


if __name__ == "__main__":
    exit_now(main())
