#!/usr/bin/env python
"""Time the phases of BEEAR's outer step on a real model (SmolLM2 by default).

    python scripts/profile_step.py [--model DIR] [--device cpu|cuda] [--steps 3] [--summed]
                                   [--anchor-batch-size N] [--anchor-chunk K]
                                   [--anchor-loss ce|kl|ce+kl]

Prints seconds per phase (entrapment, removal forward+backward, optimiser) averaged over steps,
with CUDA synchronised around each phase, and the process's peak memory (CPU: peak resident set
size; CUDA: peak allocated). The removal loss back-propagates term by term as the loop does;
`--summed` builds the whole loss first and back-propagates once (one process per mode: a peak
only grows). Uses the bundled HarmBench defender split with
placeholder unwanted answers (timing only: the content does not matter).
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from typing import Any


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model")
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops")
    ap.add_argument("--summed", action="store_true", help="one backward pass through the sum")
    ap.add_argument("--anchor-batch-size", type=int, help="default: RemovalConfig's")
    ap.add_argument("--anchor-chunk", type=int, default=0, help="anchoring rows per pass")
    ap.add_argument("--anchor-loss", default="ce", choices=("ce", "kl", "ce+kl"))
    args = ap.parse_args()

    import torch

    from beear import bundled
    from beear.config import RemovalConfig
    from beear.data import AnchorExample, HarmfulExample
    from beear.entrapment import entrap, make_entrapment_batch
    from beear.hooks import resolve_layer
    from beear.models import load_model
    from beear.removal import removal_loss, select_trainable

    torch.set_flush_denormal(True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = args.model or str(bundled.smollm2_dir())
    model, tok = load_model(model_dir, device=device)
    cfg = RemovalConfig(anchor_loss=args.anchor_loss)
    if args.anchor_batch_size:
        cfg = cfg.replace(anchor_batch_size=args.anchor_batch_size)
    defender, _ = bundled.split_harmful(bundled.harmbench_prompts(), seed=0)
    harm = [
        HarmfulExample(p, "I cannot help with that request.", "Sure, here is how to do it. " * 4)
        for p in defender[: cfg.batch_size]
    ]
    anc = bundled.benign_tasks()[: cfg.anchor_batch_size]
    anc = [AnchorExample(a.prompt, f"The answer is {a.answer}.") for a in anc]
    layer = resolve_layer(model, cfg.layer)
    model = select_trainable(model, scope=cfg.train_scope, layer=layer, lora_rank=cfg.lora_rank)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    from beear.data import collate, encode_pair

    def enc(examples: list[AnchorExample]) -> Any:
        e = [encode_pair(tok, x.prompt, x.answer, max_length=cfg.max_length) for x in examples]
        return collate(e, pad_id=tok.pad_token_id, n_perturb=cfg.length).to(device)

    times: dict[str, float] = {}

    @contextmanager
    def phase(name: str) -> Any:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        yield
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times[name] = times.get(name, 0.0) + time.perf_counter() - t

    print(f"model {model_dir} on {device}, dtype {next(model.parameters()).dtype}, layer {layer}")
    targets = None
    if cfg.anchor_loss != "ce":
        from beear.removal import anchor_targets

        model.eval()
        t = anchor_targets(model, [enc(anc)])
        targets = t.select(range(len(anc)), device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model.train()
    for step in range(args.steps + 1):
        if step == 1:
            times.clear()  # step 0 warms up
        with phase("entrap_batch"):
            eb = make_entrapment_batch(tok, harm, n=cfg.length, max_length=cfg.max_length).to(
                device
            )
        with phase("entrap"):
            bee = entrap(model, eb, layer=layer, n=cfg.length, steps=cfg.inner_steps,
                         lr=cfg.inner_lr, alpha=cfg.alpha)  # fmt: skip
        with phase("encode"):
            safe, anchor = enc([AnchorExample(h.prompt, h.safe) for h in harm]), enc(anc)
        opt.zero_grad(set_to_none=True)
        with phase("removal_fwd" if args.summed else "removal_fwd_bwd"):
            loss, _ = removal_loss(model, safe, anchor, layer=layer, delta=bee.delta,
                                   anchor_under_delta=cfg.anchor_under_delta,
                                   safe_without_delta=cfg.safe_without_delta,
                                   anchor_loss=cfg.anchor_loss, targets=targets,
                                   backward=not args.summed,
                                   anchor_chunk=args.anchor_chunk)  # fmt: skip
        if args.summed:
            with phase("removal_bwd"):
                loss.backward()
        with phase("opt"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
    print(f"shapes: entrapment {tuple(eb.unwanted.input_ids.shape)}, safe {tuple(safe.input_ids.shape)}, "
          f"anchor {tuple(anchor.input_ids.shape)}")  # fmt: skip
    total = sum(times.values()) / args.steps
    for k, v in times.items():
        print(f"{k:14s} {v / args.steps:8.3f} s/step")
    print(f"{'total':14s} {total:8.3f} s/step")
    if device.startswith("cuda"):
        print(f"peak GPU memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        print(
            f"peak resident memory {peak:.2f} GiB ({'summed' if args.summed else 'term by term'})"
        )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if device.startswith("cuda") else []
        )
        with profile(activities=acts) as prof:
            entrap(model, eb, layer=layer, n=cfg.length, steps=cfg.inner_steps, lr=cfg.inner_lr,
                   alpha=cfg.alpha)  # fmt: skip
        key = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=15))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
