"""The package layering: ``migu_dist`` (MIGU and the sharding backends) is the layer under the
trainer and imports nothing from ``train``; the model builder imports no distributed code."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(source: str) -> set[str]:
    """Every module an ``import``/``from ... import`` in ``source`` names, wherever it is (top
    level, inside a function, under ``if TYPE_CHECKING``). Relative imports are resolved to
    nothing outside the package, so they are left out."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def _from(modules: set[str], package: str) -> list[str]:
    return sorted(m for m in modules if m == package or m.startswith(package + "."))


def test_walker_sees_every_kind_of_import():
    src = (
        "from typing import TYPE_CHECKING\nimport train.model\n"
        "if TYPE_CHECKING:\n    from train.config import Config\n"
        "def f():\n    from train import run\n    import trainer_lib\n"
    )
    assert _from(imported_modules(src), "train") == ["train", "train.config", "train.model"]


def test_migu_dist_imports_nothing_from_train():
    files = sorted((ROOT / "migu_dist").glob("*.py"))
    assert len(files) >= 8, files  # the package is where it should be
    offenders = {
        f.name: found for f in files if (found := _from(imported_modules(f.read_text()), "train"))
    }
    assert offenders == {}


def test_model_builder_imports_no_distributed_code():
    found = imported_modules((ROOT / "train" / "model.py").read_text())
    assert _from(found, "migu_dist") + _from(found, "deepspeed") == []
    assert _from(found, "torch.distributed") == []
