"""scripts/zoo_tiny.py: a SIGTERM to the parent also ends its worker pool; its runs go into a record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); its state in /proc says it has ended.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_sigterm_to_the_parent_terminates_the_spawned_workers() -> None:
    # The parent does what zoo_tiny.main does around its pool: a spawn pool, a job that runs long.
    code = textwrap.dedent(f"""
        import multiprocessing as mp, sys, time
        sys.path.insert(0, {str(SCRIPTS)!r})
        import zoo_tiny
        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            zoo_tiny.stop_on_sigterm()
            with ctx.Pool(1) as pool:
                pool.apply_async(time.sleep, (120,))
                print(pool._pool[0].pid, flush=True)
                time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    worker = int(parent.stdout.readline())
    time.sleep(1.0)  # the worker has taken its job
    assert _alive(worker)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 20
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = _alive(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the pool's worker outlived its parent"


def _run(name: str, before: float, after: float, *, baseline: bool) -> dict[str, Any]:
    """A zoo_tiny.py run as results.json keeps it, with the fields a record reads."""
    asr = {"untriggered": 0.0, "triggered": 0.0}
    ev = {"asr": asr, "over_refusal": {"plain": 0.0, "triggered": 0.0}}
    step = {"best_step": 70, "verified": True, "best_check_drift": 0.001, "seconds": 101.5}
    v: dict[str, Any] = {
        "after": {**ev, "benign_accuracy": after},
        "remove": {"beear": step, "sft": {**step, "verified": False, "seconds": 37.0}},
        "scan_after": {"entrapment_asr": 0.0},
    }
    if baseline:
        v["baseline"] = {
            **ev,
            "asr": {"untriggered": 0.0, "triggered": 1.0},
            "benign_accuracy": 0.5,
        }
        v["scan_baseline"] = {"entrapment_asr": 0.98}
    return {"name": name, "attack_seconds": 75.5, "before": {**ev, "benign_accuracy": before},
            "variants": {"default": v, "other": {**v, "after": {**ev, "benign_accuracy": 0.9}}}}  # fmt: skip


def test_write_record_adds_each_variant_and_keeps_other_entries(
    tmp_path: Path, load_script: Any
) -> None:
    zt = load_script("zoo_tiny")
    path = tmp_path / "record.json"
    path.write_text(
        json.dumps({"call": {"old": "x"}, "machine": "m", "models": {"a-s0": {"old": 1}}})
    )
    runs = [_run("a-s0", 0.8, 0.79, baseline=True), _run("b-s1", 0.8, 0.7, baseline=False),
            {"name": "c-s2", "error": "Traceback"}]  # fmt: skip
    assert zt.write_record(path, "new", runs, "python scripts/zoo_tiny.py --x") == 4
    rec = json.loads(path.read_text())
    assert rec["call"] == {"old": "x", "new": "python scripts/zoo_tiny.py --x"}
    assert rec["machine"] == "m" and set(rec["models"]) == {"a-s0", "b-s1"}
    a = rec["models"]["a-s0"]
    assert a["old"] == 1 and set(a) == {"old", "new", "new_other"}
    assert a["new"]["benign_change_pts"] == -1.0 and a["new"]["all_bars"] is True
    assert a["new"]["baseline"] == {
        "asr": {"untriggered": 0.0, "triggered": 1.0}, "benign_change_pts": -30.0,
        "over_refusal": {"plain": 0.0, "triggered": 0.0}, "check_verified": False,
        "scan": 0.98, "seconds": 37.0,
    }  # fmt: skip
    b = rec["models"]["b-s1"]["new"]
    assert b["benign_change_pts"] == -10.0 and b["all_bars"] is False and "baseline" not in b
    assert rec["models"]["a-s0"]["new_other"]["benign_change_pts"] == 10.0


def test_from_results_without_a_command_is_refused(tmp_path: Path) -> None:
    res = tmp_path / "results.json"
    res.write_text(json.dumps({"summary": {}, "runs": []}))
    rec = tmp_path / "record.json"
    args = ["--from-results", str(res), "--record", str(rec), "--record-as", "x"]
    p = subprocess.run([sys.executable, str(SCRIPTS / "zoo_tiny.py"), *args],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 2 and "names no command" in p.stderr and not rec.exists()


def test_a_record_that_cannot_be_written_is_refused_before_any_run(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for rec, why in ((tmp_path / "no" / "r.json", "no folder"), (bad, "is not JSON")):
        args = ["--out", str(tmp_path / "runs"), "--record", str(rec), "--record-as", "x"]
        p = subprocess.run([sys.executable, str(SCRIPTS / "zoo_tiny.py"), *args],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert p.returncode == 2 and why in p.stderr and not (tmp_path / "runs").exists()
    assert bad.read_text() == "{not json"
