"""Continual-learning metrics from an accuracy/perplexity matrix (pure Python, no torch).

The matrix. ``R[i][j]`` is the score on item ``j`` (a held-out domain or a task) measured at
the end of phase ``i``; rows follow the training order. ``None`` (or NaN) marks a value that
was not measured; such terms are skipped. The *final* row is the last row holding any value,
so a run stopped after its second of three phases is summarised after phase two.

Items and phases. ``item_phase[name] = i`` says item ``name`` is learned in phase ``i`` (for a
domain: the first phase whose mixture includes it). Items missing from ``item_phase`` are never
trained on (e.g. a held-out-only domain): they count in averages but not in BWT/FWT.

Definitions (Lopez-Paz & Ranzato 2017, GEM), on a score where higher is better:

* ``average``: mean over items of the final row.
* ``BWT`` = mean over items ``j`` learned in phase ``p_j`` before the final phase ``F`` of
  ``R[F][j] - R[p_j][j]``: how much training on later phases changed the items learned before.
* ``FWT`` = mean over items ``j`` learned in a phase ``p_j >= 1`` (up to ``F``) of
  ``R[p_j - 1][j] - b_j`` with ``b_j`` the starting model's score (the ``initial`` row): how much
  the earlier phases helped an item before it was trained on. Needs the baseline.

Sign convention: positive BWT/FWT is always an improvement, negative BWT is forgetting.
Perplexity is lower-is-better, so it is converted first:

* ``bwt`` / ``fwt`` (the headline numbers) use the score ``-ln(ppl)`` = minus the mean NLL per
  token in nats. ``bwt = -0.1`` means that the earlier domains' NLL rose by 0.1 nat/token on
  average (their perplexity grew by a factor ``e^0.1``, about 10%). This is scale-free across
  domains of very different perplexity.
* ``bwt_ppl`` / ``fwt_ppl`` are the same formulas on ``-ppl``, i.e. perplexity points with the
  sign flipped: ``bwt_ppl = mean(ppl after learning - ppl at the end)``; ``-3.2`` means the
  earlier domains' perplexity went up by 3.2 on average.
* ``average`` for perplexity is the arithmetic mean of the final perplexities (lower is
  better); ``average_nll`` is the mean of ``ln ppl`` (nats/token, lower is better).

Tasks have no phase of their own: their report gives the final average, the change from the end
of the first phase to the final row (``change``: final minus after-first-phase) and, with a
baseline, the change from the starting model. Accuracies are higher-is-better, so positive
changes are improvements there too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeGuard

Matrix = Sequence[Sequence[float | None]]

INITIAL_PHASE = "initial"
"""Phase name of the optional evaluation of the starting model (step 0)."""
INITIAL_PHASE_INDEX = -1
"""Phase index of that row; it is the baseline of forward transfer."""


def _ok(x: float | None) -> TypeGuard[float]:
    return x is not None and math.isfinite(x)


def _mean(values: Sequence[float | None]) -> float | None:
    vals: list[float] = [v for v in values if _ok(v)]
    return sum(vals) / len(vals) if vals else None


def final_row_index(R: Matrix) -> int | None:
    """Index of the last row holding any value (the last completed phase), or None."""
    for i in range(len(R) - 1, -1, -1):
        if any(_ok(v) for v in R[i]):
            return i
    return None


def average(R: Matrix) -> float | None:
    """Mean over items of the final row."""
    f = final_row_index(R)
    return None if f is None else _mean(R[f])


def backward_transfer_per_item(R: Matrix, phases: Sequence[int | None]) -> list[float | None]:
    """``R[F][j] - R[p_j][j]`` per item (None when the item has no defined term)."""
    f = final_row_index(R)
    out: list[float | None] = []
    for j, p in enumerate(phases):
        end, learned = (None, None) if f is None or p is None or p >= f else (R[f][j], R[p][j])
        out.append(end - learned if _ok(end) and _ok(learned) else None)
    return out


def backward_transfer(R: Matrix, phases: Sequence[int | None]) -> float | None:
    """GEM BWT; ``phases[j]`` is the phase in which item ``j`` is learned (None: never)."""
    return _mean(backward_transfer_per_item(R, phases))


def forward_transfer(
    R: Matrix, phases: Sequence[int | None], baseline: Sequence[float | None] | None
) -> float | None:
    """GEM FWT against ``baseline[j]``, the starting model's score; None without a baseline."""
    f = final_row_index(R)
    if baseline is None or f is None:
        return None
    terms = []
    for j, p in enumerate(phases):
        before, base = (R[p - 1][j], baseline[j]) if p is not None and 1 <= p <= f else (None, None)
        if _ok(before) and _ok(base):
            terms.append(before - base)
    return _mean(terms)


def _map(R: Matrix, fn: Callable[[float | None], float | None]) -> list[list[float | None]]:
    return [[fn(v) for v in row] for row in R]


def _neg_log(x: float | None) -> float | None:
    return -math.log(x) if _ok(x) and x > 0 else None


def _neg(x: float | None) -> float | None:
    return -x if _ok(x) else None


def perplexity_report(
    ppl: Matrix,
    domains: Sequence[str],
    item_phase: Mapping[str, int],
    baseline: Sequence[float | None] | None = None,
) -> dict[str, Any]:
    """Summary of a perplexity matrix (rows: phases, columns: ``domains``); see module doc."""
    phases = [item_phase.get(d) for d in domains]
    score = _map(ppl, _neg_log)  # -ln ppl: higher is better
    neg = _map(ppl, _neg)  # -ppl: higher is better
    base_score = None if baseline is None else [_neg_log(b) for b in baseline]
    base_neg = None if baseline is None else [_neg(b) for b in baseline]
    f = final_row_index(ppl)
    final = [None] * len(domains) if f is None else list(ppl[f])
    per_item = backward_transfer_per_item(score, phases)
    return {
        "matrix": [list(r) for r in ppl],
        "initial": None if baseline is None else list(baseline),
        "final": dict(zip(domains, final)),
        "average": _mean(final),
        "average_nll": None if f is None else _mean([_neg(s) for s in score[f]]),
        "bwt": backward_transfer(score, phases),
        "fwt": forward_transfer(score, phases, base_score),
        "bwt_ppl": backward_transfer(neg, phases),
        "fwt_ppl": forward_transfer(neg, phases, base_neg),
        "bwt_per_domain": {d: v for d, v in zip(domains, per_item) if v is not None},
        "units": "bwt/fwt: nats/token of -ln(ppl); bwt_ppl/fwt_ppl: ppl points, sign flipped; "
        "positive = improvement, negative = forgetting",
    }


def task_report(
    acc: Matrix, tasks: Sequence[str], baseline: Sequence[float | None] | None = None
) -> dict[str, Any]:
    """Summary of a task matrix (rows: phases, columns: ``tasks``; higher is better)."""
    f = final_row_index(acc)
    final = [None] * len(tasks) if f is None else list(acc[f])
    first = final_row_index(acc[:1])

    def delta(a: float | None, b: float | None) -> float | None:
        return a - b if _ok(a) and _ok(b) else None

    change = [None] * len(tasks) if first is None else [delta(a, b) for a, b in zip(final, acc[0])]
    out: dict[str, Any] = {
        "matrix": [list(r) for r in acc],
        "initial": None if baseline is None else list(baseline),
        "final": dict(zip(tasks, final)),
        "average": _mean(final),
        "change": dict(zip(tasks, change)),
        "average_change": _mean(change),
    }
    if baseline is not None:
        from_init = [delta(a, b) for a, b in zip(final, baseline)]
        out["change_from_initial"] = dict(zip(tasks, from_init))
        out["average_change_from_initial"] = _mean(from_init)
    return out


# --------------------------------------------------------------------------------------
# Side-by-side comparison of runs (used by launch/compare.py)
# --------------------------------------------------------------------------------------


def compare_rows(reports: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, list[float | None]]]:
    """(metric name, value per run) for a table of several cl_report.json contents."""
    runs = list(reports.values())

    def get(rep: Mapping[str, Any], *keys: str) -> float | None:
        node: Any = rep
        for k in keys:
            if not isinstance(node, Mapping) or k not in node:
                return None
            node = node[k]
        return node if isinstance(node, (int, float)) else None

    rows: list[tuple[str, list[float | None]]] = [
        ("ppl average (final, lower better)", [get(r, "ppl", "average") for r in runs]),
        ("ppl BWT (nats, +better)", [get(r, "ppl", "bwt") for r in runs]),
        ("ppl FWT (nats, +better)", [get(r, "ppl", "fwt") for r in runs]),
        ("ppl BWT (ppl points, +better)", [get(r, "ppl", "bwt_ppl") for r in runs]),
        ("ppl FWT (ppl points, +better)", [get(r, "ppl", "fwt_ppl") for r in runs]),
    ]
    domains = _union(r.get("domains", []) for r in runs)
    rows += [(f"ppl {d}", [get(r, "ppl", "final", d) for r in runs]) for d in domains]
    tasks = _union(r.get("tasks", []) for r in runs)
    if tasks:
        rows.append(("acc average", [get(r, "acc", "average") for r in runs]))
        rows.append(("acc_norm average", [get(r, "acc_norm", "average") for r in runs]))
        rows += [(f"acc {t}", [get(r, "acc", "final", t) for r in runs]) for t in tasks]
        rows += [(f"acc_norm {t}", [get(r, "acc_norm", "final", t) for r in runs]) for t in tasks]
    return rows


def format_table(names: Sequence[str], rows: Sequence[tuple[str, Sequence[float | None]]]) -> str:
    """Plain-text table: one metric per line, one column per run."""
    cells = [[f"{v:.4f}" if _ok(v) else "-" for v in values] for _, values in rows]
    first = max([len(m) for m, _ in rows] + [len("metric")])
    widths = [max([len(n)] + [len(c[k]) for c in cells]) for k, n in enumerate(names)]
    lines = ["metric".ljust(first) + "".join(f"  {n:>{w}}" for n, w in zip(names, widths))]
    for (metric, _), row in zip(rows, cells):
        lines.append(metric.ljust(first) + "".join(f"  {c:>{w}}" for c, w in zip(row, widths)))
    return "\n".join(lines)


def _union(lists: Any) -> list[str]:
    seen: dict[str, None] = {}
    for items in lists:
        for x in items:
            seen.setdefault(x, None)
    return list(seen)
