"""Training throughput and MIGU overhead, measured side by side in one run.

    python bench/bench_train.py                      # tiny model, 2 CPU ranks (relaunches itself)
    python bench/bench_train.py engine.backend=fsdp2 model.compile=true   # any config override
    python bench/bench_train.py --nproc 1 --peak-tflops 989 model.hidden_size=2048 ...  # GPU

    python bench/bench_train.py --precisions fp32,bf16 train.micro_batch_size=1 \
        train.grad_accum=1 model.init_from=$(python scripts/get_model.py smollm2-135m) \
        engine.deepspeed_config=configs/deepspeed/zero3-cpu.json     # real model, both dtypes

One engine of the configured backend (DeepSpeed ZeRO-3 by default, through the same backend
seam as training) per precision (``--precisions fp32,bf16``: two), on the same batches, with
blocks of steps alternating between plain steps (MIGU's hooks idle, no masking) and MIGU
steps. Blocks of steps rotate through (precision, plain | MIGU) so that drift on a shared
machine hits all of them equally. Prints one JSON line: step time with and without MIGU,
overhead, tokens/s, MFU (when --peak-tflops is given; FLOPs per token as logged in training, PaLM's
6·N + 12·L·d·T), MIGU's all-reduce bytes vs the gradient bytes per step,
and peak memory per rank; with several precisions these figures per precision under
``precisions``, and bf16's speed-up over fp32.
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
    p.add_argument(
        "--precisions",
        default="",
        help="comma-separated engine.precision values measured side by side (e.g. fp32,bf16); "
        "default: the config's",
    )
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
    from migu_dist.parallelize import parallelize
    from train.config import load_config
    from train.model import build_model, flops_per_token

    base = [
        "train.micro_batch_size=4", "train.grad_accum=2", "train.seq_len=128",
        "model.vocab_size=32000", "model.hidden_size=64", "model.num_layers=2",
        "model.intermediate_size=176", "model.num_heads=4",
        "data.phases=[{name: p, domains: {d: 1}}]",
        "data.domains={d: {train: [data/demo/code/heldout.jsonl]}}",
    ]  # fmt: skip
    load_at_start = os.getloadavg()[0]
    world_size = int(os.environ["WORLD_SIZE"])
    cfg = load_config(None, base + args.overrides, world_size=world_size)
    precisions = args.precisions.split(",") if args.precisions else [cfg.engine.precision]
    torch.manual_seed(0)
    # One engine per precision, its MIGU attached throughout: "plain" steps switch MIGU's
    # statistics off (its hooks return at once) and do not mask, "migu" steps are MIGU's.
    # Step time does not depend on the weights' values, and one engine per precision halves
    # the memory (a 135M model's four engines do not fit a 2-core machine's RAM).
    engines: dict[str, tuple] = {}
    cfgs = {}
    for precision in precisions:
        over = [*base, *args.overrides, f"engine.precision={precision}"]
        cfgs[precision] = c = load_config(None, over, world_size=world_size)
        c.migu.enabled = True
        backend = build_backend(c.backend_config())
        model = build_model(
            c.model, seed=0, dtype=backend.param_dtype, init_context=backend.init_context()
        )
        m = c.model
        parallelize(model, activation_checkpointing=m.activation_checkpointing, compile=m.compile)
        fpt = flops_per_token(model, c.train.seq_len)
        migu = Migu(c.migu, model)
        backend.setup(model, lambda s: 1.0)
        engines[precision] = (backend, migu)
    # Tied weights count once; a ZeRO-3 partitioned parameter counts whole.
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    rank, world = backend.rank, backend.world_size
    t = cfg.train
    gen = torch.Generator().manual_seed(1 + rank)
    batches = [
        torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len), generator=gen)
        for _ in range(8)
    ]

    def one_step(key: tuple[str, str], i: int) -> None:
        precision, mode = key
        b, migu = engines[precision]
        migu.collecting = mode == "migu"
        for j in range(t.grad_accum):
            x = batches[(i * t.grad_accum + j) % len(batches)]
            b.forward_backward({"input_ids": x, "labels": x})
        if mode == "migu":
            migu.apply(b, i, None)
            migu.reset()
        b.step()

    def timed_block(key: tuple[str, str], start: int) -> list[float]:
        times = []
        for i in range(start, start + args.steps):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            torch.distributed.barrier()
            t0 = time.perf_counter()
            one_step(key, i)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times

    order = [(p, mode) for p in precisions for mode in ("plain", "migu")]
    for key in order:
        for i in range(args.warmup):
            one_step(key, i)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in order}
    for r in range(args.rounds):
        # Rotate the starting engine every round: none is always first after a pause.
        for key in order[r % len(order) :] + order[: r % len(order)]:
            times[key] += timed_block(key, args.warmup + r * args.steps)

    # Every rank's view: take the slowest rank per step (that is the step time).
    per_rank = [None] * world
    torch.distributed.all_gather_object(per_rank, list(times.values()))
    med = {
        key: statistics.median(max(rt[k][i] for rt in per_rank) for i in range(len(times[key])))
        for k, key in enumerate(times)
    }
    tokens_per_step = t.micro_batch_size * t.grad_accum * t.seq_len * world
    stat_floats = sum(layer.stat.numel() for layer in migu.layers)

    def figures(precision: str) -> dict:
        """Step times, MIGU overhead, tokens/s, communication (and MFU) of one precision."""
        c = cfgs[precision]
        plain, with_migu = med[precision, "plain"], med[precision, "migu"]
        bf16 = use_bf16(c.engine)
        # Bytes of gradient reduced per step: DeepSpeed reduces bf16 gradients in bf16, FSDP2's
        # mixed-precision policy here reduces in fp32.
        grad_bytes = n_params * (2 if bf16 and c.engine.backend == "deepspeed" else 4)
        out = {
            "precision": "bf16" if bf16 else "fp32",
            "step_s_plain": round(plain, 5),
            "step_s_migu": round(with_migu, 5),
            "migu_overhead_pct": round(100 * (with_migu / plain - 1), 2),
            "tokens_per_s_plain": round(tokens_per_step / plain, 1),
            "tokens_per_s_migu": round(tokens_per_step / with_migu, 1),
            "migu_allreduce_bytes_per_step": stat_floats * 4,
            "grad_bytes_per_step": grad_bytes,
            "migu_comm_vs_grad": round(stat_floats * 4 / grad_bytes, 6),
        }
        if args.peak_tflops:
            peak = args.peak_tflops * 1e12 * world
            out["peak_tflops_per_device"] = args.peak_tflops
            out["mfu_pct_plain"] = round(100 * fpt * tokens_per_step / plain / peak, 2)
            out["mfu_pct_migu"] = round(100 * fpt * tokens_per_step / with_migu / peak, 2)
        return out

    if torch.cuda.is_available():
        peak_mem = torch.cuda.max_memory_allocated() / 2**20
        hardware = torch.cuda.get_device_name()
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
        hardware = f"{platform.processor() or platform.machine()} x{os.cpu_count()} CPU cores"
    mems = [None] * world
    torch.distributed.all_gather_object(mems, peak_mem)
    if rank == 0:
        out = {
            "bench": "train_migu_overhead",
            "hardware": hardware,
            "load_avg_1m": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],  # start, end
            "world_size": world,
            "params": n_params,
            "model": {
                "init_from": cfg.model.init_from,
                "hidden": model.config.hidden_size,
                "layers": model.config.num_hidden_layers,
                "vocab": model.config.vocab_size,
            },  # fmt: skip
            "backend": cfg.engine.backend,
            "zero_stage": cfg.engine.zero_stage if cfg.engine.backend == "deepspeed" else None,
            "compile": cfg.model.compile,
            "activation_checkpointing": cfg.model.activation_checkpointing,
            "seq_len": t.seq_len,
            "tokens_per_step": tokens_per_step,
            "steps_timed_each": args.rounds * args.steps,
        }
        if len(precisions) == 1:
            out.update(figures(precisions[0]))
        else:
            out["precisions"] = {p: figures(p) for p in precisions}
            if {"fp32", "bf16"} <= set(precisions):
                out["bf16_speedup_plain"] = round(med["fp32", "plain"] / med["bf16", "plain"], 3)
        out["peak_mem_mib_per_rank"] = [round(m, 1) for m in mems]
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
    if "RANK" in os.environ:
        import torch.distributed as dist

        dist.destroy_process_group()  # not left to interpreter shutdown (gloo can abort there)
