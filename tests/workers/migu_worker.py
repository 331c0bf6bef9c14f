"""Runs MIGU on a real backend (``engine.backend``: DeepSpeed or FSDP2) for a few steps and
saves what it did. :func:`run_all` is run on every rank by ``tests/conftest.py::run_distributed``
(``tests/test_migu.py::launch_worker``), for several runs in one process group, each
``{"out": OUT.pt, "overrides": [key=value, ...]}``.

Each run takes ``train.max_steps`` steps as the trainer does: a non-finite loss ->
``skip_step``; else MIGU (when enabled and active in the phase), the L2 anchor
(``regularization.kind``), ``step``. Step 0 is phase ``p0``, later steps ``p1``. Worker
options besides the config keys: ``poison_step=N`` makes the loss of step N NaN (the logits
times NaN); ``zero_layer=NAME`` zeroes that linear's weight before training (its rows then
tie).

Saves (rank 0): whether the model was built empty, the initial and final full weights, the
logits of the first step's first micro-batch before any step, the kept-row masks of every
masked step, the losses, the gradient norm the backend reports for every step it takes, and
the weights before/after each step.

A run whose model cannot be built (ValueError, e.g. a refused ``model.init_from``) writes the
message to ``OUT.pt.error<rank>`` on every rank, and the next run starts.
"""

from pathlib import Path

import torch

from migu_dist import build_backend
from migu_dist.migu import Migu
from migu_dist.regularize import L2Anchor
from tests.migu_common import global_batch, tiny_config
from train.run import build_model_for

PHASES = ["p0", "p1"]
WORKER_KEYS = ("poison_step", "zero_layer")


def zero_weight(model: torch.nn.Module, name: str) -> None:
    weight = model.get_submodule(name).weight
    if hasattr(weight, "ds_id"):  # built partitioned (ZeRO-3): gather, zero, re-partition
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
            weight.data.zero_()
    else:
        weight.data.zero_()


def run(out: str, args: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in args if a.split("=", 1)[0] in WORKER_KEYS)
    cfg = tiny_config([a for a in args if a.split("=", 1)[0] not in WORKER_KEYS])
    backend = build_backend(cfg.backend_config())
    r, w = backend.rank, backend.world_size
    try:
        model = build_model_for(cfg, backend)
    except ValueError as e:
        Path(f"{out}.error{r}").write_text(str(e))
        return
    empty = any(p.is_meta for p in model.parameters())
    if "zero_layer" in opts:
        zero_weight(model, opts["zero_layer"])
    migu = Migu(cfg.migu, model, seed=cfg.train.seed) if cfg.migu.enabled else None
    reg = L2Anchor(cfg.regularization, PHASES) if cfg.regularization.kind != "none" else None
    poison = {"on": False}

    def nan_logits(module, inputs, output):
        return output * float("nan") if poison["on"] else output

    model.lm_head.register_forward_hook(nan_logits)
    backend.setup(model, lambda step: 1.0)
    init = backend.full_state_dict()
    local = cfg.train.micro_batch_size * cfg.train.grad_accum
    mbs = cfg.train.micro_batch_size
    with torch.no_grad():  # MIGU collects nothing without grad
        logits = backend.module(input_ids=global_batch(cfg, 0, w)[:mbs]).logits
    masks, losses, snapshots, norms = [], [], [], []
    for step in range(cfg.train.max_steps):
        phase = PHASES[min(step, 1)]
        poison["on"] = str(step) == opts.get("poison_step")
        batch = global_batch(cfg, step, w)[r * local : (r + 1) * local]
        for i in range(cfg.train.grad_accum):
            mb = batch[i * mbs : (i + 1) * mbs]
            losses.append(float(backend.forward_backward({"input_ids": mb, "labels": mb})))
        before = backend.full_state_dict()
        if not all(torch.isfinite(torch.tensor(losses[-cfg.train.grad_accum :]))):
            backend.skip_step()
        else:
            if migu is not None and migu.active(step, phase):
                masks.append([m.cpu() for m in migu.compute_masks(step)])
                migu.apply(backend, step, phase)
            if reg is not None:
                reg.apply(backend, step, phase)
            norms.append(backend.step()["grad_norm"])
        if migu is not None:
            migu.reset()
        snapshots.append((before, backend.full_state_dict()))
    final = backend.full_state_dict()
    if r == 0:
        torch.save(
            {
                "init": init,
                "empty": empty,
                "final": final,
                "logits": logits.float().cpu(),
                "masks": masks,
                "layers": [x.name for x in migu.layers] if migu else [],
                "losses": losses,
                "norms": norms,
                "snapshots": snapshots,
            },
            out,
        )


def run_all(specs: list[dict]) -> None:
    """Every run of ``specs`` in turn, in this process group (rank's part)."""
    for spec in specs:
        run(spec["out"], spec["overrides"])
    torch.distributed.destroy_process_group()
