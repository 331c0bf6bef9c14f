"""Checkpoint save/load throughput: our Checkpointer vs plain torch.save/load.

    python bench/bench_checkpoint.py [--backend deepspeed|fsdp2] [--nproc 2] [--repeats 3]
                                     [--dir /tmp/bench_ckpt]

Launches itself on ``--nproc`` ranks (torchrun, gloo on CPU), builds the tiny-cpu model
(configs/tiny-cpu.yaml: 4.2M parameters, ~50 MB of ZeRO-3 checkpoint with the AdamW moments),
takes one optimizer step so the optimizer state exists, then per repeat:

- ours: ``Checkpointer.save`` (the backend's shards: DeepSpeed ZeRO-3 files or FSDP2's DCP
  ``.distcp``; per-rank state + CRC32 manifest + ``latest``) and ``find_latest_good`` +
  ``Checkpointer.load`` (checksums every file, restores the engine);
- plain: every rank ``torch.save`` of the same tensors (DeepSpeed: the very objects it wrote
  for that rank; FSDP2: the rank's local shards of the weights and AdamW moments, plus its
  trainer state) on the same disk, no checksums, no barriers, and ``torch.load`` of them back.

Time is the slowest rank's, between barriers; bytes are summed over ranks; throughput is
bytes / median time. Prints one JSON line. Loads read files just written (warm page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timed(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    took = time.perf_counter() - t0
    out = [0.0] * dist.get_world_size()
    dist.all_gather_object(out, took)
    return max(out)


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from migu_dist import build_backend
    from migu_dist.optim import local
    from train.checkpoint import Checkpointer, tag_for
    from train.config import load_config
    from train.model import build_model

    world = int(os.environ["WORLD_SIZE"])
    overrides = ["logging.wandb=false", f"engine.backend={args.backend}"]
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml", overrides, world_size=world)
    backend = build_backend(cfg.backend_config())
    model = build_model(cfg.model, seed=0, init_context=backend.init_context())
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    backend.setup(model, lambda step: 1.0)
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, 64))
    backend.forward_backward({"input_ids": ids, "labels": ids})
    backend.step()

    base = Path(args.dir)
    ours_dir, plain_dir = base / "ours", base / f"plain_{backend.rank}"
    if backend.rank == 0:
        shutil.rmtree(base, ignore_errors=True)
    dist.barrier()
    plain_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(ours_dir, backend, keep_last=args.repeats + 1)
    state = {"train": {"step": 0}}
    rank_state = {"rng": torch.get_rng_state()}

    save_s, load_s, psave_s, pload_s = [], [], [], []
    for i in range(1, args.repeats + 1):
        save_s.append(_timed(lambda i=i: ckpt.save(i, state, rank_state, pinned=False)))
        load_s.append(_timed(lambda: ckpt.load(ckpt.find_latest_good())))
        d = ours_dir / tag_for(i)
        rank_file = d / f"rank_{backend.rank:05d}.pt"
        if args.backend == "deepspeed":
            # The same objects DeepSpeed wrote for this rank, through plain torch.save/load.
            mine = sorted(d.glob(f"zero_pp_rank_{backend.rank}_*.pt")) + [rank_file]
            objs = {p.name: torch.load(p, weights_only=False) for p in mine}
        else:
            # This rank's shards of the weights and AdamW moments, and its trainer state.
            opt = backend.optimizer
            tensors = {}
            for name, p in backend.module.named_parameters():
                tensors[name] = local(p.data).clone()
                for m, v in opt.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor) and v.dim():
                        tensors[f"{name}.{m}"] = local(v).clone()
            objs = {"shard.pt": tensors, rank_file.name: torch.load(rank_file, weights_only=False)}
        psave_s.append(
            _timed(lambda objs=objs: [torch.save(o, plain_dir / n) for n, o in objs.items()])
        )
        pload_s.append(
            _timed(lambda objs=objs: [torch.load(plain_dir / n, weights_only=False) for n in objs])
        )
    tag = tag_for(args.repeats)
    ours_bytes = sum(p.stat().st_size for p in (ours_dir / tag).iterdir())
    mine_plain = sum(p.stat().st_size for p in plain_dir.iterdir())
    sizes = [0] * world
    dist.all_gather_object(sizes, mine_plain)
    plain_bytes = sum(sizes)
    zero_stage = cfg.engine.zero_stage if args.backend == "deepspeed" else None
    if backend.rank == 0:
        fs = subprocess.run(["df", "-T", str(base)], capture_output=True, text=True).stdout
        med = statistics.median
        print(
            json.dumps(
                {
                    "bench": "checkpoint",
                    "ours_save_Bps": ours_bytes / med(save_s),
                    "ours_load_Bps": ours_bytes / med(load_s),
                    "plain_save_Bps": plain_bytes / med(psave_s),
                    "plain_load_Bps": plain_bytes / med(pload_s),
                    "ours_save_s": save_s,
                    "ours_load_s": load_s,
                    "plain_save_s": psave_s,
                    "plain_load_s": pload_s,
                    "ours_bytes": ours_bytes,
                    "plain_bytes": plain_bytes,
                    "conditions": {
                        "world_size": world,
                        "backend": args.backend,
                        "zero_stage": zero_stage,
                        "device": str(backend.device),
                        "dist_backend": dist.get_backend(),
                        "model_params": n_params,
                        "dtype": str(backend.param_dtype),
                        "repeats": args.repeats,
                        "dir": str(base),
                        "fs": fs.splitlines()[-1].split()[1] if fs else "?",
                        "page_cache": "warm (loads read files just written; no fsync of shards)",
                        "ours_load_includes": "CRC32 of every file + the backend's load",
                        "cpu_count": os.cpu_count(),
                        "torch": torch.__version__,
                        "deepspeed": deepspeed.__version__,
                    },
                }
            ),
            flush=True,
        )
    dist.barrier()
    if backend.rank == 0:
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", choices=["deepspeed", "fsdp2"], default="deepspeed")
    p.add_argument("--nproc", type=int, default=2, help="ranks (torchrun, gloo on CPU)")
    p.add_argument("--repeats", type=int, default=3, help="saves/loads timed, median reported")
    p.add_argument("--dir", default="/tmp/bench_ckpt", help="where to write (pick the disk)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        import torch.distributed as dist

        worker(args)
        dist.destroy_process_group()  # not left to interpreter shutdown (gloo can abort there)
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={args.nproc}", __file__, "--worker"]
    cmd += ["--repeats", str(args.repeats), "--dir", args.dir, "--backend", args.backend]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith('{"bench"')]
    if r.returncode or not lines:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
        return r.returncode or 1
    print(lines[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
