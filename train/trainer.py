"""The training loop: one ``fit()`` that reads in one sitting.

Evaluation, checkpointing and logging are ``maybe_*`` calls that decide for themselves when
to act. The loop talks to the sharding backend only through :class:`migu_dist.backend.Backend`.
"""

from __future__ import annotations

import math
import random
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from migu_dist.backend import Backend
from migu_dist.dist import all_reduce_sum, print0
from migu_dist.hooks import StepHook
from train.checkpoint import Checkpointer
from train.cl_metrics import INITIAL_PHASE, INITIAL_PHASE_INDEX
from train.config import Config
from train.data import Batch, CPTDataLoader, PhasePlan
from train.elastic import derive_rng
from train.packing import DocumentMasking
from train.tracking import NullTracker

if TYPE_CHECKING:  # imported by the assembly only when evaluation is on (plots: matplotlib)
    from train.evaluate import Evaluator


@dataclass
class TrainState:
    """Everything the loop itself must carry across a restart (JSON-serialisable)."""

    step: int = 0
    tokens: int = 0
    tokens_by_domain: dict[str, int] = field(default_factory=dict)
    tokens_by_phase: dict[str, int] = field(default_factory=dict)
    phase_index: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    wandb_id: str | None = None
    finished_phases: list[str] = field(default_factory=list)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    state["numpy"] = np.random.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Trainer:
    """Owns the loop; the backend owns model, optimizer and shards."""

    def __init__(
        self,
        cfg: Config,
        backend: Backend,
        data: CPTDataLoader,
        *,
        hooks: Sequence[StepHook] = (),
        evaluator: Evaluator | None = None,
        checkpointer: Checkpointer | None = None,
        tracker: NullTracker | None = None,
        masking: DocumentMasking | None = None,
    ):
        """``masking``: how the model keeps packed documents apart; needed when the loader
        gives document ids (``data.cross_document_attention: false``)."""
        self.cfg = cfg
        self.backend = backend
        self.data = data
        self.hooks = list(hooks)
        """Run in order between the last backward of a step and the optimizer step (MIGU's
        masking before the L2 anchor's pull: ``migu_dist/hooks.py``)."""
        self.evaluator = evaluator
        self.ckpt = checkpointer
        self.tracker = tracker or NullTracker()
        self.masking = masking
        self.state = TrainState()
        self.phases: list[PhasePlan] = data.phases()
        self.max_steps = min(cfg.train.max_steps, self.phases[-1].end_step)
        self.flops_per_token = 0.0  # set by the assembly when MFU is wanted
        self._stop_signal: int | None = None
        self.exit_reason = "finished"
        self.run_record: dict[str, Any] = {}
        """Saved with every checkpoint: the resolved config and the data fingerprint, against
        which a resume checks what changed (``train/resume.py``)."""
        self.lock: Any = None  # the output_dir's RunLock (rank 0), released after fit()

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainState:
        """Train until max_steps (or a stop signal); returns the final state."""
        self._install_signal_handlers()
        self.maybe_evaluate_initial()
        self.tracker.set_phase(
            self.phase.name,
            self.phase.end_step - self.phase.start_step,
            self.state.step - self.phase.start_step,
        )
        t_last = time.perf_counter()
        while self.state.step < self.max_steps:
            batch = self.data.next_batch()
            inputs: dict[str, torch.Tensor | None] = {
                "input_ids": batch.input_ids,
                "labels": batch.labels,
                "position_ids": batch.position_ids,  # None unless per-document positions
                "document_ids": batch.document_ids,  # None unless documents are kept apart
            }
            local_loss = self.backend.train_batch(inputs, self._model_inputs)
            loss, finite, stop_requested = self._agree(local_loss)
            hook_stats: dict[str, float] = {}
            grad_norm = float("nan")
            if finite:
                for hook in self.hooks:
                    if hook.active(self.state.step, batch.phase):
                        hook_stats.update(hook.apply(self.backend, self.state.step, batch.phase))
                # A finite loss can still come with inf/NaN gradients (an overflow in
                # backward): the norm of what the optimizer would apply, agreed by all ranks.
                grad_norm = self.backend.grad_norm()
                finite = math.isfinite(grad_norm)
            if not finite:
                if not self._handle_nonfinite(loss, grad_norm):
                    break
                metrics = {"grad_norm": grad_norm, "lr": float("nan"), "skipped": True}
            else:
                self.state.consecutive_skips = 0
                metrics = {**self.backend.step(), **hook_stats}
            for hook in self.hooks:
                hook.end_step()
            self.state.step += 1
            t_now = time.perf_counter()
            self._count_tokens(batch)
            self.maybe_log(batch, loss, metrics, t_now - t_last)
            phase_end = self.state.step == self.phase.end_step or self.state.step == self.max_steps
            self.maybe_evaluate(phase_end)
            if phase_end:
                self.end_phase()  # before the checkpoint: a resumed run starts the next phase
            self.maybe_checkpoint(phase_end, force=stop_requested)
            if stop_requested:
                if self.exit_reason == "finished":  # not "checkpoint_failed"
                    self.exit_reason = "signal"
                break
            t_last = time.perf_counter()  # evaluation/checkpoint time is not step time
        if self.ckpt is not None:  # a run stopped early: its asynchronous save, if in flight
            self.ckpt.wait()
        if self.evaluator is not None and self.backend.rank == 0:
            self.evaluator.write_report(
                [p.name for p in self.phases],
                {p.name: list(p.domains) for p in self.cfg.data.phases},
            )
        self.tracker.close()
        return self.state

    # ------------------------------------------------------------------ pieces of a step

    @property
    def phase(self) -> PhasePlan:
        return self.phases[min(self.state.phase_index, len(self.phases) - 1)]

    def _model_inputs(self, mb: dict[str, torch.Tensor]) -> dict[str, Any]:
        """A micro-batch's rows as the model's inputs: document ids become the attention
        masks that keep packed documents apart (``Backend.train_batch`` calls it)."""
        document_ids = mb.pop("document_ids", None)
        if document_ids is not None:
            if self.masking is None:
                raise ValueError("the batches carry document ids: pass Trainer(masking=...)")
            mb.update(self.masking.inputs(document_ids, self.backend.device))
        return mb

    def _agree(self, local_loss: torch.Tensor) -> tuple[torch.Tensor, bool, bool]:
        """One tiny all-reduce: the global mean loss, whether it is finite on every rank, and
        whether any rank got a stop signal."""
        flags = torch.tensor(
            [
                float(local_loss),
                0.0 if torch.isfinite(local_loss) else 1.0,
                1.0 if self._stop_signal else 0.0,
            ],
            dtype=torch.float64,
            device=self.backend.device,
        )
        all_reduce_sum(flags)
        return flags[0] / self.backend.world_size, bool(flags[1] == 0), bool(flags[2] > 0)

    def _handle_nonfinite(self, loss: torch.Tensor, grad_norm: float) -> bool:
        """Apply the non-finite policy (train.nonfinite_loss) to a step whose loss or gradient
        norm is NaN/inf; False means stop the run."""
        self.state.skipped_steps += 1
        self.state.consecutive_skips += 1
        policy = self.cfg.train.nonfinite_loss
        what = (
            f"Non-finite loss ({float(loss)})"
            if not math.isfinite(float(loss))
            else f"Non-finite gradient norm ({grad_norm}, loss {float(loss):.4f})"
        )
        if policy == "stop" or self.state.consecutive_skips > self.cfg.train.max_skipped_steps:
            self.exit_reason = "nonfinite_loss"
            print0(
                f"{what} at step {self.state.step}: stopping; the last good checkpoint is intact.",
                rank=self.backend.rank,
            )
            return False
        print0(f"{what} at step {self.state.step}: step skipped.", rank=self.backend.rank)
        self.backend.skip_step()
        return True

    def _count_tokens(self, batch: Batch) -> None:
        s = self.state
        n = sum(batch.tokens_by_domain.values())
        s.tokens += n
        s.tokens_by_phase[batch.phase] = s.tokens_by_phase.get(batch.phase, 0) + n
        for d, k in batch.tokens_by_domain.items():
            s.tokens_by_domain[d] = s.tokens_by_domain.get(d, 0) + k

    # ------------------------------------------------------------------ maybe_*

    def maybe_log(self, batch: Batch, loss: torch.Tensor, metrics: dict, dt: float) -> None:
        if self.state.step % self.cfg.logging.log_every and self.state.step != self.max_steps:
            return
        n = sum(batch.tokens_by_domain.values())
        row = {
            "step": self.state.step,
            "loss": float(loss),
            "lr": metrics.pop("lr"),
            "tokens": self.state.tokens,
            "tokens_per_s": n / dt if dt > 0 else float("nan"),
            "grad_norm": metrics.pop("grad_norm"),
            **self._mfu(n / dt if dt > 0 else 0.0),
            "phase": batch.phase,
            "tokens_by_domain": dict(self.state.tokens_by_domain),
            "tokens_by_phase": dict(self.state.tokens_by_phase),
            "epoch_by_domain": self.data.epoch_by_domain(),
            **metrics,
        }
        self.tracker.log(row)

    def _mfu(self, tokens_per_s: float) -> dict[str, float]:
        peak = self.cfg.logging.peak_tflops
        if not peak or not self.flops_per_token:
            return {}
        achieved = self.flops_per_token * tokens_per_s / self.backend.world_size
        return {"mfu": achieved / (peak * 1e12)}

    def maybe_evaluate_initial(self) -> None:
        """Evaluate the starting model once (the baseline for forward transfer)."""
        if self.evaluator is None or self.state.step != 0 or not self.cfg.eval.at_start:
            return
        row = self.evaluator.evaluate(
            self.backend.module,
            step=0,
            phase=INITIAL_PHASE,
            phase_index=INITIAL_PHASE_INDEX,
            phase_end=True,
        )
        self.tracker.log_eval(row)

    def maybe_evaluate(self, phase_end: bool) -> None:
        if self.evaluator is None:
            return
        every = self.cfg.eval.every_steps
        due = (phase_end and self.cfg.eval.at_phase_end) or (every and self.state.step % every == 0)
        if not due:
            return
        row = self.evaluator.evaluate(
            self.backend.module,
            step=self.state.step,
            phase=self.phase.name,
            phase_index=self.phase.index,
            phase_end=phase_end,
            tasks=self.cfg.eval.tasks_at == "every" or self.state.step == self.max_steps,
        )
        self.tracker.log_eval(row)

    def maybe_checkpoint(self, phase_end: bool, force: bool = False) -> None:
        if self.ckpt is None:
            return
        c = self.cfg.checkpoint
        due = (
            force
            or (phase_end and c.at_phase_end)
            or (c.every_steps and self.state.step % c.every_steps == 0)
            or self.state.step == self.max_steps
        )
        if force:
            print0(
                f"Stop signal: checkpoint at step {self.state.step}, then exit.",
                rank=self.backend.rank,
            )
        if due:
            self.save_checkpoint(pinned=phase_end and c.at_phase_end, last=force)

    def end_phase(self) -> None:
        """Phase boundary: the hooks' phase ends (MIGU's domain summary rolls over) and the
        next phase starts."""
        self.state.finished_phases.append(self.phase.name)
        for hook in self.hooks:
            hook.end_phase()
        self.state.phase_index += 1
        if self.state.step < self.max_steps:
            self.tracker.set_phase(self.phase.name, self.phase.end_step - self.phase.start_step, 0)

    # ------------------------------------------------------------------ state

    def save_checkpoint(self, pinned: bool = False, last: bool = False) -> bool:
        """Collective. A failed save (full disk) is reported and training goes on; a failed
        final save (the last step's, or ``last``: the one a stop signal asked for) makes the
        run exit non-zero. Pinned (phase-end) checkpoints are also
        exported to ``<output_dir>/hf/<phase>`` with checkpoint.export_hf_at_phase_end."""
        self.state.wandb_id = self.tracker.wandb_id or self.state.wandb_id
        trainer_state = {"train": self.state.__dict__, **self.run_record}
        rank_state = {
            "rng": rng_state(),
            "data": self.data.state_dict(),
            **{hook.name: hook.state_dict() for hook in self.hooks},
        }
        assert self.ckpt is not None
        ok = self.ckpt.save(self.state.step, trainer_state, rank_state, pinned=pinned)
        final = last or self.state.step == self.max_steps
        if ok and (final or (pinned and self.cfg.checkpoint.export_hf_at_phase_end)):
            ok = self.ckpt.wait()  # asynchronous: complete before exiting or exporting
        if not ok and final:
            self.exit_reason = "checkpoint_failed"
        if ok and pinned and self.cfg.checkpoint.export_hf_at_phase_end:
            self._export_phase()
        return ok

    def _export_phase(self) -> None:
        """Rank 0 consolidates the pinned checkpoint just written into a Hugging Face dir;
        the other ranks wait. A failed export is reported, training goes on."""
        from train.checkpoint import tag_for
        from train.export import export_hf

        if self.backend.rank == 0:
            phase = self.state.finished_phases[-1]  # fit() ends the phase before saving
            assert self.ckpt is not None
            out = Path(self.cfg.output_dir, "hf", phase)
            try:
                export_hf(self.ckpt.root / tag_for(self.state.step), out, cfg=self.cfg)
                print(f"Exported phase {phase} to {out}", flush=True)
            except Exception as e:  # noqa: BLE001 - an export must never kill the run
                print(f"WARNING: export of phase {phase} failed: {e!r}", flush=True)
        self.backend.barrier()

    def restore(self, source: Checkpointer, tag: str) -> None:
        """Resume everything from checkpoint ``tag`` of ``source`` (call before fit)."""
        trainer_state, rank_state = source.load(tag)
        self.state = TrainState(**trainer_state["train"])
        self.data.load_state_dict(rank_state["data"])
        for hook in self.hooks:
            if rank_state.get(hook.name) is not None:  # None: saved by a run without it
                hook.load_state_dict(rank_state[hook.name])
        if rank_state["rng"] is not None:
            set_rng_state(rank_state["rng"])
        else:  # written by another number of ranks: streams of (seed, step, this rank)
            derive_rng(self.cfg.train.seed, self.state.step, self.backend.rank)

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            # Act at the next step boundary: checkpoint, then exit cleanly.
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)
