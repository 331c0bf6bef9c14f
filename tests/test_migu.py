"""MIGU on real DeepSpeed and FSDP2 (2 ranks, gloo, CPU) against a single-process dense reference.

The reference below is written from the method's description, not from migu_dist: forward
hooks sum |y| per output unit over every micro-batch of the step (all ranks' data), the top
ceil(keep_ratio * rows) rows (ties to the lower index) keep their gradient, then clipping and
AdamW run on the masked gradients.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from migu_dist.migu import Migu, row_mask_for_range, topk_row_mask
from tests.migu_common import global_batch, tiny_config
from train.model import build_model

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "migu_worker.py"
WORLD = 2


def launch_worker(*args: str, timeout: int = 300) -> None:
    """tests/workers/migu_worker.py on WORLD ranks with ``args``."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={WORLD}", str(WORKER), *args,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def run_worker(tmp_path: Path, *overrides: str) -> dict:
    out = tmp_path / "result.pt"
    launch_worker(str(out), *overrides)
    return torch.load(out, weights_only=False)


# ------------------------------------------------------------------------ the reference


def dense_reference(cfg, init: dict, *, checkpointing: bool = False) -> dict:
    """Single process, plain torch: what the 2-rank run must reproduce."""
    cfg.model.activation_checkpointing = checkpointing
    model = build_model(cfg.model, seed=0)
    model.load_state_dict(init)
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
    decay = [p for n, p in model.named_parameters() if not re.search("norm|bias|embed", n)]
    rest = [p for n, p in model.named_parameters() if re.search("norm|bias|embed", n)]
    o = cfg.optim
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
    )
    mbs, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    all_masks = []
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
        masks = []
        for n, m in linears.items():
            rows = m.out_features
            k = math.ceil(cfg.migu.keep_ratio * rows)
            s = stats[n].tolist()
            order = sorted(range(rows), key=lambda r: (-s[r], r))
            keep = torch.zeros(rows, dtype=torch.bool)
            keep[order[:k]] = True
            masks.append(keep)
            for p in rows_of(m):  # a bias (Qwen2's q/k/v) is masked with its weight's rows
                p.grad[~keep] = 0.0
            stats[n].zero_()
        all_masks.append(masks)
        frozen = []
        if cfg.migu.mode == "update":
            for m, keep in zip(linears.values(), masks):
                for p in rows_of(m):
                    st = opt.state.get(p, {})
                    moments = {
                        k: st[k][~keep].clone() for k in ("exp_avg", "exp_avg_sq") if k in st
                    }
                    frozen.append((p, keep, p.detach()[~keep].clone(), moments))
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        for p, keep, w, moments in frozen:
            with torch.no_grad():
                p[~keep] = w
            for k in ("exp_avg", "exp_avg_sq"):
                opt.state[p][k][~keep] = moments.get(k, 0.0)
        opt.zero_grad()
    return {"masks": all_masks, "final": model.state_dict(), "layers": list(linears)}


def rows_of(linear: torch.nn.Linear) -> list[torch.Tensor]:
    """The parameters whose dim 0 is the linear's output rows: its weight, and bias if any."""
    return [linear.weight] + ([linear.bias] if linear.bias is not None else [])


def assert_same(dist: dict, ref: dict, atol: float = 2e-5) -> None:
    assert dist["layers"] == ref["layers"]
    for step, (dm, rm) in enumerate(zip(dist["masks"], ref["masks"])):
        for name, a, b in zip(ref["layers"], dm, rm):
            assert torch.equal(a, b), f"step {step} {name}: kept rows differ"
    for k, v in ref["final"].items():
        torch.testing.assert_close(dist["final"][k], v, atol=atol, rtol=1e-4, msg=k)


# ------------------------------------------------------------------------ unit tests


def test_topk_ties_go_to_lower_index():
    stat = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0, 2.0])
    # k = ceil(0.5 * 6) = 3: the three 3.0s, all tied.
    assert topk_row_mask(stat, 0.5).tolist() == [False, True, True, False, True, False]
    # k = ceil(0.3 * 6) = 2: two of the tied rows, the lower indices.
    assert topk_row_mask(stat, 0.3).tolist() == [False, True, True, False, False, False]
    assert topk_row_mask(stat, 0.01).sum() == 1  # never fewer than one row


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
    migu.token_mask = torch.ones(2, x.shape[1])
    migu.token_mask[:, 10:] = 0
    model(input_ids=x)
    masked = [layer.stat.clone() for layer in migu.layers]
    migu.reset()
    migu.token_mask = None
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


def test_grad_mode_first_step_without_weight_decay_leaves_masked_rows(tmp_path):
    dist = run_worker(tmp_path, "migu.mode=grad", "optim.weight_decay=0.0", "train.max_steps=1")
    before, after = dist["snapshots"][0]
    for name, keep in zip(dist["layers"], dist["masks"][0]):
        assert torch.equal(before[name + ".weight"][~keep], after[name + ".weight"][~keep])


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
