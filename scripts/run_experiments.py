"""Run the continual-learning comparison: one shared pre-training, then every method.

    python scripts/run_experiments.py            # full run, writes docs/experiments/ + README
    python scripts/run_experiments.py --quick    # smoke-sized, writes runs/experiments-quick/
    python scripts/run_experiments.py --only plain migu_grad --reuse-base

Stage 1 trains configs/experiments/base.yaml (literature + speeches from scratch) and exports
it as a Hugging Face directory. Stage 2 continually pre-trains that model on legal, then
science, once per method, configs/experiments/<method>.yaml with model.init_from set to the
export: the files differ only in their method section (same data, steps, schedule, seed).
Each run uses ``--nproc`` ranks (torchrun, DeepSpeed ZeRO-3), one after the other.

The report treats the pre-training as phase 0 of one three-phase run (general -> legal ->
science): the base run's evaluations give the random-init baseline (for FWT) and the row after
phase 0 (the continual runs' own "initial" row is the same model), so BWT counts forgetting of
literature and speeches as well as of legal, with the GEM definitions of train/cl_metrics.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train import cl_metrics, plots  # noqa: E402
from train.evaluate import build_report, load_jsonl  # noqa: E402

EXP = ROOT / "configs" / "experiments"
METHODS = ["plain", "migu_grad", "migu_update", "migu_random", "replay", "lora", "lora_migu", "l2"]
PHASES = ["general", "legal", "science"]
PHASE_DOMAINS = {"general": ["literature", "speeches"], "legal": ["legal"], "science": ["science"]}
COMMON = ["logging.wandb=false", "logging.progress_bar=false"]
# --quick: the same pipeline at smoke size (minutes), for checking the machinery only.
QUICK_BASE = ["train.max_steps=30", "data.phases.0.steps=30", "optim.warmup_steps=3"]
QUICK_CPT = ["train.max_steps=16", "data.phases.0.steps=8", "data.phases.1.steps=8"]
QUICK_EVAL = ["eval.heldout_tokens=1024", "eval.tasks.0.limit=20", "eval.tasks.1.limit=20",
              "eval.tasks.2.limit=20"]  # fmt: skip
README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


def command(nproc: int, config: Path, overrides: list[str]) -> list[str]:
    script = [str(ROOT / "launch" / "cpt.py"), "--config", str(config.relative_to(ROOT))]
    if nproc == 1:
        return [sys.executable, *script, *overrides]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, f"--nproc_per_node={nproc}", *script, *overrides]


def train(name: str, nproc: int, config: Path, overrides: list[str], out: Path) -> float:
    """One run from scratch into ``out``; returns its wall time in seconds."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = command(nproc, config, [f"output_dir={out.relative_to(ROOT)}", *COMMON, *overrides])
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.perf_counter()
    with open(out / "train.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (out / "train.log").read_text()[-3000:]
        raise SystemExit(
            f"[{name}] failed (exit {proc.returncode}); end of {out}/train.log:\n{tail}"
        )
    print(f"[{name}] done in {seconds:.0f} s", flush=True)
    return seconds


def combined_report(base: Path, run: Path) -> dict:
    """The three-phase report: base evaluations (initial, after general) + the run's phase
    ends, re-indexed as phases 1 and 2."""
    rows = [r for r in load_jsonl(base / "evals.jsonl") if r["phase_index"] in (-1, 0)]
    for r in load_jsonl(run / "evals.jsonl"):
        if r["phase_index"] >= 0 and r.get("phase_end"):
            rows.append({**r, "phase_index": r["phase_index"] + 1})
    return build_report(rows, PHASES, PHASE_DOMAINS)


def summary(rep: dict) -> dict[str, float | None]:
    ppl, acc = rep["ppl"], rep.get("acc", {})
    final = ppl["final"]
    general = [final.get(d) for d in PHASE_DOMAINS["general"]]
    return {
        "avg_ppl": ppl["average"],
        "bwt": ppl["bwt"],
        "fwt": ppl["fwt"],
        "general_ppl": sum(general) / len(general) if all(general) else None,
        "legal_ppl": final.get("legal"),
        "science_ppl": final.get("science"),
        "acc": acc.get("average"),
    }


COLUMNS = [
    ("avg_ppl", "avg ppl ↓", "{:.1f}"),
    ("bwt", "BWT (nats) ↑", "{:+.3f}"),
    ("fwt", "FWT (nats) ↑", "{:+.3f}"),
    ("general_ppl", "lit+speeches ppl ↓", "{:.1f}"),
    ("legal_ppl", "legal ppl ↓", "{:.1f}"),
    ("science_ppl", "science ppl ↓", "{:.1f}"),
    ("acc", "task acc ↑", "{:.3f}"),
    ("seconds", "wall s", "{:.0f}"),
]


def markdown_table(results: dict[str, dict]) -> str:
    head = "| method | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, res in results.items():
        cells = [fmt.format(res[k]) if res.get(k) is not None else "-" for k, _, fmt in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_forgetting(path: Path, reports: dict[str, dict]) -> Path:
    """Per method: mean perplexity of the pre-training domains and of legal at each phase end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, (title, doms) in zip(
        axes,
        [("literature + speeches (pre-training)", ["literature", "speeches"]),
         ("legal (CPT phase 1)", ["legal"]), ("science (CPT phase 2)", ["science"])],
    ):  # fmt: skip
        for name, rep in reports.items():
            cols = [rep["domains"].index(d) for d in doms]
            ys = [sum(row[c] for c in cols) / len(cols) for row in rep["ppl"]["matrix"]]
            ax.plot(PHASES, ys, marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel("after phase")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out perplexity (log)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(out_dir: Path, results: dict, reports: dict, meta: dict) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    (out_dir / "results.json").write_text(
        json.dumps({"meta": meta, "results": results, "reports": reports}, indent=2) + "\n"
    )
    plot_forgetting(out_dir / "forgetting.png", reports)
    plots.plot_compare(out_dir / "compare.png", reports)
    full = cl_metrics.format_table(list(reports), cl_metrics.compare_rows(reports))
    (out_dir / "results.md").write_text(
        f"# Continual-learning baselines: results\n\n{meta['description']}\n\n"
        f"Command: `{meta['command']}` ({meta['world']} ranks per run, total wall time "
        f"{meta['total_seconds'] / 60:.1f} min on {meta['machine']}).\n\n{table}\n\n"
        "![perplexity per domain group after each phase](forgetting.png)\n\n"
        "All metrics of every run (`launch/compare.py` format):\n\n```\n" + full + "\n```\n"
    )
    return table


def update_readme(table: str, meta: dict) -> None:
    path = ROOT / "README.md"
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        print(f"README.md has no {README_BEGIN} ... {README_END} block; table not inserted.")
        return
    block = (
        f"{README_BEGIN}\n{table}\n\n_{meta['world']} ranks per run, "
        f"{meta['total_seconds'] / 60:.1f} min in total on {meta['machine']}._\n{README_END}"
    )
    pattern = re.escape(README_BEGIN) + ".*?" + re.escape(README_END)
    path.write_text(re.sub(pattern, lambda _: block, text, flags=re.S))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke-sized runs (checks the pipeline)")
    ap.add_argument("--only", nargs="+", choices=METHODS, help="run only these methods")
    ap.add_argument("--reuse-base", action="store_true", help="keep an existing stage-1 run")
    ap.add_argument("--nproc", type=int, default=2, help="ranks per run (default %(default)s)")
    args = ap.parse_args(argv)

    root = ROOT / "runs" / ("experiments-quick" if args.quick else "experiments")
    out_dir = root / "report" if args.quick else ROOT / "docs" / "experiments"
    quick_eval = QUICK_EVAL if args.quick else []
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    base = root / "base"
    base_hf = base / "hf" / "general"
    if not (args.reuse_base and (base_hf / "config.json").is_file()):
        over = (QUICK_BASE if args.quick else []) + quick_eval
        seconds["base"] = train("base", args.nproc, EXP / "base.yaml", over, base)
        shutil.rmtree(base / "checkpoints", ignore_errors=True)
    for name in args.only or METHODS:
        over = [f"model.init_from={base_hf.relative_to(ROOT)}", *(QUICK_CPT if args.quick else [])]
        seconds[name] = train(
            name, args.nproc, EXP / f"{name}.yaml", over + quick_eval, root / name
        )
        shutil.rmtree(root / name / "checkpoints", ignore_errors=True)

    reports, results = {}, {}
    for name in METHODS:
        if (root / name / "evals.jsonl").is_file():
            reports[name] = combined_report(base, root / name)
            results[name] = {**summary(reports[name]), "seconds": seconds.get(name)}
    cmd = "python scripts/run_experiments.py" + (" --quick" if args.quick else "")
    meta = {
        "command": cmd,
        "world": args.nproc,
        "total_seconds": time.perf_counter() - t_start,
        "seconds": seconds,
        "machine": f"{os.cpu_count()} CPU cores",
        "description": (
            "A 4-layer Llama (hidden 128, 32k vocabulary) pre-trained on literature + speeches "
            "(configs/experiments/base.yaml), then continually pre-trained on legal, then "
            "science, by each method (configs/experiments/<method>.yaml). Perplexity "
            "on held-out text of the four domains after the last phase; BWT/FWT in nats/token "
            "of -ln(ppl) over the three phases general -> legal -> science (negative BWT = "
            "forgetting); task accuracy = mean of arc_easy, sciq, sst2 (zero-shot)."
        ),
    }
    table = write_outputs(out_dir, results, reports, meta)
    print(table)
    print(f"wrote {out_dir}; total {meta['total_seconds'] / 60:.1f} min")
    if not args.quick and not args.only:
        update_readme(table, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
