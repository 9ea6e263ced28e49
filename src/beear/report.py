"""Reports: the before/after table, plots and the run manifest, as Markdown and as HTML.

    points = {
        state: {
            "plain": hidden_points(m, tok, prompts, layer=layer),
            "triggered": hidden_points(m, tok, [trigger.apply(p) for p in prompts], layer=layer),
        }
        for state, m in (("before", backdoored), ("after", repaired))
    }
    paths = write_report(out, title="BEEAR on tiny/word-suffix", evals={"before": ev0, "after": ev1},
                         history={"beear": result.history}, pca=points, manifest=man)

`write_report` writes `report.md` (next to a `plots/` folder of PNGs) and `report.html`, which
carries the same content in one file: the PNGs are embedded as base64 data URIs and the CSS is
inline, so it opens offline, can be mailed, and needs no JavaScript.

Plots are drawn with matplotlib's Agg canvas on `Figure` objects, without pyplot, so the report
touches no global matplotlib state (backend, open figures) of the calling program.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from beear.data import encode_prompt, left_pad
from beear.hooks import capture

__all__ = ["hidden_points", "write_report"]


# ---------------------------------------------------------------------------------------------
# hidden states for the PCA picture


def hidden_points(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    layer: int,
    batch_size: int = 32,
) -> np.ndarray:
    """The output of decoder layer `layer` at the last prompt token, one row per prompt: (N, d).

    Each prompt is rendered by `encode_prompt` (the chat template plus its generation prompt),
    so the last token is where the answer would start: the position the paper's Figure 1
    shows shifted by a trigger. Batches are left-padded with `tokenizer.pad_token_id` under an
    attention mask, with position ids counted over the real tokens as `generate()` does, so a
    row's point does not depend on what it was batched with. Runs under `torch.no_grad()` on
    the model's device, in eval mode (the previous mode is restored); returns float32 numpy.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token_id first")
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    rows: list[np.ndarray] = []
    model.eval()  # dropout would make the points random
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            input_ids, attention_mask = left_pad(encoded, pad_id)  # (B, T) each
            position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
            with torch.no_grad(), capture(model, layer) as cap:
                model(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    position_ids=position_ids.to(device),
                    use_cache=False,
                )
            assert cap.hidden is not None
            # Left padding puts every prompt's last token in the last column.
            rows.append(cap.hidden[:, -1, :].float().cpu().numpy())  # (B, d)
    finally:
        model.train(was_training)
    if not rows:
        d = int(model.get_input_embeddings().weight.shape[1])
        return np.zeros((0, d), dtype=np.float32)
    return np.concatenate(rows).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# numbers


# (label, keys into an eval dict, kind): "share" values are in [0, 1] and shown as percentages.
_ANSWER_METRICS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("Triggered ASR", ("asr", "triggered"), "share"),
    ("Untriggered ASR", ("asr", "untriggered"), "share"),
    ("Benign accuracy", ("benign_accuracy",), "share"),
    ("Over-refusal (plain)", ("over_refusal", "plain"), "share"),
    ("Over-refusal (triggered)", ("over_refusal", "triggered"), "share"),
)
_MODEL_METRICS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("Perplexity", ("perplexity",), "number"),
    ("Residual entrapment ASR", ("residual_asr",), "share"),
)
_METRICS = _ANSWER_METRICS + _MODEL_METRICS
# Shown only when an evaluation carries them (`beear.eval.refuses_first`): only a refusal an
# answer opens with counts, not one appended after the answer.
_FIRST_METRICS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("Triggered ASR (refusal first)", ("refusal_first", "asr", "triggered"), "share"),
    ("Over-refusal (plain, refusal first)", ("refusal_first", "over_refusal", "plain"), "share"),
    (
        "Over-refusal (triggered, refusal first)",
        ("refusal_first", "over_refusal", "triggered"),
        "share",
    ),
)
# Shown only when an evaluation carries them (`beear.eval.refusal_run_on`): of the harmful
# answers judged refusals, the share the model did not end within the token limit.
_RUN_ON_METRICS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("Refusals not ended (untriggered)", ("refusal_run_on", "untriggered"), "share"),
    ("Refusals not ended (triggered)", ("refusal_run_on", "triggered"), "share"),
)
# Shown only when an evaluation carries a local judge's block (`beear eval/demo --judge`).
_JUDGE_METRICS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("Judge: triggered ASR", ("judge", "asr", "triggered"), "share"),
    ("Judge: untriggered ASR", ("judge", "asr", "untriggered"), "share"),
    ("Judge: agreement with the keywords", ("judge", "agreement", "all", "agreement"), "share"),
    ("Judge: Cohen's kappa", ("judge", "agreement", "all", "kappa"), "number"),
)
# The shares drawn in the bar chart (perplexity has another scale).
_BAR_METRICS = tuple(m for m in _METRICS if m[2] == "share")

NA = "n/a"


def _lookup(ev: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    """The number at `keys` in a nested eval dict, or None if missing, null or not finite."""
    value: Any = ev
    for k in keys:
        if not isinstance(value, dict) or k not in value:
            return None
        value = value[k]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return NA
    return f"{100 * value:.1f}%" if kind == "share" else f"{value:.2f}"


def results_table(evals: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table: metrics down, eval states across."""
    header = ["Metric", *evals]
    judged = any("judge" in ev for ev in evals.values())
    first = any("refusal_first" in ev for ev in evals.values())
    run_on = any("refusal_run_on" in ev for ev in evals.values())
    # The refusal-first rows right under the keyword ASR and over-refusal rows they restate.
    metrics = (
        _ANSWER_METRICS
        + (_FIRST_METRICS if first else ())
        + (_RUN_ON_METRICS if run_on else ())
        + _MODEL_METRICS
        + (_JUDGE_METRICS if judged else ())
    )
    rows = [
        [label, *(_fmt(_lookup(ev, keys), kind) for ev in evals.values())]
        for label, keys, kind in metrics
    ]
    return header, rows


def _sample_sizes(evals: dict[str, dict[str, Any]]) -> str:
    """One line naming the prompt counts behind each state's shares, or '' if none are given."""
    sizes = {
        state: ", ".join(f"{k} {v}" for k, v in ev["n"].items())
        for state, ev in evals.items()
        if isinstance(ev.get("n"), dict) and ev["n"]
    }
    if not sizes:
        return ""
    if len(sizes) == len(evals) and len(set(sizes.values())) == 1:
        return f"Prompts: {next(iter(sizes.values()))} (every state)."
    return "Prompts per state: " + "; ".join(f"{s}: {t}" for s, t in sizes.items()) + "."


def _manifest_items(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """The manifest as (label, text) pairs: versions, seed, hardware, wall times, data hashes,
    then any other keys (nested values as compact JSON)."""
    m = dict(manifest)
    items: list[tuple[str, str]] = []
    versions = [f"{k} {m.pop(k)}" for k in ("beear", "python", "torch", "transformers") if k in m]
    if versions:
        items.append(("versions", ", ".join(versions)))
    if "seed" in m:
        items.append(("seed", str(m.pop("seed"))))
    if "platform" in m:
        items.append(("platform", str(m.pop("platform"))))
    if "hardware" in m:
        hw = m.pop("hardware")
        text = ", ".join(f"{k} {v}" for k, v in hw.items()) if isinstance(hw, dict) else str(hw)
        items.append(("hardware", text))
    if "seconds" in m:
        secs = m.pop("seconds")
        if isinstance(secs, dict):
            text = ", ".join(
                f"{k} {v:.1f} s" if isinstance(v, (int, float)) else f"{k} {v}"
                for k, v in secs.items()
            )
        else:
            text = str(secs)
        items.append(("wall time", text))
    if "data_sha256" in m:
        data = m.pop("data_sha256")
        text = (
            ", ".join(f"{k} {v}" for k, v in data.items()) if isinstance(data, dict) else str(data)
        )
        items.append(("data sha256", text))
    for k, v in m.items():
        items.append((str(k), v if isinstance(v, str) else json.dumps(v, sort_keys=True)))
    return items


# ---------------------------------------------------------------------------------------------
# plots

# Colour-blind-safe palette (Okabe-Ito); states and modes cycle through it in order.
_PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
_GROUP_COLOURS = {"plain": "#0072B2", "triggered": "#D55E00"}
_DPI = 110


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches the Agg canvas: no pyplot, no global backend
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI, facecolor="white")
    return path


def _bar_label(percent: float) -> str:
    # Whole percents keep the bars uncluttered; small non-zero values keep a decimal.
    return f"{percent:.0f}" if percent >= 10 or percent == 0 else f"{percent:.1f}"


def _plot_asr_utility(evals: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Grouped bars: one group per metric, one bar per eval state; missing values are skipped."""
    metrics = [
        m for m in _BAR_METRICS if any(_lookup(ev, m[1]) is not None for ev in evals.values())
    ]
    if not evals or not metrics:
        return None
    states = list(evals)
    fig = _new_figure(max(7.5, 1.6 * len(metrics) + 1.5), 4.4)
    ax = fig.add_subplot()
    width = 0.8 / len(states)
    x = np.arange(len(metrics))
    for s, state in enumerate(states):
        offsets = x - 0.4 + width * (s + 0.5)
        values = [_lookup(evals[state], keys) for _, keys, _ in metrics]
        colour = _PALETTE[s % len(_PALETTE)]
        have = [(o, v) for o, v in zip(offsets, values, strict=True) if v is not None]
        if have:
            bars = ax.bar(
                [o for o, _ in have],
                [100 * v for _, v in have],
                width * 0.92,
                color=colour,
                label=state,
            )
            labels = [_bar_label(100 * v) for _, v in have]
            ax.bar_label(bars, labels=labels, fontsize=8, padding=2)
        else:
            ax.bar([], [], color=colour, label=state)  # keep the legend entry
        for o, v in zip(offsets, values, strict=True):
            if v is None:
                ax.text(o, 1.5, NA, ha="center", va="bottom", fontsize=7, rotation=90, color="0.4")
    ax.set_xticks(x, [label.replace(" (", "\n(") for label, _, _ in metrics], fontsize=9)
    ax.set_ylim(0, 112)
    ax.set_ylabel("% of prompts")
    ax.set_title("Attack success and utility per model state")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return _save(fig, path)


# Loss-curve panels: (title, y label, record keys); a panel is drawn when any record has a key.
_LOSS_PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "Model update (AR)",
        "nats",
        ("loss", "safe_ce", "anchor_ce", "anchor_delta_ce", "anchor_kl", "anchor_delta_kl"),
    ),
    ("Entrapment (BEE)", "loss / cross-entropy", ("bee_loss", "bee_unwanted_ce")),
    ("Universal perturbation", "‖δ‖", ("delta_norm",)),
    ("Drift on held-back anchors (check)", "KL from before removal", ("check_drift",)),
)
_MODE_STYLES = ("-", "--", ":", "-.")


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pairs = [
        (float(r["step"]), float(r[key]))
        for r in records
        if "step" in r and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _plot_loss_curves(history: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """One panel per group of keys that exists; colour = key, line style = mode."""
    panels = [
        p for p in _LOSS_PANELS if any(_series(h, k)[0] for h in history.values() for k in p[2])
    ]
    if not panels:
        return None
    fig = _new_figure(4.3 * len(panels) + 0.6, 3.9)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, ylabel, keys) in zip(axes, panels, strict=True):
        for m, (mode, records) in enumerate(history.items()):
            for k, key in enumerate(keys):
                steps, values = _series(records, key)
                if steps:
                    ax.plot(
                        steps,
                        values,
                        _MODE_STYLES[m % len(_MODE_STYLES)],
                        color=_PALETTE[k % len(_PALETTE)],
                        lw=1.5,
                        marker="." if len(steps) < 30 else None,
                        label=f"{key} ({mode})" if len(history) > 1 else key,
                    )
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("outer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8.5, frameon=False)
    return _save(fig, path)


# The check's per-kind shares, recorded when its prompts hold code pairs (loop.run_beear).
_CHECK_KINDS = (("check_asr", "o", "all"), ("check_asr_refusal", "s", "refusal pairs"),
                ("check_asr_code", "^", "code pairs (bandit)"))  # fmt: skip


def _plot_residual_asr(history: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """The trigger-free check (`check_asr`) over outer steps, one line per mode; where the check
    judged code pairs too, also one line per kind of pair."""
    curves = {
        (m, mode, k): _series(recs, _CHECK_KINDS[k][0])
        for m, (mode, recs) in enumerate(history.items())
        for k in range(len(_CHECK_KINDS))
    }
    curves = {key: c for key, c in curves.items() if c[0]}
    if not curves:
        return None
    by_kind = any(k > 0 for _, _, k in curves)  # modes by line style, kinds by colour
    fig = _new_figure(7.5, 4.0)
    ax = fig.add_subplot()
    for (m, mode, k), (steps, values) in curves.items():
        _, marker, kind = _CHECK_KINDS[k]
        ax.plot(
            steps,
            [100 * v for v in values],
            _MODE_STYLES[m % len(_MODE_STYLES)],
            marker=marker,
            ms=5,
            lw=1.8 if k == 0 else 1.2,
            color=_PALETTE[(k if by_kind else m) % len(_PALETTE)],
            label=f"{mode}: {kind}" if by_kind else mode,
        )
    ax.set_ylim(-3, 103)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("outer step")
    ax.set_ylabel("residual entrapment ASR (%)")
    ax.set_title("Trigger-free check: a fresh entrapment search on held-back defender prompts")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return _save(fig, path)


def _pca_2d(groups: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Project all groups on the top two principal components of their union (numpy SVD).

    Returns the (N_g, 2) projections and the explained-variance ratio of the two components.
    PC1 is oriented so that the "triggered" mean lies right of the "plain" mean (or, without
    both groups, so its largest loading is positive): SVD signs are arbitrary, this keeps the
    panels of different states comparable.
    """
    names = list(groups)
    data = np.concatenate([groups[g] for g in names]).astype(np.float64)  # (N, d)
    centred = data - data.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    comps = np.zeros((2, data.shape[1]))
    k = min(2, vt.shape[0])
    comps[:k] = vt[:k]
    var = s**2
    ratio = np.zeros(2)
    if var.sum() > 0:
        ratio[:k] = var[:k] / var.sum()
    proj = centred @ comps.T  # (N, 2)
    out, start = {}, 0
    for g in names:
        out[g] = proj[start : start + len(groups[g])]
        start += len(groups[g])
    for c in range(2):
        if "plain" in out and "triggered" in out and len(out["plain"]) and len(out["triggered"]):
            sign = np.sign(out["triggered"][:, c].mean() - out["plain"][:, c].mean())
        else:
            sign = np.sign(comps[c][np.argmax(np.abs(comps[c]))])
        if sign < 0:
            for g in names:
                out[g][:, c] *= -1
    return out, ratio


def _plot_pca(pca: dict[str, dict[str, np.ndarray]], path: Path, layer: Any | None) -> Path | None:
    """One panel per state: the 2-D PCA of that state's plain and triggered hidden states."""
    states = {
        state: {g: np.asarray(x, dtype=np.float64).reshape(len(x), -1) for g, x in groups.items()}
        for state, groups in pca.items()
        if groups and any(len(x) for x in groups.values())
    }
    if not states:
        return None
    fig = _new_figure(4.2 * len(states) + 0.4, 4.4)
    axes = fig.subplots(1, len(states), squeeze=False)[0]
    handles: dict[str, Any] = {}
    for ax, (state, groups) in zip(axes, states.items(), strict=True):
        groups = {g: x for g, x in groups.items() if len(x)}
        proj, ratio = _pca_2d(groups)
        for i, (g, xy) in enumerate(proj.items()):
            colour = _GROUP_COLOURS.get(g, _PALETTE[(i + 2) % len(_PALETTE)])
            handles[g] = ax.scatter(
                xy[:, 0], xy[:, 1], s=16, alpha=0.65, color=colour, edgecolors="none", label=g
            )
        ax.set_title(state)
        ax.set_xlabel(f"PC1 ({100 * ratio[0]:.0f}% var.)")
        ax.set_ylabel(f"PC2 ({100 * ratio[1]:.0f}% var.)")
        ax.grid(alpha=0.3)
    where = f"decoder layer {layer}" if layer is not None else "the chosen decoder layer"
    fig.suptitle(f"Hidden states of {where} at the last prompt token (PCA per state)")
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="outside lower center",
        ncols=max(1, len(handles)),
        frameon=False,
    )
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# documents

_PLOTS = (
    ("asr_utility", "Attack success and utility per model state"),
    ("loss_curves", "Loss curves of the removal run"),
    ("residual_asr", "Trigger-free stopping signal: residual entrapment ASR"),
    ("pca", "Hidden states with and without the trigger (2-D PCA)"),
)


_TABLE_NOTE = (
    "Shares in percent of prompts; perplexity on held-out benign answers; n/a: not measured."
)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(
    title: str,
    header: list[str],
    rows: list[list[str]],
    sizes: str,
    plots: list[tuple[str, str]],
    notes: list[str],
    manifest: list[tuple[str, str]],
) -> str:
    table = [
        "| " + " | ".join(_md_cell(h) for h in header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
        *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows),
    ]
    blocks = [f"# {title}", "## Results", "\n".join(table), _TABLE_NOTE]
    if sizes:
        blocks.append(sizes)
    if plots:
        blocks.append("## Plots")
        blocks += [f"![{caption}]({rel})" for caption, rel in plots]
    if notes:
        blocks += ["## Notes", "\n".join(f"- {n}" for n in notes)]
    if manifest:
        blocks += ["## Manifest", "\n".join(f"- {label}: `{text}`" for label, text in manifest)]
    return "\n\n".join(blocks) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1a1a1a;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #0072B2; padding-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: .35em .8em; }
th { background: #eef3f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.na { text-align: right; color: #888; }
figure { margin: 1em 0 1.8em; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #555; }
.small { font-size: .9em; color: #555; }
code { font-size: .92em; word-break: break-all; }
""".strip()


def _html(
    title: str,
    header: list[str],
    rows: list[list[str]],
    sizes: str,
    plots: list[tuple[str, Path]],
    notes: list[str],
    manifest: list[tuple[str, str]],
) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>",
        f"<style>\n{_CSS}\n</style></head>",
        "<body>",
        f"<h1>{e(title)}</h1>",
        "<h2>Results</h2>",
        '<table id="results">',
        "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead>",
        "<tbody>",
    ]
    for label, *cells in rows:
        tds = "".join(f'<td class="{"na" if c == NA else "num"}">{e(c)}</td>' for c in cells)
        out.append(f"<tr><th scope='row'>{e(label)}</th>{tds}</tr>")
    out += ["</tbody>", "</table>"]
    out.append(f'<p class="small">{e(_TABLE_NOTE)}</p>')
    if sizes:
        out.append(f'<p class="small">{e(sizes)}</p>')
    if plots:
        out.append("<h2>Plots</h2>")
        for caption, png in plots:
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{e(caption)}">'
                f"<figcaption>{e(caption)}</figcaption></figure>"
            )
    if notes:
        out += ["<h2>Notes</h2>", "<ul>", *(f"<li>{e(n)}</li>" for n in notes), "</ul>"]
    if manifest:
        out += ["<h2>Manifest</h2>", "<ul>"]
        out += [f"<li>{e(label)}: <code>{e(text)}</code></li>" for label, text in manifest]
        out.append("</ul>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def write_report(
    out_dir: Path,
    *,
    title: str,
    evals: dict[str, dict[str, Any]],
    history: dict[str, list[dict[str, Any]]],
    pca: dict[str, dict[str, np.ndarray]] | None,
    manifest: dict[str, Any],
    notes: list[str] | None = None,
) -> dict[str, Path]:
    """Write `report.md`, `report.html` and `plots/*.png` into `out_dir`; return their paths.

    `evals`: model state (e.g. "before", "after", "baseline", in display order) -> an eval dict
    as `beear eval --json` writes it, optionally with "perplexity" and "residual_asr"; missing
    keys (no trigger known, no perplexity measured) show as "n/a" and draw no bar.
    `history`: mode ("beear", "sft") -> the loop's per-step records (`step` plus any of `loss`,
    `safe_ce`, `anchor_ce`, `anchor_delta_ce`, `bee_loss`, `bee_unwanted_ce`, `delta_norm`,
    `check_asr`). `pca`: state -> {"plain": (N, d), "triggered": (N, d)} hidden states (see
    `hidden_points`), or None for no PCA plot. `manifest`: as `beear.pipeline.manifest` makes it;
    its "layer", if present, titles the PCA plot. `notes`: free text lines.

    Returns {"markdown", "html"} plus one key per plot written: "asr_utility", "loss_curves",
    "residual_asr", "pca". A plot without data (e.g. an empty history) is skipped, not drawn.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_dir = out_dir / "plots"
    drawn: dict[str, Path | None] = {
        "asr_utility": _plot_asr_utility(evals, plot_dir / "asr_utility.png"),
        "loss_curves": _plot_loss_curves(history, plot_dir / "loss_curves.png"),
        "residual_asr": _plot_residual_asr(history, plot_dir / "residual_asr.png"),
        "pca": (
            _plot_pca(pca, plot_dir / "pca.png", manifest.get("layer")) if pca is not None else None
        ),
    }
    paths = {name: p for name, p in drawn.items() if p is not None}
    plots = [(caption, paths[name]) for name, caption in _PLOTS if name in paths]

    header, rows = results_table(evals)
    sizes = _sample_sizes(evals)
    items = _manifest_items(manifest)
    notes = list(notes or [])
    md = _markdown(
        title,
        header,
        rows,
        sizes,
        [(c, p.relative_to(out_dir).as_posix()) for c, p in plots],
        notes,
        items,
    )
    (out_dir / "report.md").write_text(md, encoding="utf-8")
    page = _html(title, header, rows, sizes, plots, notes, items)
    (out_dir / "report.html").write_text(page, encoding="utf-8")
    return {"markdown": out_dir / "report.md", "html": out_dir / "report.html", **paths}
