"""BEE, backdoor embedding entrapment: the inner problem of BEEAR.

Find one universal perturbation δ (n positions × hidden size) of decoder layer l's output that
makes the *current* model give the unwanted answer and not the safe one (DESIGN.md §2, eq. 1):

    δ* = argmin_δ 1/N Σ_i [ CE(F_θ^l(x_i, δ), y_h,i) − α · CE(F_θ^l(x_i, δ), y_s,i) ]

Layers 1..l do not depend on δ, so their output is computed once per batch (`capture`) and each
inner step runs only layers l+1..L (`substitute`). δ lives in float32 whatever the model's dtype.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from beear.data import Batch, HarmfulExample, collate, encode_pair
from beear.hooks import capture, perturb, substitute

__all__ = [
    "EntrapmentBatch",
    "EntrapmentResult",
    "ScanResult",
    "answer_ce",
    "answer_logits",
    "answer_loss",
    "answer_positions",
    "entrap",
    "entrapment_groups",
    "make_entrapment_batch",
    "residual_asr",
    "residual_asr_by_kind",
]


@dataclass
class EntrapmentBatch:
    """The same harmful prompts encoded twice: with the unwanted and with the safe answer."""

    unwanted: Batch
    safe: Batch

    def to(self, device: torch.device | str) -> EntrapmentBatch:
        return EntrapmentBatch(self.unwanted.to(device), self.safe.to(device))


def make_entrapment_batch(
    tokenizer: Any,
    examples: Sequence[HarmfulExample],
    *,
    n: int,
    max_length: int,
    unwanted_end: bool = True,
) -> EntrapmentBatch:
    """`unwanted_end` False encodes the unwanted answers without the end-of-turn marker: an
    affirmative opener, or a continuation cut by a length limit, is the start of the unwanted
    behaviour, not a whole answer that ends there."""
    pad = tokenizer.pad_token_id
    unw = [encode_pair(tokenizer, e.prompt, e.unwanted, max_length=max_length, end=unwanted_end)
           for e in examples]  # fmt: skip
    safe = [encode_pair(tokenizer, e.prompt, e.safe, max_length=max_length) for e in examples]
    return EntrapmentBatch(
        collate(unw, pad_id=pad, n_perturb=n), collate(safe, pad_id=pad, n_perturb=n)
    )


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy on the answer tokens (labels != -100), in float32.

    `logits` may cover only the last K positions (`logits_to_keep`): labels are aligned to them.
    """
    labels = labels[:, labels.shape[1] - logits.shape[1] :]
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100)


@functools.cache
def _takes_logits_to_keep(cls: Any) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def answer_logits(model: Any, b: Batch) -> torch.Tensor:
    """One forward pass that computes logits only from the first position that predicts an
    answer token onwards (transformers' `logits_to_keep`, where the model takes it): the output
    head and its logits are a large share of a step for big vocabularies. Returns (B, K, V), the
    last K positions; `answer_loss` and `answer_positions` align labels to them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kw: dict[str, Any] = {}
    if _takes_logits_to_keep(base.__class__):
        answer = (b.labels[:, 1:] != -100).any(dim=0).nonzero()
        if len(answer):  # positions t0..T-1, t0 the first whose next token is an answer token
            kw["logits_to_keep"] = b.labels.shape[1] - int(answer[0])
    out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False, **kw)
    return out.logits


def answer_positions(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities at the positions that predict answer tokens, (N, V), in row
    order then position order (the order of the answer tokens of each row)."""
    labels = labels[:, labels.shape[1] - logits.shape[1] :]
    return torch.log_softmax(logits[:, :-1][labels[:, 1:] != -100].float(), dim=-1)


def answer_ce(model: Any, b: Batch) -> torch.Tensor:
    """`answer_loss` of `answer_logits`."""
    return answer_loss(answer_logits(model, b), b.labels)


@dataclass
class EntrapmentResult:
    delta: torch.Tensor  # (n, d) float32, detached
    losses: list[float] = field(default_factory=list)  # the entrapment objective per step
    unwanted_ce: float = float("nan")  # CE of the unwanted answers under the final δ
    scale: float = float("nan")  # RMS of layer-l hidden states, the unit of inner_lr


@torch.no_grad()
def hidden_rms(model: Any, layer: int, batch: Batch) -> tuple[torch.Tensor, float]:
    """Layer-l output of a batch (detached) and its RMS over real tokens."""
    with capture(model, layer) as cap:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    assert cap.hidden is not None
    h = cap.hidden.detach()
    m = batch.attention_mask.bool()
    return h, float(h[m].float().pow(2).mean().sqrt())


def entrap(
    model: Any,
    batch: EntrapmentBatch,
    *,
    layer: int,
    n: int,
    steps: int,
    lr: float,
    alpha: float,
    init: torch.Tensor | None = None,
    cached: bool = True,
    budget: float = 0.0,
) -> EntrapmentResult:
    """Run the inner problem on one batch and return δ*. The model is not changed.

    `lr` is relative to the RMS of layer l's hidden states (so one default serves models whose
    residual streams differ in scale): Adam moves each entry of δ by about `lr × rms` per step.
    `cached=False` runs the full model each step (the reference the cached path is tested on).
    `budget` > 0 keeps every row of δ within `budget × rms × √d` (the typical token norm of the
    layer) after each step: a bounded search, which a clean model can resist.
    """
    was_training = model.training
    model.eval()  # no dropout in the search; gradients flow to δ only
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        h_unw, scale = hidden_rms(model, layer, batch.unwanted)
        h_safe, _ = hidden_rms(model, layer, batch.safe)
        d = h_unw.shape[-1]
        delta = torch.zeros(n, d, dtype=torch.float32, device=h_unw.device)
        if init is not None:
            delta.copy_(init)
        delta.requires_grad_(True)
        # Overflowed hidden states (inf/NaN scale) search nothing; the caller sees the non-finite
        # losses (Adam itself rejects a NaN learning rate with an unrelated message).
        opt = torch.optim.Adam([delta], lr=lr * scale if math.isfinite(scale) else 0.0)

        def ce(b: Batch, h: torch.Tensor) -> torch.Tensor:
            if cached:
                with substitute(model, layer, h, delta, b.perturb_mask):
                    return answer_ce(model, b)
            with perturb(model, layer, delta, b.perturb_mask):
                return answer_ce(model, b)

        radius = budget * scale * math.sqrt(d) if budget > 0 else math.inf

        def project() -> None:
            if math.isfinite(radius):
                with torch.no_grad():
                    norms = delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                    delta.mul_((radius / norms).clamp(max=1.0))

        project()
        losses = []
        for _ in range(steps):
            ce_unw = ce(batch.unwanted, h_unw)
            loss = ce_unw - alpha * ce(batch.safe, h_safe) if alpha else ce_unw
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            project()
            losses.append(float(loss.detach()))
        with torch.no_grad():
            final = float(ce(batch.unwanted, h_unw))
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    return EntrapmentResult(delta=delta.detach(), losses=losses, unwanted_ce=final, scale=scale)


@dataclass
class ScanResult:
    """Residual entrapment: how easily one universal δ still makes the model answer unwanted."""

    asr: float  # share of the probe prompts answered unwanted under the found δ (both kinds)
    unwanted_ce: float  # CE of the unwanted answers under δ (lower = easier to entrap)
    delta_norm: float
    scale: float
    asr_refusal: float | None = None  # the share among refusal-judged pairs (None: there are none)
    asr_code: float | None = None  # the share among code pairs (None: there are none)
    answers: list[str] = field(default_factory=list)
    delta: torch.Tensor | None = None


def residual_asr(
    model: Any,
    tokenizer: Any,
    examples: Sequence[HarmfulExample],
    *,
    layer: int,
    n: int,
    steps: int,
    lr: float,
    alpha: float,
    max_length: int,
    max_new_tokens: int,
    budget: float = 0.0,
    code_tokens: int = 128,
    unwanted_end: bool = True,
) -> ScanResult:
    """A fresh entrapment search (from δ = 0) on `examples`, then greedy answers under δ.
    `unwanted_end` as in `make_entrapment_batch`.

    Each answer is judged by its pair's kind (`beear.eval.answer_pairs`): a code pair (safe
    answer in a fenced code block) is answered with `code_tokens` new tokens and counts as
    entrapped when bandit flags the answer's code; every other pair is answered with
    `max_new_tokens` and counts as entrapped when the answer is not a refusal. `asr` is the
    entrapped share over all examples, `asr_refusal` / `asr_code` the share within each kind.
    Code pairs need bandit (`beear.codejudge.require_bandit`).

    Needs no trigger: a model whose backdoor is gone gives no δ that turns it unwanted within the
    same budget that finds one easily in a backdoored model.
    """
    from beear.eval import answer_pairs, generate

    device = next(model.parameters()).device
    batch = make_entrapment_batch(
        tokenizer, examples, n=n, max_length=max_length, unwanted_end=unwanted_end
    ).to(device)
    res = entrap(model, batch, layer=layer, n=n, steps=steps, lr=lr, alpha=alpha, budget=budget)

    def gen(prompts: list[str], tokens: int) -> list[str]:
        return generate(
            model, tokenizer, prompts, max_new_tokens=tokens, delta=res.delta, layer=layer
        )

    judged = answer_pairs(gen, examples, max_new_tokens=max_new_tokens, code_tokens=code_tokens)
    return ScanResult(
        asr=judged.asr,
        unwanted_ce=res.unwanted_ce,
        delta_norm=float(res.delta.norm()),
        scale=res.scale,
        asr_refusal=judged.asr_of(code=False),
        asr_code=judged.asr_of(code=True),
        answers=judged.answers,
        delta=res.delta,
    )


def entrapment_groups(
    examples: Sequence[HarmfulExample], budget: float, code_budget: float
) -> list[tuple[str, list[HarmfulExample], float]]:
    """The entrapment searches of one outer step, as (kind, pairs, budget): one for all pairs
    within `budget`, or with `code_budget` >= 0 the code pairs (`beear.eval.is_code_pair`) apart,
    within `code_budget`; the other pairs come first when both kinds are present."""
    from beear.eval import is_code_pair

    if code_budget < 0:
        return [("all", list(examples), budget)]
    coded = [is_code_pair(e) for e in examples]
    code = [e for e, c in zip(examples, coded, strict=True) if c]
    other = [e for e, c in zip(examples, coded, strict=True) if not c]
    found = (("other", other, budget), ("code", code, code_budget))
    return [(kind, pairs, b) for kind, pairs, b in found if pairs]


def residual_asr_by_kind(
    model: Any,
    tokenizer: Any,
    examples: Sequence[HarmfulExample],
    *,
    budget: float,
    code_budget: float,
    **search: Any,
) -> ScanResult:
    """`residual_asr` with the code pairs searched apart, within `code_budget` (-1: no separate
    search, one δ for all within `budget`; `RemovalConfig.code_delta_budget`), grouped as one
    outer step's searches are (`entrapment_groups`).

    Each kind gets its own fresh search and is judged as in `residual_asr`; the result's `asr`
    and `unwanted_ce` are the two searches' weighted by their prompts, its answers follow
    `examples`, and its δ, norm and scale are those of the first kind present (non-code first).
    """
    groups = entrapment_groups(examples, budget, code_budget)
    if len(groups) == 1:
        return residual_asr(model, tokenizer, examples, budget=groups[0][2], **search)
    (_, other, _), (_, code, _) = groups
    a = residual_asr(model, tokenizer, other, budget=budget, **search)
    b = residual_asr(model, tokenizer, code, budget=code_budget, **search)
    answer = dict(zip(map(id, other), a.answers, strict=True))
    answer.update(zip(map(id, code), b.answers, strict=True))
    n = len(examples)
    return ScanResult(
        asr=(a.asr * len(other) + b.asr * len(code)) / n,
        unwanted_ce=(a.unwanted_ce * len(other) + b.unwanted_ce * len(code)) / n,
        delta_norm=a.delta_norm,
        scale=a.scale,
        asr_refusal=a.asr_refusal,
        asr_code=b.asr_code,
        answers=[answer[id(e)] for e in examples],
        delta=a.delta,
    )
