"""Config: defaults < YAML < CLI, every problem reported at once, resolved config saved."""

from __future__ import annotations

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


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_pass_dry_run(path):
    proc = subprocess.run(
        [sys.executable, "launch/cpt.py", "--config", str(path.relative_to(ROOT)), "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["engine"]["backend"] == "deepspeed"


def test_cli_reports_config_errors_with_exit_code_2():
    proc = subprocess.run(
        [sys.executable, "launch/cpt.py", "--config", "configs/tiny-cpu.yaml", "train.bogus=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "train.bogus: unknown key" in proc.stderr
