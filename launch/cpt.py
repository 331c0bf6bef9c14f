"""Continual pre-training entry point.

    deepspeed --num_gpus 2 launch/cpt.py --config configs/tiny-cpu.yaml [key=value ...]
    torchrun --nproc_per_node 2 launch/cpt.py --config ...
    python launch/cpt.py --config ... --dry-run

Config -> backend -> model -> data -> evaluator -> trainer -> fit().
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from train.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    try:
        cfg = load_config(args.config, args.overrides, world_size=world)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if args.dry_run:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    from train.run import run  # heavy imports (torch, deepspeed) only when training

    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
