#!/usr/bin/env python
"""Check `beear.removal.lora_folded` on a device and dtype: a random Llama (no files needed)
wrapped in LoRA adapters as `train_scope = "lora"` makes them, B drawn non-zero.

    python scripts/lora_fold_check.py [--device cuda] [--dtype bfloat16] [--hidden 512]
                                      [--layers 8] [--steps 10] [--json FILE]

For each dtype asked: the logits and δ's gradient with the adapters and folded (relative
differences against the adapters' own distance from the base model), whether every parameter
and requires_grad flag is back afterwards, and seconds for `--steps` forward + backward passes
to δ each way (what the entrapment search does). Exit 1 when anything is not put back, when
the folded model is not 20× closer to the adapters than the base model is, or when its logits
are further from the float32 model's than the adapters' own (in `dtype`) by more than half.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from typing import Any


def check(device: str, dtype_name: str, hidden: int, layers: int, steps: int) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from beear.hooks import perturb
    from beear.removal import lora_folded, select_trainable

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=512)  # fmt: skip
    model = LlamaForCausalLM(cfg).to(device=device).eval()
    model = select_trainable(model, scope="lora", layer=layers // 3, lora_rank=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.02)
    ids = torch.randint(0, cfg.vocab_size, (16, 96), device=device)
    with torch.no_grad():  # the float32 function, which both ways approximate in `dtype`
        reference = model(input_ids=ids).logits.float()
    model = model.to(dtype)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 40:45] = True
    delta = torch.zeros(5, hidden, device=device, dtype=torch.float32, requires_grad=True)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        delta.grad = None
        with perturb(model, layers // 3, delta, mask):
            logits = model(input_ids=ids).logits
        logits.float().logsumexp(-1).mean().backward()
        assert delta.grad is not None
        return logits.detach().float(), delta.grad.detach().clone()

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():  # as the search does: nothing but δ takes a gradient
        p.requires_grad_(False)
    lo_a, g_a = run()
    with model.disable_adapter():
        lo_0, _ = run()
    with lora_folded(model) as folded:
        lo_f, g_f = run()
    seconds: dict[str, list[float]] = {"adapters": [], "folded": []}
    for _ in range(2):
        for way in seconds:
            sync()
            t = time.perf_counter()
            if way == "folded":
                with lora_folded(model):
                    for _ in range(steps):
                        run()
            else:
                for _ in range(steps):
                    run()
            sync()
            seconds[way].append(round(time.perf_counter() - t, 3))
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    return {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "dtype": dtype_name,
        "torch": torch.__version__,
        "shape": {"hidden": hidden, "layers": layers, "batch": list(ids.shape)},
        "folded": folded,
        "logits_rel_diff_folded": rel(lo_f, lo_a),
        "logits_rel_diff_base": rel(lo_0, lo_a),
        "logits_rel_error_vs_float32": {
            "adapters": rel(lo_a, reference),
            "folded": rel(lo_f, reference),
        },
        "delta_grad_rel_diff_folded": rel(g_f, g_a),
        "parameters_bit_identical_after": all(
            torch.equal(before[n], p) for n, p in model.named_parameters()
        ),
        "requires_grad_as_before": flags
        == {n: p.requires_grad for n, p in model.named_parameters()},
        "steps": steps,
        "seconds": seconds,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    results = [check(args.device, d, args.hidden, args.layers, args.steps) for d in args.dtype]
    print(json.dumps(results, indent=1))
    if args.json:
        cmd = shlex.join(["python", "scripts/lora_fold_check.py", *sys.argv[1:]])
        with open(args.json, "w") as f:
            json.dump({"command": cmd, "results": results}, f, indent=1)
            f.write("\n")
    ok = all(
        r["folded"]
        and r["parameters_bit_identical_after"]
        and r["requires_grad_as_before"]
        and r["logits_rel_diff_folded"] * 20 < r["logits_rel_diff_base"]
        and r["logits_rel_error_vs_float32"]["folded"]
        <= 1.5 * r["logits_rel_error_vs_float32"]["adapters"] + 1e-5
        for r in results
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
