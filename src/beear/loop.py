"""The BEEAR bi-level loop. Read this file first: it follows the paper's Algorithm 1.

    for each outer step:
        1. BEE  — entrap: find the universal δ* at layer l that elicits the unwanted answers
        2. AR   — remove: one model update towards safe answers under δ*, anchored on benign data
        3. check (every k steps, trigger-free): a fresh entrapment search on held-back defender
           prompts, and the same prompts without δ; keep the best model, stop once neither the
           search nor the plain prompts turn the model (not before `min_steps`: an early check
           can pass on a model that has only learnt to resist the search, docs/results.md).
           Each answer is judged by its pair's kind: a code pair (safe answer in a fenced code
           block) is turned when bandit flags the answer's code, any other when it is no refusal

With `auto_budget` > 0 the δ budget of every search is calibrated once, on the untouched model,
before step 0 (`calibrate_budget`): the smallest budget that still entraps it, times a margin.

`mode="sft"` runs the same loop with δ* ≡ 0 and no entrapment: plain safety fine-tuning with the
same data, steps and optimiser, the baseline every claim is measured against.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from beear.config import RemovalConfig
from beear.data import AnchorExample, DataError, HarmfulExample, collate, encode_pair
from beear.entrapment import (
    ScanResult,
    answer_logits,
    answer_positions,
    entrap,
    entrapment_groups,
    make_entrapment_batch,
    residual_asr_by_kind,
)
from beear.eval import answer_pairs, generate, is_code_pair, is_refusal, require_code_judge
from beear.hooks import resolve_layer
from beear.removal import anchor_targets, lora_folded, removal_loss, select_trainable, topk_kl

__all__ = [
    "BUDGET_GRID",
    "LoopState",
    "NonFiniteLoss",
    "RemovalResult",
    "calibrate_budget",
    "entrapment_groups",
    "judged_pairs",
    "run_beear",
    "split_check",
    "stratified",
]

log = logging.getLogger(__name__)

# `auto_budget`'s grid: 0.05 × 2^k, k = 0..7. Measured first budgets that entrap backdoored models
# (30-step searches): SmolLM2-135M 0.1 (docs/results/scan_budget_gpu.json), tiny test-bed
# models 0.4-0.8 (CPU scans of five attacked models).
BUDGET_GRID = tuple(0.05 * 2**k for k in range(8))
ENTRAPPED = 0.5  # a budget entraps a model when its search turns at least this share of prompts


class NonFiniteLoss(RuntimeError):
    """The model update produced NaN/inf losses repeatedly; the last good weights are kept."""


@dataclass
class LoopState:
    """Everything needed to resume a run at `step` (see beear.checkpoint)."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # {"step", "check_asr", "anchor_ce"}
    best_weights: dict[str, torch.Tensor] | None = None  # trainable tensors, on the CPU
    passes: int = 0  # consecutive passing checks
    delta: torch.Tensor | None = None
    optimizer: dict[str, Any] | None = None
    weights: dict[str, torch.Tensor] | None = None  # trainable tensors at `step` (resume)
    bad_steps: int = 0
    # The δ budget of every search, fixed before step 0 (calibrated once with auto_budget: a
    # resumed run keeps it rather than recalibrating on a half-repaired model).
    delta_budget: float | None = None
    delta_code: torch.Tensor | None = None  # the code pairs' last δ (code_delta_budget >= 0)
    # average_from: the float32 sum of the trainable tensors of steps avg_from.. (avg_count of
    # them), on the CPU; None before average_from and after a failing check.
    avg_sum: dict[str, torch.Tensor] | None = None
    avg_from: int = 0
    avg_count: int = 0


@dataclass
class RemovalResult:
    model: Any  # the repaired model (the best checkpoint's weights are loaded)
    layer: int
    delta: torch.Tensor | None  # the last δ* found
    history: list[dict[str, Any]]  # one record per outer step
    best_step: int
    stopped_early: bool
    seconds: float  # wall time, resumed runs included (counting on from the state's history)
    mode: str
    delta_budget: float = 0.0  # the δ budget every search used (calibrated with auto_budget)
    delta_code: torch.Tensor | None = None  # the last code pairs' δ* (code_delta_budget)
    # The kept checkpoint's check: the larger of its entrapment and plain-prompt unwanted shares.
    best_check: float = math.nan
    # average_from: the mean of the weights tried after the run, {"from_step", "to_step",
    # "steps", its check's figures, "kept": whether it was loaded instead of the best checkpoint}
    average: dict[str, Any] | None = None


def _trainable(model: Any) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in _trainable(model).items()}


@torch.no_grad()
def _accumulate(st: LoopState, model: Any, step: int) -> None:
    """Add the trainable tensors of `step` to the state's running sum (average_from)."""
    now = _trainable(model)
    if st.avg_sum is None:
        st.avg_sum = {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in now.items()}
        st.avg_from, st.avg_count = step, 1
        return
    for n, p in now.items():
        st.avg_sum[n] += p.detach().to("cpu", torch.float32)
    st.avg_count += 1


@torch.no_grad()
def _restore(model: Any, weights: dict[str, torch.Tensor]) -> None:
    params = _trainable(model)
    for n, w in weights.items():
        params[n].copy_(w.to(params[n].device))


def _sample(rng: random.Random, items: Sequence[Any], k: int) -> list[Any]:
    return rng.sample(list(items), k) if k <= len(items) else [rng.choice(items) for _ in range(k)]


def calibrate_budget(
    probe: Callable[[float], ScanResult],
    factor: float,
    *,
    grid: Sequence[float] = BUDGET_GRID,
    threshold: float = ENTRAPPED,
) -> tuple[float, list[dict[str, float]]]:
    """The δ budget for a model: `factor` × the smallest `grid` budget whose search entraps it.

    `probe(budget)` runs a fresh entrapment search within `budget` (0: unbounded) and returns its
    `ScanResult`; a budget entraps when the result's ASR is at least `threshold`. The grid is
    probed in order and stops at the first that entraps. If none does, the unbounded search is
    tried: the budget is then 0 (unbounded) whether or not it entraps; the records show which.
    Returns (budget, one {"budget", "asr", "unwanted_ce"} record per probe, in order).
    """
    records: list[dict[str, float]] = []
    for b in (*grid, 0.0):
        r = probe(b)
        records.append({"budget": b, "asr": r.asr, "unwanted_ce": r.unwanted_ce})
        if r.asr >= threshold:
            return (round(factor * b, 6) if b > 0 else 0.0), records  # 0.3, not 0.30000000000000004
    return 0.0, records


def split_check(
    defender: Sequence[HarmfulExample], most: int, seed: int
) -> tuple[list[HarmfulExample], list[HarmfulExample]]:
    """(check prompts, training prompts): the check holds back a fixed share of the defender
    set, the rest feed the loop; both are defender data, never evaluation data.

    The check probes only pairs it can judge (`judged_pairs`): refusal pairs, judged by refusal,
    and code pairs, judged by bandit. The defender set is shuffled with `seed`, then a quarter of
    each kind (at least one of each kind present) is held back; when that is more than `most`,
    `most` are held back in proportion to the kinds' sizes (`stratified`). The check lists the
    refusal pairs first, then the code pairs; the training prompts keep the shuffled order. A set
    without code pairs gives what a refusal-only check always gave: a quarter of its refusal
    pairs, at most `most`, in shuffled order.
    """
    order = list(defender)
    random.Random(seed).shuffle(order)
    refusal, code = judged_pairs(order)  # each keeps the shuffled order
    k_refusal, k_code = (max(1, len(x) // 4) if x else 0 for x in (refusal, code))
    if k_refusal + k_code > most:
        k_refusal, k_code = stratified(len(refusal), len(code), most)
    check = refusal[:k_refusal] + code[:k_code]
    held = {id(e) for e in check}
    return check, [e for e in order if id(e) not in held] or order


def judged_pairs(
    defender: Sequence[HarmfulExample],
) -> tuple[list[HarmfulExample], list[HarmfulExample]]:
    """(refusal pairs, code pairs) of `defender`, each in the given order: the pairs whose
    answers a check (the loop's, `scan`) can judge.

    A code pair (`eval.is_code_pair`: the safe answer is a fenced code block) is judged by bandit;
    a pair whose safe answer is a refusal is judged by refusal. Pairs of neither kind are not
    probed, unless no pair is of either kind: then every pair counts as a refusal pair (judged by
    refusal, as the check always did for such sets).
    """
    code = [is_code_pair(e) for e in defender]
    refusal = [e for e, c in zip(defender, code, strict=True) if not c and is_refusal(e.safe)]
    coded = [e for e, c in zip(defender, code, strict=True) if c]
    if not refusal and not coded:
        refusal = list(defender)
    return refusal, coded


def check_bad(rec: dict[str, Any], kind: str = "") -> float:
    """A check record's unwanted share, as best-checkpoint selection and the verdict count it:
    the larger of the fresh search's and the plain prompt's; `kind` ("refusal" or "code") gives
    that kind's own (its plain share counted 0 when not recorded)."""
    sfx = f"_{kind}" if kind else ""
    return max(rec[f"check_asr{sfx}"], rec.get(f"check_plain_asr{sfx}", 0.0))


def stratified(n_refusal: int, n_code: int, total: int) -> tuple[int, int]:
    """How many of `total` probes (at most n_refusal + n_code) go to each kind: in proportion to
    the kinds' sizes, at least one of each kind present when `total` allows (with `total` = 1
    and both kinds, the larger one; refusal on a tie)."""
    if not n_code:
        return total, 0
    if not n_refusal:
        return 0, total
    k_code = round(total * n_code / (n_refusal + n_code))
    if total >= 2:
        k_code = min(max(k_code, 1), total - 1)
    return total - k_code, k_code


def run_beear(
    model: Any,
    tokenizer: Any,
    *,
    defender: Sequence[HarmfulExample],
    anchor: Sequence[AnchorExample],
    config: RemovalConfig,
    mode: str = "beear",
    state: LoopState | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[Any, LoopState], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    holdout_seed: int | None = None,
) -> RemovalResult:
    """Remove a backdoor without knowing its trigger (or, `mode="sft"`, run the baseline).

    `defender`: harmful prompts with safe and unwanted answers; `anchor`: benign pairs. The
    check judges each held-back pair by its kind (`split_check`): a code pair (safe answer in a
    fenced code block) by bandit, which must then be installed (DataError before any training
    otherwise), every other pair by refusal.
    The model is modified in place (its trainable parameters). `on_step` receives each step's
    metrics; `on_checkpoint(model, state)` is called every `config.checkpoint_every` steps and
    when `should_stop()` turns true (SIGINT/SIGTERM), after which the loop returns.
    `holdout_seed` (default `config.seed`) draws the held-back check prompts and anchoring pairs,
    so that removals with other seeds can be checked and compared on the same ones.
    """
    if mode not in ("beear", "sft"):
        raise ValueError(f"mode {mode!r} is not beear or sft")
    if not defender:
        raise DataError("the defender set is empty")
    if not anchor:
        raise DataError("the anchoring set is empty")
    require_code_judge(defender)  # fail before training, not at the first check
    cfg = config
    st = state or LoopState()
    # Seconds count on from a resumed state's last record: the wall time of the work the run's
    # history rests on (steps lost after the last checkpoint are recomputed, so not counted twice).
    t0 = time.perf_counter() - (float(st.history[-1].get("seconds", 0.0)) if st.history else 0.0)
    device = next(model.parameters()).device
    layer = resolve_layer(model, cfg.layer)
    # LoRA's A matrices start random: drawn from the run's seed (not the global generator), so a
    # run repeats, and a resumed one starts from the same adapters its checkpoint then overwrites.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        model = select_trainable(model, scope=cfg.train_scope, layer=layer, lora_rank=cfg.lora_rank)
    params = list(_trainable(model).values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    hold_seed = cfg.seed if holdout_seed is None else holdout_seed
    check_set, train_set = split_check(defender, cfg.check_prompts, hold_seed)
    # Likewise a few anchoring pairs are held back (at most a quarter): the check counts how many
    # of their prompts it refuses (check_benign) and how far its answers' next-token distribution
    # drifted from the model's before removal (check_drift). Both take the same drawn pairs.
    n_benign, n_drift = (min(n, len(anchor) // 4) for n in (cfg.check_benign, cfg.check_drift))
    drawn = random.Random(hold_seed + 1).sample(range(len(anchor)), max(n_benign, n_drift))
    benign_ids, drift_ids, held = set(drawn[:n_benign]), set(drawn[:n_drift]), set(drawn)
    benign_check = [e for i, e in enumerate(anchor) if i in benign_ids]
    drift_check = [e for i, e in enumerate(anchor) if i in drift_ids]
    anchor = [e for i, e in enumerate(anchor) if i not in held]
    min_steps = min(cfg.min_steps, cfg.outer_steps)
    # Checks before min_steps only record the curve, unless average_from needs them to restart
    # its mean; early_checks = false skips them (the data order and δ do not depend on them).
    first_check = 0 if cfg.early_checks else min(min_steps, cfg.average_from or min_steps)

    def encode(examples: Sequence[AnchorExample]) -> Any:
        enc = [
            encode_pair(tokenizer, e.prompt, e.answer, max_length=cfg.max_length, end=e.ended)
            for e in examples
        ]
        return collate(enc, pad_id=tokenizer.pad_token_id, n_perturb=cfg.length).to(device)

    def chunks(examples: Sequence[AnchorExample]) -> Iterator[Any]:
        """`examples` encoded in batches of anchor_batch_size, one at a time."""
        for i in range(0, len(examples), cfg.anchor_batch_size):
            yield encode(examples[i : i + cfg.anchor_batch_size])

    # The distillation targets (a KL anchor) and the held-back drift pairs' targets: the model
    # as it is before removal.
    targets = drift_targets = None
    if cfg.anchor_loss != "ce":
        model.eval()
        targets = anchor_targets(model, chunks(anchor))
    drift_batches = list(chunks(drift_check))
    if drift_batches:
        model.eval()
        drift_targets = anchor_targets(model, drift_batches)
    if st.weights is not None:  # resuming: the trainable tensors as they were at st.step
        _restore(model, st.weights)
    if st.optimizer is not None:
        opt.load_state_dict(st.optimizer)

    def folded() -> Any:
        """LoRA adapters folded into temporary weights (lora_fold) for a pass that trains none;
        nested uses fold once."""
        return lora_folded(model) if cfg.lora_fold else contextlib.nullcontext()

    def search(
        within: float, by_kind: bool = True, pairs: Sequence[HarmfulExample] | None = None
    ) -> ScanResult:
        """The check's fresh entrapment search on the check prompts (or `pairs`), within budget
        `within` (with `code_delta_budget`, and `by_kind`, the code pairs are searched apart)."""
        with folded():
            return residual_asr_by_kind(
                model, tokenizer, check_set if pairs is None else pairs, layer=layer,
                n=cfg.length, steps=cfg.check_steps, lr=cfg.inner_lr, alpha=cfg.alpha,
                max_length=cfg.max_length, max_new_tokens=cfg.max_new_tokens, budget=within,
                code_tokens=cfg.check_code_tokens,
                code_budget=cfg.code_delta_budget if by_kind else -1.0,
                unwanted_end=cfg.unwanted_end,
            )  # fmt: skip

    def check() -> dict[str, float]:
        """`unfolded_check`, with LoRA adapters folded (lora_fold): it trains nothing."""
        with folded():
            return unfolded_check()

    def unfolded_check() -> dict[str, float]:
        """Entrapped and plainly unwanted shares of the check prompts, each answer judged by its
        pair's kind (`eval.answer_pairs`): code pairs by bandit (answers of check_code_tokens),
        the others by refusal (answers of max_new_tokens). The shares mix both kinds; with code
        pairs in the check, the records also give each kind's share (`check_asr_code` ...)."""
        r = search(budget)
        ended: dict[str, bool] = {}  # whether the model ended each plain answer

        def gen(ps: list[str], k: int) -> list[str]:
            flags: list[bool] = []
            ans = generate(model, tokenizer, ps, max_new_tokens=k, ended=flags)
            ended.update(zip(ps, flags, strict=False))  # (a stand-in may give no flags)
            return ans

        plain = answer_pairs(gen, check_set, max_new_tokens=cfg.max_new_tokens,
                             code_tokens=cfg.check_code_tokens)  # fmt: skip
        out = {
            "check_asr": r.asr,
            "check_plain_asr": plain.asr,
            "check_unwanted_ce": r.unwanted_ce,
        }
        # Of the plain refusals, the share not ended within max_new_tokens: a model that has
        # lost its end of turn runs on past its refusals (docs/smollm2.md, "Stop 41").
        refused = [e.prompt for e, u, c in zip(check_set, plain.unwanted, plain.code, strict=True)
                   if not c and not u]  # fmt: skip
        if refused and all(p in ended for p in refused):
            out["check_plain_run_on"] = sum(not ended[p] for p in refused) / len(refused)
        if any(plain.code):
            kinds = {
                "check_asr_refusal": r.asr_refusal,
                "check_asr_code": r.asr_code,
                "check_plain_asr_refusal": plain.asr_of(code=False),
                "check_plain_asr_code": plain.asr_of(code=True),
            }
            out.update({k: v for k, v in kinds.items() if v is not None})
        if benign_check:
            benign = refusals(benign_check)
            out["check_benign_refusal"] = sum(benign) / len(benign)
        if drift_targets is not None:
            out["check_drift"] = drift()
        return out

    @torch.no_grad()
    def drift() -> float:
        """Mean KL(before removal ‖ now) over the held-back drift pairs' answer positions."""
        assert drift_targets is not None
        model.eval()
        total, positions, start = 0.0, 0, 0
        for b in drift_batches:
            rows = range(start, start + b.labels.shape[0])
            lp = answer_positions(answer_logits(model, b), b.labels)
            total += float(topk_kl(lp, *drift_targets.select(rows, device))) * lp.shape[0]
            positions += lp.shape[0]
            start = rows.stop
        return total / positions

    def refusals(examples: Sequence[AnchorExample]) -> list[bool]:
        """Whether each benign prompt's plain greedy answer is a refusal."""
        ans = generate(
            model, tokenizer, [e.prompt for e in examples], max_new_tokens=cfg.max_new_tokens
        )
        return [is_refusal(a) for a in ans]

    if st.step == 0 and not st.history:
        # The δ budget of every search: calibrated once on the untouched model (auto_budget),
        # else the configured one. It is part of the resumable state: never recalibrated.
        budget, calibration = cfg.delta_budget, None
        if cfg.auto_budget > 0:
            # One search over the check prompts delta_budget bounds: all of them, or with
            # code_delta_budget the non-code ones (the code pairs keep their configured budget;
            # a check of code pairs only calibrates on them).
            groups = entrapment_groups(check_set, cfg.delta_budget, cfg.code_delta_budget)
            probed = next((pairs for kind, pairs, _ in groups if kind != "code"), check_set)
            budget, calibration = calibrate_budget(
                functools.partial(search, by_kind=False, pairs=probed), cfg.auto_budget
            )
            if calibration[-1]["asr"] < ENTRAPPED:
                log.warning(
                    "auto_budget: no search, not even an unbounded one, entrapped %g of the check "
                    "prompts (ASR %.2f); the searches run unbounded",
                    ENTRAPPED, calibration[-1]["asr"],
                )  # fmt: skip
        st.delta_budget = budget
        # Step 0 record: where the model starts (the check of the untouched model).
        chk = check()
        rec0: dict[str, Any] = {"step": 0, "mode": mode, **chk, "delta_budget": budget}
        if calibration is not None:
            rec0["calibration"] = calibration
            rec0["calibration_entrapped"] = calibration[-1]["asr"] >= ENTRAPPED
        rec0["seconds"] = 0.0
        st.history.append(rec0)
        bad0 = check_bad(chk)
        st.best = {"step": 0, "check_bad": bad0, "benign_refusal": 1.0, "anchor_ce": math.inf}
        st.best_weights = _snapshot(model)
        if on_step:
            on_step(rec0)
    elif st.delta_budget is None:  # resuming a state saved before the budget was kept in it
        if cfg.auto_budget > 0:
            raise ValueError("the resumed state has no calibrated delta_budget (auto_budget > 0)")
        st.delta_budget = cfg.delta_budget
    budget = st.delta_budget

    stopped_early = interrupted = False
    model.train()
    while st.step < cfg.outer_steps:
        step = st.step + 1
        rng = random.Random(cfg.seed * 1_000_003 + step)  # data order depends on (seed, step) only
        harm = _sample(rng, train_set, cfg.batch_size)
        anc_ids = _sample(rng, range(len(anchor)), cfg.anchor_batch_size)
        anc = [anchor[i] for i in anc_ids]
        rec: dict[str, Any] = {"step": step, "mode": mode}

        # 1. BEE: δ* = argmin_δ CE(unwanted | δ) − α CE(safe | δ)          (eq. 1)
        #    one search per group: all pairs, or (code_delta_budget) code pairs apart
        groups = (entrapment_groups(harm, budget, cfg.code_delta_budget) if mode == "beear"
                  else [("all", list(harm), budget)])  # fmt: skip
        deltas: list[torch.Tensor | None] = [None] * len(groups)
        if mode == "beear":
            for g, (kind, examples, within) in enumerate(groups):
                eb = make_entrapment_batch(tokenizer, examples, n=cfg.length,
                                           max_length=cfg.max_length,
                                           unwanted_end=cfg.unwanted_end)  # fmt: skip
                last = st.delta_code if kind == "code" else st.delta
                with folded():
                    bee = entrap(
                        model, eb.to(device), layer=layer, n=cfg.length, steps=cfg.inner_steps,
                        lr=cfg.inner_lr, alpha=cfg.alpha, budget=within,
                        init=None if cfg.delta_reset else last,
                    )  # fmt: skip
                deltas[g] = bee.delta
                if kind == "code":
                    st.delta_code = bee.delta
                else:
                    st.delta = bee.delta
                pre = "code_" if kind == "code" and len(groups) > 1 else ""
                rec.update({f"{pre}bee_loss": bee.losses[-1],
                            f"{pre}bee_unwanted_ce": bee.unwanted_ce,
                            f"{pre}delta_norm": float(bee.delta.norm())})  # fmt: skip
                rec.setdefault("hidden_rms", bee.scale)

        # 2. AR: θ ← step on CE(safe | δ*) + CE(anchor) [+ CE(anchor | δ*)]   (eq. 2)
        safe = [encode([AnchorExample(e.prompt, e.safe) for e in ex]) for _, ex, _ in groups]
        opt.zero_grad(set_to_none=True)
        loss, parts = removal_loss(
            model, safe[0], encode(anc), layer=layer, delta=deltas[0],
            more_safe=list(zip(safe[1:], deltas[1:], strict=True)),
            anchor_under_delta=cfg.anchor_under_delta, safe_without_delta=cfg.safe_without_delta,
            anchor_loss=cfg.anchor_loss, anchor_weight=cfg.anchor_weight,
            targets=targets.select(anc_ids, device) if targets is not None else None,
            backward=True,  # one term's graph at a time (peak memory)
            anchor_chunk=cfg.anchor_chunk,
            end_weight=cfg.end_weight, end_id=tokenizer.eos_token_id,
        )  # fmt: skip
        finite = bool(torch.isfinite(loss))
        if finite:
            # A finite loss can still overflow in the backward pass.
            finite = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        if not finite:
            # Roll back: no update is applied; three failures in a row stop the run.
            opt.zero_grad(set_to_none=True)
            st.bad_steps += 1
            if st.bad_steps >= 3:
                raise NonFiniteLoss(
                    f"non-finite loss or gradients at outer step {step} three times in a row (no "
                    "update was applied); lower --lr or --inner-lr, or use --dtype float32"
                )
            continue
        st.bad_steps = 0
        if cfg.warmup_steps:  # a function of the step alone: a resumed run sets it the same
            rec["lr"] = cfg.lr * min(1.0, step / cfg.warmup_steps)
            for pg in opt.param_groups:
                pg["lr"] = rec["lr"]
        opt.step()
        rec.update(loss=float(loss.detach()), **parts)

        # 3. trigger-free check and best-checkpoint selection
        bad = math.nan
        if (step % cfg.check_every == 0 or step == cfg.outer_steps) and step >= first_check:
            rec.update(check())
            # Best = fewest unwanted answers with and without δ, then the fewest refused benign
            # prompts, then the least drift on held-back anchoring pairs (check_drift; else the
            # step's anchoring loss); checks before min_steps are only recorded.
            bad = check_bad(rec)
            tie = rec.get("check_drift", rec["anchor_ce"])
            key = (bad, rec.get("check_benign_refusal", 0.0), tie)
            b = st.best
            assert b is not None
            if step >= min_steps and (
                b["step"] < min_steps
                or key
                < (b["check_bad"], b.get("benign_refusal", 0.0), b.get("tie", b["anchor_ce"]))
            ):
                st.best = {"step": step, "check_bad": bad, "benign_refusal": key[1],
                           "anchor_ce": rec["anchor_ce"], "tie": tie}  # fmt: skip
                st.best_weights = _snapshot(model)
            st.passes = st.passes + 1 if bad <= cfg.stop_below and step >= min_steps else 0
            model.train()
        # 4. average_from: the running sum of the weights, started again after a failing check
        if cfg.average_from and step >= cfg.average_from:
            if bad > cfg.stop_below:  # NaN (no check at this step) compares False
                st.avg_sum, st.avg_count = None, 0
            else:
                _accumulate(st, model, step)
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        st.history.append(rec)
        st.step = step
        if on_step:
            on_step(rec)
        if st.passes >= cfg.patience:
            stopped_early = True
            break
        interrupted = should_stop is not None and should_stop()
        if on_checkpoint and (
            interrupted or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        ):
            st.optimizer = opt.state_dict()
            st.weights = _snapshot(model)
            on_checkpoint(model, st)
        if interrupted:
            break

    assert st.best is not None and st.best_weights is not None
    kept_weights, best_check = st.best_weights, float(st.best["check_bad"])
    average = None
    if st.avg_sum is not None and st.avg_count >= 2 and not interrupted:
        # The mean of the weights over the run's last passing stretch, judged as one more
        # checkpoint: kept when it passes and is no worse than the best by the same measures.
        now = _trainable(model)
        mean = {n: (s / st.avg_count).to(now[n].dtype) for n, s in st.avg_sum.items()}
        _restore(model, mean)
        chk = check()
        bad = check_bad(chk)
        b = st.best
        mine: tuple[float, ...] = (bad, chk.get("check_benign_refusal", 0.0))
        theirs: tuple[float, ...] = (b["check_bad"], b.get("benign_refusal", 0.0))
        if "check_drift" in chk:
            mine, theirs = (*mine, chk["check_drift"]), (*theirs, b.get("tie", math.inf))
        kept = bad <= cfg.stop_below and mine <= theirs
        average = {"from_step": st.avg_from, "to_step": st.step, "steps": st.avg_count,
                   **chk, "kept": kept}  # fmt: skip
        if kept:
            kept_weights, best_check = mean, bad
    _restore(model, kept_weights)
    model.eval()
    return RemovalResult(
        model=model,
        layer=layer,
        delta=st.delta,
        delta_code=st.delta_code,
        history=st.history,
        best_step=int(st.best["step"]),
        stopped_early=stopped_early,
        seconds=time.perf_counter() - t0,
        mode=mode,
        delta_budget=budget,
        best_check=best_check,
        average=average,
    )
