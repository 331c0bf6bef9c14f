"""Runs MIGU on a real backend (``engine.backend``: DeepSpeed or FSDP2) for a few steps and
saves what it did.

    torchrun --standalone --nproc_per_node 2 tests/workers/migu_worker.py OUT.pt key=value ...

Saves (rank 0): the initial and final full weights, the kept-row masks of every step, the
losses, and for mode=update the weights before/after each step.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from migu_dist import build_backend  # noqa: E402
from migu_dist.migu import Migu  # noqa: E402
from tests.migu_common import global_batch, tiny_config  # noqa: E402
from train.model import build_model  # noqa: E402


def main() -> None:
    out = sys.argv[1]
    cfg = tiny_config(sys.argv[2:])
    backend = build_backend(cfg)
    model = build_model(cfg.model, seed=cfg.train.seed, init_context=backend.init_context())
    migu = Migu(cfg.migu, model, seed=cfg.train.seed)
    backend.setup(model, lambda step: 1.0)
    init = backend.full_state_dict()
    r, w = backend.rank, backend.world_size
    local = cfg.train.micro_batch_size * cfg.train.grad_accum
    masks, losses, snapshots = [], [], []
    for step in range(cfg.train.max_steps):
        batch = global_batch(cfg, step, w)[r * local : (r + 1) * local]
        for i in range(cfg.train.grad_accum):
            mb = batch[i * cfg.train.micro_batch_size : (i + 1) * cfg.train.micro_batch_size]
            losses.append(float(backend.forward_backward({"input_ids": mb, "labels": mb})))
        masks.append(migu.compute_masks(step))
        migu.apply(backend, step, None)
        before = backend.full_state_dict()
        backend.step()
        migu.reset()
        snapshots.append((before, backend.full_state_dict()))
    if r == 0:
        torch.save(
            {
                "init": init,
                "final": backend.full_state_dict(),
                "masks": [[m.cpu() for m in step] for step in masks],
                "layers": [x.name for x in migu.layers],
                "losses": losses,
                "snapshots": snapshots,
            },
            out,
        )
    else:
        backend.full_state_dict()


if __name__ == "__main__":
    main()
    torch.distributed.destroy_process_group()  # not left to interpreter shutdown (gloo aborts)
