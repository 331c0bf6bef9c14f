"""Evaluate after the fact: the in-job evaluations on a saved checkpoint, or
lm-evaluation-harness tasks on an exported Hugging Face model.

    python launch/evaluate.py --checkpoint runs/x/checkpoints [--config FILE] [--out DIR]
    torchrun --nproc_per_node 2 launch/evaluate.py --checkpoint runs/x/checkpoints/step_00000040
    python launch/evaluate.py --hf-model hf/x --lm-eval-tasks arc_easy,hellaswag [--limit N]
    python launch/evaluate.py --hf-model hf/x --lm-eval-tasks my_task --lm-eval-include-path DIR

--checkpoint: held-out perplexity per domain and the downstream tasks of the run's config.
The checkpoint's shards are consolidated in each process (any number of ranks, no GPU
needed); ranks split the examples as in the training job. The row is printed as JSON and
appended to ``<out>/evals.jsonl`` (default ``<output_dir>/offline_eval``).

--hf-model with --lm-eval-tasks: lm-eval's ``hf`` model (fp32, BOS before each context) on a
directory written by launch/export_hf.py, one process. Registry tasks need their data from
the Hub or its local cache (HF_DATASETS_CACHE); without network the run says so and exits 2.
Local tasks are YAML files in --lm-eval-include-path. Prints ``{task: {"acc", "acc_norm"}}``
as JSON; --out FILE also writes lm-eval's full results there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoints/ dir (latest) or a step dir")
    source.add_argument("--hf-model", help="exported Hugging Face directory (lm-eval tasks)")
    p.add_argument("--config", default=None, help="default: <output_dir>/config.yaml")
    p.add_argument("--out", default=None, help="where evals.jsonl (lm-eval: results JSON) goes")
    p.add_argument("--lm-eval-tasks", default=None, help="comma-separated lm-eval task names")
    p.add_argument("--lm-eval-include-path", default=None, help="folder of local task YAMLs")
    p.add_argument("--limit", type=int, default=None, help="lm-eval: first N items per task")
    p.add_argument("--batch-size", type=int, default=1, help="lm-eval: requests per forward")
    args = p.parse_args(argv)
    if args.hf_model or args.lm_eval_tasks:
        if not (args.hf_model and args.lm_eval_tasks):
            p.error("--lm-eval-tasks and --hf-model go together (export with launch/export_hf.py)")
        return run_lm_eval(args)
    return run_in_job_eval(args)


def run_lm_eval(args: argparse.Namespace) -> int:
    """lm-eval tasks on an exported model; exit 2 with a message when a task cannot load."""
    from train import harness

    try:
        tasks = harness.load_tasks(args.lm_eval_tasks.split(","), args.lm_eval_include_path)
    except ModuleNotFoundError as e:
        print(f"error: {e}; lm-eval is a dev dependency: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    except harness.TaskDataUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lm = harness.hf_lm(args.hf_model, batch_size=args.batch_size)
    results = harness.evaluate(lm, tasks, limit=args.limit)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    scores = {
        task: {m: r[f"{m},none"] for m in ("acc", "acc_norm") if f"{m},none" in r}
        for task, r in results["results"].items()
    }
    print(json.dumps(scores))
    return 0


def run_in_job_eval(args: argparse.Namespace) -> int:
    """The run's in-job evaluation on a saved checkpoint, on any number of ranks."""
    import torch
    import torch.distributed as dist

    from migu_dist import consolidate
    from migu_dist.dist import print0
    from train.evaluate import Evaluator, task_max_len
    from train.export import ExportError, resolve_checkpoint, run_config
    from train.model import build_model
    from train.packing import DocumentMasking
    from train.run import build_data, heldout_document_sets, heldout_sets
    from train.tokenizer import load_tokenizer

    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if (
        torch.cuda.is_available()
    ) else torch.device("cpu")  # fmt: skip

    try:
        root, tag = resolve_checkpoint(args.checkpoint)  # checksums verified
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg = run_config(root, world, args.config)
    state = json.loads((root / tag / "trainer_state.json").read_text())["train"]
    model = build_model(cfg.model, seed=cfg.train.seed)
    model.load_state_dict(consolidate(root / tag))
    model.to(device)

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    data = build_data(cfg, tokenizer, rank, world)
    heldout = heldout_sets(cfg, data)
    # The same attention as in the job: documents apart unless the run let them attend.
    masking = None if cfg.data.cross_document_attention else DocumentMasking.for_model(model.config)
    documents = heldout_document_sets(cfg, data) if masking else None
    data.close()
    phases = data.phases()
    # The phase of the last trained step: start < step <= end.
    phase = next((ph for ph in phases if ph.start_step < state["step"] <= ph.end_step), phases[0])
    out = Path(args.out) if args.out else root.parent / "offline_eval"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    evaluator = Evaluator(
        cfg.eval, tokenizer, heldout, str(out), device=device, is_main=rank == 0,
        max_len=task_max_len(cfg.eval, model), heldout_documents=documents, masking=masking,
    )  # fmt: skip
    row = evaluator.evaluate(
        model,
        step=state["step"],
        phase=phase.name,
        phase_index=phase.index,
        phase_end=state["step"] == phase.end_step,
    )
    print0(json.dumps(dict(row, checkpoint=str(root / tag))), rank=rank)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
