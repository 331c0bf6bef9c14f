"""FSDP2 backend: per-block ``fully_shard`` (each decoder layer, then the root), DCP checkpoints.

Sharding. FSDP2 shards every parameter on dim 0 like ``torch.chunk``: with R rows and W ranks,
rank r holds rows ``[r * ceil(R / W), min(R, (r + 1) * ceil(R / W)))`` (the last ranks may hold
fewer rows, or none; FSDP2 pads its communication buffers, never the local tensor we see). A
weight (R, C) is row-major, so rank r's local gradient ``param.grad.to_local()`` is the
contiguous flat range ``[first_row * C, (first_row + local_rows) * C)``: exactly one
:class:`GradFragment`, whose rows never straddle ranks. MIGU masks it in place; the
optimizer's tensor for that fragment is the (DTensor) parameter itself, offset 0 locally.

Precision. ``use_bf16`` (GPU by default): the sharded fp32 parameters are the master weights;
forwards and backwards run in bf16 and gradients are reduced in fp32
(``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``). On CPU everything is fp32.

Accumulation. Micro-batches before the last of a step run with gradient sync off (unsharded
gradients accumulate locally); the last one reduce-scatters the sum. The loss is scaled by
1 / grad_accum and FSDP2 averages over ranks, so the gradient is the mean over the global batch.

Checkpoints (``<root>/<tag>/``, torch.distributed.checkpoint): every rank writes its own
``__<rank>_0.distcp`` with its shards of the model and AdamW state, rank 0 writes ``.metadata``.
Tensors are stored as raw bytes (:mod:`migu_dist.dcp_raw`: DCP's planning and metadata, without
a ``torch.save`` archive per tensor); read them with :class:`~migu_dist.dcp_raw.RawReader`.
Keys: ``model.<fqn>``, ``optim.state.<fqn>.{step,exp_avg,exp_avg_sq}``,
``optim.param_groups...``, ``scheduler...``, ``client`` (``client_state`` as JSON). Loading
runs no code from the files: the non-tensor entries are read with ``weights_only=True``
(:class:`SafeLoadPlanner`).
:func:`consolidate` reads the model back whole in one process (no process group), for the
Hugging Face export.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from migu_dist.backend import (
    Backend,
    GradFragment,
    Stager,
    adamw,
    ensure_world_env,
    use_bf16,
)
from migu_dist.config import BackendConfig
from migu_dist.dcp_raw import RawReader, RawWriter
from migu_dist.dist import all_gather_objects
from migu_dist.optim import FreezableAdamW, local


def row_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """(first_row, local_rows) of a dim-0 FSDP2 shard: ``torch.chunk`` semantics."""
    per = -(-rows // world)  # ceil(rows / world)
    first = min(rows, rank * per)
    return first, min(rows, first + per) - first


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks to shard one by one (``model.model.layers`` for HF Llama)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers to shard per block")
    return list(layers)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that a non-tensor entry (param groups, scheduler
    state, client state) must load with ``torch.load(weights_only=True)``, plain data only:
    the default reads them with ``weights_only=False``, running whatever the file says."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)  # raises on anything but plain data
        value.seek(0)
        super().load_bytes(read_item, value)  # now known to unpickle plain data only


class FSDP2Backend(Backend):
    """Per-block ``fully_shard`` + FreezableAdamW + LambdaLR; checkpoints through DCP."""

    def __init__(self, cfg: BackendConfig):
        self.cfg = cfg
        self.stager = Stager()  # host-memory copies for asynchronous checkpoints
        ensure_world_env()
        cuda = torch.cuda.is_available()
        if cuda:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(
                "nccl" if cuda else "gloo",
                timeout=timedelta(minutes=cfg.engine.dist_timeout_minutes),
            )
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        self.model: nn.Module | None = None
        self.optimizer: FreezableAdamW | None = None
        self.scheduler: LambdaLR | None = None
        self._micro = 0
        self._norm: torch.Tensor | None = None  # this step's gradient norm, once computed

    @property
    def loads_hf_shards(self) -> bool:
        # Continual pre-training starts from a Hugging Face directory: built on the meta
        # device and sharded, each rank then reads only its own rows of the safetensors files
        # (``_load_hf_shards``).
        return True

    @property
    def param_dtype(self) -> torch.dtype:
        # Build in fp32: the sharded parameters are the optimizer's master weights; bf16
        # compute comes from the mixed-precision policy.
        return torch.float32

    def setup(self, model: nn.Module, lr_lambda: Callable[[int], float]) -> None:
        if use_bf16(self.cfg.engine):
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            mp = MixedPrecisionPolicy()
        for block in decoder_blocks(model):
            fully_shard(block, mesh=self.mesh, mp_policy=mp)
        fully_shard(model, mesh=self.mesh, mp_policy=mp)  # embeddings, final norm, lm_head
        if any(p.is_meta for p in model.parameters()):
            self._load_hf_shards(model)
        # fully_shard moves parameters to the mesh's device; buffers (rotary inv_freq) too.
        model.to(self.device)
        # The fused (single-kernel) AdamW on GPUs, as the DeepSpeed backend.
        self.optimizer = adamw(model, self.cfg, fused=self.device.type == "cuda")
        self.scheduler = LambdaLR(self.optimizer, lr_lambda)
        self.model = model
        self._micro = 0

    def _load_hf_shards(self, model: nn.Module) -> None:
        """Materialise an empty (meta) sharded model on this rank's device and fill each
        rank's shards from ``model.init_from``'s safetensors (DCP's Hugging Face reader:
        every rank reads the rows it owns; stored dtypes, e.g. bf16, convert to fp32)."""
        if not self.cfg.init_from:
            raise ValueError("a model built empty needs init_from, the weights to load")
        buffers = {n: b for n, b in model.named_buffers() if not b.is_meta}
        model.to_empty(device=self.device)
        for name, b in buffers.items():  # computed buffers (rotary frequencies) survive
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = b.to(self.device)
        sd = get_model_state_dict(model)
        dcp.load(sd, storage_reader=dcp.HuggingFaceStorageReader(str(self.cfg.init_from)))

    @property
    def module(self) -> nn.Module:
        assert self.model is not None, "call setup() first"
        return self.model

    def _fsdp(self) -> FSDPModule:
        assert isinstance(self.model, FSDPModule)
        return self.model

    def forward_backward(self, batch: dict[str, Any]) -> torch.Tensor:
        # Tensors to the device; ints (flash-attn's max_length_*) and mask mappings as given.
        batch = {
            k: v.to(self.device) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
            if v is not None
        }
        accum = self.cfg.grad_accum
        # Reduce-scatter only on the step's last micro-batch; the others accumulate locally.
        self._fsdp().set_requires_gradient_sync(self._micro == accum - 1)
        out = self.module(**batch)
        (out.loss / accum).backward()
        self._micro += 1
        return out.loss.detach()

    # ---------------------------------------------------------------- MIGU access

    def local_params(self) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                shard = local(p.data)  # (local_rows, ...) fp32, contiguous: a dim-0 chunk
                if shard.numel():
                    yield name, p, shard.view(-1)

    def grad_fragments(self, param: nn.Parameter) -> Iterator[GradFragment]:
        grad = param.grad
        if grad is None:
            return
        g = grad.to_local() if isinstance(grad, DTensor) else grad
        if g.numel() == 0:  # more ranks than rows: this rank holds none
            return
        cols = param.numel() // param.shape[0] if param.dim() > 1 else 1
        first = 0
        if isinstance(param, DTensor):
            first, rows = row_range(param.shape[0], self.mesh.get_local_rank(), self.world_size)
            assert rows == g.shape[0], (param.shape, rows, g.shape)
        flat = g.view(-1) if g.is_contiguous() else None

        def get() -> torch.Tensor:
            return flat if flat is not None else g.reshape(-1)

        def set_(t: torch.Tensor) -> None:
            if flat is None or t.data_ptr() != flat.data_ptr():
                g.copy_(t[: g.numel()].view_as(g))

        yield GradFragment(
            param_start=first * cols, numel=g.numel(), get=get, set=set_, hp=(param, 0)
        )

    def freeze_elements(self, frag: GradFragment, frozen: torch.Tensor) -> None:
        assert frag.hp is not None and self.optimizer is not None
        tensor, offset = frag.hp
        self.optimizer.freeze(tensor, offset, frozen)

    # ---------------------------------------------------------------- step

    def _total_norm(self) -> torch.Tensor:
        # What clip_grad_norm_ computes first; a DTensor (a pending all-reduce of the shards'
        # norms) when the gradients are sharded. Kept until step() so it is computed once.
        if self._norm is None:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            self._norm = torch.nn.utils.get_total_norm(grads)
        return self._norm

    def grad_norm(self) -> float:
        norm = self._total_norm()
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def step(self) -> dict[str, float]:
        assert self.optimizer is not None and self.scheduler is not None
        params = [p for p in self.module.parameters() if p.grad is not None]
        clip = self.cfg.optim.grad_clip
        # Same rule as DeepSpeed: the norm is always reported; clip only when > 0
        # (clip_grad_norm_ in two halves, the norm possibly already taken by grad_norm()).
        norm = self.grad_norm()
        if clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, clip, self._total_norm())
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0
        self._norm = None
        return {"grad_norm": norm, "lr": lr}

    def skip_step(self) -> None:
        # As DeepSpeed does: an optimizer step with every element frozen and no gradient, so
        # weights and moments stay bit-identical while the step counters and the LR schedule
        # advance the same way on both backends.
        assert self.optimizer is not None and self.scheduler is not None
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.zero_()
            t = local(p)
            self.optimizer.freeze(p, 0, torch.ones(t.numel(), dtype=torch.bool, device=t.device))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0
        self._norm = None

    # ---------------------------------------------------------------- checkpoints

    def _state(self, client_state: dict[str, Any]) -> dict[str, Any]:
        assert self.optimizer is not None and self.scheduler is not None
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        return {
            "model": model_sd,
            "optim": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            # One opaque string: its keys need not be known in advance to load it.
            "client": json.dumps(client_state),
        }

    def snapshot(
        self, directory: str, tag: str, client_state: dict[str, Any], copy: bool
    ) -> Callable[[Any], dict[str, dict[str, int]]]:
        path = Path(directory, tag)
        state = self._state(client_state)
        if copy:  # what DCP's async_save stages: every local shard copied to host memory
            state = self.stager.stage(state)

        def write(group: Any) -> dict[str, dict[str, int]]:
            writer = RawWriter(path)
            try:
                # DCP gathers every rank's write result before returning, so a rank whose
                # write failed (full disk) does not leave the others waiting; all ranks then
                # raise. Every file is fsynced (RawWriter's, and DCP's .metadata). The plans
                # are cached: from the second save on, a rank whose plan is unchanged (the same
                # keys and shard shapes) sends none, and the coordinator reuses its global plan.
                planner = DefaultSavePlanner(enable_plan_caching=True)
                dcp.save(state, storage_writer=writer, planner=planner, process_group=group)
            except CheckpointException as e:  # a BaseException: make it the Checkpointer's
                raise RuntimeError(f"FSDP2 checkpoint {path} failed: {e}") from e
            return writer.written

        return write

    def load(self, directory: str, tag: str, prefetched: Any = None) -> dict[str, Any]:
        assert self.optimizer is not None and self.scheduler is not None
        path = Path(directory, tag)
        if not (path / ".metadata").is_file():
            raise FileNotFoundError(
                f"no FSDP2 (DCP) checkpoint at {path} (a DeepSpeed one? resume it with "
                "engine.backend=deepspeed, or export its weights: python launch/export_hf.py "
                f"--checkpoint {path} --out DIR, then a new run with model.init_from=DIR)"
            )
        # Any world size: DCP stores every shard with its global offsets and each rank reads
        # the ranges its own (new) shards cover, for the model and the AdamW state alike
        # (get_state_dict keys both by parameter name, not by rank-local position).
        state = self._state({})
        # Each rank plans and reads its own shards into ``state`` alone: DCP's load needs no
        # coordination (its collective planning only gathers the ~1k-item plans and scatters
        # them back unchanged, a third of a SmolLM2 load here). The ranks then agree on the
        # outcome once, so that a rank whose read failed does not raise alone.
        problem = None
        try:
            _load_state_dict(
                state, storage_reader=RawReader(path), planner=SafeLoadPlanner(), no_dist=True
            )
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - agreed on, then raised
            problem = f"{type(e).__name__}: {e}"
        problems = [p for p in all_gather_objects(problem) if p]
        if problems:
            raise RuntimeError(f"FSDP2 checkpoint {path} could not be read: {problems[0]}")
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )
        self.scheduler.load_state_dict(state["scheduler"])
        if not isinstance(state["client"], str):
            raise RuntimeError(
                f"{path}: client state in a pickled format of an earlier version, not loaded "
                "(it could run code); resume from a checkpoint this version wrote."
            )
        return json.loads(state["client"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(self.module, options=opts)  # rank 0 only with cpu_offload
        if self.rank != 0:
            return {}
        return {k: v.detach().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}


def is_fsdp2_checkpoint(ckpt_dir: str | Path) -> bool:
    """Whether ``ckpt_dir`` (a ``step_*`` directory) was written by this backend (DCP)."""
    return Path(ckpt_dir, ".metadata").is_file()


def consolidate(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The whole fp32 model state dict of an FSDP2 checkpoint directory, in one process.

    Needs no process group and neither the original number of ranks nor a GPU: DCP stores
    each tensor's shards with their global offsets, and a load without a target state dict
    reassembles them. Reads only the ``model.*`` entries (optimizer state is left on disk).
    """
    # What format_utils.dcp_to_torch_save does, minus the torch.save, for the model keys only
    # (the public dcp.load would copy the empty target dict and fill the copy).
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

    reader = RawReader(str(ckpt_dir))
    keys = {k for k in reader.read_metadata().state_dict_metadata if k.startswith("model.")}
    sd: dict[str, Any] = {}
    planner = _EmptyStateDictLoadPlanner(keys=keys)
    _load_state_dict(sd, storage_reader=reader, planner=planner, no_dist=True)
    return {k: v for k, v in sd["model"].items() if isinstance(v, torch.Tensor)}
