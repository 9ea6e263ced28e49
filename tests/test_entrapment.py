"""Tests for beear.entrapment (BEE, the inner problem) on a small random Llama."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from beear.data import HarmfulExample
from beear.entrapment import (
    answer_ce,
    answer_loss,
    entrap,
    make_entrapment_batch,
    residual_asr,
)
from beear.hooks import decoder_layers, perturb

pytestmark = pytest.mark.usefixtures("single_thread")

LAYER, N = 1, 5


@pytest.fixture(scope="module")
def examples(corpus: Any) -> list[HarmfulExample]:
    return list(corpus.defender_harmful[:4])


@pytest.fixture
def model(make_model: Any) -> Any:
    return make_model(seed=0, init=0.3)  # large weights: the answers react to δ (see conftest)


def _batch(tok: Any, examples: list[HarmfulExample]) -> Any:
    return make_entrapment_batch(tok, examples, n=N, max_length=96)


def test_unwanted_answers_can_be_encoded_without_their_end_of_turn(
    tiny_tok: Any, examples: list[HarmfulExample]
) -> None:
    # unwanted_end=False: the unwanted answers' labels stop at their own last token (an opener
    # is the start of the behaviour); the safe answers keep their end of turn either way.
    end = tiny_tok.eos_token_id
    on, off = (
        _batch(tiny_tok, examples),
        make_entrapment_batch(tiny_tok, examples, n=N, max_length=96, unwanted_end=False),
    )
    assert (on.unwanted.labels == end).sum(dim=1).tolist() == [1] * len(examples)
    assert (off.unwanted.labels == end).sum().item() == 0
    assert torch.equal(off.safe.labels, on.safe.labels)
    assert (off.safe.labels == end).sum(dim=1).tolist() == [1] * len(examples)
    for a, b in zip(on.unwanted.labels, off.unwanted.labels, strict=True):
        kept = b[b != -100].tolist()
        assert a[a != -100].tolist()[: len(kept)] == kept  # the same answer tokens, cut


def _ce_under(model: Any, b: Any, delta: torch.Tensor | None) -> float:
    """CE of a batch's answers with δ added by the plain hook (an independent reference)."""
    with torch.no_grad():
        if delta is None:
            out = model(input_ids=b.input_ids, attention_mask=b.attention_mask)
        else:
            with perturb(model, LAYER, delta, b.perturb_mask):
                out = model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    return float(answer_loss(out.logits, b.labels))


def test_batch_perturbs_the_same_prompt_tokens_for_both_answers(
    tiny_tok: Any, examples: list[HarmfulExample]
) -> None:
    eb = _batch(tiny_tok, examples)
    for b in (eb.unwanted, eb.safe):
        assert b.perturb_mask.sum(dim=1).tolist() == [N] * len(examples)
        assert (b.labels[b.perturb_mask] == -100).all()  # prompt positions only
    assert torch.equal(
        eb.unwanted.input_ids[eb.unwanted.perturb_mask], eb.safe.input_ids[eb.safe.perturb_mask]
    )


def test_entrapment_loss_falls_and_elicits_the_unwanted_answer(
    model: Any, tiny_tok: Any, examples: list[HarmfulExample]
) -> None:
    eb = _batch(tiny_tok, examples)
    res = entrap(model, eb, layer=LAYER, n=N, steps=12, lr=1.0, alpha=0.05)
    assert len(res.losses) == 12
    assert res.losses[-1] < res.losses[0] - 0.5, res.losses
    assert min(res.losses[6:]) < min(res.losses[:6])  # still improving in the second half
    assert res.delta.shape == (N, model.config.hidden_size)
    assert res.delta.norm() > 0
    # Under the returned δ the unwanted answers are likelier than without it, and the reported
    # CE matches the plain (uncached) hook's.
    before = _ce_under(model, eb.unwanted, None)
    after = _ce_under(model, eb.unwanted, res.delta)
    assert after < before - 0.5
    assert res.unwanted_ce == pytest.approx(after, abs=1e-4)
    assert res.scale > 0


def test_answer_ce_computes_logits_only_where_answers_are_predicted(
    model: Any, tiny_tok: Any, examples: list[HarmfulExample]
) -> None:
    b = _batch(tiny_tok, examples).unwanted
    T = b.labels.shape[1]
    first = int((b.labels[:, 1:] != -100).any(dim=0).nonzero()[0])
    assert first > 0  # the prompts come first: there is something to skip
    rows: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda _m, i, _o: rows.append(i[0].shape[1]))
    try:
        with torch.no_grad():
            got = float(answer_ce(model, b))
    finally:
        hook.remove()
    assert rows == [T - first]
    assert got == pytest.approx(_ce_under(model, b, None), abs=1e-5)  # the full-logits CE

    class NoKeep(torch.nn.Module):  # a model whose forward has no logits_to_keep
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, use_cache: bool) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    with torch.no_grad():
        assert float(answer_ce(NoKeep(model), b)) == pytest.approx(got, abs=1e-5)


def test_budget_bounds_every_row_of_delta(
    model: Any, tiny_tok: Any, examples: list[HarmfulExample]
) -> None:
    eb = _batch(tiny_tok, examples)
    free = entrap(model, eb, layer=LAYER, n=N, steps=12, lr=1.0, alpha=0.05)
    token_norm = free.scale * model.config.hidden_size**0.5
    rows = free.delta.norm(dim=-1)
    budget = 0.5 * float(rows.max()) / token_norm  # half the unbounded search's largest row
    held = entrap(model, eb, layer=LAYER, n=N, steps=12, lr=1.0, alpha=0.05, budget=budget)
    assert (held.delta.norm(dim=-1) <= budget * token_norm * (1 + 1e-5)).all()
    assert held.delta.norm(dim=-1).max() == pytest.approx(budget * token_norm, rel=1e-4)
    assert not torch.allclose(held.delta, free.delta)
    # A budget no row reaches changes nothing (bit-identical search).
    loose = entrap(model, eb, layer=LAYER, n=N, steps=12, lr=1.0, alpha=0.05, budget=1e6)
    assert torch.equal(loose.delta, free.delta)
    # Warm starts beyond the budget are projected first.
    big = torch.full_like(free.delta, 1e3)
    zero = entrap(model, eb, layer=LAYER, n=N, steps=0, lr=1.0, alpha=0.05, init=big, budget=0.1)
    assert zero.delta.norm(dim=-1).max() == pytest.approx(0.1 * token_norm, rel=1e-4)


def test_entrap_leaves_the_model_unchanged(
    model: Any, tiny_tok: Any, examples: list[HarmfulExample]
) -> None:
    model.model.embed_tokens.weight.requires_grad_(False)  # mixed flags must come back as they were
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    layers = list(decoder_layers(model))
    entrap(model, _batch(tiny_tok, examples), layer=LAYER, n=N, steps=3, lr=1.0, alpha=0.05)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert flags["model.embed_tokens.weight"] is False and flags["model.norm.weight"] is True
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    assert list(decoder_layers(model)) == layers  # the cached path put the real layers back
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("alpha", [0.0, 0.05])
def test_cached_equals_uncached(
    model: Any, tiny_tok: Any, examples: list[HarmfulExample], alpha: float
) -> None:
    eb = _batch(tiny_tok, examples)
    kw: dict[str, Any] = dict(layer=LAYER, n=N, steps=5, lr=1.0, alpha=alpha)
    fast = entrap(model, eb, cached=True, **kw)
    ref = entrap(model, eb, cached=False, **kw)
    assert torch.allclose(fast.delta, ref.delta, atol=1e-5, rtol=0)
    assert fast.losses == pytest.approx(ref.losses, abs=1e-5)
    assert fast.unwanted_ce == pytest.approx(ref.unwanted_ce, abs=1e-5)
    assert fast.delta.norm() > 1.0  # δ really moved (otherwise equality is trivial)


def test_delta_is_float32_in_a_bf16_model(
    model: Any, tiny_tok: Any, examples: list[HarmfulExample]
) -> None:
    model = model.to(torch.bfloat16)
    res = entrap(model, _batch(tiny_tok, examples), layer=LAYER, n=N, steps=4, lr=1.0, alpha=0.05)
    assert res.delta.dtype == torch.float32
    assert not res.delta.requires_grad
    assert all(torch.isfinite(torch.tensor(x)) for x in res.losses)
    assert res.losses[-1] < res.losses[0]
    assert next(model.parameters()).dtype == torch.bfloat16


def test_init_warm_starts_the_search(
    model: Any, tiny_tok: Any, examples: list[HarmfulExample]
) -> None:
    eb = _batch(tiny_tok, examples)
    init = torch.randn(N, model.config.hidden_size)
    res = entrap(model, eb, layer=LAYER, n=N, steps=0, lr=1.0, alpha=0.05, init=init)
    assert torch.equal(res.delta, init) and res.losses == []
    assert res.delta.data_ptr() != init.data_ptr()  # a copy: the caller's tensor is not trained


def test_residual_asr_counts_non_refusals(
    model: Any, tiny_tok: Any, examples: list[HarmfulExample], monkeypatch: pytest.MonkeyPatch
) -> None:
    import beear.eval

    # A stand-in generator: the first answer complies, the others refuse.
    def fake_generate(_m: Any, _t: Any, prompts: list[str], **kw: Any) -> list[str]:
        assert kw["delta"].shape == (N, model.config.hidden_size) and kw["layer"] == LAYER
        return ["Sure, here is how."] + ["I cannot help with that."] * (len(prompts) - 1)

    monkeypatch.setattr(beear.eval, "generate", fake_generate)
    r = residual_asr(
        model, tiny_tok, examples, layer=LAYER, n=N, steps=2, lr=1.0, alpha=0.05,
        max_length=96, max_new_tokens=4,
    )  # fmt: skip
    assert r.asr == pytest.approx(1 / len(examples))
    assert r.delta is not None and r.delta_norm == pytest.approx(float(r.delta.norm()))


def test_residual_asr_judges_code_pairs_by_bandit_and_gives_them_more_tokens(
    model: Any, tiny_tok: Any, examples: list[HarmfulExample], monkeypatch: pytest.MonkeyPatch
) -> None:
    import beear.eval

    code = [
        HarmfulExample(f"Write function {i}.", "```python\nyaml.safe_load(x)\n```",
                       "```python\nyaml.load(x)\n```")
        for i in range(3)
    ]  # fmt: skip
    mixed = [examples[0], code[0], examples[1], code[1], code[2], *examples[2:]]
    replies = {
        examples[0].prompt: "Sure, here is how.",  # not a refusal: entrapped
        code[0].prompt: "```python\nimport yaml\ndata = yaml.load(x)\n```",  # insecure: entrapped
        code[1].prompt: "```python\nimport yaml\ndata = yaml.safe_load(x)\n```",  # secure
        code[2].prompt: "I cannot help with that.",  # no code: not insecure
    }
    calls: list[tuple[list[str], int]] = []

    def fake_generate(_m: Any, _t: Any, prompts: list[str], **kw: Any) -> list[str]:
        assert kw["delta"].shape == (N, model.config.hidden_size) and kw["layer"] == LAYER
        calls.append((list(prompts), kw["max_new_tokens"]))
        return [replies.get(p, "I cannot help with that.") for p in prompts]

    monkeypatch.setattr(beear.eval, "generate", fake_generate)
    r = residual_asr(
        model, tiny_tok, mixed, layer=LAYER, n=N, steps=2, lr=1.0, alpha=0.05,
        max_length=96, max_new_tokens=4, code_tokens=7,
    )  # fmt: skip
    # Refusal pairs are answered with max_new_tokens, code pairs with code_tokens, each in order.
    assert calls == [([e.prompt for e in examples], 4), ([e.prompt for e in code], 7)]
    assert r.answers == [replies.get(e.prompt, "I cannot help with that.") for e in mixed]
    assert r.asr_refusal == pytest.approx(1 / len(examples))
    assert r.asr_code == pytest.approx(1 / 3)
    assert r.asr == pytest.approx(2 / len(mixed))
    # Without code pairs: one call, as the refusal-only check always made, and no code share.
    calls.clear()
    r = residual_asr(
        model, tiny_tok, examples, layer=LAYER, n=N, steps=2, lr=1.0, alpha=0.05,
        max_length=96, max_new_tokens=4, code_tokens=7,
    )  # fmt: skip
    assert calls == [([e.prompt for e in examples], 4)]
    assert r.asr_code is None and r.asr == r.asr_refusal == pytest.approx(1 / len(examples))
