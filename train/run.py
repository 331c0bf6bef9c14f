"""Assemble a run from its config: backend, model, MIGU, data, evaluator, trainer."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from transformers import PreTrainedModel

from migu_dist import build_backend
from migu_dist.backend import Backend
from migu_dist.dist import print0
from migu_dist.hooks import StepHook
from migu_dist.migu import Migu
from migu_dist.parallelize import parallelize
from migu_dist.regularize import L2Anchor
from train.checkpoint import Checkpointer
from train.config import Config, save_config
from train.data import CPTDataLoader
from train.model import build_model, empty_init, flops_per_token
from train.packing import DocumentMasking
from train.resume import ResumeError, prepare_resume
from train.schedule import lr_lambda
from train.tokenizer import Tokenizer, load_tokenizer
from train.tracking import NullTracker, Tracker, truncate_jsonl
from train.trainer import Trainer


def build_trainer(cfg: Config) -> Trainer:
    """Everything up to ``fit()``, including resuming from a checkpoint when there is one.

    Raises :class:`ResumeError` (on every rank) before writing anything when the run must
    not start as asked: another job holds ``output_dir``, or an earlier run there cannot be
    resumed, or the config changed in a way the checkpoint cannot take."""
    backend = build_backend(cfg.backend_config())
    out = Path(cfg.output_dir)
    ckpt = Checkpointer(
        out / "checkpoints",
        backend,
        keep_last=cfg.checkpoint.keep_last,
        async_save=cfg.checkpoint.async_save,
    )
    try:
        lock, source, record = prepare_resume(cfg, ckpt)
    except ResumeError:
        backend.close()
        raise
    if backend.rank == 0:
        save_config(cfg, out / "config.yaml")
    backend.barrier()

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    data = build_data(cfg, tokenizer, backend.rank, backend.world_size)
    phases = data.phases()
    rewarm = [p.start_step for p in phases if _phase_cfg(cfg, p.name).lr_at_start == "rewarm"]

    model = build_model_for(cfg, backend)
    hooks: list[StepHook] = []  # in the order they act: MIGU masks, then L2 pulls
    if cfg.migu.enabled:
        hooks.append(Migu(cfg.migu, model, seed=cfg.train.seed))
    if cfg.regularization.kind != "none":
        hooks.append(L2Anchor(cfg.regularization, [p.name for p in phases]))
    backend.setup(model, lr_lambda(cfg.optim, cfg.train.max_steps, rewarm))

    masking = None if cfg.data.cross_document_attention else DocumentMasking.for_model(model.config)
    evaluator = None
    if cfg.eval.every_steps or cfg.eval.at_phase_end:
        from train.evaluate import Evaluator, task_max_len

        evaluator = Evaluator(
            cfg.eval,
            tokenizer,
            heldout_sets(cfg, data),
            cfg.output_dir,
            device=backend.device,
            is_main=backend.rank == 0,
            max_len=task_max_len(cfg.eval, model),
            heldout_documents=heldout_document_sets(cfg, data) if masking else None,
            masking=masking,
        )
    trainer = Trainer(
        cfg, backend, data, hooks=hooks, evaluator=evaluator, checkpointer=ckpt, masking=masking
    )
    trainer.run_record = record
    trainer.lock = lock
    if cfg.logging.peak_tflops:
        trainer.flops_per_token = flops_per_token(model, cfg.train.seq_len)
    if source is not None:
        trainer.restore(*source)
        # The optimizer's hyper-parameters and LR come from this config, not the checkpoint's
        # (identical unless the resume took a change of optim.* or of the schedule).
        backend.set_optim_hparams(cfg.optim)
        if backend.rank == 0:
            if source[0].root.resolve() == ckpt.root.resolve():
                ckpt.adopt(source[1])  # resumed from = newest: rotation keeps it
            for log in ("metrics.jsonl", "evals.jsonl"):
                truncate_jsonl(out / log, trainer.state.step)
        print0(f"Resumed from {source[0].root / source[1]} at step {trainer.state.step}")
    trainer.tracker = Tracker(cfg, trainer.state.wandb_id) if backend.rank == 0 else NullTracker()
    return trainer


def build_model_for(cfg: Config, backend: Backend) -> PreTrainedModel:
    """The model as ``backend.setup`` takes it: built in the backend's dtype and construction
    context (empty, on the meta device, when the backend loads each rank's shard itself and
    the model allows it), then checkpointed and compiled (``migu_dist.parallelize``)."""
    model = build_model(
        cfg.model,
        seed=cfg.train.seed,
        dtype=backend.param_dtype,
        init_context=backend.init_context(),
        lora=cfg.lora,
        empty=backend.loads_hf_shards and empty_init(cfg.model, cfg.lora),
    )
    m = cfg.model
    parallelize(model, activation_checkpointing=m.activation_checkpointing, compile=m.compile)
    return model


def build_data(cfg: Config, tokenizer: Tokenizer, rank: int, world: int) -> CPTDataLoader:
    """This rank's loader of the run's global batches."""
    return CPTDataLoader(
        cfg.data,
        tokenizer,
        seq_len=cfg.train.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum=cfg.train.grad_accum,
        dp_rank=rank,
        dp_world=world,
        seed=cfg.train.seed,
        max_steps=cfg.train.max_steps,
    )


def heldout_sets(cfg: Config, data: CPTDataLoader) -> dict[str, list[torch.Tensor]]:
    """Every domain's fixed held-out token chunks (the same tokens at every evaluation)."""
    return {
        name: data.heldout_sequences(name, cfg.eval.heldout_tokens, cfg.train.seq_len)
        for name, dom in cfg.data.domains.items()
        if dom.heldout or dom.heldout_store
    }


def heldout_document_sets(cfg: Config, data: CPTDataLoader) -> dict[str, list[torch.Tensor]]:
    """Per domain of :func:`heldout_sets`, the document ids of each chunk (for evaluation
    without cross-document attention)."""
    return {
        name: data.heldout_document_ids(name, cfg.eval.heldout_tokens, cfg.train.seq_len)
        for name, dom in cfg.data.domains.items()
        if dom.heldout
    }


def _phase_cfg(cfg: Config, name: str):
    return next(p for p in cfg.data.phases if p.name == name)


# Exit code of a job stopped by SIGTERM/SIGINT during set-up: 128 + SIGTERM, what a shell
# reports for a process the signal ended.
SETUP_SIGNAL_EXIT = 143


class SetupInterrupted(BaseException):
    """A stop signal arrived before the training loop took over signal handling."""


def _raise_on_stop_signal(signum: int, frame: object) -> None:
    raise SetupInterrupted(signum)


def run(cfg: Config) -> int:
    """Set up and train; the process exit code (0: finished or stopped by a signal with its
    checkpoint written, 2: refused to resume, 3: stopped by a failure, 143: stopped by a
    signal during set-up)."""
    # Set-up (loading a 7B model, reading the data, resuming) takes minutes, and there is
    # nothing new to save yet: a stop signal ends it at once, clearly, rather than by the
    # default action (killed without a word). fit() installs its own handlers first thing.
    # (The run lock, if taken, is released at exit.)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_on_stop_signal)
    try:
        trainer = build_trainer(cfg)
        state = trainer.fit()
    except ResumeError as e:  # raised by build_trainer
        print0(f"ERROR: {e}")
        return 2
    except SetupInterrupted as e:
        name = signal.Signals(e.args[0]).name
        print(
            f"[rank {os.environ.get('RANK', 0)}] {name} during set-up, before the first step: "
            f"exiting (code {SETUP_SIGNAL_EXIT}) without a checkpoint; the run's checkpoints "
            "are as they were.",
            flush=True,
        )
        return SETUP_SIGNAL_EXIT
    trainer.backend.close()
    if trainer.lock is not None:
        trainer.lock.release()
    print0(
        f"done: step {state.step}, tokens {state.tokens}, exit={trainer.exit_reason}",
        rank=trainer.backend.rank,
    )
    return 0 if trainer.exit_reason in ("finished", "signal") else 3
