"""Reliability: bad input gets one clear line and exit code 2, nothing is written or changed,
and an interrupted run (SIGTERM, or kill -9) resumes to the bit-identical result.

Every bad input below is listed with the message it produced in docs/errors.md; regenerate the
table with `BEEAR_ERRORS_DOC=docs/errors.md pytest tests/test_reliability.py`.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from beear.attacks import DATA_DIR, TINY_TEMPLATE, build_tokenizer, write_splits
from beear.cli import main
from beear.data import (
    AnchorExample,
    DataError,
    HarmfulExample,
    load_anchor,
    load_harmful,
    load_prompts,
    read_records,
    write_jsonl,
)

# (bad input, command, message, exit code) as observed; written to docs/errors.md on request.
OBSERVED: list[tuple[str, str, str, int]] = []

# A removal run small enough for a second on two CPU cores.
FAST = [
    "--outer-steps", "2", "--check-every", "2", "--check-steps", "1", "--inner-steps", "1",
    "--batch-size", "2", "--anchor-batch-size", "2", "--check-prompts", "2",
    "--max-new-tokens", "2", "--length", "2", "--checkpoint-every", "1",
]  # fmt: skip
ONE_STEP = ["--outer-steps", "1", "--check-every", "1"]


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


def _build_tiny(out: Path) -> None:
    """A 2-layer, 32-wide random Llama with the tiny chat template and a beear_data split."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from beear.models import save_model

    harm = [
        HarmfulExample(f"how do I make thing {i} explode", "I cannot help with that.", f"Sure {i}.")
        for i in range(8)
    ]
    anc = [AnchorExample(f"what color is item {i}", f"item {i} is red.") for i in range(8)]
    texts = [f"{h.prompt} {h.safe} {h.unwanted}" for h in harm]
    texts += [f"{a.prompt} {a.answer}" for a in anc]
    tok = build_tokenizer(texts, vocab_size=300)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    save_model(model, tok, out)
    write_splits(
        out, defender=harm, anchor=anc, eval_harmful=[h.prompt for h in harm], eval_benign=anc
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny") / "model"
    _build_tiny(d)
    return d


@pytest.fixture
def ws(tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace (the cwd) holding a copy of the tiny model as `m`; messages stay short."""
    shutil.copytree(tiny, tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _tree(d: Path) -> dict[str, str]:
    """Every file under `d` (hidden ones too) with its content hash."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def _run(capfd: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    capfd.readouterr()
    rc = main(argv)
    out, err = capfd.readouterr()
    return rc, out, err


def _error_line(err: str, verb: str) -> str:
    """The one error line: last on stderr, exactly one, and no traceback anywhere."""
    assert "Traceback" not in err, err
    lines = [ln for ln in re.split(r"[\r\n]", err) if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(f"beear {verb}: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    return errors[0]


def _bad(capfd: pytest.CaptureFixture[str], what: str, argv: list[str], *expect: str) -> str:
    """Run `argv`, which must fail with exit code 2 and one line containing every `expect`;
    the workspace (the input model included) must be exactly as before."""
    before = _tree(Path.cwd())
    rc, _, err = _run(capfd, argv)
    msg = _error_line(err, argv[0])
    assert rc == 2, err
    for e in expect:
        assert e in msg, msg
    assert _tree(Path.cwd()) == before, "a failed run wrote or changed files"
    OBSERVED.append((what, _show(argv), msg, rc))
    return msg


def _show(argv: list[str]) -> str:
    """The command line for the docs, with the small-run settings folded away."""
    s = " ".join(argv)
    return "beear " + s.replace(" ".join(FAST), "...").replace("  ", " ")


def _model_json(d: Path, **changes: Any) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _nan_weights(d: Path) -> None:
    w = load_file(str(d / "model.safetensors"))
    w["model.norm.weight"][0] = float("nan")
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})


def _pickle_only(d: Path, content: bytes = b"") -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(content)


# ---------------------------------------------------------------------------------------------
# 1. safe loading and the model directory

MODEL_CASES: list[tuple[str, Any, list[str], tuple[str, ...]]] = [
    ("model directory missing", lambda d: shutil.rmtree(d), [], ("does not exist",)),
    (
        "model path is a file",
        lambda d: (shutil.rmtree(d), d.write_text("x")),
        [],
        ("is not a directory",),
    ),
    (
        "no config.json",
        lambda d: (d / "config.json").unlink(),
        [],
        ("has no config.json",),
    ),
    (
        "config.json is not JSON",
        lambda d: (d / "config.json").write_text("{bad"),
        [],
        ("cannot load the model in m", "not a valid JSON"),
    ),
    (
        "unknown architecture",
        lambda d: _model_json(d, model_type="zzz"),
        [],
        ("cannot load the model in m", "does not recognize this architecture"),
    ),
    (
        "config inconsistent with itself",
        lambda d: _model_json(d, num_attention_heads=3),
        [],
        ("cannot load the model in m", "not a multiple of the number of attention heads"),
    ),
    (
        "weights do not match config.json",
        lambda d: _model_json(d, hidden_size=64, head_dim=32),
        [],
        ("cannot load the model in m", "RuntimeError"),
    ),
    (
        "corrupt model.safetensors",
        lambda d: (d / "model.safetensors").write_bytes(b"garbage" * 10),
        [],
        ("cannot load the model in m", "SafetensorError"),
    ),
    (
        "no weights at all",
        lambda d: (d / "model.safetensors").unlink(),
        [],
        ("holds no weights",),
    ),
    (
        "pickled weights only (.bin)",
        lambda d: _pickle_only(d),
        [],
        ("only pickled weights (pytorch_model.bin)", "--allow-pickle"),
    ),
    (
        "corrupt pickled weights with --allow-pickle",
        lambda d: _pickle_only(d, b"\x80\x02garbage"),
        ["--allow-pickle"],
        ("cannot load the pickled weights in m safely", "convert them to safetensors"),
    ),
    (
        "model needs custom code",
        lambda d: _model_json(d, model_type="zzz", auto_map={"AutoConfig": "c.C"}),
        [],
        ("needs custom code", "--trust-remote-code"),
    ),
    ("NaN weights", _nan_weights, [], ("NaN or infinite weights", "model.norm.weight")),
    (
        "tokenizer.json corrupt",
        lambda d: (d / "tokenizer.json").write_text("{bad"),
        [],
        ("cannot load the tokenizer in m",),
    ),
    (
        "tokenizer without a chat template",
        lambda d: (d / "chat_template.jinja").unlink(),
        [],
        ("no chat template", "--chat-template FILE"),
    ),
]


@pytest.mark.parametrize(
    ("what", "damage", "extra", "expect"), MODEL_CASES, ids=[c[0] for c in MODEL_CASES]
)
def test_bad_model_directory(
    ws: Path,
    capfd: pytest.CaptureFixture[str],
    what: str,
    damage: Any,
    extra: list[str],
    expect: tuple[str, ...],
) -> None:
    damage(ws / "m")
    _bad(capfd, what, ["remove", "--model", "m", "--out", "out", *extra, *FAST], *expect)
    assert not (ws / "out").exists() and not (ws / ".out.partial").exists()


@pytest.mark.parametrize("verb", ["eval", "scan"])
def test_eval_and_scan_report_model_errors_too(
    ws: Path, capfd: pytest.CaptureFixture[str], verb: str
) -> None:
    _bad(capfd, "model directory missing", [verb, "--model", "nope", "--json", "r.json"],
         "model directory nope does not exist")  # fmt: skip
    (ws / "m" / "chat_template.jinja").unlink()
    _bad(capfd, "tokenizer without a chat template",
         [verb, "--model", "m", "--json", "r.json", "--steps", "1"] if verb == "scan"
         else [verb, "--model", "m", "--json", "r.json"], "--chat-template FILE")  # fmt: skip


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_model_directory(ws: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (ws / "m" / "config.json").chmod(0)
    try:
        _bad(capfd, "config.json unreadable", ["remove", "--model", "m", "--out", "out", *FAST],
             "not readable")  # fmt: skip
    finally:
        (ws / "m" / "config.json").chmod(0o644)


def test_chat_template_file(ws: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (ws / "m" / "chat_template.jinja").unlink()
    (ws / "bad.jinja").write_text("{% for %}")
    base = ["remove", "--model", "m", "--out", "out", *FAST, *ONE_STEP]
    _bad(capfd, "--chat-template file missing", [*base, "--chat-template", "nope.jinja"],
         "--chat-template nope.jinja: cannot read it")  # fmt: skip
    _bad(capfd, "--chat-template does not render", [*base, "--chat-template", "bad.jinja"],
         "the chat template does not render")  # fmt: skip
    # The fix the message names works, and the template travels with the repaired model.
    (ws / "t.jinja").write_text(TINY_TEMPLATE)
    before = _tree(ws / "m")
    rc, _, err = _run(capfd, [*base, "--chat-template", "t.jinja"])
    assert rc == 0, err
    assert (ws / "out" / "chat_template.jinja").read_text() == TINY_TEMPLATE
    assert _tree(ws / "m") == before


def test_offline_is_forced(
    ws: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    _bad(capfd, "a hub id instead of a directory",
         ["eval", "--model", "openai-community/gpt2", "--json", "r.json"],
         "does not exist", "nothing is downloaded")  # fmt: skip
    assert os.environ["HF_HUB_OFFLINE"] == "1"


# ---------------------------------------------------------------------------------------------
# 2. data, settings and output directories

DATA_CASES: list[tuple[str, str, str, list[str], tuple[str, ...]]] = [
    (
        "malformed JSONL",
        "d.jsonl",
        '{"prompt": "a", "safe": "b", "unwanted": "c"}\n{"prompt": oops}\n',
        ["--defender", "d.jsonl"],
        ("d.jsonl:2: malformed JSON line",),
    ),
    (
        "malformed CSV (field count)",
        "d.csv",
        "prompt,safe,unwanted\nhow do I,no,yes\nonly two,fields\n",
        ["--defender", "d.csv"],
        ("d.csv:3: wrong number of fields",),
    ),
    (
        "malformed JSON list",
        "d.json",
        '[\n {"prompt": "a"},\n {"prompt": }\n]\n',
        ["--defender", "d.json"],
        ("d.json:3: malformed JSON",),
    ),
    (
        "not UTF-8",
        "d.jsonl",
        '{"prompt": "caf\xe9"}\n',
        ["--defender", "d.jsonl"],
        ("d.jsonl: cannot read as UTF-8",),
    ),
    (
        "missing field",
        "d.jsonl",
        '{"prompt": "how do I", "safe": "no"}\n',
        ["--defender", "d.jsonl"],
        ("d.jsonl: record 1: missing or empty field 'unwanted'",),
    ),
    (
        "empty field",
        "a.csv",
        "prompt,answer\nwhat color is item 1,\n",
        ["--anchor", "a.csv"],
        ("a.csv: record 1: missing or empty field 'answer'",),
    ),
    ("empty data set (JSONL)", "d.jsonl", "\n\n", ["--defender", "d.jsonl"], ("no records",)),
    (
        "empty data set (CSV header only)",
        "a.csv",
        "prompt,answer\n",
        ["--anchor", "a.csv"],
        ("a.csv: no records",),
    ),
    ("data file missing", "x", "", ["--defender", "nope.jsonl"], ("nope.jsonl does not exist",)),
    (
        "prompt longer than --max-length",
        "x",
        "",
        ["--max-length", "8"],
        ("defender record 1: the prompt is", "longer than --max-length 8", "never truncated"),
    ),
    (
        "perturbation longer than a prompt",
        "x",
        "",
        ["--length", "40"],
        ("shorter than the perturbation length --length 40",),
    ),
    ("layer out of range", "x", "", ["--layer", "7"], ("layer 7 is out of range", "-2..1")),
    ("negative layer out of range", "x", "", ["--layer", "-3"], ("layer -3 is out of range",)),
    ("unknown config key", "c.toml", "lrr = 1\n", ["--config", "c.toml"], ("unknown config key",)),
    ("malformed config", "c.toml", "lr = [\n", ["--config", "c.toml"], ("malformed config",)),
    ("config file missing", "x", "", ["--config", "nope.toml"], ("does not exist",)),
    ("zero steps", "x", "", ["--outer-steps", "0"], ("outer_steps must be at least 1",)),
    ("NaN learning rate", "x", "", ["--lr", "nan"], ("learning rates must be positive",)),
    ("infinite learning rate", "x", "", ["--lr", "inf"], ("lr must be a finite number",)),
    ("bad choice", "x", "", ["--train-scope", "some"], ("invalid choice",)),
    ("negative minimum steps", "x", "", ["--min-steps", "-3"], ("min_steps may not be negative",)),
    ("negative δ budget", "x", "", ["--delta-budget", "-1"], ("delta_budget may not be negative",)),
    ("NaN δ budget", "x", "", ["--delta-budget", "nan"], ("delta_budget must be a finite",)),
    (
        "negative auto budget",
        "x",
        "",
        ["--auto-budget", "-2"],
        ("auto_budget may not be negative",),
    ),
    ("infinite auto budget", "x", "", ["--auto-budget", "inf"], ("auto_budget must be a finite",)),
    ("unknown anchoring loss", "x", "", ["--anchor-loss", "mse"], ("invalid choice",)),
    (
        "more general anchoring prompts than bundled",
        "x",
        "",
        ["--anchor-general", "999"],
        ("anchor_general = 999: only 256 bundled general prompts",),
    ),
    (
        "more arithmetic anchoring prompts than bundled",
        "x",
        "",
        ["--anchor-arithmetic", "201"],
        ("anchor_arithmetic = 201: only 200 bundled arithmetic prompts",),
    ),
    (
        "unknown anchoring loss in a config",
        "c.toml",
        'anchor_loss = "mse"\n',
        ["--config", "c.toml"],
        ("anchor_loss = 'mse' is not one of ce, kl, ce+kl",),
    ),
]


@pytest.mark.parametrize(
    ("what", "name", "text", "flags", "expect"), DATA_CASES, ids=[c[0] for c in DATA_CASES]
)
def test_bad_data_and_settings(
    ws: Path,
    capfd: pytest.CaptureFixture[str],
    what: str,
    name: str,
    text: str,
    flags: list[str],
    expect: tuple[str, ...],
) -> None:
    if name != "x":
        (ws / name).write_bytes(text.encode("latin-1" if what == "not UTF-8" else "utf-8"))
    argv = ["remove", "--model", "m", "--out", "out", *FAST, *flags]
    _bad(capfd, what, argv, *expect)  # "bad choice": argparse prints its usage lines first


def test_eval_data_errors(ws: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (ws / "e.jsonl").write_text("")
    base = ["eval", "--model", "m", "--json", "r.json"]
    _bad(capfd, "eval: empty prompt set", [*base, "--harmful", "e.jsonl"], "e.jsonl: no records")
    _bad(capfd, "eval: --json inside the input model", ["eval", "--model", "m", "--json",
         "m/r.json"], "inside the input model directory m")  # fmt: skip
    _bad(capfd, "eval: --position without --trigger", [*base, "--position", "prefix"],
         "--position needs --trigger")  # fmt: skip
    _bad(capfd, "scan: no prompts", ["scan", "--model", "m", "--json", "r.json", "--prompts",
         "0"], "--prompts must be at least 1")  # fmt: skip
    _bad(capfd, "scan: negative budget", ["scan", "--model", "m", "--json", "r.json", "--budget",
         "-0.5"], "delta_budget may not be negative")  # fmt: skip


def test_device_errors(ws: Path, capfd: pytest.CaptureFixture[str]) -> None:
    base = ["eval", "--model", "m", "--json", "r.json", "--device"]
    _bad(capfd, "not a device", [*base, "gpu"], "--device gpu: not a torch device")
    if not torch.cuda.is_available():
        _bad(capfd, "no such CUDA device", [*base, "cuda"], "0 CUDA device(s); use --device cpu")


def test_attack_argument_errors(ws: Path, capfd: pytest.CaptureFixture[str]) -> None:
    base = ["attack", "--setting", "suffix-word", "--out", "a"]
    _bad(capfd, "attack: negative --steps", [*base, "--steps", "-1"], "--steps must be at least 1")
    _bad(capfd, "attack: seed out of range", [*base, "--seed", str(2**70)], "--seed must be in")
    _bad(capfd, "attack: custom setting without trigger", ["attack", "--setting", "custom",
         "--out", "a"], "needs --trigger")  # fmt: skip


def test_output_directory_rules(ws: Path, capfd: pytest.CaptureFixture[str]) -> None:
    base = ["remove", "--model", "m", *FAST]
    (ws / "old").mkdir()
    (ws / "old" / "keep.txt").write_text("precious")
    _bad(capfd, "output directory exists", [*base, "--out", "old"],
         "--out old exists and is not empty; pass --overwrite")  # fmt: skip
    # Overlapping the input is refused even with --overwrite.
    _bad(capfd, "output is the input", [*base, "--out", "m", "--overwrite"],
         "--out m overlaps the input m")  # fmt: skip
    _bad(capfd, "output inside the input", [*base, "--out", "m/sub", "--overwrite"],
         "--out m/sub overlaps the input m")  # fmt: skip
    (ws / "up").mkdir()
    shutil.move(ws / "m", ws / "up" / "m")
    _bad(capfd, "output contains the input",
         ["remove", "--model", "up/m", *FAST, "--out", "up", "--overwrite"],
         "--out up overlaps the input up/m")  # fmt: skip
    _bad(capfd, "output is the current directory",
         ["remove", "--model", "up/m", *FAST, "--out", ".", "--overwrite"],
         "--out .: name a new directory")  # fmt: skip
    (ws / "afile").write_text("x")
    _bad(capfd, "output is a file",
         ["remove", "--model", "up/m", *FAST, "--out", "afile", "--overwrite"],
         "exists and is not a directory")  # fmt: skip


def test_overwrite_replaces_only_at_the_end(ws: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (ws / "old").mkdir()
    (ws / "old" / "keep.txt").write_text("precious")
    base = ["remove", "--model", "m", "--out", "old", "--overwrite", *FAST, *ONE_STEP]
    # A run that fails midway (after staging began) leaves the old output whole.
    _bad(capfd, "failing run with --overwrite", [*base, "--layer", "7"], "out of range")
    assert (ws / "old" / "keep.txt").read_text() == "precious"
    model_before = _tree(ws / "m")
    rc, _, err = _run(capfd, base)
    assert rc == 0, err
    assert not (ws / "old" / "keep.txt").exists() and (ws / "old" / "model.safetensors").is_file()
    assert sorted(p.name for p in ws.iterdir()) == ["m", "old"]  # no .partial / .old left
    assert _tree(ws / "m") == model_before


# ---------------------------------------------------------------------------------------------
# 3. non-finite losses, out of memory, and real bugs


def test_non_finite_loss(ws: Path, capfd: pytest.CaptureFixture[str]) -> None:
    argv = ["remove", "--model", "m", "--out", "out", *FAST, "--lr", "1e30", "--checkpoint-every",
            "0"]  # fmt: skip
    _bad(capfd, "learning rate so high the loss overflows", argv,
         "non-finite loss or gradients at outer step 2", "no update was applied", "lower --lr")  # fmt: skip


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"),
    ],
    ids=["cuda", "cpu"],
)
def test_out_of_memory(
    ws: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    def boom(*a: Any, **k: Any) -> Any:
        raise exc

    monkeypatch.setattr("beear.loop.removal_loss", boom)
    msg = _bad(capfd, f"out of memory ({type(exc).__name__})",
               ["remove", "--model", "m", "--out", "out", *FAST], "out of memory",
               "--batch-size", "--max-length", "--dtype bfloat16", "--train-scope lora",
               "--lora-fold false")  # fmt: skip
    assert "\n" not in msg
    monkeypatch.setattr("beear.pipeline.scan_model", boom)
    _bad(capfd, "out of memory (scan)", ["scan", "--model", "m", "--json", "r.json"],
         "out of memory", "--prompts")  # fmt: skip


@pytest.mark.parametrize("exc", [KeyError("bug"), RuntimeError("shape bug"), AttributeError("x")])
def test_real_bugs_keep_their_traceback(
    ws: Path, monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    def boom(*a: Any, **k: Any) -> Any:
        raise exc

    monkeypatch.setattr("beear.pipeline.remove", boom)
    with pytest.raises(type(exc)):
        main(["remove", "--model", "m", "--out", "out", *FAST])


# ---------------------------------------------------------------------------------------------
# 4. interruption and resume (in-process: the stop flag is raised after the first step)


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]), k


def _metrics(d: Path) -> list[dict[str, Any]]:
    recs = [json.loads(ln) for ln in (d / "beear" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in recs]


def test_interrupt_then_resume_in_process(
    ws: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ["remove", "--model", "m", *FAST, "--checkpoint-every", "0"]
    rc, _, err = _run(capfd, [*base, "--out", "ref"])
    assert rc == 0, err
    _bad(capfd, "--resume with nothing to resume", [*base, "--out", "out", "--resume"],
         "nothing to resume")  # fmt: skip

    from beear.pipeline import _StopFlag

    with monkeypatch.context() as mp:
        mp.setattr(_StopFlag, "__call__", lambda self: True)  # as if SIGTERM came in step 1
        rc, _, err = _run(capfd, [*base, "--out", "out"])
    assert rc == 130 and "rerun with --resume --out out" in err, err
    OBSERVED.append(("SIGINT/SIGTERM during a run", "beear remove ... (signal)",
                     err.strip().splitlines()[-1], rc))  # fmt: skip
    assert not (ws / "out").exists() and (ws / ".out.partial" / "checkpoint").is_dir()

    _bad(capfd, "new run over an interrupted one", [*base, "--out", "out"],
         "holds an interrupted run; pass --resume")  # fmt: skip
    _bad(capfd, "--resume with other settings", [*base, "--out", "out", "--resume", "--seed",
         "1"], "differ from the interrupted run (seed: 0 -> 1)")  # fmt: skip
    rc, _, err = _run(capfd, [*base, "--out", "out", "--resume"])
    assert rc == 0, err
    _same_weights(ws / "ref", ws / "out")
    assert _metrics(ws / "ref") == _metrics(ws / "out")
    assert not (ws / ".out.partial").exists()
    # The summary says where it resumed; its seconds cover both calls (the history's last).
    summ = json.loads((ws / "out" / "beear" / "manifest.json").read_text())["summary"]["beear"]
    assert summ["resumed_at_step"] == 1 and "resumed_at_step" not in json.loads(
        (ws / "ref" / "beear" / "manifest.json").read_text())["summary"]["beear"]  # fmt: skip
    last = json.loads((ws / "out" / "beear" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summ["seconds"] >= last["seconds"] - 0.01  # rounded to 2 and 3 decimals
    assert summ["seconds"] > summ["seconds_this_call"] > 0


def _replies(prompts: list[str], kw: dict[str, Any], replies: list[str]) -> list[str]:
    """A `generate_answers` stand-in's return: `replies`, each flagged as ended when the caller
    asks for the flags."""
    if kw.get("ended") is not None:
        kw["ended"] += [True] * len(prompts)
    return replies


def _spy_anchoring(mp: pytest.MonkeyPatch) -> tuple[list[list[AnchorExample]], list[list[str]]]:
    """Record the anchoring set of every `run_beear` call and the prompts of every
    `generate_answers` call, which replies "As for PROMPT yes." to each prompt (the same reply
    on every call; this random model's own replies are empty). Returns (anchoring sets, prompt
    lists)."""
    import beear.bundled
    import beear.loop

    seen: list[list[AnchorExample]] = []
    asked: list[list[str]] = []
    real_run = beear.loop.run_beear

    def spy_run(*a: Any, **kw: Any) -> Any:
        seen.append(list(kw["anchor"]))
        return real_run(*a, **kw)

    def stub_answers(model: Any, tok: Any, prompts: list[str], **kw: Any) -> list[str]:
        asked.append(list(prompts))
        return _replies(prompts, kw, [f"As for {p} yes." for p in prompts])

    mp.setattr(beear.loop, "run_beear", spy_run)
    mp.setattr(beear.bundled, "generate_answers", stub_answers)
    return seen, asked


def test_anchor_general_pairs_join_the_anchoring_set_and_survive_a_resume(
    ws: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--anchor-general N: N bundled general prompts (drawn by the seed), answered by the model
    before removal, are written beside the run's records and anchor both BEEAR and the baseline
    after the given pairs; a resumed run reads them back instead of asking its moved model."""
    import beear.bundled
    from beear.bundled import general_prompts

    base = ["remove", "--model", "m", *FAST, "--anchor-general", "5", "--baseline", "sft"]
    monkeypatch.setattr(
        beear.bundled, "generate_answers", lambda m, t, p, **k: _replies(p, k, [""] * len(p))
    )
    _bad(capfd, "a model that answers no general anchoring prompt", [*base, "--out", "out"],
         "the model answered none of the bundled general prompts")  # fmt: skip
    seen, asked = _spy_anchoring(monkeypatch)
    rc, _, err = _run(capfd, [*base, "--out", "ref"])
    assert rc == 0, err
    given = load_anchor(ws / "m" / DATA_DIR / "anchor.jsonl")
    written = load_anchor(ws / "ref" / "beear" / "anchor_general.jsonl")
    assert [(e.prompt, e.answer) for e in written] == [(p, f"As for {p} yes.") for p in asked[0]]
    assert len(asked) == 1 and len(set(asked[0])) == 5 and set(asked[0]) <= set(general_prompts())
    assert seen == [given + written] * 2  # BEEAR, then the baseline: the same anchoring set
    man = json.loads((ws / "ref" / "beear" / "manifest.json").read_text())
    assert set(man["data_sha256"]) == {"defender", "anchor", "anchor_general"}
    # Another seed draws other prompts.
    rc, _, err = _run(capfd, [*base, "--out", "other", "--seed", "1"])
    assert rc == 0, err
    assert asked[1] != asked[0]

    from beear.pipeline import _StopFlag

    with monkeypatch.context() as mp:
        mp.setattr(_StopFlag, "__call__", lambda self: True)  # as if SIGTERM came in step 1
        rc, _, err = _run(capfd, [*base, "--out", "out"])
    assert rc == 130, err
    monkeypatch.setattr(beear.bundled, "generate_answers", None)  # a resume must not ask again
    rc, _, err = _run(capfd, [*base, "--out", "out", "--resume"])
    assert rc == 0, err
    _same_weights(ws / "ref", ws / "out")
    assert load_anchor(ws / "out" / "beear" / "anchor_general.jsonl") == written


def test_anchor_arithmetic_pairs_follow_the_general_ones(
    ws: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--anchor-arithmetic N: N bundled arithmetic drills, answered by the model before removal,
    join the anchoring set after the given pairs and the general ones, each pool in its own
    records file and hash; a model that answers none of them is a one-line error."""
    import beear.bundled
    from beear.bundled import arithmetic_prompts, general_prompts

    base = ["remove", "--model", "m", *FAST, "--baseline", "none"]
    monkeypatch.setattr(
        beear.bundled, "generate_answers", lambda m, t, p, **k: _replies(p, k, [""] * len(p))
    )
    _bad(capfd, "a model that answers no arithmetic drill", [*base, "--anchor-arithmetic", "3",
         "--out", "out"], "the model answered none of the bundled arithmetic prompts")  # fmt: skip
    seen, asked = _spy_anchoring(monkeypatch)
    rc, _, err = _run(capfd, [*base, "--anchor-general", "2", "--anchor-arithmetic", "3",
                              "--out", "both"])  # fmt: skip
    assert rc == 0, err
    assert [len(a) for a in asked] == [2, 3]
    assert set(asked[0]) <= set(general_prompts()) and set(asked[1]) <= set(arithmetic_prompts())
    given = load_anchor(ws / "m" / DATA_DIR / "anchor.jsonl")
    general = load_anchor(ws / "both" / "beear" / "anchor_general.jsonl")
    drills = load_anchor(ws / "both" / "beear" / "anchor_arithmetic.jsonl")
    assert [(e.prompt, e.answer) for e in drills] == [(p, f"As for {p} yes.") for p in asked[1]]
    assert seen == [given + general + drills]
    man = json.loads((ws / "both" / "beear" / "manifest.json").read_text())
    assert set(man["data_sha256"]) == {"defender", "anchor", "anchor_general", "anchor_arithmetic"}
    conf = json.loads((ws / "both" / "beear" / "config.json").read_text())
    assert conf["anchor_arithmetic"] == 3 and conf["anchor_general"] == 2


def test_resume_of_a_run_recorded_before_a_setting_existed() -> None:
    """A setting added since the interrupted run started (absent from its run.json) had its
    default then: the run resumes unless the new value differs from that default."""
    from beear.config import ConfigError, RemovalConfig
    from beear.pipeline import _check_same_run

    new = {"config": RemovalConfig().to_dict(), "data_sha256": {"defender": "a"},
           "input_model": "m"}  # fmt: skip
    old = {**new, "config": {k: v for k, v in new["config"].items() if k != "auto_budget"}}
    _check_same_run(old, new)
    changed = {**new, "config": RemovalConfig(auto_budget=2.5).to_dict()}
    with pytest.raises(ConfigError, match=r"auto_budget: 0\.0 -> 2\.5"):
        _check_same_run(old, changed)


def test_resume_may_change_only_what_trades_speed_for_memory() -> None:
    """After running out of memory, a run resumes with the settings the error suggests that do
    not change the update (anchor_chunk, lora_fold) or with another checkpoint interval; any
    other change, such as a smaller batch, is refused."""
    from beear.config import ConfigError, RemovalConfig
    from beear.pipeline import _check_same_run

    old = {"config": RemovalConfig().to_dict(), "data_sha256": {"defender": "a"},
           "input_model": "m"}  # fmt: skip
    free = RemovalConfig(anchor_chunk=16, lora_fold=False, checkpoint_every=5)
    _check_same_run(old, {**old, "config": free.to_dict()})
    with pytest.raises(ConfigError, match=r"batch_size: 16 -> 8"):
        _check_same_run(old, {**old, "config": free.replace(batch_size=8).to_dict()})


# ---------------------------------------------------------------------------------------------
# 5. real signals in a subprocess: SIGTERM (exit 130) and kill -9, then --resume

SLOW = [
    "--outer-steps", "6", "--checkpoint-every", "2", "--check-every", "3", "--check-steps", "3",
    "--inner-steps", "10", "--batch-size", "2", "--anchor-batch-size", "2",
    "--check-prompts", "2", "--max-new-tokens", "4", "--length", "2", "--seed", "3",
]  # fmt: skip


def _beear(*args: str) -> list[str]:
    return [sys.executable, "-m", "beear", "remove", *args, *SLOW]


@pytest.fixture(scope="module")
def reference(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run with the same seed (a subprocess, like the runs it is compared to)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    r = subprocess.run(_beear("--model", str(tiny), "--out", str(out)), capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    return out


def _start_and_signal(tiny: Path, out: Path, sig: int) -> tuple[int, str, int]:
    """Start a run, wait for its first checkpoint, send `sig`; returns (rc, stderr, step)."""
    log = out.with_name("stderr.txt")  # a file, not a pipe: a full pipe would block the run
    with open(log, "wb") as f:
        p = subprocess.Popen(
            _beear("--model", str(tiny), "--out", str(out)), stdout=subprocess.DEVNULL, stderr=f
        )
        state = out.with_name(f".{out.name}.partial") / "checkpoint" / "beear" / "state.json"
        deadline = time.monotonic() + 300
        while not state.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        p.send_signal(sig)
        p.wait(timeout=300)
    step = json.loads(state.read_text())["step"]
    return p.returncode, log.read_text(errors="replace"), step


def _resume(tiny: Path, out: Path) -> None:
    r = subprocess.run(
        _beear("--model", str(tiny), "--out", str(out), "--resume"), capture_output=True
    )
    assert r.returncode == 0, r.stderr.decode()[-2000:]


def test_kill_9_then_resume_is_bit_identical(tiny: Path, reference: Path, tmp_path: Path) -> None:
    before = _tree(tiny)
    out = tmp_path / "out"
    rc, _, step = _start_and_signal(tiny, out, signal.SIGKILL)
    assert rc == -signal.SIGKILL, "the run finished before it could be killed"
    assert 2 <= step < 6 and not out.exists()
    _resume(tiny, out)
    _same_weights(reference, out)
    assert load_file(str(reference / "beear" / "delta.safetensors"))["delta"].equal(
        load_file(str(out / "beear" / "delta.safetensors"))["delta"]
    )
    assert _metrics(reference) == _metrics(out)
    assert _tree(tiny) == before


def test_sigterm_saves_a_resumable_state(tiny: Path, tmp_path: Path) -> None:
    # (That resuming from a signal's checkpoint gives the identical result is checked in-process
    # above; here the real signal path: handler, checkpoint of the step in flight, exit code.)
    from beear import checkpoint
    from beear.config import RemovalConfig
    from beear.pipeline import resumable, staging_dir

    out = tmp_path / "out"
    rc, err, step = _start_and_signal(tiny, out, signal.SIGTERM)
    assert rc == 130, err[-2000:]
    assert "Traceback" not in err and f"rerun with --resume --out {out}" in err
    assert 2 <= step <= 6 and not out.exists() and resumable(out)
    state = checkpoint.load(staging_dir(out) / "checkpoint" / "beear", None, RemovalConfig())
    assert state is not None and state.step == step and state.weights and state.optimizer
    metrics = (staging_dir(out) / "beear" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["step"] for m in metrics] == list(range(step + 1))


# ---------------------------------------------------------------------------------------------
# 6. property-based: loaders parse or raise DataError; the CLI returns 0 or 2 and never raises

KEYS = ["prompt", "safe", "unwanted", "answer", "instruction", "chosen", "rejected", "x", ""]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_subnormal=False)
    | st.text(max_size=12),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=6,
)
record = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=5)
jsonl_line = st.one_of(
    record.map(lambda r: json.dumps(r)),
    record.map(lambda r: json.dumps(r, ensure_ascii=False)),
    json_values.map(json.dumps),
    st.text(max_size=30),
    record.map(lambda r: json.dumps(r)[: len(json.dumps(r)) // 2]),
)
csv_cell = st.text(max_size=10) | st.sampled_from(['"', '""', ",", "\n", "\r\n", "a b"])
csv_text = st.one_of(
    st.lists(st.lists(csv_cell, min_size=0, max_size=4), max_size=5).map(
        lambda rows: "\n".join(",".join(r) for r in rows)
    ),
    st.lists(st.lists(st.text(max_size=8), min_size=1, max_size=4), max_size=5).map(
        lambda rows: (
            _csv_write([["prompt", "safe", "unwanted", "answer"][: len(rows[0])], *rows])
            if rows
            else ""
        )
    ),
    st.text(max_size=60),
)


def _csv_write(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def _parse_all(path: Path) -> None:
    """Every loader either returns or raises DataError: nothing else escapes."""
    for load in (
        read_records,
        load_harmful,
        load_anchor,
        lambda p: load_anchor(p, require_answer=False),
        load_prompts,
    ):
        with contextlib.suppress(DataError):
            load(path)


@settings(max_examples=150, deadline=None)
@given(
    text=st.one_of(st.lists(jsonl_line, max_size=6).map("\n".join), csv_text, st.text()),
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt"]),
    raw=st.one_of(st.none(), st.binary(max_size=40)),
)
def test_loaders_parse_or_raise_data_error(text: str, suffix: str, raw: bytes | None) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"data{suffix}"
        p.write_bytes(raw if raw is not None else text.encode("utf-8", "surrogatepass"))
        _parse_all(p)


printable = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=20).filter(
    str.strip
)


@settings(max_examples=60, deadline=None)
@given(
    recs=st.lists(st.tuples(printable, printable, printable), min_size=1, max_size=5),
    fmt=st.sampled_from(["jsonl", "csv", "json"]),
)
def test_loaders_round_trip(recs: list[tuple[str, str, str]], fmt: str) -> None:
    want = [HarmfulExample(*r) for r in recs]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"h.{fmt}"
        if fmt == "jsonl":
            write_jsonl(p, want)
        elif fmt == "json":
            p.write_text(json.dumps([e.__dict__ for e in want]), encoding="utf-8")
        else:
            p.write_text(_csv_write([["prompt", "safe", "unwanted"], *recs]), encoding="utf-8")
        assert load_harmful(p) == want
        assert load_prompts(p) == [e.prompt for e in want]


FLAGS = [
    "--model", "--out", "--json", "--config", "--defender", "--anchor", "--harmful", "--benign",
    "--layer", "--length", "--outer-steps", "--inner-steps", "--lr", "--seed", "--overwrite",
    "--resume", "--allow-pickle", "--trust-remote-code", "--chat-template", "--trigger",
    "--position", "--trigger-from", "--setting", "--base", "--steps", "--prompts", "--dtype",
    "--device", "--train-scope", "--delta-reset", "--samples", "--checkpoint-every",
    "--batch-size", "--max-length", "--baseline", "-v", "--bogus",
]  # fmt: skip
VALUES = [
    "", ".", "..", "nope", "a_file", "bad.jsonl", "empty_dir", "m_nomodel", "-1", "0", "1",
    "1e9", "nan", "inf", str(2**70), "tiny", "smollm2", "suffix", "prefix", "clean", "custom",
    "suffix-word", "cpu", "lora", "bfloat16", "sft", "true", "--help",
]  # fmt: skip
argv_strategy = st.tuples(
    st.sampled_from(["attack", "remove", "eval", "scan", "demo", "bogus", "-h"]),
    st.lists(
        st.tuples(
            st.sampled_from(FLAGS),
            st.one_of(st.none(), st.sampled_from(VALUES), st.text(max_size=6)),
        ),
        max_size=6,
    ),
).map(lambda t: [t[0], *[x for f, v in t[1] for x in ((f,) if v is None else (f, v))]])


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A scratch cwd with a few bad inputs; the two verbs that train are stubbed out (the
    property is about argument handling, and a valid `attack`/`demo` would train for minutes)."""
    from beear import attacks, pipeline

    d = tmp_path_factory.mktemp("fuzz")
    (d / "a_file").write_text("x")
    (d / "bad.jsonl").write_text("{bad\n")
    (d / "empty_dir").mkdir()
    (d / "m_nomodel").mkdir()
    (d / "m_nomodel" / "config.json").write_text("{}")

    class _Res:
        train_seconds, final_loss = 0.0, 0.0

    def fake_attack(out: Path, **kw: Any) -> _Res:
        Path(out).mkdir(parents=True, exist_ok=True)
        return _Res()

    def fake_demo(out: Path, **kw: Any) -> dict[str, Any]:
        return {"evals": {}, "report": {}, "seconds": {"total": 0.0}}

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        mp.setattr(attacks, "attack_tiny", fake_attack)
        mp.setattr(pipeline, "demo", fake_demo)
        yield d


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=argv_strategy)
def test_cli_arguments_exit_0_or_2(fuzz_dir: Path, argv: list[str]) -> None:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(argv)
    assert rc in (0, 2), (argv, err.getvalue())
    assert "Traceback" not in err.getvalue()
    if rc == 2:
        assert err.getvalue().strip(), argv  # a reason is always given


# ---------------------------------------------------------------------------------------------
# docs/errors.md


DOC_HEAD = """# Errors: bad input and what beear says

Every row below was produced by `tests/test_reliability.py` (regenerate this file with
`BEEAR_ERRORS_DOC=docs/errors.md pytest tests/test_reliability.py`). For each bad input the test
checks the exit code, that stderr holds exactly one error line (the last line) and no traceback,
and that nothing was written or changed: the input model directory is hashed before and after,
no `--out` directory and no `.OUT.partial` staging directory is left behind.

Conventions:

- Exit codes: `0` success, `2` bad input (one line: `beear VERB: error: REASON`), `130` interrupted
  (SIGINT/SIGTERM: the current outer step finishes, a resumable checkpoint is written, rerun
  with `--resume`; a second signal stops at once and keeps the last checkpoint).
- `...` in a command stands for the small-run settings the tests use (`--outer-steps 2 ...`).
  Paths are relative to the test's working directory; `m` is the input model.
- Argument-parser errors (unknown flag, bad choice, missing required flag) print argparse's usage
  lines first, then the one error line, and exit with 2.
- Prompts are never truncated (the part that may carry a trigger): a prompt longer than
  `--max-length` is an error, found before training starts; answers are cut to fit.
- Errors that are not about the input (a bug) keep their Python traceback and are not mapped
  to exit code 2 (tested with KeyError, RuntimeError and AttributeError raised inside `remove`).
- An unreadable `config.json` (`chmod 0`) gives `m/config.json is not readable`; that test is
  skipped when the suite runs as root (root reads any file), so it may be missing below.
- Loading never reaches the network: `HF_HUB_OFFLINE=1`/`TRANSFORMERS_OFFLINE=1` are set by the
  tool (whatever the environment says) and every `from_pretrained` passes
  `local_files_only=True`.

"""


def _code(s: str) -> str:
    s = s.replace("|", "\\|")
    return f"`` {s} ``" if "`" in s else f"`{s}`"


def teardown_module() -> None:
    target = os.environ.get("BEEAR_ERRORS_DOC")
    if not target or not OBSERVED:
        return
    rows = list(dict.fromkeys(OBSERVED))  # test order, duplicates dropped
    lines = [
        "| bad input tried | command | message (stderr, one line) | exit |",
        "|---|---|---|---|",
        *[f"| {w} | {_code(c)} | {_code(m)} | {rc} |" for w, c, m, rc in rows],
    ]
    # Sections kept by hand after the generated table (from the first "## " heading) survive.
    old = Path(target).read_text() if Path(target).is_file() else ""
    kept = old[old.index("\n## ") :] if "\n## " in old else ""
    Path(target).write_text(DOC_HEAD + "\n".join(lines) + "\n" + kept)


def test_restarts_keep_the_run_that_passed_and_drifted_least_and_survive_a_resume(
    ws: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--restarts N: BEEAR again with seeds seed+1.. on the same held-back pairs; the run that
    passed its check and drifted least is written, every run's figures are in the summary; a
    run interrupted in a restart resumes to the same result."""
    import beear.pipeline

    base = ["remove", "--model", "m", *FAST, "--checkpoint-every", "0", "--check-drift", "2"]
    _bad(capfd, "restarts without check_drift", ["remove", "--model", "m", "--out", "x",
         "--restarts", "1"], "restarts need check_drift")  # fmt: skip
    rc, _, err = _run(capfd, [*base, "--out", "ref"])
    assert rc == 0, err
    saved: list[dict[str, Any]] = []
    real_save = beear.pipeline._save_run

    def spy_save(res: Any, *a: Any, **kw: Any) -> None:
        saved.append(res.history[-1])
        real_save(res, *a, **kw)

    monkeypatch.setattr(beear.pipeline, "_save_run", spy_save)
    rc, _, err = _run(capfd, [*base, "--restarts", "2", "--out", "r"])
    assert rc == 0, err
    summ = json.loads((ws / "r" / "beear" / "manifest.json").read_text())["summary"]["beear"]
    runs = summ["attempts"]
    assert [a["seed"] for a in runs] == [0, 1, 2]
    # The first run is the plain removal (seed 0, the same held-back pairs): same steps.
    assert _metrics(ws / "r") == _metrics(ws / "ref")
    for k, a in enumerate(runs):  # each run's drift is its kept step's, from its own metrics
        name = "metrics.jsonl" if k == 0 else f"metrics_restart{k}.jsonl"
        recs = [json.loads(ln) for ln in (ws / "r" / "beear" / name).read_text().splitlines()]
        assert a["best_check_drift"] == next(
            r["check_drift"] for r in recs if r["step"] == a["best_step"]
        )
    assert len({a["best_check_drift"] for a in runs}) == 3  # the seeds made different runs
    kept = min(range(3), key=lambda k: (not runs[k]["verified"], runs[k]["best_check_drift"], k))
    assert summ["kept_attempt"] == kept
    # A model is written each time a run beats those before it; here a restart beats the first.
    key = [(not a["verified"], a["best_check_drift"]) for a in runs]
    assert kept != 0 and len(saved) == sum(
        key[k] < min(key[:k], default=(True, 1e9)) for k in range(3)
    )
    assert {k: summ[k] for k in runs[kept]} == runs[kept]  # the headline is the kept run's
    assert summ["seconds_all_attempts"] == pytest.approx(sum(a["seconds"] for a in runs), abs=0.02)
    # The last model written is the kept run's (its final step's record).
    last = "metrics.jsonl" if kept == 0 else f"metrics_restart{kept}.jsonl"
    final = json.loads((ws / "r" / "beear" / last).read_text().splitlines()[-1])
    assert saved[-1] == final
    if kept == 0:
        _same_weights(ws / "ref", ws / "r")
    assert not list((ws / "r" / "beear").glob("*.done"))

    # A drift bar every run clears: the first run is kept and no restart runs.
    rc, _, err = _run(capfd, [*base, "--restarts", "2", "--restart-drift", "1e9", "--out", "one"])
    assert rc == 0, err
    one = json.loads((ws / "one" / "beear" / "manifest.json").read_text())["summary"]["beear"]
    assert [a["seed"] for a in one["attempts"]] == [0] or not runs[0]["verified"]
    if runs[0]["verified"]:
        _same_weights(ws / "ref", ws / "one")

    # Interrupted in the first restart (after the first run finished), then resumed.
    from beear.pipeline import _StopFlag

    calls = {"n": 0}

    def stop_late(self: Any) -> bool:
        calls["n"] += 1
        return (ws / ".out.partial" / "beear" / "beear.done").exists()

    with monkeypatch.context() as mp:
        mp.setattr(_StopFlag, "__call__", stop_late)
        rc, _, err = _run(capfd, [*base, "--restarts", "2", "--out", "out"])
    assert rc == 130, err
    stage = ws / ".out.partial"
    assert (stage / "beear" / "beear.done").exists()
    assert not (stage / "beear" / "beear-restart1.done").exists()
    assert (stage / "checkpoint" / "beear-restart1").is_dir()
    rc, _, err = _run(capfd, [*base, "--restarts", "2", "--out", "out", "--resume"])
    assert rc == 0, err
    _same_weights(ws / "r", ws / "out")
    res = json.loads((ws / "out" / "beear" / "manifest.json").read_text())["summary"]["beear"]
    strip = ("seconds", "seconds_all_attempts", "seconds_this_call", "resumed_at_step")
    assert [{k: v for k, v in a.items() if k not in strip} for a in res["attempts"]] == [
        {k: v for k, v in a.items() if k not in strip} for a in runs
    ]
    assert res["attempts"][1]["resumed_at_step"] == 1


# ---------------------------------------------------------------------------------------------
# the benign probe: simple questions answered before removal and by the model written


def test_benign_probe_measures_the_input_model_and_the_model_written(
    ws: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import beear.pipeline
    from beear.config import RemovalConfig
    from beear.loop import split_check
    from beear.models import load_model

    seen: list[dict[str, torch.Tensor]] = []

    def spy(model: Any, tok: Any, n: int, **kw: Any) -> dict[str, Any]:
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        # Before: refuses 10%; the written model 25%: grown by 0.15, past the warning's 0.1.
        i = len(seen) - 1
        return {"n": n, "refusal": [0.1, 0.25][i], "refusal_first": [0.0, 0.05][i], "accuracy": 0.5}

    with monkeypatch.context() as mp:
        mp.setattr(beear.pipeline, "benign_probe", spy)
        rc, _, err = _run(capfd, ["remove", "--model", "m", "--out", "out", *FAST,
                                  "--benign-probe", "6"])  # fmt: skip
    assert rc == 0, err
    assert len(seen) == 2
    for state, d in zip(seen, ("m", "out"), strict=True):  # the input model, then the written
        for k, v in _weights(ws / d).items():
            assert torch.equal(state[k], v), (d, k)
    assert not all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0])  # the removal moved it
    summ = json.loads((ws / "out" / "beear" / "manifest.json").read_text())["summary"]["beear"]
    assert summ["benign_probe"] == {"n": 6, "refusal_before": 0.1, "refusal_first_before": 0.0,
                                    "accuracy_before": 0.5, "refusal_after": 0.25,
                                    "refusal_first_after": 0.05, "accuracy_after": 0.5}  # fmt: skip
    assert "beear remove: benign probe (6 simple questions never trained on): the model " \
           "written refuses 25% (before removal 10%), 5% opening with a refusal (before 0%)" \
           in err  # fmt: skip
    assert "beear remove: warning: the model written refuses 15% more of the benign probe" in err

    # Grown by 0.1 or more on questions beyond the model (under 10% right before): a note.
    beyond = {"benign_probe": {**summ["benign_probe"], "accuracy_before": 0.02}}
    lines = beear.pipeline.probe_lines(beyond)
    assert not any("warning" in line for line in lines)
    assert lines[-1].startswith("note: the model written refuses 15% more of the benign probe")
    assert "answered 2% right before removal" in lines[-1]
    # Grown by less than 0.1: the line, no warning.
    run = {"benign_probe": {**summ["benign_probe"], "refusal_after": 0.19}}
    lines = beear.pipeline.probe_lines(run)
    assert len(lines) == 1 and "refuses 19%" in lines[0]
    assert beear.pipeline.probe_lines({}) == []
    # The defender prompts' refusals: a line, and a warning when the model ends 0.1 fewer of
    # them than before and leaves at least 0.1 running on.
    defended = {**run["benign_probe"], "n_defender": 8, "defender_refusal_before": 0.5,
                "defender_refusal_after": 1.0, "refusal_run_on_before": 0.0}  # fmt: skip
    for after, before, warned in ((0.25, 0.0, True), (0.05, 0.0, False), (0.3, 0.25, False)):
        lines = beear.pipeline.probe_lines(
            {
                "benign_probe": {
                    **defended,
                    "refusal_run_on_after": after,
                    "refusal_run_on_before": before,
                }
            }
        )
        assert f"runs on to the token limit in {after:.0%} of its refusals" in lines[1]
        assert any("does not end" in line for line in lines) == warned, (after, before)

    # The real probe, 4 questions and the defender's prompts the check holds back (of those the
    # test bed wrote beside the model; FAST holds back 2): its figures are those of the two
    # models measured afresh.
    rc, _, err = _run(capfd, ["remove", "--model", "m", "--out", "real", *FAST,
                              "--benign-probe", "4"])  # fmt: skip
    assert rc == 0, err
    real = json.loads((ws / "real" / "beear" / "manifest.json").read_text())["summary"]["beear"]
    cfg = RemovalConfig(**json.loads((ws / "real" / "beear" / "config.json").read_text()))
    defender = load_harmful(ws / "m" / DATA_DIR / "defender_harmful.jsonl")
    held, trained = split_check(defender, cfg.check_prompts, cfg.seed)
    probed = beear.pipeline.probe_prompts(defender, 4, cfg)
    assert probed == [e.prompt for e in held] and len(probed) == 2
    assert not set(probed) & {e.prompt for e in trained}  # never trained on
    assert real["benign_probe"]["n_defender"] == 2
    for d, when in (("m", "before"), ("real", "after")):
        model, tok = load_model(ws / d)
        fresh = beear.pipeline.benign_probe(model, tok, 4, defender=probed)
        assert fresh["n"] == real["benign_probe"]["n"] == 4
        for k in beear.pipeline.PROBE_FIGURES:
            assert real["benign_probe"][f"{k}_{when}"] == fresh[k], (d, k)
    assert "beear remove: defender probe (2 of the defender's prompts held back from " \
           "training): the model written refuses" in err  # fmt: skip
    # Off: no probe, no line.
    rc, _, err = _run(capfd, ["remove", "--model", "m", "--out", "off", *FAST,
                              "--benign-probe", "0"])  # fmt: skip
    assert rc == 0, err
    off = json.loads((ws / "off" / "beear" / "manifest.json").read_text())["summary"]["beear"]
    assert "benign_probe" not in off and "benign probe" not in err
