#!/usr/bin/env python
"""Tokenise a domain's files once into a token store (see ``train/data/store.py``).

(Not ``launch/tokenize.py``: Python puts a script's directory first on the path, and a
``tokenize.py`` there would replace the standard library's for every script in ``launch/``.)

    python launch/pretokenize.py --config configs/tiny-cpu.yaml --domain legal --out stores/legal
    python launch/pretokenize.py --tokenizer data/tokenizer/tokenizer.model --out stores/x \\
        'data/x/train-*.jsonl' 's3://bucket/x/*.jsonl.zst' --workers 16

With ``--config`` the tokenizer, ``text_field``, ``add_bos``/``add_eos`` and
``max_document_bytes`` are the run's (and the domain's ``train`` globs, when no globs are
given), so the store holds exactly the tokens the run would have packed from those files.
Then set ``data.domains.<domain>.store: <out>`` (and remove its ``train``).

One shard per source file, files in parallel over ``--workers`` processes. Resumable: run the
same command again after an interruption and finished shards (their ``.json`` entry, source
file size and ends, tokenizer and options unchanged) are kept. ``--verify`` re-reads a
finished store and checks every shard's SHA-256. The output directory is local; copy it to an
object store afterwards (``aws s3 sync``, ``gsutil rsync``, ``huggingface-cli upload``) to
train from a URL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.data.loader import expand_globs  # noqa: E402
from train.data.store import (  # noqa: E402
    ShardJob,
    finished_shard,
    tokenizer_identity,
    verify,
    write_manifest,
    write_shard,
)
from train.tokenizer import Tokenizer, load_tokenizer  # noqa: E402

_TOKENIZER: Tokenizer | None = None


def _init(tokenizer_path: str) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(tokenizer_path)


def _run(job: ShardJob) -> dict:
    assert _TOKENIZER is not None
    return write_shard(job, _TOKENIZER)


def _settings(args: argparse.Namespace) -> dict:
    """Tokenizer, globs and packing options, from --config/--domain and the flags."""
    out = {
        "tokenizer": args.tokenizer,
        "globs": args.globs,
        "text_field": args.text_field or "text",
        "add_bos": not args.no_bos,
        "add_eos": not args.no_eos,
        "max_document_bytes": args.max_document_bytes,
    }
    if args.config:
        from train.config import load_config

        cfg = load_config(args.config, [])
        if args.domain not in cfg.data.domains:
            sys.exit(f"--domain {args.domain!r} is not in {args.config}'s data.domains")
        dom = cfg.data.domains[args.domain]
        out["tokenizer"] = args.tokenizer or cfg.data.tokenizer
        out["globs"] = args.globs or dom.train
        out["text_field"] = args.text_field or dom.text_field
        out["add_bos"], out["add_eos"] = cfg.data.add_bos, cfg.data.add_eos
        out["max_document_bytes"] = args.max_document_bytes or cfg.data.max_document_bytes
    if out["max_document_bytes"] is None:
        from train.config import DataConfig

        out["max_document_bytes"] = DataConfig().max_document_bytes
    if not out["tokenizer"]:
        sys.exit("give --tokenizer, or --config with data.tokenizer")
    if not out["globs"]:
        sys.exit("give the files to tokenise (globs or URLs), or --config with the domain's train")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("globs", nargs="*", help="source files: globs or fsspec URLs, in order")
    p.add_argument("--out", required=True, help="store directory (local)")
    p.add_argument("--config", help="take tokenizer and packing options from this run config")
    p.add_argument("--domain", help="with --config: the domain to tokenise")
    p.add_argument("--tokenizer", help="SentencePiece .model or Hugging Face tokenizer dir")
    p.add_argument("--text-field", help="document text field (default: text)")
    p.add_argument("--no-bos", action="store_true", help="as data.add_bos: false")
    p.add_argument("--no-eos", action="store_true", help="as data.add_eos: false")
    p.add_argument("--max-document-bytes", type=int, help="as data.max_document_bytes")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    p.add_argument("--verify", action="store_true", help="check a finished store's checksums")
    args = p.parse_args(argv)
    if args.verify:
        damaged = verify(args.out)
        print(json.dumps({"store": args.out, "damaged": damaged}))
        return 1 if damaged else 0
    if args.config and not args.domain:
        sys.exit("--config needs --domain")
    s = _settings(args)
    files = expand_globs(s["globs"])
    if not files:
        sys.exit(f"{s['globs']} match no file")
    tokenizer = load_tokenizer(s["tokenizer"])
    identity = tokenizer_identity(tokenizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.tmp"):  # pieces of an interrupted run's unfinished shards
        stale.unlink()
    opts = {k: s[k] for k in ("text_field", "add_bos", "add_eos", "max_document_bytes")}
    jobs = [ShardJob(str(out), i, f, **opts) for i, f in enumerate(files)]
    entries: dict[int, dict] = {}
    for job in jobs:
        if (done := finished_shard(job, identity)) is not None:
            entries[job.index] = done
    todo = [j for j in jobs if j.index not in entries]
    print(f"{len(files)} file(s): {len(entries)} shard(s) already done, {len(todo)} to write")
    t0 = time.perf_counter()
    if todo:
        _progress(todo, entries, s["tokenizer"], max(1, min(args.workers, len(todo))))
    manifest = write_manifest(str(out), tokenizer, opts, [entries[j.index] for j in jobs])
    bad: dict = {}
    for e in manifest["shards"]:
        bad.update(e["bad"])
    if bad:
        print(f"bad input skipped (as training would): {json.dumps(bad)[:2000]}")
    summary = {
        "store": str(out),
        "shards": len(jobs),
        "num_tokens": manifest["num_tokens"],
        "num_docs": manifest["num_docs"],
        "dtype": manifest["dtype"],
        "written_s": round(time.perf_counter() - t0, 2),
    }
    print(json.dumps(summary))
    return 0


def _progress(todo: list[ShardJob], entries: dict[int, dict], tok: str, workers: int) -> None:
    """Write ``todo`` in ``workers`` processes, with a progress bar over files and tokens."""
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a convenience
        tqdm = None
    bar = tqdm(total=len(todo), unit="file", desc="tokenize") if tqdm else None
    tokens = 0
    with contextlib.ExitStack() as stack:
        if workers == 1:  # no pool to start
            _init(tok)
            done: Iterator[dict] = map(_run, todo)
        else:
            # spawn: fresh interpreters with just the tokenizer, whatever the caller has loaded.
            pool = mp.get_context("spawn").Pool(workers, initializer=_init, initargs=(tok,))
            done = stack.enter_context(pool).imap_unordered(_run, todo)
        for entry in done:
            entries[int(entry["name"].split("-")[1])] = entry
            tokens += entry["num_tokens"]
            if bar is not None:
                bar.set_postfix(tokens=f"{tokens:,}")
                bar.update()
    if bar is not None:
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
