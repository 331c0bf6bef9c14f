"""Run logs: a resumed run's re-run steps replace, not duplicate, the logged ones."""

from __future__ import annotations

import json

from train.tracking import truncate_jsonl


def test_truncate_jsonl_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)))
    truncate_jsonl(path, 4)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]
    truncate_jsonl(tmp_path / "absent.jsonl", 3)  # nothing to do, no error
