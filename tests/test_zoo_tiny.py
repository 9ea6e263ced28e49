"""scripts/zoo_tiny.py: a SIGTERM to the parent also ends its worker pool."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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
