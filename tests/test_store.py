"""Token stores (launch/pretokenize.py, train/data/store.py), ``datasets`` directories and fsspec
URLs as domain sources.

The reference is always the file-based streaming pipeline on the same documents: a store, a
dataset directory or a URL must give the very batches (ids and position ids, every rank) the
files give, across epochs and phase boundaries, and resume exactly from a saved state.
In-process tests use real loaders; the launch tests at the end run 2-rank DeepSpeed ZeRO-3 and
FSDP2 training and compare every metrics row with a file-backed run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import fsspec
import numpy as np
import pytest
import sentencepiece as spm
import torch

from tests.launch_util import ENGINES
from tests.test_data import _roundtrip, make_docs, make_loader, tok, write_jsonl  # noqa: F401
from train.config import ConfigError, DataConfig, DomainConfig, PhaseConfig, load_config
from train.data.store import TokenStore, token_dtype
from train.tokenizer import Tokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SP_MODEL = ROOT / "data" / "tokenizer" / "tokenizer.model"
SEQ = 384  # long enough for the small domain a to wrap into further epochs


def tokenize(*args: str, workers: int = 2) -> None:
    """launch/pretokenize.py in this process (with 2 workers, a pool of real processes)."""
    from launch.pretokenize import main

    assert main([*args, "--workers", str(workers)]) == 0


def corpus(tmp_path: Path) -> dict[str, list[str]]:
    """Two domains of small files; ``a`` has a bad line (skipped the same way everywhere)."""
    (tmp_path / "src").mkdir()
    a0, a1 = make_docs(11, 25, max_words=150), make_docs(12, 30, max_words=60)
    write_jsonl(tmp_path / "src" / "a-0.jsonl", a0)
    with (tmp_path / "src" / "a-1.jsonl").open("w") as f:
        f.write("{not json\n")
        f.writelines(json.dumps({"text": d}) + "\n" for d in a1)
    b = make_docs(13, 40)
    write_jsonl(tmp_path / "src" / "b-0.jsonl", b)
    return {"a": a0 + a1, "b": b}


def cfg_of(tmp_path: Path, a: DomainConfig, b: DomainConfig) -> DataConfig:
    return DataConfig(
        domains={"a": a, "b": b},
        phases=[
            PhaseConfig(name="p1", domains={"a": 1.0}, steps=3),
            PhaseConfig(name="p2", domains={"b": 1.0, "a": 1.0}, steps=12, replay=0.2),
        ],
        document_position_ids=True,
    )


def files_a(tmp_path: Path) -> DomainConfig:
    return DomainConfig(train=[str(tmp_path / "src" / "a-*.jsonl")])


def files_b(tmp_path: Path) -> DomainConfig:
    return DomainConfig(train=[str(tmp_path / "src" / "b-*.jsonl")])


def batches(cfg: DataConfig, tokenizer: Tokenizer, n: int, rank: int, **kw) -> list:
    args = dict(seq_len=SEQ, micro_batch_size=3, dp_rank=rank, dp_world=2, max_steps=15) | kw
    with make_loader(cfg, tokenizer, **args) as dl:
        return [dl.next_batch() for _ in range(n)]


def assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g.input_ids, w.input_ids), f"batch {i}: ids differ"
        assert torch.equal(g.position_ids, w.position_ids), f"batch {i}: positions differ"
        assert (g.phase, g.tokens_by_domain) == (w.phase, w.tokens_by_domain)


@pytest.fixture(scope="module")
def stored(tmp_path_factory, tok: Tokenizer) -> Path:  # noqa: F811 - tok is a fixture
    """The corpus, and domain a's token store made by launch/pretokenize.py."""
    tmp = tmp_path_factory.mktemp("store")
    corpus(tmp)
    tokenize(str(tmp / "src" / "a-*.jsonl"), "--tokenizer", str(SP_MODEL), "--out", str(tmp / "a"))
    return tmp


# ------------------------------------------------------------------------------ in process


def test_store_gives_the_file_batches_on_every_rank_and_resumes(
    stored: Path,
    tok: Tokenizer,  # noqa: F811
) -> None:
    """Store-backed a + file-backed b against files for both: the same rows on each of two
    ranks over several epochs of a and a phase boundary; a resumed loader continues exactly."""
    files = cfg_of(stored, files_a(stored), files_b(stored))
    mixed = cfg_of(stored, DomainConfig(store=str(stored / "a")), files_b(stored))
    store = TokenStore(str(stored / "a"))
    n = 15
    for rank in (0, 1):
        want = batches(files, tok, n, rank)
        assert_same(batches(mixed, tok, n, rank), want)
        args = dict(seq_len=SEQ, micro_batch_size=3, dp_rank=rank, dp_world=2, max_steps=15)
        with make_loader(mixed, tok, **args) as first:
            for _ in range(5):
                first.next_batch()
            state = _roundtrip(first.state_dict(), "json")
        assert set(state["streams"]["a"]) == {"cursor", "epoch", "store_id", "bad"}
        with make_loader(mixed, tok, **args) as resumed:
            resumed.load_state_dict(state)
            assert_same([resumed.next_batch() for _ in range(n - 5)], want[5:])
            assert resumed.epoch_by_domain()["a"] == 2
        consumed = sum(b.tokens_by_domain.get("a", 0) for b in want)  # of the global batches
        assert consumed > 2 * store.num_tokens  # the store wrapped into a third epoch
    mixed.num_workers = 2  # the store read in worker processes, ahead of training
    assert_same(batches(mixed, tok, n, 1), want)


def test_heldout_store_gives_the_heldout_files_tokens(
    stored: Path,
    tok: Tokenizer,  # noqa: F811
) -> None:
    files = cfg_of(stored, files_a(stored), files_b(stored))
    files.domains["a"].heldout = [str(stored / "src" / "a-*.jsonl")]
    store = cfg_of(stored, files_a(stored), files_b(stored))
    store.domains["a"].heldout_store = str(stored / "a")
    with make_loader(files, tok) as f, make_loader(store, tok) as s:
        for n in (1000, 20_000):  # within the data, and more than it holds (a warning)
            want, got = f.heldout_sequences("a", n, 100), s.heldout_sequences("a", n, 100)
            assert len(got) == len(want) and all(map(torch.equal, got, want))
            # and the same document boundaries (held-out perplexity keeps documents apart)
            want, got = f.heldout_document_ids("a", n, 100), s.heldout_document_ids("a", n, 100)
            assert len(got) == len(want) and all(map(torch.equal, got, want))
            assert sum(int(d.max()) for d in got) > 0


def test_tokenize_skips_finished_shards_and_writes_the_training_stream(
    tmp_path: Path,
    tok: Tokenizer,  # noqa: F811
) -> None:
    docs = corpus(tmp_path)
    out = tmp_path / "a"
    src = str(tmp_path / "src" / "a-*.jsonl")
    tokenize(src, "--tokenizer", str(SP_MODEL), "--out", str(out), workers=1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" == token_dtype(tok.vocab_size).name
    assert manifest["shards"][1]["bad"]  # the malformed line, counted as training counts it
    want = [t for d in docs["a"] for t in [tok.bos_id, *tok.encode(d), tok.eos_id]]
    store = TokenStore(str(out))
    assert store.read(0, len(want)).tolist() == want
    assert store.read(len(want) - 5, 10).tolist() == want[-5:] + want[:5]  # epoch wrap
    # An interrupted second shard: no .json entry, a stale partial file. Only it is redone.
    first_mtime = (out / "shard-00000.tokens").stat().st_mtime_ns
    (out / "shard-00001.json").unlink()
    (out / "shard-00001.tokens.tmp").write_bytes(b"partial")
    (out / "manifest.json").unlink()
    tokenize(src, "--tokenizer", str(SP_MODEL), "--out", str(out), workers=1)
    assert (out / "shard-00000.tokens").stat().st_mtime_ns == first_mtime
    assert not list(out.glob("*.tmp"))
    assert json.loads((out / "manifest.json").read_text())["store_id"] == manifest["store_id"]
    # A source rewritten with the same size is tokenised again, not taken for finished.
    src0 = tmp_path / "src" / "a-0.jsonl"
    src0.write_text(src0.read_text().replace("the", "THE"))
    tokenize(src, "--tokenizer", str(SP_MODEL), "--out", str(out), workers=1)
    assert (out / "shard-00000.tokens").stat().st_mtime_ns != first_mtime
    redone = json.loads((out / "manifest.json").read_text())
    assert redone["shards"][0]["tokens_sha256"] != manifest["shards"][0]["tokens_sha256"]
    assert redone["shards"][1] == manifest["shards"][1]
    from launch.pretokenize import main

    assert main(["--out", str(out), "--verify"]) == 0
    data = bytearray((out / "shard-00000.tokens").read_bytes())
    data[10] ^= 0xFF
    (out / "shard-00000.tokens").write_bytes(bytes(data))
    assert main(["--out", str(out), "--verify"]) == 1
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32


def _other_tokenizer(tmp_path: Path) -> Path:
    """A different SentencePiece model (same special ids), trained here in a second."""
    text = tmp_path / "train.txt"
    text.write_text("\n".join(make_docs(5, 200)))
    prefix = tmp_path / "other"
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(prefix), vocab_size=150, model_type="bpe",
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    return prefix.with_suffix(".model")


def test_store_of_another_tokenizer_or_affixes_is_refused(
    stored: Path,
    tmp_path: Path,
    tok: Tokenizer,  # noqa: F811
) -> None:
    other = _other_tokenizer(tmp_path)
    cfg = cfg_of(stored, DomainConfig(store=str(stored / "a")), files_b(stored))
    with pytest.raises(ValueError, match="data.domains.a.store: .* another tokenizer"):
        make_loader(cfg, load_tokenizer(str(other)))
    cfg.add_bos = False
    with pytest.raises(ValueError, match="add_bos=True, this run has data.add_bos=False"):
        make_loader(cfg, tok)


def test_store_and_files_over_fsspec_urls(
    stored: Path,
    tok: Tokenizer,  # noqa: F811
) -> None:
    """The store and the files copied to fsspec's in-memory filesystem read as local ones:
    ranged reads for the store, seek/stream for the files (what s3:// or gs:// get)."""
    mem = fsspec.filesystem("memory")
    root = f"/t{os.getpid()}"
    for f in (stored / "a").iterdir():
        mem.pipe_file(f"{root}/a/{f.name}", f.read_bytes())
    for f in (stored / "src").iterdir():
        mem.pipe_file(f"{root}/src/{f.name}", f.read_bytes())
    try:
        want = batches(cfg_of(stored, files_a(stored), files_b(stored)), tok, 8, rank=1)
        remote = cfg_of(
            stored,
            DomainConfig(store=f"memory://{root}/a"),
            DomainConfig(train=[f"memory://{root}/src/b-*.jsonl"]),
        )
        assert_same(batches(remote, tok, 8, rank=1), want)
        remote.domains["a"] = DomainConfig(train=[f"memory://{root}/src/a-*.jsonl"])
        assert_same(batches(remote, tok, 8, rank=1), want)
    finally:
        mem.rm(root, recursive=True)


@pytest.mark.parametrize("layout", ["save_to_disk", "arrow", "parquet"])
def test_datasets_directory_resumes_exactly(
    tmp_path: Path,
    tok: Tokenizer,  # noqa: F811
    layout: str,
) -> None:
    import datasets

    docs = corpus(tmp_path)
    ds = datasets.Dataset.from_dict({"text": docs["a"], "id": list(range(len(docs["a"])))})
    d = tmp_path / "ds"
    if layout == "save_to_disk":
        ds.save_to_disk(str(d), max_shard_size="4KB")  # several Arrow files
        assert len(list(d.glob("*.arrow"))) > 1
    elif layout == "arrow":
        d.mkdir()
        for i, part in enumerate((ds.select(range(20)), ds.select(range(20, len(ds))))):
            part.save_to_disk(str(tmp_path / f"p{i}"))
            shutil.copy(next((tmp_path / f"p{i}").glob("*.arrow")), d / f"part-{i}.arrow")
    else:
        d.mkdir()
        ds.select(range(20)).to_parquet(str(d / "part-0.parquet"))
        ds.select(range(20, len(ds))).to_parquet(str(d / "part-1.parquet"))
    # The reference: the same documents as one JSON Lines file (no bad line here).
    write_jsonl(tmp_path / "src" / "same.jsonl", docs["a"])
    ref = cfg_of(
        tmp_path, DomainConfig(train=[str(tmp_path / "src" / "same.jsonl")]), files_b(tmp_path)
    )
    cfg = cfg_of(tmp_path, DomainConfig(dataset=str(d)), files_b(tmp_path))
    for rank in (0, 1):
        want = batches(ref, tok, 12, rank)
        assert_same(batches(cfg, tok, 12, rank), want)
        args = dict(seq_len=SEQ, micro_batch_size=3, dp_rank=rank, dp_world=2, max_steps=15)
        with make_loader(cfg, tok, **args) as first:
            for _ in range(4):
                first.next_batch()
            state = _roundtrip(first.state_dict(), "torch")
        assert state["streams"]["a"]["offset"] > 0  # a row index (or a Parquet row)
        with make_loader(cfg, tok, **args) as resumed:
            resumed.load_state_dict(state)
            assert_same([resumed.next_batch() for _ in range(8)], want[4:])


def test_config_errors_name_the_key_and_the_fix(stored: Path, tmp_path: Path) -> None:
    import datasets

    base = ROOT / "configs" / "tiny-cpu.yaml"
    no_files = "data.domains.legal.train=[]"
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b"]})})
    splits.save_to_disk(str(tmp_path / "dd"))
    cases = {
        (f"data.domains.legal.store={stored / 'a'}",): "train and store are both set",
        ("data.domains.legal.store=/nonexistent/store", no_files): "has no manifest.json",
        ("data.domains.legal.train=[s3://AKIA:secret@bucket/x.jsonl]",): "carries credentials",
        ("data.domains.legal.dataset=/nonexistent/ds", no_files): "is not a directory",
        (f"data.domains.legal.dataset={tmp_path / 'dd'}", no_files): (
            f"is a DatasetDict with splits ['train']; point at one split's directory, e.g. "
            f"'{tmp_path / 'dd' / 'train'}'"
        ),
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(str(base), list(overrides))
        assert message in str(e.value), str(e.value)
        assert "secret" not in str(e.value)
    cfg = load_config(str(base), [f"data.domains.legal.store={stored / 'a'}", no_files])
    assert cfg.data.domains["legal"].store == str(stored / "a")


def test_data_fingerprint_of_a_store_and_a_dataset(stored: Path, tmp_path: Path) -> None:
    """What a resume compares: a store by its store_id, a dataset directory by its files."""
    import datasets

    from train.resume import data_fingerprint

    datasets.Dataset.from_dict({"text": ["x y", "z"]}).save_to_disk(str(tmp_path / "ds"))
    over = [f"data.domains.legal.store={stored / 'a'}", "data.domains.legal.train=[]"]
    over += [f"data.domains.code.dataset={tmp_path / 'ds'}", "data.domains.code.train=[]"]
    cfg = load_config(str(ROOT / "configs" / "tiny-cpu.yaml"), over)
    fp = data_fingerprint(cfg)
    store = TokenStore(str(stored / "a"))
    assert fp["legal"] == [
        {"path": str(stored / "a"), "size": store.num_tokens, "head_tail": store.store_id}
    ]
    names = [Path(f["path"]).name for f in fp["code"]]
    assert "state.json" in names and any(n.endswith(".arrow") for n in names)
    assert len(fp["science"]) == 2  # files as before

    # Resuming: the same store at a new path is fine; another store under a run that read it
    # is refused, as are the files it was made from (the state would not fit them).
    from train.resume import check_changes

    train = {"step": 3, "finished_phases": [], "tokens_by_phase": {"general": 1}}
    saved = {"config": cfg.to_dict(), "data_fingerprint": fp}
    saved["train"] = train | {"tokens_by_domain": {"legal": 1}}
    shutil.copytree(stored / "a", tmp_path / "moved")
    moved = load_config(str(ROOT / "configs" / "tiny-cpu.yaml"), over)
    moved.data.domains["legal"].store = str(tmp_path / "moved")
    ch = check_changes(saved, moved, 2, data_fingerprint(moved))
    assert not ch.refused and any("same files at new paths" in x for x in ch.safe), ch
    # A checkpoint written before these keys existed resumes (they were unset, now default).
    plain = load_config(str(ROOT / "configs" / "tiny-cpu.yaml"))
    before = {"config": plain.to_dict(), "data_fingerprint": data_fingerprint(plain)}
    before["train"] = train | {"tokens_by_domain": {"literature": 1, "legal": 1}}
    for dom in before["config"]["data"]["domains"].values():
        for k in ("store", "dataset", "heldout_store"):
            del dom[k]
    ch = check_changes(before, plain, 2, data_fingerprint(plain))
    assert not ch.refused and not ch.need_override, ch
    del before["data_fingerprint"]  # older still: no fingerprint to compare with
    ch = check_changes(before, plain, 2, None)
    assert not ch.refused and not ch.need_override and not ch.safe, ch
    other = load_config(str(ROOT / "configs" / "tiny-cpu.yaml"), over)
    other.data.domains["legal"] = DomainConfig(train=[str(stored / "src" / "a-*.jsonl")])
    ch = check_changes(saved, other, 2, data_fingerprint(other))
    assert any("data.domains.legal" in x for x in ch.refused), ch


# ------------------------------------------------------------------------------ 2 ranks

# 6 steps: phase general (literature and speeches) 4, legal 1, science 1.
LAUNCH = [
    "train.max_steps=6",
    "data.phases.0.steps=4",
    "data.phases.1.steps=1",
    "checkpoint.every_steps=2",
]


@pytest.fixture(scope="module")
def demo_sources(tmp_path_factory) -> list[str]:
    """Overrides that read the demo's literature and legal domains from token stores and
    speeches from a datasets directory (science and code stay files)."""
    import datasets

    tmp = tmp_path_factory.mktemp("demo")
    for d in ("literature", "legal"):
        tokenize("--config", "configs/tiny-cpu.yaml", "--domain", d, "--out", str(tmp / d))
    rows = []
    for f in sorted((ROOT / "data" / "demo" / "speeches").glob("train-*.jsonl")):
        rows += [json.loads(x)["text"] for x in f.read_text().splitlines() if x.strip()]
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(tmp / "speeches"))
    return [
        f"data.domains.literature.store={tmp / 'literature'}",
        "data.domains.literature.train=[]",
        f"data.domains.legal.store={tmp / 'legal'}",
        "data.domains.legal.train=[]",
        f"data.domains.speeches.dataset={tmp / 'speeches'}",
        "data.domains.speeches.train=[]",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(ENGINES))
def test_store_run_matches_files_and_resumes_exactly(backend, demo_sources, tmp_path):
    """2 ranks: the run from stores + a datasets directory, stopped by SIGTERM and resumed,
    has every metrics row (loss, grad norm, MIGU statistics, tokens by domain) of the
    uninterrupted file-backed run: same batches, exact resume."""
    from tests.test_checkpoint import finish, rows, run, start, wait_for_step, workers

    ref = tmp_path / "files"
    rc, log = run(ref, backend, LAUNCH)
    assert rc == 0, log[-3000:]
    out = tmp_path / "stores"
    proc = start(out, backend, LAUNCH + demo_sources)
    wait_for_step(proc, out, 1)  # stop inside phase general: both of its domains resume
    for w in workers(proc):
        w.send_signal(signal.SIGTERM)
    rc, log = finish(proc, out)
    assert rc == 0, log[-3000:]
    stopped = max(rows(out))
    assert stopped < 6, "the run finished before it could be interrupted"
    print(f"{backend}: stopped at step {stopped}")
    rc, log = run(out, backend, LAUNCH + demo_sources)
    assert rc == 0, log[-3000:]
    assert f"at step {stopped}" in log
    want, got = rows(ref), rows(out)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        assert got[step] == want[step], f"step {step} differs (stopped at {stopped})"


@pytest.mark.slow
def test_run_refuses_a_store_of_another_tokenizer(stored: Path, tmp_path: Path) -> None:
    other = _other_tokenizer(tmp_path)
    tokenize(
        str(stored / "src" / "a-*.jsonl"), "--tokenizer", str(other), "--out", str(tmp_path / "x")
    )
    from tests.test_checkpoint import run

    over = [f"data.domains.legal.store={tmp_path / 'x'}", "data.domains.legal.train=[]"]
    rc, log = run(tmp_path / "run", "fsdp2", LAUNCH + over)
    assert rc != 0
    assert "data.domains.legal.store: token store" in log and "another tokenizer" in log
