"""Where the domain streams run: in the training process, or in background worker processes.

Both executors take the same requests, "advance domain d by these rows of step s, keep the
flagged ones", and answer them in submission order. Each domain stream lives in exactly one
place (one worker owns a domain), so every document is read and tokenised once per rank.

Workers are fresh interpreters, not forks: the trainer process holds CUDA and other threads
by the time the loader starts, and a fork of that can deadlock. A worker imports only this
package's numpy-level modules (``train.data`` imports torch lazily), so it starts in about a
second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from train.data.hfdatasets import dataset_records
from train.data.store import StoreStream
from train.data.stream import PackedStream
from train.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# The directory holding the ``train`` package, so that worker interpreters can import it.
_REPO_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass
class StreamSpec:
    """Everything needed to build any domain's stream, in a worker process too."""

    files: dict[str, list[str]]
    text_fields: dict[str, str]
    tokenizer: Tokenizer
    seq_len: int
    add_bos: bool
    add_eos: bool
    position_ids: bool
    max_document_bytes: int | None = None
    stores: dict[str, str] = field(default_factory=dict)
    """Domains read from a token store: domain -> store path or URL (``files`` unused)."""
    datasets: set[str] = field(default_factory=set)
    """Domains whose single ``files`` entry is a ``datasets`` Arrow directory."""

    def build(self, domain: str, state: dict[str, Any] | None) -> PackedStream | StoreStream:
        if domain in self.stores:
            return StoreStream(
                domain,
                self.stores[domain],
                self.seq_len,
                position_ids=self.position_ids,
                state=state,
            )
        return PackedStream(
            domain,
            self.files[domain],
            self.text_fields[domain],
            self.tokenizer,
            self.seq_len,
            add_bos=self.add_bos,
            add_eos=self.add_eos,
            position_ids=self.position_ids,
            max_document_bytes=self.max_document_bytes,
            state=state,
            records=dataset_records if domain in self.datasets else None,
        )


@dataclass
class Chunk:
    """A stream's answer to one request."""

    step: int
    domain: str
    tokens: np.ndarray  # (kept rows, seq_len) int32
    positions: np.ndarray | None  # same shape, or None
    state: dict[str, Any]  # the stream's state right after this request
    messages: list[str]  # bad-input warnings to log


class _Streams:
    """Domain streams built on first use from their start states."""

    def __init__(self, spec: StreamSpec, states: dict[str, dict[str, Any]]):
        self.spec = spec
        self.states = states
        self.streams: dict[str, PackedStream | StoreStream] = {}

    def run(self, step: int, domain: str, keep: list[bool]) -> Chunk:
        stream = self.streams.get(domain)
        if stream is None:
            stream = self.streams[domain] = self.spec.build(domain, self.states.get(domain))
        tokens, positions = stream.take(keep)
        return Chunk(step, domain, tokens, positions, stream.state(), stream.drain_messages())


class InlineExecutor:
    """Runs each request in the training process when its result is asked for."""

    def __init__(self, spec: StreamSpec, states: dict[str, dict[str, Any]]):
        self._streams = _Streams(spec, states)
        self._pending: deque[tuple[int, str, list[bool]]] = deque()

    def submit(self, step: int, domain: str, keep: list[bool]) -> None:
        self._pending.append((step, domain, keep))

    def result(self, step: int, domain: str) -> Chunk:
        req = self._pending.popleft()
        assert req[:2] == (step, domain), f"out of order: {req[:2]} != {(step, domain)}"
        return self._streams.run(*req)

    def close(self) -> None:
        self._pending.clear()


def _worker_main() -> None:
    """Worker process: read (spec, states) then requests from stdin, answer on stdout."""
    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    spec, states = pickle.load(inp)
    streams = _Streams(spec, states)
    # A writer thread lets the worker run ahead while the parent has not read the answers yet
    # (an answer is usually larger than a pipe buffer).
    answers: queue.Queue = queue.Queue()

    def write() -> None:
        while True:
            item = answers.get()
            try:
                pickle.dump(item, out, protocol=pickle.HIGHEST_PROTOCOL)
                out.flush()
            except OSError:  # the loader closed its end: nobody wants the answers
                return
            finally:
                answers.task_done()

    threading.Thread(target=write, daemon=True).start()
    while True:
        try:
            req = pickle.load(inp)
        except EOFError:  # the loader closed: stop
            return
        try:
            answers.put(("ok", streams.run(*req)))
        except BaseException:  # noqa: BLE001 - the parent re-raises it with the traceback
            answers.put(("error", traceback.format_exc()))
            answers.join()  # deliver the traceback before exiting
            return


class ProcessExecutor:
    """Domain streams in ``num_workers`` worker processes (domains assigned round-robin).

    Requests are queued ahead by the loader, so workers tokenise upcoming steps while the
    model trains on the current one. A worker is a fresh interpreter running this module
    (``python -m train.data.workers``) fed through pipes: unlike ``multiprocessing``'s spawn it
    does not re-import the trainer's main script (torch, deepspeed, ...) in every worker, and
    unlike fork it is safe in a process that already holds CUDA and threads.
    """

    def __init__(
        self,
        spec: StreamSpec,
        states: dict[str, dict[str, Any]],
        domains: list[str],
        num_workers: int,
    ):
        n = max(1, min(num_workers, len(domains)))
        self._owner = {d: i % n for i, d in enumerate(domains)}
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_REPO_ROOT, env.get("PYTHONPATH")]))
        self._procs: list[subprocess.Popen] = []
        self._stdin: list[IO[bytes]] = []
        self._stdout: list[IO[bytes]] = []
        for i in range(n):
            proc = subprocess.Popen(
                [sys.executable, "-m", "train.data.workers"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
            mine = {d: s for d, s in states.items() if self._owner.get(d) == i}
            assert proc.stdin is not None and proc.stdout is not None
            self._procs.append(proc)
            self._stdin.append(proc.stdin)
            self._stdout.append(proc.stdout)
            self._send(i, (spec, mine))

    def _send(self, i: int, obj: Any) -> None:
        try:
            pickle.dump(obj, self._stdin[i], protocol=pickle.HIGHEST_PROTOCOL)
            self._stdin[i].flush()
        except BrokenPipeError:
            raise RuntimeError(self._died(i)) from None

    def _died(self, i: int) -> str:
        code = self._procs[i].wait(timeout=10)
        return f"data worker {i} died (exit code {code}); its stderr above says why"

    def submit(self, step: int, domain: str, keep: list[bool]) -> None:
        self._send(self._owner[domain], (step, domain, keep))

    def result(self, step: int, domain: str) -> Chunk:
        i = self._owner[domain]
        try:
            kind, payload = pickle.load(self._stdout[i])
        except EOFError:
            raise RuntimeError(self._died(i)) from None
        if kind == "error":
            raise RuntimeError(f"data worker {i} failed:\n{payload}")
        assert (payload.step, payload.domain) == (step, domain), "worker answered out of order"
        return payload

    def close(self) -> None:
        for pipe in self._stdin + self._stdout:
            with contextlib.suppress(OSError):  # a dead worker's pipe
                pipe.close()
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs, self._stdin, self._stdout = [], [], []


if __name__ == "__main__":
    # Run the importable copy of this module, so that pickled classes resolve as
    # train.data.workers.* on both ends rather than as __main__.*.
    from train.data.workers import _worker_main as worker_main

    worker_main()
