"""MIGU on real DeepSpeed and FSDP2 (2 ranks, gloo, CPU) against a single-process dense reference.

The reference below is written from the method's description, not from migu_dist: forward
hooks sum |y| per output unit over every micro-batch of the step (all ranks' data), the top
ceil(keep_ratio * rows) rows (ties to the lower index) keep their gradient, then clipping and
AdamW run on the masked gradients.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from migu_dist.migu import Migu, quantile_row_mask, row_mask_for_range, topk_row_mask
from migu_dist.parallelize import parallelize
from tests.conftest import run_distributed
from tests.migu_common import global_batch, tiny_config
from tests.workers import migu_worker
from train.model import build_model

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def launch_worker(specs: list[dict], timeout: int = 300) -> None:
    """tests/workers/migu_worker.py's runs ``[{"out": OUT.pt, "overrides": [...]}, ...]`` on
    WORLD ranks, in one process group (the backend sets it up, as in training)."""
    run_distributed(
        migu_worker.run_all, specs, world_size=WORLD, init_process_group=False, timeout=timeout
    )


def run_worker(tmp_path: Path, *overrides: str) -> dict:
    out = tmp_path / "result.pt"
    launch_worker([{"out": str(out), "overrides": list(overrides)}])
    return torch.load(out, weights_only=False)


# ------------------------------------------------------------------------ the reference


def dense_reference(
    cfg,
    init: dict,
    *,
    checkpointing: bool = False,
    poison_step: int | None = None,
    follow: list | None = None,
    tie_rtol: float = 0.0,
) -> dict:
    """Single process, plain torch: what the 2-rank run must reproduce.

    fp32 master weights (what AdamW steps) and, with ``engine.precision=bf16``, a bf16 model
    whose forward/backward run in bf16; each micro-batch's gradient is accumulated in fp32 on
    the masters. MIGU masks those, ``regularization.kind=l2`` then adds the gradient of
    ``strength/2 * ||w - w0||^2`` (w0: the masters when phase p1 starts, step 1), clipping,
    then AdamW. ``poison_step``: that step's loss is non-finite, so it changes no weight and
    no moment, and only AdamW's step count advances (as the backends' ``skip_step``).

    ``follow``: the engine's kept rows per masked step. A row may differ from the reference's
    choice only if it is a near-tie, its magnitude within ``tie_rtol`` (relative) of the
    layer's cut; the reference then takes the engine's choice, so that a near-tie reordered by
    rounding does not make every later weight differ. Returns the near-ties it accepted."""
    cfg.model.activation_checkpointing = checkpointing
    bf16 = cfg.engine.precision == "bf16"
    model = build_model(cfg.model, seed=0)
    parallelize(model, activation_checkpointing=checkpointing, compile=False)
    model.load_state_dict(init)
    masters = {n: p.detach().float().clone().requires_grad_() for n, p in model.named_parameters()}
    model.to(torch.bfloat16 if bf16 else torch.float32)
    model.train()
    include = [re.compile(r) for r in cfg.migu.include]
    linears = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(r.search(n) for r in include)
    }
    stats = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in linears.items()}
    seen_forward = {"on": True}

    def hook_for(name):
        def hook(mod, inp, out):
            if seen_forward["on"]:
                stats[name] += out.detach().abs().double().sum(dim=(0, 1))

        return hook

    for n, m in linears.items():
        m.register_forward_hook(hook_for(n))
    o, mg = cfg.optim, cfg.migu
    # The masked weights' decay: migu.weight_decay, unset = none in mode grad (the reference
    # runs' AdamW had none), optim.weight_decay in mode update.
    masked_wd = mg.weight_decay
    if masked_wd is None:
        masked_wd = 0.0 if mg.mode == "grad" else o.weight_decay
    masked = {f"{n}.weight" for n in linears}
    groups: dict[float, list] = {}
    for n, p in masters.items():
        wd = 0.0 if re.search("norm|bias|embed", n) else o.weight_decay
        groups.setdefault(masked_wd if n in masked else wd, []).append(p)
    opt = torch.optim.AdamW(
        [{"params": ps, "weight_decay": wd} for wd, ps in groups.items()],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
    )
    mbs, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    all_masks, anchor, near_ties, norms = [], None, [], []
    for step in range(cfg.train.max_steps):
        batch = global_batch(cfg, step, WORLD)
        n_micro = WORLD * accum
        for i in range(n_micro):
            mb = batch[i * mbs : (i + 1) * mbs]
            loss = model(input_ids=mb, labels=mb).loss / n_micro
            # Checkpointed blocks re-run their forward inside backward: do not count it.
            seen_forward["on"] = False
            loss.backward()
            seen_forward["on"] = True
            for n, p in model.named_parameters():  # accumulate in fp32 on the masters
                g = p.grad.float()
                masters[n].grad = g if masters[n].grad is None else masters[n].grad + g
                p.grad = None
        if step == poison_step:
            for st in opt.state.values():
                st["step"] += 1
            opt.zero_grad()
            for n in stats:
                stats[n].zero_()
            continue
        masks = []
        for n in linears:
            keep, cut = reference_keep(stats[n].tolist(), mg.keep_ratio, mg.threshold)
            if follow is not None:
                theirs = follow[len(all_masks)][len(masks)]
                for r in (keep != theirs).nonzero().flatten().tolist():
                    gap = abs(float(stats[n][r]) - cut) / cut
                    assert gap <= tie_rtol, f"step {step} {n} row {r}: kept rows differ ({gap=})"
                    near_ties.append((step, n, r, gap))
                keep = theirs
            masks.append(keep)
            for name in rows_of(n, linears[n]):  # a bias (Qwen2's q/k/v) with its weight
                masters[name].grad[~keep] = 0.0
            stats[n].zero_()
        all_masks.append(masks)
        if cfg.regularization.kind == "l2" and step >= 1:
            if anchor is None:
                anchor = {n: p.detach().clone() for n, p in masters.items()}
            penalty = sum(((p - anchor[n]) ** 2).sum() for n, p in masters.items())
            (0.5 * cfg.regularization.strength * penalty).backward()
        frozen = []
        if mg.mode == "update":
            for n, keep in zip(linears, masks):
                for name in rows_of(n, linears[n]):
                    w = masters[name]
                    st = opt.state.get(w, {})
                    moments = {
                        k: st[k][~keep].clone() for k in ("exp_avg", "exp_avg_sq") if k in st
                    }
                    frozen.append((w, keep, w.detach()[~keep].clone(), moments))
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(masters.values()), o.grad_clip)))
        opt.step()
        for w, keep, old, moments in frozen:
            with torch.no_grad():
                w[~keep] = old
            for k in ("exp_avg", "exp_avg_sq"):
                opt.state[w][k][~keep] = moments.get(k, 0.0)
        opt.zero_grad()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(masters[n])  # (rounded to bf16 under bf16)
    final = {n: p.detach().clone() for n, p in masters.items()}
    return {
        "masks": all_masks,
        "final": final,
        "layers": list(linears),
        "near_ties": near_ties,
        "norms": norms,
    }


def rows_of(name: str, linear: torch.nn.Linear) -> list[str]:
    """The parameters whose dim 0 is the linear's output rows: its weight, and bias if any."""
    return [f"{name}.weight"] + ([f"{name}.bias"] if linear.bias is not None else [])


def reference_keep(
    s: list[float], keep_ratio: float, threshold: str | None
) -> tuple[torch.Tensor, float]:
    """The kept rows from a layer's magnitudes ``s``, by definition, and the cut value. topk
    (default): the ceil(keep_ratio * rows) largest, ties to the lower index; the cut is the
    smallest kept magnitude. quantile (the reference code): every row >= the (1 - keep_ratio)
    quantile, linearly interpolated between the order statistics around position
    (1 - keep_ratio) * (rows - 1); the cut is that quantile."""
    rows = len(s)
    keep = torch.zeros(rows, dtype=torch.bool)
    if threshold == "quantile":
        v = sorted(s)
        pos = (1 - keep_ratio) * (rows - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, rows - 1)
        cut = v[lo] + (pos - lo) * (v[hi] - v[lo])
        keep[[r for r in range(rows) if s[r] >= cut]] = True
        return keep, cut
    order = sorted(range(rows), key=lambda r: (-s[r], r))
    k = math.ceil(keep_ratio * rows)
    keep[order[:k]] = True
    return keep, s[order[k - 1]]


def assert_same(dist: dict, ref: dict, atol: float = 2e-5, rtol: float = 1e-4) -> None:
    assert dist["layers"] == ref["layers"]
    assert len(dist["masks"]) == len(ref["masks"])
    for step, (dm, rm) in enumerate(zip(dist["masks"], ref["masks"])):
        for name, a, b in zip(ref["layers"], dm, rm):
            assert torch.equal(a, b), f"step {step} {name}: kept rows differ"
    for k, v in ref["final"].items():
        got = dist["final"][k].to(v.dtype)  # bf16 weights (DeepSpeed) vs fp32 masters
        torch.testing.assert_close(got, v, atol=atol, rtol=rtol, msg=k)


# ------------------------------------------------------------------------ unit tests


def test_topk_ties_go_to_lower_index():
    stat = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0, 2.0])
    # k = ceil(0.5 * 6) = 3: the three 3.0s, all tied.
    assert topk_row_mask(stat, 0.5).tolist() == [False, True, True, False, True, False]
    # k = ceil(0.3 * 6) = 2: two of the tied rows, the lower indices.
    assert topk_row_mask(stat, 0.3).tolist() == [False, True, True, False, False, False]
    assert topk_row_mask(stat, 0.01).sum() == 1  # never fewer than one row


def test_quantile_rule_keeps_ties_hand_computed():
    """The reference code's rule: rows >= torch.quantile(s, 1 - keep_ratio), ties included."""
    s = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0, 2.0, 3.0, 0.0, 1.0, 2.5])
    # q = 0.7, sorted: 0 .5 1 1 2 2.5 3 3 3 3; position 0.7 * 9 = 6.3 lies between two 3s, so
    # the threshold is 3 and all four 3s are kept (top-k would keep ceil(0.3 * 10) = 3).
    assert quantile_row_mask(s, 0.3).nonzero().flatten().tolist() == [1, 2, 4, 6]
    assert topk_row_mask(s, 0.3).nonzero().flatten().tolist() == [1, 2, 4]
    # q = 0.5: position 4.5 between 2 and 2.5 -> threshold 2.25: rows 2.5 and the 3s.
    assert quantile_row_mask(s, 0.5).nonzero().flatten().tolist() == [1, 2, 4, 6, 9]
    # All tied (a zeroed layer): the threshold is that value, every row is kept.
    assert quantile_row_mask(torch.zeros(7), 0.3).all()
    assert (
        reference_keep(s.tolist(), 0.3, "quantile")[0].tolist()
        == quantile_row_mask(s, 0.3).tolist()
    )


@pytest.mark.parametrize("start,numel", [(0, 12), (5, 9), (7, 1), (3, 20), (0, 35)])
def test_row_mask_for_range_matches_naive(start, numel):
    rows, cols = 7, 5
    keep = torch.tensor([True, False, True, True, False, False, True])
    naive = keep[:, None].expand(rows, cols).reshape(-1)[start : start + numel]
    assert torch.equal(row_mask_for_range(keep, start, numel, cols), naive)


def test_eval_and_no_grad_do_not_collect():
    cfg = tiny_config()
    model = build_model(cfg.model, seed=0)
    migu = Migu(cfg.migu, model)
    x = global_batch(cfg, 0, 1)[:2]
    model.eval()
    model(input_ids=x)
    model.train()
    with torch.no_grad():
        model(input_ids=x)
    assert all(float(layer.stat.abs().sum()) == 0 for layer in migu.layers)
    model(input_ids=x)
    assert all(float(layer.stat.abs().sum()) > 0 for layer in migu.layers)


def test_padding_positions_are_excluded():
    cfg = tiny_config()
    model = build_model(cfg.model, seed=0)
    migu = Migu(cfg.migu, model)
    x = global_batch(cfg, 0, 1)[:2]
    labels = x.clone()
    labels[:, 10:] = -100  # padding: left out of the statistics
    model(input_ids=x, labels=labels)
    masked = [layer.stat.clone() for layer in migu.layers]
    migu.reset()
    # Causal attention: positions < 10 do not see the later ones, so the first 10 tokens
    # alone give the same per-position outputs.
    model(input_ids=x[:, :10])
    for a, layer in zip(masked, migu.layers):
        torch.testing.assert_close(a, layer.stat)


def test_activation_checkpointing_gives_same_masks():
    cfg = tiny_config()
    init = build_model(cfg.model, seed=3).state_dict()
    plain_masks, plain_stats = _migu_masks(cfg, init, checkpointing=False)
    ckpt_masks, ckpt_stats = _migu_masks(cfg, init, checkpointing=True)
    for a, b in zip(plain_masks, ckpt_masks):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # The statistics themselves, not only their ranking: a recompute counted twice would
    # double every value and still give the same masks.
    for a, b in zip(plain_stats, ckpt_stats):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y)


@pytest.mark.slow
def test_compiled_checkpointed_blocks_give_same_statistics():
    """model.compile with activation checkpointing: the hooks run inside the compiled blocks,
    the recompute is told apart by its checkpoint context (not autograd's graph-task id,
    invisible there), and the statistics equal eager ones. Third step: a shorter sequence
    (a recompile with dynamic shapes)."""
    cfg = tiny_config()
    init = build_model(cfg.model, seed=3).state_dict()
    plain_masks, plain_stats = _migu_masks(cfg, init, checkpointing=False, steps=3)
    cfg.model.compile = True
    from torch._dynamo.utils import counters

    counters.clear()
    ckpt_masks, ckpt_stats = _migu_masks(cfg, init, checkpointing=True, steps=3)
    # Really compiled, hooks included: graphs were built and nothing broke out to eager.
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    for a, b in zip(plain_masks, ckpt_masks):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for a, b in zip(plain_stats, ckpt_stats):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def _migu_masks(cfg, init, checkpointing, steps=2):
    """The migu_dist collector on one process (no DeepSpeed), masks of ``steps`` steps (the
    third is 3/4 as long)."""
    cfg.model.activation_checkpointing = checkpointing
    model = build_model(cfg.model, seed=0)
    model.load_state_dict(init)
    model.train()
    parallelize(model, activation_checkpointing=checkpointing, compile=cfg.model.compile)
    migu = Migu(cfg.migu, model)
    masks, stats = [], []
    for step in range(steps):
        x = global_batch(cfg, step, 1)
        if step == 2:
            x = x[:, : x.shape[1] * 3 // 4]
        model(input_ids=x, labels=x).loss.backward()
        stats.append([layer.stat.clone() for layer in migu.layers])
        masks.append(migu.compute_masks(step))
        migu.reset()
    return masks, stats


# ------------------------------------------------------------------------ distributed


BACKENDS = {"deepspeed": "engine.backend=deepspeed", "fsdp2": "engine.backend=fsdp2"}


@pytest.mark.parametrize(
    "engine",
    ["engine.zero_stage=3", "engine.zero_stage=2", "engine.zero_stage=1", "engine.zero_stage=0"]
    + [BACKENDS["fsdp2"], "engine.deepspeed_config=configs/deepspeed/zero3-8gpu.json"],
)
def test_backend_matches_dense_reference(tmp_path, engine):
    """Same kept rows and same parameters after 3 steps, grad accumulation 2, clipping on:
    DeepSpeed ZeRO 0-3 and FSDP2 (rows of intermediate_size 37 split 19/18 over 2 ranks), and
    ZeRO-3 with the 7B recipe's tunables (overlapped communication, buckets, and a persistence
    threshold under which this model's weights stay whole while their gradients are still
    partitioned)."""
    dist = run_worker(tmp_path, engine)
    ref = dense_reference(tiny_config([engine]), dist["init"])
    assert_same(dist, ref)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_update_mode_freezes_masked_rows_bit_identical(tmp_path, backend):
    dist = run_worker(tmp_path, "migu.mode=update", "engine.zero_stage=3", BACKENDS[backend])
    ref = dense_reference(tiny_config(["migu.mode=update"]), dist["init"])
    assert_same(dist, ref)
    for step, (before, after) in enumerate(dist["snapshots"]):
        for name, keep in zip(dist["layers"], dist["masks"][step]):
            w0, w1 = before[name + ".weight"], after[name + ".weight"]
            assert torch.equal(w0[~keep], w1[~keep]), f"step {step}: masked rows of {name} moved"
            assert not torch.equal(w0[keep], w1[keep]), f"step {step}: kept rows of {name} idle"


@pytest.mark.parametrize(
    "backend", [*BACKENDS, pytest.param("fsdp2-compile", marks=pytest.mark.slow)]
)
def test_activation_checkpointing_matches_reference(tmp_path, backend):
    """fsdp2-compile: model.compile (blocks compiled under FSDP2, checkpointed outside)."""
    engine = BACKENDS[backend.split("-")[0]]
    extra = ["model.compile=true"] if backend.endswith("compile") else []
    dist = run_worker(
        tmp_path, "model.activation_checkpointing=true", "train.max_steps=2", engine, *extra
    )
    ref = dense_reference(tiny_config(["train.max_steps=2"]), dist["init"], checkpointing=True)
    assert_same(dist, ref)


def test_statistics_unchanged_by_an_evaluation_mid_step(tmp_path):
    """An evaluation between two micro-batches of a step (the in-job Evaluator, perplexity
    and a multiple-choice task) adds nothing to MIGU's statistics, and training mode is back."""
    from train.config import EvalConfig, TaskConfig
    from train.evaluate import Evaluator

    cfg = tiny_config()
    model = build_model(cfg.model, seed=0)
    migu = Migu(cfg.migu, model)
    x = global_batch(cfg, 0, 1)[:2]
    model(input_ids=x, labels=x).loss.backward()
    before = [layer.stat.clone() for layer in migu.layers]
    task = tmp_path / "t.jsonl"
    task.write_text('{"context": "a b", "choices": [" c", " d"], "gold": 0}\n' * 3)

    class Tok:  # ids below the tiny vocabulary
        bos_id = 1

        def encode(self, text):
            return [3 + (ord(c) % 50) for c in text]

    ev = Evaluator(
        EvalConfig(tasks=[TaskConfig(name="t", path=str(task))]),
        Tok(),
        {"d": [x[0], x[1, :9]]},
        str(tmp_path),
        device="cpu",
        is_main=True,
        max_len=32,
    )
    row = ev.evaluate(model, step=0, phase="p", phase_index=0, phase_end=False)
    assert row["n"]["t"] == 3 and row["tokens"]["d"] > 0
    for a, layer in zip(before, migu.layers):
        assert torch.equal(a, layer.stat)
    assert all(m.training for m in model.modules())


# ------------------------------------------------------------------------ bf16, recipes
#
# One launch runs every case below (starting 2 ranks costs more than a case): each engine in
# bf16 with MIGU in grad and update mode, with the L2 anchor and a non-finite (skipped) step,
# the quantile rule under ZeRO-3, and the masked weights' own weight decay.

BF16 = ["engine.precision=bf16", "optim.eps=1e-3"]
BF16_ENGINES = {
    "fsdp2": "engine.backend=fsdp2",
    "zero0": "engine.zero_stage=0",
    "zero1": "engine.zero_stage=1",
    "zero2": "engine.zero_stage=2",
    "zero3": "engine.zero_stage=3",
}
ZEROED = "model.layers.0.mlp.up_proj"
MODES = ["grad", "update"]
CASES = {
    **{
        f"{e}-{m}": [o, *BF16, f"migu.mode={m}", "train.max_steps=2"]
        for e, o in BF16_ENGINES.items()
        for m in MODES
    },
    **{
        f"{e}-l2-skip": [o, *BF16, "regularization.kind=l2", "regularization.strength=2.0"]
        + ["poison_step=1"]
        for e, o in BF16_ENGINES.items()
    },
    "zero3-quantile": ["engine.zero_stage=3", "migu.threshold=quantile", f"zero_layer={ZEROED}"],
    "decay-default": ["migu.mode=grad", "train.max_steps=1"],
    "decay-0.1": ["migu.mode=grad", "train.max_steps=1", "migu.weight_decay=0.1"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Every case of this section from one 2-rank launch (starting the ranks costs more than
    all the cases together)."""
    tmp = tmp_path_factory.mktemp("bf16")
    specs = [{"out": str(tmp / f"{c}.pt"), "overrides": CASES[c]} for c in CASES]
    launch_worker(specs, timeout=600)
    return {c: torch.load(tmp / f"{c}.pt", weights_only=False) for c in CASES}


def bf16_tolerance(cfg) -> tuple[float, float]:
    """(atol, rtol) of weights after ``max_steps`` bf16 steps against the dense reference.

    u = 2^-8 is bf16's unit roundoff (8 significant bits, round to nearest).
    - rtol = u: DeepSpeed returns the bf16 model weights, the fp32 master rounded to nearest,
      at most u * |w| away from it (FSDP2 returns the fp32 masters themselves).
    - atol = max_steps * lr * 2^-4: the engine and the reference run the same bf16 forward
      and backward but round differently (gradients reduced in another order, bf16 copies of
      masters that differ in their last bit, and under ZeRO-0 gradients accumulated and
      all-reduced in bf16), so a gradient element differs by a few roundings, each <= u
      relative. With AdamW's eps raised to 1e-3 (not far below these gradients, ~1e-3
      after clipping) an update lr * m / (sqrt(v) + eps) is a smooth function of the
      gradient, changed by at most ~lr * (relative change of the gradient): 16u per step
      bounds those few roundings with room. (With eps = 1e-8 the first update is
      lr * sign(g), and a gradient within rounding of zero flips by 2 * lr: a difference of
      rounding, not of MIGU, which is why the cases raise eps.)
    A masking error moves or holds whole rows by ~lr per step, 16x this atol."""
    return cfg.train.max_steps * cfg.optim.lr * 2**-4, 2**-8


# Near-ties: a row's summed |y| differs between engine and reference by bf16 rounding of the
# outputs (<= u relative each) once the weights differ in their last bits (from step 1 on);
# two rows closer than 2u to the layer's cut may swap. Only such rows may differ.
TIE_RTOL = 2**-7


def bf16_case(runs, case: str) -> tuple[dict, dict]:
    over = [a for a in CASES[case] if not a.startswith(("poison_step", "zero_layer"))]
    poison = [int(a.split("=")[1]) for a in CASES[case] if a.startswith("poison_step")]
    dist = runs[case]
    cfg = tiny_config(over)
    ref = dense_reference(
        cfg,
        {k: v.float() for k, v in dist["init"].items()},
        poison_step=poison[0] if poison else None,
        follow=dist["masks"],
        tie_rtol=TIE_RTOL,
    )
    assert len(ref["near_ties"]) <= 4, ref["near_ties"]  # a few near-ties, not a pattern
    atol, rtol = bf16_tolerance(cfg)
    assert_same(dist, ref, atol=atol, rtol=rtol)
    # The norm clipping divides by (masked, plus L2): a sum of squares of gradient elements
    # that each differ by a few bf16 roundings (<= u relative each) -> 4u relative.
    torch.testing.assert_close(
        torch.tensor(dist["norms"]), torch.tensor(ref["norms"]), rtol=2**-6, atol=0
    )
    assert all(v.dtype == torch.bfloat16 for v in dist["final"].values()) == (
        not case.startswith("fsdp2")
    ), "DeepSpeed trains bf16 weights; FSDP2 keeps fp32 sharded masters"
    return dist, ref


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(BF16_ENGINES))
@pytest.mark.parametrize("mode", MODES)
def test_bf16_matches_dense_bf16_reference(runs, engine, mode):
    """bf16 at every stage: the same kept rows (up to near-ties) and the same weights (within
    ``bf16_tolerance``) as a dense single-process bf16 reference with fp32 masters; in update
    mode the masked rows of every step are bit-identical before and after it."""
    dist, _ = bf16_case(runs, f"{engine}-{mode}")
    if mode == "update":
        for step, (before, after) in enumerate(dist["snapshots"]):
            for name, keep in zip(dist["layers"], dist["masks"][step]):
                w0, w1 = before[name + ".weight"], after[name + ".weight"]
                assert torch.equal(w0[~keep], w1[~keep]), f"step {step}: {name} masked rows moved"


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(BF16_ENGINES))
def test_bf16_l2_anchor_and_nonfinite_skip(runs, engine):
    """bf16, MIGU on, L2 towards the phase-start weights from step 1, and step 1's loss NaN:
    the skipped step leaves every weight bit-identical, and the run (anchor taken at step 2,
    AdamW's step count advanced by the skip) still matches the dense reference."""
    dist, _ = bf16_case(runs, f"{engine}-l2-skip")
    assert math.isnan(dist["losses"][2]) and math.isfinite(dist["losses"][0])
    before, after = dist["snapshots"][1]
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed in the skipped step"
    assert len(dist["masks"]) == 2  # steps 0 and 2


@pytest.mark.slow
def test_quantile_rule_zero3_matches_reference_with_ties(runs):
    """threshold: quantile under ZeRO-3 on 2 ranks: the kept rows of the reference's rule on
    the all-reduced magnitudes, and the same weights. A zeroed up_proj makes every row of it
    and of the down_proj it feeds tie at the threshold: all are kept (top-k would keep 30%)."""
    dist = runs["zero3-quantile"]
    cfg = tiny_config([a for a in CASES["zero3-quantile"] if not a.startswith("zero_layer")])
    ref = dense_reference(cfg, dist["init"])
    assert_same(dist, ref)
    # down_proj's input is act(gate) * up, zero too: its outputs tie at 0 as well.
    tied = {ZEROED, ZEROED.replace("up_proj", "down_proj")}
    for name, keep in zip(dist["layers"], dist["masks"][0]):
        rows = keep.numel()
        if name in tied:
            assert keep.all(), name
        else:  # no ties: rows above the interpolated quantile, position 0.7 * (rows - 1)
            assert int(keep.sum()) == rows - math.ceil(0.7 * (rows - 1)), name


@pytest.mark.slow
def test_grad_mode_masked_weights_decay_per_migu_weight_decay(runs):
    """mode grad, optim.weight_decay 0.1: by default (migu.weight_decay unset = 0, as the
    reference runs) the masked rows do not move in the first step (no gradient, no moment,
    no decay); with migu.weight_decay=0.1 they shrink by exactly that decay, lr * 0.1 * w."""
    lr = tiny_config().optim.lr
    for case, factor in (("decay-default", 1.0), ("decay-0.1", 1.0 - lr * 0.1)):
        before, after = runs[case]["snapshots"][0]
        for name, keep in zip(runs[case]["layers"], runs[case]["masks"][0]):
            w0, w1 = before[name + ".weight"][~keep], after[name + ".weight"][~keep]
            torch.testing.assert_close(w1, w0 * factor, rtol=1e-6, atol=0, msg=case)
            assert factor == 1.0 or not torch.equal(w0, w1)


def test_reference_recipe_is_one_config_line():
    """migu.recipe=reference resolves to the paper's code (first phase unmasked, quantile rule,
    masked weights without decay) in the saved config; contradicting fields are reported
    together, each naming its key."""
    from train.config import ConfigError, load_config

    cfg = load_config("configs/tiny-cpu.yaml", ["migu.recipe=reference"])
    phases = [ph.name for ph in cfg.data.phases]
    assert cfg.migu.phases == phases[1:] and cfg.migu.threshold == "quantile"
    assert cfg.migu.masked_weight_decay(cfg.optim.weight_decay) == 0.0
    migu = Migu(cfg.migu, build_model(tiny_config().model, seed=0))
    assert not migu.active(0, phases[0]) and migu.active(0, phases[1])
    bad = ["migu.mode=update", "migu.threshold=topk", "migu.weight_decay=0.1"]
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny-cpu.yaml", ["migu.recipe=reference", *bad])
    assert all(k in str(e.value) for k in ("migu.mode", "migu.threshold", "migu.weight_decay"))
    assert len(e.value.problems) == 3, e.value.problems
