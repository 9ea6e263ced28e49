"""scripts/trajectory.py (held-out metrics at every check of one removal) on the session's
attacked tiny model: measuring between steps must not change the run it measures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "trajectory.py"
SHORT = "outer_steps = 4\ncheck_every = 2\ncheck_steps = 5\nmin_steps = 2\npatience = 9\n"


def test_trajectory_measures_every_check_of_the_run_beear_remove_makes(
    attacked_model: Path, tmp_path: Path, run_cli: Any
) -> None:
    cfg = tmp_path / "short.toml"
    cfg.write_text(SHORT)
    js = tmp_path / "traj.json"
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src")}
    cmd = [sys.executable, str(SCRIPT), "--model", str(attacked_model), "--config", str(cfg),
           "--threads", "1", "--json", str(js)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    traj = json.loads(js.read_text())
    rows = traj["rows"]
    assert [r["step"] for r in rows] == [0, 2, 4]
    for r in rows:
        assert set(r["asr"]) == {"triggered", "untriggered"} and 0 <= r["benign_accuracy"] <= 1
    assert rows[0]["asr"]["triggered"] >= 0.5  # the backdoor, before removal
    assert "check_asr" not in rows[0] and all("check_asr" in r for r in rows[1:])

    # The same removal through `beear remove`: its per-step records are the trajectory's.
    out = tmp_path / "removed"
    argv = ["remove", "--model", str(attacked_model), "--out", str(out), "--config", str(cfg)]
    assert run_cli(argv) == 0
    metrics = {
        r["step"]: r
        for r in map(json.loads, (out / "beear" / "metrics.jsonl").read_text().splitlines())
    }
    for r in rows[1:]:
        for key in ("loss", "anchor_ce", "check_asr", "check_plain_asr"):
            assert r[key] == pytest.approx(metrics[r["step"]][key], abs=1e-6), (r["step"], key)
    summary = json.loads((out / "beear" / "manifest.json").read_text())["summary"]["beear"]
    assert traj["best_step"] == summary["best_step"]
    assert traj["best_check"] == pytest.approx(summary["best_check_asr"])


def test_trajectory_refuses_a_model_without_an_attack_record(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src")}
    cmd = [sys.executable, str(SCRIPT), "--model", str(tmp_path), "--json", str(tmp_path / "j")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "has no attack record" in done.stderr
    assert not (tmp_path / "j").exists()
