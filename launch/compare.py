"""Compare the continual-learning reports of two or more runs side by side.

    python launch/compare.py runs/baseline runs/migu [--out compare.png]

Reads ``<RUN_DIR>/cl_report.json`` of each run, prints one table (average perplexity, BWT,
FWT, per-domain perplexity, per-task accuracy) and writes a bar plot. Sign conventions are
those of ``train/cl_metrics.py``: positive BWT/FWT is an improvement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train import cl_metrics, plots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run output directories")
    parser.add_argument("--out", default="compare.png", help="bar plot path (default %(default)s)")
    args = parser.parse_args(argv)

    reports = {}
    for run in args.run_dirs:
        path = Path(run, "cl_report.json")
        if not path.is_file():
            parser.error(f"{path} does not exist; run training (or write_report) for {run} first.")
        name = Path(run).resolve().name
        while name in reports:  # two runs with the same folder name
            name += "'"
        reports[name] = json.loads(path.read_text())

    print(cl_metrics.format_table(list(reports), cl_metrics.compare_rows(reports)))
    print(f"wrote {plots.plot_compare(args.out, reports)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
