"""Runs MIGU on a real backend (``engine.backend``: DeepSpeed or FSDP2) for a few steps and
saves what it did. :func:`run_all` is run on every rank by ``tests/conftest.py::run_distributed``
(``tests/test_migu.py::launch_worker``), for several runs in one process group, each
``{"out": OUT.pt, "overrides": [key=value, ...]}``.

Each run assembles the model, MIGU (when enabled) and the L2 anchor (``regularization.kind``) as
``train/run.py`` does and trains ``train.max_steps`` steps with ``Trainer.fit`` on fixed batches
(``tests/migu_common.py::FixedBatches``: step 0 is phase ``p0``, later steps ``p1``) at a
constant LR; a last pre-step hook records masks and weights. Worker options besides the
config keys: ``poison_step=N`` makes the loss of step N NaN (the logits
times NaN); ``zero_layer=NAME`` zeroes that linear's weight before training (its rows then
tie).

Saves (rank 0): whether the model was built empty, the initial and final full weights, the
logits of the first step's first micro-batch before any step, the kept-row masks of every
masked step, the losses, the gradient norm the backend reports for every step it takes, and
the weights before/after each step.

A run whose model cannot be built (ValueError, e.g. a refused ``model.init_from``) writes the
message to ``OUT.pt.error<rank>`` on every rank, and the next run starts.
"""

import gc
import signal
from pathlib import Path

import torch

from migu_dist import build_backend
from migu_dist.migu import Migu
from migu_dist.regularize import L2Anchor
from tests.migu_common import (
    PHASES,
    FixedBatches,
    RowRecorder,
    StepRecorder,
    global_batch,
    tiny_config,
)
from train.run import build_model_for
from train.trainer import Trainer

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
    backend.setup(model, lambda step: 1.0)
    init = backend.full_state_dict()
    recorder = StepRecorder(migu, backend, snapshots=True)
    rows = RowRecorder()
    data = FixedBatches(cfg, r, w)
    trainer = Trainer(
        cfg, backend, data, hooks=[h for h in (migu, reg, recorder) if h], tracker=rows
    )
    poison_step = int(opts.get("poison_step", -1))
    training = {"on": False}
    losses: list[float] = []

    def nan_logits(module, inputs, output):
        # data.step: batches handed out, the current step's included. Not trainer.state.step:
        # a hook on the model referring to the trainer would keep this run's backend alive
        # after it (a cycle), and with it DeepSpeed's ZeRO-3 construction context.
        poisoned = training["on"] and data.step - 1 == poison_step
        return output * float("nan") if poisoned else output

    def record_loss(module, inputs, output):  # every training micro-batch's loss, in order
        if training["on"] and getattr(output, "loss", None) is not None:
            losses.append(float(output.loss))

    model.lm_head.register_forward_hook(nan_logits)
    model.register_forward_hook(record_loss)
    mbs = cfg.train.micro_batch_size
    with torch.no_grad():  # MIGU collects nothing without grad
        logits = backend.module(input_ids=global_batch(cfg, 0, w)[:mbs]).logits
    training["on"] = True
    trainer.fit()
    # fit() left its stop-signal handlers installed, and they hold the trainer (and so this
    # run's backend): put the defaults back so that nothing keeps the backend past the run.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    final = backend.full_state_dict()
    if r == 0:
        torch.save(
            {
                "init": init,
                "empty": empty,
                "final": final,
                "logits": logits.float().cpu(),
                "masks": recorder.masks,
                "layers": [x.name for x in migu.layers] if migu else [],
                "losses": losses,
                "norms": [row["grad_norm"] for row in rows.rows if not row.get("skipped")],
                "snapshots": recorder.snapshots,
            },
            out,
        )


def run_all(specs: list[dict]) -> None:
    """Every run of ``specs`` in turn, in this process group (rank's part)."""
    for spec in specs:
        run(spec["out"], spec["overrides"])
        # Free the run's backend now: a ZeRO-3 run's HfDeepSpeedConfig, while alive, makes
        # transformers build the next run's model partitioned, whatever its engine.
        gc.collect()
    torch.distributed.destroy_process_group()
