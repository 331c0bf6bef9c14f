"""MIGU and the sharding backends."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
