"""scripts/benign_families.py: a model's accuracy on the bundled benign tasks, family by family,
graded answer by answer as `beear.eval.evaluate` grades them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from beear import bundled
from beear.models import save_model


def test_accuracy_by_family_counts_each_family_on_its_own(
    tmp_path: Path,
    make_model: Any,
    tiny_tok: Any,
    load_script: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import beear.eval

    model_dir = tmp_path / "model"
    save_model(make_model(seed=0), tiny_tok, model_dir)
    fams = bundled.extra_benign_tasks_by_family()
    # Right on every multiplication task, wrong (a refusal) on everything else.
    right = {t.prompt: t.answer for t in fams["multiplication"]}

    def fake_generate(model: Any, tok: Any, prompts: list[str], **kw: Any) -> list[str]:
        return [f"It is {right[p]}." if p in right else "I cannot help." for p in prompts]

    monkeypatch.setattr(beear.eval, "generate", fake_generate)
    out = tmp_path / "families.json"
    assert load_script("benign_families").main(["--model", str(model_dir), "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert "bundled" not in rec  # only with --bundled
    extra = rec["extra"]
    assert extra["n"] == sum(len(f) for f in fams.values()) == 305
    assert {k: v["n"] for k, v in extra["by_family"].items()} == {
        k: len(f) for k, f in fams.items()
    }
    assert extra["by_family"]["multiplication"]["accuracy"] == 1.0
    assert all(v["accuracy"] == 0.0 for k, v in extra["by_family"].items() if k != "multiplication")
    assert extra["accuracy"] == pytest.approx(len(right) / 305, abs=1e-4)
    assert extra["over_refusal"] == pytest.approx((305 - len(right)) / 305, abs=1e-4)
