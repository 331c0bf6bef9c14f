"""Run logs: a resumed run's re-run steps replace, not duplicate, the logged ones."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.launch_util import fill, mount_tmpfs
from train.tracking import JsonlLog, truncate_jsonl


def test_truncate_jsonl_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)))
    truncate_jsonl(path, 4)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]
    truncate_jsonl(tmp_path / "absent.jsonl", 3)  # nothing to do, no error


def test_truncate_jsonl_cuts_a_torn_last_line(tmp_path, capsys):
    """What a kill or a full disk during a write leaves: every resume used to fail with a
    JSONDecodeError here. The torn line is dropped (warned), rows after the step too."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 16)))
    with path.open("a") as f:
        f.write('{"step": 16, "lo')
    truncate_jsonl(path, 12)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == list(range(1, 13))
    assert "dropped 1 line(s) that are not JSON rows" in capsys.readouterr().out


def test_jsonl_log_cuts_a_torn_line_before_appending(tmp_path, capsys):
    path = tmp_path / "evals.jsonl"
    torn = '{"step": 2, "p'
    path.write_text(json.dumps({"step": 1}) + "\n" + torn)
    log = JsonlLog(path)
    assert log.append({"step": 2})
    log.close()
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"step": 1}, {"step": 2}]
    assert f"cut off a torn last line ({len(torn)} bytes)" in capsys.readouterr().out


def test_jsonl_log_survives_a_real_full_disk(tmp_path, capsys):
    """On a full tmpfs: an append fails without raising and without leaving a partial line
    (also when a write is cut short by the disk filling during it), is reported once, and its
    rows are written, in order and once, by the first append after space is freed."""
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "1m"):
        pytest.skip("needs root to mount a small tmpfs (a real full disk)")
    log = JsonlLog(disk / "metrics.jsonl")
    pad = "x" * 5000  # every row needs a new page of the tmpfs

    def steps() -> list[int]:
        return [json.loads(x)["step"] for x in (disk / "metrics.jsonl").read_text().splitlines()]

    try:
        assert log.append({"step": 1, "pad": pad})
        filler = fill(disk)
        assert not log.append({"step": 2, "pad": pad})
        assert not log.append({"step": 3, "pad": pad})
        out = capsys.readouterr().out
        assert out.count("WARNING: cannot write") == 1 and "[Errno 28]" in out  # ENOSPC
        assert steps() == [1]
        # Room for one more page but not for the rows: a short write, to be undone.
        os.truncate(filler, filler.stat().st_size - 4096)
        assert not log.append({"step": 4, "pad": pad})
        assert steps() == [1]
        filler.unlink()
        assert log.append({"step": 5, "pad": pad})
        assert "writing again (4 delayed row(s) written)" in capsys.readouterr().out
        assert steps() == [1, 2, 3, 4, 5]
    finally:
        log.close()
        subprocess.run(["umount", str(disk)])
