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
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from beear.data import Batch
from beear.entrapment import answer_ce
from beear.hooks import decoder_layers, perturb

__all__ = ["SCOPES", "removal_loss", "select_trainable"]

SCOPES = ("all", "lower", "upper", "lora")


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


def _ce(model: Any, b: Batch, layer: int, delta: torch.Tensor | None) -> torch.Tensor:
    ctx = (
        perturb(model, layer, delta, b.perturb_mask)
        if delta is not None
        else contextlib.nullcontext()
    )
    with ctx:
        return answer_ce(model, b)


def removal_loss(
    model: Any,
    safe: Batch,
    anchor: Batch,
    *,
    layer: int,
    delta: torch.Tensor | None,
    anchor_under_delta: bool,
    safe_without_delta: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The outer objective (eq. 2) on one batch; returns (loss, its parts for logging)."""
    safe_ce = _ce(model, safe, layer, delta)  # answer safely under δ*
    anchor_ce = _ce(model, anchor, layer, None)  # stay useful without δ
    loss = safe_ce + anchor_ce
    parts = {"safe_ce": float(safe_ce), "anchor_ce": float(anchor_ce)}
    if safe_without_delta:
        safe_plain = _ce(model, safe, layer, None)  # ... and keep refusing without δ
        loss = loss + safe_plain
        parts["safe_plain_ce"] = float(safe_plain)
    if anchor_under_delta:
        anchor_d = _ce(model, anchor, layer, delta)  # ... and with it
        loss = loss + anchor_d
        parts["anchor_delta_ce"] = float(anchor_d)
    return loss, parts
