"""Export a checkpoint of a run as a Hugging Face directory of its model class (Llama, Mistral,
Qwen2; one process, CPU is fine).

    python launch/export_hf.py --checkpoint runs/x/checkpoints --out hf/x
    python launch/export_hf.py --checkpoint runs/x/checkpoints/step_00000040 --out hf/x

``--checkpoint`` is a run's ``checkpoints/`` directory (its newest complete checkpoint that
verifies) or one ``step_*`` directory. ZeRO shards of any number of ranks are consolidated in
this single process. The run's config is read from ``<output_dir>/config.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.export import DTYPES, ExportError, export_hf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoints/ dir or a step_* dir")
    p.add_argument("--out", required=True, help="output Hugging Face directory")
    p.add_argument("--config", default=None, help="run config (default: next to checkpoints/)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights dtype")
    p.add_argument("--no-tokenizer", action="store_true", help="do not write the tokenizer")
    args = p.parse_args(argv)
    cfg = None
    if args.config:
        from train.export import run_config

        cfg = run_config(Path(args.checkpoint), world_size=1, config_path=args.config)
    try:
        out = export_hf(
            args.checkpoint, args.out, cfg=cfg, dtype=args.dtype, tokenizer=not args.no_tokenizer
        )
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
