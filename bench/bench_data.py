"""Data pipeline throughput against the tokenizer's raw encode speed on the same text, and
the token store (``launch/pretokenize.py``) against the raw-text pipeline per rank.

    .venv/bin/python bench/bench_data.py [--data 'data/demo/*/train-*'] [--num-workers 0,2]
        [--world-sizes 1,8]

Prints one JSON line. Per-core figures use CPU seconds (this process plus its worker
processes), so they are comparable on a busy machine; wall-clock tokens/s is given too.
Every rank tokenises the whole global batch (see ``train/data/loader.py``), so the pipeline's
tokens/s per core is also the most global tokens/s one core per rank can feed.

``store_vs_text``: rank 0 of a ``world_size``-rank job, once reading the files (tokenising
every row of the global batch) and once a token store of the same files (reading its own
rows only): the tokens the rank trains on per CPU second. The store is written first, in this
process (``tokenize_once_s``), as launch/pretokenize.py would.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config import DataConfig, DomainConfig, PhaseConfig  # noqa: E402
from train.data import CPTDataLoader  # noqa: E402
from train.data.loader import expand_globs  # noqa: E402
from train.data.sources import BadInputLog, DocumentReader, Position  # noqa: E402
from train.data.store import ShardJob, write_manifest, write_shard  # noqa: E402
from train.tokenizer import load_tokenizer  # noqa: E402


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the data workers)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def raw_encode(tok, files: list[str], min_seconds: float) -> tuple[int, float, int]:
    """(tokens, CPU seconds, passes) of encode_batch over all documents, 64 at a time."""
    reader = DocumentReader("bench", files, "text", Position(0, 0, 0), BadInputLog(), wrap=False)
    texts: list[str] = []
    while not reader.exhausted:
        texts += [t for t, _, _ in reader.read(1024)]
    tokens, passes = 0, 0
    start = time.process_time()
    while passes == 0 or time.process_time() - start < min_seconds:
        for i in range(0, len(texts), 64):
            tokens += sum(len(x) for x in tok.encode_batch(texts[i : i + 64]))
        passes += 1
    return tokens, time.process_time() - start, passes


def pipeline(
    tok,
    files: list[str],
    args: argparse.Namespace,
    workers: int,
    tokens: int,
    *,
    store: str | None = None,
    world: int = 1,
) -> dict:
    """Run rank 0's loader of a ``world``-rank job until it has produced ``tokens`` tokens
    (its own rows), from ``files`` or from the token store ``store`` of the same files."""
    domain = DomainConfig(store=store) if store else DomainConfig(train=files)
    cfg = DataConfig(
        domains={"bench": domain},
        phases=[PhaseConfig(name="bench", domains={"bench": 1.0})],
        num_workers=workers,
        document_position_ids=True,
    )
    rows = args.micro_batch_size
    steps = -(-tokens // (rows * args.seq_len))
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    loader = CPTDataLoader(
        cfg,
        tok,
        seq_len=args.seq_len,
        micro_batch_size=rows,
        grad_accum=1,
        dp_rank=0,
        dp_world=world,
        seed=0,
        max_steps=steps,
    )
    first = None
    for step in range(steps):
        loader.next_batch()
        if step == 0:
            first = time.perf_counter() - wall0
    loader.close()  # workers exit, so their CPU time is counted
    wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    produced = steps * rows * args.seq_len
    return {
        "num_workers": workers,
        "tokens": produced,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "first_batch_s": round(first or 0.0, 3),
        "tokens_per_s_wall": round(produced / wall),
        "tokens_per_s_per_core": round(produced / cpu),
    }


def store_vs_text(tok, files: list[str], args: argparse.Namespace, tokens: int) -> dict:
    """Per rank: the token store against the text pipeline, for each ``--world-sizes``."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        shards = [
            write_shard(ShardJob(tmp, i, f, "text", True, True, 64 * 2**20), tok)
            for i, f in enumerate(files)
        ]
        opts = {"text_field": "text", "add_bos": True, "add_eos": True}
        write_manifest(tmp, tok, opts | {"max_document_bytes": 64 * 2**20}, shards)
        written = time.perf_counter() - t0
        out = []
        for world in (int(x) for x in args.world_sizes.split(",")):
            text = pipeline(tok, files, args, 0, tokens // world, world=world)
            # The store is so much faster that it reads 20x the tokens for a stable timing.
            store = pipeline(tok, files, args, 0, 20 * tokens, store=tmp, world=world)
            ratio = store["tokens_per_s_per_core"] / text["tokens_per_s_per_core"]
            out.append(
                {
                    "world_size": world,
                    "text_tokens_per_s_per_rank_core": text["tokens_per_s_per_core"],
                    "store_tokens_per_s_per_rank_core": store["tokens_per_s_per_core"],
                    "store_tokens_per_s_wall": store["tokens_per_s_wall"],
                    "store_over_text": round(ratio, 1),
                    "store_first_batch_s": store["first_batch_s"],
                }
            )
    return {
        "tokenize_once_s": round(written, 2),
        "store_tokens": sum(s["num_tokens"] for s in shards),
        "per_rank": out,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/demo/*/train-*", help="glob of training files")
    p.add_argument("--tokenizer", default="data/tokenizer/tokenizer.model")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--num-workers", default="0,2", help="comma list, one run each")
    p.add_argument("--min-seconds", type=float, default=3.0, help="raw-encode timing length")
    p.add_argument("--world-sizes", default="1,8", help="store vs text: ranks of the job")
    args = p.parse_args()
    # The runs wrap the small demo data many times; one warning per wrap is noise here.
    logging.getLogger("train.data").setLevel(logging.ERROR)
    files = expand_globs([args.data])
    if not files:
        sys.exit(f"--data {args.data!r} matches no file")
    tok = load_tokenizer(args.tokenizer)
    raw_tokens, raw_cpu, passes = raw_encode(tok, files, args.min_seconds)
    raw_rate = raw_tokens / raw_cpu
    runs = []
    for w in (int(x) for x in args.num_workers.split(",")):
        run = pipeline(tok, files, args, w, raw_tokens)
        run["ratio_vs_raw_per_core"] = round(run["tokens_per_s_per_core"] / raw_rate, 3)
        runs.append(run)
    vs = store_vs_text(tok, files, args, raw_tokens)
    print(
        json.dumps(
            {
                "bench": "data_pipeline",
                "cpu_count": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "seq_len": args.seq_len,
                "micro_batch_size": args.micro_batch_size,
                "files": len(files),
                "raw_encode_tokens_per_s_per_core": round(raw_rate),
                "raw_passes": passes,
                "pipeline": runs,
                "target": "pipeline tokens/s per core >= 0.8 x raw encode",
                "met": all(r["ratio_vs_raw_per_core"] >= 0.8 for r in runs),
                "store_vs_text": vs,
                "store_target": "store tokens/s per rank >= 10 x text pipeline",
                "store_met": all(r["store_over_text"] >= 10 for r in vs["per_rank"]),
            }
        )
    )


if __name__ == "__main__":
    main()
