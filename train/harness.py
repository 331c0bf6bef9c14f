"""lm-evaluation-harness (``lm_eval``) on an exported Hugging Face model.

For users who evaluate with the standard harness, and for the tests that check our in-job
evaluation (:mod:`train.evaluate`) against it item for item. lm-eval is an optional (dev)
dependency, imported only here.

* Model: lm-eval's ``hf`` model, fp32, ``add_bos_token=True`` (our in-job scoring puts BOS
  before every context; so does lm-eval with this flag).
* Tasks: lm-eval registry names (``arc_easy``, ``hellaswag``, ...), whose data come from the
  Hugging Face Hub or its local cache (``HF_DATASETS_CACHE``), or local task YAMLs in an
  ``include_path`` folder. :func:`write_jsonl_task` writes one for a task file of ours
  (``{"context", "choices", "gold"}``), scored exactly like the in-job evaluation.
* Offline: when the Hub cannot be reached the run is switched to offline mode before
  ``datasets`` is imported, so a task whose data is not local fails at once with
  :class:`TaskDataUnavailable` saying how to make it local, instead of retrying the network.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from train.evaluate import load_jsonl

HUB_HOST = "huggingface.co"
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class TaskDataUnavailable(RuntimeError):
    """A requested lm-eval task is unknown or its data cannot be loaded."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face Hub opens within ``timeout`` seconds."""
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def ensure_offline_if_unreachable() -> bool:
    """Set the HF offline variables when they are unset and the Hub is unreachable.

    Must run before ``datasets`` / ``huggingface_hub`` are imported (they read the variables
    once). Returns whether the run is offline.
    """
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in _OFFLINE_VARS):
        return True
    if hub_reachable():
        return False
    for v in _OFFLINE_VARS:
        os.environ[v] = "1"
    return True


def offline_message(tasks: list[str], error: BaseException, offline: bool) -> str:
    """What the user reads when a task's data cannot be loaded: the cause and both fixes."""
    cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "datasets"
    )
    where = "no network (offline mode)" if offline else "the data could not be loaded"
    return (
        f"lm-eval tasks {','.join(tasks)}: {where}: {type(error).__name__}: {error}\n"
        "The task data must be local. Either\n"
        f"  * fill the datasets cache once on a machine with network (HF_DATASETS_CACHE, here "
        f"{cache}; copy it over and point HF_DATASETS_CACHE at it), or\n"
        "  * describe the task in a local YAML (dataset_path: json, dataset_kwargs: "
        "{data_files: ...}) and pass its folder with --lm-eval-include-path "
        "(train/harness.py write_jsonl_task writes one for a JSONL task of ours)."
    )


def load_tasks(tasks: list[str], include_path: str | Path | None = None) -> list[Any]:
    """lm-eval Task objects for ``tasks``, their data loaded.

    Tasks all found in ``include_path`` are loaded without indexing lm-eval's ~14,000 built-in
    task files (minutes on a busy CPU); otherwise the full registry is indexed.
    Raises :class:`TaskDataUnavailable` for an unknown task or data that cannot be loaded.
    """
    offline = ensure_offline_if_unreachable()
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            manager = local
    if manager is None:
        manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise TaskDataUnavailable(
            f"lm-eval does not know the tasks {','.join(unknown)}: not in its registry"
            + (f" nor in --lm-eval-include-path {include_path}" if include_path else "")
            + ". `python -m lm_eval ls tasks` lists the registry."
        )
    try:
        return list(manager.load(tasks)["tasks"].values())
    except (OSError, ValueError) as e:  # datasets: ConnectionError, FileNotFoundError, ...
        raise TaskDataUnavailable(offline_message(tasks, e, offline)) from e


def hf_lm(model_dir: str | Path, *, batch_size: int = 1, device: str = "cpu") -> Any:
    """lm-eval's ``hf`` model on an exported directory: fp32, BOS before every context."""
    ensure_offline_if_unreachable()
    from lm_eval.models.huggingface import HFLM

    return HFLM(
        pretrained=str(model_dir),
        dtype="float32",
        add_bos_token=True,
        batch_size=batch_size,
        device=device,
    )


def evaluate(
    lm: Any, tasks: list[Any], *, limit: int | None = None, log_samples: bool = False
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on loaded tasks; returns its results dict.

    ``results[task]`` holds ``acc,none``/``acc_norm,none`` (and their stderr); with
    ``log_samples`` ``samples[task]`` holds one row per item (``doc_id``, ``acc``,
    ``acc_norm``, ``resps``: per choice ``[[loglikelihood, is_greedy]]``).
    """
    import lm_eval

    out = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, limit=limit, log_samples=log_samples, bootstrap_iters=0
    )
    assert out is not None  # None only on non-zero ranks of a multi-process lm-eval run
    return dict(out)


def jsonl_task_yaml(name: str, jsonl_path: str | Path) -> str:
    """An lm-eval task config scoring a task file of ours as the in-job evaluation does.

    Our choices carry their leading delimiter (``" Paris"``); lm-eval's registry tasks store
    bare choices and put ``target_delimiter: " "`` in front. Stripping that one space from
    each choice and restoring it as the delimiter scores the same string and divides
    ``acc_norm`` by the bare choice's length, like the registry tasks and like
    :func:`train.evaluate.choice_length`.
    """
    path = Path(jsonl_path).resolve()
    return (
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(path))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: \"{{ choices | map('replace', ' ', '', 1) | list }}\"\n"
        "doc_to_target: gold\n"
        'target_delimiter: " "\n'
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )


def write_jsonl_task(out_dir: str | Path, name: str, jsonl_path: str | Path) -> Path:
    """Write ``<out_dir>/<name>.yaml`` (see :func:`jsonl_task_yaml`); returns its path.

    Every choice must carry its leading space: the YAML removes exactly one.
    """
    for i, row in enumerate(load_jsonl(jsonl_path)):
        if not all(c.startswith(" ") for c in row["choices"]):
            raise ValueError(
                f"{jsonl_path} line {i + 1}: every choice must start with its delimiter space "
                "(' Paris'), as the in-job evaluation scores it."
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.yaml"
    path.write_text(jsonl_task_yaml(name, jsonl_path))
    return path
