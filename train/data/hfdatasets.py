"""Hugging Face ``datasets`` directories as a domain's source, read by row index.

Accepted (``data.domains.<name>.dataset``):

- a ``Dataset.save_to_disk`` directory (``state.json`` + Arrow files), opened with
  ``datasets.load_from_disk``; a ``DatasetDict``'s directory is refused with its splits named
  (point at ``<dir>/<split>``, which is itself such a directory);
- a directory of ``.arrow`` files (``datasets``' cache format), opened with
  ``Dataset.from_file`` each and concatenated in name order;
- a directory of ``.parquet`` files, read by the streaming reader's Parquet path (row index
  positions, resume jumps to the row group), without converting it into an Arrow cache.

Arrow datasets are memory-mapped, so the position is the row index and resume reads from that
row directly (random access), never by re-iterating the rows before it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from train.data.sources import Record, _text_from_obj

_ROWS = 1024  # rows fetched per slice


def dataset_kind(path: str) -> tuple[str, list[str]]:
    """("dataset", [path]) for an Arrow dataset, ("files", parquet files) for a Parquet
    directory; ValueError naming the problem otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{path!r} is not a directory")
    if (p / "dataset_dict.json").is_file():
        splits = sorted(d.name for d in p.iterdir() if (d / "state.json").is_file())
        raise ValueError(
            f"{path!r} is a DatasetDict with splits {splits}; point at one split's directory, "
            f"e.g. {str(p / (splits[0] if splits else 'train'))!r}"
        )
    if (p / "state.json").is_file() or sorted(p.glob("*.arrow")):
        return "dataset", [path]
    parquet = sorted(str(f) for f in p.glob("*.parquet"))
    if parquet:
        return "files", parquet
    raise ValueError(f"{path!r} holds no datasets save_to_disk state.json, .arrow or .parquet file")


@functools.lru_cache(maxsize=8)
def open_dataset(path: str) -> Any:
    """The ``datasets.Dataset`` of an Arrow directory (memory-mapped; cached per process)."""
    import datasets

    p = Path(path)
    if (p / "state.json").is_file():
        ds = datasets.load_from_disk(path)
    else:
        parts = [datasets.Dataset.from_file(str(f)) for f in sorted(p.glob("*.arrow"))]
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"{path!r} holds a {type(ds).__name__}; point at one split's directory")
    return ds


def dataset_records(
    path: str, offset: int, text_field: str, max_bytes: int | None = None
) -> Iterator[Record]:
    """Records of an Arrow dataset from row ``offset``; positions are row indices.

    ``max_bytes`` is checked by ``DocumentReader`` on the texts (as for Parquet)."""
    ds = open_dataset(path)
    n = len(ds)
    if text_field not in ds.column_names:
        yield Record(offset, n, None, "missing_field", f"no column {text_field!r}")
        return
    column = ds.select_columns([text_field]).with_format("arrow")
    for lo in range(offset, n, _ROWS):
        hi = min(lo + _ROWS, n)
        for i, value in enumerate(column[lo:hi].column(0).to_pylist(), start=lo):
            # The same checks (and bad-input reasons) as a JSON or Parquet record.
            text, reason, detail = _text_from_obj({text_field: value}, text_field)
            if value is None:
                reason, detail = "missing_field", f"{text_field!r} is null"
            yield Record(i, i + 1, text, reason, detail)
