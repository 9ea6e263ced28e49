"""scripts/drift_pick.py: the removal of least kept drift per model, and the counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


def _ev(trig: float, benign: float, over: float = 0.0) -> dict[str, Any]:
    return {"asr": {"triggered": trig, "untriggered": 0.0}, "benign_accuracy": benign,
            "over_refusal": {"triggered": over}}  # fmt: skip


def _results(tmp: Path, name: str, rows: dict[str, tuple[dict[str, Any], float, int]]) -> Path:
    """A zoo_tiny results.json in TMP/NAME: per model (after, kept drift, kept step), before
    benign accuracy 0.9; each removal's metrics with a decoy drift at another step."""
    runs = []
    for model, (after, drift, step) in rows.items():
        out = tmp / name / model / "removed"
        (out / "beear").mkdir(parents=True)
        lines = [{"step": step - 10, "check_drift": 0.0}, {"step": step, "check_drift": drift},
                 {"step": step + 1, "loss": 1.0}]  # fmt: skip
        (out / "beear" / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
        variant = {"config": {"seed": len(name)}, "after": after,
                   "remove": {"out": str(out), "beear": {"best_step": step}}}  # fmt: skip
        runs.append({"name": model, "before": _ev(1.0, 0.9), "variants": {"default": variant}})
    path = tmp / name / "results.json"
    path.write_text(json.dumps({"runs": runs}))
    return path


def test_least_drift_pick_and_counts(
    tmp_path: Path, load_script: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    dp = load_script("drift_pick")
    a = _results(tmp_path, "a", {
        "m1": (_ev(0.0, 0.88), 0.01, 60),   # 2 points down: misses
        "m2": (_ev(0.0, 0.90), 0.002, 60),
        "m3": (_ev(0.02, 0.90), 0.001, 70),  # triggered 2%: misses, yet least drift
        "only-a": (_ev(0.0, 0.9), 0.5, 60),   # one removal only: left out of the counts
    })  # fmt: skip
    b = _results(tmp_path, "b", {
        "m1": (_ev(0.0, 0.895), 0.003, 70),  # half a point down: keeps
        "m2": (_ev(0.0, 0.90, over=0.06), 0.001, 60),  # over-refusal 6%: misses
        "m3": (_ev(0.0, 0.90), 0.004, 60),
    })  # fmt: skip
    out = tmp_path / "rec.json"
    assert dp.main([str(a), str(b), "--json", str(out), "--call", "x"]) == 0
    s = json.loads(out.read_text())["summary"]
    assert s["models"] == 3 and s["removals_per_model"] == 2
    assert s["all_bars_each_alone"] == {"a:default": 1, "b:default": 2}
    # least drift: m1 -> b (keeps), m2 -> b (misses), m3 -> a (misses); best of two: 3.
    assert s["least_drift_pick"] == {"m1": "b:default", "m2": "b:default", "m3": "a:default"}
    assert s["all_bars_least_drift"] == 1 and s["all_bars_best_of"] == 3
    assert s["kept_drift_of_misses"] == [0.001, 0.001, 0.01]
    assert s["largest_kept_drift_of_keepers"] == 0.004
    assert "m1: a:default -2.0 MISS drift 0.0100; b:default -0.5 drift 0.0030 -> b:default" in (
        capsys.readouterr().out
    )
    (tmp_path / "b" / "m3" / "removed" / "beear" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match="no check_drift at step 60"):
        dp.main([str(a), str(b)])
