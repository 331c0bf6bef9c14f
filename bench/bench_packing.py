"""What keeping packed documents apart costs: forward + backward of packed rows with plain
causal attention and with the document mask (``data.cross_document_attention: false``,
``train/packing.py``), side by side in one run.

    python bench/bench_packing.py                               # SmolLM2-135M, sdpa, 1 x 512
    python bench/bench_packing.py --impls sdpa,eager --seq-len 512
    python bench/bench_packing.py --model tiny                  # the 2-layer test Llama

One process, one model per attention kernel, the same batches for every variant; blocks of
steps alternate between plain and masked so that drift on a shared machine hits both. The
masked step includes building the mask from the document ids (as the trainer does per
micro-batch). Documents are random lengths (geometric, mean ``--mean-doc``), packed back to
back; the mask's cost does not depend on where the boundaries fall (a dense (B, 1, T, T)
mask either way). Prints one JSON line: per kernel, median step time and tokens/s of each
variant and the masked/plain overhead, plus the machine load before and after.

Also the attention operation alone at the model's shape (``torch.nn.functional.
scaled_dot_product_attention``, forward + backward, one layer): ``is_causal=True`` against the
boolean document mask, ``--op-reps`` alternating repetitions each; on a loaded machine this
figure is far steadier than whole steps, of which attention is a small part on CPU.
``--rounds 0`` measures only that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2", help="smollm2 (cached HF directory) or tiny")
    p.add_argument("--impls", default="sdpa", help="comma-separated attention kernels")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mean-doc", type=int, default=200, help="mean document length, tokens")
    p.add_argument("--rounds", type=int, default=3, help="alternating blocks per variant")
    p.add_argument("--steps", type=int, default=2, help="steps per block")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--op-reps", type=int, default=30, help="attention-only repetitions")
    return p.parse_args()


def load_model(name: str, impl: str):
    import torch
    from transformers import AutoModelForCausalLM

    from tests.migu_common import tiny_config
    from train.model import build_model

    if name == "tiny":
        cfg = tiny_config(
            [f"model.attn_implementation={impl}", "model.max_position_embeddings=4096"]
        )
        return build_model(cfg.model, seed=0)
    path = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "get_model.py"), "smollm2-135m"],
        capture_output=True, text=True, check=True,
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=impl
    )
    return model.train()


def attention_op(config, docs, reps: int) -> dict[str, float]:
    """One layer's attention, forward + backward, at the model's heads and head size: median
    seconds with ``is_causal`` and with the document mask (as transformers' sdpa gets it:
    query heads, keys and values repeated to them)."""
    import torch
    import torch.nn.functional as F

    from train.packing import block_causal_mask

    b, t = docs.shape
    h = config.num_attention_heads
    d = config.hidden_size // h
    q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
    mask = block_causal_mask(docs)
    times: dict[str, list[float]] = {"causal": [], "masked": []}
    for i in range(reps + 2):
        for variant in ("causal", "masked"):
            t0 = time.perf_counter()
            if variant == "causal":
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out.sum().backward()
            if i >= 2:  # the first two of each are warm-up
                times[variant].append(time.perf_counter() - t0)
    med = {v: statistics.median(x) for v, x in times.items()}
    return {
        "heads": h,
        "head_dim": d,
        "causal_s": round(med["causal"], 5),
        "masked_s": round(med["masked"], 5),
        "masked_overhead": round(med["masked"] / med["causal"] - 1, 4),
        "mask_bytes": mask.numel(),
    }


def train_step(model, ids, docs, masking) -> float:
    """Seconds of one forward + backward; with ``masking``, building the mask included."""
    t0 = time.perf_counter()
    extra = masking.inputs(docs, "cpu") if masking is not None else {}
    model(input_ids=ids, labels=ids, **extra).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    args = parse()
    import torch

    from train.packing import DocumentMasking

    load_start = os.getloadavg()
    g = torch.Generator().manual_seed(0)
    t, b = args.seq_len, args.batch
    # Document ids: geometric lengths, a new document where a coin with p = 1/mean_doc lands.
    starts = torch.rand((b, t), generator=g) < 1.0 / args.mean_doc
    starts[:, 0] = True
    docs = starts.long().cumsum(-1) - 1
    result: dict = {
        "model": args.model,
        "seq_len": t,
        "batch": b,
        "documents_per_row": float(starts.sum(-1).float().mean()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_1m_start": load_start[0],
        "kernels": {},
    }
    for impl in args.impls.split(","):
        model = load_model(args.model, impl)
        ids = torch.randint(0, model.config.vocab_size, (b, t), generator=g)
        masking = DocumentMasking.for_model(model.config)
        figures: dict = {}
        if impl == "sdpa":
            figures["attention_op"] = attention_op(model.config, docs, args.op_reps)
        if args.rounds:
            times: dict[str, list[float]] = {"plain": [], "masked": []}
            for _ in range(args.warmup):
                train_step(model, ids, docs, None), train_step(model, ids, docs, masking)
            for _ in range(args.rounds):
                for variant in ("plain", "masked"):
                    use = masking if variant == "masked" else None
                    times[variant] += [train_step(model, ids, docs, use) for _ in range(args.steps)]
            med = {v: statistics.median(x) for v, x in times.items()}
            figures |= {
                **{f"step_s_{v}": round(s, 4) for v, s in med.items()},
                **{f"tokens_per_s_{v}": round(b * t / s, 1) for v, s in med.items()},
                "masked_overhead": round(med["masked"] / med["plain"] - 1, 4),
                "timed_steps_per_variant": len(times["plain"]),
            }
        result["kernels"][impl] = figures
    result["load_1m_end"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
