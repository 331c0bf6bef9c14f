"""Packed sequences without cross-document attention (``data.cross_document_attention: false``,
``train/packing.py``).

References, none of them train/packing.py: masks and flash-attn's cumulative lengths written
out by hand, transformers' own ``prepare_fa_kwargs_from_position_ids``, and every document run
through the model on its own (tests/packing_common.per_document_logits), which the masked
packed row must reproduce. On 2 ranks under ZeRO-3 and FSDP2: a changed token of document A
changes no logit of the documents after it with the mask, and does without it (so the test
can fail); MIGU's statistics equal a single-process reference over the same masked forward,
padding excluded. flash_attention_2 cannot run here (no GPU, no flash-attn): its inputs are
checked by hand and against transformers, and a plain-torch kernel keeping
``flash_attn_varlen_func``'s contract, registered with transformers, shows they reach the
kernel through the model and give each document's own logits.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from tests.conftest import run_distributed
from tests.families import FAMILIES, SHAPE
from tests.launch_util import ENGINES
from tests.migu_common import tiny_config
from tests.packing_common import (
    PAD_TAIL,
    SEQ,
    first_document_end,
    packed_batch,
    per_document_logits,
    perturb_first_document,
)
from tests.test_migu import reference_keep
from tests.workers import xdoc_worker
from train import evaluate as ev
from train.config import Config, DataConfig, DomainConfig, PhaseConfig
from train.data import CPTDataLoader
from train.model import build_model
from train.packing import (
    DocumentMasking,
    block_causal_mask,
    document_ids_from_positions,
    varlen_kwargs,
)
from train.resume import check_changes
from train.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = SHAPE["vocab_size"]

# ------------------------------------------------------------------------ the inputs


def test_block_causal_mask_written_out():
    docs = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, -1, -1]])
    want = torch.tensor(
        [
            [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]],
            # padding (-1): nobody attends to it, it attends to itself only
            [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]],
        ],
        dtype=torch.bool,
    )[:, None]
    assert torch.equal(block_causal_mask(docs), want)
    # A window of 2: the query sees itself and the one before (q - k < 2), same document.
    windowed = block_causal_mask(docs[:1], sliding_window=2)[0, 0].int().tolist()
    assert windowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                        [0, 0, 0, 1, 1]]  # fmt: skip


def test_varlen_kwargs_written_out_and_as_transformers_derives_them():
    docs = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    kw = varlen_kwargs(docs)
    assert kw["cu_seq_lens_q"].tolist() == [0, 2, 5, 6, 7, 12]
    assert kw["cu_seq_lens_q"].dtype == torch.int32 and kw["cu_seq_lens_k"] is kw["cu_seq_lens_q"]
    assert kw["max_length_q"] == kw["max_length_k"] == 5
    # The same from position ids restarting at each document, flattened into one row, by
    # transformers' own function (what its flash path derives for a batch of one row).
    positions = torch.tensor([[0, 1, 0, 1, 2, 0], [0, 0, 1, 2, 3, 4]])
    assert torch.equal(document_ids_from_positions(positions), docs)
    (cu, _), (longest, _) = prepare_fa_kwargs_from_position_ids(positions.reshape(1, -1))
    assert cu.tolist() == kw["cu_seq_lens_q"].tolist() and int(longest) == 5
    with pytest.raises(ValueError, match="padding"):
        varlen_kwargs(torch.tensor([[0, 0, -1]]))


def test_masking_follows_the_model_config():
    def config(family: str, impl: str = "sdpa"):
        c = copy.deepcopy(FAMILIES[family][1])
        c._attn_implementation = impl
        return c

    assert DocumentMasking.for_model(config("llama2")) == DocumentMasking("sdpa")
    assert DocumentMasking.for_model(config("mistral", "eager")) == DocumentMasking("eager", 8)
    assert DocumentMasking.for_model(config("qwen2")) == DocumentMasking("sdpa")
    mixed = _qwen2_sliding_config()
    mixed._attn_implementation = "sdpa"
    assert DocumentMasking.for_model(mixed) == DocumentMasking("sdpa", 4, mixed_layers=True)
    flash = DocumentMasking.for_model(config("llama2", "flash_attention_2"))
    docs = torch.tensor([[0, 0, 1, 1]])
    assert set(flash.inputs(docs, "cpu")) == {
        "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"
    }  # fmt: skip
    with pytest.raises(ValueError, match="model.attn_implementation"):
        DocumentMasking.for_model(config("llama2", "flex_attention"))


def _qwen2_sliding_config() -> Qwen2Config:
    """Qwen2 with a full layer then a sliding one (window 4): masks go as a mapping."""
    c = Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert c.layer_types == ["full_attention", "sliding_attention"]
    return c


# ------------------------------------------------------------------------ one process


def _family_model(family: str, impl: str) -> torch.nn.Module:
    if family == "qwen2-sliding":
        cls, config = Qwen2ForCausalLM, _qwen2_sliding_config()
    else:
        cls, config = FAMILIES[family]
    torch.manual_seed(0)
    return cls._from_config(copy.deepcopy(config), attn_implementation=impl).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", [*FAMILIES, "qwen2-sliding"])
def test_masked_packed_logits_equal_each_document_alone(family, impl):
    """Every real position of the packed rows, masked, gives the logits of its document run
    alone (Mistral's window of 8 and the sliding Qwen2's of 4 are shorter than documents B
    and C), with position ids running on through the row or restarting per document; a
    changed token of document A changes no later document's logit, and does so without the
    mask."""
    model = _family_model(family, impl)
    ids, docs, _ = packed_batch(3, VOCAB)
    masking = DocumentMasking.for_model(model.config)
    restarted = torch.zeros_like(docs)  # 0 at each document start (padding: one of its own)
    for j in range(1, SEQ):
        same = docs[:, j] == docs[:, j - 1]
        restarted[:, j] = torch.where(same, restarted[:, j - 1] + 1, 0)
    ref = torch.stack([per_document_logits(model, ids[r], docs[r]) for r in range(3)])
    real = docs >= 0
    with torch.no_grad():
        for pos in (None, restarted):
            got = model(input_ids=ids, position_ids=pos, **masking.inputs(docs, "cpu")).logits
            torch.testing.assert_close(got[real], ref[real], rtol=0, atol=2e-5)
        perturbed = perturb_first_document(ids, VOCAB)
        changed = model(input_ids=perturbed, **masking.inputs(docs, "cpu")).logits
        plain = model(input_ids=ids).logits
        plain_changed = model(input_ids=perturbed).logits
    base = model(input_ids=ids, **masking.inputs(docs, "cpu")).logits.detach()
    for r in range(3):
        after = slice(first_document_end(r), SEQ - (PAD_TAIL if r == 2 else 0))
        assert torch.equal(changed[r, after], base[r, after])
        assert (plain_changed[r, after] - plain[r, after]).abs().max() > 1e-3


def _varlen_reference_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    cu_seq_lens_q=None,
    max_length_q=None,
    **kwargs,
):
    """flash_attn_varlen_func's contract in plain torch, registered as an attention kernel:
    the B * T tokens flattened, causal attention within each segment ``cu_seq_lens_q[i]:
    cu_seq_lens_q[i + 1]``. (B, H, T, D) in, (B, T, H, D) out, as transformers' kernels."""
    assert attention_mask is None and cu_seq_lens_q is not None
    assert kwargs["cu_seq_lens_k"] is cu_seq_lens_q and kwargs["max_length_k"] == max_length_q
    b, h, t, d = query.shape
    rep = h // key.shape[1]
    q, k, v = (
        x.repeat_interleave(rep if x is not query else 1, dim=1) for x in (query, key, value)
    )
    q, k, v = (x.transpose(1, 2).reshape(b * t, h, d) for x in (q, k, v))
    out = torch.empty_like(q)
    bounds = cu_seq_lens_q.tolist()
    assert max(e - s for s, e in zip(bounds, bounds[1:])) == max_length_q
    for s, e in zip(bounds, bounds[1:]):
        seg = [x[s:e].transpose(0, 1) for x in (q, k, v)]  # (H, L, D)
        att = F.scaled_dot_product_attention(*seg, is_causal=True, scale=scaling)
        out[s:e] = att.transpose(0, 1)
    return out.reshape(b, t, h, d), None


def test_flash_path_inputs_reach_the_kernel_and_give_each_document_alone():
    """flash-attn cannot run here; its inputs can: a kernel keeping flash_attn_varlen_func's
    contract in plain torch, registered with transformers, gets the cu_seq_lens of the
    flash_attention_2 masking through the model's layers and, from them alone (no mask),
    gives each document's own logits, for rows of several documents (micro-batch of 3)."""
    AttentionInterface.register("varlen_reference", _varlen_reference_attention)
    cls, config = FAMILIES["llama2"]
    torch.manual_seed(0)
    model = cls._from_config(copy.deepcopy(config), attn_implementation="varlen_reference")
    model.eval()
    ids, docs, _ = packed_batch(3, VOCAB)
    docs[-1, SEQ - PAD_TAIL :] = 3  # no padding on the flash path: full rows
    flash = DocumentMasking("flash_attention_2")
    with torch.no_grad():
        got = model(input_ids=ids, **flash.inputs(docs, "cpu")).logits
    model.set_attn_implementation("sdpa")
    ref = torch.stack([per_document_logits(model, ids[r], docs[r]) for r in range(3)])
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)


def test_heldout_perplexity_with_documents_equals_per_document_reference():
    """Held-out chunks spanning documents: the masked NLL is each document's own NLL, plus the
    prediction of each next document's first token from the end of the one before."""
    cfg = tiny_config()
    model = build_model(cfg.model, seed=0).eval()
    ids, docs, _ = packed_batch(3, cfg.model.vocab_size)
    chunks = [ids[0], ids[1], ids[2, : SEQ - PAD_TAIL], ids[2, :7]]
    doc_chunks = [docs[0], docs[1], docs[2, : SEQ - PAD_TAIL], docs[2, :7]]
    masking = DocumentMasking.for_model(model.config)
    got = ev.heldout_perplexity(
        model, chunks, batch_size=2, device="cpu", documents=doc_chunks, masking=masking
    )
    nll, tokens = 0.0, 0
    for c, d in zip(chunks, doc_chunks, strict=True):
        logits = per_document_logits(model, c, d)  # (L, V)
        lp = torch.log_softmax(logits[:-1].double(), -1)
        nll -= lp.gather(1, c[1:, None]).sum().item()
        tokens += c.numel() - 1
    assert got["tokens"] == tokens
    assert got["nll_sum"] == pytest.approx(nll, rel=1e-6)
    plain = ev.heldout_perplexity(model, chunks, batch_size=2, device="cpu")
    assert plain["nll_sum"] != pytest.approx(nll, rel=1e-4)  # the mask changed something
    assert got["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-6)


# ------------------------------------------------------------------------ data and config


def test_loader_gives_document_ids_by_default(tmp_path):
    """Document ids restart at every BOS (each document is ``BOS doc EOS``), position ids stay
    off unless asked for; cross_document_attention: true gives no ids."""
    tok = load_tokenizer(str(ROOT / "data" / "tokenizer" / "tokenizer.model"))
    lines = [f'{{"text": "{" ".join(["word"] * n)} end"}}\n' for n in (3, 11, 2, 30, 5, 7)] * 3
    (tmp_path / "d.jsonl").write_text("".join(lines))

    def batches(**kw) -> list:
        cfg = DataConfig(
            tokenizer=str(ROOT / "data" / "tokenizer" / "tokenizer.model"),
            domains={"d": DomainConfig(train=[str(tmp_path / "d.jsonl")],
                                       heldout=[str(tmp_path / "d.jsonl")])},
            phases=[PhaseConfig(name="p", domains={"d": 1.0})],
            **kw,
        )  # fmt: skip
        loader = CPTDataLoader(cfg, tok, seq_len=16, micro_batch_size=2, grad_accum=1,
                               dp_rank=0, dp_world=1, seed=0, max_steps=4)  # fmt: skip
        with loader as dl:
            heldout.append(
                (dl.heldout_sequences("d", 100, 16), dl.heldout_document_ids("d", 100, 16))
            )
            return [dl.next_batch() for _ in range(4)]

    def by_bos(ids: list[int]) -> list[int]:
        want, d = [], 0
        for j, t in enumerate(ids):
            d += int(j > 0 and t == tok.bos_id)
            want.append(d)
        return want

    heldout: list = []

    assert DataConfig().cross_document_attention is False
    default = batches()
    for b in default:
        assert b.position_ids is None
        for ids, doc in zip(b.input_ids.tolist(), b.document_ids.tolist(), strict=True):
            assert doc == by_bos(ids)
    chunks, chunk_docs = heldout[0]  # held-out chunks (100 tokens in 16s), same ids
    assert [len(c) for c in chunks] == [16] * 6 + [4]
    assert [d.tolist() for d in chunk_docs] == [by_bos(c.tolist()) for c in chunks]
    assert sum(int(b.document_ids.max()) for b in default) > 4  # boundaries were seen
    both = batches(document_position_ids=True)
    for a, b in zip(default, both, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.document_ids, b.document_ids)
        assert torch.equal(document_ids_from_positions(b.position_ids), b.document_ids)
    assert all(b.document_ids is None for b in batches(cross_document_attention=True))


def test_runs_recorded_before_the_option_resume_as_cross_document():
    """A checkpoint's config without the key did attend across documents: resuming it with
    the new default is a change taken only when asked for; with true it is no change."""
    saved_cfg = Config().to_dict()
    del saved_cfg["data"]["cross_document_attention"]
    saved = {"config": saved_cfg, "train": {"step": 3, "finished_phases": [],
             "tokens_by_phase": {}, "tokens_by_domain": {}}}  # fmt: skip
    ch = check_changes(saved, Config(), 1, None)
    assert ch.need_override == ["data.cross_document_attention: True -> False"]
    kept = Config()
    kept.data.cross_document_attention = True
    assert not any(vars(check_changes(saved, kept, 1, None)).values())


# ------------------------------------------------------------------------ two ranks


def _run_worker(tmp_path: Path, *overrides: str) -> list[dict]:
    """tests/workers/xdoc_worker.py on 2 ranks (the backend sets up the process group)."""
    return run_distributed(xdoc_worker.main, list(overrides), init_process_group=False)


@pytest.mark.parametrize(
    "engine,impl",
    [("deepspeed", "sdpa"), ("fsdp2", "sdpa"), ("fsdp2", "eager")],
)
def test_two_ranks_document_isolation_and_migu_statistics(tmp_path, engine, impl):
    ranks = _run_worker(tmp_path, *ENGINES[engine], f"model.attn_implementation={impl}")
    cfg = tiny_config([f"train.seq_len={SEQ}", "train.grad_accum=1"])
    world_rows = 2 * cfg.train.micro_batch_size
    ids, docs, labels = packed_batch(world_rows, cfg.model.vocab_size)

    # 1. Document A's token reaches no later document with the mask, and does without it.
    for res in ranks:
        start, stop = res["rows"]
        for i, row in enumerate(range(start, stop)):
            after = slice(first_document_end(row), SEQ)
            if row == world_rows - 1:
                after = slice(after.start, SEQ - PAD_TAIL)
            on = [res["logits"][(True, n)][i, after] for n in ("base", "perturbed")]
            off = [res["logits"][(False, n)][i, after] for n in ("base", "perturbed")]
            assert torch.equal(on[0], on[1]), (engine, row)
            assert (off[0] - off[1]).abs().max() > 1e-3, (engine, row)

    # 2. The sharded masked logits are each document run alone in one process.
    model = build_model(cfg.model, seed=0)
    model.load_state_dict(ranks[0]["init"])
    model.train()  # as the worker's model (no dropout in Llama: same numbers)
    for res in ranks:
        start, stop = res["rows"]
        for i, row in enumerate(range(start, stop)):
            ref = per_document_logits(model, ids[row], docs[row])
            real = docs[row] >= 0
            got = res["logits"][(True, "base")][i]
            torch.testing.assert_close(got[real], ref[real], rtol=0, atol=2e-5)

    # 3. MIGU: per output unit, the sum of |y| over every real token of the global batch,
    # from the masked forward (padding excluded), and the kept rows it gives.
    linears = {name: model.get_submodule(name) for name in ranks[0]["layers"]}
    stats = {name: torch.zeros(m.out_features, dtype=torch.float64) for name, m in linears.items()}
    real = (labels != -100).double()  # (R, T)

    def hook_for(name):
        def hook(mod, inp, out):
            stats[name] += torch.einsum("rt,rto->o", real, out.detach().abs().double())

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in linears.items()]
    masking = DocumentMasking.for_model(model.config)
    loss = model(input_ids=ids, labels=labels, **masking.inputs(docs, "cpu")).loss
    for h in handles:
        h.remove()
    for k, name in enumerate(ranks[0]["layers"]):
        dist_sum = sum(res["stats"][k].double() for res in ranks)
        torch.testing.assert_close(dist_sum, stats[name], rtol=1e-5, atol=1e-6)
        keep, _ = reference_keep(stats[name].tolist(), cfg.migu.keep_ratio, cfg.migu.threshold)
        assert torch.equal(ranks[0]["masks"][k].cpu(), keep), name
    # Each rank's loss is the mean over its predicted (shifted, not -100) labels; here over all.
    counts = [int((labels[slice(*res["rows"])][:, 1:] != -100).sum()) for res in ranks]
    mean = sum(res["loss"] * n for res, n in zip(ranks, counts, strict=True)) / sum(counts)
    assert mean == pytest.approx(loss.item(), rel=1e-5)
