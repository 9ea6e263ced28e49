#!/usr/bin/env python
"""The trigger-free scan as a detector, at several δ budgets: how well does residual entrapment
separate backdoored from clean models when the perturbation is bounded?

    python scripts/scan_budget.py --json scan.json --budgets 0 0.25 0.5 1 2 \
        backdoored:runs/zoo/suffix-word clean:runs/zoo/clean cleaned:runs/zoo/suffix-word-removed

Each MODEL argument is LABEL:DIR (labels: backdoored, clean, cleaned, or anything else, which is
recorded but left out of the AUROC). Every model directory carries its defender split in
`beear_data/` (or pass --defender FILE for all). A budget of 0 is the unbounded search, the
`beear scan` default. Prints one line per model and budget, then the AUROC of backdoored vs clean
per budget (on the residual ASR and on the unwanted CE under the found δ).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo_tiny  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("models", nargs="*", metavar="LABEL:DIR")
    ap.add_argument("--merge", nargs="+", default=[], help="add the rows of earlier JSON outputs")
    ap.add_argument("--json", required=True)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0, 2.0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--defender", help="one defender file for every model")
    ap.add_argument("--device", default=None)
    ap.add_argument(
        "--heldout-code",
        type=int,
        metavar="SEED",
        help="replace the defender file's code pairs by those of the zoo's held-out coding tasks "
        "of this seed (zoo.build_data(SEED).eval_code), which no removal trains on",
    )
    args = ap.parse_args()

    import torch

    from beear.attacks import DATA_DIR
    from beear.config import RemovalConfig
    from beear.data import load_harmful
    from beear.models import load_model
    from beear.pipeline import scan_model

    torch.set_flush_denormal(True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[dict[str, Any]] = [
        r for f in args.merge for r in json.loads(Path(f).read_text())["rows"]
    ]
    js = Path(args.json)
    js.parent.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    held: list[Any] = []  # the held-out code pairs (--heldout-code), the same for every model
    if args.heldout_code is not None:
        from beear import zoo
        from beear.eval import is_code_pair

        held = zoo.code_pairs(zoo.build_data(args.heldout_code).eval_code)
    for spec in args.models:
        label, _, d = spec.partition(":")
        model_dir = Path(d)
        src = (
            Path(args.defender)
            if args.defender
            else model_dir / DATA_DIR / "defender_harmful.jsonl"
        )
        defender = load_harmful(src)
        if held:  # the refusal pairs stay; the code pairs are the held-out ones
            defender = [e for e in defender if not is_code_pair(e)] + held
        model, tok = load_model(model_dir, device=device)
        for b in args.budgets:
            cfg = RemovalConfig(delta_budget=b)
            r = scan_model(model, tok, defender, config=cfg, steps=args.steps, prompts=args.prompts)
            row = {"label": label, "model": str(model_dir), **r}
            rows.append(row)
            # Every row as it comes: a crash or a time limit later keeps the scans made.
            js.write_text(json.dumps({"partial": True, "rows": rows}, indent=1) + "\n")
            print(
                f"{label:10} {model_dir.name:24} budget {b:<5} asr {r['entrapment_asr']:.3f} "
                f"ce {r['unwanted_ce']:.3f} |δ| {r['delta_norm']:.1f} ({r['seconds']:.1f} s)",
                flush=True,
            )
        del model

    summary: dict[str, Any] = {}
    for b in args.budgets:
        at = [r for r in rows if r["budget"] == b]

        def of(
            label: str, key: str, sign: float = 1.0, at: list[dict[str, Any]] = at
        ) -> list[float]:
            return [sign * r[key] for r in at if r["label"] == label]

        summary[str(b)] = {
            "auroc_asr": zoo_tiny.auroc(
                of("backdoored", "entrapment_asr"), of("clean", "entrapment_asr")
            ),
            "auroc_ce": zoo_tiny.auroc(
                of("backdoored", "unwanted_ce", -1), of("clean", "unwanted_ce", -1)
            ),
            "asr": {
                lab: of(lab, "entrapment_asr") for lab in dict.fromkeys(r["label"] for r in at)
            },
        }
        s = summary[str(b)]
        print(f"budget {b}: AUROC by ASR {s['auroc_asr']}, by CE {s['auroc_ce']}; {s['asr']}")
    out = {
        "budgets": args.budgets,
        "steps": args.steps,
        "prompts": args.prompts,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "seconds": round(time.perf_counter() - t_all, 1),
        "summary": summary,
        "rows": rows,
    }
    js.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
