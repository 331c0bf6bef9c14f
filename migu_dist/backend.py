"""The one seam between the training loop and a sharding backend.

The loop calls only these methods; it never imports deepspeed or FSDP. A backend owns the
wrapped model, the optimizer, the LR schedule and the checkpoint format of its shards.
"""

from __future__ import annotations

import abc
import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from migu_dist.config import BackendConfig, EngineConfig, OptimConfig
from migu_dist.optim import FreezableAdamW


class Stager:
    """Copies state to host memory for a background write (what the step loop waits for).

    ``stage(obj)`` returns a copy of ``obj`` whose tensors are host-memory copies (DTensors
    keep their mesh and placements, with the local shard copied), so that the write sees the
    state of this moment while training goes on changing the originals. The copies go into
    buffers kept from the previous save, matched by their place in ``obj``: a fresh allocation
    page-faults every byte again, at GBs most of the stall. So one copy of the state stays in
    host memory between saves; a buffer is reused only after the write that used it is done
    (the Checkpointer lets one save be in flight). From CUDA, the buffers are pinned. Dicts
    and lists are copied; other leaves (numbers, strings, dtypes) are immutable and shared.
    A DTensor's wrapper around its buffer is kept too while its mesh, placements and shape
    stay (wrapping SmolLM2's ~800 FSDP2 shards anew was 0.06 s of a profiled 0.32 s stall)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._dtensors: dict[tuple[Any, ...], tuple[Any, torch.Tensor]] = {}  # (DTensor, buffer)
        self._from_cuda = False

    def stage(self, obj: Any, key: tuple[Any, ...] = ()) -> Any:
        """The copy of ``obj``; ``key`` names it among the objects staged by this Stager (e.g.
        the file it goes to), so that each reuses its own buffers."""
        out = self._stage(obj, key)
        if self._from_cuda:  # the copies into pinned memory are asynchronous: wait for them
            torch.cuda.synchronize()
            self._from_cuda = False
        return out

    def _stage(self, obj: Any, key: tuple[Any, ...]) -> Any:
        from torch.distributed.tensor import DTensor

        if isinstance(obj, DTensor):
            local = self._copy(obj.to_local(), key)
            kept, wrapped = self._dtensors.get(key, (None, None))
            if not (
                kept is not None
                and wrapped is local  # the same buffer (``_copy`` returns it)
                and kept.device_mesh == obj.device_mesh
                and kept.placements == obj.placements
                and kept.shape == obj.shape
                and kept.stride() == obj.stride()
            ):
                kept = DTensor.from_local(
                    local, obj.device_mesh, obj.placements, shape=obj.shape, stride=obj.stride()
                )
                self._dtensors[key] = (kept, local)
            return kept
        if isinstance(obj, torch.Tensor):
            return self._copy(obj, key)
        if isinstance(obj, dict):
            out = obj.copy()  # keeps the dict's type (OrderedDict, defaultdict)
            for k, v in obj.items():
                out[k] = self._stage(v, (*key, k))
            return out
        if isinstance(obj, list):
            return [self._stage(v, (*key, i)) for i, v in enumerate(obj)]
        if type(obj) is tuple:
            return tuple(self._stage(v, (*key, i)) for i, v in enumerate(obj))
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
            return type(obj)(*(self._stage(v, (*key, i)) for i, v in enumerate(obj)))
        return obj

    def _copy(self, t: torch.Tensor, key: tuple[Any, ...]) -> torch.Tensor:
        t = t.detach()
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty_like(t, device="cpu", pin_memory=t.is_cuda)
            self._buffers[key] = buf
        self._from_cuda |= t.is_cuda
        return buf.copy_(t, non_blocking=t.is_cuda)


@dataclass
class GradFragment:
    """This rank's part of one parameter's reduced gradient.

    Covers flat elements ``[param_start, param_start + numel)`` of the row-major parameter.
    ``get()`` returns a flat tensor of at least ``numel`` elements (a view where the backend
    allows, else a copy); ``set(t)`` writes it back. ``hp`` locates the same elements in the
    optimizer's fp32 master tensor, ``(tensor, offset)``, for freezing rows in the step.
    """

    param_start: int
    numel: int
    get: Callable[[], torch.Tensor]
    set: Callable[[torch.Tensor], None]
    hp: tuple[torch.Tensor, int] | None = None


class Backend(abc.ABC):
    """Set up, forward/backward, the pre-step hook where MIGU acts, step, save/load."""

    cfg: BackendConfig
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def init_context(self) -> ContextManager:
        """Context in which to construct the model (e.g. sharded construction)."""
        return contextlib.nullcontext()

    @property
    def loads_hf_shards(self) -> bool:
        """Whether ``setup`` can take a model built empty (parameters on the meta device) and
        materialise it, each rank reading only its own shard of ``init_from``'s safetensors.
        The model side decides whether the model can be built so (``train.model.empty_init``)."""
        return False

    @property
    def param_dtype(self) -> torch.dtype:
        return torch.float32

    @abc.abstractmethod
    def setup(self, model: nn.Module, lr_lambda: Callable[[int], float]) -> None:
        """Wrap/shard the model and build the optimizer and LR schedule."""

    @property
    @abc.abstractmethod
    def module(self) -> nn.Module:
        """The callable model (wrapped); use for training and evaluation forwards."""

    def train_batch(
        self,
        batch: Mapping[str, torch.Tensor | None],
        prepare: Callable[[dict[str, torch.Tensor]], dict[str, Any]] | None = None,
    ) -> torch.Tensor:
        """This rank's rows of one optimizer step (each (rows, T); None entries are left out):
        ``grad_accum`` micro-batches of ``micro_batch_size`` rows, forward and backward each,
        gradients accumulated. ``prepare`` turns a micro-batch's rows into the model's inputs
        (e.g. document ids into attention masks); without it they are the inputs. Returns the
        mean of the micro-batches' losses (detached, fp32)."""
        mbs = self.cfg.micro_batch_size
        losses = []
        for i in range(self.cfg.grad_accum):
            rows = slice(i * mbs, (i + 1) * mbs)
            mb: dict[str, Any] = {k: v[rows] for k, v in batch.items() if v is not None}
            losses.append(self.forward_backward(prepare(mb) if prepare else mb))
        return torch.stack(losses).float().mean()

    @abc.abstractmethod
    def forward_backward(self, batch: dict[str, Any]) -> torch.Tensor:
        """One micro-batch: forward, loss, backward (scaled for accumulation). Returns the
        unscaled mean token loss (detached)."""

    @abc.abstractmethod
    def grad_fragments(self, param: nn.Parameter) -> Iterator[GradFragment]:
        """This rank's fragments of ``param``'s reduced gradient; valid between the last
        backward of a step and ``step()``."""

    def local_params(self) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
        """``(name, param, master)`` for every trainable parameter with elements on this rank.

        ``master`` is the flat fp32 tensor the optimizer steps for exactly the elements of
        ``param`` this rank owns, the same flat range as its single :meth:`grad_fragments`
        fragment (so ``master[i]`` and ``frag.get()[i]`` are the same element). A view:
        reading it needs no gather, and it is valid from ``setup()`` on (re-fetch it after
        ``load()``). Used by the sharded regulariser (``migu_dist/regularize.py``).

        DeepSpeed: ZeRO-3 the parameter's slice of the fp32 partition
        (``safe_get_local_fp32_param``), ZeRO-1/2 the ``_hp_mapping`` fp32 fragment, ZeRO-0 the
        parameter itself (fp32) or its fp32 master copy (bf16). FSDP2: the local shard of each
        DTensor parameter, ``param.to_local().view(-1)`` (with mixed precision this is still
        the fp32 sharded parameter the optimizer steps), covering the flat range of its dim-0
        shard.
        """
        raise NotImplementedError(f"{type(self).__name__} does not expose local parameters")

    @abc.abstractmethod
    def freeze_elements(self, frag: GradFragment, frozen: torch.Tensor) -> None:
        """Leave ``frozen`` (bool, (numel,)) elements of this fragment untouched by the next
        optimizer step: weight, moments and weight decay."""

    @abc.abstractmethod
    def grad_norm(self) -> float:
        """The global L2 norm of this step's reduced gradients, before clipping; the same on
        every rank (collective). Valid between the last backward of a step and ``step()``,
        so that a non-finite norm can still be answered with ``skip_step()``."""

    @abc.abstractmethod
    def step(self) -> dict[str, float]:
        """Clip, optimizer step, LR schedule step, zero grads. Returns grad_norm and lr."""

    @abc.abstractmethod
    def skip_step(self) -> None:
        """Drop this step's gradients without updating (non-finite loss or gradient norm)."""

    def save(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        """Write this rank's shards (collective) plus ``client_state``. If a write fails
        (full disk), still complete the collectives the other ranks are in, then raise."""
        self.snapshot(directory, tag, client_state, copy=False)(None)

    @abc.abstractmethod
    def snapshot(
        self, directory: str, tag: str, client_state: dict[str, Any], copy: bool
    ) -> Callable[[Any], dict[str, dict[str, int]]]:
        """Collective, in the step loop: take the state ``save`` writes and return the writer
        of this rank's shards, called later (from a background thread when the checkpoint is
        asynchronous) with the process group for its own collectives (None: the default). The
        writer returns the files it wrote (path: ``{"size", "crc32c"}``, as
        ``migu_dist.durable.DurableFile`` reports them), every one fsynced; the Checkpointer
        checksums any other file of the checkpoint itself.

        ``copy``: the state is copied to host memory first, so the writer sees this moment's
        state while training goes on; without it the writer must be called before the next
        step. The writer must complete its collectives even when its writes fail (full disk),
        then raise ``OSError`` or ``RuntimeError``."""

    def prefetch(self, directory: str, tag: str) -> tuple[Any, str | None]:
        """Read into memory what ``load(directory, tag)`` will read on this rank, while the
        Checkpointer checksums the same files: the disk is read once, and deserialised
        meanwhile. Returns ``(prefetched, problem)``: ``prefetched`` goes to ``load`` once the
        checkpoint has verified on every rank; ``problem`` names a file that could not be
        read. Never raises for a damaged file (one rank raising alone would leave the others
        in the next collective). Default: nothing (the backend reads at ``load``)."""
        return None, None

    @abc.abstractmethod
    def load(self, directory: str, tag: str, prefetched: Any = None) -> dict[str, Any]:
        """Restore shards, optimizer and schedule; returns the saved ``client_state``.
        ``prefetched``: what ``prefetch`` returned for this checkpoint (read from there)."""

    def set_optim_hparams(self, o: OptimConfig) -> None:
        """After ``load``: make AdamW and the LR schedule use ``o`` instead of the values the
        checkpoint restored (peak LR, betas, eps, weight decay of the decaying group), and set
        the current LR from the schedule this run was set up with. With an unchanged config
        every value is what the checkpoint held, bit for bit (``LambdaLR`` computes
        ``base_lr * lambda(last_epoch)`` the same way)."""
        opt, sched = self.optimizer, self.scheduler  # type: ignore[attr-defined]
        sched.base_lrs = [o.lr] * len(opt.param_groups)
        for group, fn in zip(opt.param_groups, sched.lr_lambdas, strict=True):
            group["initial_lr"] = o.lr
            group["lr"] = o.lr * fn(sched.last_epoch)
            group["betas"] = (o.beta1, o.beta2)
            group["eps"] = o.eps
            # The no-decay group (norms, biases) stays at 0; MIGU's masked weights keep theirs.
            if group["weight_decay"] and not group.get("migu_masked"):
                group["weight_decay"] = o.weight_decay
        sched._last_lr = [g["lr"] for g in opt.param_groups]

    @abc.abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on CPU, on rank 0 (others may get {}). Collective."""

    def barrier(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def close(self) -> None:
        """Tear the process group down before the interpreter exits (a group left to the
        interpreter's shutdown can abort a rank in C++ destructors, turning a finished run
        into a failed one)."""
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- shared by the backends

# Norms, biases and embeddings: no weight decay (the usual Llama recipe).
NO_DECAY = ("norm", "bias", "embed_tokens")


def use_bf16(engine: EngineConfig) -> bool:
    """bf16 training: ``engine.precision``, where auto means bf16 exactly when a GPU is there."""
    if engine.precision == "auto":
        return torch.cuda.is_available()
    return engine.precision == "bf16"


def ensure_world_env() -> None:
    """Plain ``python launch/cpt.py`` (no launcher): declare a world of one on a free port."""
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])


def adamw(model: nn.Module, cfg: BackendConfig, fused: bool = False) -> FreezableAdamW:
    """FreezableAdamW over the trainable parameters, no decay for norms/biases/embeddings, and
    MIGU's masked weights in a group of their own when their decay differs
    (``migu.weight_decay``)."""
    o = cfg.optim
    masked_decay = cfg.migu.masked_weight_decay(o.weight_decay)
    masked: set[int] = set()
    if cfg.migu.enabled and masked_decay != o.weight_decay:
        from migu_dist.migu import masked_weights

        masked = {id(p) for p in masked_weights(cfg.migu, model)}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    migu: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in masked:
            migu.append(p)
        else:
            (no_decay if any(k in name for k in NO_DECAY) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": migu, "weight_decay": masked_decay, "migu_masked": True},
    ]
    extra = {"fused": True} if fused else {}
    return FreezableAdamW(
        [g for g in groups if g["params"]], lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **extra
    )
