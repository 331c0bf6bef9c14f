"""Continual pre-training data: local files -> packed sequences -> phased, mixed batches.

Why our own streaming reader and not ``datasets`` streaming: an ``IterableDataset`` resumes
by re-iterating a shard up to the saved example count (parse and skip), while this pipeline
must resume from an exact byte/row position in O(1) for plain files and Parquet, keep a
per-domain packing remainder, and continue a domain across phases. ``sources.py`` therefore
reads JSON Lines, JSON, text and Parquet itself (``.gz``/``.zst`` too) with exact positions.

Modules: ``sources`` (files -> documents, bad-input counts), ``stream`` (documents -> packed
sequences of one domain), ``store`` (the same sequences from a pre-tokenised token store),
``hfdatasets`` (``datasets`` directories as documents by row index), ``fs`` (local paths and
``fsspec`` URLs), ``mixture`` (phases and per-row domain choice), ``workers`` (streams in the
training process or in worker processes), ``loader`` (``CPTDataLoader``).

``CPTDataLoader`` and ``Batch`` are imported lazily: worker processes import this package and
should not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from train.data.mixture import PhasePlan, plan_phases

if TYPE_CHECKING:
    from train.data.loader import Batch, CPTDataLoader

__all__ = ["Batch", "CPTDataLoader", "PhasePlan", "plan_phases"]


def __getattr__(name: str) -> Any:
    if name in ("Batch", "CPTDataLoader"):
        from train.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'train.data' has no attribute {name!r}")
