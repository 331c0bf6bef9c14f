"""DeepSpeed backend: ZeRO stages 0-3, the DeepSpeed JSON generated from the project config.

MIGU acts between the last backward of a step and ``engine.step()``, on each rank's own
partition of every masked weight's reduced gradient:
- ZeRO-3: ``safe_get_local_grad``/``safe_set_local_grad``; rank r owns flat elements
  ``[r * partition_numel, (r + 1) * partition_numel)`` of each parameter (the last rank's
  tail is padding).
- ZeRO-1/2 (and the bf16 optimizer): the parameter's ``_hp_mapping`` fragment on this rank.
  ZeRO-1 in bf16 runs DeepSpeed's BF16_Optimizer, which keeps every parameter's whole fp32
  gradient on every rank and clips by the norm of all of it: once MIGU or the L2 anchor has
  changed this rank's partition, the partitions are all-gathered before the step.
- ZeRO-0: ``param.grad`` itself, which every rank holds whole anyway (bf16 under bf16, whose
  fp32 master is a separate tensor of DeepSpeed's FP16_UnfusedOptimizer).
Clipping, the optimizer step and the LR schedule then run inside ``engine.step()`` on the
masked gradients.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from datetime import timedelta
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine
from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_set_local_grad
from torch import nn
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
from migu_dist.deepspeed_reshard import load_resharded, optim_files
from migu_dist.dist import all_reduce_sum
from migu_dist.durable import write_durable


def deepspeed_config(cfg: BackendConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this run (the user's own file, if given, with our batch,
    clipping and precision keys written over it; optimizer/scheduler come from us)."""
    ds: dict[str, Any] = {}
    if cfg.engine.deepspeed_config:
        with open(cfg.engine.deepspeed_config) as f:
            ds = json.load(f)
        ds.pop("optimizer", None)
        ds.pop("scheduler", None)
    ds.update(
        train_micro_batch_size_per_gpu=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        train_batch_size=cfg.global_batch(world_size),
        gradient_clipping=cfg.optim.grad_clip,
        steps_per_print=10**9,
        zero_allow_untested_optimizer=True,
        wall_clock_breakdown=False,
    )
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = cfg.engine.zero_stage
    if cfg.engine.zero_stage == 3:
        # Small tensors stay whole on every rank below this many elements; 0 so that every
        # weight is partitioned, which is what MIGU's shard-local masking is tested against.
        zero.setdefault("stage3_param_persistence_threshold", 0)
    bf16 = use_bf16(cfg.engine)
    ds["bf16"] = {"enabled": bf16}
    if bf16:
        # fp32 gradient accumulation keeps MIGU's masked gradients and the norm exact. ZeRO-0
        # has no such mix (DeepSpeed refuses bf16 weights with fp32 accumulation there): its
        # gradients accumulate and all-reduce in bf16, the optimizer still steps fp32 masters.
        ds.setdefault("data_types", {})["grad_accum_dtype"] = (
            "bf16" if cfg.engine.zero_stage == 0 else "fp32"
        )
    return ds


class DeepSpeedBackend(Backend):
    """ZeRO 0-3 through ``deepspeed.initialize``."""

    def __init__(self, cfg: BackendConfig):
        self.cfg = cfg
        self.stager = Stager()  # host-memory copies for asynchronous checkpoints
        ensure_world_env()
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(
                timeout=timedelta(minutes=cfg.engine.dist_timeout_minutes),
            )
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        self.ds_config = deepspeed_config(cfg, self.world_size)
        self.engine: Any = None  # the DeepSpeedEngine, after setup()
        self.optimizer: Any = None  # the FreezableAdamW inside it, after setup()

    @property
    def param_dtype(self) -> torch.dtype:
        return torch.bfloat16 if use_bf16(self.cfg.engine) else torch.float32

    def init_context(self) -> ContextManager:
        if self.cfg.engine.zero_stage == 3:
            # transformers partitions a model as it creates or loads it (its own zero.Init,
            # with the weight init and from_pretrained's loading done on the partitions) while
            # an HfDeepSpeedConfig for a stage-3 config is alive: it holds only a weak
            # reference, so the backend keeps it. A 7B model never exists whole on one rank.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        return super().init_context()

    def setup(self, model: nn.Module, lr_lambda: Callable[[int], float]) -> None:
        # The fused (single-kernel) AdamW where torch has it for the device: GPUs.
        opt = adamw(model, self.cfg, fused=self.device.type == "cuda")
        sched = LambdaLR(opt, lr_lambda)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=self.ds_config
        )
        self.optimizer = opt
        self._micro = 0
        # ZeRO-0 in bf16 (DeepSpeed's FP16_UnfusedOptimizer): each bf16 parameter has its own
        # fp32 master, the tensor the torch optimizer steps. Elsewhere the parameter itself
        # (ZeRO-0 fp32) or a flat fp32 partition reached through the parameter's attributes.
        wrapper = self.engine.optimizer
        self._masters: dict[int, torch.Tensor] = {}
        if self.zero_stage == 0 and wrapper is not opt:
            for lp_group, hp_group in zip(wrapper.fp16_groups, wrapper.fp32_groups):
                self._masters.update((id(lp), hp) for lp, hp in zip(lp_group, hp_group))
            # That optimizer creates AdamW's state by one step on zero gradients at
            # construction: AdamW's step count is then one ahead (every bias correction is off,
            # the first real update ~0.73 of AdamW's) and weight decay has shrunk the masters
            # once. Undo it: a fresh state, masters equal to the weights they were copied from.
            opt.state.clear()
            with torch.no_grad():
                for lp_group, hp_group in zip(wrapper.fp16_groups, wrapper.fp32_groups):
                    for lp, hp in zip(lp_group, hp_group):
                        hp.copy_(lp)
        self._grads_changed = False  # a ZeRO-1/2 fragment was written since the last step

    def _sync_full_grads(self) -> None:
        """DeepSpeed's BF16_Optimizer (ZeRO-1 in bf16) keeps every parameter's whole reduced
        fp32 gradient on every rank and takes the clipping norm over all of it, locally, while
        MIGU and the L2 anchor change only this rank's partition. All-gather the partitions
        (one fp32 all-gather of the gradients, only after such a change) so that every rank's
        norm is the norm of the gradient the optimizer steps."""
        wrapper = self.engine.optimizer
        if not self._grads_changed or not hasattr(wrapper, "fp32_groups_gradient_flat_partition"):
            self._grads_changed = False
            return
        for i, flat in enumerate(wrapper.fp32_groups_gradients_flat):
            own = wrapper.fp32_groups_gradient_flat_partition[i].clone()  # a view into flat
            group = wrapper.real_dp_process_group[i]
            with torch.no_grad():  # gloo writes the output through split views
                torch.distributed.all_gather_into_tensor(flat, own, group=group)
        self._grads_changed = False

    @property
    def module(self) -> nn.Module:
        return self.engine

    @property
    def zero_stage(self) -> int:
        return self.cfg.engine.zero_stage

    def forward_backward(self, batch: dict[str, Any]) -> torch.Tensor:
        # Tensors to the device; ints (flash-attn's max_length_*) and mask mappings as given.
        batch = {
            k: v.to(self.device) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
            if v is not None
        }
        out = self.engine(**batch)
        self.engine.backward(out.loss)
        self._micro += 1
        if self._micro < self.cfg.grad_accum:
            # Not the boundary: DeepSpeed only advances its micro-step counter here.
            self.engine.step()
        return out.loss.detach()

    # ---------------------------------------------------------------- MIGU access

    def grad_fragments(self, param: Any) -> Iterator[GradFragment]:
        # ``param``: an nn.Parameter carrying DeepSpeed's attributes (ds_id, _hp_mapping, ...)
        if not param.requires_grad:  # frozen (LoRA's base): no gradient, no optimizer entry
            return
        if hasattr(param, "ds_id"):  # ZeRO-3
            opt = param._z3_optimizer
            part = param.partition_numel()
            rank = opt._get_param_partition_rank(param)
            start = rank * part
            numel = max(0, min(part, param.ds_numel - start))
            if numel == 0:
                return
            group_idx, dest, _ = opt.grad_position[opt.get_param_id(param)]
            hp = opt.fp32_partitioned_groups_flat[group_idx]
            yield GradFragment(
                param_start=start,
                numel=numel,
                get=lambda: safe_get_local_grad(param).view(-1),
                set=lambda t: safe_set_local_grad(param, t),
                hp=(hp, dest),
            )
        elif getattr(param, "_hp_mapping", None) is not None:  # ZeRO-1/2, bf16 optimizer
            m = param._hp_mapping
            lp = m.lp_fragment_address
            # The flat fp32 partition of this parameter group: what DeepSpeed's ZeRO-1/2
            # optimizer (single_partition_of_fp32_groups) and its BF16_Optimizer (ZeRO-1 in
            # bf16, fp32_groups_flat_partition) both put in the torch optimizer's group.
            hp_tensor = self.optimizer.param_groups[m.param_group_index]["params"][0]

            def get() -> torch.Tensor:
                g = m.get_lp_grad_fragment(param._index_in_param_group).view(-1)
                if g.numel() == param.numel():  # a full buffer: take only our fragment
                    g = g.narrow(0, lp.start, lp.numel)
                return g

            def set_(t: torch.Tensor) -> None:
                g = get()
                if g.data_ptr() != t.data_ptr():
                    g.copy_(t[: g.numel()])
                self._grads_changed = True

            yield GradFragment(
                param_start=lp.start,
                numel=lp.numel,
                get=get,
                set=set_,
                hp=(hp_tensor, m.hp_fragment_address.start),
            )
        elif self.zero_stage == 0 and param.grad is not None:  # every rank: the whole grad
            yield GradFragment(
                param_start=0,
                numel=param.numel(),
                get=lambda: param.grad.view(-1),
                set=lambda t: None,
                hp=(self._masters.get(id(param), param), 0),
            )

    def local_params(self) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
        for name, param in self.engine.module.named_parameters():
            if not param.requires_grad:
                continue
            if hasattr(param, "ds_id"):  # ZeRO-3: our slice of the fp32 partition
                start = param._z3_optimizer._get_param_partition_rank(param)
                start *= param.partition_numel()
                numel = max(0, min(param.partition_numel(), param.ds_numel - start))
                master = safe_get_local_fp32_param(param).view(-1)[:numel]
            elif getattr(param, "_hp_mapping", None) is not None:  # ZeRO-1/2, bf16 optimizer
                master = param._hp_mapping.hp_fragment.view(-1)
            elif self.zero_stage == 0:  # the fp32 master (bf16), or the parameter itself
                master = self._masters.get(id(param), param).data.view(-1)
            else:  # this rank owns no element of it
                continue
            if master.numel():
                yield name, param, master

    def freeze_elements(self, frag: GradFragment, frozen: torch.Tensor) -> None:
        assert frag.hp is not None and self.optimizer is not None
        tensor, offset = frag.hp
        self.optimizer.freeze(tensor, offset, frozen)

    # ---------------------------------------------------------------- step

    def grad_norm(self) -> float:
        # DeepSpeed checks gradients for inf/NaN only with fp16 loss scaling, and computes
        # its norm inside engine.step(), too late to skip the step: sum the squares over
        # each rank's own fragments (every element is on exactly one rank) and all-reduce.
        # ZeRO-0 keeps whole, already reduced gradients on every rank: no reduction.
        if self.zero_stage == 0:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]  # bf16 too
            return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.engine.module.parameters():
            if hasattr(p, "ds_id") or getattr(p, "_hp_mapping", None) is not None:
                for frag in self.grad_fragments(p):
                    sq += torch.linalg.vector_norm(frag.get()[: frag.numel].float()).double() ** 2
        return float(all_reduce_sum(sq).sqrt())

    def step(self) -> dict[str, float]:
        lr = self.optimizer.param_groups[0]["lr"]  # the LR this step uses (step() advances it)
        # ZeRO-0 keeps whole gradients and DeepSpeed reports no norm there: compute it.
        norm0 = self.grad_norm() if self.cfg.engine.zero_stage == 0 else None
        self._sync_full_grads()
        self.engine.step()
        self._micro = 0
        norm = self.engine.get_global_grad_norm() if norm0 is None else norm0
        return {"grad_norm": float(norm) if norm is not None else float("nan"), "lr": lr}

    def skip_step(self) -> None:
        # Zero every gradient we own and freeze every optimizer element, then let DeepSpeed
        # run its step: weights and moments stay bit-identical, counters stay consistent.
        # Freeze through each fragment's optimizer tensor: under ZeRO-3 the optimizer's
        # param_groups are empty between steps (DeepSpeed fills them per sub-group inside
        # step()), so freezing "every tensor of every group" froze nothing there and AdamW's
        # weight decay still moved the weights of a skipped step.
        for p in self.engine.module.parameters():
            for frag in self.grad_fragments(p):
                g = frag.get()
                g.zero_()
                frag.set(g)
                ones = torch.ones(frag.numel, dtype=torch.bool, device=g.device)
                self.freeze_elements(frag, ones)
        self._sync_full_grads()
        self.engine.step()
        self._micro = 0

    # ---------------------------------------------------------------- checkpoints

    def snapshot(
        self, directory: str, tag: str, client_state: dict[str, Any], copy: bool
    ) -> Callable[[Any], dict[str, dict[str, int]]]:
        # DeepSpeed's save_checkpoint builds each file's state dict and hands it to its
        # checkpoint engine; ours only keeps them (copied to host memory when ``copy``), and
        # the returned writer torch.saves them. DeepSpeed's own asynchronous writers (the
        # Decoupled/Fast engines) need its aio ops and pass live tensors to another process.
        deferred = _DeferredWrites(self.stager if copy else None)
        live, self.engine.checkpoint_engine = self.engine.checkpoint_engine, deferred
        try:
            self.engine.save_checkpoint(
                directory, tag=tag, client_state=client_state, save_latest=False
            )
        except (OSError, RuntimeError):
            # save_checkpoint's only collective after its writes is a closing barrier, which a
            # rank whose write failed (full disk) skips; take it here so that the ranks whose
            # writes succeeded are not left waiting in it, then report the failure.
            torch.distributed.barrier()
            raise
        finally:
            self.engine.checkpoint_engine = live
        return deferred.write

    def prefetch(self, directory: str, tag: str) -> tuple[Any, str | None]:
        # The files DeepSpeed's own loader reads on this rank: the shared model states of ZeRO
        # 0-2 (mp_rank_*) and this rank's partitions (*zero_pp_rank_R_*), into host memory
        # (DeepSpeed would put the model states back on the GPU; its load copies them there
        # anyway, and GPU memory must not hold them while the model is being built).
        d = Path(directory, tag)
        if len(optim_files(d)) not in (0, self.world_size):
            return None, None  # another world size: load_resharded reads every rank's files
        out = {}
        for p in sorted(d.glob("*.pt")):
            if not (p.name.startswith("mp_rank_") or f"pp_rank_{self.rank}_" in p.name):
                continue
            try:
                out[os.path.normpath(p)] = torch.load(p, map_location="cpu", weights_only=False)
            except Exception as e:  # noqa: BLE001 - damaged: reported and agreed on, not raised
                return None, f"{p.name}: unreadable ({type(e).__name__}: {e})"
        return out, None

    def load(self, directory: str, tag: str, prefetched: Any = None) -> dict[str, Any]:
        d = Path(directory, tag)
        if (d / ".metadata").is_file():
            raise RuntimeError(
                f"{d} is an FSDP2 (torch.distributed.checkpoint) checkpoint: resume it with "
                "engine.backend=fsdp2, or export its weights (python launch/export_hf.py "
                f"--checkpoint {d} --out DIR) and start a new run with model.init_from=DIR."
            )
        written_by = len(optim_files(d))
        if written_by and written_by != self.world_size:
            # Another world size (ZeRO-1/2/3): consolidate per parameter and repartition.
            load_resharded(self.engine, self.optimizer, self.scheduler, d)
            return {}
        # The same world size, or ZeRO-0 (whole on every rank): DeepSpeed's own loader, given
        # the files already read by ``prefetch``.
        live = self.engine.checkpoint_engine
        self.engine.checkpoint_engine = _Prefetched(live, prefetched or {})
        try:
            path, client_state = self.engine.load_checkpoint(
                directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        finally:
            self.engine.checkpoint_engine = live
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} in {directory}")
        return client_state or {}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.cfg.engine.zero_stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            sd = self.engine.module.state_dict()
        if self.rank != 0 or sd is None:
            return {}
        return {k: v.detach().cpu().clone() for k, v in sd.items()}


def consolidate(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The whole fp32 model state dict of a DeepSpeed checkpoint directory, in one process.

    ZeRO 1-3 (``*zero_pp_rank_*`` files, the optimizer's partitions): DeepSpeed's own
    ``zero_to_fp32`` reader stitches every rank's fp32 master partition back together. ZeRO-0
    writes no partitions: the whole module is in ``mp_rank_00_model_states.pt``.
    """
    d = Path(ckpt_dir)
    if not any(d.glob("*zero_pp_rank_*")):
        states = torch.load(d / "mp_rank_00_model_states.pt", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(d.parent), tag=d.name)


class _DeferredWrites(CheckpointEngine):
    """A DeepSpeed checkpoint engine that collects ``save(state_dict, path)`` calls and writes
    them later (``write``), each file fsynced; loads are never routed here."""

    def __init__(self, stager: Stager | None):
        super().__init__()
        self.stager = stager  # None: keep the live state (written before the next step)
        self.files: list[tuple[str, Any]] = []

    def create(self, info: Any) -> None:
        pass

    def save(self, state_dict: Any, path: str) -> None:
        if self.stager is not None:  # one set of buffers per file (its name holds the rank)
            state_dict = self.stager.stage(state_dict, (os.path.basename(path),))
        self.files.append((path, state_dict))

    def load(self, path: str, map_location: Any = None) -> Any:
        raise NotImplementedError("only used for saving")

    def commit(self, info: Any) -> bool:
        return True

    def preserves_storage_sharing(self) -> bool:
        # DeepSpeed clones some state dicts for such engines; ``stage`` copies anyway.
        return self.stager is None

    def write(self, group: Any) -> dict[str, dict[str, int]]:
        written = {path: write_durable(path, state) for path, state in self.files}
        self.files = []
        return written


class _Prefetched(CheckpointEngine):
    """DeepSpeed's checkpoint engine during a load: a file ``prefetch`` already read comes
    from memory (once: DeepSpeed owns the object then), any other from ``live``."""

    def __init__(self, live: CheckpointEngine, objects: dict[str, Any]):
        super().__init__()
        self.live = live
        self.objects = objects

    def create(self, info: Any) -> None:
        self.live.create(info)

    def save(self, state_dict: Any, path: str) -> None:
        self.live.save(state_dict, path)

    def load(self, path: str, map_location: Any = None) -> Any:
        obj = self.objects.pop(os.path.normpath(path), None)
        return obj if obj is not None else self.live.load(path, map_location=map_location)

    def commit(self, info: Any) -> bool:
        return self.live.commit(info)
