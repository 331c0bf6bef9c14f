"""``launch/cpt.py`` plus, right after the resume, the whole restored state on rank 0.

    torchrun --standalone --nproc_per_node M tests/workers/elastic_state.py --config C [k=v ...]

Builds the trainer as the entry point does (``build_trainer`` resumes), then saves
``<output_dir>/restored.pt`` on rank 0 before training: the consolidated fp32 weights and
AdamW moments by parameter name, AdamW's step counts, the LR, the schedule's step, MIGU's
state and the data position. Then trains like ``launch/cpt.py`` and exits like it.
"""

import os
from pathlib import Path

import torch

from launch.cpt import parse_args
from tests.workers import exit_now
from train.config import load_config
from train.run import build_trainer


def full_optimizer_state(backend) -> tuple[dict[str, torch.Tensor], set[float]]:
    """{"<name>.<fp32|exp_avg|exp_avg_sq>": whole tensor} on rank 0, and every AdamW step
    count. Collective."""
    out: dict[str, torch.Tensor] = {}
    steps = {float(s["step"]) for s in backend.optimizer.state.values()}
    if backend.cfg.engine.backend == "deepspeed":
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        for name, p in backend.engine.module.named_parameters():
            out[f"{name}.fp32"] = safe_get_full_fp32_param(p).cpu()
            for k in ("exp_avg", "exp_avg_sq"):
                out[f"{name}.{k}"] = safe_get_full_optimizer_state(p, k).cpu()
        return out, steps
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(backend.module, backend.optimizer, options=opts)
    for name, t in model_sd.items():
        out[f"{name}.fp32"] = t
    for name, st in optim_sd.get("state", {}).items():
        for k in ("exp_avg", "exp_avg_sq"):
            out[f"{name}.{k}"] = st[k]
    return out, steps


def main() -> int:
    args = parse_args()
    cfg = load_config(args.config, args.overrides, world_size=int(os.environ["WORLD_SIZE"]))
    trainer = build_trainer(cfg)
    backend = trainer.backend
    state, steps = full_optimizer_state(backend)
    if backend.rank == 0:
        restored = {
            "state": state,
            "adam_steps": sorted(steps),
            "lr": backend.optimizer.param_groups[0]["lr"],
            "sched_epoch": backend.scheduler.last_epoch,
            "step": trainer.state.step,
            "migu": next((h.state_dict() for h in trainer.hooks if h.name == "migu"), None),
            "data": trainer.data.state_dict(),
        }
        torch.save(restored, Path(cfg.output_dir, "restored.pt"))
    trainer.fit()
    backend.close()
    return 0 if trainer.exit_reason in ("finished", "signal") else 3


if __name__ == "__main__":
    exit_now(main())
