"""DCP storage that writes each tensor's bytes as they are: FSDP2 checkpoints near disk speed.

torch.distributed.checkpoint's ``FileSystemWriter`` wraps every tensor in its own
``torch.save`` archive (a zip with a pickle, a record per storage and a CRC32 of each record),
and ``FileSystemReader`` opens each with ``torch.load`` and copies the result into the target.
SmolLM2-135M with its AdamW moments is ~820 such items per rank: the per-item archive costs
more than the bytes (BENCHMARKS.md, "Checkpoints"). Here a tensor item is its raw bytes at an
offset of the rank's one ``.distcp`` file, and a load reads them straight into the target
tensor (``readinto``) when the stored chunk is the target's whole region, as it is when the
world size is unchanged; when it changed, the chunk is read whole and narrowed, as DCP does.

Everything else is DCP's: the planners, the ``.metadata`` file, resharding by global offsets,
the non-tensor entries (written as DCP writes them). A raw item is marked in the metadata by
the transform descriptor :data:`RAW`, which the stock ``FileSystemReader`` does not know, so it
refuses such a checkpoint ("unknown extension") rather than misreading it; :class:`RawReader`
reads both raw items and ``torch.save`` ones (checkpoints written before this module).
Integrity is the Checkpointer's (CRC32C of every file in its manifest), so no per-item
checksum is written.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from migu_dist.durable import DurableFile

RAW = "migu-raw-v1"  # the transform descriptor of a raw tensor item


def _bytes(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's memory as bytes, without a copy (any dtype, 0-d included)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


class RawWriter(FileSystemWriter):
    """One file per rank: each tensor's bytes in plan order, the non-tensor entries as DCP
    writes them (their serialised bytes). Written through :class:`DurableFile` (fsynced
    before DCP writes ``.metadata``); ``written`` then holds its size and CRC32C."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.written: dict[str, dict[str, int]] = {}

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        path = os.path.join(str(self.path), name)
        results = []
        with DurableFile(path) as f:
            for item in plan.items:
                data = planner.resolve_data(item)
                offset = f.tell()
                if isinstance(data, io.BytesIO):  # WriteItemType.BYTE_IO: non-tensor entries
                    f.write(data.getbuffer())
                    marks = None
                else:
                    assert isinstance(data, torch.Tensor), item.index
                    f.write(_bytes(data.detach().cpu().contiguous()))  # .cpu(): no copy on CPU
                    marks = [RAW]
                length = f.tell() - offset
                results.append(
                    WriteResult(
                        index=item.index,
                        size_in_bytes=length,
                        storage_data=_StorageInfo(
                            name, offset, length, transform_descriptors=marks
                        ),
                    )
                )
            self.written[path] = f.close()
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut


class RawReader(FileSystemReader):
    """Reads :class:`RawWriter` checkpoints, and stock DCP ones through ``FileSystemReader``."""

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self._metadata = metadata

    def _is_raw(self, req: ReadItem) -> bool:
        return list(self.storage_data[req.storage_index].transform_descriptors or ()) == [RAW]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        raw: list[ReadItem] = []
        rest: list[ReadItem] = []
        for req in plan.items:
            (raw if self._is_raw(req) else rest).append(req)
        if rest:  # non-tensor entries, and tensors of checkpoints from before this format
            super().read_data(dataclasses.replace(plan, items=rest), planner).wait()
        per_file: dict[str, list[ReadItem]] = {}
        for req in raw:
            per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        for rel, reqs in per_file.items():
            reqs.sort(key=lambda r: self.storage_data[r.storage_index].offset)  # one sweep
            with self.fs.create_stream(self.fs.concat_path(self.path, rel), "rb") as f:
                for req in reqs:
                    self._read_item(f, req, planner)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_item(self, f: Any, req: ReadItem, planner: LoadPlanner) -> None:
        info: _StorageInfo = self.storage_data[req.storage_index]
        meta = self._metadata.state_dict_metadata[req.storage_index.fqn]
        assert isinstance(meta, TensorStorageMetadata), req.storage_index.fqn
        chunk = next(c for c in meta.chunks if c.offsets == req.storage_index.offset)
        target = planner.resolve_tensor(req).detach()
        whole = not any(req.storage_offsets) and tuple(req.lengths) == tuple(chunk.sizes)
        direct = (
            whole
            and target.device.type == "cpu"
            and target.dtype == meta.properties.dtype
            and target.is_contiguous()
        )
        # Straight into the target, or the stored chunk whole, then DCP's narrow and copy.
        dest = target if direct else torch.empty(chunk.sizes, dtype=meta.properties.dtype)
        view = _bytes(dest)
        if view.nbytes != info.length:
            raise RuntimeError(
                f"{_rel_name(self.path, info)}: {req.storage_index.fqn} holds {info.length} "
                f"bytes, {view.nbytes} expected (a damaged or foreign checkpoint)"
            )
        f.seek(info.offset)
        done = 0
        while done < info.length:
            n = f.readinto(view[done:])
            if not n:
                raise RuntimeError(
                    f"{_rel_name(self.path, info)}: ends inside {req.storage_index.fqn}"
                )
            done += n
        if not direct:
            target.copy_(narrow_tensor_by_index(dest, req.storage_offsets, req.lengths))
        planner.commit_tensor(req, target)


def _rel_name(path: Any, info: _StorageInfo) -> str:
    """The file an item lives in, for error messages."""
    return os.path.join(str(path), info.relative_path)
