"""Reading documents from local files in order, from an exact position, counting bad input.

A :class:`Position` names the next document to read: (file index in the domain's file list,
offset in that file, epoch). The offset is a byte offset into the decompressed stream for
JSON Lines / text files, a row index for Parquet and a record index for a JSON array.
Resuming seeks there: plain files with ``seek``; ``.gz``/``.zst`` streams cannot seek, so they
are decompressed up to the offset and the bytes dropped (no JSON parsing or tokenisation of
the skipped part); Parquet jumps to the row group holding the row.

Formats (by extension, after an optional ``.gz``/``.zst``): ``.jsonl``; ``.json`` (JSON Lines,
or one JSON array if the file starts with ``[``); ``.txt`` (one document per line, like the
``datasets`` text loader; blank lines separate, they are not documents); ``.parquet``.
"""

from __future__ import annotations

import copy
import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import zstandard

from train.data import fs

_BLOCK = 1 << 20
_SAMPLE_CHARS = 160
_READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError, ValueError)


@dataclass(frozen=True)
class Position:
    """Where the next document starts."""

    file_index: int
    offset: int
    epoch: int


@dataclass
class Record:
    """One raw record: a document's text, or the reason it was rejected."""

    offset: int
    next_offset: int
    text: str | None
    reason: str | None = None
    detail: str = ""


class BadInputLog:
    """Counts of rejected records per file, a sample of each, and warnings to emit.

    ``snapshot()`` is an independent copy, cached until the next record, so that every packed
    document can cheaply remember the counts as they stood when it was read (the counts that
    belong in a checkpoint taken while it is being consumed).
    """

    def __init__(self, counts: dict[str, Any] | None = None):
        self.files: dict[str, Any] = copy.deepcopy(counts) if counts else {}
        self.messages: list[str] = []
        self._snapshot: dict[str, Any] | None = None

    def record(self, path: str, reason: str, where: str, detail: str) -> None:
        entry = self.files.setdefault(path, {"counts": {}, "samples": {}})
        n = entry["counts"].get(reason, 0) + 1
        entry["counts"][reason] = n
        if reason not in entry["samples"]:
            entry["samples"][reason] = f"{where}: {detail}"[:_SAMPLE_CHARS]
        self._snapshot = None
        # First occurrence, then every power of ten: loud without flooding the log.
        if n == 1 or (n >= 10 and str(n).strip("0") == "1"):
            self.messages.append(
                f"{path}: {n} record(s) skipped as {reason}; e.g. {where}: {detail}"
            )

    def snapshot(self) -> dict[str, Any]:
        if self._snapshot is None:
            self._snapshot = copy.deepcopy(self.files)
        return self._snapshot

    def drain_messages(self) -> list[str]:
        out, self.messages = self.messages, []
        return out


def _open_binary(path: str) -> BinaryIO:
    if fs.is_url(path):  # fsspec decompresses too; closing the result closes the chain
        return cast(BinaryIO, fs.open_binary(path, compressed=True))
    if path.endswith(".gz"):
        return cast(BinaryIO, gzip.open(path, "rb"))
    if path.endswith(".zst"):
        raw = open(path, "rb")  # noqa: SIM115 - closed through the stream reader
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return open(path, "rb")  # noqa: SIM115 - the caller closes it


def _skip(fh: BinaryIO, offset: int, path: str) -> None:
    if not path.endswith((".gz", ".zst")):
        fh.seek(offset)
        return
    left = offset
    while left > 0:
        got = len(fh.read(min(left, _BLOCK)))
        if got == 0:
            raise EOFError(f"stream ends before resume offset {offset}")
        left -= got


def _base_format(path: str) -> str:
    name = path[: -len(".gz")] if path.endswith(".gz") else path
    name = name[: -len(".zst")] if name.endswith(".zst") else name
    return Path(name).suffix.lower()


def _text_from_obj(obj: Any, text_field: str) -> tuple[str | None, str | None, str]:
    if not isinstance(obj, dict) or text_field not in obj:
        return None, "missing_field", f"no {text_field!r} in {str(obj)[:80]}"
    text = obj[text_field]
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, "non_utf8", str(e)
    if not isinstance(text, str):
        return None, "missing_field", f"{text_field!r} is {type(text).__name__}, not a string"
    if not text.strip():
        return None, "empty", repr(text[:40])
    return text, None, ""


def _iter_lines(
    fh: BinaryIO, offset: int, max_bytes: int | None = None
) -> Iterator[tuple[int, int, bytes | None]]:
    """(start, next_start, line without newline) from ``offset``, in blocks; the line is None
    when it is longer than ``max_bytes``.

    Linear time and memory bounded by ``max_bytes`` plus a block, whatever the line lengths:
    a line spanning blocks is kept as a list of pieces (joined once), and a line past the
    limit keeps only its length. (Joining the unfinished line to every new block, as a
    simple reader does, is quadratic: 8.7 s for one 128 MB line.)
    """
    limit = max_bytes if max_bytes is not None else float("inf")
    start = offset
    parts: list[bytes] = []  # the unfinished line's pieces (empty once it is too long)
    held = 0  # bytes of the unfinished line so far
    while block := fh.read(_BLOCK):
        complete = block.split(b"\n")
        rest = complete.pop()
        for piece in complete:
            size = held + len(piece)
            nxt = start + size + 1
            if size > limit:
                yield start, nxt, None
            else:
                yield start, nxt, b"".join([*parts, piece]) if parts else piece
            start, parts, held = nxt, [], 0
        held += len(rest)
        if held <= limit:
            parts.append(rest)
        else:
            parts = []
    if held:
        yield start, start + held, None if held > limit else b"".join(parts)


def _line_records(
    path: str, offset: int, text_field: str, fmt: str, max_bytes: int | None
) -> Iterator[Record]:
    with _open_binary(path) as fh:
        _skip(fh, offset, path)
        for start, nxt, raw in _iter_lines(fh, offset, max_bytes):
            if raw is None:
                yield Record(start, nxt, None, "too_long", _too_long(nxt - start, max_bytes))
                continue
            raw = raw.rstrip(b"\r")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Record(start, nxt, None, "non_utf8", f"{e}; {raw[:60]!r}")
                continue
            if fmt == ".txt":
                if line.strip():
                    yield Record(start, nxt, line)
                continue
            if not line.strip():
                yield Record(start, nxt, None, "empty", "blank line")
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                yield Record(start, nxt, None, "malformed_json", f"{e}; {line[:60]!r}")
                continue
            text, reason, detail = _text_from_obj(obj, text_field)
            yield Record(start, nxt, text, reason, detail)


def _json_array_records(path: str, offset: int, text_field: str) -> Iterator[Record]:
    with _open_binary(path) as fh:
        data = fh.read()
    try:
        items = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        yield Record(offset, offset, None, "malformed_json", f"whole file: {e}")
        return
    if not isinstance(items, list):
        yield Record(offset, offset, None, "malformed_json", "whole file: not a JSON array")
        return
    for i in range(offset, len(items)):
        text, reason, detail = _text_from_obj(items[i], text_field)
        yield Record(i, i + 1, text, reason, detail)


def _parquet_records(path: str, offset: int, text_field: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(fs.open_binary(path) if fs.is_url(path) else path)
    if text_field not in pf.schema_arrow.names:
        n = pf.metadata.num_rows
        yield Record(offset, n, None, "missing_field", f"no column {text_field!r}")
        return
    first_row = 0
    for g in range(pf.num_row_groups):
        rows = pf.metadata.row_group(g).num_rows
        if first_row + rows <= offset:
            first_row += rows
            continue
        column = pf.read_row_group(g, columns=[text_field]).column(0).to_pylist()
        for i in range(max(0, offset - first_row), rows):
            text, reason, detail = _text_from_obj({text_field: column[i]}, text_field)
            if column[i] is None:
                reason, detail = "missing_field", f"{text_field!r} is null"
            yield Record(first_row + i, first_row + i + 1, text, reason, detail)
        first_row += rows


def _too_long(size: int, max_bytes: int | None) -> str:
    return f"{size} bytes > data.max_document_bytes={max_bytes}"


def file_records(
    path: str, offset: int, text_field: str, max_bytes: int | None = None
) -> Iterator[Record]:
    """Records of one file from ``offset``; raises the read errors of ``_READ_ERRORS``.

    Lines longer than ``max_bytes`` (.jsonl, .txt, JSON Lines .json) are skipped unread as
    ``too_long`` records; other formats' texts are checked by :class:`DocumentReader`."""
    fmt = _base_format(path)
    if fmt == ".parquet":
        if path.endswith((".gz", ".zst")):
            raise ValueError("compressed .parquet is not supported (Parquet compresses itself)")
        yield from _parquet_records(path, offset, text_field)
    elif fmt in (".jsonl", ".txt"):
        yield from _line_records(path, offset, text_field, fmt, max_bytes)
    elif fmt == ".json":
        with _open_binary(path) as fh:
            head = fh.read(4096).lstrip()
        if head.startswith(b"["):
            yield from _json_array_records(path, offset, text_field)
        else:
            yield from _line_records(path, offset, text_field, ".jsonl", max_bytes)
    else:
        raise ValueError(f"unsupported file type {fmt!r}; use .jsonl, .json, .txt or .parquet")


class DocumentReader:
    """Documents of a file list in order from a :class:`Position`, wrapping into new epochs.

    ``read(n)`` returns up to ``n`` documents with their start positions; ``position`` is where the
    next unread document starts. Rejected records and unreadable files go to ``bad`` (only in
    epoch 0, so the report describes the files rather than how often they were re-read), among
    them documents over ``max_bytes`` (UTF-8), None for no limit.
    """

    def __init__(
        self,
        name: str,
        files: list[str],
        text_field: str,
        start: Position,
        bad: BadInputLog,
        wrap: bool = True,
        max_bytes: int | None = None,
        records: Callable[[str, int, str, int | None], Iterator[Record]] | None = None,
    ):
        """``records``: how one entry of ``files`` is read from an offset (default
        :func:`file_records`; ``hfdatasets.dataset_records`` for an Arrow dataset)."""
        self.name = name
        self.files = files
        self.text_field = text_field
        self.position = start
        self.bad = bad
        self.wrap = wrap
        self.max_bytes = max_bytes
        self.records = records or file_records
        self.exhausted = False
        self._records: Iterator[Record] | None = None
        self._docs_this_epoch = 0 if start == Position(0, 0, start.epoch) else 1

    def _next_file(self) -> None:
        self._records = None
        p = self.position
        if p.file_index + 1 < len(self.files):
            self.position = Position(p.file_index + 1, 0, p.epoch)
            return
        if not self.wrap:
            self.exhausted = True
            return
        if self._docs_this_epoch == 0:
            raise RuntimeError(
                f"domain {self.name!r}: no usable document in any of its {len(self.files)} "
                f"file(s); bad input: {json.dumps(self.bad.files)[:2000]}"
            )
        self.position = Position(0, 0, p.epoch + 1)
        self._docs_this_epoch = 0

    def _bad(self, reason: str, where: str, detail: str) -> None:
        if self.position.epoch == 0:
            self.bad.record(self.files[self.position.file_index], reason, where, detail)

    def read(
        self, max_docs: int, max_chars: int = 1 << 20
    ) -> list[tuple[str, Position, dict[str, Any]]]:
        """Up to ``max_docs`` documents: (text, start, bad counts of the records before it)."""
        out: list[tuple[str, Position, dict[str, Any]]] = []
        chars = 0
        while len(out) < max_docs and chars < max_chars and not self.exhausted:
            p = self.position
            path = self.files[p.file_index]
            if self._records is None:
                self._records = self.records(path, p.offset, self.text_field, self.max_bytes)
            try:
                rec = next(self._records)
            except StopIteration:
                self._next_file()
                continue
            except _READ_ERRORS as e:
                self._bad("unreadable", f"offset {p.offset}", f"{type(e).__name__}: {e}")
                self._next_file()
                continue
            if rec.text is not None and self._too_long(rec.text):
                size = len(rec.text.encode("utf-8"))
                rec = Record(
                    rec.offset, rec.next_offset, None, "too_long", _too_long(size, self.max_bytes)
                )
            if rec.text is None:
                self._bad(rec.reason or "bad", f"offset {rec.offset}", rec.detail)
            else:
                out.append(
                    (rec.text, Position(p.file_index, rec.offset, p.epoch), self.bad.snapshot())
                )
                chars += len(rec.text)
                self._docs_this_epoch += 1
            self.position = Position(p.file_index, rec.next_offset, p.epoch)
        return out

    def _too_long(self, text: str) -> bool:
        # A character is 1-4 UTF-8 bytes: encode only the texts the length cannot decide.
        if self.max_bytes is None or 4 * len(text) <= self.max_bytes:
            return False
        return len(text) > self.max_bytes or len(text.encode("utf-8")) > self.max_bytes

    def close(self) -> None:
        self._records = None
