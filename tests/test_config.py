"""Tests for beear.config: defaults < TOML/JSON file < flags, strict keys, choices and types."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from beear.config import ConfigError, RemovalConfig, load_config


def _toml(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults() -> None:
    cfg = load_config()
    assert cfg == RemovalConfig()
    # The paper's settings and the measured defaults the docs describe.
    assert (cfg.layer, cfg.length, cfg.alpha) == (None, 5, 0.05)
    assert (cfg.outer_steps, cfg.inner_steps, cfg.inner_lr, cfg.lr) == (60, 10, 1.0, 1e-4)
    assert (cfg.train_scope, cfg.baseline, cfg.dtype) == ("all", "none", "float32")
    assert cfg.anchor_under_delta is True and cfg.delta_reset is True
    for f in dataclasses.fields(RemovalConfig):
        assert f.metadata["help"].strip(), f.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]


def test_file_overrides_defaults(tmp_path: Path) -> None:
    p = _toml(
        tmp_path,
        'outer_steps = 7\nlr = 3e-4\ntrain_scope = "lora"\nlayer = -2\n'
        "delta_reset = false\nstop_below = 0\n",
    )
    cfg = load_config(p)
    assert cfg == RemovalConfig().replace(
        outer_steps=7, lr=3e-4, train_scope="lora", layer=-2, delta_reset=False, stop_below=0.0
    )
    assert isinstance(cfg.stop_below, float)
    # A [remove] table and JSON work the same way.
    assert load_config(_toml(tmp_path, "[remove]\nouter_steps = 7\n")).outer_steps == 7
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"outer_steps": 7, "alpha": 0.5}))
    assert (load_config(j).outer_steps, load_config(j).alpha) == (7, 0.5)


def test_flags_override_file(tmp_path: Path) -> None:
    p = _toml(tmp_path, "outer_steps = 7\nlr = 3e-4\nalpha = 0.2\n")
    cfg = load_config(p, {"outer_steps": 9, "lr": None, "length": 3, "seed": 4})
    assert cfg.outer_steps == 9  # flag beats file
    assert cfg.lr == 3e-4  # a flag left unset (None) keeps the file's value
    assert cfg.alpha == 0.2 and cfg.length == 3 and cfg.seed == 4
    assert cfg.inner_steps == RemovalConfig().inner_steps  # neither: default


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = RemovalConfig(layer=2, train_scope="upper", anchor_under_delta=False, lr=2e-5)
    j = tmp_path / "resolved.json"
    j.write_text(json.dumps(cfg.to_dict()))
    assert load_config(j) == cfg


@pytest.mark.parametrize(
    ("where", "values", "message"),
    [
        ("file", "outer_step = 3\n", "unknown config key(s): outer_step"),
        ("flags", {"learning_rate": 1.0, "zz": 2}, "unknown config key(s): learning_rate, zz"),
    ],
)
def test_unknown_keys_are_errors(tmp_path: Path, where: str, values: Any, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        if where == "file":
            load_config(_toml(tmp_path, values))
        else:
            load_config(None, values)
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train_scope", "full", "train_scope = 'full' is not one of all, lower, upper, lora"),
        ("dtype", "float16", "dtype = 'float16' is not one of float32, bfloat16"),
        ("baseline", "dpo", "baseline = 'dpo' is not one of none, sft"),
    ],
)
def test_bad_choices(tmp_path: Path, key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_toml(tmp_path, f'{key} = "{value}"\n'))
    assert str(e.value) == message
    with pytest.raises(ConfigError):
        load_config(None, {key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("length", "five"),
        ("length", 2.5),
        ("length", True),  # bool is an int subclass, but `length = true` is a mistake
        ("lr", "fast"),
        ("lr", True),
        ("delta_reset", "maybe"),
        ("delta_reset", 2),
        ("layer", "middle"),
        ("outer_steps", [1, 2]),
    ],
)
def test_type_errors(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"^{key} = .* is not a valid"):
        load_config(None, {key: value})


def test_type_coercion_of_flag_strings() -> None:
    cfg = load_config(None, {"length": "3", "lr": "1e-3", "delta_reset": "no", "layer": "-1"})
    assert (cfg.length, cfg.lr, cfg.delta_reset, cfg.layer) == (3, 1e-3, False, -1)
    assert load_config(None, {"outer_steps": 4.0}).outer_steps == 4
    assert type(load_config(None, {"outer_steps": 4.0}).outer_steps) is int


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"outer_steps": 0}, "outer_steps must be at least 1"),
        ({"length": -1}, "length must be at least 1"),
        ({"lr": 0}, "learning rates must be positive"),
        ({"inner_lr": -1.0}, "learning rates must be positive"),
        ({"min_steps": -1}, "min_steps may not be negative"),
        ({"warmup_steps": -1}, "warmup_steps may not be negative"),
        ({"anchor_weight": -0.5}, "anchor_weight may not be negative"),
        ({"anchor_weight": "nan"}, "anchor_weight must be a finite number"),
        ({"check_benign": -2}, "check_benign may not be negative"),
        ({"auto_budget": -0.5}, "auto_budget may not be negative"),
        ({"auto_budget": float("nan")}, "auto_budget must be a finite number"),
        ({"auto_budget": "inf"}, "auto_budget must be a finite number"),
        ({"code_delta_budget": -0.5}, "code_delta_budget must be -1 \\(off\\) or at least 0"),
        ({"code_delta_budget": float("nan")}, "code_delta_budget must be -1"),
        ({"code_delta_budget": "inf"}, "code_delta_budget must be a finite number"),
        ({"average_from": -1}, "average_from may not be negative"),
        ({"average_from": 61}, "average_from \\(61\\) is past outer_steps \\(60\\)"),
    ],
)
def test_range_checks(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, values)


def test_auto_budget_is_off_by_default_and_takes_a_factor() -> None:
    assert RemovalConfig().auto_budget == 0.0
    cfg = load_config(None, {"auto_budget": "2.5"})  # a flag's string
    assert cfg.auto_budget == 2.5 and isinstance(cfg.auto_budget, float)
    names = [f.name for f in dataclasses.fields(RemovalConfig)]
    assert names[names.index("delta_budget") + 1] == "auto_budget"  # next to what it replaces
    # The code pairs' own search is off by default; 0 (unbounded) is a budget, not "off".
    assert RemovalConfig().code_delta_budget == -1.0
    assert load_config(None, {"code_delta_budget": "0"}).code_delta_budget == 0.0


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="malformed config"):
        load_config(_toml(tmp_path, "outer_steps = = 3\n"))
    with pytest.raises(ConfigError, match="expected a table of settings"):
        load_config(_toml(tmp_path, "[1, 2]", name="c.json"))


def test_shipped_config_files_load_and_change_what_they_say() -> None:
    """Every config file in docs/configs loads, and each of its keys differs from the default
    (a file restating defaults would claim settings it does not change)."""
    import tomllib

    files = sorted((Path(__file__).resolve().parents[1] / "docs" / "configs").glob("*.toml"))
    assert {f.stem for f in files} >= {"tiny", "smollm2"}
    for f in files:
        cfg = load_config(f, {})
        raw = tomllib.loads(f.read_text())
        assert raw
        for key, value in raw.items():
            assert getattr(cfg, key) == value != getattr(RemovalConfig(), key), (f.name, key)
