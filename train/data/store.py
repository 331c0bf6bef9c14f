"""Pre-tokenised token stores: written once by ``launch/pretokenize.py``, read by every run.

A store is a directory (local, or an ``fsspec`` URL) holding, per source file in the domain's
reading order, one shard:

- ``shard-NNNNN.tokens``: the file's documents as the streaming reader would pack them,
  ``[BOS] doc [EOS]`` one after the other, as raw little-endian ``uint16`` (vocabulary below
  65536) or ``uint32``;
- ``shard-NNNNN.docs``: the start of every document in that array (``int64``), for the
  document-restarting position ids;
- ``shard-NNNNN.json``: the shard's entry (counts, SHA-256 of both files, the source file,
  its size and a hash of its ends), written last: its presence marks the shard finished;

and ``manifest.json``: the tokenizer's identity, the packing options, every shard's entry and
a ``store_id`` over all of them, written once every shard is done.

The concatenated shards are exactly the token stream that ``stream.PackedStream`` builds from
the same files, so a domain's packed sequence ``i`` is simply tokens ``[i * seq_len,
(i + 1) * seq_len)`` of that stream repeated over epochs. The whole read state is therefore
one integer (tokens consumed), resume is O(1), and a rank reads only the rows it keeps.
Local shards are read with ``np.memmap``; remote ones with one ranged read per piece.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from train.data import fs
from train.data.sources import BadInputLog, DocumentReader, Position
from train.tokenizer import Tokenizer

FORMAT = "migu-cpt-token-store"
VERSION = 1
MANIFEST = "manifest.json"
_DOC_DTYPE = np.dtype("<i8")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id: half the bytes for < 65536 ids."""
    return np.dtype("<u2") if vocab_size < 2**16 else np.dtype("<u4")


def tokenizer_identity(tokenizer: Tokenizer) -> dict[str, Any]:
    """What identifies a tokenizer's ids: SHA-256 of its model (SentencePiece proto, or
    tokenizer.json plus the special-token settings), vocabulary size, BOS and EOS ids."""
    state = tokenizer.__getstate__()
    h = hashlib.sha256()
    if "sp" in state:
        h.update(b"sentencepiece\0" + state["sp"])
    else:
        h.update(b"tokenizers\0" + state["hf"].encode("utf-8"))
        specials = {k: state["config"].get(k) for k in ("bos_token", "eos_token")}
        h.update(json.dumps(specials, sort_keys=True, default=str).encode("utf-8"))
    return {
        "sha256": h.hexdigest(),
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
    }


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if fs.is_url(root) else str(Path(root) / name)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ writing


@dataclass
class ShardJob:
    """One source file to tokenise into shard ``index`` of ``out_dir``."""

    out_dir: str
    index: int
    source: str
    text_field: str
    add_bos: bool
    add_eos: bool
    max_document_bytes: int | None

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


def source_signature(path: str, block: int = 1 << 20) -> dict[str, Any]:
    """Size and a hash of the first and last ``block`` bytes of a source file: how a finished
    shard recognises its source without reading it whole (a rewrite changes one or the other
    in practice; ``--verify`` and the shard checksums cover the store itself)."""
    with fs.open_binary(path) as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        h = hashlib.blake2b(f.read(block), digest_size=16)
        if size > block:
            f.seek(max(block, size - block))
            h.update(f.read())
    return {"size": size, "head_tail": h.hexdigest()}


def finished_shard(job: ShardJob, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The entry of ``job``'s shard if an earlier run finished it from the same source file
    with the same tokenizer and options, else None (it must be written again)."""
    meta = Path(job.out_dir) / f"{job.name}.json"
    if not meta.is_file():
        return None
    entry = json.loads(meta.read_text())
    expect = {
        "source": job.source,
        "source_signature": source_signature(job.source),
        "tokenizer_sha256": identity["sha256"],
        "options": _options(job),
    }
    if any(entry.get(k) != v for k, v in expect.items()):
        return None
    return entry


def _options(job: ShardJob) -> dict[str, Any]:
    return {
        "text_field": job.text_field,
        "add_bos": job.add_bos,
        "add_eos": job.add_eos,
        "max_document_bytes": job.max_document_bytes,
    }


def write_shard(job: ShardJob, tokenizer: Tokenizer) -> dict[str, Any]:
    """Tokenise ``job.source`` into its shard; returns the shard's entry.

    Documents are read by the training reader itself (same records skipped as bad input, same
    order) and written as they are tokenised, so memory stays at one chunk of documents.
    Files appear under their final names only when complete (write to ``.tmp``, then rename),
    the ``.json`` entry last: a killed run leaves no shard that looks finished.
    """
    from train.data.stream import document_affixes

    out = Path(job.out_dir)
    pre, suf = document_affixes(tokenizer, job.add_bos, job.add_eos)
    dtype = token_dtype(tokenizer.vocab_size)
    bad = BadInputLog()
    reader = DocumentReader(
        job.source,
        [job.source],
        job.text_field,
        Position(0, 0, 0),
        bad,
        wrap=False,
        max_bytes=job.max_document_bytes,
    )
    tok_path, doc_path = out / f"{job.name}.tokens", out / f"{job.name}.docs"
    tok_tmp, doc_tmp = tok_path.with_suffix(".tokens.tmp"), doc_path.with_suffix(".docs.tmp")
    tok_hash, doc_hash = hashlib.sha256(), hashlib.sha256()
    n_tokens = n_docs = 0
    with tok_tmp.open("wb") as ft, doc_tmp.open("wb") as fd:
        while not reader.exhausted:
            docs = reader.read(64, 1 << 18)
            if not docs:
                continue
            ids = tokenizer.encode_batch([text for text, _, _ in docs])
            lengths = np.array([len(x) + len(pre) + len(suf) for x in ids], dtype=np.int64)
            starts = (n_tokens + np.cumsum(lengths) - lengths).astype(_DOC_DTYPE)
            flat = np.fromiter(
                (t for x in ids for t in (*pre, *x, *suf)), dtype=dtype, count=int(lengths.sum())
            )
            for f, h, arr in ((ft, tok_hash, flat), (fd, doc_hash, starts)):
                data = arr.tobytes()
                f.write(data)
                h.update(data)
            n_tokens += len(flat)
            n_docs += len(starts)
    os.replace(tok_tmp, tok_path)
    os.replace(doc_tmp, doc_path)
    entry = {
        "name": job.name,
        "source": job.source,
        "source_signature": source_signature(job.source),
        "tokenizer_sha256": tokenizer_identity(tokenizer)["sha256"],
        "options": _options(job),
        "num_tokens": n_tokens,
        "num_docs": n_docs,
        "tokens_sha256": tok_hash.hexdigest(),
        "docs_sha256": doc_hash.hexdigest(),
        "bad": bad.files,
    }
    _atomic_write_text(out / f"{job.name}.json", json.dumps(entry, indent=1))
    return entry


def write_manifest(
    out_dir: str, tokenizer: Tokenizer, options: dict[str, Any], shards: list[dict[str, Any]]
) -> dict[str, Any]:
    """Write ``manifest.json`` over finished shards (in reading order); returns it."""
    identity = tokenizer_identity(tokenizer)
    store_id = hashlib.sha256()
    for s in shards:
        store_id.update(f"{s['num_tokens']}:{s['tokens_sha256']}:{s['docs_sha256']};".encode())
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "tokenizer": identity,
        "options": options,
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "num_docs": sum(s["num_docs"] for s in shards),
        "store_id": store_id.hexdigest(),
        "shards": shards,
    }
    _atomic_write_text(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def verify(root: str) -> list[str]:
    """Shards of store ``root`` whose bytes do not match the manifest's SHA-256 (reads all)."""
    manifest = read_manifest(root)
    bad = []
    for s in manifest["shards"]:
        for suffix, key in (("tokens", "tokens_sha256"), ("docs", "docs_sha256")):
            h = hashlib.sha256()
            with fs.open_binary(_join(root, f"{s['name']}.{suffix}")) as f:
                while block := f.read(1 << 24):
                    h.update(block)
            if h.hexdigest() != s[key]:
                bad.append(f"{s['name']}.{suffix}")
    return bad


# ------------------------------------------------------------------------------ reading


def read_manifest(root: str) -> dict[str, Any]:
    """The manifest of store ``root``; a clear error when it is missing or not a store."""
    path = _join(root, MANIFEST)
    try:
        with fs.open_binary(path) as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"token store {root!r} has no {MANIFEST}: it does not exist or launch/pretokenize.py "
            "did not finish writing it (run it again: finished shards are kept)"
        ) from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(
            f"token store {root!r}: {MANIFEST} is not a version-{VERSION} {FORMAT} manifest"
        )
    return manifest


class TokenStore:
    """Random access to a store's token stream, repeated over epochs without end.

    Position ``g`` (tokens consumed since the start of the run) is token ``g % num_tokens``;
    reads may span shards and the wrap into the next epoch.
    """

    def __init__(self, root: str):
        self.root = root
        self.manifest = read_manifest(root)
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        shards = self.manifest["shards"]
        self.num_tokens = int(self.manifest["num_tokens"])
        if self.num_tokens == 0:
            raise ValueError(f"token store {root!r} holds no token (no usable document)")
        self._names = [s["name"] for s in shards]
        sizes = np.array([s["num_tokens"] for s in shards], dtype=np.int64)
        self._bounds = np.concatenate([[0], np.cumsum(sizes)])  # (shards + 1,)
        self._ndocs = [int(s["num_docs"]) for s in shards]
        self._tokens: dict[int, np.ndarray] = {}
        self._docs: dict[int, np.ndarray] = {}
        if not fs.is_url(root):
            for s in shards:  # a truncated copy fails here, not mid-run
                path = Path(root, f"{s['name']}.tokens")
                expect = s["num_tokens"] * self.dtype.itemsize
                if not path.is_file() or path.stat().st_size != expect:
                    raise ValueError(
                        f"token store {root!r}: {path.name} is missing or not {expect} bytes "
                        "long; copy the store again or re-run launch/pretokenize.py"
                    )

    @property
    def store_id(self) -> str:
        return str(self.manifest["store_id"])

    def check(self, tokenizer: Tokenizer, add_bos: bool, add_eos: bool, key: str) -> None:
        """Refuse a store whose ids or document affixes differ from this run's."""
        made, mine = self.manifest["tokenizer"], tokenizer_identity(tokenizer)
        if made["sha256"] != mine["sha256"]:
            raise ValueError(
                f"{key}: token store {self.root!r} was made with another tokenizer (sha256 "
                f"{made['sha256'][:12]}..., vocab {made['vocab_size']}) than data.tokenizer "
                f"(sha256 {mine['sha256'][:12]}..., vocab {mine['vocab_size']}); its ids would "
                "be wrong for this model. Re-run launch/pretokenize.py with data.tokenizer, or "
                "point data.tokenizer at the store's tokenizer."
            )
        opts = self.manifest["options"]
        for name, want in (("add_bos", add_bos), ("add_eos", add_eos)):
            if opts[name] != want:
                raise ValueError(
                    f"{key}: token store {self.root!r} was made with {name}={opts[name]}, this "
                    f"run has data.{name}={want}; re-run launch/pretokenize.py with the run's "
                    "data settings (--config)"
                )

    def _shard_tokens(self, s: int, lo: int, hi: int) -> np.ndarray:
        if s in self._tokens:
            return self._tokens[s][lo:hi]
        path = _join(self.root, f"{self._names[s]}.tokens")
        if fs.is_url(self.root):
            size = self.dtype.itemsize
            return np.frombuffer(fs.read_range(path, lo * size, hi * size), dtype=self.dtype)
        n = int(self._bounds[s + 1] - self._bounds[s])
        # A plain ndarray view of the map: slicing a np.memmap costs a Python-level hook.
        self._tokens[s] = np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)).view(np.ndarray)
        return self._tokens[s][lo:hi]

    def _shard_docs(self, s: int) -> np.ndarray:
        if s not in self._docs:
            path = _join(self.root, f"{self._names[s]}.docs")
            n = self._ndocs[s]
            if fs.is_url(self.root):  # the index is ~1/200 of the tokens: fetch it whole
                raw = fs.read_range(path, 0, n * _DOC_DTYPE.itemsize) if n else b""
                self._docs[s] = np.frombuffer(raw, dtype=_DOC_DTYPE)
            elif n:
                docs = np.memmap(path, dtype=_DOC_DTYPE, mode="r", shape=(n,))
                self._docs[s] = docs.view(np.ndarray)
            else:
                self._docs[s] = np.zeros(0, dtype=_DOC_DTYPE)
        return self._docs[s]

    def _pieces(self, start: int, n: int) -> list[tuple[int, int, int, int]]:
        """(shard, lo, hi, offset in the request) pieces covering positions [start, start+n)."""
        out = []
        done = 0
        while done < n:
            r = (start + done) % self.num_tokens
            s = int(np.searchsorted(self._bounds, r, side="right")) - 1
            lo = r - int(self._bounds[s])
            take = min(n - done, int(self._bounds[s + 1]) - r)
            if take > 0:
                out.append((s, lo, lo + take, done))
            done += take
        return out

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens at positions ``[start, start + n)``, (n,) int32."""
        out = np.empty(n, dtype=np.int32)
        for s, lo, hi, at in self._pieces(start, n):
            out[at : at + hi - lo] = self._shard_tokens(s, lo, hi)
        return out

    def positions(self, start: int, n: int) -> np.ndarray:
        """(n,) int32 position ids restarting at every document start inside ``[start, start
        + n)`` and at ``start`` itself, as ``PackedStream`` computes them."""
        marks = np.zeros(n, dtype=np.int64)
        for s, lo, hi, at in self._pieces(start, n):
            docs = self._shard_docs(s)
            a, b = np.searchsorted(docs, [lo, hi], side="left")
            inside = np.asarray(docs[a:b], dtype=np.int64) - lo + at
            marks[inside] = inside
        return (np.arange(n) - np.maximum.accumulate(marks)).astype(np.int32)


class StoreStream:
    """One domain's packed sequences from a token store; the same interface and sequences as
    ``stream.PackedStream`` over the store's source files, with a one-number state."""

    def __init__(
        self,
        name: str,
        root: str,
        seq_len: int,
        *,
        position_ids: bool,
        state: dict[str, Any] | None = None,
    ):
        self.name = name
        self.store = TokenStore(root)
        self.seq_len = seq_len
        self.position_ids = position_ids
        state = state or initial_state()
        if "cursor" not in state:
            raise ValueError(
                f"domain {name!r}: the checkpoint read this domain from files, this run from "
                f"token store {root!r}; a domain cannot switch between them mid-run (finish "
                "the run with the files, or start a new one)"
            )
        if state["store_id"] not in (None, self.store.store_id):
            raise ValueError(
                f"domain {name!r}: token store {root!r} (store_id {self.store.store_id[:12]}) "
                f"is not the store the checkpoint was reading (store_id "
                f"{state['store_id'][:12]}); its positions would point at other tokens"
            )
        self._cursor = int(state["cursor"])

    def take(self, keep: list[bool]) -> tuple[np.ndarray, np.ndarray | None]:
        """Advance by ``len(keep)`` sequences, reading only the kept ones: (k, seq_len) int32
        each, like ``PackedStream.take``."""
        k = sum(bool(x) for x in keep)
        out = np.empty((k, self.seq_len), dtype=np.int32)
        pos = np.empty((k, self.seq_len), dtype=np.int32) if self.position_ids else None
        row = 0
        for i, wanted in enumerate(keep):
            if wanted:
                lo = self._cursor + i * self.seq_len
                out[row] = self.store.read(lo, self.seq_len)
                if pos is not None:
                    pos[row] = self.store.positions(lo, self.seq_len)
                row += 1
        self._cursor += len(keep) * self.seq_len
        return out, pos

    def state(self) -> dict[str, Any]:
        """Tokens consumed (the whole read state), the epoch it falls in, the store's id."""
        return {
            "cursor": self._cursor,
            "epoch": self._cursor // self.store.num_tokens,
            "store_id": self.store.store_id,
            "bad": {},
        }

    def drain_messages(self) -> list[str]:
        """Bad input was reported when the store was written; nothing to add while reading."""
        return []


def initial_state() -> dict[str, Any]:
    """State of a store-backed domain that has not been read yet."""
    return {"cursor": 0, "epoch": 0, "store_id": None, "bad": {}}
