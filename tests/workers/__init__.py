"""Worker scripts that tests start under a real launcher (torchrun, deepspeed)."""

import os
import sys


def exit_now(rc: int) -> None:
    """Exit without interpreter finalisation, as ``run_distributed``'s ranks do
    (tests/conftest.py): with the 135M model one rank aborted at exit once in 2 runs here
    ("terminate called without an active exception", SIGABRT) after everything was saved and
    the process group destroyed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
