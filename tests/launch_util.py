"""Run launch/cpt.py as a user would (torchrun or the deepspeed launcher), read its outputs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Fast, quiet runs: no evaluation or checkpoints unless a test asks for them.
QUIET = [
    "logging.wandb=false",
    "logging.progress_bar=false",
    "eval.at_phase_end=false",
    "eval.tasks=[]",
    "checkpoint.at_phase_end=false",
]

# The overrides that pick each sharding backend; tests parametrised over backends use these ids.
ENGINES = {
    "deepspeed": ["engine.backend=deepspeed", "engine.zero_stage=3"],
    "fsdp2": ["engine.backend=fsdp2"],
}


def launch_env(**extra: str) -> dict[str, str]:
    """The environment of a launched run: the repository importable (test workers import
    ``tests.*`` and ``train.*`` without patching ``sys.path``), one intra-op thread."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


def free_port() -> int:
    """A TCP port free on this host now (each distributed test takes its own: tests run
    concurrently on one machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpt_command(
    nproc: int, config: str, overrides: list[str], launcher: str, script: str = "launch/cpt.py"
) -> list[str]:
    """``script`` (launch/cpt.py, or a test worker with its command line) under ``launcher``."""
    command = [str(ROOT / script), "--config", config, *overrides]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                "--master_port", str(free_port()), *command]  # fmt: skip
    if launcher == "python":
        return [sys.executable, *command]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *command]  # fmt: skip


def run_cpt(
    out_dir: Path,
    *overrides: str,
    nproc: int = 2,
    config: str = "configs/tiny-cpu.yaml",
    launcher: str = "torchrun",
    quiet: bool = True,
    timeout: int = 600,
    check: bool = True,
    script: str = "launch/cpt.py",
) -> subprocess.CompletedProcess:
    args = [f"output_dir={out_dir}", *(QUIET if quiet else []), *overrides]
    env = launch_env(WANDB_MODE="offline")
    proc = subprocess.run(
        cpt_command(nproc, config, args, launcher, script),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


def mount_tmpfs(path: Path, size: str) -> bool:
    """Mount a ``size`` tmpfs (e.g. "80m") at ``path``: a real filesystem that fills up.
    False where that is not possible (not root); unmount with ``umount``."""
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    return r.returncode == 0


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to the last page with one file; returns it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    block = bytes(1 << 20)
    try:
        while os.write(fd, block):  # the last write is short, the one after it fails
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
