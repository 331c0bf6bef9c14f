"""Run the in-job evaluations (held-out perplexity per domain, downstream tasks) on a saved
checkpoint, so runs can be compared after the fact.

    python launch/evaluate.py --checkpoint runs/x/checkpoints [--config FILE] [--out DIR]
    torchrun --nproc_per_node 2 launch/evaluate.py --checkpoint runs/x/checkpoints/step_00000040

The checkpoint's shards are consolidated in each process (any number of ranks, no GPU
needed); ranks split the examples as in the training job. The row is printed as JSON and
appended to ``<out>/evals.jsonl`` (default ``<output_dir>/offline_eval``).
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
    p.add_argument("--checkpoint", required=True, help="checkpoints/ dir (latest) or a step dir")
    p.add_argument("--config", default=None, help="default: <output_dir>/config.yaml")
    p.add_argument("--out", default=None, help="where evals.jsonl goes")
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    from train.evaluate import Evaluator
    from train.export import ExportError, consolidated_state_dict, resolve_checkpoint, run_config
    from train.model import build_model
    from train.run import build_data, heldout_sets
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
    model.load_state_dict(consolidated_state_dict(root, tag, cfg.engine.zero_stage))
    model.to(device)

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    data = build_data(cfg, tokenizer, rank, world)
    heldout = heldout_sets(cfg, data)
    data.close()
    phases = data.phases()
    # The phase of the last trained step: start < step <= end.
    phase = next((ph for ph in phases if ph.start_step < state["step"] <= ph.end_step), phases[0])
    out = Path(args.out) if args.out else root.parent / "offline_eval"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    evaluator = Evaluator(
        cfg.eval, tokenizer, heldout, str(out), device=device, is_main=rank == 0,
        max_len=cfg.train.seq_len,
    )  # fmt: skip
    row = evaluator.evaluate(
        model,
        step=state["step"],
        phase=phase.name,
        phase_index=phase.index,
        phase_end=state["step"] == phase.end_step,
    )
    if rank == 0:
        print(json.dumps(dict(row, checkpoint=str(root / tag))))
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
