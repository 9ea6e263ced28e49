"""Tests for beear.loop (the bi-level BEEAR loop) on a small random Llama, CPU, seconds each."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import beear.entrapment
import beear.loop
from beear import checkpoint
from beear.config import RemovalConfig
from beear.data import DataError, HarmfulExample
from beear.entrapment import ScanResult
from beear.loop import (
    BUDGET_GRID,
    LoopState,
    NonFiniteLoss,
    RemovalResult,
    calibrate_budget,
    entrapment_groups,
    judged_pairs,
    run_beear,
    split_check,
    stratified,
)
from beear.models import load_model, save_model

pytestmark = pytest.mark.usefixtures("single_thread")

# Small and fast: 3 check prompts (a quarter of 12), 4 generated tokens, short searches.
SMALL = RemovalConfig(
    outer_steps=2, inner_steps=3, batch_size=4, anchor_batch_size=4, check_every=1,
    check_steps=2, check_prompts=3, max_new_tokens=4, max_length=96, lr=1e-3,
    checkpoint_every=0, seed=0, min_steps=0,
)  # fmt: skip


@pytest.fixture(scope="module")
def data(corpus: Any) -> dict[str, Any]:
    return {
        "defender": list(corpus.defender_harmful[:12]),
        "anchor": list(corpus.anchor_benign[:8]),
    }


def _run(
    model: Any, tok: Any, data: dict[str, Any], cfg: RemovalConfig, **kw: Any
) -> RemovalResult:
    return run_beear(model, tok, defender=data["defender"], anchor=data["anchor"], config=cfg, **kw)


def _weights(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _strip_times(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


# ---------------------------------------------------------------------------------------------
# pinned two-step run

# Obtained by running this exact test once (torch 2.13 CPU, transformers 5.24; the same numbers
# to 1e-4 on one and on two threads) and copying the numbers from `res.history`. A change here
# means the algorithm (data order, δ search, loss terms, optimiser) changed: if that was
# intended, re-pin and say why in the change.
PINNED: dict[int, dict[str, float]] = {
    0: {"check_asr": 1.0, "check_unwanted_ce": 6.442384},
    1: {
        "bee_loss": 6.108232, "bee_unwanted_ce": 6.429483, "delta_norm": 0.580894,
        "hidden_rms": 0.021750, "loss": 25.870258, "safe_ce": 6.496989, "anchor_ce": 6.432191,
        "safe_plain_ce": 6.493656, "anchor_delta_ce": 6.447421, "check_unwanted_ce": 6.430659,
    },
    2: {
        "bee_loss": 6.105421, "bee_unwanted_ce": 6.421802, "delta_norm": 0.592575,
        "hidden_rms": 0.022421, "loss": 25.537560, "safe_ce": 6.403362, "anchor_ce": 6.356166,
        "safe_plain_ce": 6.399036, "anchor_delta_ce": 6.378994, "check_unwanted_ce": 6.414252,
    },
}  # fmt: skip


def test_two_step_run_matches_pinned_losses(make_model: Any, tiny_tok: Any, data: Any) -> None:
    model = make_model(seed=0)
    init = _weights(model)
    res = _run(model, tiny_tok, data, SMALL)
    assert [r["step"] for r in res.history] == [0, 1, 2]
    assert res.mode == "beear" and res.layer == 1 and res.delta is not None
    assert res.delta.shape == (SMALL.length, model.config.hidden_size)
    for step, pins in PINNED.items():
        rec = res.history[step]
        for key, value in pins.items():
            assert rec[key] == pytest.approx(value, abs=1e-4), (step, key, rec[key])
    # The loss is the sum of its parts (eq. 2 plus the two extra anchoring terms).
    for rec in res.history[1:]:
        parts = ("safe_ce", "anchor_ce", "safe_plain_ce", "anchor_delta_ce")
        assert rec["loss"] == pytest.approx(sum(rec[k] for k in parts), abs=1e-4)
    # Two updates happened; the returned model holds the best step's weights.
    assert res.history[2]["anchor_ce"] < res.history[1]["anchor_ce"]
    # Every check says 1.0 (a random model), so the lower anchoring loss picks step 2.
    assert res.best_step == 2
    assert not any("check_asr_code" in r for r in res.history)  # no code pairs, no code share
    assert not _same(_weights(model), init)


def test_kl_anchor_starts_at_zero_and_grows_as_the_model_moves(
    make_model: Any, tiny_tok: Any, data: Any
) -> None:
    res = _run(make_model(seed=0), tiny_tok, data, SMALL.replace(anchor_loss="ce+kl"))
    first, second = res.history[1], res.history[2]
    # Step 1's loss is taken before any update: the model is still its own distillation target.
    assert first["anchor_kl"] == pytest.approx(0.0, abs=1e-5)
    assert second["anchor_kl"] > 1e-5 and second["anchor_delta_kl"] > second["anchor_kl"]
    parts = ("safe_ce", "anchor_ce", "safe_plain_ce", "anchor_delta_ce", "anchor_kl",
             "anchor_delta_kl")  # fmt: skip
    for rec in (first, second):
        assert rec["loss"] == pytest.approx(sum(rec[k] for k in parts), abs=1e-4)
    # The CE terms of step 1 are those of the plain CE run (same data, same δ search).
    ce = _run(make_model(seed=0), tiny_tok, data, SMALL).history[1]
    for k in ("safe_ce", "anchor_ce", "anchor_delta_ce", "bee_loss"):
        assert first[k] == pytest.approx(ce[k], abs=1e-5)


def test_warmup_scales_each_update_by_its_step_over_warmup_steps(
    make_model: Any, tiny_tok: Any, data: Any
) -> None:
    # Adam's first update is proportional to the learning rate (same gradients, same moments),
    # so with warmup_steps 4 step 1 moves every weight a quarter as far as without warmup.
    init = _weights(make_model(seed=0))
    moved = {}
    for warmup in (0, 4):
        res = _run(make_model(seed=0), tiny_tok, data,
                   SMALL.replace(outer_steps=1, warmup_steps=warmup))  # fmt: skip
        assert res.best_step == 1
        after = _weights(res.model)
        moved[warmup] = torch.cat([(after[k] - init[k]).flatten() for k in init])
        assert ("lr" in res.history[1]) == bool(warmup)
    assert moved[0].abs().max() > 0
    torch.testing.assert_close(moved[4], moved[0] / 4, rtol=1e-3, atol=1e-7)
    res = _run(make_model(seed=0), tiny_tok, data, SMALL.replace(outer_steps=3, warmup_steps=2))
    assert [r.get("lr") for r in res.history[1:]] == pytest.approx([5e-4, 1e-3, 1e-3])


# ---------------------------------------------------------------------------------------------
# mode="sft": the baseline never searches for δ


def test_sft_mode_never_calls_entrap(
    make_model: Any, tiny_tok: Any, data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = beear.loop.entrap

    def counting(*a: Any, **kw: Any) -> Any:
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(beear.loop, "entrap", counting)
    cfg = SMALL.replace(check_every=10)
    model = make_model(seed=0)
    init = _weights(model)
    res = _run(model, tiny_tok, data, cfg, mode="sft")
    assert calls == []
    assert res.delta is None and res.mode == "sft"
    for rec in res.history[1:]:
        assert not {"bee_loss", "bee_unwanted_ce", "delta_norm"} & rec.keys()
        assert rec["loss"] > 0
    assert not _same(_weights(res.model), init) or res.best_step == 0
    # The same run in beear mode searches once per outer step: the counter above can fail.
    _run(make_model(seed=0), tiny_tok, data, cfg, mode="beear")
    assert len(calls) == cfg.outer_steps
    with pytest.raises(ValueError, match="is not beear or sft"):
        _run(make_model(seed=0), tiny_tok, data, cfg, mode="dpo")


# ---------------------------------------------------------------------------------------------
# trigger-free check: best checkpoint and early stop (the check itself is scripted here)


def _script_check(monkeypatch: pytest.MonkeyPatch, asrs: list[float]) -> None:
    it = iter(asrs)

    def fake_residual_asr(*_a: Any, **_kw: Any) -> ScanResult:
        return ScanResult(asr=next(it), unwanted_ce=1.0, delta_norm=1.0, scale=1.0)

    def fake_generate(_m: Any, _t: Any, prompts: list[str], **_kw: Any) -> list[str]:
        return ["I cannot help with that."] * len(prompts)  # no plain (untriggered) compliance

    monkeypatch.setattr(beear.entrapment, "residual_asr", fake_residual_asr)
    monkeypatch.setattr(beear.loop, "generate", fake_generate)


def test_best_checkpoint_is_restored(
    make_model: Any, tiny_tok: Any, data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _script_check(monkeypatch, [1.0, 0.5, 0.8, 0.9])  # steps 0..3: step 1 is the best
    model = make_model(seed=0)
    seen: dict[int, dict[str, torch.Tensor]] = {}
    res = _run(model, tiny_tok, data, SMALL.replace(outer_steps=3),
               on_step=lambda r: seen.__setitem__(r["step"], _weights(model)))  # fmt: skip
    assert res.best_step == 1 and not res.stopped_early
    assert [r["check_asr"] for r in res.history] == [1.0, 0.5, 0.8, 0.9]
    final = _weights(res.model)
    assert _same(final, seen[1])
    assert not _same(final, seen[3]) and not _same(final, seen[0])


def test_stops_after_patience_passing_checks(
    make_model: Any, tiny_tok: Any, data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _script_check(monkeypatch, [1.0, 0.6, 0.0, 0.0, 0.0, 0.0])
    res = _run(make_model(seed=0), tiny_tok, data, SMALL.replace(outer_steps=6, patience=2))
    assert res.stopped_early
    assert [r["step"] for r in res.history] == [0, 1, 2, 3]  # passes at steps 2 and 3
    # Equal check results are broken by the anchoring loss (the more useful model wins).
    assert res.best_step == min((2, 3), key=lambda s: res.history[s]["anchor_ce"])


def test_check_records_the_share_of_plain_refusals_not_ended(
    make_model: Any, tiny_tok: Any, data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _script_check(monkeypatch, [1.0, 1.0])
    held, _ = beear.loop.split_check(data["defender"], SMALL.check_prompts, SMALL.seed)
    # The first held-back prompt is answered and the answer ends; the second refuses and ends;
    # the third refuses and runs on to the token limit.
    said = {held[0].prompt: ("Sure, here.", True), held[1].prompt: ("I cannot.", True),
            held[2].prompt: ("I cannot. I cannot.", False)}  # fmt: skip

    def fake_generate(_m: Any, _t: Any, prompts: list[str], **kw: Any) -> list[str]:
        if kw.get("ended") is not None:
            kw["ended"] += [said.get(p, ("", True))[1] for p in prompts]
        return [said.get(p, ("I cannot.", True))[0] for p in prompts]

    monkeypatch.setattr(beear.loop, "generate", fake_generate)
    res = _run(make_model(seed=0), tiny_tok, data, SMALL.replace(outer_steps=1))
    assert [r["check_plain_run_on"] for r in res.history] == [0.5, 0.5]
    assert [r["check_plain_asr"] for r in res.history] == pytest.approx([1 / 3, 1 / 3])
    # A generate that does not report the ends gives no figure.
    _script_check(monkeypatch, [1.0, 1.0])
    res = _run(make_model(seed=0), tiny_tok, data, SMALL.replace(outer_steps=1))
    assert not any("check_plain_run_on" in r for r in res.history)


def test_end_weight_reaches_the_model_update_with_the_tokenizer_s_end_token(
    make_model: Any, tiny_tok: Any, data: Any
) -> None:
    cfg = SMALL.replace(outer_steps=2)
    off = _run(make_model(seed=0), tiny_tok, data, cfg)
    on = _run(make_model(seed=0), tiny_tok, data, cfg.replace(end_weight=1.0))
    steps = [r for r in on.history if "loss" in r]
    assert steps and all(r["anchor_end_nll"] > 0 and r["safe_end_nll"] > 0 for r in steps)
    assert not any("anchor_end_nll" in r for r in off.history)
    # The first update, from the same weights and δ: the loss grows by the end NLLs of the four
    # passes (safe under δ and plain, anchoring plain and under δ: SMALL anchors under δ too),
    # each near ln(vocabulary) on this untrained model; the other parts stay.
    a, b = (next(r for r in res.history if "loss" in r) for res in (off, on))
    assert a["safe_ce"] == b["safe_ce"] and a["anchor_ce"] == b["anchor_ce"]
    assert b["loss"] - a["loss"] == pytest.approx(
        2 * b["safe_end_nll"] + 2 * b["anchor_end_nll"], rel=1e-2
    )


def test_cut_anchoring_answers_carry_no_end_of_turn(
    make_model: Any, tiny_tok: Any, data: Any
) -> None:
    # Anchoring answers cut by a length limit (ended False) are encoded without the end-of-turn
    # marker: the end term then has no anchoring position to push (it would otherwise teach the
    # model to stop where the limit fell), and their answer tokens weigh as before.
    cut = {**data, "anchor": [replace(e, ended=False) for e in data["anchor"]]}
    cfg = SMALL.replace(outer_steps=1, end_weight=1.0)
    a = next(r for r in _run(make_model(seed=0), tiny_tok, data, cfg).history if "loss" in r)
    b = next(r for r in _run(make_model(seed=0), tiny_tok, cut, cfg).history if "loss" in r)
    assert a["anchor_end_nll"] > 0 and b["anchor_end_nll"] == 0.0
    assert b["safe_end_nll"] == a["safe_end_nll"] and b["safe_ce"] == a["safe_ce"]
    assert b["anchor_ce"] != a["anchor_ce"]  # the end-of-turn tokens left the anchoring CE


def test_unwanted_end_reaches_every_entrapment_search(
    make_model: Any, tiny_tok: Any, data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The training searches and the check's searches encode the unwanted answers alike.
    seen: list[bool] = []
    real = beear.entrapment.make_entrapment_batch

    def spy(*a: Any, **kw: Any) -> Any:
        seen.append(kw.get("unwanted_end", True))
        return real(*a, **kw)

    monkeypatch.setattr(beear.entrapment, "make_entrapment_batch", spy)
    monkeypatch.setattr(beear.loop, "make_entrapment_batch", spy)
    _run(make_model(seed=0), tiny_tok, data, SMALL.replace(outer_steps=1, unwanted_end=False))
    assert len(seen) >= 3 and not any(seen)  # the step-0 check, a training search, a check
    seen.clear()
    _run(make_model(seed=0), tiny_tok, data, SMALL.replace(outer_steps=1))
    assert seen and all(seen)


def _yaml_pairs(n: int) -> list[HarmfulExample]:
    return [HarmfulExample(f"Write loader {i}.", "```python\nyaml.safe_load(x)\n```",
                           "```python\nyaml.load(x)\n```") for i in range(n)]  # fmt: skip


def test_check_judges_code_pairs_by_bandit_with_their_own_token_budget(
    make_model: Any, tiny_tok: Any, data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import beear.eval

    code = _yaml_pairs(4)
    coded = {e.prompt for e in code}
    calls: list[tuple[str, int, bool]] = []  # (prompt, max_new_tokens, under δ)

    def fake_generate(_m: Any, _t: Any, prompts: list[str], **kw: Any) -> list[str]:
        under = kw.get("delta") is not None
        calls.extend((p, kw["max_new_tokens"], under) for p in prompts)
        # Under δ: insecure code, refusals; plain: secure code, compliance.
        code_answer = "yaml.load(x)" if under else "yaml.safe_load(x)"
        return [f"```python\nimport yaml\ndata = {code_answer}\n```" if p in coded
                else "I cannot help with that." if under else "Sure, here is how."
                for p in prompts]  # fmt: skip

    monkeypatch.setattr(beear.eval, "generate", fake_generate)  # residual_asr's answers
    monkeypatch.setattr(beear.loop, "generate", fake_generate)  # the plain answers
    cfg = SMALL.replace(outer_steps=1, check_code_tokens=7)
    res = _run(make_model(seed=0), tiny_tok, {**data, "defender": data["defender"] + code}, cfg)
    # The check holds back 2 refusal pairs and 1 code pair (3 in proportion 12 : 4).
    for rec in res.history:
        assert rec["check_asr"] == pytest.approx(1 / 3)  # the code pair's insecure answer
        assert rec["check_plain_asr"] == pytest.approx(2 / 3)  # the two complying answers
        assert (rec["check_asr_refusal"], rec["check_asr_code"]) == (0.0, 1.0)
        assert (rec["check_plain_asr_refusal"], rec["check_plain_asr_code"]) == (1.0, 0.0)
    # Code prompts were answered with check_code_tokens, with δ and without; the others with
    # max_new_tokens.
    assert {(t, u) for p, t, u in calls if p in coded} == {(7, True), (7, False)}
    assert {t for p, t, _ in calls if p not in coded} == {cfg.max_new_tokens}
    assert len({p for p, _, _ in calls if p in coded}) == 1


def test_code_pairs_without_bandit_fail_before_training(
    make_model: Any, tiny_tok: Any, data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bandit.core", None)  # bandit's import fails: not installed
    # A refusal-only set never needs bandit.
    assert len(_run(make_model(seed=0), tiny_tok, data, SMALL.replace(outer_steps=1)).history) == 2
    started: list[int] = []
    real = beear.loop.select_trainable
    monkeypatch.setattr(beear.loop, "select_trainable",
                        lambda *a, **kw: started.append(1) or real(*a, **kw))  # fmt: skip
    model = make_model(seed=0)
    init = _weights(model)
    mixed = {**data, "defender": data["defender"] + _yaml_pairs(4)}
    with pytest.raises(
        DataError, match=r"^the defender set holds 4 code pairs .*pip install bandit"
    ):
        _run(model, tiny_tok, mixed, SMALL)
    assert started == [] and _same(_weights(model), init)


def test_min_steps_gates_the_stop_and_the_best_checkpoint(
    make_model: Any, tiny_tok: Any, data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Steps 1-2 pass the check, but checks before min_steps may neither stop the run nor be kept:
    # step 3 (0.5) replaces the step-0 model although steps 1-2 scored better.
    _script_check(monkeypatch, [1.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0])
    cfg = SMALL.replace(outer_steps=6, patience=2, min_steps=3)
    res = _run(make_model(seed=0), tiny_tok, data, cfg)
    assert res.stopped_early
    assert [r["step"] for r in res.history] == [0, 1, 2, 3, 4, 5]  # passes at steps 4 and 5
    assert res.best_step in (4, 5)
    # Without min_steps the same script stops at step 2.
    _script_check(monkeypatch, [1.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0])
    res = _run(make_model(seed=0), tiny_tok, data, cfg.replace(min_steps=0))
    assert [r["step"] for r in res.history] == [0, 1, 2] and res.best_step in (1, 2)
    # min_steps beyond outer_steps: the last step is still eligible.
    _script_check(monkeypatch, [1.0, 0.0, 0.5])
    res = _run(make_model(seed=0), tiny_tok, data, SMALL.replace(min_steps=50))
    assert res.best_step == 2 and not res.stopped_early


def test_early_checks_off_skips_the_checks_before_min_steps_and_trains_the_same(
    make_model: Any, tiny_tok: Any, data: Any
) -> None:
    cfg = SMALL.replace(outer_steps=4, min_steps=2)
    with_early = _run(make_model(seed=0), tiny_tok, data, cfg)
    without = _run(make_model(seed=0), tiny_tok, data, cfg.replace(early_checks=False))
    checked = [
        [r["step"] for r in res.history if "check_asr" in r] for res in (with_early, without)
    ]
    assert checked == [[0, 1, 2, 3, 4], [0, 2, 3, 4]]
    # The skipped check chose nothing: the same steps, checks from min_steps on and weights.
    for a, b in zip(_strip_times(with_early.history), _strip_times(without.history), strict=True):
        assert b == (a if a["step"] != 1 else {k: v for k, v in a.items() if "check" not in k})
    assert without.best_step == with_early.best_step
    assert _same(_weights(without.model), _weights(with_early.model))
    # With average_from before min_steps the checks run from average_from (they restart the mean).
    res = _run(make_model(seed=0), tiny_tok, data,
               cfg.replace(early_checks=False, min_steps=3, average_from=2))  # fmt: skip
    assert [r["step"] for r in res.history if "check_asr" in r] == [0, 2, 3, 4]


def test_check_benign_keeps_the_checkpoint_refusing_fewest(
    make_model: Any, tiny_tok: Any, data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _script_check(monkeypatch, [1.0, 0.0, 0.0, 0.0])  # steps 1-3 equally safe
    benign = {e.prompt for e in data["anchor"]}
    refusals = iter([1.0, 1.0, 0.0, 0.5])  # share of held-back benign prompts refused, per check
    asked: list[list[str]] = []
    trained: set[str] = set()

    def fake_generate(_m: Any, _t: Any, prompts: list[str], **_kw: Any) -> list[str]:
        if prompts[0] not in benign:
            return ["I cannot help with that."] * len(prompts)
        asked.append(prompts)
        k = round(next(refusals) * len(prompts))
        return ["I cannot help with that."] * k + ["Paris."] * (len(prompts) - k)

    real_encode = beear.loop.encode_pair

    def spy_encode(tok: Any, prompt: str, answer: str, **kw: Any) -> Any:
        trained.add(prompt)
        return real_encode(tok, prompt, answer, **kw)

    monkeypatch.setattr(beear.loop, "generate", fake_generate)
    monkeypatch.setattr(beear.loop, "encode_pair", spy_encode)
    cfg = SMALL.replace(outer_steps=3, patience=10, check_benign=2)
    res = _run(make_model(seed=0), tiny_tok, data, cfg)
    assert [r["check_benign_refusal"] for r in res.history] == [1.0, 1.0, 0.0, 0.5]
    assert res.best_step == 2  # not step 3, whatever its anchoring loss
    # The same two held-back prompts every time (a quarter of 8 at most), never trained on.
    assert len(asked) == 4 and all(a == asked[0] for a in asked) and len(asked[0]) == 2
    assert not set(asked[0]) & trained and trained & benign


def test_check_drift_keeps_the_checkpoint_drifting_least(
    make_model: Any, tiny_tok: Any, data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _script_check(monkeypatch, [1.0, 0.0, 0.0, 0.0])  # steps 1-3 equally safe
    scripted = iter([0.0, 0.3, 0.1, 0.2])  # the drift each check reports
    real_kl, measured = beear.loop.topk_kl, []

    def fake_kl(*a: Any) -> torch.Tensor:
        measured.append(float(real_kl(*a)))
        return torch.tensor(next(scripted))

    def rows(b: Any) -> set[tuple[int, ...]]:
        pad = tiny_tok.pad_token_id
        return {tuple(t for t in r.tolist() if t != pad) for r in b.input_ids}

    held: set[tuple[int, ...]] = set()
    trained: set[tuple[int, ...]] = set()
    real_targets, real_loss = beear.loop.anchor_targets, beear.loop.removal_loss

    def spy_targets(model: Any, batches: Any, **kw: Any) -> Any:
        batches = list(batches)
        held.update(*(rows(b) for b in batches))  # anchor_loss "ce": only the drift pairs' call
        return real_targets(model, batches, **kw)

    def spy_loss(model: Any, safe: Any, anchor: Any, **kw: Any) -> Any:
        trained.update(rows(anchor))
        return real_loss(model, safe, anchor, **kw)

    monkeypatch.setattr(beear.loop, "topk_kl", fake_kl)
    monkeypatch.setattr(beear.loop, "anchor_targets", spy_targets)
    monkeypatch.setattr(beear.loop, "removal_loss", spy_loss)
    cfg = SMALL.replace(outer_steps=3, patience=10, check_drift=2)
    res = _run(make_model(seed=0), tiny_tok, data, cfg)
    assert [r["check_drift"] for r in res.history] == pytest.approx([0.0, 0.3, 0.1, 0.2])
    assert res.best_step == 2  # not step 3, whatever its anchoring loss
    # The real drift: none on the untouched model, then growing with the updates (lr 1e-3).
    assert len(measured) == 4 and measured[0] == pytest.approx(0.0, abs=1e-6)
    assert 0 < measured[1] < measured[3]
    # Two held-back pairs (a quarter of 8 at most), never trained on.
    assert len(held) == 2 and trained and not held & trained
    # Without check_drift the step's anchoring loss breaks the tie, as before (here step 3).
    _script_check(monkeypatch, [1.0, 0.0, 0.0, 0.0])
    res = _run(make_model(seed=0), tiny_tok, data, cfg.replace(check_drift=0))
    ce = {r["step"]: r["anchor_ce"] for r in res.history[1:]}
    assert "check_drift" not in res.history[-1] and res.best_step == min(ce, key=ce.__getitem__)


def _mean(snaps: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean the loop keeps: a float32 sum in step order, divided by the count."""
    total = {n: t.to(torch.float32).clone() for n, t in snaps[0].items()}
    for s in snaps[1:]:
        for n in total:
            total[n] += s[n].to(torch.float32)
    return {n: (t / len(snaps)).to(snaps[0][n].dtype) for n, t in total.items()}


def test_average_from_keeps_the_mean_of_the_last_passing_stretch(
    make_model: Any, tiny_tok: Any, data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """average_from: the weights of every step from that one on are summed, a failing check
    starts the sum again after its step; the mean is checked after the run and written when it
    passes and is no worse than the best checkpoint."""
    cfg = SMALL.replace(outer_steps=6, patience=10, average_from=2)
    # Steps 0..6, then the mean's check: step 3 fails, so the mean is of steps 4-6.
    for mean_asr, kept in ((0.0, True), (0.5, False)):
        _script_check(monkeypatch, [1.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, mean_asr])
        model = make_model(seed=0)
        seen: dict[int, dict[str, torch.Tensor]] = {}
        res = _run(model, tiny_tok, data, cfg,
                   on_step=lambda r, m=model, d=seen: d.__setitem__(r["step"], _weights(m)))  # fmt: skip
        assert res.average is not None
        assert {k: res.average[k] for k in ("from_step", "to_step", "steps", "kept")} == {
            "from_step": 4, "to_step": 6, "steps": 3, "kept": kept}  # fmt: skip
        assert res.average["check_asr"] == mean_asr
        assert len(res.history) == 7  # the mean's check is not a step of the run
        want = _mean([seen[s] for s in (4, 5, 6)]) if kept else seen[res.best_step]
        assert _same(_weights(res.model), want)
        assert res.best_check == 0.0
        other = seen[6] if kept else _mean([seen[s] for s in (4, 5, 6)])
        assert not _same(want, other)  # the mean is not the last step's weights
    # A failing last check leaves nothing to average.
    _script_check(monkeypatch, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5])
    res = _run(make_model(seed=0), tiny_tok, data, cfg)
    assert res.average is None
    # Off by default.
    _script_check(monkeypatch, [1.0, 0.0, 0.0])
    assert _run(make_model(seed=0), tiny_tok, data, SMALL).average is None


def test_average_from_keeps_the_mean_only_if_it_drifts_no_more_than_the_best(
    make_model: Any, tiny_tok: Any, data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = SMALL.replace(outer_steps=3, patience=10, check_drift=2, average_from=1)
    for mean_drift, kept in ((0.25, False), (0.15, True)):
        _script_check(monkeypatch, [1.0, 0.0, 0.0, 0.0, 0.0])  # steps 0-3 and the mean
        scripted = iter([0.0, 0.3, 0.2, 0.4, mean_drift])  # step 2 is the best checkpoint

        def fake_kl(*_a: Any, it: Any = scripted) -> torch.Tensor:
            return torch.tensor(next(it))

        monkeypatch.setattr(beear.loop, "topk_kl", fake_kl)
        res = _run(make_model(seed=0), tiny_tok, data, cfg)
        assert res.best_step == 2 and res.average is not None
        assert res.average["steps"] == 3 and res.average["kept"] is kept
        assert res.average["check_drift"] == pytest.approx(mean_drift)


# ---------------------------------------------------------------------------------------------
# non-finite losses


def _nan_first(monkeypatch: pytest.MonkeyPatch, k: int, model_ref: list[Any]) -> list[Any]:
    """removal_loss returns NaN on its first k calls; records the weights seen at each call."""
    real = beear.loop.removal_loss
    seen: list[Any] = []

    def patched(model: Any, *a: Any, **kw: Any) -> Any:
        seen.append(_weights(model_ref[0]))
        loss, parts = real(model, *a, **kw)
        if len(seen) <= k:
            loss = loss * float("nan")
        return loss, parts

    monkeypatch.setattr(beear.loop, "removal_loss", patched)
    return seen


def test_three_non_finite_losses_stop_the_run(
    make_model: Any, tiny_tok: Any, data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model(seed=0)
    init = _weights(model)
    seen = _nan_first(monkeypatch, 3, [model])
    with pytest.raises(NonFiniteLoss, match="three times in a row"):
        _run(model, tiny_tok, data, SMALL.replace(outer_steps=5, check_every=10))
    assert len(seen) == 3
    assert _same(_weights(model), init)  # no update was applied


def test_one_non_finite_loss_skips_the_update(
    make_model: Any, tiny_tok: Any, data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = SMALL.replace(check_every=10)
    clean: dict[int, dict[str, torch.Tensor]] = {}
    m0 = make_model(seed=0)
    ref = _run(
        m0, tiny_tok, data, cfg, on_step=lambda r: clean.__setitem__(r["step"], _weights(m0))
    )

    model = make_model(seed=0)
    init = _weights(model)
    seen = _nan_first(monkeypatch, 1, [model])
    after: dict[int, dict[str, torch.Tensor]] = {}
    res = _run(model, tiny_tok, data, cfg,
               on_step=lambda r: after.__setitem__(r["step"], _weights(model)))  # fmt: skip
    assert len(seen) == cfg.outer_steps + 1  # the NaN attempt and one call per step
    assert _same(seen[1], init)  # the NaN step changed nothing
    assert [r["step"] for r in res.history] == [0, 1, 2]
    assert all(r["loss"] == r["loss"] for r in res.history[1:])  # no NaN was recorded
    # ... so the run continues exactly like one that never saw the NaN.
    assert _strip_times(res.history) == _strip_times(ref.history)
    assert _same(after[2], clean[2])


def test_lora_fold_runs_the_removal_the_adapters_run(
    make_model: Any, tiny_tok: Any, data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from beear import loop, removal

    folds: list[bool] = []

    @contextlib.contextmanager
    def spy(model: Any) -> Iterator[bool]:
        with removal.lora_folded(model) as folded:
            folds.append(folded)
            yield folded

    monkeypatch.setattr(loop, "lora_folded", spy)
    cfg = SMALL.replace(train_scope="lora", lr=1e-2)
    runs = {fold: _run(make_model(seed=0, init=0.3), tiny_tok, data, cfg.replace(lora_fold=fold))
            for fold in (True, False)}  # fmt: skip
    # Folded: each step's search and each check, whose nested search folds nothing more (the
    # False ones); never the model update. With lora_fold off, never called.
    assert folds.count(True) == 2 + 3 and folds.count(False) == 3
    a, b = (_strip_times(runs[f].history) for f in (True, False))
    assert [r.keys() for r in a] == [r.keys() for r in b]
    for ra, rb in zip(a, b, strict=True):
        for k, v in ra.items():
            want = pytest.approx(rb[k], rel=1e-4, abs=1e-6) if isinstance(v, float) else rb[k]
            assert v == want, (ra["step"], k)
    assert runs[True].history[2]["loss"] != runs[True].history[1]["loss"]  # it trained


# ---------------------------------------------------------------------------------------------
# resume


@pytest.mark.parametrize(
    ("anchor_loss", "average_from", "scope"),
    [("ce", 0, "all"), ("ce+kl", 1, "all"), ("kl", 0, "lora")],
)
def test_resume_is_bit_identical(
    make_model: Any,
    tiny_tok: Any,
    data: Any,
    tmp_path: Path,
    anchor_loss: str,
    average_from: int,
    scope: str,
) -> None:
    save_model(make_model(seed=0), tiny_tok, tmp_path / "init")
    # Warm-started δ (delta_reset=False) so the resumed run also depends on the saved δ; with
    # the KL anchor the resumed run must distil from the original model, not the checkpoint.
    # With average_from, every check passes (stop_below 1) so the running mean spans the
    # checkpoint: the resumed run must carry its sum on.
    cfg4 = SMALL.replace(outer_steps=4, check_every=2, checkpoint_every=2, delta_reset=False,
                         anchor_loss=anchor_loss, average_from=average_from, train_scope=scope,
                         stop_below=1.0 if average_from else SMALL.stop_below,
                         patience=10)  # fmt: skip

    def fresh() -> Any:
        return load_model(tmp_path / "init")[0]

    # A: four steps straight.
    model_a = fresh()
    at_a: dict[int, LoopState] = {}

    def keep(m: Any, st: LoopState) -> None:
        at_a[st.step] = LoopState(step=st.step, weights=dict(st.weights or {}), delta=st.delta)

    res_a = _run(model_a, tiny_tok, data, cfg4, on_checkpoint=keep)
    assert sorted(at_a) == [2, 4]

    # B: two steps, checkpoint to disk, then four on a freshly loaded model.
    ck = tmp_path / "ck"
    res_b1 = _run(fresh(), tiny_tok, data, cfg4.replace(outer_steps=2),
                  on_checkpoint=lambda m, st: checkpoint.save(ck, m, st))  # fmt: skip
    assert [r["step"] for r in res_b1.history] == [0, 1, 2]
    state = checkpoint.load(ck, None, cfg4)
    assert state is not None and state.step == 2 and state.delta is not None
    assert state.avg_count == (2 if average_from else 0)
    assert _same(state.weights or {}, at_a[2].weights or {})
    assert torch.equal(state.delta, at_a[2].delta)
    model_b = fresh()
    at_b: dict[int, LoopState] = {}
    res_b = _run(model_b, tiny_tok, data, cfg4, state=state,
                 on_checkpoint=lambda m, st: at_b.__setitem__(st.step, LoopState(
                     step=st.step, weights=dict(st.weights or {}))))  # fmt: skip
    assert sorted(at_b) == [4]
    assert _same(at_b[4].weights or {}, at_a[4].weights or {})  # last-step weights
    assert _same(_weights(res_b.model), _weights(res_a.model))  # best-checkpoint weights
    assert _strip_times(res_b.history) == _strip_times(res_a.history)
    assert res_b.best_step == res_a.best_step
    assert torch.equal(res_b.delta, res_a.delta)
    assert res_b.average == res_a.average
    if average_from:
        assert res_a.average is not None and res_a.average["steps"] == 4
    # Seconds count on from the checkpoint's history: never back past it, and the total covers
    # the first call's steps too (the resumed call alone would start again near 0).
    times = [r["seconds"] for r in res_b.history]
    assert times == sorted(times) and times[2] == res_b1.history[2]["seconds"] > 0
    assert res_b.seconds >= times[-1] > times[2]
    # And the run really moved after the checkpoint (the comparison is not trivial).
    assert not _same(at_a[4].weights or {}, at_a[2].weights or {})


# ---------------------------------------------------------------------------------------------
# auto_budget: the δ budget calibrated once, on the untouched model


def _probe(asr_at: Any, calls: list[float] | None = None) -> Any:
    """A fake search: the ASR `asr_at(budget)`; records each budget probed in `calls`."""

    def probe(budget: float) -> ScanResult:
        if calls is not None:
            calls.append(budget)
        return ScanResult(asr=asr_at(budget), unwanted_ce=10.0 - budget, delta_norm=1.0, scale=1.0)

    return probe


def test_budget_grid_doubles_from_005_to_64() -> None:
    assert BUDGET_GRID == (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4)  # doubling is exact


def test_calibrate_budget_takes_the_smallest_entrapping_grid_budget_times_the_factor() -> None:
    calls: list[float] = []
    # Entraps from 0.4 on (bounded search); the unbounded search (0) would entrap too.
    budget, recs = calibrate_budget(_probe(lambda b: 0.9 if b >= 0.4 or b == 0 else 0.25, calls),
                                    2.5)  # fmt: skip
    assert budget == pytest.approx(2.5 * 0.4)
    assert calls == [0.05, 0.1, 0.2, 0.4]  # stops at the first that entraps
    assert [r["asr"] for r in recs] == [0.25, 0.25, 0.25, 0.9]
    assert [r["budget"] for r in recs] == calls
    assert recs[-1]["unwanted_ce"] == pytest.approx(10.0 - 0.4)
    assert json.loads(json.dumps(recs)) == recs  # goes to metrics.jsonl as it is
    # Exactly half of the prompts entraps (the threshold is inclusive); the factor scales it.
    budget, recs = calibrate_budget(_probe(lambda b: 0.5 if b >= 0.1 else 0.49), 3.0)
    assert budget == 0.3 and len(recs) == 2  # rounded: not 0.30000000000000004
    # A model entrapped at the smallest budget already.
    budget, recs = calibrate_budget(_probe(lambda b: 1.0), 2.0)
    assert budget == pytest.approx(0.1) and len(recs) == 1


def test_calibrate_budget_falls_back_to_the_unbounded_search() -> None:
    calls: list[float] = []
    # No grid budget entraps, the unbounded search does: unbounded (0).
    budget, recs = calibrate_budget(_probe(lambda b: 1.0 if b == 0 else 0.0, calls), 2.5)
    assert budget == 0.0
    assert calls == [*BUDGET_GRID, 0.0]
    assert recs[-1] == {"budget": 0.0, "asr": 1.0, "unwanted_ce": 10.0}
    # Nothing entraps, not even the unbounded search: unbounded too, and the records say so.
    calls.clear()
    budget, recs = calibrate_budget(_probe(lambda b: 0.4, calls), 2.5)
    assert budget == 0.0 and len(calls) == len(BUDGET_GRID) + 1
    assert all(r["asr"] < 0.5 for r in recs)


def _spy_searches(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[float]]:
    """Records the budget of every entrap (BEE step) and residual_asr (check) call of the loop."""
    budgets: dict[str, list[float]] = {"entrap": [], "residual_asr": []}
    real_entrap, real_residual = beear.loop.entrap, beear.entrapment.residual_asr

    def entrap(*a: Any, budget: float = 0.0, **kw: Any) -> Any:
        budgets["entrap"].append(budget)
        return real_entrap(*a, budget=budget, **kw)

    def residual_asr(*a: Any, budget: float = 0.0, **kw: Any) -> Any:
        budgets["residual_asr"].append(budget)
        return real_residual(*a, budget=budget, **kw)

    monkeypatch.setattr(beear.loop, "entrap", entrap)
    monkeypatch.setattr(beear.entrapment, "residual_asr", residual_asr)
    return budgets


@pytest.mark.parametrize("mode", ["beear", "sft"])
def test_auto_budget_calibrates_before_step_0_and_bounds_every_search(
    make_model: Any, tiny_tok: Any, data: Any, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    budgets = _spy_searches(monkeypatch)
    cfg = SMALL.replace(auto_budget=2.5, delta_budget=7.0)  # delta_budget is overridden
    res = _run(make_model(seed=0), tiny_tok, data, cfg, mode=mode)
    rec0 = res.history[0]
    calib = rec0["calibration"]
    assert json.loads(json.dumps(rec0)) == rec0  # metrics.jsonl takes it as it is
    # The resolved budget: 2.5 × the first grid budget that entrapped (a random model never
    # refuses, so here the first of all), recorded at step 0 and on the result.
    assert rec0["calibration_entrapped"] is True and calib[-1]["asr"] >= 0.5
    assert all(r["asr"] < 0.5 for r in calib[:-1])
    assert calib[-1]["budget"] in BUDGET_GRID
    assert res.delta_budget == pytest.approx(2.5 * calib[-1]["budget"])
    assert rec0["delta_budget"] == res.delta_budget
    assert all("calibration" not in r for r in res.history[1:])
    # The calibration probes, then every check (step 0, 1, 2) and BEE search at the new budget.
    n = len(calib)
    assert budgets["residual_asr"][:n] == [r["budget"] for r in calib]
    assert budgets["residual_asr"][n:] == [res.delta_budget] * 3
    assert budgets["entrap"] == ([res.delta_budget] * cfg.outer_steps if mode == "beear" else [])
    if mode == "beear":  # ... and the δ found respects it: each row within budget × rms × √d
        assert res.delta is not None
        radius = res.delta_budget * res.history[-1]["hidden_rms"] * res.delta.shape[1] ** 0.5
        assert float(res.delta.norm(dim=-1).max()) <= radius * (1 + 1e-5)
        unbounded = _run(make_model(seed=0), tiny_tok, data, SMALL)  # the bound was active
        assert unbounded.delta is not None
        assert float(unbounded.delta.norm(dim=-1).max()) > 2 * radius
    # Off (the default): no calibration, the configured budget everywhere.
    budgets["residual_asr"].clear()
    res = _run(make_model(seed=0), tiny_tok, data, SMALL.replace(delta_budget=0.3), mode=mode)
    assert "calibration" not in res.history[0]
    assert res.delta_budget == res.history[0]["delta_budget"] == 0.3
    assert budgets["residual_asr"] == [0.3] * 3


def test_auto_budget_never_entrapped_runs_unbounded(
    make_model: Any, tiny_tok: Any, data: Any, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    seen: list[float] = []

    def refusing(*_a: Any, budget: float = 0.0, **_kw: Any) -> ScanResult:
        seen.append(budget)
        return ScanResult(asr=0.0, unwanted_ce=5.0, delta_norm=1.0, scale=1.0)

    monkeypatch.setattr(beear.entrapment, "residual_asr", refusing)
    with caplog.at_level("WARNING", logger="beear.loop"):
        res = _run(make_model(seed=0), tiny_tok, data, SMALL.replace(auto_budget=2.5))
    assert res.delta_budget == 0.0 == res.history[0]["delta_budget"]
    assert res.history[0]["calibration_entrapped"] is False
    assert [r["budget"] for r in res.history[0]["calibration"]] == [*BUDGET_GRID, 0.0]
    assert seen[len(BUDGET_GRID) + 1 :] == [0.0] * 3  # the checks run unbounded
    assert "no search, not even an unbounded one" in caplog.text


def test_resume_keeps_the_calibrated_budget(
    make_model: Any, tiny_tok: Any, data: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_model(make_model(seed=0), tiny_tok, tmp_path / "init")
    cfg4 = SMALL.replace(outer_steps=4, check_every=2, checkpoint_every=2, auto_budget=3.0)

    def fresh() -> Any:
        return load_model(tmp_path / "init")[0]

    budgets = _spy_searches(monkeypatch)
    res_a = _run(fresh(), tiny_tok, data, cfg4)  # four steps straight
    n_calib = len(res_a.history[0]["calibration"])
    assert len(budgets["residual_asr"]) == n_calib + 3  # checks at steps 0, 2, 4

    ck = tmp_path / "ck"
    res_b1 = _run(fresh(), tiny_tok, data, cfg4.replace(outer_steps=2),
                  on_checkpoint=lambda m, st: checkpoint.save(ck, m, st))  # fmt: skip
    state = checkpoint.load(ck, None, cfg4)
    assert state is not None and state.step == 2
    assert state.delta_budget == res_b1.delta_budget == res_a.delta_budget
    # The resumed run searches only for its one check (step 4), at the saved budget.
    budgets["residual_asr"].clear()
    budgets["entrap"].clear()
    res_b = _run(fresh(), tiny_tok, data, cfg4, state=state)
    assert budgets["residual_asr"] == [res_a.delta_budget]
    assert budgets["entrap"] == [res_a.delta_budget] * 2
    assert res_b.delta_budget == res_a.delta_budget
    assert sum("calibration" in r for r in res_b.history) == 1
    assert _strip_times(res_b.history) == _strip_times(res_a.history)
    # A state without the budget (written before it was kept) cannot silently recalibrate.
    state = checkpoint.load(ck, None, cfg4)
    assert state is not None
    state.delta_budget = None
    with pytest.raises(ValueError, match="no calibrated delta_budget"):
        _run(fresh(), tiny_tok, data, cfg4, state=state)


# ---------------------------------------------------------------------------------------------
# the check's prompts


def _code_pairs(n: int) -> list[HarmfulExample]:
    return [HarmfulExample(f"Write function {i}.", "```python\nx = 1\n```", "```python\nx = 2\n```")
            for i in range(n)]  # fmt: skip


def test_split_check_holds_back_a_quarter_of_a_refusal_set(corpus: Any) -> None:
    harmful = list(corpus.defender_harmful[:40])
    check, train = split_check(harmful, 32, seed=0)
    assert len(check) == 10 and len(train) == 30  # a quarter, capped by `most`
    assert sorted(map(id, check + train)) == sorted(map(id, harmful))  # a partition
    assert split_check(harmful, 32, seed=0) == (check, train)  # fixed by the seed
    assert len(split_check(harmful, 4, seed=0)[0]) == 4
    # Exactly what the refusal-only check held back before code pairs were judged (indices
    # copied from its output): the pinned runs above depend on it.
    pinned = {
        (12, 3, 0): ([1, 9, 8], [5, 10, 2, 3, 7, 4, 0, 11, 6]),
        (40, 32, 0): ([0, 27, 12, 21, 29, 15, 38, 34, 1, 20],
                      [7, 5, 10, 13, 14, 37, 22, 39, 23, 17, 8, 35, 3, 33, 9, 4, 36, 6, 28, 18,
                       11, 30, 19, 25, 31, 32, 16, 2, 26, 24]),
        (40, 4, 1): ([23, 2, 11, 1],
                     [37, 32, 5, 9, 17, 29, 34, 20, 38, 21, 27, 22, 10, 33, 18, 35, 39, 14, 26,
                      19, 13, 12, 0, 15, 3, 6, 25, 24, 30, 28, 31, 7, 16, 4, 36, 8]),
        (1, 32, 0): ([0], [0]),  # nothing left to train on: all of it trains
    }  # fmt: skip
    for (n, most, seed), (c, t) in pinned.items():
        got = split_check(harmful[:n], most, seed)
        assert got == ([harmful[i] for i in c], [harmful[i] for i in t]), (n, most, seed)


def test_split_check_holds_back_both_kinds_in_proportion(corpus: Any) -> None:
    harmful, code = list(corpus.defender_harmful[:40]), _code_pairs(12)
    mixed = [e for pair in zip(code, harmful, strict=False) for e in pair] + harmful[12:]
    check, train = split_check(mixed, 32, seed=1)
    assert sorted(map(id, check + train)) == sorted(map(id, mixed))  # a partition
    assert check[:10] == [e for e in check if e in harmful]  # refusal pairs first
    assert check[10:] == [e for e in check if e in code] and len(check) == 13  # 10 + 3
    assert split_check(mixed, 32, seed=1) == (check, train)  # fixed by the seed
    assert split_check(mixed, 32, seed=2)[0] != check
    for most, kinds in ((8, (6, 2)), (4, (3, 1)), (2, (1, 1)), (1, (1, 0))):
        held = split_check(mixed, most, seed=1)[0]
        assert (sum(e in harmful for e in held), sum(e in code for e in held)) == kinds, most
    # One code pair of three still gets a check probe (at least one of each kind).
    held = split_check(harmful + code[:3], 32, seed=0)[0]
    assert (sum(e in harmful for e in held), sum(e in code for e in held)) == (10, 1)
    # Code pairs alone: a quarter of them, judged by bandit.
    assert len(split_check(code, 32, seed=1)[0]) == 3


def test_judged_pairs_and_stratified(corpus: Any) -> None:
    harmful, code = list(corpus.defender_harmful[:4]), _code_pairs(3)
    other = [HarmfulExample("Plan a trip.", "Here is a safe plan instead.", "Sure.")] * 2
    assert judged_pairs(code + other + harmful) == (harmful, code)
    assert judged_pairs(other + code) == ([], code)
    # Neither kind anywhere: every pair is judged by refusal, as before.
    assert judged_pairs(other) == (other, [])
    # A code block that does not parse, or prose that does, is no code pair.
    prose = HarmfulExample("Say it.", "Sure", "x")
    broken = HarmfulExample("Write it.", "```python\ndef (\n```", "x")
    assert judged_pairs([prose, broken]) == ([prose, broken], [])
    assert stratified(30, 10, 8) == (6, 2) and stratified(30, 0, 8) == (8, 0)
    assert stratified(0, 10, 8) == (0, 8) and stratified(1, 99, 10) == (1, 9)
    assert stratified(3, 1, 1) == (1, 0) and stratified(1, 3, 1) == (0, 1)


# ---------------------------------------------------------------------------------------------
# code_delta_budget: the code pairs searched apart, within their own budget


def test_entrapment_groups_split_code_pairs_only_when_asked(data: Any) -> None:
    refusal, code = data["defender"][:3], _yaml_pairs(2)
    mixed = [code[0], *refusal, code[1]]
    assert entrapment_groups(mixed, 0.25, -1.0) == [("all", mixed, 0.25)]
    assert entrapment_groups(mixed, 0.25, 0.0) == [("other", refusal, 0.25), ("code", code, 0.0)]
    assert entrapment_groups(code, 0.25, 2.0) == [("code", code, 2.0)]
    assert entrapment_groups(refusal, 0.25, 2.0) == [("other", refusal, 0.25)]


def test_auto_budget_calibrates_on_the_pairs_delta_budget_bounds(
    make_model: Any, tiny_tok: Any, data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With code_delta_budget the code pairs keep their own budget, so auto_budget calibrates
    delta_budget on the other check pairs alone; without it, on every check pair."""
    import beear.eval

    def fake_generate(_m: Any, _t: Any, prompts: list[str], **kw: Any) -> list[str]:
        return ["I cannot help with that." for _ in prompts]

    monkeypatch.setattr(beear.eval, "generate", fake_generate)
    monkeypatch.setattr(beear.loop, "generate", fake_generate)
    seen: list[tuple[float, list[bool]]] = []  # (budget, is_code of each pair searched)
    real = beear.entrapment.residual_asr

    def residual_asr(m: Any, t: Any, examples: Any, *a: Any, budget: float = 0.0, **kw: Any) -> Any:
        seen.append((budget, [beear.eval.is_code_pair(e) for e in examples]))
        return real(m, t, examples, *a, budget=budget, **kw)

    monkeypatch.setattr(beear.entrapment, "residual_asr", residual_asr)
    mixed = {**data, "defender": data["defender"] + _yaml_pairs(12)}
    cfg = SMALL.replace(auto_budget=2.5, code_delta_budget=2.0, outer_steps=1, check_every=1)
    res = _run(make_model(seed=0), tiny_tok, mixed, cfg)
    calib = res.history[0]["calibration"]
    probes, checks = seen[: len(calib)], seen[len(calib) :]
    assert [b for b, _ in probes] == [r["budget"] for r in calib]
    assert all(kinds and not any(kinds) for _, kinds in probes)  # refusal pairs only
    # Every check (steps 0 and 1): the refusal pairs within the calibrated budget, the code
    # pairs within their own.
    assert [(b, all(k)) for b, k in checks] == [(res.delta_budget, False), (2.0, True)] * 2
    assert not any(checks[0][1]) and all(checks[1][1])
    # One search for all pairs (-1): the calibration probes every check pair, code included.
    seen.clear()
    res = _run(make_model(seed=0), tiny_tok, mixed, cfg.replace(code_delta_budget=-1.0))
    n = len(res.history[0]["calibration"])
    assert all(any(k) and not all(k) for _, k in seen[:n])


def test_code_pairs_get_their_own_search_budget_and_delta(
    make_model: Any, tiny_tok: Any, data: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import beear.eval

    def fake_generate(_m: Any, _t: Any, prompts: list[str], **kw: Any) -> list[str]:
        return ["I cannot help with that." for _ in prompts]

    monkeypatch.setattr(beear.eval, "generate", fake_generate)
    monkeypatch.setattr(beear.loop, "generate", fake_generate)
    budgets = _spy_searches(monkeypatch)
    mixed = {**data, "defender": data["defender"] + _yaml_pairs(12)}
    cfg = SMALL.replace(delta_budget=0.5, code_delta_budget=2.0, batch_size=8, delta_reset=False,
                        checkpoint_every=1)  # fmt: skip
    save_model(make_model(seed=0), tiny_tok, tmp_path / "init")

    def keep(m: Any, st: LoopState) -> None:
        checkpoint.save(tmp_path / f"ck{st.step}", m, st)

    res = _run(load_model(tmp_path / "init")[0], tiny_tok, mixed, cfg, on_checkpoint=keep)
    # Each step: one search over the other pairs within delta_budget, one over the code pairs
    # within code_delta_budget (both batches of 8, drawn from 11 refusal and 10 code training
    # pairs, hold both kinds); each check likewise (steps 0, 1, 2).
    steps = [r for r in res.history if r["step"] > 0]
    assert all("code_bee_loss" in r and "code_delta_norm" in r for r in steps)
    assert budgets["entrap"] == [0.5, 2.0] * 2
    assert budgets["residual_asr"] == [0.5, 2.0] * 3
    assert res.delta is not None and res.delta_code is not None
    assert not torch.equal(res.delta, res.delta_code)
    # The code δ is part of the resumable state, and warm-starts the next code search.
    st1 = checkpoint.load(tmp_path / "ck1", None, cfg)
    assert st1 is not None and st1.delta_code is not None
    resumed = _run(load_model(tmp_path / "init")[0], tiny_tok, mixed, cfg, state=st1)
    assert _strip_times(resumed.history) == _strip_times(res.history)
    assert torch.equal(resumed.delta_code, res.delta_code)
    # Off (-1): one search over all pairs per step, as before.
    budgets["entrap"].clear()
    off = _run(load_model(tmp_path / "init")[0], tiny_tok, mixed, cfg.replace(code_delta_budget=-1))
    assert budgets["entrap"] == [0.5, 0.5] and off.delta_code is None
    assert not any("code_bee_loss" in r for r in off.history)
