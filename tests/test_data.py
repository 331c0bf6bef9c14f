"""Data pipeline: packing, rank slicing, phases and mixture, exact resume, bad input, formats,
tokenizer. Every test writes its own small files; only the demo tokenizer is shared."""

from __future__ import annotations

import gzip
import io
import json
import logging
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import torch
import zstandard

from train.config import DataConfig, DomainConfig, PhaseConfig
from train.data import CPTDataLoader, plan_phases
from train.data.sources import BadInputLog, DocumentReader, Position
from train.tokenizer import Tokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SP_MODEL = ROOT / "data" / "tokenizer" / "tokenizer.model"
WORDS = ["the", "of", "model", "token", "pack", "über", "naïve", "数据", "λ", "def", "return"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    # The demo tokenizer is built by another job; give it time to land rather than skip.
    deadline = time.time() + 20 * 60
    while not SP_MODEL.is_file() and time.time() < deadline:
        time.sleep(60)
    return load_tokenizer(str(SP_MODEL))


def make_docs(seed: int, n: int, max_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(
            rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(rng.randint(1, max_words))
        )
        for _ in range(n)
    ]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def stream_of(tok: Tokenizer, docs: list[str]) -> list[int]:
    return [t for d in docs for t in [tok.bos_id, *tok.encode(d), tok.eos_id]]


def make_loader(cfg: DataConfig, tok: Tokenizer, **kw) -> CPTDataLoader:
    args = dict(seq_len=32, micro_batch_size=2, grad_accum=1, dp_rank=0, dp_world=1, seed=7)
    args["max_steps"] = 1000
    args.update(kw)
    return CPTDataLoader(cfg, tok, **args)


def two_domain_cfg(tmp_path: Path, num_workers: int = 0, position_ids: bool = True) -> DataConfig:
    write_jsonl(tmp_path / "a-0.jsonl", make_docs(1, 40))
    write_jsonl(tmp_path / "a-1.jsonl", make_docs(2, 40))
    with gzip.open(tmp_path / "b-0.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"body": d}) + "\n" for d in make_docs(3, 60))
    domains = {
        "a": DomainConfig(train=[str(tmp_path / "a-*.jsonl")]),
        "b": DomainConfig(train=[str(tmp_path / "b-*.jsonl.gz")], text_field="body"),
    }
    phases = [
        PhaseConfig(name="p1", domains={"a": 1.0}, steps=4),
        PhaseConfig(name="p2", domains={"b": 3.0}, steps=6, replay=0.25),
    ]
    return DataConfig(
        domains=domains, phases=phases, num_workers=num_workers, document_position_ids=position_ids
    )


# --------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------


def test_packing_loses_no_token_and_wraps_epochs(tmp_path: Path, tok: Tokenizer) -> None:
    docs = make_docs(0, 30, max_words=200)  # many longer than seq_len, many shorter
    write_jsonl(tmp_path / "x-0.jsonl", docs[:13])
    write_jsonl(tmp_path / "x-1.jsonl", docs[13:])
    cfg = DataConfig(
        domains={"x": DomainConfig(train=[str(tmp_path / "x-*.jsonl")])},
        phases=[PhaseConfig(name="only", domains={"x": 1.0})],
        document_position_ids=True,
    )
    expected = stream_of(tok, docs)
    seq_len, rows = 64, 3
    steps = 2 * len(expected) // (seq_len * rows) + 2  # more than two epochs
    with make_loader(cfg, tok, seq_len=seq_len, micro_batch_size=rows, max_steps=steps) as dl:
        batches = [dl.next_batch() for _ in range(steps)]
        state = dl.state_dict()
        with pytest.raises(StopIteration):
            dl.next_batch()
    got = torch.cat([b.input_ids for b in batches]).flatten().tolist()
    assert all(b.input_ids.shape == (rows, seq_len) for b in batches)
    assert got == (expected * 3)[: len(got)]
    assert state["streams"]["x"]["epoch"] == 2
    for b in batches:
        assert torch.equal(b.labels, b.input_ids)
        for ids, pos in zip(b.input_ids.tolist(), b.position_ids.tolist(), strict=True):
            for j in range(seq_len):
                starts = j == 0 or ids[j] == tok.bos_id
                assert pos[j] == (0 if starts else pos[j - 1] + 1)


# --------------------------------------------------------------------------------------
# Ranks, phases, mixture
# --------------------------------------------------------------------------------------


def test_two_ranks_partition_the_one_rank_global_batch(tmp_path: Path, tok: Tokenizer) -> None:
    cfg = two_domain_cfg(tmp_path)
    one = make_loader(cfg, tok, micro_batch_size=2, grad_accum=2)
    r0 = make_loader(cfg, tok, micro_batch_size=2, dp_rank=0, dp_world=2)
    r1 = make_loader(cfg, tok, micro_batch_size=2, dp_rank=1, dp_world=2)
    for _ in range(10):
        a, b0, b1 = one.next_batch(), r0.next_batch(), r1.next_batch()
        assert b0.input_ids.shape == (2, 32)
        assert torch.equal(torch.cat([b0.input_ids, b1.input_ids]), a.input_ids)
        assert torch.equal(torch.cat([b0.position_ids, b1.position_ids]), a.position_ids)
        assert a.tokens_by_domain == b0.tokens_by_domain == b1.tokens_by_domain
        assert a.phase == b0.phase == b1.phase
    assert one.state_dict() == r0.state_dict() == r1.state_dict()


def test_plan_phases_budgets() -> None:
    phases = [
        PhaseConfig(name="a", domains={"x": 1.0}, tokens=10 * 1024 + 1),
        PhaseConfig(name="b", domains={"x": 1.0}, steps=5),
        PhaseConfig(name="c", domains={"x": 1.0}),
    ]
    cfg = DataConfig(phases=phases)
    plans = plan_phases(cfg, tokens_per_step=1024, max_steps=30)
    assert [(p.name, p.index, p.start_step, p.end_step) for p in plans] == [
        ("a", 0, 0, 11),
        ("b", 1, 11, 16),
        ("c", 2, 16, 30),
    ]
    cut = plan_phases(cfg, tokens_per_step=1024, max_steps=13)
    assert [(p.name, p.start_step, p.end_step) for p in cut] == [("a", 0, 11), ("b", 11, 13)]


def test_phases_switch_and_mixture_matches_weights(tmp_path: Path, tok: Tokenizer) -> None:
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        write_jsonl(tmp_path / f"{name}.jsonl", make_docs(seed, 50))
    seq_len, rows = 16, 64
    phases = [
        PhaseConfig(name="p1", domains={"a": 3.0, "b": 1.0}, tokens=20 * seq_len * rows - 5),
        PhaseConfig(name="p2", domains={"c": 1.0}, steps=30, replay=0.3),
    ]
    cfg = DataConfig(
        domains={d: DomainConfig(train=[str(tmp_path / f"{d}.jsonl")]) for d in "abc"},
        phases=phases,
    )
    with make_loader(cfg, tok, seq_len=seq_len, micro_batch_size=rows) as dl:
        assert [(p.start_step, p.end_step) for p in dl.phases()] == [(0, 20), (20, 50)]
        batches = [dl.next_batch() for _ in range(50)]
    assert [b.phase for b in batches] == ["p1"] * 20 + ["p2"] * 30
    assert [b.phase_index for b in batches] == [0] * 20 + [1] * 30

    def share(bs: list, domains: str) -> float:
        total = sum(sum(b.tokens_by_domain.values()) for b in bs)
        return sum(b.tokens_by_domain.get(d, 0) for b in bs for d in domains) / total

    assert share(batches[:20], "a") == pytest.approx(0.75, abs=0.04)
    assert share(batches[20:], "ab") == pytest.approx(0.3, abs=0.03)  # replay share
    replayed = sum(b.tokens_by_domain.get("a", 0) for b in batches[20:])
    assert replayed / (share(batches[20:], "ab") * 30 * rows * seq_len) == pytest.approx(
        0.5, abs=0.1
    )  # uniform over the earlier domains, not by their old weights
    tokens = [sum(b.tokens_by_domain.values()) for b in batches]  # of the global batch
    assert sum(tokens[:20]) == sum(tokens[20:]) / 1.5 == 20 * rows * seq_len


# --------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------


def _roundtrip(state: dict, how: str) -> dict:
    if how == "json":
        return json.loads(json.dumps(state))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize(("num_workers", "how"), [(0, "json"), (0, "torch"), (2, "json")])
def test_resume_is_exact_across_a_phase_boundary(
    tmp_path: Path, tok: Tokenizer, num_workers: int, how: str
) -> None:
    cfg = two_domain_cfg(tmp_path, num_workers=num_workers)
    kw = dict(micro_batch_size=2, grad_accum=2, dp_rank=1, dp_world=2)
    with make_loader(cfg, tok, **kw) as full:
        reference = [full.next_batch() for _ in range(10)]
        final_state = full.state_dict()
    stop = 3  # phase p1 ends at step 4: the resumed loader crosses the boundary
    with make_loader(cfg, tok, **kw) as first:
        for _ in range(stop):
            first.next_batch()
        state = _roundtrip(first.state_dict(), how)
    with make_loader(cfg, tok, **kw) as resumed:
        resumed.load_state_dict(state)
        for want in reference[stop:]:
            got = resumed.next_batch()
            assert torch.equal(got.input_ids, want.input_ids)
            assert torch.equal(got.position_ids, want.position_ids)
            assert (got.phase, got.tokens_by_domain) == (want.phase, want.tokens_by_domain)
        assert resumed.state_dict() == final_state


def test_resume_state_survives_an_appended_phase(tmp_path: Path, tok: Tokenizer) -> None:
    cfg = two_domain_cfg(tmp_path)
    with make_loader(cfg, tok) as dl:
        old = [dl.next_batch() for _ in range(10)]
        state = dl.state_dict()
    write_jsonl(tmp_path / "c.jsonl", make_docs(9, 20))
    cfg.domains["c"] = DomainConfig(train=[str(tmp_path / "c.jsonl")])
    cfg.phases.append(PhaseConfig(name="p3", domains={"c": 1.0, "a": 1.0}, steps=5, replay=0.2))
    with make_loader(cfg, tok) as extended:
        same = [extended.next_batch() for _ in range(10)]
        assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(old, same, strict=True))
        continued = [extended.next_batch() for _ in range(5)]
    with make_loader(cfg, tok) as resumed:
        resumed.load_state_dict(state)
        for want in continued:
            got = resumed.next_batch()
            assert got.phase == "p3"
            assert torch.equal(got.input_ids, want.input_ids)


# --------------------------------------------------------------------------------------
# Bad input and formats
# --------------------------------------------------------------------------------------


def test_bad_inputs_are_counted_skipped_and_logged(
    tmp_path: Path, tok: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    good = make_docs(5, 6)
    lines = [
        json.dumps({"text": good[0]}).encode(),
        b'{"text": "unterminated',
        json.dumps({"text": good[1]}).encode(),
        json.dumps({"body": "no text field"}).encode(),
        b'{"text": "caf\xe9 latin-1"}',
        json.dumps({"text": "   "}).encode(),
        json.dumps({"text": good[2]}).encode(),
    ]
    mixed = tmp_path / "d-0.jsonl"
    mixed.write_bytes(b"\n".join(lines) + b"\n")
    garbage = tmp_path / "d-1.jsonl.gz"
    garbage.write_bytes(b"\x1f\x8bthis is not really gzip" * 10)
    truncated = tmp_path / "d-2.jsonl.gz"
    blob = gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in good[3:]).encode())
    truncated.write_bytes(blob[: len(blob) - 12])
    cfg = DataConfig(
        domains={"d": DomainConfig(train=[str(tmp_path / "d-*")])},
        phases=[PhaseConfig(name="p", domains={"d": 1.0})],
    )
    # The truncated file fails on its first (only) block, so none of its documents are read.
    expected = stream_of(tok, good[:3])
    with caplog.at_level(logging.WARNING), make_loader(cfg, tok, seq_len=16) as dl:
        n = 0
        got: list[int] = []
        while n < 2 * len(expected):  # into the second epoch: every file was read
            got += dl.next_batch().input_ids.flatten().tolist()
            n = len(got)
        report = dl.bad_input_report()["d"]
    assert got[: len(expected)] == expected
    assert report[str(mixed)]["counts"] == {
        "malformed_json": 1,
        "missing_field": 1,
        "non_utf8": 1,
        "empty": 1,
    }
    assert "unterminated" in report[str(mixed)]["samples"]["malformed_json"]
    assert report[str(garbage)]["counts"] == {"unreadable": 1}
    assert report[str(truncated)]["counts"] == {"unreadable": 1}
    assert str(garbage) in caplog.text and "non_utf8" in caplog.text


FORMATS = ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "txt", "json"]


def write_format(path: Path, docs: list[str], fmt: str) -> Path:
    path = path.with_name(f"{path.name}.{fmt}")
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    if fmt == "jsonl":
        path.write_bytes(lines)
    elif fmt == "jsonl.gz":
        path.write_bytes(gzip.compress(lines))
    elif fmt == "jsonl.zst":
        path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    elif fmt == "parquet":
        pq.write_table(pa.table({"text": docs}), path, row_group_size=7)
    elif fmt == "txt":
        path.write_text("\n".join(docs) + "\n\n")
    elif fmt == "json":
        path.write_text(json.dumps([{"text": d} for d in docs]))
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_formats_read_the_same_documents_and_seek(tmp_path: Path, fmt: str) -> None:
    docs = make_docs(11, 25)
    path = str(write_format(tmp_path / "docs", docs, fmt))
    reader = DocumentReader("d", [path], "text", Position(0, 0, 0), BadInputLog(), wrap=False)
    read = []
    while not reader.exhausted:
        read += reader.read(4)
    assert [text for text, _, _ in read] == docs
    # Resuming from any recorded position reads exactly the rest (seek, not re-parse).
    for k in (1, 8, 24):
        again = DocumentReader("d", [path], "text", read[k][1], BadInputLog(), wrap=False)
        assert [text for text, _, _ in again.read(100)] == docs[k:]


def test_heldout_sequences_are_deterministic(tmp_path: Path, tok: Tokenizer) -> None:
    docs = make_docs(21, 20)
    cfg = two_domain_cfg(tmp_path)
    cfg.domains["a"].heldout = [str(write_jsonl(tmp_path / "held.jsonl", docs))]
    with make_loader(cfg, tok) as dl:
        seqs = dl.heldout_sequences("a", 300, 128)
        dl.next_batch()
        assert all(torch.equal(x, y) for x, y in zip(seqs, dl.heldout_sequences("a", 300, 128)))
        assert dl.heldout_sequences("b", 100, 10) == []  # no held-out files: warned, empty
    assert [len(s) for s in seqs] == [128, 128, 44]
    assert torch.cat(seqs).tolist() == stream_of(tok, docs)[:300]


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def test_tokenizer_model_file_and_saved_hf_dir(tmp_path: Path, tok: Tokenizer) -> None:
    texts = ["Hello world.\nSecond  line", "  x", "naïve 数据 🎉", "a literal </s> stays text", ""]
    sp = spm.SentencePieceProcessor(model_file=str(SP_MODEL))
    expected = [sp.encode(t) for t in texts]
    assert [tok.encode(t) for t in texts] == expected == tok.encode_batch(texts)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (sp.bos_id(), sp.eos_id(), 32000)
    tok.save_pretrained(str(tmp_path / "hf"))
    from_dir = load_tokenizer(str(tmp_path / "hf"))
    assert from_dir.encode_batch(texts) == expected
    assert (from_dir.bos_id, from_dir.eos_id) == (tok.bos_id, tok.eos_id)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)
    plain = "Continual pre-training of Llama models."
    assert hf(plain).input_ids == [tok.bos_id, *sp.encode(plain)]
    # Without tokenizer.model the directory is served by the tokenizers library.
    (tmp_path / "hf" / "tokenizer.model").unlink()
    json_only = load_tokenizer(str(tmp_path / "hf"))
    assert (json_only.bos_id, json_only.eos_id, json_only.vocab_size) == (1, 2, 32000)
    assert json_only.encode(plain) == sp.encode(plain)
    assert json_only.encode("</s>") != [tok.eos_id]  # special-token text stays text


@pytest.mark.parametrize("num_workers", [0, 1])
def test_domain_without_usable_documents_fails_loudly(
    tmp_path: Path, tok: Tokenizer, num_workers: int
) -> None:
    (tmp_path / "bad.jsonl").write_text('{"body": "no text"}\nnot json\n')
    cfg = DataConfig(
        domains={"d": DomainConfig(train=[str(tmp_path / "bad.jsonl")])},
        phases=[PhaseConfig(name="p", domains={"d": 1.0})],
        num_workers=num_workers,
    )
    with make_loader(cfg, tok) as dl, pytest.raises(RuntimeError, match="no usable document"):
        dl.next_batch()


# --------------------------------------------------------------------------------------
# Reader limits (issue 15)
# --------------------------------------------------------------------------------------


def read_all(path: Path, max_bytes: int) -> tuple[list[tuple[str, Position]], dict]:
    """Every document of ``path`` with its position, and the file's bad-input entry."""
    bad = BadInputLog()
    reader = DocumentReader("d", [str(path)], "text", Position(0, 0, 0), bad, False, max_bytes)
    docs = []
    while not reader.exhausted:
        docs += [(text, pos) for text, pos, _ in reader.read(8)]
    return docs, bad.files.get(str(path), {"counts": {}})


def test_overlong_lines_are_skipped_in_linear_time_and_bounded_memory(tmp_path: Path) -> None:
    """A 128 MB line (a broken or binary file) next to normal ones, and another at the end
    without a newline: both skipped as too_long with the default limit (64 MB), the documents
    around them read at their exact byte offsets (a record's size counts its newline), and the
    reader never holds more than the limit plus a few 1 MB blocks (joining the unfinished line
    to every block held the whole line, twice, and took quadratic time)."""
    import tracemalloc

    limit = DataConfig().max_document_bytes
    assert limit == 64 * 2**20
    good = [json.dumps({"text": t}).encode() + b"\n" for t in ("first", "second")]
    big = 128 * 2**20
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as f:
        for chunk in (good[0], b"x" * big, b"\n", good[1], b"y" * (limit + 1)):
            f.write(chunk)
    tracemalloc.start()
    try:
        docs, entry = read_all(path, limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [text for text, _ in docs] == ["first", "second"]
    assert [pos.offset for _, pos in docs] == [0, len(good[0]) + big + 1]
    assert entry["counts"] == {"too_long": 2}
    assert entry["samples"]["too_long"] == (
        f"offset {len(good[0])}: {big + 1} bytes > data.max_document_bytes={limit}"
    )
    # What a line may hold before it is known to be too long, plus a few blocks.
    assert peak < limit + 8 * 2**20, f"reader held {peak / 2**20:.0f} MB"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_max_document_bytes_is_exact_in_every_format(tmp_path: Path, fmt: str) -> None:
    """Lines are measured as read (.jsonl: the whole JSON line), other formats by the text's
    UTF-8 bytes; a document at the limit is kept, one byte more is skipped."""
    docs = ["é" * 10, "é" * 10 + "a", "short"]  # 20 and 21 UTF-8 bytes
    path = write_format(tmp_path / "docs", docs, fmt)
    limit = 20 if fmt == "parquet" else len(json.dumps({"text": docs[0]}))
    read, entry = read_all(path, limit)
    assert [text for text, _ in read] == [docs[0], docs[2]]
    assert entry["counts"] == {"too_long": 1}


def test_epoch_wrap_is_logged_once_and_counted(
    tmp_path: Path, tok: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    """A domain read 2.5 times over: one warning per wrap (not per step or rank), and the
    wrap count per domain (``epoch_by_domain``, what metrics.jsonl rows carry) as it
    happens; a domain not read yet is absent."""
    docs = make_docs(4, 6, max_words=30)
    write_jsonl(tmp_path / "w.jsonl", docs)
    write_jsonl(tmp_path / "v.jsonl", make_docs(5, 200))
    cfg = DataConfig(
        domains={
            "w": DomainConfig(train=[str(tmp_path / "w.jsonl")]),
            "v": DomainConfig(train=[str(tmp_path / "v.jsonl")]),
        },
        phases=[
            PhaseConfig(name="p", domains={"w": 1.0}, steps=100),
            PhaseConfig(name="q", domains={"v": 1.0}),
        ],
    )
    per_epoch = len(stream_of(tok, docs))
    seq_len, rows = 16, 2
    steps = 5 * per_epoch // (2 * seq_len * rows)  # 2.5 epochs
    epochs = []
    with caplog.at_level(logging.WARNING), make_loader(cfg, tok, seq_len=seq_len) as dl:
        for _ in range(steps):
            dl.next_batch()
            epochs.append(dl.epoch_by_domain())
    consumed = [(i + 1) * seq_len * rows for i in range(steps)]
    # The epoch of the document in progress after each step: tokens consumed / epoch size.
    assert [e["w"] for e in epochs] == [c // per_epoch for c in consumed]
    assert all(e.keys() == {"w"} for e in epochs)
    wraps = [
        r.getMessage() for r in caplog.records if "starts (its documents repeat" in r.getMessage()
    ]
    assert len(wraps) == 2 and "epoch 1 starts" in wraps[0] and "epoch 2 starts" in wraps[1]
    assert wraps[0].startswith("domain 'w': all of its training data has been read by step")
