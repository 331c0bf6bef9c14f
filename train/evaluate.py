"""Evaluation inside the training job: held-out perplexity per domain and multiple-choice tasks.

Everything here runs with the model in eval mode under ``torch.no_grad()`` and restores every
module's previous training flag afterwards, so hooks that collect training statistics (MIGU)
see nothing. ``model`` is any callable ``nn.Module`` with
``model(input_ids=...) -> output with .logits (B, T, V)``: a Hugging Face ``LlamaForCausalLM``
or the DeepSpeed engine wrapping it.

Distributed evaluation. When ``torch.distributed`` is initialised the work is split over the
ranks; otherwise the process is a world of one. Batches are planned identically on every rank
from the data alone (never from the world size), batch ``b`` runs on rank ``b % world``, and
ranks with fewer batches make dummy forwards so that every rank makes the same number of
forward calls (ZeRO-3 gathers parameters collectively inside each forward). Per-item results
are all-reduced by summation (float64 log-likelihoods, int64 token counts), so every rank
returns the same numbers, and they equal a one-process run up to float summation order.

Perplexity. Each held-out chunk is scored on its own: the NLL of token ``t+1`` given tokens
``<= t`` of the same chunk, so a chunk of ``L`` tokens contributes ``L - 1`` predictions.
Chunks are batched only with chunks of the same length (no padding); chunks shorter than two
tokens are skipped. ``ppl = exp(nll_sum / tokens)``. A chunk holds several documents (the
held-out documents are concatenated, as in training); without cross-document attention
(``data.cross_document_attention: false``, the default) each of its tokens is predicted from
its own document's earlier tokens only, with the same masking as training
(``train/packing.py``), so that held-out perplexity measures what training optimises and does
not depend on which documents happen to precede. The prediction of a document's first token
(after the previous document's EOS) still counts: it is made from the previous document.

Multiple choice, the way lm-evaluation-harness scores ``multiple_choice`` tasks:

* prompt: ``num_fewshot`` examples drawn from the few-shot pool with ``random.Random`` seeded by
  the example id (the example itself excluded if it is in the pool), each written as
  ``context + gold_choice``, joined and followed by the example's context with ``"\\n\\n"``;
* tokens: lm-eval's ``_encode_pair`` with a BOS token: trailing spaces of the context move to
  the continuation, the whole string ``context + choice`` is encoded, and the continuation is
  the tokens after ``len(encode(context))``; the context gets BOS in front
  (lm-eval ``add_bos_token=True``), or EOS with a tokenizer without BOS (Qwen2's), as
  lm-eval's ``prefix_token_id`` falls back to EOS;
* score: the sum of log-probabilities of the continuation tokens; the model input is
  ``(context + continuation)[-(max_len + 1):][:-1]`` (left truncation, as lm-eval), with
  ``max_len`` the model's context length by default (:func:`task_max_len`), as lm-eval;
* ``acc``: argmax of the sums is the gold index (first maximum wins, as ``np.argmax``);
  ``acc_norm``: argmax of sum / character length of the choice. Task files store each choice
  with its leading delimiter space (``" Paris"``) while lm-eval divides by the length of the
  bare choice (``"Paris"``), so one leading space is not counted.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from migu_dist.dist import all_reduce_sum, world
from train import cl_metrics, plots
from train.cl_metrics import INITIAL_PHASE_INDEX
from train.config import EvalConfig
from train.packing import DocumentMasking
from train.tracking import JsonlLog, read_rows


class TokenizerLike(Protocol):
    """What evaluation needs from a tokenizer."""

    bos_id: int | None
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        ...


# --------------------------------------------------------------------------------------
# Shared machinery: eval mode, the rank split, reductions
# --------------------------------------------------------------------------------------


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad inside; every module's own training flag restored afterwards.

    Flags are saved per module because a DeepSpeed engine's ``eval()`` only switches the
    module it wraps, so ``engine.training`` alone does not tell the previous state.
    """
    modules = list(model.modules())
    flags = [m.training for m in modules]
    model.eval()
    for m in modules:
        m.training = False
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag


def _plan_batches(lengths: Sequence[int], batch_size: int, *, same_length: bool) -> list[list[int]]:
    """Indices grouped into batches, longest first; depends on the data only, not the world."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        last = batches[-1] if batches else None
        if (
            last is not None
            and len(last) < batch_size
            and (not same_length or lengths[last[0]] == lengths[i])
        ):
            last.append(i)
        else:
            batches.append([i])
    return batches


def _run_sharded(
    model: nn.Module,
    batches: list[list[int]],
    run_batch: Callable[[list[int]], None],
    *,
    device: torch.device | str,
) -> None:
    """Run this rank's share of ``batches``, then dummy forwards up to the busiest rank's count."""
    rank, size = world()
    mine = batches[rank::size]
    calls = -(-len(batches) // size)
    for batch in mine:
        run_batch(batch)
    dummy = torch.zeros((1, 1), dtype=torch.long, device=device)
    for _ in range(calls - len(mine)):
        model(input_ids=dummy)  # result discarded; keeps ZeRO-3 gathers in step


def _logits(model: nn.Module, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    out = model(input_ids=input_ids, **kwargs)
    return out.logits if hasattr(out, "logits") else out[0]


# --------------------------------------------------------------------------------------
# Held-out perplexity
# --------------------------------------------------------------------------------------


def heldout_perplexity(
    model: nn.Module,
    sequences: Sequence[torch.Tensor],
    *,
    batch_size: int,
    device: torch.device | str,
    documents: Sequence[torch.Tensor] | None = None,
    masking: DocumentMasking | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` on fixed token chunks (1-D LongTensors, any lengths).

    ``documents`` (with ``masking``): per chunk, each token's document id (same shapes as
    ``sequences``); tokens then attend only within their document. Returns
    ``{"nll_sum": float, "tokens": int, "ppl": float}`` summed over all ranks; ``ppl`` is NaN
    when no chunk has two tokens.
    """
    if (documents is None) != (masking is None):
        raise ValueError("heldout_perplexity: give documents and masking together")
    keep = [i for i, s in enumerate(sequences) if s.numel() >= 2]
    seqs = [sequences[i].reshape(-1) for i in keep]
    docs = None if documents is None else [documents[i].reshape(-1) for i in keep]
    batches = _plan_batches([s.numel() for s in seqs], batch_size, same_length=True)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.int64, device=device)

    def run_batch(batch: list[int]) -> None:
        nonlocal nll, tokens
        ids = torch.stack([seqs[i] for i in batch]).to(device)  # (B, T)
        extra = {}
        if docs is not None and masking is not None:
            extra = masking.inputs(torch.stack([docs[i] for i in batch]), device)
        logits = _logits(model, ids, **extra)  # (B, T, V)
        for row in range(ids.shape[0]):  # one row at a time: the float32 copy stays (T, V)
            losses = F.cross_entropy(logits[row, :-1].float(), ids[row, 1:], reduction="none")
            nll = nll + losses.double().sum()
        tokens = tokens + ids[:, 1:].numel()

    with eval_mode(model):
        _run_sharded(model, batches, run_batch, device=device)
    nll_sum = all_reduce_sum(nll).item()
    n = int(all_reduce_sum(tokens).item())
    return {"nll_sum": nll_sum, "tokens": n, "ppl": math.exp(nll_sum / n) if n else math.nan}


# --------------------------------------------------------------------------------------
# Multiple-choice tasks
# --------------------------------------------------------------------------------------


def load_jsonl(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file (blank lines skipped), the first ``limit`` if given."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def fewshot_context(
    example: dict[str, Any], pool: Sequence[dict[str, Any]], num_fewshot: int
) -> str:
    """The example's context preceded by ``num_fewshot`` solved examples from ``pool``.

    The shots are drawn with ``random.Random("fewshot:<id>")`` (string seeds are hashed with
    SHA-512, so the draw is the same in every process), excluding an entry with the same id.
    """
    if num_fewshot <= 0:
        return example["context"]
    candidates = [e for e in pool if e.get("id") != example.get("id")]
    if len(candidates) < num_fewshot:
        raise ValueError(
            f"num_fewshot={num_fewshot} but the few-shot pool has only {len(candidates)} "
            "usable examples; lower num_fewshot or give a larger fewshot file."
        )
    shots = random.Random(f"fewshot:{example['id']}").sample(candidates, num_fewshot)
    demos = [s["context"] + s["choices"][s["gold"]] for s in shots]
    return "\n\n".join([*demos, example["context"]])


def encode_pair(
    tokenizer: TokenizerLike, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair`` with a prefix token: (BOS + context tokens, continuation
    tokens); EOS stands in for BOS when the tokenizer has none."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = list(tokenizer.encode(context + continuation))
    ctx = list(tokenizer.encode(context))
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    return [prefix, *ctx], whole[len(ctx) :]


def task_max_len(cfg: EvalConfig, model: nn.Module) -> int:
    """Longest model input for task scoring: ``eval.max_len``, else the model's context length
    (``config.max_position_embeddings``), which is lm-eval's ``max_length`` for the model."""
    config: Any = model.config
    return cfg.max_len or int(config.max_position_embeddings)


def choice_length(choice: str) -> int:
    """Characters lm-eval divides by for acc_norm: the choice without its leading delimiter."""
    bare = choice.removeprefix(" ")
    return max(len(bare), 1)


@dataclass
class PreparedTask:
    """A tokenised task: one request per (example, choice)."""

    inputs: list[list[int]]
    """Model input per request: ``(context + continuation)[-(max_len + 1):][:-1]``."""
    cont_lens: list[int]
    """Continuation tokens per request; they are the last ``cont_lens`` targets of the input."""
    targets: list[list[int]]
    """Continuation token ids per request."""
    example_of: list[int]
    """Example index of each request."""
    choice_lens: list[list[int]]
    """Per example, per choice: character length for acc_norm."""
    golds: list[int]
    """Per example: index of the correct choice."""


def prepare_task(
    tokenizer: TokenizerLike,
    examples: Sequence[dict[str, Any]],
    fewshot_examples: Sequence[dict[str, Any]],
    num_fewshot: int,
    *,
    max_len: int,
) -> PreparedTask:
    """Build the few-shot prompts and tokenise every (example, choice) pair once."""
    task = PreparedTask([], [], [], [], [], [])
    for ei, ex in enumerate(examples):
        if not 0 <= ex["gold"] < len(ex["choices"]):
            raise ValueError(f"example {ex.get('id')!r}: gold {ex['gold']} is out of range.")
        context = fewshot_context(ex, fewshot_examples, num_fewshot)
        for choice in ex["choices"]:
            ctx, cont = encode_pair(tokenizer, context, choice)
            if len(cont) > max_len:
                raise ValueError(
                    f"example {ex.get('id')!r}: a choice of {len(cont)} tokens does not fit "
                    f"max_len={max_len}."
                )
            task.inputs.append((ctx + cont)[-(max_len + 1) :][:-1])
            task.cont_lens.append(len(cont))
            task.targets.append(cont)
            task.example_of.append(ei)
        task.choice_lens.append([choice_length(c) for c in ex["choices"]])
        task.golds.append(int(ex["gold"]))
    return task


def loglikelihoods(
    model: nn.Module, task: PreparedTask, *, batch_size: int, device: torch.device | str
) -> list[float]:
    """Sum of continuation log-probabilities for every request, identical on every rank."""
    # Requests with an empty continuation score 0 and need no forward.
    todo = [r for r in range(len(task.inputs)) if task.cont_lens[r] > 0]
    batches = _plan_batches([len(task.inputs[r]) for r in todo], batch_size, same_length=False)
    batches = [[todo[i] for i in b] for b in batches]
    lls = torch.zeros(len(task.inputs), dtype=torch.float64, device=device)

    def run_batch(batch: list[int]) -> None:
        width = max(len(task.inputs[r]) for r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):  # right padding: causal attention never sees it
            ids[row, : len(task.inputs[r])] = torch.tensor(task.inputs[r])
        logits = _logits(model, ids.to(device))  # (B, T, V)
        for row, r in enumerate(batch):
            end, n = len(task.inputs[r]), task.cont_lens[r]
            logp = torch.log_softmax(logits[row, end - n : end].float(), dim=-1)  # (n, V)
            target = torch.tensor(task.targets[r], device=logp.device)
            lls[r] = logp.gather(-1, target[:, None]).double().sum()

    with eval_mode(model):
        _run_sharded(model, batches, run_batch, device=device)
    return all_reduce_sum(lls).tolist()


def predictions(task: PreparedTask, lls: Sequence[float]) -> list[tuple[int, int]]:
    """Per example, the chosen index by log-likelihood and by length-normalised log-likelihood
    (first maximum wins on ties, as ``np.argmax``)."""
    per_example: list[list[float]] = [[] for _ in task.golds]
    for r, ll in enumerate(lls):
        per_example[task.example_of[r]].append(ll)
    preds = []
    for scores, lens in zip(per_example, task.choice_lens):
        normed = [s / n for s, n in zip(scores, lens)]
        preds.append(
            (
                max(range(len(scores)), key=scores.__getitem__),
                max(range(len(normed)), key=normed.__getitem__),
            )
        )
    return preds


def accuracy(task: PreparedTask, lls: Sequence[float]) -> dict[str, Any]:
    """acc and acc_norm from per-request log-likelihoods (see :func:`predictions`)."""
    preds = predictions(task, lls)
    correct = sum(p == gold for (p, _), gold in zip(preds, task.golds))
    correct_norm = sum(p == gold for (_, p), gold in zip(preds, task.golds))
    n = len(task.golds)
    return {
        "acc": correct / n if n else math.nan,
        "acc_norm": correct_norm / n if n else math.nan,
        "n": n,
    }


def score_task(
    model: nn.Module,
    tokenizer: TokenizerLike,
    examples: Sequence[dict[str, Any]],
    fewshot_examples: Sequence[dict[str, Any]],
    num_fewshot: int,
    *,
    batch_size: int,
    device: torch.device | str,
    max_len: int,
) -> dict[str, Any]:
    """lm-eval style multiple-choice accuracy: ``{"acc", "acc_norm", "n"}``."""
    task = prepare_task(tokenizer, examples, fewshot_examples, num_fewshot, max_len=max_len)
    return accuracy(task, loglikelihoods(model, task, batch_size=batch_size, device=device))


# --------------------------------------------------------------------------------------
# The evaluator the trainer calls
# --------------------------------------------------------------------------------------


class Evaluator:
    """Periodic evaluation: perplexity per held-out domain and accuracy per task.

    Every rank must call :meth:`evaluate` at the same points (it runs collective forwards);
    only the main rank writes files. Rows go to ``<output_dir>/evals.jsonl``;
    :meth:`write_report` turns the phase-end rows into the continual-learning report.
    """

    def __init__(
        self,
        cfg: EvalConfig,
        tokenizer: TokenizerLike,
        heldout: dict[str, list[torch.Tensor]],
        output_dir: str | Path,
        *,
        device: torch.device | str,
        is_main: bool,
        max_len: int,
        heldout_documents: dict[str, list[torch.Tensor]] | None = None,
        masking: DocumentMasking | None = None,
    ):
        """``heldout_documents`` and ``masking``: the document ids of each held-out chunk and
        the model's masking, for perplexity without cross-document attention (both or
        neither)."""
        self.cfg = cfg
        self.heldout = heldout
        self.heldout_documents = heldout_documents
        self.masking = masking
        self.output_dir = Path(output_dir)
        self.device = device
        self.is_main = is_main
        self.evals_log = JsonlLog(self.evals_path)  # opened at the first row (main rank)
        self.tasks: dict[str, PreparedTask] = {}
        for t in cfg.tasks:
            examples = load_jsonl(t.path, t.limit)
            pool = load_jsonl(t.fewshot_path) if t.fewshot_path and t.num_fewshot else []
            self.tasks[t.name] = prepare_task(
                tokenizer, examples, pool, t.num_fewshot, max_len=max_len
            )

    @property
    def evals_path(self) -> Path:
        return self.output_dir / "evals.jsonl"

    @property
    def report_path(self) -> Path:
        return self.output_dir / "cl_report.json"

    def evaluate(
        self,
        model: nn.Module,
        *,
        step: int,
        phase: str,
        phase_index: int,
        phase_end: bool,
        tasks: bool = True,
    ) -> dict[str, Any]:
        """Evaluate every domain and task; append the row to evals.jsonl (main rank); return it.
        ``tasks=False`` skips the tasks (the row then has no task entries).

        The row: ``{"step", "phase", "phase_index", "phase_end", "ppl": {domain: ppl},
        "acc": {task: acc}, "acc_norm": {task: acc_norm}, "tokens": {domain: predicted tokens},
        "n": {task: examples}, "seconds"}``; a value that cannot be computed is None.
        For the baseline of forward transfer, evaluate the starting model with
        ``step=0, phase=cl_metrics.INITIAL_PHASE, phase_index=INITIAL_PHASE_INDEX`` (phase_end
        ignored).
        """
        start = time.perf_counter()
        bs = self.cfg.batch_size
        row: dict[str, Any] = {
            "step": step,
            "phase": phase,
            "phase_index": phase_index,
            "phase_end": phase_end,
            "ppl": {},
            "acc": {},
            "acc_norm": {},
            "tokens": {},
            "n": {},
        }
        for domain, seqs in self.heldout.items():
            docs = None if self.heldout_documents is None else self.heldout_documents[domain]
            r = heldout_perplexity(
                model, seqs, batch_size=bs, device=self.device, documents=docs,
                masking=self.masking if docs is not None else None,
            )  # fmt: skip
            row["ppl"][domain] = _finite_or_none(r["ppl"])
            row["tokens"][domain] = r["tokens"]
        for name, task in self.tasks.items() if tasks else ():
            lls = loglikelihoods(model, task, batch_size=bs, device=self.device)
            r = accuracy(task, lls)
            row["acc"][name] = _finite_or_none(r["acc"])
            row["acc_norm"][name] = _finite_or_none(r["acc_norm"])
            row["n"][name] = r["n"]
        row["seconds"] = round(time.perf_counter() - start, 3)
        if self.is_main:
            self.evals_log.append(row)  # a failed write is reported and retried, not fatal
        return row

    def write_report(
        self, phase_names: list[str], phase_domains: dict[str, list[str]] | None = None
    ) -> dict[str, Any]:
        """Build the continual-learning report from evals.jsonl (main rank; others get {}).

        ``phase_domains`` maps phase name -> domains trained in it; a domain is "learned" in
        the first phase that lists it. When None it is read from the run's saved
        ``<output_dir>/config.yaml`` (``data.phases``); failing that, a domain named like a
        phase belongs to that phase. Writes cl_report.json and plots/*.png.
        """
        if not self.is_main:
            return {}
        if phase_domains is None:
            phase_domains = _phase_domains_from_saved_config(self.output_dir / "config.yaml")
        self.evals_log.flush()
        rows = read_rows(self.evals_path)
        report = build_report(rows, phase_names, phase_domains)
        self.report_path.write_text(json.dumps(report, indent=2) + "\n")
        plots.plot_report(report, rows, self.output_dir / "plots")
        return report


def _phase_domains_from_saved_config(path: Path) -> dict[str, list[str]] | None:
    if not path.is_file():
        return None
    import yaml

    phases = ((yaml.safe_load(path.read_text()) or {}).get("data") or {}).get("phases") or []
    return {p["name"]: list(p.get("domains") or {}) for p in phases if "name" in p} or None


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def build_report(
    rows: Sequence[dict[str, Any]],
    phase_names: Sequence[str],
    phase_domains: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """The cl_report.json content from evals.jsonl rows.

    Row ``i`` of each matrix is the last phase-end row with ``phase_index == i`` (a resumed run
    may have evaluated the same phase end twice); ``initial`` is the last row with
    ``phase_index == INITIAL_PHASE_INDEX``. Missing phases are rows of None.
    """
    phase_end: dict[int, dict[str, Any]] = {}
    initial = None
    for row in rows:
        if row["phase_index"] == INITIAL_PHASE_INDEX:
            initial = row
        elif row.get("phase_end"):
            phase_end[row["phase_index"]] = row
    ordered = [phase_end.get(i) for i in range(len(phase_names))]
    domains = _keys_in_order(rows, "ppl")
    tasks = _keys_in_order(rows, "acc")

    def matrix(kind: str, items: list[str]) -> list[list[float | None]]:
        return [[(r or {}).get(kind, {}).get(k) for k in items] for r in ordered]

    def baseline(kind: str, items: list[str]) -> list[float | None] | None:
        return None if initial is None else [initial.get(kind, {}).get(k) for k in items]

    item_phase: dict[str, int] = {}
    for p, name in enumerate(phase_names):
        listed = (phase_domains or {}).get(name, [name] if phase_domains is None else [])
        for d in listed:
            item_phase.setdefault(d, p)
    completed = sum(r is not None for r in ordered)
    report: dict[str, Any] = {
        "phases": list(phase_names),
        "completed_phases": completed,
        "steps": [None if r is None else r["step"] for r in ordered],
        "domains": domains,
        "tasks": tasks,
        "item_phase": {d: item_phase[d] for d in domains if d in item_phase},
        "ppl": cl_metrics.perplexity_report(
            matrix("ppl", domains), domains, item_phase, baseline("ppl", domains)
        ),
    }
    for kind in ("acc", "acc_norm"):
        report[kind] = cl_metrics.task_report(matrix(kind, tasks), tasks, baseline(kind, tasks))
    return report


def _keys_in_order(rows: Sequence[dict[str, Any]], kind: str) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for k in row.get(kind, {}):
            seen.setdefault(k, None)
    return list(seen)
