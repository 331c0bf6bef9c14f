"""One domain's stream of packed sequences: read -> tokenise -> BOS/EOS -> cut into seq_len.

Documents are concatenated (``[BOS] doc [EOS]``; ``doc [EOS]`` with a tokenizer that has no
BOS, e.g. Qwen2's) into one token stream that is cut into sequences of exactly ``seq_len``
tokens: no padding, documents run across sequence ends.

The packing buffer is checkpointed as a pointer, not as tokens: the position of the document
in progress plus how many of its tokens were already emitted. Tokenisation is deterministic,
so on resume that one document is read and tokenised again and its first tokens dropped;
the state stays a few numbers however long the document is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from typing import Any

import numpy as np

from train.data.sources import BadInputLog, DocumentReader, Position, Record
from train.tokenizer import Tokenizer

# Documents tokenised per encode_batch call (or fewer once this many characters are read).
_CHUNK_DOCS = 64
_CHUNK_CHARS = 1 << 18


def document_affixes(
    tokenizer: Tokenizer, add_bos: bool, add_eos: bool
) -> tuple[list[int], list[int]]:
    """(ids before, ids after) each document: BOS if asked for and the tokenizer has one, EOS
    if asked for. A tokenizer without BOS needs EOS, else documents would run together."""
    if tokenizer.bos_id is None and not add_eos:
        raise ValueError(
            "data.add_eos: false, but the tokenizer has no BOS token (bos_token null), so "
            "nothing would separate documents; set data.add_eos: true."
        )
    prefix = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    return prefix, [tokenizer.eos_id] if add_eos else []


def initial_state() -> dict[str, Any]:
    """State of a domain stream that has not been read yet."""
    return {"file_index": 0, "offset": 0, "epoch": 0, "skip_tokens": 0, "path": None, "bad": {}}


class PackedStream:
    """Packed ``seq_len`` sequences of one domain, resumable from :meth:`state`."""

    def __init__(
        self,
        name: str,
        files: list[str],
        text_field: str,
        tokenizer: Tokenizer,
        seq_len: int,
        *,
        add_bos: bool,
        add_eos: bool,
        position_ids: bool,
        max_document_bytes: int | None = None,
        state: dict[str, Any] | None = None,
        records: Callable[[str, int, str, int | None], Iterator[Record]] | None = None,
    ):
        """``records``: how an entry of ``files`` is read (see ``DocumentReader``)."""
        state = state or initial_state()
        if "cursor" in state:
            raise ValueError(
                f"domain {name!r}: the checkpoint read this domain from a token store, this "
                "run from files; a domain cannot switch between them mid-run"
            )
        i = state["file_index"]
        if state["path"] is not None and (i >= len(files) or files[i] != state["path"]):
            now = files[i] if i < len(files) else "no file"
            raise ValueError(
                f"domain {name!r}: the checkpoint was reading {state['path']!r} as file #{i}, "
                f"but the domain's globs now give {now!r} there; keep the file list of a "
                "resumed domain stable (append new shards only)"
            )
        self.name = name
        self.files = files
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.prefix, self.suffix = document_affixes(tokenizer, add_bos, add_eos)
        self.position_ids = position_ids
        self.bad = BadInputLog(state["bad"])
        start = Position(state["file_index"], state["offset"], state["epoch"])
        self.reader = DocumentReader(
            name, files, text_field, start, self.bad, max_bytes=max_document_bytes, records=records
        )
        self._tokens = np.zeros(0, dtype=np.int32)
        self._cursor = 0
        # Per buffered document: start and end in _tokens, where it was read, bad counts then.
        self._starts = np.zeros(0, dtype=np.int64)
        self._ends = np.zeros(0, dtype=np.int64)
        self._origins: list[tuple[Position, dict[str, Any]]] = []
        self._skip = state["skip_tokens"]

    def _fill(self) -> None:
        """Append one chunk of tokenised documents, dropping what was already emitted."""
        docs = self.reader.read(_CHUNK_DOCS, _CHUNK_CHARS)
        ids = self.tokenizer.encode_batch([text for text, _, _ in docs])
        pre, suf = self.prefix, self.suffix
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        lengths += len(pre) + len(suf)
        flat = np.fromiter(
            chain.from_iterable(pre + x + suf for x in ids),
            dtype=np.int32,
            count=int(lengths.sum()),
        )
        origins = [(pos, bad) for _, pos, bad in docs]
        keep = self._ends > self._cursor
        base = self._cursor
        self._tokens = np.concatenate([self._tokens[base:], flat])
        old_len = len(self._tokens) - len(flat)
        ends = np.cumsum(lengths) + old_len
        self._starts = np.concatenate([self._starts[keep] - base, ends - lengths])
        self._ends = np.concatenate([self._ends[keep] - base, ends])
        self._origins = [o for o, k in zip(self._origins, keep, strict=True) if k] + origins
        self._cursor = 0
        if self._skip:
            # Resume: the first document is the one that was in progress; drop what was emitted.
            self._cursor = min(self._skip, len(self._tokens))
            self._skip = 0

    def take(self, keep: Sequence[bool]) -> tuple[np.ndarray, np.ndarray | None]:
        """Advance by ``len(keep)`` sequences; return the kept ones, (k, seq_len) int32 each.

        The second array holds position ids restarting at every document start (and at the
        start of every sequence), or None when position ids are off.
        """
        need = len(keep) * self.seq_len
        while len(self._tokens) - self._cursor < need:
            self._fill()
        k = sum(bool(x) for x in keep)
        out = np.empty((k, self.seq_len), dtype=np.int32)
        pos = np.empty((k, self.seq_len), dtype=np.int32) if self.position_ids else None
        row = 0
        for wanted in keep:
            lo = self._cursor
            hi = lo + self.seq_len
            if wanted:
                out[row] = self._tokens[lo:hi]
                if pos is not None:
                    pos[row] = self._positions(lo, hi)
                row += 1
            self._cursor = hi
        return out, pos

    def _positions(self, lo: int, hi: int) -> np.ndarray:
        # (seq_len,): distance to the latest document start inside [lo, hi), else to lo.
        first = np.searchsorted(self._starts, lo, side="right")
        last = np.searchsorted(self._starts, hi, side="left")
        marks = np.zeros(hi - lo, dtype=np.int64)
        marks[self._starts[first:last] - lo] = self._starts[first:last] - lo
        return (np.arange(hi - lo) - np.maximum.accumulate(marks)).astype(np.int32)

    def state(self) -> dict[str, Any]:
        """Where to resume: the document in progress and how many of its tokens were emitted."""
        i = int(np.searchsorted(self._ends, self._cursor, side="right"))
        if i < len(self._origins):
            pos, bad = self._origins[i]
            skip = self._cursor - int(self._starts[i])
        else:
            pos, bad, skip = self.reader.position, self.bad.snapshot(), 0
        return {
            "file_index": pos.file_index,
            "offset": pos.offset,
            "epoch": pos.epoch,
            "skip_tokens": skip,
            "path": self.files[pos.file_index],
            "bad": bad,
        }

    def drain_messages(self) -> list[str]:
        """Bad-input warnings not yet logged."""
        return [f"domain {self.name!r}: {m}" for m in self.bad.drain_messages()]
