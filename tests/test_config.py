"""Config: defaults < YAML < CLI, every problem reported at once, resolved config saved."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.config import Config, ConfigError, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("**/*.yaml"))


def test_precedence_cli_over_yaml_over_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config("configs/tiny-cpu.yaml", ["train.max_steps=20", "model.hidden_size=128"])
    assert cfg.train.max_steps == 20  # CLI
    assert cfg.model.hidden_size == 128  # CLI over YAML's 64
    assert cfg.model.num_layers == 2  # YAML
    assert cfg.optim.beta1 == Config().optim.beta1  # default
    assert cfg.optim.lr == pytest.approx(3e-3)  # YAML "3.0e-3"


def test_list_element_override(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config("configs/tiny-cpu.yaml", ["data.phases.1.steps=7"])
    assert cfg.data.phases[1].steps == 7
    assert cfg.data.phases[1].name == "legal"


def test_every_problem_reported_at_once(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as e:
        load_config(
            "configs/tiny-cpu.yaml",
            [
                "train.max_stepz=5",  # unknown key
                "train.seed=abc",  # wrong type
                "engine.zero_stage=4",  # impossible value
                "train.global_batch_size=7",  # batch arithmetic
                "model.num_heads=5",  # 64 % 5 != 0
                "migu.keep_ratio=1.5",
                "data.domains.code.train=[nothing/*.jsonl]",
            ],
            world_size=2,
        )
    text = str(e.value)
    assert len(e.value.problems) == 7, text
    for key in (
        "train.max_stepz: unknown key. Did you mean 'max_steps'?",
        "train.seed: expected int",
        "engine.zero_stage",
        "train.global_batch_size: 7 != micro_batch_size (4) x grad_accum (1) x world_size (2)",
        "model.hidden_size: 64 is not divisible by model.num_heads=5",
        "migu.keep_ratio",
        "data.domains.code.train: 'nothing/*.jsonl' matches no file",
    ):
        assert key in text, f"{key!r} not in:\n{text}"


def test_compile_with_zero3_is_refused_and_fsdp2_accepted(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny-cpu.yaml", ["model.compile=true"], world_size=2)
    assert "model.compile: not supported with DeepSpeed ZeRO-3" in str(e.value)
    assert "engine.backend=fsdp2" in str(e.value)
    for ok in (["engine.backend=fsdp2"], ["engine.zero_stage=2"]):
        assert load_config("configs/tiny-cpu.yaml", ["model.compile=true", *ok]).model.compile


def test_resolved_config_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config("configs/tiny-cpu.yaml", ["train.max_steps=3"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


# Configs that start from a real model fetched by scripts/get_model.py (the fixture fetches it).
REAL_MODEL_CONFIGS = {"smollm2-135m-cpu.yaml": "smollm2_dir"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_pass_dry_run(path, request):
    over = []
    if path.name in REAL_MODEL_CONFIGS:
        model_dir = request.getfixturevalue(REAL_MODEL_CONFIGS[path.name])
        if "MIGU_CPT_CACHE" in os.environ:  # not the default ~/.cache location the file names
            over = [f"model.init_from={model_dir}", f"data.tokenizer={model_dir}"]
    proc = subprocess.run(
        [sys.executable, "launch/cpt.py", "--config", str(path.relative_to(ROOT)), "--dry-run"]
        + over,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["engine"]["backend"] == "deepspeed"
    if path.name in REAL_MODEL_CONFIGS:  # "~/.cache/..." was expanded (and exists)
        assert Path(printed["model"]["init_from"]) == model_dir
        assert Path(printed["data"]["tokenizer"]) == model_dir


def test_cli_reports_config_errors_with_exit_code_2():
    proc = subprocess.run(
        [sys.executable, "launch/cpt.py", "--config", "configs/tiny-cpu.yaml", "train.bogus=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "train.bogus: unknown key" in proc.stderr


# The reproductions of issue 15: each passed --dry-run before numeric ranges were declared.
BAD_NUMBERS = {
    "logging.log_every=0": "logging.log_every: must be >= 1, got 0.",
    "checkpoint.every_steps=-3": "checkpoint.every_steps: must be >= 0, got -3.",
    "eval.heldout_tokens=-5": "eval.heldout_tokens: must be >= 1, got -5.",
    "optim.lr=.nan": "optim.lr: must be a finite number, got nan.",
    "optim.grad_clip=-1": "optim.grad_clip: must be >= 0, got -1.0.",
    "optim.beta2=1.5": "optim.beta2: must be >= 0 and < 1, got 1.5.",
    "data.phases.0.domains.literature=.inf": (
        "data.phases[0].domains.literature: must be a finite number, got inf."
    ),
    "data.phases.1.steps=0": "data.phases[1].steps: must be >= 1, got 0.",
    "lora.dropout=1.0": "lora.dropout: must be >= 0 and < 1, got 1.0.",
    "eval.tasks.0.limit=-1": "eval.tasks[0].limit: must be >= 1, got -1.",
}


def test_dry_run_rejects_every_out_of_range_number_at_once():
    proc = subprocess.run(
        [sys.executable, "launch/cpt.py", "--config", "configs/tiny-cpu.yaml", "--dry-run"]
        + list(BAD_NUMBERS),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stdout
    assert f"{len(BAD_NUMBERS)} problem(s) in the config" in proc.stderr, proc.stderr
    for message in BAD_NUMBERS.values():
        assert message in proc.stderr, f"{message!r} not in:\n{proc.stderr}"


def _numeric_fields(tp, key: str):
    """(key, declared type) of every int/float reachable from ``tp``: fields of nested
    dataclasses, elements of lists, values of dicts, the inside of Optional."""
    import dataclasses
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        if args[0] in (int, float):
            yield key, tp
            return
        tp, origin, args = args[0], typing.get_origin(args[0]), typing.get_args(args[0])
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        for f in dataclasses.fields(tp):
            yield from _numeric_fields(hints[f.name], f"{key}.{f.name}".lstrip("."))
    elif origin in (list, dict):
        yield from _numeric_fields(args[-1], f"{key}[]")
    elif origin is not None and type(None) in args:
        yield from _numeric_fields(next(a for a in args if a is not type(None)), key)
    elif tp in (int, float):
        yield key, tp


def test_every_numeric_field_declares_its_range():
    """A new int/float config field without a Range would pass -1 or NaN silently."""
    import typing

    from train.config import Range

    fields = dict(_numeric_fields(Config, ""))
    assert len(fields) > 40 and "optim.beta2" in fields and "data.phases[].domains[]" in fields
    missing = [
        k
        for k, tp in fields.items()
        if typing.get_origin(tp) is not typing.Annotated
        or not any(isinstance(m, Range) for m in typing.get_args(tp)[1:])
    ]
    assert not missing, f"numeric config fields without a Range: {missing}"


def test_run_config_reads_a_saved_config_whose_files_are_elsewhere(tmp_path, capsys):
    """Export and offline evaluation read a run's config.yaml on another machine: missing data
    files are noted, not fatal; an unknown key or a wrong type still is."""
    from train.export import run_config

    saved = load_config("configs/tiny-cpu.yaml").to_dict()
    saved["data"]["tokenizer"] = str(tmp_path / "elsewhere" / "tokenizer.model")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    cfg = run_config(tmp_path / "checkpoints", world_size=1)
    assert cfg.to_dict() == saved
    assert "does not validate on this machine" in capsys.readouterr().out
    saved["model"]["hiden_size"] = 8
    path.write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError) as e:
        run_config(tmp_path / "checkpoints", world_size=1)
    assert "model.hiden_size: unknown key" in str(e.value)
