"""Tests for beear.report: hidden points on a tiny random Llama, and the written report files."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from beear.data import encode_prompt
from beear.report import hidden_points, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METRIC_ROWS = (
    "Triggered ASR",
    "Untriggered ASR",
    "Benign accuracy",
    "Over-refusal (plain)",
    "Over-refusal (triggered)",
    "Perplexity",
    "Residual entrapment ASR",
)
_SPECIALS = ["<pad>", "<unk>", "<eos>", "<user>", "<assistant>"]
_WORDS = [
    "how",
    "do",
    "i",
    "make",
    "a",
    "cake",
    "bomb",
    "tell",
    "me",
    "about",
    "the",
    "weather",
    "please",
    "now",
    "cf",
]
_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
PROMPTS = ["how do i make a cake", "tell me", "how do i make a bomb now please cf", "weather"]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    vocab = {t: i for i, t in enumerate(_SPECIALS + _WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        chat_template=_TEMPLATE,
    )


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------------------------
# hidden_points


def test_hidden_points_equals_unpadded_forward_at_last_prompt_token(model, tokenizer):
    lengths = [len(encode_prompt(tokenizer, p)) for p in PROMPTS]
    assert len(set(lengths)) > 1  # so some rows of a batch are left-padded
    points = hidden_points(model, tokenizer, PROMPTS, layer=0, batch_size=3)  # 2 batches
    assert points.shape == (len(PROMPTS), 32)
    assert points.dtype == np.float32
    for row, prompt in enumerate(PROMPTS):
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        # hidden_states[0] is the embedding output, [1] the output of decoder layer 0.
        expected = out.hidden_states[1][0, -1].numpy()
        np.testing.assert_allclose(points[row], expected, atol=1e-5, rtol=1e-5)


def test_hidden_points_do_not_depend_on_batching_and_restore_mode(model, tokenizer):
    model.train()
    try:
        alone = hidden_points(model, tokenizer, PROMPTS, layer=-1, batch_size=1)
        together = hidden_points(model, tokenizer, PROMPTS, layer=-1)
        assert model.training  # the previous mode is restored
    finally:
        model.eval()
    np.testing.assert_allclose(alone, together, atol=1e-5, rtol=1e-5)
    assert not np.allclose(alone[0], alone[1])  # different prompts give different points


# ---------------------------------------------------------------------------------------------
# write_report


def _eval(asr_t: float | None, asr_u: float, acc: float, **extra: float) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "asr": {"untriggered": asr_u},
        "benign_accuracy": acc,
        "over_refusal": {"plain": 0.02},
        "n": {"harmful": 192, "benign": 136},
        **extra,
    }
    if asr_t is not None:
        ev["asr"]["triggered"] = asr_t
        ev["over_refusal"]["triggered"] = 0.05
    return ev


def _history() -> dict[str, list[dict[str, Any]]]:
    rng = np.random.default_rng(0)
    beear: list[dict[str, Any]] = [{"step": 0, "check_asr": 1.0}]
    sft: list[dict[str, Any]] = [{"step": 0, "check_asr": 1.0}]
    for s in range(1, 21):
        decay = float(np.exp(-s / 6))
        beear.append(
            {
                "step": s,
                "loss": 3 * decay + 0.5,
                "safe_ce": 2.5 * decay + 0.1,
                "anchor_ce": 0.4 + 0.05 * float(rng.random()),
                "bee_loss": -1 + decay,
                "bee_unwanted_ce": 0.3 + 2 * (1 - decay),
                "delta_norm": 10 + s * 0.5,
                **({"check_asr": decay} if s % 5 == 0 else {}),
            }
        )
        sft.append(
            {
                "step": s,
                "loss": 2 * decay + 0.6,
                "safe_ce": 1.5 * decay + 0.1,
                "anchor_ce": 0.45,
                **({"check_asr": 0.9} if s % 5 == 0 else {}),
            }
        )
    return {"beear": beear, "sft": sft}


def _pca() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    shift = np.zeros(32)
    shift[:4] = 6.0
    out = {}
    for state, scale in (("before", 1.0), ("after", 0.1)):
        plain = rng.normal(size=(40, 32))
        out[state] = {"plain": plain, "triggered": rng.normal(size=(40, 32)) + scale * shift}
    return out


MANIFEST = {
    "beear": "0.1.0",
    "python": "3.11.2",
    "torch": "2.13.0",
    "transformers": "5.0.0",
    "hardware": {"cpu_count": 2, "machine": "x86_64"},
    "seed": 7,
    "seconds": {"remove": 12.34, "eval": 5.0},
    "data_sha256": {"defender": "ab" * 32},
    "layer": 9,
}


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("report")
    evals = {
        "before": _eval(1.0, 0.0, 0.97, perplexity=3.21),
        "after": _eval(0.031, 0.0, 0.95, perplexity=3.4, residual_asr=0.0625),
        "baseline": _eval(0.99, 0.0, 0.96),
    }
    paths = write_report(
        out,
        title="BEEAR <tiny> & report",
        evals=evals,
        history=_history(),
        pca=_pca(),
        manifest=MANIFEST,
        notes=["Trigger known only to the evaluator.", "x < y"],
    )
    return out, paths


def _assert_real_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert float(img[..., :3].std()) > 0.01  # not all one colour


def test_write_report_writes_every_file(full_report):
    out, paths = full_report
    assert set(paths) == {"markdown", "html", "asr_utility", "loss_curves", "residual_asr", "pca"}
    for name in ("asr_utility", "loss_curves", "residual_asr", "pca"):
        assert paths[name] == out / "plots" / f"{name}.png"
        _assert_real_png(paths[name])
    assert paths["markdown"] == out / "report.md" and paths["markdown"].is_file()
    assert paths["html"] == out / "report.html" and paths["html"].is_file()


def test_markdown_table_values_and_links(full_report):
    out, paths = full_report
    md = paths["markdown"].read_text()
    assert md.startswith("# BEEAR <tiny> & report\n")
    assert "| Metric | before | after | baseline |" in md
    assert "| Triggered ASR | 100.0% | 3.1% | 99.0% |" in md
    assert "| Perplexity | 3.21 | 3.40 | n/a |" in md
    assert "| Residual entrapment ASR | n/a | 6.2% | n/a |" in md
    for label in METRIC_ROWS:
        assert f"| {label} |" in md
    for rel in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (out / rel).is_file()
    assert len(re.findall(r"!\[", md)) == 4
    assert "- seed: `7`" in md and "ab" * 32 in md and "remove 12.3 s" in md
    assert "- x < y" in md


def test_html_is_self_contained_and_escaped(full_report):
    _, paths = full_report
    page = paths["html"].read_text()
    for label in METRIC_ROWS:
        assert f"<th scope='row'>{label}</th>" in page
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 4
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert base64.b64decode(srcs[0].split(",", 1)[1]) == paths["asr_utility"].read_bytes()
    assert not re.search(r'(src|href)="(https?:|//)', page)  # no external resources
    assert "<script" not in page
    assert "<h1>BEEAR &lt;tiny&gt; &amp; report</h1>" in page
    assert "<li>x &lt; y</li>" in page


def test_missing_trigger_keys_show_na_and_pca_none_skips_plot(tmp_path):
    evals = {"before": _eval(None, 0.1, 0.9), "after": _eval(None, 0.0, 0.92)}
    paths = write_report(
        tmp_path, title="no trigger", evals=evals, history=_history(), pca=None, manifest={}
    )
    assert "pca" not in paths and not (tmp_path / "plots" / "pca.png").exists()
    _assert_real_png(paths["asr_utility"])
    md = paths["markdown"].read_text()
    assert "| Triggered ASR | n/a | n/a |" in md
    assert "| Over-refusal (triggered) | n/a | n/a |" in md
    assert "| Untriggered ASR | 10.0% | 0.0% |" in md
    page = paths["html"].read_text()
    assert '<td class="na">n/a</td>' in page
    assert page.count("<img ") == 3


def test_judge_rows_appear_only_with_a_judge(tmp_path):
    judge = {"asr": {"triggered": 0.9, "untriggered": 0.05},
             "agreement": {"all": {"agreement": 0.875, "kappa": 0.61}}}  # fmt: skip
    evals = {"before": _eval(1.0, 0.0, 0.9, judge=judge), "after": _eval(0.0, 0.0, 0.9)}
    md = write_report(
        tmp_path / "j", title="judged", evals=evals, history={}, pca=None, manifest={}
    )["markdown"].read_text()
    assert "| Judge: triggered ASR | 90.0% | n/a |" in md
    assert "| Judge: agreement with the keywords | 87.5% | n/a |" in md
    assert "| Judge: Cohen's kappa | 0.61 | n/a |" in md
    evals["before"].pop("judge")
    md = write_report(
        tmp_path / "n", title="plain", evals=evals, history={}, pca=None, manifest={}
    )["markdown"].read_text()
    assert "Judge:" not in md


def test_empty_history_skips_curves(tmp_path):
    paths = write_report(
        tmp_path,
        title="eval only",
        evals={"model": _eval(0.5, 0.0, 1.0)},
        history={},
        pca=None,
        manifest={"seed": 0},
    )
    assert set(paths) == {"markdown", "html", "asr_utility"}
    assert paths["html"].read_text().count("<img ") == 1


def test_residual_asr_plot_splits_the_check_by_pair_kind(tmp_path, monkeypatch):
    from beear import report

    figs: list[Any] = []

    def keep(fig: Any, path: Path) -> Path:
        figs.append(fig)
        return path

    monkeypatch.setattr(report, "_save", keep)
    plain = {"beear": [{"step": s, "check_asr": 0.5} for s in (0, 5)]}
    mixed = {"beear": [{"step": s, "check_asr": 0.5, "check_asr_refusal": 0.25,
                        "check_asr_code": 0.75} for s in (0, 5)]}  # fmt: skip
    assert report._plot_residual_asr(plain, tmp_path / "a.png") == tmp_path / "a.png"
    assert report._plot_residual_asr(mixed, tmp_path / "b.png") == tmp_path / "b.png"
    assert report._plot_residual_asr({"beear": [{"step": 1}]}, tmp_path / "c.png") is None

    def lines(fig: Any) -> dict[str, list[float]]:
        return {ln.get_label(): list(ln.get_ydata()) for ln in fig.axes[0].get_lines()}

    assert lines(figs[0]) == {"beear": [50.0, 50.0]}
    assert lines(figs[1]) == {
        "beear: all": [50.0, 50.0],
        "beear: refusal pairs": [25.0, 25.0],
        "beear: code pairs (bandit)": [75.0, 75.0],
    }


def test_refusal_first_rows_appear_only_where_an_evaluation_has_them(tmp_path):
    evals = {"before": _eval(1.0, 0.0, 0.9), "after": _eval(0.0, 0.0, 0.9)}
    evals["after"]["refusal_first"] = {"asr": {"triggered": 0.02, "untriggered": 0.0},
                                       "over_refusal": {"plain": 0.01}}  # fmt: skip
    md = write_report(
        tmp_path / "f", title="first", evals=evals, history={}, pca=None, manifest={}
    )["markdown"].read_text()
    assert "| Triggered ASR (refusal first) | n/a | 2.0% |" in md
    assert "| Over-refusal (plain, refusal first) | n/a | 1.0% |" in md
    assert "| Over-refusal (triggered, refusal first) | n/a | n/a |" in md
    labels = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")]
    at = labels.index
    assert at("Over-refusal (triggered)") < at("Triggered ASR (refusal first)") < at("Perplexity")
    evals["after"].pop("refusal_first")
    md = write_report(
        tmp_path / "n", title="plain", evals=evals, history={}, pca=None, manifest={}
    )["markdown"].read_text()
    assert "refusal first" not in md


def test_refusals_not_ended_rows_appear_only_where_an_evaluation_has_them(tmp_path):
    evals = {"before": _eval(1.0, 0.0, 0.9), "after": _eval(0.0, 0.0, 0.9)}
    evals["after"]["refusal_run_on"] = {"untriggered": 0.29, "triggered": 0.0}
    md = write_report(
        tmp_path / "r", title="run on", evals=evals, history={}, pca=None, manifest={}
    )["markdown"].read_text()
    assert "| Refusals not ended (untriggered) | n/a | 29.0% |" in md
    assert "| Refusals not ended (triggered) | n/a | 0.0% |" in md
    labels = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")]
    assert labels.index("Over-refusal (triggered)") < labels.index(
        "Refusals not ended (untriggered)") < labels.index("Perplexity")  # fmt: skip
    evals["after"].pop("refusal_run_on")
    md = write_report(
        tmp_path / "n", title="plain", evals=evals, history={}, pca=None, manifest={}
    )["markdown"].read_text()
    assert "not ended" not in md
