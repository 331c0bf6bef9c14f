"""Evaluation against independent single-process references, and 2-rank parity of the
sharded model (DeepSpeed ZeRO-3 and FSDP2) with one process.
"""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import run_distributed
from train import evaluate as ev
from train.cl_metrics import INITIAL_PHASE, INITIAL_PHASE_INDEX
from train.config import EvalConfig, TaskConfig

REPO = Path(__file__).resolve().parents[1]

SP_MODEL = REPO / "data" / "tokenizer" / "tokenizer.model"


# --------------------------------------------------------------------------------------
# Fixtures shared by the tests and the 2-rank worker
# --------------------------------------------------------------------------------------


class ByteTokenizer:
    """Bytes shifted past the specials: 0 pad, 1 bos, 2 eos."""

    bos_id, eos_id = 1, 2

    def encode(self, text):
        return [b + 3 for b in text.encode("utf-8")]


class SPTokenizer:
    def __init__(self, path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text):
        return self.sp.encode(text)


def tiny_llama(vocab=1000, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        initializer_range=0.3,  # peaked logits: choices are far from ties
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg)


def heldout_chunks(vocab=1000, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = [16, 16, 16, 16, 16, 12, 9]  # 7 chunks, uneven lengths and counts
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


WORDS = [
    "red",
    "green",
    "blue",
    "cat",
    "dog",
    "fish",
    "tree",
    "rock",
    "river",
    "sun",
    "moon",
    "star",
    "bird",
    "cloud",
    "rain",
]


def toy_examples(n, seed, prefix):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(2, 4)
        choices = [" " + " ".join(rng.sample(WORDS, rng.randint(1, 3))) for _ in range(k)]
        ctx = f"Question {i}: which of {rng.choice(WORDS)} and {rng.choice(WORDS)}?\nAnswer:"
        out.append(
            {"id": f"{prefix}{i}", "context": ctx, "choices": choices, "gold": rng.randrange(k)}
        )
    return out


# --------------------------------------------------------------------------------------
# Independent references: one sequence / one (example, choice) at a time
# --------------------------------------------------------------------------------------


def reference_ppl(model, chunks):
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for seq in chunks:
            if seq.numel() < 2:
                continue
            logits = model(input_ids=seq[None]).logits[0]
            logp = torch.log_softmax(logits.double(), dim=-1)
            for t in range(seq.numel() - 1):
                nll -= logp[t, seq[t + 1]].item()
                tokens += 1
    return nll, tokens


def reference_mc(model, tok, examples, pool, k, max_len):
    """Per example, per choice, the lm-eval recipe written out plainly."""
    n_acc = n_norm = 0
    all_lls = []
    with torch.no_grad():
        for ex in examples:
            prompt = ex["context"]
            if k:
                rng = random.Random(f"fewshot:{ex['id']}")
                shots = rng.sample([e for e in pool if e["id"] != ex["id"]], k)
                prompt = "".join(s["context"] + s["choices"][s["gold"]] + "\n\n" for s in shots)
                prompt += ex["context"]
            lls = []
            for choice in ex["choices"]:
                ctx_tokens = tok.encode(prompt)
                whole = tok.encode(prompt + choice)
                cont = whole[len(ctx_tokens) :]
                full = [tok.bos_id] + whole
                inp = full[-(max_len + 1) :][:-1]
                logits = model(input_ids=torch.tensor([inp])).logits[0]
                logp = torch.log_softmax(logits.double(), dim=-1)
                first = len(inp) - len(cont)
                lls.append(sum(logp[first + i, c].item() for i, c in enumerate(cont)))
            all_lls += lls
            normed = [ll / (len(c) - 1) for ll, c in zip(lls, ex["choices"])]  # " Paris" -> 5
            n_acc += max(range(len(lls)), key=lambda i: lls[i]) == ex["gold"]
            n_norm += max(range(len(lls)), key=lambda i: normed[i]) == ex["gold"]
    return {"acc": n_acc / len(examples), "acc_norm": n_norm / len(examples)}, all_lls


# --------------------------------------------------------------------------------------
# Single-process tests
# --------------------------------------------------------------------------------------


def test_heldout_perplexity_matches_reference_and_restores_mode():
    model = tiny_llama()
    chunks = [*heldout_chunks(), torch.tensor([5])]  # a 1-token chunk has nothing to predict
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, i, o: seen.append((m.training, torch.is_grad_enabled()))
    )
    model.train()
    model.model.layers[1].eval()  # a mixed state must come back exactly
    flags = [m.training for m in model.modules()]
    got = ev.heldout_perplexity(model, chunks, batch_size=2, device="cpu")
    assert [m.training for m in model.modules()] == flags
    assert torch.is_grad_enabled()
    assert seen and all(s == (False, False) for s in seen)

    nll, tokens = reference_ppl(model, chunks)
    assert got["tokens"] == tokens == 5 * 15 + 11 + 8
    assert got["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    # batching must not matter
    one = ev.heldout_perplexity(model, chunks, batch_size=1, device="cpu")
    assert one["nll_sum"] == pytest.approx(got["nll_sum"], rel=1e-6)


def test_fewshot_prompt_and_encode_pair():
    pool = toy_examples(6, 1, "f")
    ex = toy_examples(1, 2, "e")[0]
    prompt = ev.fewshot_context(ex, pool, 2)
    assert prompt == ev.fewshot_context(ex, pool, 2)  # deterministic
    parts = prompt.split("\n\n")
    assert len(parts) == 3 and parts[-1] == ex["context"]
    demos = {e["context"] + e["choices"][e["gold"]] for e in pool}
    assert set(parts[:2]) <= demos
    assert ev.fewshot_context(ex, pool, 0) == ex["context"]
    assert ev.fewshot_context(pool[0], pool, 5).count(pool[0]["context"]) == 1  # self excluded
    with pytest.raises(ValueError, match="num_fewshot"):
        ev.fewshot_context(ex, pool, 7)
    tok = ByteTokenizer()
    ctx, cont = ev.encode_pair(tok, "Answer: ", "yes")  # trailing space moves over
    assert ctx == [1, *tok.encode("Answer:")] and cont == tok.encode(" yes")
    assert ev.choice_length(" Paris") == 5


@pytest.mark.skipif(not SP_MODEL.is_file(), reason="data/tokenizer/tokenizer.model missing")
@pytest.mark.parametrize(("k", "max_len"), [(0, 128), (2, 40)])
def test_score_task_matches_reference(k, max_len):
    tok = SPTokenizer(SP_MODEL)
    model = tiny_llama(vocab=32000)
    examples, pool = toy_examples(7, 3, "e"), toy_examples(5, 4, "f")
    want, want_lls = reference_mc(model, tok, examples, pool, k, max_len)
    task = ev.prepare_task(tok, examples, pool, k, max_len=max_len)
    if max_len == 40:
        assert max(len(i) for i in task.inputs) == 40  # left truncation happened
    lls = ev.loglikelihoods(model, task, batch_size=3, device="cpu")
    assert lls == pytest.approx(want_lls, rel=1e-4, abs=1e-4)
    assert ev.accuracy(task, lls) == {**want, "n": 7}
    if k == 0:  # the one-call API is the same three steps
        got = ev.score_task(
            model, tok, examples, pool, k, batch_size=3, device="cpu", max_len=max_len
        )
        assert got == {**want, "n": 7}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_evaluator_rows_report_and_plots(tmp_path):
    _write_jsonl(tmp_path / "toy.jsonl", toy_examples(5, 5, "e"))
    _write_jsonl(tmp_path / "toy.fewshot.jsonl", toy_examples(4, 6, "f"))
    cfg = EvalConfig(
        batch_size=2,
        tasks=[
            TaskConfig(
                name="toy",
                path=str(tmp_path / "toy.jsonl"),
                fewshot_path=str(tmp_path / "toy.fewshot.jsonl"),
                num_fewshot=1,
                limit=4,
            )
        ],
    )
    chunks = heldout_chunks()
    heldout = {"a": chunks[:3], "b": chunks[3:5], "c": chunks[5:]}
    out = tmp_path / "run"
    evaluator = ev.Evaluator(
        cfg, ByteTokenizer(), heldout, out, device="cpu", is_main=True, max_len=64
    )
    model = tiny_llama()
    rows = [
        evaluator.evaluate(
            model,
            step=0,
            phase=INITIAL_PHASE,
            phase_index=INITIAL_PHASE_INDEX,
            phase_end=False,
        )
    ]
    schedule = [(5, "p0", 0, True), (7, "p1", 1, False), (10, "p1", 1, True)]
    for step, phase, index, end in schedule:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9)
        rows.append(
            evaluator.evaluate(model, step=step, phase=phase, phase_index=index, phase_end=end)
        )
    written = ev.load_jsonl(out / "evals.jsonl")
    assert written == rows and len(rows) == 4
    assert set(rows[1]["ppl"]) == {"a", "b", "c"} and rows[1]["n"] == {"toy": 4}
    want = ev.heldout_perplexity(model, heldout["b"], batch_size=2, device="cpu")["ppl"]
    assert rows[-1]["ppl"]["b"] == pytest.approx(want)

    report = evaluator.write_report(["p0", "p1"], {"p0": ["a"], "p1": ["a", "b"]})
    on_disk = json.loads((out / "cl_report.json").read_text())
    assert on_disk == report
    assert report["item_phase"] == {"a": 0, "b": 1}  # "c" is never trained on
    assert report["steps"] == [5, 10]
    assert report["ppl"]["matrix"] == [
        [rows[1]["ppl"][d] for d in "abc"],
        [rows[3]["ppl"][d] for d in "abc"],
    ]
    assert report["ppl"]["initial"] == [rows[0]["ppl"][d] for d in "abc"]
    a0, a1 = rows[1]["ppl"]["a"], rows[3]["ppl"]["a"]
    assert report["ppl"]["bwt"] == pytest.approx(math.log(a0 / a1))
    b_init, b0 = rows[0]["ppl"]["b"], rows[1]["ppl"]["b"]
    assert report["ppl"]["fwt"] == pytest.approx(math.log(b_init / b0))
    assert report["acc"]["matrix"] == [[rows[1]["acc"]["toy"]], [rows[3]["acc"]["toy"]]]
    for name in ("cl_matrix_ppl.png", "cl_matrix_acc.png", "ppl_curves.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a non-main rank writes nothing
    other = ev.Evaluator(
        EvalConfig(),
        ByteTokenizer(),
        {"a": chunks[:1]},
        tmp_path / "r1",
        device="cpu",
        is_main=False,
        max_len=64,
    )
    other.evaluate(model, step=1, phase="p0", phase_index=0, phase_end=True)
    assert other.write_report(["p0"]) == {} and not (tmp_path / "r1").exists()


def test_report_resume_duplicates_and_saved_config(tmp_path):
    def row(step, index, end, a, b):
        return {
            "step": step,
            "phase": f"p{index}",
            "phase_index": index,
            "phase_end": end,
            "ppl": {"a": a, "b": b},
            "acc": {},
            "acc_norm": {},
        }

    rows = [
        row(0, -1, True, 40.0, 50.0),  # the trainer marks its initial row phase_end too
        row(5, 0, True, 99.0, 99.0),  # evaluated, then the run died and resumed before it
        row(5, 0, True, 10.0, 30.0),
        row(8, 1, False, 11.0, 20.0),
        row(10, 1, True, 12.0, 15.0),
    ]
    _write_jsonl(tmp_path / "evals.jsonl", rows)
    (tmp_path / "config.yaml").write_text(
        "data:\n  phases:\n  - {name: p0, domains: {a: 1.0}, steps: 5}\n"
        "  - {name: p1, domains: {b: 0.5, a: 0.5}, steps: 5}\n"
    )
    evaluator = ev.Evaluator(
        EvalConfig(), ByteTokenizer(), {}, tmp_path, device="cpu", is_main=True, max_len=8
    )
    report = evaluator.write_report(["p0", "p1", "p2"])
    assert report["item_phase"] == {"a": 0, "b": 1}
    assert report["ppl"]["matrix"] == [[10.0, 30.0], [12.0, 15.0], [None, None]]
    assert report["ppl"]["initial"] == [40.0, 50.0]
    assert report["completed_phases"] == 2 and report["steps"] == [5, 10, None]
    assert report["ppl"]["bwt"] == pytest.approx(math.log(10 / 12))
    assert report["ppl"]["fwt"] == pytest.approx(math.log(50 / 30))
    assert report["tasks"] == [] and report["acc"]["average"] is None
    assert not (tmp_path / "plots" / "cl_matrix_acc.png").exists()
    assert (tmp_path / "plots" / "ppl_curves.png").is_file()


# --------------------------------------------------------------------------------------
# 2 ranks, a real sharded model (DeepSpeed ZeRO-3 engine or FSDP2), against the same
# functions in one process
# --------------------------------------------------------------------------------------

MC_MAX_LEN = 96


def _evaluate_everything(model, device="cpu"):
    tok = ByteTokenizer()
    examples, pool = toy_examples(7, 7, "e"), toy_examples(4, 8, "f")
    ppl = ev.heldout_perplexity(model, heldout_chunks(), batch_size=2, device=device)
    task = ev.prepare_task(tok, examples, pool, 1, max_len=MC_MAX_LEN)
    lls = ev.loglikelihoods(model, task, batch_size=3, device=device)
    return {"ppl": ppl, "mc": ev.accuracy(task, lls), "lls": lls}


def _shard(model, backend):
    """``(what the trainer evaluates, the module it wraps)`` after sharding ``model`` over the
    ranks; every forward then gathers parameters (a collective) on both backends."""
    if backend == "fsdp2":  # the project's backend: fully_shard per decoder block, then root
        from migu_dist.fsdp2_backend import FSDP2Backend
        from train.config import Config, EngineConfig

        fsdp2 = FSDP2Backend(
            Config(engine=EngineConfig(backend="fsdp2", dist_timeout_minutes=2)).backend_config()
        )
        fsdp2.setup(model, lambda step: 1.0)
        return fsdp2.module, fsdp2.module
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        config={
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            # threshold 0: every parameter is partitioned (small ones would stay resident and
            # the forwards would need no collective at all)
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        },
    )
    return engine, engine.module


def _worker(out_dir, backend):
    import torch.distributed as dist

    model = tiny_llama()
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    engine, module = _shard(model, backend)
    rank = dist.get_rank()
    assert dist.get_world_size() == 2
    engine.train()
    result = _evaluate_everything(engine)
    result["module_training_after"] = module.training
    result["forward_calls"] = calls[0]
    chunks = heldout_chunks()
    evaluator = ev.Evaluator(
        EvalConfig(batch_size=2),
        ByteTokenizer(),
        {"x": chunks},
        out_dir,
        device="cpu",
        is_main=rank == 0,
        max_len=MC_MAX_LEN,
    )
    result["row"] = evaluator.evaluate(engine, step=3, phase="p0", phase_index=0, phase_end=True)
    dist.barrier()
    return result


@pytest.mark.parametrize("backend", ["deepspeed", "fsdp2"])
def test_two_rank_sharded_model_matches_one_process(tmp_path, backend):
    # The backends set up the process group themselves, as in training.
    r0, r1 = run_distributed(_worker, str(tmp_path), backend, init_process_group=False)

    # ppl: 5 batches (16-token chunks in pairs, then the 12- and 9-token chunks alone) and
    # mc: 21 requests in 7 batches of 3 -> rank 1 has one batch less and pads with a dummy.
    assert r0["forward_calls"] == r1["forward_calls"]
    assert r0["module_training_after"] and r1["module_training_after"]
    want = _evaluate_everything(tiny_llama())
    for r in (r0, r1):
        assert r["ppl"]["tokens"] == want["ppl"]["tokens"] == 5 * 15 + 11 + 8
        assert r["ppl"]["nll_sum"] == pytest.approx(want["ppl"]["nll_sum"], rel=1e-5)
        assert r["mc"] == want["mc"]
        assert r["lls"] == pytest.approx(want["lls"], rel=1e-5, abs=1e-5)
        assert r["row"]["tokens"] == {"x": want["ppl"]["tokens"]}
        assert r["row"]["ppl"]["x"] == pytest.approx(want["ppl"]["ppl"], rel=1e-5)
    assert r0["lls"] == r1["lls"]  # all-reduced: bit-identical on both ranks
    assert len(ev.load_jsonl(tmp_path / "evals.jsonl")) == 1  # written by rank 0 only
