"""Would the removal's own drift figure pick the better of several equally safe removals?

Each RESULTS is a `scripts/zoo_tiny.py` results.json whose removals were made from the same
attacked models (one removal seed per file or per variant); their output folders must still be
on disk, since the figure is read from each removal's metrics (beear/metrics.jsonl): the
`check_drift` of the kept step, the mean KL from the model before removal on the anchoring pairs
the removal held back (trigger-free, defender-side; needs `check_drift` > 0). Per model: every
removal's benign change, whether it meets all four tiny bars, and its kept drift; then how many
models meet the bars with each removal alone, with the removal of least drift, with the best one
(an oracle), and the drift threshold question: the kept drift of the removals that miss and of
those that keep. --json writes all of it (the metrics need not stay on disk after).

    python scripts/drift_pick.py runs/zt-seed/results.json runs/zt-s101/results.json \\
        --json docs/results/tiny_drift_pick_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_tiny import bar_checks  # noqa: E402


def kept_drift(out_dir: Path, step: int) -> float:
    """The check_drift at the kept step of the removal written to OUT_DIR."""
    for line in (out_dir / "beear" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("step") == step and "check_drift" in rec:
            return float(rec["check_drift"])
    raise SystemExit(f"drift_pick.py: no check_drift at step {step} in {out_dir} (check_drift 0?)")


def removals(paths: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """Per model, one row per removal found in the results files PATHS."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        for r in json.loads(path.read_text())["runs"]:
            for vname, v in r.get("variants", {}).items():
                beear = v["remove"]["beear"]
                out.setdefault(r["name"], []).append({
                    "removal": f"{path.parent.name}:{vname}",
                    "seed": v["config"]["seed"],
                    "benign_change_pts": round(
                        100 * (v["after"]["benign_accuracy"] - r["before"]["benign_accuracy"]), 2
                    ),
                    "all_bars": all(bar_checks(r["before"], v["after"])),
                    "kept_step": beear["best_step"],
                    "kept_drift": kept_drift(Path(v["remove"]["out"]), beear["best_step"]),
                })  # fmt: skip
    return out


def summarise(models: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The counts --json records and main prints (models with fewer removals than the most are
    left out of the comparison)."""
    k = max(map(len, models.values()))
    full = {m: rows for m, rows in sorted(models.items()) if len(rows) == k}
    labels = [row["removal"] for row in next(iter(full.values()))]
    alone = {
        lab: sum(rows[i]["all_bars"] for rows in full.values()) for i, lab in enumerate(labels)
    }
    picks = {m: min(rows, key=lambda row: row["kept_drift"]) for m, rows in full.items()}
    keep = [row["kept_drift"] for rows in full.values() for row in rows if row["all_bars"]]
    miss = [row["kept_drift"] for rows in full.values() for row in rows if not row["all_bars"]]
    return {
        "models": len(full),
        "removals_per_model": k,
        "all_bars_each_alone": alone,
        "all_bars_least_drift": sum(p["all_bars"] for p in picks.values()),
        "all_bars_best_of": sum(any(row["all_bars"] for row in rows) for rows in full.values()),
        "least_drift_pick": {m: p["removal"] for m, p in picks.items()},
        "kept_drift_of_misses": sorted(miss),
        "largest_kept_drift_of_keepers": max(keep, default=None),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="zoo_tiny results.json files")
    p.add_argument("--json", type=Path, help="write the per-removal rows and the summary here")
    p.add_argument("--call", default="", help="the command that made the removals (recorded)")
    args = p.parse_args(argv)
    models = removals(args.results)
    if not models:
        raise SystemExit("drift_pick.py: no removals in the results given")
    summary = summarise(models)
    for m, rows in sorted(models.items()):
        cells = [
            f"{row['removal']} {row['benign_change_pts']:+.1f}{'' if row['all_bars'] else ' MISS'}"
            f" drift {row['kept_drift']:.4f}"
            for row in rows
        ]
        print(f"{m}: " + "; ".join(cells) + f" -> {summary['least_drift_pick'].get(m, '-')}")
    for key, val in summary.items():
        if key != "least_drift_pick":
            print(f"{key}: {val}")
    if args.json:
        rec = {"call": args.call, "summary": summary, "models": models}
        args.json.write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
