"""Training throughput and MIGU overhead, measured side by side in one run.

    python bench/bench_train.py                      # tiny model, 2 CPU ranks (relaunches itself)
    python bench/bench_train.py engine.backend=fsdp2 model.compile=true   # any config override
    python bench/bench_train.py --nproc 1 --peak-tflops 989 model.hidden_size=2048 ...  # GPU

Two engines of the configured backend (DeepSpeed ZeRO-3 by default, through the same backend
seam as training) over the same initial weights and the same batches: one plain, one
with MIGU. Blocks of steps alternate between them so that drift on a shared machine hits
both equally. Prints one JSON line: step time with and without MIGU, overhead, tokens/s,
MFU (when --peak-tflops is given; FLOPs per token as logged in training, PaLM's
6·N + 12·L·d·T), MIGU's all-reduce bytes vs the gradient bytes per step,
and peak memory per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6, help="alternating blocks per engine")
    p.add_argument("--steps", type=int, default=5, help="steps per block")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="hardware peak, for MFU")
    p.add_argument("overrides", nargs="*", help="config overrides (dotted keys)")
    return p.parse_args()


def main() -> None:
    args = parse()
    if "RANK" not in os.environ:  # relaunch under torchrun
        os.chdir(ROOT)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc}", __file__, *sys.argv[1:]]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        sys.exit(subprocess.call(cmd, env=env))
    import torch

    from migu_dist import build_backend
    from migu_dist.backend import use_bf16
    from migu_dist.migu import Migu
    from train.config import load_config
    from train.model import build_model, flops_per_token

    base = [
        "train.micro_batch_size=4", "train.grad_accum=2", "train.seq_len=128",
        "model.vocab_size=32000", "model.hidden_size=64", "model.num_layers=2",
        "model.intermediate_size=176", "model.num_heads=4",
        "data.phases=[{name: p, domains: {d: 1}}]",
        "data.domains={d: {train: [data/demo/code/heldout.jsonl]}}",
    ]  # fmt: skip
    cfg = load_config(None, base + args.overrides, world_size=int(os.environ["WORLD_SIZE"]))
    cfg.migu.enabled = True
    torch.manual_seed(0)
    engines = {}
    init_state = None
    for name in ("plain", "migu"):
        backend = build_backend(cfg)
        model = build_model(
            cfg.model, seed=0, dtype=backend.param_dtype, init_context=backend.init_context()
        )
        fpt = flops_per_token(model, cfg.train.seq_len)
        migu = Migu(cfg.migu, model) if name == "migu" else None
        backend.setup(model, lambda s: 1.0)
        if init_state is None:
            init_state = backend.full_state_dict()
        engines[name] = (backend, migu)
    backend = engines["plain"][0]
    rank, world = backend.rank, backend.world_size
    t = cfg.train
    gen = torch.Generator().manual_seed(1 + rank)
    batches = [
        torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len), generator=gen)
        for _ in range(8)
    ]

    def one_step(name: str, i: int) -> None:
        b, migu = engines[name]
        for j in range(t.grad_accum):
            x = batches[(i * t.grad_accum + j) % len(batches)]
            b.forward_backward({"input_ids": x, "labels": x})
        if migu is not None:
            migu.apply(b, i, None)
            migu.reset()
        b.step()

    def timed_block(name: str, start: int) -> list[float]:
        times = []
        for i in range(start, start + args.steps):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            torch.distributed.barrier()
            t0 = time.perf_counter()
            one_step(name, i)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times

    for name in engines:
        for i in range(args.warmup):
            one_step(name, i)
    times: dict[str, list[float]] = {"plain": [], "migu": []}
    for r in range(args.rounds):
        order = ("plain", "migu") if r % 2 == 0 else ("migu", "plain")
        for name in order:
            times[name] += timed_block(name, args.warmup + r * args.steps)

    # Every rank's view: take the slowest rank per step (that is the step time).
    per_rank = [None] * world
    torch.distributed.all_gather_object(per_rank, times)
    step_times = {
        k: [max(rt[k][i] for rt in per_rank) for i in range(len(times[k]))] for k in times
    }
    med = {k: statistics.median(v) for k, v in step_times.items()}
    tokens_per_step = t.micro_batch_size * t.grad_accum * t.seq_len * world
    n_params = sum(v.numel() for v in init_state.values()) if init_state else 0
    migu = engines["migu"][1]
    stat_floats = sum(layer.stat.numel() for layer in migu.layers)
    bf16 = use_bf16(cfg)
    # Bytes of gradient reduced per step: DeepSpeed reduces bf16 gradients in bf16, FSDP2's
    # mixed-precision policy here reduces in fp32.
    grad_bytes = n_params * (2 if bf16 and cfg.engine.backend == "deepspeed" else 4)
    if torch.cuda.is_available():
        peak_mem = torch.cuda.max_memory_allocated() / 2**20
        hardware = torch.cuda.get_device_name()
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
        hardware = f"{platform.processor() or platform.machine()} x{os.cpu_count()} CPU cores"
    mems = [None] * world
    torch.distributed.all_gather_object(mems, peak_mem)
    if rank == 0:
        tps = tokens_per_step / med["plain"]
        out = {
            "bench": "train_migu_overhead",
            "hardware": hardware,
            "world_size": world,
            "params": n_params,
            "model": {
                "hidden": cfg.model.hidden_size,
                "layers": cfg.model.num_layers,
                "vocab": cfg.model.vocab_size,
            },  # fmt: skip
            "backend": cfg.engine.backend,
            "zero_stage": cfg.engine.zero_stage if cfg.engine.backend == "deepspeed" else None,
            "compile": cfg.model.compile,
            "activation_checkpointing": cfg.model.activation_checkpointing,
            "seq_len": t.seq_len,
            "precision": "bf16" if bf16 else "fp32",
            "tokens_per_step": tokens_per_step,
            "steps_timed_each": len(step_times["plain"]),
            "step_s_plain": round(med["plain"], 5),
            "step_s_migu": round(med["migu"], 5),
            "migu_overhead_pct": round(100 * (med["migu"] / med["plain"] - 1), 2),
            "tokens_per_s_plain": round(tps, 1),
            "tokens_per_s_migu": round(tokens_per_step / med["migu"], 1),
            "migu_allreduce_bytes_per_step": stat_floats * 4,
            "grad_bytes_per_step": grad_bytes,
            "migu_comm_vs_grad": round(stat_floats * 4 / grad_bytes, 6),
            "peak_mem_mib_per_rank": [round(m, 1) for m in mems],
        }
        if args.peak_tflops:
            peak = args.peak_tflops * 1e12 * world
            out["peak_tflops_per_device"] = args.peak_tflops
            out["mfu_pct_plain"] = round(100 * fpt * tps / peak, 2)
            out["mfu_pct_migu"] = round(100 * fpt * tokens_per_step / med["migu"] / peak, 2)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
    if "RANK" in os.environ:
        import torch.distributed as dist

        dist.destroy_process_group()  # not left to interpreter shutdown (gloo can abort there)
