"""The report of a MotionEdit-Bench comparison (`python -m evaluation.main compare`): Markdown with the
summaries, the settings that make the figures comparable (MAS parameters, judge model and prompt digest,
bootstrap), image grids and a plot.

Every figure is printed with its interval: means on their own scale (MAS 0-100, rubric 0-5) and win rates as
percentages, as the paper reports them (e.g. Kontext 53.73 MAS, 57.71 win rate). The judge's model name and
its prompt digest head every report, because rubric figures mean nothing without them; so do the MAS
parameters, which the paper did not publish (`eval.mas_*`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from motionnft_core.config import EvalConfig
from motionnft_core.eval_stats import ALL, NO_ESTIMATE, Estimate, GroupSummary

MAS_KEYS = ("mas_alpha", "mas_tau", "mas_d_min", "mas_d_max", "mas_eps", "mas_q", "mas_min_motion_ratio")
COMPARISON_COLUMNS = ("input", "target", "baseline", "candidate")
JUDGE_COUNTERS = ("requests", "retries", "timeouts", "connection_errors", "server_errors", "unparseable", "failures")


@dataclass(frozen=True)
class ReportInfo:
    """What was compared and how, beside the numbers: every field is printed in the report's header."""

    candidate: str
    baseline: str
    split: str
    judge_model: str
    prompt_digest: str
    sampling: dict[str, Any] = field(default_factory=dict)  # e.g. steps, seed, guidance / true CFG
    judge_metrics: dict[str, int] = field(default_factory=dict)  # JudgeClient.metrics after the run
    grids: list[str] = field(default_factory=list)  # PNG paths relative to the report
    plots: list[str] = field(default_factory=list)


def _interval(e: Estimate, scale: float = 1.0, digits: int = 2) -> str:
    if e.n == 0 or math.isnan(e.mean):
        return "n/a"
    return f"{e.mean * scale:.{digits}f} [{e.low * scale:.{digits}f}, {e.high * scale:.{digits}f}]"


def _has_pairwise(groups: Mapping[str, GroupSummary]) -> bool:
    return any("win_pairwise" in g.metrics for g in groups.values())


def summary_table(groups: Mapping[str, GroupSummary]) -> str:
    """Markdown table: one line per group (all rows first), candidate and baseline means, win rates in %; for a run
    trained with camera compensation, the object-motion MAS of both (MotionEdit-Bench's MAS stays as published); with
    a side-by-side comparison, its win rate in % and the mean preference (0.5 = none)."""
    pairwise = _has_pairwise(groups)
    camera = any("mas_camera_compensated" in g.metrics for g in groups.values())
    head = ("| group | rows | failed | MAS | MAS baseline | MAS win rate % | Overall | Overall baseline | "
            "Overall win rate % | Fidelity | Preservation | Coherence |")  # fmt: skip
    if camera:
        head += " MAS camera-compensated | baseline |"
    if pairwise:
        head += " side-by-side win rate % | preference | side-by-side failed |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, g in groups.items():
        m = g.metrics
        cells = [
            "**all**" if name == ALL else name, str(g.rows), str(g.failed),
            _interval(m["mas"]), _interval(m["baseline_mas"]), _interval(m["win_mas"], 100),
            _interval(m["overall"]), _interval(m["baseline_overall"]), _interval(m["win_overall"], 100),
            _interval(m["fidelity"]), _interval(m["preservation"]), _interval(m["coherence"]),
        ]  # fmt: skip
        if camera:
            cells += [_interval(m.get("mas_camera_compensated", NO_ESTIMATE)),
                      _interval(m.get("baseline_mas_camera_compensated", NO_ESTIMATE))]  # fmt: skip
        if pairwise:
            win, preference = m.get("win_pairwise", NO_ESTIMATE), m.get("pairwise", NO_ESTIMATE)
            cells += [_interval(win, 100), _interval(preference, 1, 3), str(g.pairwise_failed)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_grid(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    edits: torch.Tensor | Sequence[torch.Tensor],
    path: Path,
    scale: int = 1,
    labels: Sequence[str] = (),
) -> Path:
    """PNG with one row per example: input | ground truth | edit [| edit ...] (one edit column per batch in
    `edits`, e.g. the base policy's and each checkpoint's), each cell (H*scale, W*scale); uint8 (N, 3, H, W).
    `labels`: one per column, drawn in a white band of LABEL_BAND px above it (clipped to the column's width), so
    the picture says what each column is on its own."""
    edit_batches = [edits] if isinstance(edits, torch.Tensor) else list(edits)
    batches = [inputs, targets, *edit_batches]
    if not edit_batches or any(b.shape != inputs.shape or b.dtype != torch.uint8 for b in batches) or inputs.ndim != 4:
        raise ValueError(
            "write_grid needs uint8 (N, 3, H, W) batches of one shape, got "
            + ", ".join(f"{tuple(b.shape)} {b.dtype}" for b in batches)
        )
    if scale < 1:
        raise ValueError(f"grid scale must be >= 1, got {scale}")
    if labels and len(labels) != len(batches):
        raise ValueError(f"write_grid: {len(labels)} labels for {len(batches)} columns")
    rows = torch.cat(batches, dim=3)  # (N, 3, H, C*W)
    grid = torch.cat(list(rows), dim=1)  # (3, N*H, C*W)
    image = Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy())
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    if labels:
        image = _labelled(image, labels, inputs.shape[3] * scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


LABEL_BAND = 14  # px above a labelled grid: PIL's default bitmap font is 11 px high


def _labelled(image: Image.Image, labels: Sequence[str], column: int) -> Image.Image:
    """`image` under a white band with `labels[c]` at the left of column c (each clipped to its column)."""
    out = Image.new("RGB", (image.width, image.height + LABEL_BAND), "white")
    out.paste(image, (0, LABEL_BAND))
    font = ImageFont.load_default()  # bundled with Pillow: nothing to download
    for c, label in enumerate(labels):
        cell = Image.new("RGB", (column, LABEL_BAND), "white")
        ImageDraw.Draw(cell).text((2, 1), label, fill="black", font=font)
        out.paste(cell, (c * column, 0))
    return out


def format_report(groups: Mapping[str, GroupSummary], info: ReportInfo, cfg: EvalConfig) -> str:
    """The whole report as Markdown (module docstring)."""
    everything = groups[ALL]
    counters = ", ".join(f"{k} {info.judge_metrics.get(k, 0)}" for k in JUDGE_COUNTERS)
    sampling = ", ".join(f"{k} {v!r}" for k, v in info.sampling.items()) or "n/a"
    mas = ", ".join(f"eval.{k} = {getattr(cfg, k):.6g}" for k in MAS_KEYS)
    lines = [
        f"# MotionEdit-Bench: {info.candidate} vs {info.baseline}",
        "",
        f"- candidate: `{info.candidate}`; baseline: `{info.baseline}`",
        f"- split: `{info.split}`, {everything.rows} rows; sampling: {sampling}",
        f"- judge: **{info.judge_model}**, prompt digest `{info.prompt_digest}` (rewards/judge_prompts.py); "
        f"judge calls of this invocation (a resumed run counts its own): {counters}",
        f"- failed rows (the judge could not score the candidate or the baseline within its retry budget): "
        f"{everything.failed} of {everything.rows}, left out of the rubric means and the Overall win rate "
        "(MAS uses every row)",
        f"- MAS parameters (not published; config defaults say why): {mas}",
        *([f"- side by side: the judge saw [input, baseline's edit, candidate's edit] and the reverse order and "
           f"chose the better edit (rewards/pairwise.py); the preference averages both orders, so a position bias "
           f"cancels; {everything.pairwise_failed} of {everything.rows} rows failed and are left out of it"]
          if _has_pairwise(groups) else []),
        f"- intervals: {cfg.confidence:.0%} percentile bootstrap over rows, {cfg.bootstrap_samples} resamples, "
        f"seed {cfg.bootstrap_seed}; a tie is |Δ| <= {cfg.tie_margin:g} (win 1, tie 0.5, loss 0)",
        "",
        "## Summary",
        "",
        summary_table(groups),
    ]
    if info.plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in info.plots]
    if info.grids:
        lines += ["", "## Edits (input | target | baseline | candidate)", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in info.grids]
    return "\n".join(lines) + "\n"


def write_report(path: str | Path, groups: Mapping[str, GroupSummary], info: ReportInfo, cfg: EvalConfig) -> Path:
    """`format_report` to `path` (Markdown); prints nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_report(groups, info, cfg))
    return path


def plot_win_rates(groups: Mapping[str, GroupSummary], path: str | Path) -> Path:
    """Bar chart of the MAS, Overall (and side-by-side) win rates (%) per group with their intervals; 50 % marked
    (a tie)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(names)), 3.5), dpi=100)
    bars = [("win_mas", "MAS"), ("win_overall", "Overall")] + ([("win_pairwise", "side by side")]
                                                               if _has_pairwise(groups) else [])  # fmt: skip
    width = 0.8 / len(bars)
    for b, (key, label) in enumerate(bars):
        offset = (b - (len(bars) - 1) / 2) * width
        est = [groups[n].metrics.get(key, NO_ESTIMATE) for n in names]
        means = [100 * e.mean if e.n else 0.0 for e in est]
        errors = [[100 * (e.mean - e.low) if e.n else 0.0 for e in est],
                  [100 * (e.high - e.mean) if e.n else 0.0 for e in est]]  # fmt: skip
        ax.bar([i + offset for i in range(len(names))], means, width=width, yerr=errors, capsize=3, label=label)
    ax.axhline(50, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(names)), [n.replace("/", "/\n") for n in names], fontsize=7)
    ax.set_ylabel("win rate vs baseline (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def comparison_grid(
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    baselines: Sequence[torch.Tensor],
    candidates: Sequence[torch.Tensor],
    path: str | Path,
    scale: int = 1,
) -> Path:
    """The report's grid: one row per example, input | target | baseline | candidate (uint8 (3, H, W) each),
    the columns labelled on the picture."""
    stack = [torch.stack(list(images)) for images in (inputs, targets, baselines, candidates)]
    return write_grid(stack[0], stack[1], stack[2:], Path(path), scale=scale, labels=COMPARISON_COLUMNS)
