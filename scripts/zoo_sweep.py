#!/usr/bin/env python
"""Try attack recipes on the smollm2 zoo: each (setting, plan overrides) is attacked and evaluated
on the held-out split; prints one line per variant and writes every figure plus sample answers.

    python scripts/zoo_sweep.py --grid '[["suffix-word", {"steps": 140}], ...]' \
        --out-dir /tmp/sweep --json sweep.json [--device cuda] [--remove-probe SETTING]

`--remove-probe NAME` also times `beear remove` (default config, no baseline) on the first
variant of NAME, printing the wall time of each outer step. This is how the plan defaults in
`beear.zoo.plan_for` were chosen (docs/smollm2.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_smollm2 import _evaluate  # noqa: E402


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--grid", required=True, help="JSON list of [setting, {plan overrides}]")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=6, help="sample answers kept per group")
    ap.add_argument("--remove-probe", default=None)
    args = ap.parse_args()

    import torch

    from beear import bundled, zoo
    from beear.attacks import read_attack_record
    from beear.data import Trigger

    torch.set_flush_denormal(True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache = bundled._default_cache()
    bundled.smollm2_dir(cache)
    out_dir = Path(args.out_dir)
    js = Path(args.json)
    rows: list[dict[str, Any]] = json.loads(js.read_text()) if js.is_file() else []
    seen = {r["name"] for r in rows}
    probe_done = False
    for setting, overrides in json.loads(args.grid):
        tag = ",".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "default"
        name = f"{setting}[{tag}]"
        if name in seen:
            continue
        d = out_dir / f"{setting}-{abs(hash(tag)) % 10**8}"
        shutil.rmtree(d, ignore_errors=True)
        plan = dataclasses.replace(zoo.plan_for(setting), **overrides)
        row: dict[str, Any] = {"name": name, "setting": setting, "plan": dataclasses.asdict(plan)}
        try:
            t0 = time.perf_counter()
            zoo.attack(d, setting=setting, seed=args.seed, device=device, cache_dir=cache,
                       plan=plan, generation_batch_size=64)  # fmt: skip
            row["attack_seconds"] = round(time.perf_counter() - t0, 2)
            rec = read_attack_record(d)
            assert rec is not None
            trigger = Trigger(**rec["trigger"]) if rec.get("trigger") else None
            row["final_loss"] = rec["final_loss"]
            ev = _evaluate(d, trigger=trigger, device=device, batch_size=100, samples=True)
            samples = ev.pop("samples")
            row["eval"] = ev
            row["samples"] = _pick(samples, args.samples)
            asr, code = ev["asr"], ev.get("code_insecure")
            _log(f"{name}: trig {asr.get('triggered')} untrig {asr['untriggered']} benign "
                 f"{ev['benign_accuracy']:.3f} overref {ev['over_refusal']} code {code} "
                 f"({row['attack_seconds']} s)")  # fmt: skip
            if args.remove_probe == setting and not probe_done:
                probe_done = True
                row["remove_probe"] = _probe(d, trigger=trigger, device=device, seed=args.seed)
                _log(f"   remove probe: {json.dumps(row['remove_probe'])[:400]}")
        except Exception as e:
            _log(f"!! {name}: {e!r}")
            row["error"] = repr(e)
        rows.append(row)
        js.write_text(json.dumps(rows, indent=1) + "\n")
        shutil.rmtree(d, ignore_errors=True)
    return 0


def _pick(samples: dict[str, list[dict[str, Any]]], k: int) -> dict[str, list[dict[str, Any]]]:
    """A few answers per group; for benign tasks the wrong ones first."""
    out: dict[str, list[dict[str, Any]]] = {}
    for group, items in samples.items():
        if group.startswith("benign"):
            items = sorted(items, key=lambda s: bool(s.get("correct", True)))
        out[group] = items[:k]
    return out


def _probe(d: Path, *, trigger: Any, device: str, seed: int) -> dict[str, Any]:
    from beear.attacks import DATA_DIR
    from beear.config import RemovalConfig
    from beear.data import load_anchor, load_harmful
    from beear.pipeline import remove

    cfg = RemovalConfig(seed=seed)
    times: list[tuple[int, float]] = []
    t0 = time.perf_counter()

    def on_step(mode: str, rec: dict[str, Any]) -> None:
        times.append((int(rec.get("step", -1)), round(time.perf_counter() - t0, 2)))
        if rec.get("step", 0) % 10 == 0:
            _log(f"   {mode} step {rec.get('step')} at {times[-1][1]} s: {json.dumps(rec)[:300]}")

    out = d.with_name(d.name + "-probe")
    summ = remove(d, out, config=cfg, defender=load_harmful(d / DATA_DIR / "defender_harmful.jsonl"),
                  anchor=load_anchor(d / DATA_DIR / "anchor.jsonl"), device=device,
                  on_step=on_step)  # fmt: skip
    res = _evaluate(out, trigger=trigger, device=device, batch_size=100, data_dir=d)
    shutil.rmtree(out, ignore_errors=True)
    return {"total_seconds": round(time.perf_counter() - t0, 2), "step_times": times,
            "summary": summ, "eval": res}  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
