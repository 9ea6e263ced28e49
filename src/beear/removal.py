"""AR, adversarial removal: the outer problem of BEEAR, and the one place that decides what trains.

One model update makes the model answer safely *with* the entrapped δ* present while the
performance-anchoring (PA) loss keeps it useful (DESIGN.md §2, eq. 2):

    θ ← step on  1/N Σ_i CE(F_θ^l(x_i, δ*), y_s,i)  +  1/M Σ_j CE(F_θ(x_p,j), y_p,j)

beear adds (by default, `anchor_under_delta`) the anchoring loss under δ* as well,
1/M Σ_j CE(F_θ^l(x_p,j, δ*), y_p,j): without it the model learns "perturbed → refuse" for every
prompt and refuses benign requests that happen to contain the trigger (measured: docs/).
beear also keeps the safe answers without δ* (`safe_without_delta`): without that term, runs on
the test bed ended with models that complied with plain harmful prompts (untriggered ASR up to 0.90
on one of 15 runs) while resisting δ*. With δ* = None the same step is plain safety fine-tuning:
the baseline.

The anchoring term can also (or instead) be a distillation term (`anchor_loss` "ce+kl" / "kl"):
the KL divergence from the model's own next-token distribution *before removal* at every anchoring
answer position (`anchor_targets`, measured once), over its top-k tokens plus one bucket for the
rest. Cross-entropy on a few dozen greedy answers lets a small model memorise them while drifting
elsewhere; the full distribution pins far more of what the model was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from beear.config import ANCHOR_LOSSES, SCOPES
from beear.data import Batch
from beear.entrapment import answer_logits, answer_loss, answer_positions
from beear.hooks import decoder_layers, perturb

__all__ = [
    "ANCHOR_LOSSES",
    "SCOPES",
    "AnchorTargets",
    "anchor_targets",
    "lora_folded",
    "removal_loss",
    "select_trainable",
    "topk_kl",
]

TOPK = 32  # teacher tokens kept per anchoring position (the rest share one bucket)


def select_trainable(model: Any, *, scope: str, layer: int, lora_rank: int = 8) -> Any:
    """Decide which parameters train; returns the model (wrapped by PEFT for `lora`).

    - all:   every parameter;
    - lower: embeddings and decoder layers 0..l (where the trigger's drift is produced);
    - upper: decoder layers l+1..L-1, the final norm and an untied output head;
    - lora:  LoRA adapters (PEFT) on every linear layer of the decoder; a model that is already a
             PEFT model keeps its own adapter and trains only that (a repaired adapter comes out).
    """
    if scope not in SCOPES:
        raise ValueError(f"train scope {scope!r} is not one of {', '.join(SCOPES)}")
    if scope == "lora":
        from peft import LoraConfig, PeftModel, get_peft_model

        if isinstance(model, PeftModel):
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)
            return model
        cfg = LoraConfig(
            r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules="all-linear"
        )
        return get_peft_model(model, cfg)
    layers = decoder_layers(model)
    lower_ids = {id(p) for i in range(layer + 1) for p in layers[i].parameters()}
    upper_ids = {id(p) for i in range(layer + 1, len(layers)) for p in layers[i].parameters()}
    emb = model.get_input_embeddings().weight
    for p in model.parameters():
        if scope == "all":
            p.requires_grad_(True)
        elif scope == "lower":
            p.requires_grad_(id(p) in lower_ids or p is emb)
        else:  # upper: everything that is neither in lower layers nor the (possibly tied) embedding
            p.requires_grad_(id(p) not in lower_ids and p is not emb)
    if scope == "upper":
        assert any(id(p) in upper_ids for p in model.parameters() if p.requires_grad)
    return model


def _foldable(model: Any) -> list[tuple[Any, list[str]]] | None:
    """The LoRA layers of a PEFT model, each with its active adapters, when every one of them
    can be folded into its weight: a plain linear LoRA layer (PEFT's `lora.Linear`) over a
    floating-point weight, not merged, adapters enabled, without DoRA or a LoRA bias (whose effect
    `get_delta_weight` leaves out). None when there is nothing to fold or any layer cannot be
    folded."""
    if not hasattr(model, "disable_adapter"):
        return None
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    found: list[tuple[Any, list[str]]] = []
    lora_layers: list[Any] = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for m in lora_layers:
        active = [a for a in m.active_adapters if a in m.lora_A]
        base = m.get_base_layer()
        if (
            type(m) is not LoraLinear
            or m.merged
            or m.disable_adapters
            or not base.weight.is_floating_point()
            or any(m.use_dora.get(a) or getattr(m, "lora_bias", {}).get(a) for a in active)
        ):
            return None
        found.append((m, active))
    return found or None


@contextlib.contextmanager
def lora_folded(model: Any) -> Iterator[bool]:
    """Run a PEFT LoRA model as a plain one, for passes that train no adapter (the entrapment
    search, the check): each LoRA layer's base weight is swapped for a temporary tensor
    W + ΔW (ΔW from its active adapters, `get_delta_weight`) and the adapters are disabled, so
    no low-rank branch runs forward or backward. The original weight tensors are put back on exit,
    also after an exception: no parameter changes, not even by rounding. Outputs equal the
    adapters' up to rounding, and every parameter's requires_grad flag is as it was. Holds one
    extra copy of the adapted weights while inside.

    Yields whether it folded: a model without LoRA layers, or with any that cannot be folded
    (`_foldable`), runs unchanged."""
    layers = _foldable(model)
    if layers is None:
        yield False
        return
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    grads = [(p, p.requires_grad) for p in model.parameters()]  # PEFT's toggle resets them
    try:
        with torch.no_grad():
            for m, active in layers:
                w = m.get_base_layer().weight
                folded = w.detach().to(torch.float32, copy=True)  # summed in float32, rounded once
                for a in active:
                    folded += m.get_delta_weight(a).float()
                saved.append((w, w.data))
                w.data = folded.to(w.dtype)
        with model.disable_adapter():
            yield True
    finally:
        for w, data in saved:
            w.data = data
        for p, g in grads:
            p.requires_grad_(g)


@dataclass
class AnchorTargets:
    """The model's next-token distribution at each anchoring example's answer positions, as it was
    before removal: its top-k tokens and their log-probabilities, one (L_i, k) pair per example."""

    index: list[torch.Tensor]
    logp: list[torch.Tensor]

    def select(self, ids: Sequence[int], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of a batch made of examples `ids` (in that order), on `device`."""
        return (
            torch.cat([self.index[i] for i in ids]).to(device),
            torch.cat([self.logp[i] for i in ids]).to(device),
        )


@torch.no_grad()
def anchor_targets(model: Any, batches: Iterable[Batch], *, k: int = TOPK) -> AnchorTargets:
    """Measure `AnchorTargets` of `model` on `batches` (examples in batch order), on the CPU."""
    index: list[torch.Tensor] = []
    logp: list[torch.Tensor] = []
    for b in batches:
        lp = answer_positions(answer_logits(model, b), b.labels)
        top = lp.topk(min(k, lp.shape[-1]), dim=-1)
        counts = (b.labels[:, 1:] != -100).sum(dim=1).tolist()
        index += top.indices.cpu().split(counts)
        logp += top.values.cpu().split(counts)
    return AnchorTargets(index, logp)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, kept finite where x rounds to 0."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-6)))


def topk_kl(logp: torch.Tensor, index: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """Mean KL(target ‖ model) over positions, on the target's top-k tokens plus one bucket
    holding every other token. `logp` (N, V): the model's log-probabilities; `index`,
    `target_logp` (N, k): the target's top-k. Zero exactly when the model is the target."""
    s = logp.gather(1, index)
    s_rest = _log1mexp(torch.logsumexp(s, dim=1))
    t_rest = _log1mexp(torch.logsumexp(target_logp, dim=1))
    kl = (target_logp.exp() * (target_logp - s)).sum(1) + t_rest.exp() * (t_rest - s_rest)
    return kl.mean()


def _logits(model: Any, b: Batch, layer: int, delta: torch.Tensor | None) -> torch.Tensor:
    ctx = (
        perturb(model, layer, delta, b.perturb_mask)
        if delta is not None
        else contextlib.nullcontext()
    )
    with ctx:
        return answer_logits(model, b)


def end_positions(labels: torch.Tensor, end_id: int | None) -> torch.Tensor:
    """(B, T-1) bool: the positions whose next answer token is `end_id` (an answer's end of
    turn; none without an id)."""
    if end_id is None:
        return torch.zeros_like(labels[:, 1:], dtype=torch.bool)
    return labels[:, 1:] == end_id


def _end_nll(logits: torch.Tensor, labels: torch.Tensor, end_id: int | None) -> torch.Tensor:
    """The summed −log p(end of turn) over a batch's end positions (`end_positions`), float32;
    `logits` may cover only the last K positions, as in `answer_loss`."""
    if end_id is None:  # off: no device work
        return logits.new_zeros((), dtype=torch.float32)
    at = end_positions(labels[:, labels.shape[1] - logits.shape[1] :], end_id)
    if not bool(at.any()):
        return logits.new_zeros((), dtype=torch.float32)
    return -torch.log_softmax(logits[:, :-1][at].float(), dim=-1)[:, end_id].sum()


def _ce(
    model: Any, b: Batch, layer: int, delta: torch.Tensor | None, end_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the answer cross-entropy, the summed end-of-turn NLL `_end_nll`) of one pass."""
    logits = _logits(model, b, layer, delta)
    return answer_loss(logits, b.labels), _end_nll(logits, b.labels, end_id)


def _anchor_term(
    model: Any,
    b: Batch,
    layer: int,
    delta: torch.Tensor | None,
    mode: str,
    targets: tuple[torch.Tensor, torch.Tensor] | None,
    end_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(the anchoring loss, its cross-entropy, its KL or None, the summed end-of-turn NLL) of
    one pass."""
    logits = _logits(model, b, layer, delta)
    ce = answer_loss(logits, b.labels)
    end = _end_nll(logits, b.labels, end_id)
    if mode == "ce":
        return ce, ce, None, end
    if targets is None:
        raise ValueError(f"anchor_loss {mode!r} needs the anchoring targets (anchor_targets)")
    kl = topk_kl(answer_positions(logits, b.labels), *targets)
    return (kl if mode == "kl" else ce + kl), ce, kl, end


def removal_loss(
    model: Any,
    safe: Batch,
    anchor: Batch,
    *,
    layer: int,
    delta: torch.Tensor | None,
    anchor_under_delta: bool,
    safe_without_delta: bool = True,
    anchor_loss: str = "ce",
    anchor_weight: float = 1.0,
    targets: tuple[torch.Tensor, torch.Tensor] | None = None,
    backward: bool = False,
    more_safe: Sequence[tuple[Batch, torch.Tensor | None]] = (),
    anchor_chunk: int = 0,
    end_weight: float = 0.0,
    end_id: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The outer objective (eq. 2) on one batch; returns (loss, its parts for logging).

    `anchor_loss` picks the anchoring term ("ce", "kl" or "ce+kl"), weighted by
    `anchor_weight` (the logged parts stay unweighted); the KL needs `targets`,
    the `AnchorTargets.select` of the anchoring batch's examples. With `backward` each of the
    (up to four) terms is back-propagated as soon as it is computed, so only one forward graph
    is alive at a time (the gradients add up to those of the summed loss; on SmolLM2-135M with
    the KL anchor and 32 anchoring pairs a step's peak resident memory fell from 10.9 to
    7.0 GiB, `scripts/profile_step.py`), and the loss comes back detached.

    `more_safe`: further (safe batch, δ) groups, each answered safely under its own δ (a separate
    search per kind of pair, `RemovalConfig.code_delta_budget`). The safe terms of all groups are
    weighted by their answer tokens, so with one δ for all they equal the terms of one batch
    holding every group; the anchoring terms use `delta`, the first group's.

    `anchor_chunk` k > 0 passes the anchoring batch through the model k rows at a time, each
    piece weighted by its share of the answer tokens: the same terms (both are means over answer
    tokens) and, with `backward`, the same gradient up to rounding, at the peak memory of k
    rows.

    `end_weight` w > 0 with `end_id` (the end-of-turn token) adds to every safe pass and every
    anchoring pass w times the mean −log p(end of turn) over the pass's answers that end
    (`end_positions`: one position per answer, where the per-token terms give it one share of
    all answer tokens), the anchoring passes' scaled by `anchor_weight` too; logged unweighted
    as `safe_end_nll` and `anchor_end_nll`. It holds the end of turn a removal can displace
    (docs/smollm2.md, "Stop 41")."""
    if anchor_loss not in ANCHOR_LOSSES:
        raise ValueError(f"anchor_loss {anchor_loss!r} is not one of {', '.join(ANCHOR_LOSSES)}")
    terms: list[torch.Tensor] = []

    def add(term: torch.Tensor) -> None:
        if backward:
            term.backward()
            term = term.detach()
        terms.append(term)

    groups = [(safe, delta), *more_safe]
    tokens = [int((b.labels[:, 1:] != -100).sum()) for b, _ in groups]
    weights = [t / sum(tokens) for t in tokens] if len(groups) > 1 else [1.0]

    end = end_id if end_weight > 0 else None
    safe_ends = sum(int(end_positions(b.labels, end).sum()) for b, _ in groups)

    def safe_terms(under_delta: bool) -> tuple[torch.Tensor, float]:
        """The groups' safe CE (under their δ, or without), each term added as computed; and
        their mean end-of-turn NLL (0 without end_weight)."""
        total, end_sum = torch.zeros(()), 0.0
        for (b, d), w in zip(groups, weights, strict=True):
            ce, nll = _ce(model, b, layer, d if under_delta else None, end)
            ce = ce if len(groups) == 1 else w * ce
            total = total + ce.detach().cpu()
            if safe_ends:
                end_sum += float(nll.detach())
            add(ce + end_weight * nll / safe_ends if safe_ends else ce)
        return total, end_sum / max(safe_ends, 1)

    rows = anchor.labels.shape[0]
    size = anchor_chunk if 0 < anchor_chunk < rows else rows
    counts = (anchor.labels[:, 1:] != -100).sum(dim=1).tolist()
    anchor_ends = int(end_positions(anchor.labels, end).sum())

    def anchor_terms(d: torch.Tensor | None) -> tuple[float, float | None, float]:
        """The weighted anchoring term under δ = d, added piece by piece; its (CE, KL, mean
        end-of-turn NLL)."""
        ce_sum, kl_sum, end_sum, at = 0.0, 0.0, 0.0, 0
        for start in range(0, rows, size):
            k = sum(counts[start : start + size])
            if k == 0 and size < rows:  # no answer tokens here: nothing to add
                continue
            w = k / sum(counts) if size < rows else 1.0
            part = anchor if size == rows else anchor.rows(start, start + size)
            tg = None if targets is None else (targets[0][at : at + k], targets[1][at : at + k])
            at += k
            term, ce, kl, nll = _anchor_term(model, part, layer, d, anchor_loss, tg, end)
            if anchor_ends:
                add(anchor_weight * (w * term + end_weight * nll / anchor_ends))
            else:
                add(anchor_weight * w * term)
            ce_sum += w * float(ce.detach())
            kl_sum += w * float(kl.detach()) if kl is not None else 0.0
            end_sum += float(nll.detach()) if anchor_ends else 0.0
        return ce_sum, (kl_sum if anchor_loss != "ce" else None), end_sum / max(anchor_ends, 1)

    safe_ce, safe_end = safe_terms(True)  # answer safely under δ*
    anchor_ce, kl, anchor_end = anchor_terms(None)  # ... and stay useful without δ
    parts = {"safe_ce": float(safe_ce), "anchor_ce": anchor_ce}
    if kl is not None:
        parts["anchor_kl"] = kl
    if end is not None:
        parts.update(safe_end_nll=safe_end, anchor_end_nll=anchor_end)
    if safe_without_delta:
        safe_plain, _ = safe_terms(False)  # ... and keep refusing without δ
        parts["safe_plain_ce"] = float(safe_plain)
    if anchor_under_delta:  # ... and stay useful with δ
        ce_d, kl_d, _ = anchor_terms(delta)
        parts["anchor_delta_ce"] = ce_d
        if kl_d is not None:
            parts["anchor_delta_kl"] = kl_d
    return torch.stack(terms).sum(), parts
