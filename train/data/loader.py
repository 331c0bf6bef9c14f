"""The trainer's data loader: phases, mixture, packing, background workers, exact resume.

Global batches, not rank shards, are the unit: every rank plans the whole global batch of a
step (which domain feeds each row), advances every domain stream through all of its rows and
keeps only its own rows ``[rank * local, (rank + 1) * local)``. This is what makes the batch
sequence independent of the world size and the checkpoint identical on every rank (any rank's
state resumes any other's). The price is that every rank tokenises the whole global batch;
``bench/bench_data.py`` measures the throughput this allows (well above what a GPU consumes).
Rows other ranks keep are tokenised but never copied out of the worker.

Token-store domains (``store.py``) produce the same rows from a memory-mapped array instead:
a rank reads only its own rows, and its state is one number, the tokens consumed.

Resume: the state is the step counter (the mixture RNG is counter-based), per domain the
position of the document in progress and how many of its tokens were emitted, and bad-input
counts, all taken at the last batch handed out, not at the workers' read-ahead.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from train.config import DataConfig
from train.data import fs
from train.data.hfdatasets import dataset_kind
from train.data.mixture import PhasePlan, plan_phases, step_domains
from train.data.sources import BadInputLog, DocumentReader, Position
from train.data.store import TokenStore
from train.data.stream import document_affixes
from train.data.workers import Chunk, InlineExecutor, ProcessExecutor, StreamSpec
from train.packing import document_ids_from_positions
from train.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class Batch:
    """One optimizer step's rows for this rank."""

    input_ids: torch.Tensor  # (grad_accum * micro_batch_size, seq_len) int64
    labels: torch.Tensor  # same shape, int64; -100 where no loss (packing leaves none)
    position_ids: torch.Tensor | None  # same shape, int64; restart at each document, or None
    # Same shape, int64: each token's document within its row (0, 0, 1, 1, ...), or None when
    # documents may attend to each other (data.cross_document_attention); see train/packing.py.
    document_ids: torch.Tensor | None
    phase: str
    phase_index: int
    tokens_by_domain: dict[str, int]  # tokens of the whole global batch per domain


def expand_globs(patterns: list[str]) -> list[str]:
    """Files of ``patterns`` in a stable order: pattern by pattern, sorted, without repeats.
    ``fsspec`` URL patterns (``s3://bucket/x/*.jsonl``) give URLs."""
    files: dict[str, None] = {}
    for pattern in patterns:
        files.update(dict.fromkeys(fs.expand(pattern)))
    return list(files)


class CPTDataLoader:
    """Packed, phase-scheduled, mixture-sampled batches for one data-parallel rank."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        micro_batch_size: int,
        grad_accum: int,
        dp_rank: int,
        dp_world: int,
        seed: int,
        max_steps: int,
        prefetch_steps: int = 4,
    ):
        """``prefetch_steps``: steps the workers may run ahead of training (num_workers > 0)."""
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_world={dp_world})")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.seed = seed
        self.local_rows = micro_batch_size * grad_accum
        self.global_rows = self.local_rows * dp_world
        self.rows = range(dp_rank * self.local_rows, (dp_rank + 1) * self.local_rows)
        self.prefetch_steps = max(1, prefetch_steps)
        self._plans = plan_phases(cfg, seq_len * self.global_rows, max_steps)
        self._end_step = self._plans[-1].end_step if self._plans else 0
        used: dict[str, None] = {}
        for ph in cfg.phases:
            used.update(dict.fromkeys(ph.domains))
        self._domains = list(used)
        files: dict[str, list[str]] = {}
        stores: dict[str, str] = {}
        datasets: set[str] = set()
        document_affixes(tokenizer, cfg.add_bos, cfg.add_eos)  # its error here, not in a worker
        for d in self._domains:
            if d not in cfg.domains:
                raise ValueError(f"a phase names domain {d!r}, which data.domains does not define")
            dom = cfg.domains[d]
            if dom.store:
                # Opened here too, so that a wrong store fails now, in the training process.
                TokenStore(dom.store).check(
                    tokenizer, cfg.add_bos, cfg.add_eos, f"data.domains.{d}.store"
                )
                stores[d], files[d] = dom.store, []
                continue
            if dom.dataset:
                try:
                    kind, files[d] = dataset_kind(dom.dataset)
                except ValueError as e:
                    raise ValueError(f"data.domains.{d}.dataset: {e}") from None
                if kind == "dataset":
                    datasets.add(d)
                continue
            files[d] = expand_globs(dom.train)
            if not files[d]:
                raise ValueError(f"domain {d!r}: its train globs match no file")
        self._spec = StreamSpec(
            files=files,
            text_fields={d: cfg.domains[d].text_field for d in self._domains},
            tokenizer=tokenizer,
            seq_len=seq_len,
            add_bos=cfg.add_bos,
            add_eos=cfg.add_eos,
            # Document boundaries travel as restarting positions: wanted for the positions
            # themselves or to mask attention between documents.
            position_ids=cfg.document_position_ids or not cfg.cross_document_attention,
            max_document_bytes=cfg.max_document_bytes,
            stores=stores,
            datasets=datasets,
        )
        self._step = 0
        self._states: dict[str, dict[str, Any]] = {}
        self._executor: InlineExecutor | ProcessExecutor | None = None
        self._planned: dict[int, list[str]] = {}
        self._next_submit = 0
        # (domain, num_tokens, seq_len) -> (token chunks, their document ids)
        self._heldout: dict[
            tuple[str, int, int], tuple[list[torch.Tensor], list[torch.Tensor]]
        ] = {}
        self._heldout_bad: dict[str, dict[str, Any]] = {}

    # ----------------------------------------------------------------------------------
    # Training batches
    # ----------------------------------------------------------------------------------

    def phases(self) -> list[PhasePlan]:
        """The phases on the step axis (cut at max_steps)."""
        return list(self._plans)

    def _phase_at(self, step: int) -> PhasePlan:
        for plan in self._plans:
            if plan.start_step <= step < plan.end_step:
                return plan
        raise StopIteration(f"step {step} is past the last phase (ends at {self._end_step})")

    def _running(self) -> InlineExecutor | ProcessExecutor:
        """The executor, started from the consumed state if it is not running."""
        if self._executor is None:
            states = copy.deepcopy(self._states)
            if self.cfg.num_workers > 0:
                self._executor = ProcessExecutor(
                    self._spec, states, self._domains, self.cfg.num_workers
                )
            else:
                self._executor = InlineExecutor(self._spec, states)
            self._planned.clear()
            self._next_submit = self._step
        return self._executor

    def _submit_through(self, last_step: int) -> None:
        """Plan steps up to ``last_step`` and queue their requests with the executor."""
        executor = self._running()
        while self._next_submit <= min(last_step, self._end_step - 1):
            step = self._next_submit
            picks = step_domains(
                self.cfg, self._phase_at(step).index, step, self.seed, self.global_rows
            )
            self._planned[step] = picks
            for domain in dict.fromkeys(picks):
                keep = [i in self.rows for i, p in enumerate(picks) if p == domain]
                executor.submit(step, domain, keep)
            self._next_submit += 1

    def next_batch(self) -> Batch:
        """Rows of this rank for the next optimizer step; StopIteration after the last phase."""
        plan = self._phase_at(self._step)
        ahead = self.prefetch_steps if self.cfg.num_workers > 0 else 0
        self._submit_through(self._step + ahead)
        picks = self._planned.pop(self._step)
        chunks: dict[str, Chunk] = {}
        for domain in dict.fromkeys(picks):
            chunks[domain] = self._running().result(self._step, domain)
            for message in chunks[domain].messages:
                log.warning("bad input: %s", message)

        local = np.empty((self.local_rows, self.seq_len), dtype=np.int32)
        positions = np.empty_like(local) if self._spec.position_ids else None
        taken = dict.fromkeys(chunks, 0)
        for row in self.rows:
            chunk = chunks[picks[row]]
            k = taken[picks[row]]
            local[row - self.rows.start] = chunk.tokens[k]
            if positions is not None and chunk.positions is not None:
                positions[row - self.rows.start] = chunk.positions[k]
            taken[picks[row]] = k + 1

        tokens_by_domain: dict[str, int] = {}
        for domain in picks:
            tokens_by_domain[domain] = tokens_by_domain.get(domain, 0) + self.seq_len
        for domain in tokens_by_domain:
            self._note_epoch(domain, chunks[domain].state["epoch"])
            self._states[domain] = chunks[domain].state
        self._step += 1
        input_ids = torch.from_numpy(local).long()
        pos = None if positions is None else torch.from_numpy(positions).long()
        return Batch(
            input_ids=input_ids,
            labels=input_ids.clone(),
            position_ids=pos if self.cfg.document_position_ids else None,
            document_ids=None
            if pos is None or self.cfg.cross_document_attention
            else document_ids_from_positions(pos),
            phase=plan.name,
            phase_index=plan.index,
            tokens_by_domain=tokens_by_domain,
        )

    def _note_epoch(self, domain: str, epoch: int) -> None:
        """Say once (rank 0) when a domain has run out of data and starts over: from then on
        its documents repeat, which a token budget larger than the data implies silently."""
        before = self._states.get(domain, {}).get("epoch", 0)
        if epoch > before and self.rows.start == 0:
            log.warning(
                "domain %r: all of its training data has been read by step %d; epoch %d "
                "starts (its documents repeat from here on)",
                domain,
                self._step + 1,
                epoch,
            )

    # ----------------------------------------------------------------------------------
    # Checkpointing and reports
    # ----------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Optimizer steps handed out so far."""
        return self._step

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable state at the last batch handed out."""
        return {
            "version": STATE_VERSION,
            "step": self._step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_rows": self.global_rows,
            "streams": copy.deepcopy(self._states),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken; prefetched data is dropped.

        Domains missing from the state (e.g. of a phase appended since) start fresh; domains
        in the state but no longer used are carried along unchanged.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} != {STATE_VERSION}")
        for key, mine in (("seed", self.seed), ("global_rows", self.global_rows)):
            if state[key] != mine:
                log.warning(
                    "data state was saved with %s=%s, this run has %s: the batch sequence "
                    "differs from the interrupted run's",
                    key,
                    state[key],
                    mine,
                )
        self.close()
        self._step = int(state["step"])
        # Token counts are the trainer's (TrainState); states saved before carry their own.
        self._states = copy.deepcopy(state["streams"])

    def epoch_by_domain(self) -> dict[str, int]:
        """Per domain read so far, how many times its data has wrapped around: 0 on the first
        pass over its files, 1 once it started over, ..."""
        return {d: int(s["epoch"]) for d, s in self._states.items()}

    def bad_input_report(self) -> dict[str, Any]:
        """Rejected records per domain and file: ``{domain: {path: {"counts": {reason: n},
        "samples": {reason: text}}}}``, as of the data consumed so far (held-out domains as
        ``heldout/<domain>``)."""
        report = {d: copy.deepcopy(s["bad"]) for d, s in self._states.items() if s["bad"]}
        report.update({f"heldout/{d}": copy.deepcopy(b) for d, b in self._heldout_bad.items() if b})
        return report

    # ----------------------------------------------------------------------------------
    # Held-out evaluation data
    # ----------------------------------------------------------------------------------

    def heldout_sequences(self, domain: str, num_tokens: int, seq_len: int) -> list[torch.Tensor]:
        """The first ``num_tokens`` held-out tokens of ``domain`` (documents with BOS/EOS, in
        file order), cut into ``seq_len`` pieces, the last possibly shorter. Same every call."""
        return list(self._heldout_chunks(domain, num_tokens, seq_len)[0])

    def heldout_document_ids(
        self, domain: str, num_tokens: int, seq_len: int
    ) -> list[torch.Tensor]:
        """Per chunk of :meth:`heldout_sequences` (same arguments), each token's document
        within the chunk: (L,) int64, 0, 0, 1, 1, 1, 2, ... (``train/packing.py``)."""
        return list(self._heldout_chunks(domain, num_tokens, seq_len)[1])

    def _heldout_chunks(
        self, domain: str, num_tokens: int, seq_len: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        key = (domain, num_tokens, seq_len)
        if key not in self._heldout:
            self._heldout[key] = self._read_heldout(domain, num_tokens, seq_len)
        return self._heldout[key]

    def _read_heldout(
        self, domain: str, num_tokens: int, seq_len: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        dom = self.cfg.domains[domain]
        if dom.heldout_store:
            store = TokenStore(dom.heldout_store)
            key = f"data.domains.{domain}.heldout_store"
            store.check(self.tokenizer, self.cfg.add_bos, self.cfg.add_eos, key)
            n = min(num_tokens, store.num_tokens)
            flat = torch.from_numpy(store.read(0, n)).long()
            self._warn_short_heldout(domain, len(flat), num_tokens)
            # The store's positions restart at each document start: its document index.
            doc_flat = document_ids_from_positions(torch.from_numpy(store.positions(0, n)).long())
            return list(flat.split(seq_len)), [d - d[0] for d in doc_flat.split(seq_len)]
        files = expand_globs(dom.heldout)
        if not files:
            log.warning("domain %r has no held-out files: no perplexity for it", domain)
            return [], []
        bad = BadInputLog()
        reader = DocumentReader(
            domain,
            files,
            dom.text_field,
            Position(0, 0, 0),
            bad,
            wrap=False,
            max_bytes=self.cfg.max_document_bytes,
        )
        pre, suf = document_affixes(self.tokenizer, self.cfg.add_bos, self.cfg.add_eos)
        ids: list[int] = []
        doc: list[int] = []  # per token, the index of its document in the held-out stream
        while len(ids) < num_tokens and not reader.exhausted:
            docs = reader.read(64)
            for x in self.tokenizer.encode_batch([text for text, _, _ in docs]):
                n = len(pre) + len(x) + len(suf)
                doc += [doc[-1] + 1 if doc else 0] * n
                ids += pre + x + suf
        for message in bad.drain_messages():
            log.warning("bad input: domain %r held-out: %s", domain, message)
        self._heldout_bad[domain] = bad.files
        self._warn_short_heldout(domain, len(ids), num_tokens)
        flat = torch.tensor(ids[:num_tokens], dtype=torch.long)
        docs_flat = torch.tensor(doc[:num_tokens], dtype=torch.long)
        return list(flat.split(seq_len)), [d - d[0] for d in docs_flat.split(seq_len)]

    @staticmethod
    def _warn_short_heldout(domain: str, got: int, asked: int) -> None:
        if got < asked:
            log.warning(
                "domain %r: held-out data holds only %d of the %d tokens asked for",
                domain,
                got,
                asked,
            )

    def close(self) -> None:
        """Stop background workers; the loader can continue later (they restart)."""
        if self._executor is not None:
            self._executor.close()
            self._executor = None
        self._planned.clear()

    def __enter__(self) -> CPTDataLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # At interpreter shutdown there is nobody left to report a failure to.
        with contextlib.suppress(Exception):
            self.close()
