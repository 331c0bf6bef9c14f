"""MIGU and the sharding backends."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from migu_dist.backend import Backend
    from migu_dist.config import BackendConfig


def build_backend(cfg: BackendConfig) -> Backend:
    """The backend named by ``engine.backend`` (imported lazily: each pulls in its stack);
    ``cfg`` is ``Config.backend_config()``."""
    if cfg.engine.backend == "deepspeed":
        from migu_dist.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(cfg)
    if cfg.engine.backend == "fsdp2":
        from migu_dist.fsdp2_backend import FSDP2Backend

        return FSDP2Backend(cfg)
    raise ValueError(f"engine.backend={cfg.engine.backend!r} is not available")


def consolidate(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The whole model's fp32 state dict from one checkpoint directory (``step_*``) that either
    backend wrote, in one process: no process group, GPU or original number of ranks needed.
    The directory's format says which backend wrote it; the keys are the model's own."""
    from migu_dist.fsdp2_backend import is_fsdp2_checkpoint

    if is_fsdp2_checkpoint(checkpoint_dir):
        from migu_dist.fsdp2_backend import consolidate as fsdp2_consolidate

        return fsdp2_consolidate(checkpoint_dir)
    from migu_dist.deepspeed_backend import consolidate as deepspeed_consolidate

    return deepspeed_consolidate(checkpoint_dir)
