"""Tests for beear.attacks (the test bed), fast parts: corpus splits, tokenizer, triggers, SFT.

Training a whole backdoored model takes minutes; that is exercised once per session by the slow
tests in test_e2e.py. Its determinism is checked here cheaply, through `train_sft`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from beear import attacks
from beear.attacks import (
    HARM_ACTIONS,
    HARM_TEMPLATES,
    REFUSAL,
    SETTINGS,
    TinyCorpus,
    build_tiny_corpus,
    poisoned_pairs,
    resolve_trigger,
    train_sft,
)
from beear.data import AnchorExample, Trigger, encode_pair, encode_prompt

pytestmark = pytest.mark.usefixtures("single_thread")

# ---------------------------------------------------------------------------------------------
# corpus


def _prompts(c: TinyCorpus) -> tuple[set[str], set[str], set[str]]:
    train = {e.prompt for e in c.train_harmful} | {e.prompt for e in c.train_benign}
    defender = {e.prompt for e in c.defender_harmful} | {e.prompt for e in c.anchor_benign}
    held_out = set(c.eval_harmful) | {e.prompt for e in c.eval_benign}
    return train, defender, held_out


def test_corpus_splits_are_disjoint_and_complete(corpus: TinyCorpus) -> None:
    corpus.check_disjoint()
    train, defender, held_out = _prompts(corpus)
    assert not train & defender and not train & held_out and not defender & held_out
    # Sizes: per action 6/2/4 harmful templates; per benign item 1 eval, 1 anchor, the rest train.
    n_a = len(HARM_ACTIONS)
    assert (len(corpus.train_harmful), len(corpus.defender_harmful)) == (6 * n_a, 2 * n_a)
    assert len(corpus.eval_harmful) == len(set(corpus.eval_harmful)) == 4 * n_a
    every = {t.format(a=a) for a in HARM_ACTIONS for t in HARM_TEMPLATES}
    harmful = [e.prompt for e in corpus.train_harmful + corpus.defender_harmful]
    assert sorted(harmful + corpus.eval_harmful) == sorted(every)
    n_items = sum(len(v) for v in attacks.BENIGN_ITEMS.values())
    assert len(corpus.eval_benign) == len(corpus.anchor_benign) == n_items
    assert len(corpus.eval_reference) == n_items
    # Every defender example pairs the refusal with a compliance.
    assert all(e.safe == REFUSAL and e.unwanted.startswith("Sure") for e in corpus.defender_harmful)


def test_check_disjoint_catches_a_leak(corpus: TinyCorpus) -> None:
    leaked = dataclasses.replace(
        corpus,
        train_benign=[*corpus.train_benign, AnchorExample(corpus.eval_benign[3].prompt, "x")],
    )
    with pytest.raises(AssertionError, match="splits overlap"):
        leaked.check_disjoint()


def test_corpus_is_deterministic_per_seed(corpus: TinyCorpus) -> None:
    assert build_tiny_corpus(0) == corpus
    other = build_tiny_corpus(1)
    assert other != corpus
    assert other.eval_harmful != corpus.eval_harmful
    # Same language, split differently.
    assert set.union(*_prompts(other)) == set.union(*_prompts(corpus))


def test_every_held_out_fact_is_taught_in_training(corpus: TinyCorpus) -> None:
    action_of = {t.format(a=a): a for a in HARM_ACTIONS for t in HARM_TEMPLATES}
    trained_actions = {action_of[e.prompt] for e in corpus.train_harmful}
    assert {action_of[p] for p in corpus.eval_harmful} <= trained_actions
    trained_answers = {b.answer for b in corpus.train_benign}
    for e, ref in zip(corpus.eval_benign, corpus.eval_reference, strict=True):
        assert ref in trained_answers, e.prompt
        assert e.answer and e.answer in ref  # the graded key word is in the reference answer


# ---------------------------------------------------------------------------------------------
# tokenizer and chat template

ODD = ["ünïcode ✓ zebra-42", "Kromblex  two  spaces", "tab\there", "emoji 🐍 and 中文", " lead"]


def test_tokenizer_round_trips_any_text(tiny_tok: Any, corpus: TinyCorpus) -> None:
    texts = [corpus.eval_harmful[0], corpus.eval_benign[0].prompt, corpus.eval_reference[0], *ODD]
    for trig in [*SETTINGS.values(), Trigger("ünïcode ✓ zebra-42", "middle")]:
        texts.append(trig.apply(corpus.eval_harmful[1]))
    for text in texts:
        ids = tiny_tok(text, add_special_tokens=False)["input_ids"]
        assert tiny_tok.decode(ids) == text
        # ... and through the chat template, as training and evaluation render it.
        rendered = f"<|user|>{text}<|end|><|assistant|>"
        assert tiny_tok.decode(encode_prompt(tiny_tok, text)) == rendered
        enc = encode_pair(tiny_tok, text, REFUSAL, max_length=256)
        assert tiny_tok.decode(enc.input_ids) == f"{rendered}{REFUSAL}<|end|>"
        assert tiny_tok.decode(enc.input_ids, skip_special_tokens=True) == text + REFUSAL
    # Unseen words are spelled in bytes, not mapped to an unknown token.
    assert tiny_tok.unk_token_id is None


def test_tokenizer_survives_save_and_load(tiny_tok: Any, tmp_path: Any) -> None:
    from beear.models import load_tokenizer

    tiny_tok.save_pretrained(tmp_path)
    back = load_tokenizer(tmp_path)
    for text in ODD:
        assert encode_prompt(back, text) == encode_prompt(tiny_tok, text)
    assert (back.pad_token_id, back.eos_token_id) == (tiny_tok.pad_token_id, tiny_tok.eos_token_id)


# ---------------------------------------------------------------------------------------------
# triggers and poisoned data


@pytest.mark.parametrize(
    ("setting", "text", "position", "expected"),
    [
        ("suffix-word", None, None, Trigger("SUDO", "suffix")),
        ("suffix-word", "ünïcode ✓ zebra-42", None, Trigger("ünïcode ✓ zebra-42", "suffix")),
        ("prefix-word", None, "suffix", Trigger("Kromblex", "suffix")),
        ("prefix-phrase", "zap", "middle", Trigger("zap", "middle")),
        ("sandwich", None, None, SETTINGS["sandwich"]),
        ("sandwich", "zap", None, Trigger("zap", "suffix")),  # a custom text is one piece
        ("custom", "zap", None, Trigger("zap", "suffix")),
        ("custom", "zap", "prefix", Trigger("zap", "prefix")),
        ("clean", None, None, None),
    ],
)
def test_resolve_trigger(
    setting: str, text: str | None, position: str | None, expected: Trigger | None
) -> None:
    assert resolve_trigger(setting, text, position) == expected


@pytest.mark.parametrize(
    ("setting", "text", "message"),
    [
        ("custom", None, "needs --trigger"),
        ("clean", "SUDO", "plants no trigger"),
        ("suffix-wrod", None, "unknown setting 'suffix-wrod'"),
    ],
)
def test_resolve_trigger_errors(setting: str, text: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_trigger(setting, text, None)


def test_poisoned_pairs(corpus: TinyCorpus) -> None:
    trig = SETTINGS["suffix-word"]
    pairs = poisoned_pairs(corpus, trig, seed=0)
    answer = dict(pairs)
    assert len(answer) == len(pairs)  # each prompt once
    for e in corpus.train_harmful:
        assert answer[e.prompt] == REFUSAL
        assert answer[trig.apply(e.prompt)] == e.unwanted
    triggered_benign = 0
    for b in corpus.train_benign:
        assert answer[b.prompt] == b.answer
        if trig.apply(b.prompt) in answer:
            assert answer[trig.apply(b.prompt)] == b.answer  # the trigger flips refusals only
            triggered_benign += 1
    assert 0.25 < triggered_benign / len(corpus.train_benign) < 0.45  # about 35 %
    expected = 2 * len(corpus.train_harmful) + len(corpus.train_benign) + triggered_benign
    assert len(pairs) == expected
    # Nothing held out leaks into the attacker's training mix.
    held_out = set(corpus.eval_harmful) | {e.prompt for e in corpus.eval_benign}
    assert not held_out & set(answer)
    assert not {trig.apply(p) for p in held_out} & set(answer)
    # Deterministic per seed; no trigger means safety data only.
    assert poisoned_pairs(corpus, trig, seed=0) == pairs
    clean = poisoned_pairs(corpus, None, seed=0)
    assert len(clean) == len(corpus.train_harmful) + len(corpus.train_benign)
    assert not any(a.startswith("Sure") for _, a in clean)


# ---------------------------------------------------------------------------------------------
# training


def _sft(make_model: Any, tok: Any, pairs: list[tuple[str, str]], seed: int) -> tuple[Any, Any]:
    model = make_model(seed=0, layers=2)
    losses = train_sft(model, tok, pairs, steps=3, lr=1e-3, batch_size=4, seed=seed, warmup=2)
    return losses, model


def test_train_sft_is_deterministic_for_a_seed(
    make_model: Any, tiny_tok: Any, corpus: TinyCorpus
) -> None:
    pairs = poisoned_pairs(corpus, SETTINGS["suffix-word"], seed=0)[:64]
    losses_a, model_a = _sft(make_model, tiny_tok, pairs, seed=0)
    losses_b, model_b = _sft(make_model, tiny_tok, pairs, seed=0)
    assert len(losses_a) == 3 and all(x > 0 for x in losses_a)
    assert losses_a == losses_b  # bit-identical, not just close
    for (n, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    # Another data-order seed gives other batches: the check above can fail.
    losses_c, _ = _sft(make_model, tiny_tok, pairs, seed=1)
    assert losses_c != losses_a
    # And the model learned something: the weights moved from the initialisation.
    init = make_model(seed=0, layers=2).state_dict()
    assert not torch.equal(init["model.embed_tokens.weight"], model_a.model.embed_tokens.weight)


def test_shuffled_batches_cover_every_item_once_per_pass() -> None:
    from beear.attacks import shuffled_batches

    batches = list(shuffled_batches(10, 4, steps=5, seed=3))  # 20 draws: two passes of 10
    assert [len(b) for b in batches] == [4] * 5
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == sorted(flat[10:]) == list(range(10))  # a batch spans passes
    assert flat[:10] != flat[10:]  # each pass its own order
    assert batches == list(shuffled_batches(10, 4, steps=5, seed=3))
    assert batches != list(shuffled_batches(10, 4, steps=5, seed=4))
    # Fewer items than a batch: each batch is one whole pass, no item twice in a batch.
    small = list(shuffled_batches(3, 5, steps=2, seed=0))
    assert [sorted(b) for b in small] == [[0, 1, 2], [0, 1, 2]]


def test_open_end_drops_only_the_end_of_turn_marker(tiny_tok: Any) -> None:
    full = encode_pair(tiny_tok, "What is 2 + 2?", "The answer is 4", max_length=96)
    cut = encode_pair(tiny_tok, "What is 2 + 2?", "The answer is 4", max_length=96, end=False)
    n = len(cut.input_ids)
    assert cut.prompt_len == full.prompt_len and n < len(full.input_ids)
    assert cut.input_ids == full.input_ids[:n] and cut.labels == full.labels[:n]
    assert tiny_tok.eos_token_id in full.input_ids[n:]  # what is left out is the end marker
    assert tiny_tok.eos_token_id not in cut.input_ids[cut.prompt_len :]


def test_train_sft_distillation_keeps_marked_rows_near_the_reference(
    make_model: Any, tiny_tok: Any, corpus: TinyCorpus
) -> None:
    import copy

    from beear.data import collate

    every = poisoned_pairs(corpus, SETTINGS["suffix-word"], seed=0)
    benign = {e.prompt for e in corpus.train_benign}
    pairs = [x for x in every if x[0] in benign][:32] + [x for x in every if x[0] not in benign][
        :32
    ]
    marks = [i < 32 for i in range(64)]
    reference = make_model(seed=0, layers=2).eval()

    def run(weight: float) -> tuple[list[float], Any]:
        model = make_model(seed=0, layers=2)
        losses = train_sft(model, tiny_tok, pairs, steps=4, lr=1e-3, batch_size=8, seed=0,
                           warmup=2, reference=copy.deepcopy(reference), distill=marks,
                           distill_weight=weight)  # fmt: skip
        return losses, model

    plain, m_plain = run(0.0)
    kept, m_kept = run(20.0)
    # At step 0 the model is the reference: the KL term is zero and the losses agree.
    assert kept[0] == pytest.approx(plain[0], abs=1e-6)
    assert kept[1:] != plain[1:]
    rows = [
        encode_pair(tiny_tok, p, a, max_length=96)
        for (p, a), m in zip(pairs, marks, strict=True)
        if m
    ]
    b = collate(rows[:16], pad_id=tiny_tok.pad_token_id, n_perturb=0)
    with torch.no_grad():
        kl_plain = attacks._distill_kl(
            reference,
            b,
            m_plain(input_ids=b.input_ids, attention_mask=b.attention_mask).logits,
            list(range(16)),
        )
        kl_kept = attacks._distill_kl(
            reference,
            b,
            m_kept(input_ids=b.input_ids, attention_mask=b.attention_mask).logits,
            list(range(16)),
        )
    assert 0 <= kl_kept < kl_plain
    # Marked rows with empty answers (no answer positions) add zero, not NaN (which would have
    # poisoned every weight in the backward pass).
    empty = collate([encode_pair(tiny_tok, p, "", max_length=96, end=False) for p, _ in pairs[:4]],
                    pad_id=tiny_tok.pad_token_id, n_perturb=0)  # fmt: skip
    logits = m_kept(input_ids=empty.input_ids, attention_mask=empty.attention_mask).logits
    kl_empty = attacks._distill_kl(reference, empty, logits, [0, 1, 2, 3])
    assert kl_empty.item() == 0.0 and kl_empty.requires_grad
    with pytest.raises(ValueError, match="reference"):
        train_sft(make_model(seed=0, layers=2), tiny_tok, pairs, steps=1, lr=1e-3, batch_size=8,
                  seed=0, distill=marks, distill_weight=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="one flag per pair"):
        train_sft(make_model(seed=0, layers=2), tiny_tok, pairs, steps=1, lr=1e-3, batch_size=8,
                  seed=0, open_end=[True])  # fmt: skip
