"""Assemble a run from its config: backend, model, MIGU, data, evaluator, trainer."""

from __future__ import annotations

from pathlib import Path

import torch

from migu_dist import build_backend
from migu_dist.migu import Migu
from migu_dist.regularize import L2Anchor
from train.checkpoint import Checkpointer
from train.config import Config, save_config
from train.data import CPTDataLoader
from train.model import build_model, flops_per_token
from train.schedule import lr_lambda
from train.tokenizer import Tokenizer, load_tokenizer
from train.tracking import NullTracker, Tracker, print0, truncate_jsonl
from train.trainer import Trainer


def build_trainer(cfg: Config) -> Trainer:
    """Everything up to ``fit()``, including resuming from a checkpoint when there is one."""
    backend = build_backend(cfg)
    out = Path(cfg.output_dir)
    if backend.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    backend.barrier()

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    data = build_data(cfg, tokenizer, backend.rank, backend.world_size)
    phases = data.phases()
    rewarm = [p.start_step for p in phases if _phase_cfg(cfg, p.name).lr_at_start == "rewarm"]

    model = build_model(
        cfg.model,
        seed=cfg.train.seed,
        dtype=backend.param_dtype,
        init_context=backend.init_context(),
        lora=cfg.lora,
        empty=backend.empty_init,
    )
    migu = Migu(cfg.migu, model, seed=cfg.train.seed) if cfg.migu.enabled else None
    reg = None
    if cfg.regularization.kind != "none":
        reg = L2Anchor(cfg.regularization, [p.name for p in phases])
    backend.setup(model, lr_lambda(cfg.optim, cfg.train.max_steps, rewarm))

    evaluator = None
    if cfg.eval.every_steps or cfg.eval.at_phase_end:
        from train.evaluate import Evaluator

        evaluator = Evaluator(
            cfg.eval,
            tokenizer,
            heldout_sets(cfg, data),
            cfg.output_dir,
            device=backend.device,
            is_main=backend.rank == 0,
            max_len=cfg.train.seq_len,
        )
    ckpt = Checkpointer(out / "checkpoints", backend, keep_last=cfg.checkpoint.keep_last)
    trainer = Trainer(
        cfg, backend, data, migu=migu, regularizer=reg, evaluator=evaluator, checkpointer=ckpt
    )
    if cfg.logging.peak_tflops:
        trainer.flops_per_token = flops_per_token(model, cfg.train.seq_len)
    source = resume_source(cfg, ckpt)
    if source is not None:
        trainer.restore(*source)
        if backend.rank == 0:
            for log in ("metrics.jsonl", "evals.jsonl"):
                truncate_jsonl(out / log, trainer.state.step)
        print0(f"Resumed from {source[0].root / source[1]} at step {trainer.state.step}")
    trainer.tracker = Tracker(cfg, trainer.state.wandb_id) if backend.rank == 0 else NullTracker()
    return trainer


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
        if dom.heldout
    }


def _phase_cfg(cfg: Config, name: str):
    return next(p for p in cfg.data.phases if p.name == name)


def resume_source(cfg: Config, ckpt: Checkpointer) -> tuple[Checkpointer, str] | None:
    """(checkpointer, tag) to resume from, per ``resume: auto | never | <path>``."""
    if cfg.resume == "never":
        if ckpt.complete_tags():
            raise RuntimeError(
                f"resume=never but {ckpt.root} holds checkpoints; use resume=auto to continue "
                "the run, or a new output_dir to start over."
            )
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume).resolve()
        source = Checkpointer(path.parent, ckpt.backend)
        problem = source.verify_collective(path)  # the ranks share the checksumming
        if problem:
            raise RuntimeError(f"resume={cfg.resume}: checkpoint is damaged ({problem}).")
        return source, path.name
    tag = ckpt.find_latest_good()
    return (ckpt, tag) if tag else None


def run(cfg: Config) -> int:
    trainer = build_trainer(cfg)
    state = trainer.fit()
    trainer.backend.close()
    print0(
        f"done: step {state.step}, tokens {state.tokens}, exit={trainer.exit_reason}",
        rank=trainer.backend.rank,
    )
    return 0 if trainer.exit_reason in ("finished", "signal") else 3
