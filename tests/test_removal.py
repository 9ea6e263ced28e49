"""Tests for beear.removal (AR, the outer problem): what trains, and the removal loss."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from beear.data import Batch, collate, encode_pair
from beear.hooks import perturb
from beear.removal import (
    SCOPES,
    anchor_targets,
    lora_folded,
    removal_loss,
    select_trainable,
    topk_kl,
)

pytestmark = pytest.mark.usefixtures("single_thread")

LAYER, N = 1, 5


def _batch(tok: Any, pairs: list[tuple[str, str]]) -> Batch:
    enc = [encode_pair(tok, p, a, max_length=96) for p, a in pairs]
    return collate(enc, pad_id=tok.pad_token_id, n_perturb=N)


@pytest.fixture(scope="module")
def batches(tiny_tok: Any, corpus: Any) -> tuple[Batch, Batch]:
    safe = _batch(tiny_tok, [(e.prompt, e.safe) for e in corpus.defender_harmful[:3]])
    anchor = _batch(tiny_tok, [(e.prompt, e.answer) for e in corpus.anchor_benign[:3]])
    return safe, anchor


def _plain_ce(model: Any, b: Batch, delta: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: mean next-token CE over the answer tokens, written out independently."""
    with torch.no_grad():
        if delta is None:
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        else:
            with perturb(model, LAYER, delta, b.perturb_mask):
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    tgt = b.labels[:, 1:]
    keep = tgt != -100
    return F.cross_entropy(logits[:, :-1][keep].float(), tgt[keep])


def _expected_trainable(names: list[str], scope: str, tied: bool) -> set[str]:
    def layer_of(n: str) -> int | None:
        return int(n.split(".")[2]) if n.startswith("model.layers.") else None

    if scope == "all":
        return set(names)
    if scope == "lower":  # embeddings (and a head tied to them) + layers 0..l
        lower = {n for n in names if (layer_of(n) if layer_of(n) is not None else 99) <= LAYER}
        return lower | {"model.embed_tokens.weight"}
    # upper: layers l+1.., the final norm, an untied head; never the (tied) embedding
    upper = {n for n in names if (layer_of(n) if layer_of(n) is not None else -1) > LAYER}
    return upper | {"model.norm.weight"} | (set() if tied else {"lm_head.weight"})


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("scope", SCOPES)
def test_only_selected_parameters_move(
    make_model: Any, batches: tuple[Batch, Batch], scope: str, tied: bool
) -> None:
    if scope == "lora" and tied:
        pytest.skip("LoRA adapters do not depend on tying")
    model = make_model(seed=0, tie=tied)
    model = select_trainable(model, scope=scope, layer=LAYER, lora_rank=4)
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if scope == "lora":
        assert trainable and trainable == {n for n in names if "lora_" in n}
        assert any(n.endswith("base_layer.weight") for n in names)
    else:
        assert trainable == _expected_trainable(names, scope, tied)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.0)  # fmt: skip
    torch.manual_seed(3)
    delta = torch.randn(N, model.config.hidden_size)
    safe, anchor = batches
    # Two steps: LoRA's B starts at zero, so A gets no gradient until B has moved once.
    for _ in range(2):
        loss, _parts = removal_loss(
            model, safe, anchor, layer=LAYER, delta=delta, anchor_under_delta=True
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{scope}: trainable {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"{scope}: frozen {n} changed"
            assert p.grad is None, n


def test_select_trainable_keeps_an_existing_adapter(make_model: Any) -> None:
    model = select_trainable(make_model(seed=0), scope="lora", layer=LAYER, lora_rank=4)
    n_params = len(list(model.named_parameters()))
    for p in model.parameters():
        p.requires_grad_(True)
    again = select_trainable(model, scope="lora", layer=LAYER, lora_rank=4)
    assert again is model and len(list(again.named_parameters())) == n_params
    assert {n for n, p in again.named_parameters() if p.requires_grad} == {
        n for n, _ in again.named_parameters() if "lora_" in n
    }
    with pytest.raises(ValueError, match="train scope 'head' is not one of"):
        select_trainable(make_model(seed=0), scope="head", layer=LAYER)


def test_removal_loss_without_delta_is_the_sum_of_plain_ces(
    make_model: Any, batches: tuple[Batch, Batch]
) -> None:
    model = make_model(seed=1).eval()
    safe, anchor = batches
    ce_safe, ce_anchor = float(_plain_ce(model, safe)), float(_plain_ce(model, anchor))
    loss, parts = removal_loss(model, safe, anchor, layer=LAYER, delta=None,
                               anchor_under_delta=False, safe_without_delta=False)  # fmt: skip
    assert float(loss) == pytest.approx(ce_safe + ce_anchor, abs=1e-5)
    assert parts == pytest.approx({"safe_ce": ce_safe, "anchor_ce": ce_anchor}, abs=1e-5)
    assert loss.requires_grad
    # With the extra terms on and no δ (the SFT baseline) each CE counts twice, as its plain
    # term and as its (δ = 0) twin, giving the terms the same weights as in the BEEAR step.
    loss2, parts2 = removal_loss(model, safe, anchor, layer=LAYER, delta=None,
                                 anchor_under_delta=True, safe_without_delta=True)  # fmt: skip
    assert float(loss2) == pytest.approx(2 * ce_safe + 2 * ce_anchor, abs=1e-5)
    assert parts2["anchor_delta_ce"] == parts2["anchor_ce"]
    assert parts2["safe_plain_ce"] == parts2["safe_ce"]


def _perturbed_setup(
    make_model: Any, batches: tuple[Batch, Batch]
) -> tuple[Any, Batch, Batch, torch.Tensor]:
    """A model with large weights (δ visibly changes the CEs), the batches and a large δ."""
    model = make_model(seed=1, init=0.3).eval()
    torch.manual_seed(4)
    return model, *batches, 20 * torch.randn(N, model.config.hidden_size)


def test_anchor_under_delta_adds_the_perturbed_anchor_term(
    make_model: Any, batches: tuple[Batch, Batch]
) -> None:
    model, safe, anchor, delta = _perturbed_setup(make_model, batches)
    off, p_off = removal_loss(model, safe, anchor, layer=LAYER, delta=delta,
                              anchor_under_delta=False, safe_without_delta=False)  # fmt: skip
    on, p_on = removal_loss(model, safe, anchor, layer=LAYER, delta=delta,
                            anchor_under_delta=True, safe_without_delta=False)  # fmt: skip
    anchor_d = float(_plain_ce(model, anchor, delta))
    assert "anchor_delta_ce" not in p_off
    assert p_on["anchor_delta_ce"] == pytest.approx(anchor_d, abs=1e-5)
    assert float(on) - float(off) == pytest.approx(anchor_d, abs=1e-4)
    # The safe term is taken under δ, the plain anchor term without it.
    assert p_on["safe_ce"] == pytest.approx(float(_plain_ce(model, safe, delta)), abs=1e-5)
    assert p_on["anchor_ce"] == pytest.approx(float(_plain_ce(model, anchor)), abs=1e-5)
    assert abs(anchor_d - p_on["anchor_ce"]) > 1e-2  # δ really changed the anchor CE
    assert abs(p_on["safe_ce"] - float(_plain_ce(model, safe))) > 1e-2


def test_anchor_weight_scales_both_anchoring_terms_and_their_gradients(
    make_model: Any, batches: tuple[Batch, Batch]
) -> None:
    model, safe, anchor, delta = _perturbed_setup(make_model, batches)
    kw: dict[str, Any] = dict(layer=LAYER, delta=delta, anchor_under_delta=True,
                              safe_without_delta=True, backward=True)  # fmt: skip
    grads, losses, parts = {}, {}, {}
    for w in (1.0, 3.0):
        model.zero_grad(set_to_none=True)
        losses[w], parts[w] = removal_loss(model, safe, anchor, anchor_weight=w, **kw)
        grads[w] = torch.cat([p.grad.flatten() for p in model.parameters()])
    anchor_terms = parts[1.0]["anchor_ce"] + parts[1.0]["anchor_delta_ce"]
    assert parts[3.0] == pytest.approx(parts[1.0], abs=1e-6)  # the logged parts are unweighted
    assert float(losses[3.0]) - float(losses[1.0]) == pytest.approx(2 * anchor_terms, rel=1e-4)
    # The gradient is the safe terms' plus 3x (not 1x) the anchoring terms'.
    model.zero_grad(set_to_none=True)
    removal_loss(model, safe, anchor, anchor_weight=0.0, **kw)
    g_safe = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(grads[3.0] - g_safe, 3 * (grads[1.0] - g_safe), rtol=1e-3,
                               atol=1e-6)  # fmt: skip
    assert (grads[1.0] - g_safe).abs().max() > 1e-4


def test_safe_without_delta_adds_the_plain_safe_term(
    make_model: Any, batches: tuple[Batch, Batch]
) -> None:
    model, safe, anchor, delta = _perturbed_setup(make_model, batches)
    kw: dict[str, Any] = dict(layer=LAYER, delta=delta, anchor_under_delta=False)
    off, p_off = removal_loss(model, safe, anchor, safe_without_delta=False, **kw)
    on, p_on = removal_loss(model, safe, anchor, safe_without_delta=True, **kw)
    plain = float(_plain_ce(model, safe))
    assert "safe_plain_ce" not in p_off
    assert p_on["safe_plain_ce"] == pytest.approx(plain, abs=1e-5)
    assert float(on) - float(off) == pytest.approx(plain, abs=1e-4)


def _answer_logp(model: Any, b: Batch) -> torch.Tensor:
    """Reference: full-vocabulary log-probabilities at the answer-predicting positions."""
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    return torch.log_softmax(logits[:, :-1][b.labels[:, 1:] != -100].float(), dim=-1)


def test_topk_kl_is_the_exact_kl_when_k_covers_the_vocabulary(
    make_model: Any, batches: tuple[Batch, Batch]
) -> None:
    _, anchor = batches
    teacher, student = make_model(seed=1, init=0.3).eval(), make_model(seed=2, init=0.3).eval()
    with torch.no_grad():
        vocab = teacher.config.vocab_size
        t = anchor_targets(teacher, [anchor], k=vocab)
        full_t, lp_s = _answer_logp(teacher, anchor), _answer_logp(student, anchor)
        idx, tl = t.select(range(len(t.index)), "cpu")
        # The exact KL(teacher ‖ student) over the whole vocabulary.
        exact = float((full_t.exp() * (full_t - lp_s)).sum(1).mean())
        assert exact > 0.05
        assert float(topk_kl(lp_s, idx, tl)) == pytest.approx(exact, rel=1e-4)
        # With few tokens kept the rest share one bucket: a coarser distribution, so a lower
        # bound of the exact KL (data processing), still positive; zero at the teacher itself.
        t4 = anchor_targets(teacher, [anchor], k=4)
        idx4, tl4 = t4.select(range(len(t4.index)), "cpu")
        assert 0 < float(topk_kl(lp_s, idx4, tl4)) < exact
        assert float(topk_kl(full_t, idx4, tl4)) == pytest.approx(0.0, abs=1e-6)


def test_anchor_targets_follow_the_examples_in_any_batch_order(
    tiny_tok: Any, corpus: Any, make_model: Any
) -> None:
    model = make_model(seed=1, init=0.3).eval()
    pairs = [(e.prompt, e.answer) for e in corpus.anchor_benign[:5]]
    t = anchor_targets(model, [_batch(tiny_tok, pairs[:3]), _batch(tiny_tok, pairs[3:])], k=6)
    answer_tokens = [
        sum(x != -100 for x in encode_pair(tiny_tok, p, a, max_length=96).labels) for p, a in pairs
    ]
    assert [len(i) for i in t.index] == answer_tokens
    assert all(
        i.shape[1] == 6 and lp.shape == i.shape for i, lp in zip(t.index, t.logp, strict=True)
    )
    ids = [4, 0, 2]  # a batch made of examples in another order: the KL at the model is zero
    b = _batch(tiny_tok, [pairs[i] for i in ids])
    _, parts = removal_loss(model, b, b, layer=LAYER, delta=None, anchor_under_delta=False,
                            safe_without_delta=False, anchor_loss="kl",
                            targets=t.select(ids, "cpu"))  # fmt: skip
    assert parts["anchor_kl"] == pytest.approx(0.0, abs=1e-6)
    _, wrong = removal_loss(model, b, b, layer=LAYER, delta=None, anchor_under_delta=False,
                            safe_without_delta=False, anchor_loss="kl",
                            targets=t.select([4, 2, 0], "cpu"))  # fmt: skip
    assert wrong["anchor_kl"] > 0.01  # mismatched rows are not silently fine


@pytest.mark.parametrize("mode", ["kl", "ce+kl"])
def test_anchor_loss_kl_replaces_or_adds_to_the_anchoring_ce(
    make_model: Any, batches: tuple[Batch, Batch], mode: str
) -> None:
    safe, anchor = batches
    teacher, model = make_model(seed=1, init=0.3).eval(), make_model(seed=2, init=0.3).eval()
    t = anchor_targets(teacher, [anchor])
    tg = t.select(range(len(t.index)), "cpu")
    torch.manual_seed(4)
    delta = 20 * torch.randn(N, model.config.hidden_size)
    kw: dict[str, Any] = dict(layer=LAYER, delta=delta, safe_without_delta=False, targets=tg)
    ce_loss, p_ce = removal_loss(model, safe, anchor, anchor_under_delta=True, **kw)
    loss, p = removal_loss(model, safe, anchor, anchor_under_delta=True, anchor_loss=mode, **kw)
    for key in ("safe_ce", "anchor_ce", "anchor_delta_ce"):  # the CEs are still reported
        assert p[key] == pytest.approx(p_ce[key], abs=1e-5)
    assert p["anchor_kl"] > 0.01 and p["anchor_delta_kl"] > p["anchor_kl"]  # δ moves it further
    kls = p["anchor_kl"] + p["anchor_delta_kl"]
    ces = p["anchor_ce"] + p["anchor_delta_ce"]
    expected = float(ce_loss) + kls - (ces if mode == "kl" else 0.0)
    assert float(loss) == pytest.approx(expected, abs=1e-4)
    loss.backward()
    assert all(q.grad is not None for q in model.parameters())
    with pytest.raises(ValueError, match="needs the anchoring targets"):
        removal_loss(model, safe, anchor, layer=LAYER, delta=None, anchor_under_delta=False,
                     anchor_loss="kl")  # fmt: skip
    with pytest.raises(ValueError, match="anchor_loss 'mse' is not one of"):
        removal_loss(model, safe, anchor, layer=LAYER, delta=None, anchor_under_delta=False,
                     anchor_loss="mse")  # fmt: skip


@pytest.mark.parametrize("mode", ["ce", "kl"])
def test_term_by_term_backward_gives_the_summed_loss_gradients(
    make_model: Any, batches: tuple[Batch, Batch], mode: str
) -> None:
    """`backward=True` back-propagates each term as it is computed: same loss, parts and
    gradients as one backward pass through the sum, and the returned loss is detached."""
    safe, anchor = batches
    teacher, model = make_model(seed=1, init=0.3).eval(), make_model(seed=2, init=0.3).eval()
    t = anchor_targets(teacher, [anchor])
    torch.manual_seed(4)
    delta = 20 * torch.randn(N, model.config.hidden_size)
    kw: dict[str, Any] = dict(layer=LAYER, delta=delta, anchor_under_delta=True,
                              safe_without_delta=True, anchor_loss=mode,
                              targets=t.select(range(len(t.index)), "cpu"))  # fmt: skip
    loss, parts = removal_loss(model, safe, anchor, **kw)
    loss.backward()
    summed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss2, parts2 = removal_loss(model, safe, anchor, backward=True, **kw)
    assert not loss2.requires_grad and float(loss2) == pytest.approx(float(loss), abs=1e-5)
    assert parts2 == pytest.approx(parts, abs=1e-6)
    assert len(parts2) == (6 if mode == "kl" else 4)  # all four terms were taken
    for n, p in model.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(p.grad, summed[n], rtol=1e-4, atol=1e-6, msg=n)
    assert any(float(g.abs().max()) > 1e-4 for g in summed.values())


@pytest.mark.parametrize("mode", ["ce", "ce+kl"])
def test_anchor_chunks_give_the_whole_batch_terms_and_gradients(
    make_model: Any, tiny_tok: Any, corpus: Any, mode: str
) -> None:
    """`anchor_chunk` k: the anchoring batch goes through the model k rows at a time, each piece
    weighted by its answer tokens; the loss, its logged parts and the gradients equal those of
    the whole batch (rows of different answer lengths, so unweighted pieces would differ)."""
    pairs = [(e.prompt, e.answer) for e in corpus.anchor_benign[:5]]
    pairs[1] = (pairs[1][0], pairs[1][1] + " " + pairs[1][1])  # a longer answer
    anchor = _batch(tiny_tok, pairs)
    safe = _batch(tiny_tok, [(e.prompt, e.safe) for e in corpus.defender_harmful[:3]])
    assert len(set((anchor.labels[:, 1:] != -100).sum(1).tolist())) > 1
    teacher, model = make_model(seed=1, init=0.3).eval(), make_model(seed=2, init=0.3).eval()
    t = anchor_targets(teacher, [anchor])
    torch.manual_seed(4)
    delta = 20 * torch.randn(N, model.config.hidden_size)
    kw: dict[str, Any] = dict(layer=LAYER, delta=delta, anchor_under_delta=True,
                              safe_without_delta=True, anchor_loss=mode, backward=True,
                              targets=t.select(range(len(t.index)), "cpu"))  # fmt: skip
    results = {}
    for k in (0, 2, 5, 9):  # 0, 5 and 9: one piece
        model.zero_grad(set_to_none=True)
        loss, parts = removal_loss(model, safe, anchor, anchor_chunk=k, **kw)
        grads = {n: q.grad.clone() for n, q in model.named_parameters()}
        results[k] = (float(loss), parts, grads)
    whole = results[0]
    assert results[5][:2] == whole[:2] and results[9][:2] == whole[:2]  # the same code path
    loss, parts, grads = results[2]
    assert loss == pytest.approx(whole[0], abs=1e-5)
    assert parts == pytest.approx(whole[1], abs=1e-5)
    for n, g in grads.items():
        torch.testing.assert_close(g, whole[2][n], rtol=1e-4, atol=1e-6, msg=n)
    # Unweighted pieces (a plain mean of the three pieces' means) would not give it.
    pieces = [anchor.rows(i, i + 2) for i in (0, 2, 4)]
    plain = sum(float(_plain_ce(model, b)) for b in pieces) / 3
    assert abs(plain - whole[1]["anchor_ce"]) > 1e-3


@pytest.mark.parametrize("backward", [False, True])
def test_safe_groups_weighted_by_tokens_equal_one_batch_under_one_delta(
    make_model: Any, tiny_tok: Any, corpus: Any, batches: tuple[Batch, Batch], backward: bool
) -> None:
    """`more_safe` (a δ per kind of pair): with the same δ for every group, the loss, its parts
    and its gradients equal those of one batch holding all the groups' pairs; another δ for the
    second group changes them."""
    _, anchor = batches
    pairs = [(e.prompt, e.safe) for e in corpus.defender_harmful[:5]]
    model = make_model(seed=2, init=0.3).eval()
    torch.manual_seed(4)
    delta = 20 * torch.randn(N, model.config.hidden_size)
    kw: dict[str, Any] = dict(layer=LAYER, anchor_under_delta=True, safe_without_delta=True,
                              backward=backward)  # fmt: skip

    def run(**more: Any) -> tuple[float, dict[str, float], dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss, parts = removal_loss(model, anchor=anchor, **kw, **more)
        if not backward:
            loss.backward()
        return float(loss), parts, {n: p.grad.clone() for n, p in model.named_parameters()}

    one = run(safe=_batch(tiny_tok, pairs), delta=delta)
    split = run(safe=_batch(tiny_tok, pairs[:2]), delta=delta,
                more_safe=[(_batch(tiny_tok, pairs[2:]), delta)])  # fmt: skip
    assert split[0] == pytest.approx(one[0], rel=1e-5)
    assert split[1] == pytest.approx(one[1], rel=1e-5)
    for n, g in one[2].items():
        torch.testing.assert_close(split[2][n], g, rtol=1e-4, atol=1e-6, msg=n)
    other = run(safe=_batch(tiny_tok, pairs[:2]), delta=delta,
                more_safe=[(_batch(tiny_tok, pairs[2:]), -delta)])  # fmt: skip
    assert abs(other[1]["safe_ce"] - one[1]["safe_ce"]) > 1e-3
    assert other[1]["anchor_delta_ce"] == pytest.approx(one[1]["anchor_delta_ce"], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# lora_folded: adapters folded into temporary weights for passes that train none


def _lora(make_model: Any, *, seed: int = 0, **lora: Any) -> Any:
    """A LoRA-wrapped tiny model whose B matrices are non-zero (as after some training)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", **lora)
    model = get_peft_model(make_model(seed=seed, init=0.3), cfg).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    return model


def _logits(model: Any, b: Batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits


def test_lora_folded_matches_the_adapters_and_puts_everything_back(
    make_model: Any, batches: tuple[Batch, Batch]
) -> None:
    model = _lora(make_model)
    next(p for n, p in model.named_parameters() if "lora_A" in n).requires_grad_(False)  # mixed
    b = batches[1]
    with_adapters = _logits(model, b)
    with model.disable_adapter():
        without = _logits(model, b)
    before = _weights_of(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with lora_folded(model) as folded:
        assert folded
        inside = _logits(model, b)
        assert not all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        with lora_folded(model) as again:  # nested: already plain, nothing more to fold
            assert not again
            assert torch.equal(_logits(model, b), inside)
    # The adapters' function, from plain layers (not the base model's function).
    assert float((inside - with_adapters).norm() / with_adapters.norm()) < 1e-5
    assert float((without - with_adapters).norm() / with_adapters.norm()) > 1e-2
    # Every tensor back, bit for bit, the adapters on again, every flag as it was.
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert torch.equal(_logits(model, b), with_adapters)


def test_lora_folded_puts_everything_back_after_an_exception(
    make_model: Any, batches: tuple[Batch, Batch]
) -> None:
    model = _lora(make_model, seed=1)
    before = _weights_of(model)
    ref = _logits(model, batches[0])
    with pytest.raises(RuntimeError, match="boom"), lora_folded(model):
        raise RuntimeError("boom")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert torch.equal(_logits(model, batches[0]), ref)


def test_lora_folded_leaves_models_it_cannot_fold_alone(
    make_model: Any, batches: tuple[Batch, Batch]
) -> None:
    plain = make_model(seed=0)
    dora = _lora(make_model, use_dora=True)  # DoRA's magnitude is not in get_delta_weight
    for model in (plain, dora):
        before = _weights_of(model)
        ref = _logits(model, batches[0])
        with lora_folded(model) as folded:
            assert not folded
            assert torch.equal(_logits(model, batches[0]), ref)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_entrapment_search_with_folded_lora_finds_the_same_delta(
    make_model: Any, tiny_tok: Any, corpus: Any
) -> None:
    from beear.entrapment import entrap, make_entrapment_batch

    model = _lora(make_model, seed=2)
    eb = make_entrapment_batch(tiny_tok, corpus.defender_harmful[:4], n=N, max_length=96)
    before = _weights_of(model)
    kw: dict[str, Any] = {"layer": LAYER, "n": N, "steps": 5, "lr": 1.0, "alpha": 0.05}
    ref = entrap(model, eb, **kw)
    with lora_folded(model):
        got = entrap(model, eb, **kw)
    assert float((got.delta - ref.delta).norm() / ref.delta.norm()) < 1e-3
    assert got.losses == pytest.approx(ref.losses, rel=1e-4)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def _weights_of(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _end_nll_ref(model: Any, b: Batch, end_id: int, delta: torch.Tensor | None = None) -> float:
    """Reference: mean −log p(end of turn) over the rows whose answer ends, written out."""
    with torch.no_grad():
        ctx = perturb(model, LAYER, delta, b.perturb_mask) if delta is not None else None
        with ctx or contextlib.nullcontext():
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    nll = []
    for row in range(b.labels.shape[0]):
        for t in range(b.labels.shape[1] - 1):
            if int(b.labels[row, t + 1]) == end_id:
                nll.append(-float(torch.log_softmax(logits[row, t].float(), -1)[end_id]))
    assert nll
    return sum(nll) / len(nll)


def test_end_weight_adds_the_end_of_turn_nll_of_every_answer(
    make_model: Any, tiny_tok: Any, corpus: Any
) -> None:
    """end_weight w: each safe pass and each anchoring pass gains w times the mean −log p of
    the end-of-turn token over its answers that end (one position per answer; the anchoring
    ones scaled by anchor_weight too); w = 0 leaves the loss as it was, bit for bit."""
    end = tiny_tok.eos_token_id
    pairs = [(e.prompt, e.answer) for e in corpus.anchor_benign[:5]]
    anchor = _batch(tiny_tok, pairs)
    # One safe answer cut before its end (no end-of-turn token among its labels).
    enc = [
        encode_pair(tiny_tok, e.prompt, e.safe, max_length=96) for e in corpus.defender_harmful[:3]
    ]
    enc[2] = encode_pair(tiny_tok, corpus.defender_harmful[2].prompt,
                         corpus.defender_harmful[2].safe, max_length=96, end=False)  # fmt: skip
    safe = collate(enc, pad_id=tiny_tok.pad_token_id, n_perturb=N)
    assert int((safe.labels[:, 1:] == end).sum()) == 2
    assert int((anchor.labels[:, 1:] == end).sum()) == 5
    model, _, _, delta = _perturbed_setup(make_model, (safe, anchor))
    kw: dict[str, Any] = dict(layer=LAYER, delta=delta, anchor_under_delta=False,
                              safe_without_delta=True, anchor_weight=3.0)  # fmt: skip
    base, p_base = removal_loss(model, safe, anchor, **kw)
    off, p_off = removal_loss(model, safe, anchor, end_weight=0.0, end_id=end, **kw)
    assert float(off.detach()) == float(base.detach()) and p_off == p_base  # off: as it was
    on, p_on = removal_loss(model, safe, anchor, end_weight=0.5, end_id=end, **kw)
    safe_d, safe_0 = _end_nll_ref(model, safe, end, delta), _end_nll_ref(model, safe, end)
    anchor_0 = _end_nll_ref(model, anchor, end)
    assert p_on["safe_end_nll"] == pytest.approx(safe_d, rel=1e-4)
    assert p_on["anchor_end_nll"] == pytest.approx(anchor_0, rel=1e-4)
    added = 0.5 * (safe_d + safe_0 + 3.0 * anchor_0)
    assert float(on.detach()) - float(base.detach()) == pytest.approx(added, rel=1e-4)
    assert added > 1e-2
    # In anchoring pieces (anchor_chunk) the same loss and gradients.
    grads = {}
    for k in (0, 2):
        model.zero_grad(set_to_none=True)
        loss, parts = removal_loss(model, safe, anchor, end_weight=0.5, end_id=end, backward=True,
                                   anchor_chunk=k, **kw)  # fmt: skip
        grads[k] = (float(loss), parts, {n: q.grad.clone() for n, q in model.named_parameters()})
    assert grads[2][0] == pytest.approx(grads[0][0], abs=1e-5)
    assert grads[2][1] == pytest.approx(grads[0][1], abs=1e-5)
    for n, g in grads[2][2].items():
        torch.testing.assert_close(g, grads[0][2][n], rtol=1e-4, atol=1e-6, msg=n)
