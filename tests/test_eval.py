"""Per-task benign results and the paired accuracy change (beear.eval.paired_change)."""

from __future__ import annotations

from typing import Any

import pytest

import beear.eval
from beear.bundled import sha256_of
from beear.data import AnchorExample
from beear.eval import evaluate, paired_change
from beear.pipeline import benign_change

BENIGN = [
    AnchorExample("What is 2 plus 2?", "4"),
    AnchorExample("Say hello.", ""),  # no expected answer: over-refusal only, not graded
    AnchorExample("What colour is the sky?", "blue"),
    AnchorExample("Capital of France?", "Paris"),
]


def test_evaluate_keeps_each_graded_task_s_result_in_order(monkeypatch: Any) -> None:
    answers = {"What is 2 plus 2?": "It is 4.", "Say hello.": "Hello!",
               "What colour is the sky?": "Green.", "Capital of France?": "Paris.", "x": "I cannot."}  # fmt: skip
    monkeypatch.setattr(beear.eval, "generate", lambda m, t, ps, **kw: [answers[p] for p in ps])
    js = evaluate(None, None, harmful=["x"], benign=BENIGN).to_json()
    assert js["benign_correct"] == [True, False, True]
    assert js["benign_accuracy"] == pytest.approx(2 / 3)
    graded = [e.prompt for e in BENIGN if e.answer]
    assert js["benign_sha256"] == sha256_of(graded)


def _ev(correct: list[bool], sha: str = "s") -> dict[str, Any]:
    return {"benign_correct": correct, "benign_sha256": sha}


def test_paired_change_counts_the_tasks_that_changed_with_a_wilson_interval() -> None:
    before = [True] * 90 + [False] * 10
    after = [False] * 5 + [True] * 85 + [True] + [False] * 9  # 5 lost, 1 gained
    ch = paired_change(_ev(before), _ev(after))
    assert ch is not None
    assert (ch["lost"], ch["gained"], ch["n"]) == (5, 1, 100)
    assert ch["change"] == pytest.approx(-0.04)
    # Wilson 95% interval for 1 gained of 6 changed: 0.0300 to 0.5635 (by hand), as a change of
    # (2p - 1) * 6 / 100 in accuracy.
    assert ch["ci95"] == pytest.approx([-0.0564, 0.0076], abs=2e-4)
    same = paired_change(_ev(before), _ev(before))
    assert same is not None and same["change"] == 0 and same["ci95"] == [0.0, 0.0]
    # All changed tasks lost: the interval stays below zero.
    worse = paired_change(_ev(before), _ev([False] * 10 + [True] * 80 + [False] * 10))
    assert worse is not None and worse["ci95"][1] < 0 and worse["ci95"][0] >= -0.1


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (_ev([True, False]), _ev([True, False], sha="other tasks")),
        (_ev([True, False]), _ev([True])),
        (_ev([True]), {"benign_accuracy": 1.0}),  # an evaluation from before per-task results
    ],
)
def test_paired_change_needs_the_same_tasks_on_both_sides(
    before: dict[str, Any], after: dict[str, Any]
) -> None:
    assert paired_change(before, after) is None


def test_benign_change_says_each_state_against_before() -> None:
    evals = {"before": _ev([True] * 9 + [False]), "after": _ev([False] + [True] * 9),
             "baseline": {"benign_accuracy": 0.9}}  # fmt: skip
    out = benign_change(evals)
    assert list(out) == ["after"]  # no per-task results for the baseline: no sentence
    assert out["after"]["sentence"] == (
        "Benign accuracy, after against before: +0.0 points (1 of 10 tasks lost, 1 gained; "
        "95% interval -16.2 to +16.2, from the tasks that changed)"
    )
