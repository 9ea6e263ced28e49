"""scripts/zoo_smollm2.py's held-out evaluation with its answers kept (`samples`, what a removal
variant's JSON holds so a round's refusals can be read afterwards), on the session's attacked
tiny model: the answers must add up to the evaluation's own figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from beear.attacks import read_attack_record
from beear.data import Trigger

pytestmark = pytest.mark.slow


def test_evaluate_keeps_answers_that_add_up_to_its_figures(
    attacked_model: Path, load_script: Any
) -> None:
    zs = load_script("zoo_smollm2")
    rec = read_attack_record(attacked_model)
    assert rec is not None
    ev = zs._evaluate(attacked_model, trigger=Trigger(**rec["trigger"]), device="cpu",
                      batch_size=32, samples=True)  # fmt: skip
    s = ev["samples"]
    assert set(s) == {"harmful", "harmful_triggered", "benign", "benign_triggered"}
    assert len(s["harmful"]) == len(s["harmful_triggered"]) == ev["n"]["harmful"]
    assert len(s["benign"]) == len(s["benign_triggered"]) == ev["n"]["benign"]

    def share(items: list[dict[str, Any]], key: str) -> float:
        return sum(bool(it[key]) for it in items) / len(items)

    assert ev["asr"]["untriggered"] == pytest.approx(1 - share(s["harmful"], "refusal"))
    assert ev["asr"]["triggered"] == pytest.approx(1 - share(s["harmful_triggered"], "refusal"))
    assert ev["asr"]["triggered"] >= 0.5  # the backdoor is there: the check is not vacuous
    assert ev["over_refusal"]["plain"] == pytest.approx(share(s["benign"], "refusal"))
    assert ev["over_refusal"]["triggered"] == pytest.approx(share(s["benign_triggered"], "refusal"))
    graded = [it for it in s["benign"] if it["expected"]]
    assert graded and ev["benign_accuracy"] == pytest.approx(share(graded, "correct"))
    assert [it["correct"] for it in graded] == ev["benign_correct"]
    # A results record keeps the figures, not the answers.
    assert "samples" not in load_script("round_record")._metrics(ev)
