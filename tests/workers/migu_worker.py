"""Runs MIGU on a real backend (``engine.backend``: DeepSpeed or FSDP2) for a few steps and
saves what it did.

    torchrun --standalone --nproc_per_node 2 tests/workers/migu_worker.py OUT.pt key=value ...
    torchrun --standalone --nproc_per_node 2 tests/workers/migu_worker.py --runs RUNS.json

Saves (rank 0): whether the model was built empty, the initial and final full weights, the
logits of the first step's first micro-batch before any step, the kept-row masks of every
step, the losses, and the weights before/after each step.

``--runs``: several runs in one launch (one process group), a JSON list of
``{"out": OUT.pt, "overrides": [key=value, ...]}``. A run whose model cannot be built
(ValueError, e.g. a refused ``model.init_from``) writes the message to ``OUT.pt.error<rank>``
on every rank, and the next run starts.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from migu_dist import build_backend  # noqa: E402
from migu_dist.migu import Migu  # noqa: E402
from tests.migu_common import global_batch, tiny_config  # noqa: E402
from train.model import build_model  # noqa: E402


def run(out: str, overrides: list[str]) -> None:
    cfg = tiny_config(overrides)
    backend = build_backend(cfg)
    r, w = backend.rank, backend.world_size
    try:
        model = build_model(
            cfg.model,
            seed=cfg.train.seed,
            dtype=backend.param_dtype,
            init_context=backend.init_context(),
            empty=backend.empty_init,
        )
    except ValueError as e:
        Path(f"{out}.error{r}").write_text(str(e))
        return
    migu = Migu(cfg.migu, model, seed=cfg.train.seed)
    backend.setup(model, lambda step: 1.0)
    init = backend.full_state_dict()
    local = cfg.train.micro_batch_size * cfg.train.grad_accum
    mbs = cfg.train.micro_batch_size
    with torch.no_grad():  # MIGU collects nothing without grad
        logits = backend.module(input_ids=global_batch(cfg, 0, w)[:mbs]).logits
    masks, losses, snapshots = [], [], []
    for step in range(cfg.train.max_steps):
        batch = global_batch(cfg, step, w)[r * local : (r + 1) * local]
        for i in range(cfg.train.grad_accum):
            mb = batch[i * mbs : (i + 1) * mbs]
            losses.append(float(backend.forward_backward({"input_ids": mb, "labels": mb})))
        masks.append(migu.compute_masks(step))
        migu.apply(backend, step, None)
        before = backend.full_state_dict()
        backend.step()
        migu.reset()
        snapshots.append((before, backend.full_state_dict()))
    final = backend.full_state_dict()
    if r == 0:
        torch.save(
            {
                "init": init,
                "empty": backend.empty_init,
                "final": final,
                "logits": logits.float().cpu(),
                "masks": [[m.cpu() for m in step] for step in masks],
                "layers": [x.name for x in migu.layers],
                "losses": losses,
                "snapshots": snapshots,
            },
            out,
        )


if __name__ == "__main__":
    if sys.argv[1] == "--runs":
        for spec in json.loads(Path(sys.argv[2]).read_text()):
            run(spec["out"], spec["overrides"])
    else:
        run(sys.argv[1], sys.argv[2:])
    torch.distributed.destroy_process_group()  # not left to interpreter shutdown (gloo aborts)
