"""Resumable state of a removal run: written atomically, read back bit-exactly.

Tensors go to safetensors; the optimizer state is written with `torch.save` and read back with
`weights_only=True` (no code runs on load); the rest is JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from beear.config import RemovalConfig
from beear.loop import LoopState

__all__ = ["load", "save"]


def save(directory: Path, model: Any, state: LoopState) -> None:
    """Write `state` (taken after step `state.step`) to `directory`, replacing it atomically."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    assert state.weights is not None and state.best_weights is not None
    save_file(
        {k: v.contiguous() for k, v in state.weights.items()}, str(tmp / "weights.safetensors")
    )
    save_file(
        {k: v.contiguous() for k, v in state.best_weights.items()}, str(tmp / "best.safetensors")
    )
    deltas = {
        k: v.contiguous()
        for k, v in (("delta", state.delta), ("delta_code", state.delta_code))
        if v is not None
    }
    if deltas:
        save_file(deltas, str(tmp / "delta.safetensors"))
    if state.avg_sum is not None:  # average_from's running sum
        save_file(
            {k: v.contiguous() for k, v in state.avg_sum.items()}, str(tmp / "avg.safetensors")
        )
    torch.save(state.optimizer, tmp / "optimizer.pt")
    meta = {
        "step": state.step,
        "history": state.history,
        "best": state.best,
        "passes": state.passes,
        "bad_steps": state.bad_steps,
        "delta_budget": state.delta_budget,
        "avg_from": state.avg_from,
        "avg_count": state.avg_count,
    }
    (tmp / "state.json").write_text(json.dumps(meta))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def load(directory: Path, model: Any, config: RemovalConfig) -> LoopState | None:
    """Read a checkpoint written by `save`, or None if there is none."""
    directory = Path(directory)
    if not (directory / "state.json").is_file():
        old = directory.with_name(directory.name + ".old")  # killed between the two renames
        if (old / "state.json").is_file():
            directory = old
        else:
            return None
    meta = json.loads((directory / "state.json").read_text())
    deltas = {}
    if (directory / "delta.safetensors").is_file():
        deltas = load_file(str(directory / "delta.safetensors"))
    return LoopState(
        step=meta["step"],
        history=meta["history"],
        best=meta["best"],
        best_weights=load_file(str(directory / "best.safetensors")),
        passes=meta["passes"],
        delta=deltas.get("delta"),
        delta_code=deltas.get("delta_code"),
        optimizer=torch.load(directory / "optimizer.pt", weights_only=True),
        weights=load_file(str(directory / "weights.safetensors")),
        bad_steps=meta["bad_steps"],
        delta_budget=meta.get("delta_budget"),  # absent in states written before it was kept
        avg_sum=load_file(str(directory / "avg.safetensors"))
        if (directory / "avg.safetensors").is_file()
        else None,
        avg_from=meta.get("avg_from", 0),
        avg_count=meta.get("avg_count", 0),
    )
