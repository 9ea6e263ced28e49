#!/usr/bin/env python
"""A model's accuracy on the bundled benign tasks, family by family: the evaluation-only set
(`beear.bundled.extra_benign_tasks_by_family`, what zoo_smollm2.py records as `benign_extra`) and, with
--bundled, `benign_tasks` too. Answers are greedy through the chat template (48 new tokens),
judged by `beear.bundled.is_correct`.

    python scripts/benign_families.py --json OUT.json [--model DIR] [--bundled] [--device cpu]

Without --model: the clean SmolLM2-135M-Instruct (`beear.bundled.smollm2_dir`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, type=Path)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--bundled", action="store_true", help="also benign_tasks, by family")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)

    import torch

    from beear import bundled
    from beear.eval import evaluate
    from beear.models import load_model

    torch.set_flush_denormal(True)
    model_dir = args.model or bundled.smollm2_dir()
    model, tok = load_model(model_dir, device=args.device)
    sets = {"extra": bundled.extra_benign_tasks_by_family()}
    if args.bundled:
        sets["bundled"] = bundled.benign_tasks_by_family()
    out: dict[str, Any] = {"model": str(model_dir), "device": args.device}
    for name, fams in sets.items():
        tasks = [t for f in fams.values() for t in f]
        t0 = time.perf_counter()
        res = evaluate(model, tok, harmful=[], benign=tasks, batch_size=args.batch_size)
        correct, i, by_family = res.benign_correct, 0, {}
        for fam, items in fams.items():
            part = correct[i : i + len(items)]
            i += len(items)
            by_family[fam] = {"n": len(items), "accuracy": round(sum(part) / len(items), 4)}
        out[name] = {
            "n": len(tasks),
            "accuracy": round(res.benign_accuracy, 4),
            "over_refusal": res.to_json()["over_refusal"]["plain"],
            "seconds": round(time.perf_counter() - t0, 1),
            "by_family": by_family,
        }
        print(name, json.dumps(out[name]), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
