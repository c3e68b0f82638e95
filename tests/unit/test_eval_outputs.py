"""The outputs of an evaluation: the resumable per-row parquet table (evaluation/table.py) and the
Markdown report with its grid and plot (evaluation/report.py). Plain files, no models."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from evaluation.report import (
    COMPARISON_COLUMNS,
    LABEL_BAND,
    ReportInfo,
    comparison_grid,
    format_report,
    plot_win_rates,
    write_grid,
    write_report,
)
from evaluation.table import ScoreStore, pair_rows, read_rows, score_row, write_rows
from motionnft_core.config import EvalConfig
from motionnft_core.eval_stats import ALL, summarize

IDS = [f"ex{i}" for i in range(5)]
CATEGORY = {i: ("Pose/Posture" if n % 2 else "Locomotion/Distance") for n, i in enumerate(IDS)}


def _scores(policy: str, example_id: str) -> dict:
    """A deterministic fake score: the candidate beats the baseline on MAS for even rows; ex3's judge fails."""
    n = IDS.index(example_id)
    mas = 50.0 + (5.0 if policy == "candidate" and n % 2 == 0 else 0.0)
    terms = {"mas": mas, "d_mag": 0.1 * n, "d_dir": 0.05, "distance": 0.2, "motion_ratio": 1.0, "static": 0.0}
    if example_id == "ex3" and policy == "candidate":
        rubric = {"fidelity": None, "preservation": None, "coherence": None, "overall": None, "digit_probs": None,
                  "attempts": 4, "failed": True, "error": "judge failed after 4 attempt(s): timeout"}  # fmt: skip
    else:
        value = 3.0 + (0.5 if policy == "candidate" else 0.0)
        probs = {k: [0.0, 0.0, 0.0, 1.0, 0.0, 0.0] for k in ("fidelity", "preservation", "coherence")}
        rubric = {"fidelity": value, "preservation": value, "coherence": value, "overall": value,
                  "digit_probs": probs, "attempts": 3, "failed": False, "error": ""}  # fmt: skip
    return score_row(policy, example_id, CATEGORY[example_id], 42, terms, rubric)


def _run(store: ScoreStore, calls: list[tuple[str, str]], *, crash_after: int | None = None, chunk: int = 2):
    """What the command does: score the pending ids of each policy, a chunk at a time; optionally crash."""
    for policy in ("baseline", "candidate"):
        pending = store.pending(policy, IDS)
        for start in range(0, len(pending), chunk):
            rows = []
            for example_id in pending[start : start + chunk]:
                if crash_after is not None and len(calls) == crash_after:
                    raise RuntimeError("killed")
                calls.append((policy, example_id))
                rows.append(_scores(policy, example_id))
            store.append(rows)


def test_a_crash_then_a_rerun_scores_every_row_once_and_matches_an_uninterrupted_run(tmp_path):
    calls: list[tuple[str, str]] = []
    crashed = ScoreStore(tmp_path / "crashed" / "scores")
    with pytest.raises(RuntimeError, match="killed"):
        _run(crashed, calls, crash_after=8)  # candidate ex2 scored, killed at ex3: that chunk is never written
    (crashed.directory / ".chunk-000004.parquet.tmp").write_bytes(b"PAR1 torn write")  # a write cut off
    _run(crashed, calls)
    assert set(calls) == {(p, i) for p in ("baseline", "candidate") for i in IDS}
    assert [c for c in set(calls) if calls.count(c) > 1] == [("candidate", "ex2")]  # only the unsaved row again
    assert crashed.table().num_rows == 2 * len(IDS)
    whole = ScoreStore(tmp_path / "whole" / "scores")
    _run(whole, [], chunk=3)  # another chunking: the same rows, in the ids' order
    margin = EvalConfig().tie_margin
    a, b = pair_rows(crashed.table(), IDS, margin=margin), pair_rows(whole.table(), IDS, margin=margin)
    assert a == b
    write_rows(a, tmp_path / "a.parquet")
    write_rows(b, tmp_path / "b.parquet")
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))
    _run(crashed, calls)  # a third run finds nothing to do
    assert len(calls) == 2 * len(IDS) + 1


def test_paired_rows_carry_terms_scores_probabilities_and_win_tie_loss(tmp_path):
    store = ScoreStore(tmp_path / "scores")
    _run(store, [])
    rows = pair_rows(store.table(), IDS, margin=0.0)
    by_id = {r["id"]: r for r in rows}
    assert [r["id"] for r in rows] == IDS
    assert by_id["ex0"]["win_mas"] == 1.0 and by_id["ex1"]["win_mas"] == 0.5  # 55 vs 50; 50 vs 50
    assert by_id["ex0"]["win_overall"] == 1.0 and by_id["ex0"]["baseline_overall"] == 3.0
    ex3 = by_id["ex3"]
    assert ex3["failed"] and ex3["judge_failed"] and not ex3["baseline_judge_failed"]
    assert ex3["overall"] is None and ex3["win_overall"] is None and "timeout" in ex3["judge_error"]
    assert ex3["win_mas"] == 0.5  # MAS needs no judge
    assert by_id["ex1"]["p_coherence"] == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert (by_id["ex4"]["seed"], by_id["ex4"]["category"], by_id["ex4"]["d_mag"]) == (42, "Locomotion/Distance", 0.4)
    path = write_rows(rows, tmp_path / "out" / "rows.parquet")
    assert read_rows(path) == rows and not list(path.parent.glob(".*.tmp"))
    with pytest.raises(KeyError, match="'ex9' has no candidate or baseline row"):
        pair_rows(store.table(), ["ex9"], margin=0.0)


def test_store_keeps_the_first_row_of_a_pair_and_refuses_unknown_policies(tmp_path):
    store = ScoreStore(tmp_path)
    first = _scores("baseline", "ex0")
    store.append([first])
    store.append([{**first, "mas": 0.0}])  # a racing second run's duplicate
    assert store.table()["mas"].to_pylist() == [50.0]
    assert store.pending("baseline", IDS) == IDS[1:] and store.append([]) is None
    with pytest.raises(ValueError, match="policy 'other'"):
        store.append([{**first, "policy": "other"}])


def test_report_names_the_judge_the_mas_parameters_and_the_failed_rows(tmp_path):
    store = ScoreStore(tmp_path / "scores")
    _run(store, [])
    cfg = EvalConfig(bootstrap_samples=200)
    groups = summarize(pair_rows(store.table(), IDS, margin=cfg.tie_margin), cfg)
    assert list(groups) == [ALL, "Locomotion/Distance", "Pose/Posture"]
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    grid = comparison_grid([image] * 2, [image + 1] * 2, [image + 2] * 2, [image + 3] * 2, tmp_path / "grid.png")
    plot = plot_win_rates(groups, tmp_path / "win_rates.png")
    info = ReportInfo(candidate="runs/x/step_30", baseline="base", split="held-out (data.eval_fraction 0.1)",
                      judge_model="Qwen2.5-VL-32B-Instruct (/models/qwen)", prompt_digest="abc123def456",
                      sampling={"steps": 28, "seed": 42, "guidance": 2.5}, judge_metrics={"retries": 7},
                      grids=[grid.name], plots=[plot.name])  # fmt: skip
    text = write_report(tmp_path / "report.md", groups, info, cfg).read_text()
    assert "**Qwen2.5-VL-32B-Instruct (/models/qwen)**" in text and "`abc123def456`" in text
    for key in ("mas_alpha = 0.7", "mas_tau = 0.002", "mas_d_min = 0.00398107", "mas_d_max = 1", "mas_eps = 1e-06",
                "mas_q = 0.4", "mas_min_motion_ratio = 0.01"):  # fmt: skip
        assert f"eval.{key}" in text
    assert "1 of 5, left out of the rubric means" in text and "retries 7" in text and "steps 28" in text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + len(groups)  # the header, then one line per group
    everything = lines[1].split(" | ")
    assert everything[1:3] == ["5", "1"] and everything[3].startswith("53.00 [")  # (3 * 55 + 2 * 50) / 5
    assert everything[5].startswith("80.00 [")  # MAS win rate: (1 + .5 + 1 + .5 + 1) / 5 = 80 %
    assert everything[8].startswith("100.00 [")  # Overall win rate over the 4 judged rows: 100 %
    assert format_report(groups, info, cfg) == text  # deterministic
    assert "![grid](grid.png)" in text and "![win_rates](win_rates.png)" in text


def test_grid_columns_are_input_target_baseline_candidate(tmp_path):
    images = [torch.full((3, 4, 6), v, dtype=torch.uint8) for v in (10, 20, 30, 40)]
    path = comparison_grid(*[[im] * 3 for im in images], tmp_path / "grid.png", scale=2)
    px = np.asarray(Image.open(path).convert("L"))
    assert px.shape == (LABEL_BAND + 3 * 4 * 2, 4 * 6 * 2)  # a band of column labels above the rows
    assert [int(px[LABEL_BAND, c * 12]) for c in range(4)] == [10, 20, 30, 40]


def test_grid_columns_are_labelled_on_the_picture(tmp_path):
    """Each column's name is drawn above it (PIL's default font), so the picture reads without the report."""
    images = [torch.full((3, 32, 32), v, dtype=torch.uint8) for v in (10, 20, 30, 40)]
    image = Image.open(comparison_grid(*[[im] * 2 for im in images], tmp_path / "grid.png", scale=3)).convert("L")
    column = 32 * 3
    assert image.size == (4 * column, LABEL_BAND + 2 * column)

    def drawn(label: str) -> np.ndarray:
        cell = Image.new("L", (column, LABEL_BAND), 255)
        ImageDraw.Draw(cell).text((2, 1), label, fill=0, font=ImageFont.load_default())
        return np.asarray(cell)

    assert COMPARISON_COLUMNS == ("input", "target", "baseline", "candidate")
    for c, label in enumerate(COMPARISON_COLUMNS):
        band = np.asarray(image.crop((c * column, 0, (c + 1) * column, LABEL_BAND)))
        assert (band < 128).sum() > 20, label  # text, not an empty band
        assert np.array_equal(band, drawn(label)), label
        assert not np.array_equal(band, drawn(COMPARISON_COLUMNS[c - 1])), label


def test_grid_labels_must_name_every_column(tmp_path):
    a = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="2 labels for 3 columns"):
        write_grid(a, a, a, tmp_path / "x.png", labels=["input", "target"])


def test_win_rate_plot_of_no_rows_is_a_png(tmp_path):
    plot = Image.open(plot_win_rates(summarize([], EvalConfig(bootstrap_samples=10)), tmp_path / "p.png"))
    assert plot.format == "PNG"


def test_a_camera_compensated_run_adds_its_object_motion_mas_beside_the_published_one(tmp_path):
    """Rows scored for a run trained with reward.flow.camera_compensation carry `mas_camera_compensated` (and its
    baseline twin): the report adds the column; MAS itself is untouched, and runs without it show no such column."""
    store = ScoreStore(tmp_path / "scores")
    rows = []
    for policy in ("baseline", "candidate"):
        for n, example_id in enumerate(IDS):
            row = _scores(policy, example_id)
            row["mas_camera_compensated"] = 60.0 + n + (10.0 if policy == "candidate" else 0.0)
            rows.append(row)
    store.append(rows)
    paired = pair_rows(store.table(), IDS, margin=0.0)
    plain = pair_rows(_store_of(tmp_path / "plain"), IDS, margin=0.0)
    assert [r["mas"] for r in paired] == [r["mas"] for r in plain]
    assert [r["mas_camera_compensated"] for r in paired] == [70.0 + n for n in range(5)]
    assert [r["baseline_mas_camera_compensated"] for r in paired] == [60.0 + n for n in range(5)]
    groups = summarize(paired, EvalConfig(bootstrap_samples=200))
    assert groups[ALL].metrics["mas_camera_compensated"].mean == 72.0
    assert groups[ALL].metrics["baseline_mas_camera_compensated"].mean == 62.0
    from evaluation.report import summary_table

    assert "MAS camera-compensated" in summary_table(groups)
    plain_groups = summarize(plain, EvalConfig(bootstrap_samples=200))
    assert "mas_camera_compensated" not in plain_groups[ALL].metrics
    assert "camera" not in summary_table(plain_groups)


def _store_of(directory):
    store = ScoreStore(directory)
    store.append([_scores(p, i) for p in ("baseline", "candidate") for i in IDS])
    return store.table()
