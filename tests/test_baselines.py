"""Continual-learning baselines on the same harness: L2-to-phase-start, LoRA (+MIGU), random mask.

Replay (a per-phase share of earlier domains in every batch) is a data-loader feature; its
share is tested in ``tests/test_data.py::test_phases_switch_and_mixture_matches_weights``.

The distributed tests run :func:`worker` on 2 ranks (gloo, CPU, real DeepSpeed ZeRO-3;
``tests/conftest.py::run_distributed``) and compare with an independent single-process
reference written from the methods' definitions: L2 as an autograd penalty in the loss, MIGU
on LoRA as hooks on the wrapped layer's output (rows of B) and on A's output (rows of A).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from migu_dist.migu import Migu
from migu_dist.regularize import L2Anchor
from tests.conftest import run_distributed
from tests.migu_common import PHASES, FixedBatches, StepRecorder, global_batch, tiny_config
from train.config import ConfigError, load_config
from train.model import build_model
from train.run import build_model_for
from train.trainer import Trainer

WORLD = 2


# ------------------------------------------------------------------------ the worker


def worker(overrides: list[str]) -> dict:
    """One 2-rank ZeRO-3 run of ``max_steps`` steps: the model, MIGU and the L2 anchor as
    train/run.py assembles them, trained by ``Trainer.fit`` on fixed batches at a constant LR
    (the reference's); a last pre-step hook records the rows MIGU kept."""
    from migu_dist.deepspeed_backend import DeepSpeedBackend

    cfg = tiny_config(overrides)
    backend = DeepSpeedBackend(cfg.backend_config())
    model = build_model_for(cfg, backend)
    migu = Migu(cfg.migu, model, seed=cfg.train.seed) if cfg.migu.enabled else None
    reg = L2Anchor(cfg.regularization, PHASES) if cfg.regularization.kind != "none" else None
    backend.setup(model, lambda step: 1.0)
    recorder = StepRecorder(migu, backend)
    hooks = [h for h in (migu, reg, recorder) if h is not None]
    init = backend.full_state_dict()
    data = FixedBatches(cfg, backend.rank, backend.world_size)
    Trainer(cfg, backend, data, hooks=hooks).fit()  # a fixed batch source for the loader
    r = backend.rank
    result = {
        "rank": r,
        "masks": recorder.masks,
        "layers": [x.name for x in migu.layers] if migu else [],
        "anchor_numel": sum(v.numel() for v in reg.anchor.values()) if reg else 0,
        "trainable_numel": sum(p.ds_numel for p in model.parameters() if p.requires_grad),
    }
    final = backend.full_state_dict()
    if r == 0:
        result.update(init=init, final=final)
    return result


def run_worker(*overrides: str) -> list[dict]:
    """:func:`worker` on WORLD ranks (the backend sets up the process group, as in training)."""
    return run_distributed(worker, list(overrides), world_size=WORLD, init_process_group=False)


# ------------------------------------------------------------------------ the reference


def dense_reference(cfg, init: dict, *, l2: float = 0.0, migu: bool = False) -> dict:
    """Plain torch on one process: AdamW, clipping, optional L2 penalty in the loss (from the
    start of p1 = after step 0), optional MIGU on LoRA rows (from hooks, not migu_dist)."""
    model = build_model(cfg.model, seed=0, lora=cfg.lora)
    model.load_state_dict(init)
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    targets = {}  # masked weight name -> (module whose output ranks its rows, weight)
    if migu:
        for n, m in model.named_modules():
            if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict):
                targets[f"{n}.lora_B.default"] = (m, m.lora_B["default"].weight)
                targets[f"{n}.lora_A.default"] = (m.lora_A["default"], m.lora_A["default"].weight)
    stats = {n: torch.zeros(wt.shape[0], dtype=torch.float64) for n, (_, wt) in targets.items()}

    def hook_for(name):
        def hook(mod, inp, out):
            stats[name] += out.detach().abs().double().sum(dim=(0, 1))

        return hook

    for n, (m, _) in targets.items():
        m.register_forward_hook(hook_for(n))
    o = cfg.optim
    masked = {f"{n}.weight" for n in targets}  # mode grad: MIGU's weights do not decay
    decay = [
        p for n, p in trainable.items() if not re.search("norm|bias|embed", n) and n not in masked
    ]
    rest = [p for n, p in trainable.items() if re.search("norm|bias|embed", n)]
    groups = [{"params": decay, "weight_decay": o.weight_decay}]
    groups += [{"params": rest, "weight_decay": 0.0}] if rest else []
    no_decay = [p for n, p in trainable.items() if n in masked]
    groups += [{"params": no_decay, "weight_decay": 0.0}] if no_decay else []
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    mbs, n_micro = cfg.train.micro_batch_size, WORLD * cfg.train.grad_accum
    anchor, all_masks = None, []
    for step in range(cfg.train.max_steps):
        batch = global_batch(cfg, step, WORLD)
        for i in range(n_micro):
            mb = batch[i * mbs : (i + 1) * mbs]
            (model(input_ids=mb, labels=mb).loss / n_micro).backward()
        masks = []
        for n, (_, wt) in targets.items():
            rows = wt.shape[0]
            s = stats[n].tolist()
            order = sorted(range(rows), key=lambda r: (-s[r], r))
            keep = torch.zeros(rows, dtype=torch.bool)
            keep[order[: math.ceil(cfg.migu.keep_ratio * rows)]] = True
            wt.grad[~keep] = 0.0
            stats[n].zero_()
            masks.append(keep)
        all_masks.append(masks)
        if l2 and step >= 1:
            if anchor is None:
                anchor = {n: p.detach().clone() for n, p in trainable.items()}
            penalty = sum(((p - anchor[n]) ** 2).sum() for n, p in trainable.items())
            (0.5 * l2 * penalty).backward()
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), o.grad_clip)
        opt.step()
        opt.zero_grad()
    return {"final": model.state_dict(), "masks": all_masks, "layers": list(targets)}


def assert_close_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in b.items():
        torch.testing.assert_close(a[k], v, atol=2e-5, rtol=1e-4, msg=k)


# ------------------------------------------------------------------------ unit tests


def test_config_sections_validate_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(
            "configs/tiny-cpu.yaml",
            [
                "lora.enabled=true",
                "lora.r=0",
                "lora.dropout=1.5",
                "regularization.kind=l2",
                "regularization.phases=[nope]",
            ],
        )
    msg = str(e.value)
    for key in ("lora.r", "lora.dropout", "regularization.strength", "regularization.phases"):
        assert key in msg, key


def test_random_selection_keeps_ratio_and_differs_from_magnitude():
    masks = {}
    for selection in ("magnitude", "random"):
        cfg = tiny_config([f"migu.selection={selection}"])
        model = build_model(cfg.model, seed=0)
        migu = Migu(cfg.migu, model, seed=7)
        x = global_batch(cfg, 0, 1)
        model(input_ids=x, labels=x).loss.backward()
        masks[selection] = migu.compute_masks(step=3)
    for mag, rnd in zip(masks["magnitude"], masks["random"]):
        assert int(rnd.sum()) == int(mag.sum()) == math.ceil(0.3 * mag.numel())
    assert any(not torch.equal(a, b) for a, b in zip(masks["magnitude"], masks["random"]))


def test_lora_migu_selects_adapter_rows_with_default_include():
    cfg = tiny_config(["lora.enabled=true", "lora.r=4"])
    model = build_model(cfg.model, seed=0, lora=cfg.lora)
    migu = Migu(cfg.migu, model)
    # 2 layers x 7 linears x (A, B); never a frozen base_layer.
    assert len(migu.layers) == 2 * 7 * 2
    assert all(re.search(r"\.lora_[AB]\.default$", x.name) for x in migu.layers)
    for x in migu.layers:
        r_out, cols = x.owner.weight.shape
        assert (x.stat.numel(), x.cols) == (r_out, cols)
        assert (r_out == 4) == x.name.endswith("lora_A.default")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(".lora_" not in n for n in frozen) and any("base_layer" in n for n in frozen)


# ------------------------------------------------------------------------ distributed


def test_l2_to_phase_start_matches_penalised_reference_zero3(tmp_path):
    """grad += strength * (w - w0) on each rank's shard == autograd of strength/2 ||w - w0||^2."""
    over = ["migu.enabled=false", "regularization.kind=l2", "regularization.strength=2.0"]
    ranks = run_worker(*over, "train.max_steps=4")
    res = ranks[0]
    cfg = tiny_config([*over, "train.max_steps=4"])
    ref = dense_reference(cfg, res["init"], l2=2.0)
    assert_close_weights(res["final"], ref["final"])
    plain = dense_reference(cfg, res["init"])
    diff = max((plain["final"][k] - ref["final"][k]).abs().max() for k in plain["final"])
    assert diff > 1e-3, "the penalty should change the result"
    # Each rank holds the anchor of its own shard only: together exactly the model, once.
    assert sum(x["anchor_numel"] for x in ranks) == res["trainable_numel"]
    assert all(0 < x["anchor_numel"] < res["trainable_numel"] for x in ranks)


def test_lora_with_migu_zero3_trains_only_adapters_and_masks_rows(tmp_path):
    """Starts from a Hugging Face directory (init_from under zero.Init), wraps it with peft,
    trains 3 steps on 2 ranks with MIGU on the adapters."""
    hf = tmp_path / "hf"
    pretrained = build_model(tiny_config().model, seed=11)
    pretrained.save_pretrained(hf)
    over = ["lora.enabled=true", "lora.r=4", "migu.enabled=true", f"model.init_from={hf}"]
    ranks = run_worker(*over)
    res = ranks[0]
    init, final = res["init"], res["final"]
    for k, v in pretrained.state_dict().items():  # peft renames a wrapped x.weight
        k = k if k in init else k.replace(".weight", ".base_layer.weight")
        assert torch.equal(init[k], v), f"{k} not loaded exactly into the partitions"
    for k in init:
        if ".lora_" in k:
            assert not torch.equal(init[k], final[k]), f"adapter {k} did not train"
        else:
            assert torch.equal(init[k], final[k]), f"frozen {k} moved"
    ref = dense_reference(tiny_config(over), init, migu=True)
    assert res["layers"] == ref["layers"]
    for step, (got, want) in enumerate(zip(res["masks"], ref["masks"])):
        for name, a, b in zip(ref["layers"], got, want):
            assert torch.equal(a, b), f"step {step} {name}: kept rows differ"
            assert int(a.sum()) == math.ceil(0.3 * a.numel())
    assert_close_weights(final, ref["final"])


def test_random_selection_zero3_same_mask_on_every_rank(tmp_path):
    ranks = run_worker("migu.selection=random", "train.max_steps=2")
    for m0, m1 in zip(ranks[0]["masks"], ranks[1]["masks"]):
        for a, b in zip(m0, m1):
            assert torch.equal(a, b)
            assert int(a.sum()) == math.ceil(0.3 * a.numel())
    first, second = ranks[0]["masks"]
    assert any(not torch.equal(a, b) for a, b in zip(first, second)), "a new mask each step"


@pytest.mark.slow
def test_lora_l2_migu_run_resumes_with_anchor(tmp_path):
    """The whole harness (launch/cpt.py, 2 ranks): LoRA + MIGU + L2 runs, checkpoints the
    per-rank anchor, and a resumed run continues from it."""
    from tests.launch_util import metrics, run_cpt

    over = [
        "lora.enabled=true", "migu.enabled=true", "regularization.kind=l2",
        "regularization.strength=0.5", "data.phases.0.steps=3", "data.phases.1.steps=3",
        "data.phases.2.steps=2", "train.max_steps=8", "checkpoint.at_phase_end=true",
        "model.vocab_size=32000", "train.seq_len=32",
    ]  # fmt: skip
    out = tmp_path / "run"
    run_cpt(out, *over, "train.max_steps=5")
    rank_files = sorted((out / "checkpoints").glob("step_00000005/rank_*.pt"))
    assert len(rank_files) == WORLD
    anchors = [torch.load(f, weights_only=False)["regularizer"] for f in rank_files]
    assert all(a["anchor_phase"] == "legal" and a["anchor"] for a in anchors)
    run_cpt(out, *over)
    rows = metrics(out)
    assert rows[-1]["step"] == 8
    assert all("reg/l2_dist" in r for r in rows if r["phase"] != "general")
