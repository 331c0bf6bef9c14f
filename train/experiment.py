"""Summarising a multi-run, multi-seed continual-learning experiment (pure Python + torch).

Used by ``scripts/run_experiments.py``. Each run continually pre-trains one starting model
through ordered phases, each phase adding new domains; its evaluation rows (``evals.jsonl``,
one per phase end) and the shared evaluation of the starting model give:

* ``forgetting``: the mean over the *general* domains (what the model knew: never trained on)
  of ``ln ppl_final - ln ppl_initial``, in nats/token. Positive = forgot; ``+0.1`` means the
  general perplexity grew by a factor ``e^0.1``, about 10%.
* ``general_ppl/<phase>``: geometric mean of the general domains' perplexity after each phase
  (and ``initial``); geometric so that a domain of high perplexity does not dominate.
* ``learned_ppl``: geometric mean over the new domains of their perplexity at the end of the
  phase that trained them: how well each new domain was learned (lower is better).
* ``ppl/<domain>/<phase>``: every perplexity after every phase.
* ``acc/<task>``, ``acc_mean``: final zero-shot accuracy, ``acc_change``: its change from
  the starting model (``acc_mean`` final minus initial).
* ``dw/<phase>``: the L2 norm of the weight change over the phase (all parameters, LoRA
  adapters merged into the weights they adapt), ``dw_total`` its root sum of squares over
  the phases: the step-size control (plain at a matched LR moves the weights as far).

Seeds. ``aggregate`` gives per metric the mean, the sample standard deviation (``n - 1``)
and ``n``. ``beyond_spread`` says whether a difference of means exceeds twice its standard
error ``sqrt(s_a^2/n_a + s_b^2/n_b)``; a method run with one seed borrows the reference's
standard deviation (the seed spread is assumed to be a property of the setup, not of the
method); with no spread at all the answer is None (unknown).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from train.cl_metrics import INITIAL_PHASE


def geomean(values: Sequence[float]) -> float:
    """exp(mean ln v): a mean of perplexities where no domain dominates."""
    return math.exp(sum(math.log(v) for v in values) / len(values))


def phase_end_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Phase name -> the last phase-end evaluation row of that phase (a resumed run may have
    evaluated the same phase end twice)."""
    out: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        if row.get("phase_end") and row.get("phase_index", -1) >= 0:
            out[row["phase"]] = row
    return out


def run_summary(
    initial: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    phases: Mapping[str, Sequence[str]],
    general: Sequence[str],
    weight_change: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The metrics of one run (see the module doc).

    ``initial`` is the starting model's evaluation row, ``rows`` the run's evaluation rows,
    ``phases`` maps each phase name (in training order) to the new domains it trains,
    ``general`` names the domains the model knew before (never trained on here)."""
    ends = phase_end_rows(rows)
    missing = [p for p in phases if p not in ends]
    if missing:
        raise ValueError(f"no phase-end evaluation for phase(s) {missing}: the run is unfinished")
    final = ends[list(phases)[-1]]
    out: dict[str, float] = {}
    for name, row in [(INITIAL_PHASE, initial), *ends.items()]:
        out[f"general_ppl/{name}"] = geomean([row["ppl"][d] for d in general])
        for domain, ppl in row["ppl"].items():
            out[f"ppl/{domain}/{name}"] = ppl
    out["forgetting"] = sum(
        math.log(final["ppl"][d]) - math.log(initial["ppl"][d]) for d in general
    ) / len(general)
    out["learned_ppl"] = geomean([ends[p]["ppl"][d] for p, ds in phases.items() for d in ds])
    tasks = list(final.get("acc", {}))
    for t in tasks:
        out[f"acc/{t}"] = final["acc"][t]
    if tasks:
        out["acc_mean"] = sum(final["acc"][t] for t in tasks) / len(tasks)
        out["acc_change"] = out["acc_mean"] - sum(initial["acc"][t] for t in tasks) / len(tasks)
    if weight_change:
        for p, v in weight_change.items():
            out[f"dw/{p}"] = v
        out["dw_total"] = math.sqrt(sum(v * v for v in weight_change.values()))
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator; None for one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    m = sum(values) / n
    if n == 1:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def aggregate(summaries: Sequence[Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """Per metric over the runs (seeds) of one method: ``{"mean", "std", "n"}``; a metric
    missing from some runs is aggregated over the runs that have it."""
    keys: dict[str, None] = {}
    for s in summaries:
        keys.update(dict.fromkeys(s))
    out: dict[str, dict[str, Any]] = {}
    for k in keys:
        vals = [s[k] for s in summaries if k in s and s[k] is not None]
        if vals:
            m, sd = mean_std(vals)
            out[k] = {"mean": m, "std": sd, "n": len(vals)}
    return out


def beyond_spread(a: Mapping[str, Any], ref: Mapping[str, Any]) -> bool | None:
    """Whether ``a["mean"] - ref["mean"]`` exceeds twice its standard error (module doc)."""
    s_ref = ref.get("std")
    s_a = a.get("std") if a.get("std") is not None else s_ref
    if s_ref is None:
        s_ref = s_a
    if s_a is None or s_ref is None:
        return None
    se = math.sqrt(s_a**2 / a["n"] + s_ref**2 / ref["n"])
    return abs(a["mean"] - ref["mean"]) > 2 * se


def merged_weights(state: Mapping[str, torch.Tensor], lora_scale: float) -> dict[str, torch.Tensor]:
    """A model state dict with peft LoRA adapters merged: ``W + scale * B @ A`` under the
    plain name (``x.base_layer.weight`` + ``x.lora_A.default.weight`` ... -> ``x.weight``)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if ".lora_A." in k or ".lora_B." in k:
            continue
        if k.endswith(".base_layer.weight"):
            prefix = k[: -len(".base_layer.weight")]
            a = state[f"{prefix}.lora_A.default.weight"].detach().float()  # (r, in)
            b = state[f"{prefix}.lora_B.default.weight"].detach().float()  # (out, r)
            out[f"{prefix}.weight"] = v.detach().float() + lora_scale * (b @ a)
        else:
            out[k.replace(".base_layer.", ".")] = v.detach().float()
    return out


def weight_change(
    start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor], lora_scale: float = 0.0
) -> float:
    """L2 norm of ``end - start`` over the parameters both hold (LoRA merged in both)."""
    a, b = merged_weights(start, lora_scale), merged_weights(end, lora_scale)
    common = [k for k in a if k in b]
    if not common:
        raise ValueError("the two state dicts share no parameter name")
    return math.sqrt(sum(float((b[k] - a[k]).double().pow(2).sum()) for k in common))
