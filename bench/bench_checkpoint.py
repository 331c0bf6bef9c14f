"""Checkpoint save/load: our Checkpointer (asynchronous and synchronous) vs plain torch.save/load.

    python bench/bench_checkpoint.py [--backend deepspeed|fsdp2] [--model tiny|smollm2|synthetic]
                                     [--nproc 2] [--repeats 2] [--dir /tmp/bench_ckpt]

Launches itself on ``--nproc`` ranks (torchrun, gloo on CPU) and builds one model:

- ``tiny``: configs/tiny-cpu.yaml (4.2M parameters, ~50 MB with the AdamW moments);
- ``smollm2``: SmolLM2-135M (configs/smollm2-135m-cpu.yaml, its real weights; ~1.6 GB fp32
  with the AdamW moments, 30 layers of small tensors);
- ``synthetic``: a Llama of few large tensors (hidden 1024, 4 layers, 32k vocab, untied
  embeddings: 117M parameters, ~1.4 GB with the moments).

It takes one optimizer step so that the optimizer state exists and one untimed asynchronous
save (it allocates the host buffers later saves reuse: ``first_stall_s``), then per repeat,
each on the same disk and with the previous files deleted first (the disk need only hold one
copy) and synced (``os.sync``: no write-back of an earlier step runs into a timed one):

- ``async``: ``Checkpointer.save`` with ``async_save``: ``stall`` is the time until it returns
  (what the step loop waits: the copy to host memory), ``save`` until ``wait()`` returns (the
  files written, fsynced, checksummed, manifest and ``latest`` written);
- ``sync``: the same save, synchronous;
- ``load``: ``verify`` (``find_latest_good(prefetch=True)`` as a resume calls it: CRC32C of
  every file, each rank its own, while the backend reads what it will load: DeepSpeed
  deserialises its files meanwhile, FSDP2 reads nothing ahead) + ``restore``
  (``Checkpointer.load``: the backend's load) of the asynchronous checkpoint, cold: its files
  are dropped from the page cache first (``posix_fadvise(DONTNEED)`` on our own files only);
  ``load_no_prefetch``: the same load, cold again, with the checksums first and the backend's
  read after them (how every load ran before ``Backend.prefetch``);
- ``plain``: every rank ``torch.save`` of the same tensors (DeepSpeed: the very objects it
  wrote for that rank; FSDP2: the rank's local shards of the weights and AdamW moments plus
  its trainer state), without and with an fsync, and ``torch.load`` of them back, cold.

The step loop is idle during the background write here; in training the write competes with
the steps for CPU and disk (on GPU nodes the steps run on the accelerators). Time is the
slowest rank's, between barriers; bytes are summed over ranks; ratios are throughputs
(bytes / median time), ours over plain, and ``paired_median`` the median of each repeat's own
ratio. Prints one JSON line.
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

MODELS = {
    "tiny": ("configs/tiny-cpu.yaml", []),
    "smollm2": ("configs/smollm2-135m-cpu.yaml", []),
    "synthetic": (
        "configs/tiny-cpu.yaml",
        ["model.hidden_size=1024", "model.num_layers=4", "model.intermediate_size=2816",
         "model.num_heads=8", "model.num_kv_heads=8", "model.vocab_size=32000"],
    ),
}  # fmt: skip


def _slowest(took: float) -> float:
    import torch.distributed as dist

    out = [0.0] * dist.get_world_size()
    dist.all_gather_object(out, took)
    return max(out)


def _timed(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return _slowest(time.perf_counter() - t0)


def _drop_cache(*dirs: Path) -> None:
    """Evict our own files from the page cache (written back first), nobody else's."""
    for d in dirs:
        for p in d.rglob("*"):
            if p.is_file():
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def _bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


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
    config, shape = MODELS[args.model]
    overrides = ["logging.wandb=false", f"engine.backend={args.backend}", *shape]
    cfg = load_config(ROOT / config, overrides, world_size=world)
    backend = build_backend(cfg.backend_config())
    model = build_model(
        cfg.model, seed=0, dtype=backend.param_dtype, init_context=backend.init_context()
    )
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    backend.setup(model, lambda step: 1.0)
    ids = torch.randint(0, cfg.model.vocab_size, (1, 32))
    backend.forward_backward({"input_ids": ids, "labels": ids})
    backend.step()
    rank = backend.rank

    base = Path(args.dir)
    ours_dir, plain_dir = base / "ours", base / f"plain_{rank}"
    if rank == 0:
        shutil.rmtree(base, ignore_errors=True)
    dist.barrier()
    asyn = Checkpointer(ours_dir, backend, keep_last=1, async_save=True)
    sync = Checkpointer(ours_dir, backend, keep_last=1, async_save=False)
    state = {"train": {"step": 0}}
    rank_state = {"rng": torch.get_rng_state()}

    def clear(d: Path) -> None:
        # Every timed save starts on an empty directory and a disk with nothing left to write
        # back (the deletion and any earlier write are synced first), ours and plain alike.
        dist.barrier()
        if rank == 0:
            shutil.rmtree(d, ignore_errors=True)
        os.sync()
        dist.barrier()

    t: dict[str, list[float]] = {
        k: [] for k in ("stall", "save", "sync_save", "load", "verify", "restore", "plain_save")
    }
    t["plain_save_fsync"], t["plain_load"], t["load_no_prefetch"] = [], [], []
    ours_bytes = plain_bytes = 0
    # Untimed: the first asynchronous save allocates the host buffers that later ones reuse.
    dist.barrier()
    t0 = time.perf_counter()
    asyn.save(1, state, rank_state, pinned=False)
    first_stall = _slowest(time.perf_counter() - t0)
    asyn.wait()
    for i in range(1, args.repeats + 1):
        clear(ours_dir)
        dist.barrier()
        t0 = time.perf_counter()
        asyn.save(2 * i, state, rank_state, pinned=False)
        t["stall"].append(_slowest(time.perf_counter() - t0))
        assert asyn.wait()
        dist.barrier()
        t["save"].append(_slowest(time.perf_counter() - t0))
        d = ours_dir / tag_for(2 * i)
        ours_bytes = _bytes(d)
        if rank == 0:
            _drop_cache(d)
        found: list[str | None] = []
        t["verify"].append(
            _timed(lambda found=found: found.append(sync.find_latest_good(prefetch=True)))
        )
        t["restore"].append(_timed(lambda found=found: sync.load(found[0])))
        t["load"].append(t["verify"][-1] + t["restore"][-1])
        # The same load without the read ahead: checksums first, then the backend reads.
        if rank == 0:
            _drop_cache(d)
        took = _timed(lambda: sync.load(sync.find_latest_good(prefetch=False) or ""))
        t["load_no_prefetch"].append(took)

        rank_file = d / f"rank_{rank:05d}.pt"
        if args.backend == "deepspeed":
            # The same objects DeepSpeed wrote for this rank, through plain torch.save/load.
            mine = sorted(d.glob(f"*zero_pp_rank_{rank}_*.pt")) + [rank_file]
            if rank == 0:
                mine += [p for p in d.glob("mp_rank_*.pt")]  # ZeRO 0-2: the model's file
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

        clear(ours_dir)
        t["sync_save"].append(_timed(lambda i=i: sync.save(2 * i + 1, state, rank_state, False)))
        clear(ours_dir)

        def plain_save(fsync: bool, objs=objs) -> None:
            for n, o in objs.items():
                torch.save(o, plain_dir / n)
                if fsync:
                    fd = os.open(plain_dir / n, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)

        for fsync, key in ((False, "plain_save"), (True, "plain_save_fsync")):
            shutil.rmtree(plain_dir, ignore_errors=True)  # fresh files, as ours are
            plain_dir.mkdir(parents=True)
            clear(ours_dir)  # (nothing to delete: the barrier and sync)
            t[key].append(_timed(lambda fsync=fsync: plain_save(fsync)))
        _drop_cache(plain_dir)
        t["plain_load"].append(
            _timed(lambda objs=objs: [torch.load(plain_dir / n, weights_only=False) for n in objs])
        )
        sizes = [0] * world
        dist.all_gather_object(sizes, _bytes(plain_dir))
        plain_bytes = sum(sizes)
        del objs
        shutil.rmtree(plain_dir)
    clear(base)

    zero_stage = cfg.engine.zero_stage if args.backend == "deepspeed" else None
    if rank == 0:
        med = statistics.median
        fs = subprocess.run(["df", "-T", str(base.parent)], capture_output=True, text=True).stdout
        nbytes = {k: plain_bytes if k.startswith("plain") else ours_bytes for k in t}
        rate = {k: nbytes[k] / med(v) for k, v in t.items()}

        def paired(ours: str, plain: str) -> float:
            # Median over repeats of each repeat's own ratio: a slow spell of the disk that
            # hits one repeat's pair together cancels out.
            per = [
                (nbytes[ours] / a) / (nbytes[plain] / b)
                for a, b in zip(t[ours], t[plain], strict=True)
            ]
            return med(per)

        print(
            json.dumps(
                {
                    "bench": "checkpoint",
                    "save_ratio": rate["save"] / rate["plain_save"],
                    "save_ratio_vs_fsynced_plain": rate["save"] / rate["plain_save_fsync"],
                    "sync_save_ratio": rate["sync_save"] / rate["plain_save"],
                    "load_ratio": rate["load"] / rate["plain_load"],
                    "load_no_prefetch_ratio": rate["load_no_prefetch"] / rate["plain_load"],
                    "stall_over_save": med(t["stall"]) / med(t["save"]),
                    "paired_median": {
                        "save_ratio": paired("save", "plain_save"),
                        "save_ratio_vs_fsynced_plain": paired("save", "plain_save_fsync"),
                        "sync_save_ratio": paired("sync_save", "plain_save"),
                        "load_ratio": paired("load", "plain_load"),
                        "load_no_prefetch_ratio": paired("load_no_prefetch", "plain_load"),
                        "stall_over_save": med(a / b for a, b in zip(t["stall"], t["save"])),
                    },
                    "first_stall_s": first_stall,
                    "MBps": {k: v / 1e6 for k, v in rate.items()},
                    "seconds": t,
                    "ours_bytes": ours_bytes,
                    "plain_bytes": plain_bytes,
                    "conditions": {
                        "model": args.model,
                        "model_params": n_params,
                        "world_size": world,
                        "backend": args.backend,
                        "zero_stage": zero_stage,
                        "device": str(backend.device),
                        "dist_backend": dist.get_backend(),
                        "dtype": str(backend.param_dtype),
                        "repeats": args.repeats,
                        "dir": str(base),
                        "fs": fs.splitlines()[-1].split()[1] if fs else "?",
                        "page_cache": "loads cold (own files evicted with posix_fadvise)",
                        "ours_save": "fsync of every file + CRC32C manifest + latest",
                        "ours_load_includes": "CRC32C of every file, with prefetch, + the load",
                        "loadavg_at_end": os.getloadavg(),
                        "cpu_count": os.cpu_count(),
                        "torch": torch.__version__,
                        "deepspeed": deepspeed.__version__,
                    },
                }
            ),
            flush=True,
        )
    dist.barrier()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", choices=["deepspeed", "fsdp2"], default="deepspeed")
    p.add_argument("--model", choices=list(MODELS), default="tiny")
    p.add_argument("--nproc", type=int, default=2, help="ranks (torchrun, gloo on CPU)")
    p.add_argument("--repeats", type=int, default=2, help="saves/loads timed, median reported")
    p.add_argument("--dir", default="/tmp/bench_ckpt", help="where to write (pick the disk)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        import torch.distributed as dist

        worker(args)
        dist.destroy_process_group()  # not left to interpreter shutdown (gloo can abort there)
        return 0
    need = {"tiny": 0.2e9, "smollm2": 2.5e9, "synthetic": 1.7e9}[args.model]
    Path(args.dir).parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(Path(args.dir).parent).free
    if free < need:
        sys.stderr.write(f"{free / 1e9:.1f} GB free under {args.dir}, {need / 1e9:.1f} needed\n")
        return 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={args.nproc}", __file__, "--worker"]
    cmd += ["--repeats", str(args.repeats), "--dir", args.dir]
    cmd += ["--backend", args.backend, "--model", args.model]
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
