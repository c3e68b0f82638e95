"""Statistics of a MotionEdit-Bench comparison (docs/evaluation.md): per-row win/tie/loss against a baseline,
means and win rates with percentile-bootstrap intervals, per category and overall. Pure numpy, no I/O.

Win rate: per row, candidate vs baseline on one score: win 1, tie 0.5 (|Δ| <= eval.tie_margin), loss 0; the
win rate is the mean over rows, so a policy compared with itself gets exactly 0.5. It is reported on Overall
(the rubric's mean) and on MAS, and with `eval.pairwise` on the judge's side-by-side preference (a win when it
is above 0.5: rewards/pairwise.py), with the mean preference; rows whose comparison failed are left out of
those two and counted (`pairwise_failed`).

Failed rows (the judge could not score the candidate's or the baseline's edit within its retry budget) carry no
rubric score: they are left out of every rubric mean and of the Overall win rate, and counted (`n_failed`);
MAS does not depend on the judge, so MAS means and the MAS win rate use every row. The candidate's and the
baseline's rubric means are taken over the same rows, so they stay paired.

Intervals: `eval.bootstrap_samples` resamples of the rows with replacement from `eval.bootstrap_seed`; the
interval is the (1 − c)/2 and (1 + c)/2 quantiles of the resampled means (c = eval.confidence). Every metric of
a group is resampled with the same rows, so candidate and baseline intervals come from the same draws, and
the result is a pure function of the rows and the config. (scipy.stats.bootstrap computes such intervals too;
these twenty lines keep every metric of a group on the same resampled rows and spare the service a dependency
on scipy, which nothing else here uses.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from motionnft_core.config import EvalConfig

RUBRIC_SCORES = ("fidelity", "preservation", "coherence", "overall")
ALL = "all"  # the group of every row, beside one group per category
BLOCK = 1000  # resamples drawn at once: bounds the index array to BLOCK x rows


@dataclass(frozen=True)
class Estimate:
    """A mean over `n` rows and its bootstrap interval [low, high]; all NaN when n = 0."""

    mean: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class GroupSummary:
    """One category's (or all rows') estimates by metric name, with its row and failed-row counts."""

    rows: int
    failed: int
    metrics: dict[str, Estimate]
    pairwise_failed: int = 0  # rows whose side-by-side comparison failed (of those that had one)


NO_ESTIMATE = Estimate(math.nan, math.nan, math.nan, 0)  # of no values: NaN, never 0


def outcomes(candidate: Sequence[float], baseline: Sequence[float], *, margin: float) -> np.ndarray:
    """Per row: 1.0 if candidate > baseline + margin, 0.0 if candidate < baseline − margin, else 0.5 (a tie)."""
    a, b = np.asarray(candidate, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"outcomes: candidate {a.shape} and baseline {b.shape} must be equal 1-D shapes")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("outcomes: non-finite scores (leave failed rows out before comparing)")
    if margin < 0:
        raise ValueError(f"outcomes: margin must be >= 0, got {margin}")
    diff = a - b
    return np.where(diff > margin, 1.0, np.where(diff < -margin, 0.0, 0.5))


def bootstrap_interval(
    values: Sequence[float], *, samples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (module docstring); deterministic given `seed`."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap_interval: expected a non-empty 1-D sequence, got shape {x.shape}")
    if samples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap_interval: samples {samples} must be >= 1, confidence {confidence} in (0, 1)")
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, BLOCK):
        count = min(BLOCK, samples - start)
        means[start : start + count] = x[rng.integers(0, x.size, size=(count, x.size))].mean(axis=1)
    low, high = np.quantile(means, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return float(low), float(high)


def estimate(values: Sequence[float], cfg: EvalConfig) -> Estimate:
    """Mean and bootstrap interval of `values` with the `eval.*` settings; NaN estimate for no values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return NO_ESTIMATE
    low, high = bootstrap_interval(x, samples=cfg.bootstrap_samples, confidence=cfg.confidence,
                                   seed=cfg.bootstrap_seed)  # fmt: skip
    return Estimate(float(x.mean()), low, high, int(x.size))


def summarize_group(rows: Sequence[Mapping[str, Any]], cfg: EvalConfig) -> GroupSummary:
    """Estimates of one group of paired rows.

    Each row needs `mas`, `baseline_mas`, `failed` (either side's judge failed) and, unless failed, the four
    RUBRIC_SCORES and their `baseline_` twins. Metrics: `mas`, `baseline_mas`, `win_mas`, each rubric score
    and its `baseline_` twin, and `win_overall`; and `pairwise` (mean preference) and `win_pairwise` when rows
    carry a side-by-side comparison (`pairwise`, `pairwise_failed`, `win_pairwise`); `mas_camera_compensated` and
    its `baseline_` twin when rows carry it (a run trained with reward.flow.camera_compensation).
    """
    scored = [r for r in rows if not r["failed"]]
    mas, base_mas = [r["mas"] for r in rows], [r["baseline_mas"] for r in rows]
    metrics = {"mas": estimate(mas, cfg), "baseline_mas": estimate(base_mas, cfg)}
    metrics["win_mas"] = estimate(outcomes(mas, base_mas, margin=cfg.tie_margin) if rows else [], cfg)
    compensated = [r for r in rows if r.get("mas_camera_compensated") is not None]  # camera-compensated runs only
    if compensated:
        metrics["mas_camera_compensated"] = estimate([r["mas_camera_compensated"] for r in compensated], cfg)
        metrics["baseline_mas_camera_compensated"] = estimate(
            [r["baseline_mas_camera_compensated"] for r in compensated], cfg)
    for name in RUBRIC_SCORES:
        metrics[name] = estimate([r[name] for r in scored], cfg)
        metrics[f"baseline_{name}"] = estimate([r[f"baseline_{name}"] for r in scored], cfg)
    overall = [r["overall"] for r in scored], [r["baseline_overall"] for r in scored]
    metrics["win_overall"] = estimate(outcomes(*overall, margin=cfg.tie_margin) if scored else [], cfg)
    compared = [r for r in rows if r.get("pairwise_failed") is not None]  # rows that had a comparison
    pairwise_failed = sum(bool(r["pairwise_failed"]) for r in compared)
    if compared:
        judged = [r for r in compared if not r["pairwise_failed"]]
        metrics["pairwise"] = estimate([r["pairwise"] for r in judged], cfg)
        metrics["win_pairwise"] = estimate([r["win_pairwise"] for r in judged], cfg)
    return GroupSummary(rows=len(rows), failed=len(rows) - len(scored), metrics=metrics,
                        pairwise_failed=pairwise_failed)  # fmt: skip


def summarize(rows: Sequence[Mapping[str, Any]], cfg: EvalConfig) -> dict[str, GroupSummary]:
    """`{"all": ..., <category>: ...}`: every row, then each category present (`category` None: no group), in
    sorted order."""
    groups = {ALL: summarize_group(rows, cfg)}
    for category in sorted({r["category"] for r in rows if r.get("category") is not None}):
        groups[category] = summarize_group([r for r in rows if r.get("category") == category], cfg)
    return groups
