#!/usr/bin/env python
"""Time one entrapment search (BEE, the inner problem) on a LoRA-wrapped model three ways.

    python scripts/lora_merge_probe.py [--model DIR] [--device cpu|cuda] [--rounds 2]
                                       [--record FILE]

- `full`: the model without adapters (train_scope = "all"), the reference speed;
- `adapters`: PEFT's LoRA layers as the loop runs them now (the adapters are frozen during the
  search, but every linear layer still computes the low-rank branch forward and backward);
- `merged`: the search inside `beear.removal.lora_folded` (what `lora_fold`, on by default since
  stop 36, does in the loop): each LoRA layer's base weight is swapped for a temporary tensor
  W + scale·B·A (PEFT's `get_delta_weight`) and the adapters are disabled; the original weight
  tensors are put back afterwards, so no parameter changes by rounding.

The B matrices are drawn non-zero (as after some training), so that the merged weights differ
from the base ones. Prints seconds per search, the found δ's difference between `adapters` and
`merged`, and whether every parameter is bit-identical afterwards. (Stop 35's record was made
with the script's own copy of the folding, which `lora_folded` now is.)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model")
    ap.add_argument("--device", default=None)
    ap.add_argument("--rounds", type=int, default=2, help="each way this often, alternating")
    ap.add_argument("--record", help="write the figures to this JSON file")
    args = ap.parse_args()

    import torch

    from beear import bundled
    from beear.config import RemovalConfig
    from beear.data import HarmfulExample
    from beear.entrapment import entrap, make_entrapment_batch
    from beear.hooks import resolve_layer
    from beear.models import load_model
    from beear.removal import lora_folded, select_trainable

    torch.set_flush_denormal(True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = args.model or str(bundled.smollm2_dir())
    cfg = RemovalConfig()
    defender, _ = bundled.split_harmful(bundled.harmbench_prompts(), seed=0)
    harm = [
        HarmfulExample(p, "I cannot help with that request.", "Sure, here is how to do it. " * 4)
        for p in defender[: cfg.batch_size]
    ]

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    plain, tok = load_model(model_dir, device=device)
    layer = resolve_layer(plain, cfg.layer)
    eb = make_entrapment_batch(tok, harm, n=cfg.length, max_length=cfg.max_length).to(device)
    lora, _ = load_model(model_dir, device=device)
    torch.manual_seed(0)
    lora = select_trainable(lora, scope="lora", layer=layer, lora_rank=cfg.lora_rank)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}

    def search(model: Any) -> Any:
        return entrap(model, eb, layer=layer, n=cfg.length, steps=cfg.inner_steps,
                      lr=cfg.inner_lr, alpha=cfg.alpha)  # fmt: skip

    seconds: dict[str, list[float]] = {"full": [], "adapters": [], "merged": []}
    found: dict[str, Any] = {}
    search(plain)  # warm-up
    for _ in range(args.rounds):
        for way in seconds:
            sync()
            t = time.perf_counter()
            if way == "merged":
                with lora_folded(lora):
                    found[way] = search(lora)
            else:
                found[way] = search(plain if way == "full" else lora)
            sync()
            seconds[way].append(round(time.perf_counter() - t, 2))
            print(f"{way:9s} {seconds[way][-1]:7.2f} s  unwanted CE {found[way].unwanted_ce:.5f}")
    a, b = found["adapters"].delta, found["merged"].delta
    result = {
        "model": model_dir,
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.node(),
        "torch": torch.__version__,
        "layer": layer,
        "batch": list(eb.unwanted.input_ids.shape),
        "inner_steps": cfg.inner_steps,
        "seconds": seconds,
        "unwanted_ce": {k: v.unwanted_ce for k, v in found.items()},
        "delta_rel_diff_adapters_vs_merged": float((a - b).norm() / a.norm()),
        "parameters_bit_identical_after": all(
            torch.equal(before[n], p) for n, p in lora.named_parameters()
        ),
    }
    print(json.dumps(result, indent=1))
    if args.record:
        with open(args.record, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
