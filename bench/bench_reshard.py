"""What resuming a DeepSpeed ZeRO checkpoint on another number of ranks costs before the
engine is touched, two ways, on one checkpoint directory written by this project:

- ``consolidate``: ``migu_dist.deepspeed_reshard.consolidate`` (what every new rank runs:
  the old partitions, memory-mapped, cut and concatenated per parameter in memory);
- ``universal``: DeepSpeed's ``ds_to_universal`` conversion (an offline pass writing
  ``zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt`` through per-rank temporary slices), which
  ``load_universal`` then reads.

    python bench/bench_reshard.py --checkpoint runs/x/checkpoints/step_00000002 [--workers 4]

Prints one JSON object: seconds for each, the bytes the conversion wrote and the number of
files, and the checkpoint's size. Drop the page cache between runs for cold-read figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, type=Path, help="a step_* directory")
    ap.add_argument("--workers", type=int, default=1, help="ds_to_universal worker processes")
    ap.add_argument("--scratch", type=Path, default=None, help="where the conversion writes")
    args = ap.parse_args()

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    from migu_dist.deepspeed_reshard import consolidate

    ckpt_bytes, ckpt_files = _size(args.checkpoint)
    t0 = time.perf_counter()
    full, step, _ = consolidate(args.checkpoint)
    t_consolidate = time.perf_counter() - t0
    params = len(full)
    del full

    scratch = Path(tempfile.mkdtemp(dir=args.scratch))
    try:
        uc = argparse.Namespace(
            input_folder=str(args.checkpoint), output_folder=str(scratch / "universal"),
            num_extract_workers=args.workers, num_merge_workers=args.workers,
            keep_temp_folder=False, strict=True, inject_missing_state=True,
        )  # fmt: skip
        t0 = time.perf_counter()
        ds_to_universal(uc)
        t_universal = time.perf_counter() - t0
        written, files = _size(scratch / "universal")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(
        json.dumps(
            {
                "checkpoint": str(args.checkpoint),
                "checkpoint_bytes": ckpt_bytes,
                "checkpoint_files": ckpt_files,
                "trainable_params": params,
                "adam_step": step,
                "consolidate_s": round(t_consolidate, 3),
                "universal_convert_s": round(t_universal, 3),
                "universal_bytes_written": written,
                "universal_files": files,
                "universal_workers": args.workers,
            }
        )
    )


if __name__ == "__main__":
    main()
