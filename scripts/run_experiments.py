"""The continual-learning experiment on a real pretrained model, with seeds and controls.

    python scripts/run_experiments.py                # everything; resumable: rerun to continue
    python scripts/run_experiments.py --commit       # also git-commit each finished run's file
    python scripts/run_experiments.py --only plain migu_grad     # some variants only
    python scripts/run_experiments.py --report       # rebuild the report from the result files
    python scripts/run_experiments.py --quick        # smoke size: the whole pipeline in minutes

What runs. SmolLM2-135M (``scripts/get_model.py smollm2-135m``; its tokenizer) is continually
pre-trained on legal (phase 1), then science (phase 2), by every variant below:
``configs/experiments/real/base.yaml`` plus the variant's dotted overrides (``VARIANTS``).
Every run sees the same training tokens (30 + 30 steps of 2 ranks x 2 x 128 = 512 tokens;
replay's batches include the replayed share), weight decay 0 (the reference MIGU recipe),
constant LR 5e-4 after 5 warm-up steps, ZeRO-3 on 2 ranks (torchrun) in bf16 with fp32
master weights (``--precision``, see Precision). Evaluation:
held-out perplexity of literature and speeches (general: what the model knew, never trained
on here), legal and science (4,096 tokens each) at each phase end; zero-shot accuracy on
arc_easy and piqa (all 250 shipped items each) at the end. The starting model is evaluated
once, by the first run, and shared (``initial.json``).

Tasks: SmolLM2-135M on all 250 shipped items (in-job scorer, one process, fp32): arc_easy
acc 0.508 / acc_norm 0.428 (chance 0.25), piqa 0.584 / 0.62 (chance 0.5), sst2 0.508 (chance
0.5), boolq 0.436 (below chance); sciq 0.76-0.80 on its first 50-100 items (chance 0.25).
sst2 and boolq are at chance; sciq is above chance but its long contexts cost 2.7x
arc_easy's (86k tokens for 250 items against 32k; piqa 16k), so arc_easy and piqa it is. The
2-rank in-job evaluation of the starting model gave the same arc_easy and piqa figures.

Variants (``train.seed`` sets the data order: each new domain's two shards are mixture
components drawn per row, and the random mask): plain (LR 5e-4), migu_grad / migu_update /
migu_random (keep 0.3), plain_lr1e-4 and migu_lr1e-4 (MIGU grad at plain's better LR, added
after plain_lr1e-4 was measured: it forgot nothing and learned more than every method at 5e-4),
3 seeds each; with 1 seed: plain_lrmatch (its LR = 5e-4 x the ratio of migu_grad's to plain's
measured weight change over the run: Adam's step is proportional to the LR, so this plain run
moves the weights about as far as MIGU does), the keep-ratio sweep migu_keep0.1 / 0.6 / 1.0
(0.3 is migu_grad), replay (legal + 5% literature + 5% speeches, then science with 10% replay),
l2 (strength 0.1 to each phase's start, not tuned), lora and lora_migu (r 8, alpha 16, same
LR). 26 runs. The comparison that needs error bars runs first (``CORE``, in this order: plain,
migu_grad, plain_lrmatch, plain_lr1e-4, migu_lr1e-4, migu_random, migu_update; all seed-1 runs,
then seeds 2 and 3), then the sweep and the other baselines, so a partial experiment already
answers the main question.

Sizing. Measured (one process, one thread, fp32, SmolLM2-135M): forward+backward of 512
tokens 5.2 CPU-s, forward 1.6 CPU-s; issue 14: 8.5 s per step of 2 ranks x 4 x 128 tokens
on ZeRO-3, so ~3 s of each step is ZeRO-3 and optimizer overhead that a smaller batch does
not shrink. Per run: ~40 s start-up, 60 steps x ~5.9 s (2 x 128 per rank) = 350 s, a
perplexity evaluation (16k tokens, ~26 s) after phase 1 and perplexity + tasks (64k tokens,
~100 s) at the end, ~50 s of checkpoints (every 10 steps) and weight-change measurement:
~570 s. 21 runs + the initial evaluation: ~3.3 h on 2 otherwise idle cores. The choices
that fit it near the 3 h budget: 512 tokens per step (a 1,024-token batch would cost ~4.2 h:
the step time, not the token count, sets Adam's step size, and 30 steps at LR 5e-4 forget
measurably), tasks only at the start and the end (``eval.tasks_at``), two cheap tasks.
Precision: on this CPU (AMD EPYC with avx512_bf16) bf16 is faster, one process, one thread:
forward+backward of 512 tokens 2.05 CPU-s against 5.2 in fp32 (2.5x), forward 0.56 against
1.6 (2.9x); the runner's default is therefore ``--precision bf16`` (bf16 weights and
activations, fp32 master weights and optimizer state; the evaluation computes its losses in
fp32 from the bf16 logits). Measured in bf16 on 2 ranks: a run takes about 1,000 s when the
two cores are shared with other work (75 tokens/s per step when they are not, 38-45 when
they are). An experiment is one setup: the runner
refuses to add runs of another model, precision or size to an existing ``--out``.

Resuming. A finished run leaves ``<out>/<run>.json`` (its phase-end evaluations, weight
changes, seconds, machine) and is never redone; its checkpoints are then deleted. An
interrupted run (SIGTERM/SIGINT to this script is passed on to the workers, which checkpoint
at the next step boundary) resumes from its latest checkpoint (``resume: auto``, checkpoints
every 10 steps). ``--commit`` commits each result file as it is written (that file only), so
the experiment can continue on a fresh machine from the committed files.

Report (``--out``, default ``docs/experiments/real``): ``results.md`` (mean +- std over seeds
per metric, differences from plain with whether each exceeds the seed spread, see
``train/experiment.py``), ``results.json``, ``forgetting.png`` (general-domain perplexity over
the phases, one line per variant, seed bands) and ``sweep.png`` (forgetting against new-domain
perplexity: the keep-ratio sweep, plain at its LRs, replay); the README's results block.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train import experiment, plots  # noqa: E402
from train.evaluate import load_jsonl  # noqa: E402

BASE = ROOT / "configs" / "experiments" / "real" / "base.yaml"
PHASES = {"legal": ["legal"], "science": ["science"]}  # phase -> the new domains it trains
GENERAL = ["literature", "speeches"]  # what the model knew; never trained on here
LR = 5e-4  # base.yaml's optim.lr
SEEDS = (1, 2, 3)
MIGU = ["migu.enabled=true", "migu.keep_ratio=0.3"]
README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"
# --quick: the same pipeline at smoke size, to check the machinery only.
QUICK = [
    "train.max_steps=4", "data.phases.0.steps=2", "data.phases.1.steps=2",
    "optim.warmup_steps=1", "checkpoint.every_steps=1", "eval.heldout_tokens=256",
    "eval.tasks.0.limit=8", "eval.tasks.1.limit=8",
]  # fmt: skip
QUICK_VARIANTS, QUICK_SEEDS = ["plain", "migu_grad"], 2


@dataclass
class Variant:
    """One row of the table: base.yaml + these overrides, run with these seeds."""

    what: str
    overrides: list[str] = field(default_factory=list)
    seeds: tuple[int, ...] = (1,)
    lr_match: bool = False
    """The LR is set from migu_grad's and plain's measured weight change (module doc)."""


VARIANTS: dict[str, Variant] = {
    "plain": Variant("plain CPT, LR 5e-4", [], SEEDS),
    "migu_grad": Variant("MIGU, gradients masked (reference)", [*MIGU, "migu.mode=grad"], SEEDS),
    "migu_update": Variant("MIGU, masked rows not updated", [*MIGU, "migu.mode=update"], SEEDS),
    "migu_random": Variant("random row mask, keep 0.3", [*MIGU, "migu.selection=random"], SEEDS),
    "plain_lrmatch": Variant("plain at MIGU's weight change", lr_match=True),
    "plain_lr1e-4": Variant("plain CPT, LR 1e-4", ["optim.lr=1e-4"], SEEDS),
    # Plain at 1e-4 measured no forgetting and better new-domain perplexity than every
    # method at 5e-4: is MIGU still of use at the better LR?
    "migu_lr1e-4": Variant("MIGU grad, LR 1e-4", [*MIGU, "migu.mode=grad", "optim.lr=1e-4"], SEEDS),
    **{
        f"migu_keep{k}": Variant(f"MIGU grad, keep {k}", [*MIGU, f"migu.keep_ratio={k}"])
        for k in (0.1, 0.6, 1.0)
    },
    "replay": Variant(
        "replay 10% of earlier domains",
        [
            "data.phases.0.domains={legal: 0.45, legal_b: 0.45, literature: 0.05, speeches: 0.05}",
            "data.phases.1.replay=0.1",
        ],
    ),  # fmt: skip
    "l2": Variant(
        "L2 to the phase start, 0.1",
        [
            "regularization.kind=l2",
            "regularization.strength=0.1",
            "regularization.phases=[legal, science]",
        ],
    ),  # fmt: skip
    "lora": Variant("LoRA r 8 (adapters only)", ["lora.enabled=true"]),
    "lora_migu": Variant("LoRA r 8 + MIGU grad", ["lora.enabled=true", *MIGU]),
}
# MIGU against plain at its LRs and the random-mask control: run first (``plan``).
CORE = [
    "plain", "migu_grad", "plain_lrmatch", "plain_lr1e-4", "migu_lr1e-4", "migu_random",
    "migu_update",
]  # fmt: skip
SWEEP = {0.1: "migu_keep0.1", 0.3: "migu_grad", 0.6: "migu_keep0.6", 1.0: "migu_keep1.0"}
PLAIN_LRS = ["plain_lr1e-4", "plain_lrmatch", "plain"]


@dataclass
class Run:
    variant: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant}-s{self.seed}"


def plan(variants: list[str], max_seeds: int) -> list[Run]:
    """Every (variant, seed): the comparison that needs seeds first (``CORE``, seed-major:
    all of its seed-1 runs, then seed 2, then seed 3), then the other variants. A partial
    experiment then already answers the main question with error bars."""
    runs = [Run(v, s) for s in SEEDS for v in variants if s in VARIANTS[v].seeds[:max_seeds]]

    def key(r: Run) -> tuple[int, int, int]:
        core = r.variant in CORE
        return (0, r.seed, CORE.index(r.variant)) if core else (1, 0, 0)  # stable otherwise

    return sorted(runs, key=key)


# --------------------------------------------------------------------------------------
# Running one training run, resumably
# --------------------------------------------------------------------------------------


class Interrupted(SystemExit):
    pass


def machine() -> dict[str, Any]:
    """CPU model, cores and load average now."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load": [round(x, 2) for x in os.getloadavg()]}


def launch(cmd: list[str], log_path: Path) -> int:
    """Run ``cmd`` (torchrun or python) appending to ``log_path``. SIGTERM/SIGINT to this
    script goes to the training workers first (they checkpoint at the next step boundary and
    exit 0; torchrun then exits 0), then raises :class:`Interrupted`."""
    import psutil

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    got: list[int] = []
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        # its own session: a Ctrl-C in the terminal reaches this script only, which passes
        # it to the workers (a SIGINT to torchrun itself would make it stop them hard)
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

        def forward(signum, frame):
            got.append(signum)
            try:
                parent = psutil.Process(proc.pid)
                targets = parent.children() or [parent]  # torchrun's workers, or python itself
            except psutil.NoSuchProcess:
                return
            for p in targets:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(signum)

        old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            rc = proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    if got:
        raise Interrupted(
            f"interrupted (signal {got[0]}); the run checkpointed: rerun the same command to "
            "continue where it stopped."
        )
    return rc


def command(nproc: int, overrides: list[str]) -> list[str]:
    script = [str(ROOT / "launch" / "cpt.py"), "--config", str(BASE.relative_to(ROOT))]
    if nproc == 1:
        return [sys.executable, *script, *overrides]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, f"--nproc_per_node={nproc}", *script, *overrides]


def matched_lr(out: Path) -> float:
    """5e-4 x (migu_grad's / plain's total weight change), means over the seeds finished."""

    def dw(variant: str) -> float:
        files = sorted(out.glob(f"{variant}-s*.json"))
        if not files:
            raise SystemExit(
                f"plain_lrmatch needs a finished {variant} run ({out}/{variant}-s1.json) to "
                f"measure its weight change; run {variant} first (e.g. --only plain migu_grad "
                "plain_lrmatch)."
            )
        vals = [json.loads(f.read_text())["summary"]["dw_total"] for f in files]
        return sum(vals) / len(vals)

    return LR * dw("migu_grad") / dw("plain")


def initial_state(model_dir: Path) -> dict[str, Any]:
    """The starting model's weights (every *.safetensors file of the directory)."""
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def weight_changes(run_dir: Path, model_dir: Path) -> dict[str, float]:
    """L2 weight change over each phase, from the pinned phase-end checkpoints."""
    from migu_dist import consolidate
    from train.checkpoint import tag_for
    from train.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    scale = cfg.lora.alpha / cfg.lora.r if cfg.lora.enabled else 0.0
    prev, step, out = initial_state(model_dir), 0, {}
    for ph in cfg.data.phases:
        step += ph.steps or 0
        end = consolidate(run_dir / "checkpoints" / tag_for(step))
        out[ph.name] = experiment.weight_change(prev, end, scale)
        prev = end
    return out


def finished(run_dir: Path) -> bool:
    path = run_dir / "evals.jsonl"
    return path.is_file() and set(PHASES) <= set(experiment.phase_end_rows(load_jsonl(path)))


def run_one(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``run`` (or resume it) and write its result file; reuse a finished one."""
    result_path = args.out / f"{run.name}.json"
    if result_path.is_file():
        print(f"[{run.name}] reused {result_path}", flush=True)
        return json.loads(result_path.read_text())
    run_dir = args.runs / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    variant = VARIANTS[run.variant]
    overrides = list(variant.overrides)
    lr = LR
    if variant.lr_match:  # fixed at the first attempt, so that a resumed run keeps it
        lr_file = run_dir / "lr_match.json"
        if not lr_file.is_file():
            lr_file.write_text(json.dumps({"lr": matched_lr(args.out)}) + "\n")
        lr = json.loads(lr_file.read_text())["lr"]
        overrides.append(f"optim.lr={lr}")
    for o in overrides:
        if o.startswith("optim.lr="):
            lr = float(o.split("=", 1)[1])
    initial_path = args.out / "initial.json"
    overrides += [
        f"output_dir={run_dir}",
        f"model.init_from={args.model}",
        f"data.tokenizer={args.tokenizer}",
        f"train.seed={run.seed}",
        f"eval.at_start={str(not initial_path.is_file()).lower()}",
        f"engine.precision={args.precision}",
        *(QUICK if args.quick else []),
    ]
    t0 = time.perf_counter()
    load_start = machine()["load"]
    resuming = (run_dir / "checkpoints" / "latest").is_file()
    print(f"[{run.name}] {'resuming' if resuming else 'training'} in {run_dir}", flush=True)
    if not finished(run_dir):
        rc = launch(command(args.nproc, overrides), run_dir / "train.log")
        if rc != 0 or not finished(run_dir):
            tail = (run_dir / "train.log").read_text()[-3000:]
            raise SystemExit(
                f"[{run.name}] failed (exit {rc}); end of {run_dir}/train.log:\n{tail}"
            )
    rows = load_jsonl(run_dir / "evals.jsonl")
    if not initial_path.is_file():
        first = [r for r in rows if r["phase_index"] == -1]
        if not first:
            raise SystemExit(f"{initial_path} is missing and {run.name} has no initial row.")
        write_json(
            initial_path,
            {"row": first[-1], **setup(args), "from_run": run.name, "machine": machine()},
        )
    initial = json.loads(initial_path.read_text())["row"]
    dw = weight_changes(run_dir, args.model)
    seconds = time.perf_counter() - t0
    prev = run_dir / "seconds.json"  # earlier, interrupted attempts of this run
    if prev.is_file():
        seconds += json.loads(prev.read_text())["seconds"]
    ends = list(experiment.phase_end_rows(rows).values())
    result = {
        "run": run.name,
        "variant": run.variant,
        "seed": run.seed,
        "lr": lr,
        "overrides": variant.overrides,
        **setup(args),
        "summary": experiment.run_summary(initial, ends, PHASES, GENERAL, dw),
        "evals": ends,
        "weight_change": dw,
        "seconds": round(seconds, 1),
        "machine": {**machine(), "load_start": load_start},
    }
    write_json(result_path, result)
    print(f"[{run.name}] done in {seconds:.0f} s -> {result_path}", flush=True)
    if args.commit:
        commit(result_path, initial_path)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # ~1.6 GB per run
    return result


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """What every result file of one experiment must share."""
    return {"model": str(args.model), "precision": args.precision, "quick": bool(args.quick)}


def check_setup(args: argparse.Namespace) -> None:
    """Refuse to add runs of another setup (model, precision, --quick) to an experiment."""
    path = args.out / "initial.json"
    if not path.is_file():
        return
    shared = json.loads(path.read_text())
    theirs = {k: shared.get(k) for k in setup(args)}
    if theirs != setup(args):
        raise SystemExit(
            f"{args.out} holds an experiment made with {theirs}, this command asks for "
            f"{setup(args)}: use the same options to continue it, or another --out."
        )


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)  # a crash never leaves half a result file that looks finished


def commit(*paths: Path) -> None:
    """git add + commit exactly these files (nothing else that is staged)."""
    repo = paths[0].parent
    rels = [str(p.resolve()) for p in paths]
    subprocess.run(["git", "add", "--", *rels], cwd=repo, check=True)
    msg = f"experiment: result of {paths[0].stem}"
    subprocess.run(["git", "commit", "-q", "-m", msg, "--only", "--", *rels], cwd=repo, check=True)


def record_attempt_seconds(run_dir: Path, seconds: float) -> None:
    path = run_dir / "seconds.json"
    before = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
    write_json(path, {"seconds": before + seconds})


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------

COLUMNS = [  # (metric, header, format, the cell's sign convention)
    ("dw_total", "weight change", "{:.2f}"),
    ("forgetting", "forgetting (nats) ↓", "{:+.3f}"),
    ("general_ppl/science", "lit+speeches ppl ↓", "{:.1f}"),
    ("ppl/legal/legal", "legal ppl after legal ↓", "{:.1f}"),
    ("ppl/legal/science", "legal ppl final ↓", "{:.1f}"),
    ("ppl/science/science", "science ppl ↓", "{:.1f}"),
    ("learned_ppl", "new-domain ppl ↓", "{:.1f}"),
    ("acc_mean", "task acc ↑", "{:.3f}"),
    ("acc_change", "acc change", "{:+.3f}"),
]
DIFF_METRICS = ["forgetting", "learned_ppl", "general_ppl/science", "acc_mean"]


def cell(a: dict[str, Any] | None, fmt: str) -> str:
    if not a:
        return "-"
    s = fmt.format(a["mean"])
    return s + (f" ± {fmt.format(a['std']).lstrip('+')}" if a["std"] is not None else "")


def dominated_by(name: str, agg: dict[str, dict]) -> list[str]:
    """Plain runs (any LR) with both less forgetting and a lower new-domain perplexity."""
    me = agg[name]
    return [
        p
        for p in PLAIN_LRS
        if p in agg and p != name
        and agg[p]["forgetting"]["mean"] < me["forgetting"]["mean"]
        and agg[p]["learned_ppl"]["mean"] < me["learned_ppl"]["mean"]
    ]  # fmt: skip


def initial_cells(initial: dict) -> list[str]:
    """The starting model's value in each column that has one."""
    ppl, acc = initial["ppl"], list(initial.get("acc", {}).values())
    values: dict[str, float] = {f"ppl/{d}/{p}": v for d, v in ppl.items() for p in PHASES}
    values["general_ppl/science"] = experiment.geomean([ppl[d] for d in GENERAL])
    values["learned_ppl"] = experiment.geomean([ppl[d] for ds in PHASES.values() for d in ds])
    if acc:
        values["acc_mean"] = sum(acc) / len(acc)
    return [fmt.format(values[k]) if k in values else "-" for k, _, fmt in COLUMNS]


def tables(results: list[dict], initial: dict, model: str) -> tuple[str, str, dict]:
    """(main table, differences-from-plain table, aggregate per variant)."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["variant"], []).append(r)
    order = [v for v in VARIANTS if v in groups]
    agg = {v: experiment.aggregate([r["summary"] for r in groups[v]]) for v in order}
    head = "| variant | seeds | LR | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    lines.append(f"| {model} (start) | - | - | " + " | ".join(initial_cells(initial)) + " |")
    for v in order:
        lrs = sorted({r["lr"] for r in groups[v]})
        cells = [cell(agg[v].get(k), fmt) for k, _, fmt in COLUMNS]
        lines.append(
            f"| {v} | {len(groups[v])} | {', '.join(f'{x:.2g}' for x in lrs)} | "
            + " | ".join(cells) + " |"
        )  # fmt: skip
    main = "\n".join(lines)
    ref = agg.get("plain")
    dh = "| variant | " + " | ".join(f"Δ {m}" for m in DIFF_METRICS) + " | dominated by |"
    dl = [dh, "|" + "---|" * (len(DIFF_METRICS) + 2)]
    for v in order:
        if v == "plain" or ref is None:
            continue
        cells = []
        for m in DIFF_METRICS:
            if m not in agg[v] or m not in ref:
                cells.append("-")
                continue
            d = agg[v][m]["mean"] - ref[m]["mean"]
            beyond = experiment.beyond_spread(agg[v][m], ref[m])
            mark = {True: "beyond spread", False: "within spread", None: "spread unknown"}
            cells.append(f"{d:+.3g} ({mark[beyond]})")
        dom = ", ".join(dominated_by(v, agg)) or "-"
        dl.append(f"| {v} | " + " | ".join(cells) + f" | {dom} |")
    return main, "\n".join(dl), agg


def write_report(args: argparse.Namespace, wall_this_session: float) -> str:
    """Tables, plots and results.json from every result file in ``args.out``."""
    files = sorted(args.out.glob("*-s[0-9]*.json"))
    results = [json.loads(f.read_text()) for f in files]
    init_path = args.out / "initial.json"
    if not results or not init_path.is_file():
        return "no finished run yet"
    shared = json.loads(init_path.read_text())
    initial, model = shared["row"], Path(shared["model"]).name
    main, diff, agg = tables(results, initial, model)
    total = sum(r["seconds"] for r in results)
    cpus = sorted({r["machine"]["cpu"] for r in results})
    cores = sorted({r["machine"]["cores"] for r in results})
    loads = [x for r in results for x in (r["machine"]["load_start"][0], r["machine"]["load"][0])]
    planned = len(plan(list(VARIANTS), len(SEEDS)))
    meta = {
        "runs_finished": len(results),
        "runs_planned": planned,
        "total_seconds": round(total, 1),
        "this_session_seconds": round(wall_this_session, 1),
        "machine": {"cpu": cpus, "cores": cores, "load_1min": [min(loads), max(loads)]},
        "quick": bool(args.quick),
    }
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    plots.plot_forgetting_bands(
        args.out / "forgetting.png",
        {v: [r["summary"] for r in rs] for v, rs in by_variant.items()},
        ["initial", *PHASES],
        [("general_ppl/{}", "literature + speeches (what the model knew)"),
         ("ppl/legal/{}", "legal (phase 1)"), ("ppl/science/{}", "science (phase 2)")],
    )  # fmt: skip
    groups = {"MIGU keep-ratio sweep": [(f"keep {k}", v) for k, v in SWEEP.items()],
              "plain at its LRs": [("LR 1e-4", "plain_lr1e-4"), ("LR matched", "plain_lrmatch"),
                                   ("LR 5e-4", "plain")],
              "MIGU at LR 1e-4": [("MIGU LR 1e-4", "migu_lr1e-4")],
              "replay": [("replay", "replay")], "random mask": [("random", "migu_random")],
              "MIGU update": [("update", "migu_update")]}  # fmt: skip
    plots.plot_tradeoff(
        args.out / "sweep.png",
        {g: [(label, agg[v]) for label, v in pts if v in agg] for g, pts in groups.items()},
        x="learned_ppl", y="forgetting",
        xlabel="new-domain perplexity (legal after legal, science after science; geo. mean) ↓",
        ylabel="forgetting: Δ ln ppl of literature + speeches (nats) ↓",
    )  # fmt: skip
    write_json(args.out / "results.json", {"meta": meta, "aggregate": agg})
    machine_line = (
        f"{meta['runs_finished']} of {planned} runs finished, {total / 3600:.2f} h of run wall "
        f"time in total on {', '.join(cpus)} ({', '.join(map(str, cores))} cores; 1-min load "
        f"average {min(loads):.1f}-{max(loads):.1f} at the runs' starts and ends)"
    )
    text = (
        f"# Continual pre-training of {model}: legal, then science\n\n"
        + __doc__.split("\n\n")[2].replace("\n", " ")
        + "\n\n"
        + f"Command: `python scripts/run_experiments.py{' --quick' if args.quick else ''}`; "
        + machine_line
        + ".\n\n"
        + main
        + "\n\n"
        "Differences from plain (mean over seeds; beyond spread = more than twice the standard "
        "error of the difference, a 1-seed variant borrowing plain's seed spread); "
        "'dominated by' lists plain LRs that forget less *and* learn the new domains better:"
        "\n\n" + diff + "\n\n![forgetting](forgetting.png)\n\n![keep-ratio sweep](sweep.png)\n"
    )
    (args.out / "results.md").write_text(text)
    if not args.quick and args.out.resolve() == (ROOT / "docs/experiments/real").resolve():
        update_readme(main, machine_line)
    return main + "\n\n" + diff


def update_readme(table: str, machine_line: str) -> None:
    path = ROOT / "README.md"
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        print(f"README.md has no {README_BEGIN} ... {README_END} block; table not inserted.")
        return
    figures = (
        "![general-domain perplexity over the phases, per method, with seed bands]"
        "(docs/experiments/real/forgetting.png)\n![forgetting against new-domain perplexity: "
        "MIGU keep-ratio sweep, plain at its LRs, replay](docs/experiments/real/sweep.png)"
    )
    block = f"{README_BEGIN}\n{table}\n\n_{machine_line}._\n\n{figures}\n{README_END}"
    pattern = re.escape(README_BEGIN) + ".*?" + re.escape(README_END)
    path.write_text(re.sub(pattern, lambda _: block, text, flags=re.S))


def default_model() -> Path:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "get_model.py"), "smollm2-135m"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return Path(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke size: 2+2 steps, tiny evaluations; {QUICK_VARIANTS} x "
                         f"{QUICK_SEEDS} seeds unless --only")  # fmt: skip
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), help="run only these variants")
    ap.add_argument("--report", action="store_true", help="only rebuild the report")
    ap.add_argument("--commit", action="store_true", help="git-commit each finished result file")
    ap.add_argument("--nproc", type=int, default=2, help="ranks per run (default %(default)s)")
    ap.add_argument("--model", type=Path, help="starting model dir (default: SmolLM2-135M)")
    ap.add_argument("--tokenizer", type=Path, help="default: the model directory")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16",
                    help="engine.precision of every run (default %(default)s)")  # fmt: skip
    ap.add_argument("--runs", type=Path, help="run directories (default runs/real[-quick])")
    ap.add_argument("--out", type=Path, help="result files and report (default "
                    "docs/experiments/real; --quick: runs/real-quick/results)")  # fmt: skip
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    quick_root = ROOT / "runs" / "real-quick"
    args.runs = (args.runs or (quick_root if args.quick else ROOT / "runs" / "real")).resolve()
    args.out = (args.out or (quick_root / "results" if args.quick else
                             ROOT / "docs" / "experiments" / "real")).resolve()  # fmt: skip
    if not args.report:
        args.model = (args.model or default_model()).resolve()
        args.tokenizer = (args.tokenizer or args.model).resolve()
        check_setup(args)
        variants = args.only or (QUICK_VARIANTS if args.quick else list(VARIANTS))
        runs = plan(variants, QUICK_SEEDS if args.quick else len(SEEDS))
        print(f"{len(runs)} runs: {' '.join(r.name for r in runs)}", flush=True)
        for run in runs:
            t_run = time.perf_counter()
            try:
                run_one(run, args)
            except Interrupted:
                record_attempt_seconds(args.runs / run.name, time.perf_counter() - t_run)
                raise
    print(write_report(args, time.perf_counter() - t0))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
