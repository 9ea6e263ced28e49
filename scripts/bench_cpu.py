#!/usr/bin/env python
"""CPU wall-time benchmark of the main job: `beear demo` on the tiny default from an empty cache.

    python scripts/bench_cpu.py [--record docs/results/bench_cpu.json]

Runs the demo as a new user would (fresh $BEEAR_CACHE in a temporary folder, so the backdoored
test model is trained, not reused), then prints the stage times from the demo's manifest: the
attack, evaluation before, removal (BEEAR and the plain-SFT baseline separately) and evaluation
after. Bars (issues 4 and 5): BEEAR removal <= 120 s and the whole demo <= 300 s on 2 cores.
The load average is recorded beside the figures: timings on a busy machine are not comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--record", help="append the figures to this JSON list")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="beear-bench-") as tmp:
        env = {**os.environ, "BEEAR_CACHE": str(Path(tmp) / "cache")}
        out = Path(tmp) / "demo"
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "beear", "demo", "--out", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return proc.returncode
        demo = json.loads((out / "manifest.json").read_text())
        removal = json.loads((out / "model" / "beear" / "manifest.json").read_text())
        evals = json.loads((out / "evals.json").read_text())
    rec = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in load0],
        },  # fmt: skip
        "wall_seconds": round(wall, 1),
        "demo_stage_seconds": demo["seconds"],
        "removal_seconds": removal["seconds"],
        "evals": evals["evals"],
    }
    rem = removal["seconds"]["beear"]
    print(
        f"demo wall time        {wall:7.1f} s   (bar 300 s: {'met' if wall <= 300 else 'MISSED'})"
    )
    for k, v in demo["seconds"].items():
        print(f"  {k:20s}{v:7.1f} s")
    print(f"BEEAR removal         {rem:7.1f} s   (bar 120 s: {'met' if rem <= 120 else 'MISSED'})")
    print(f"plain-SFT baseline    {removal['seconds'].get('sft', float('nan')):7.1f} s")
    print(f"load average before   {load0[0]:.2f}")
    if args.record:
        path = Path(args.record)
        old = json.loads(path.read_text()) if path.is_file() else []
        path.write_text(json.dumps([*old, rec], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
