"""The GPU benchmark's tiny CPU mode: the same script, the same code path, so it never rots (issue 16)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.train_step import attention_flops, choose_micro_batch

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def test_train_step_bench_tiny_mode_reports_every_phase_and_the_ratio(tmp_path):
    results = tmp_path / "train_step.jsonl"
    cmd = [sys.executable, "bench/train_step.py", "--size", "tiny", "--results", str(results)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ratio" in proc.stdout
    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert record["size"] == "tiny" and record["device"].startswith("CPU") and record["group"] == 2
    assert set(record["layouts"]) == {"reference", "ours"}
    for layout in record["layouts"].values():
        assert set(layout["phases"]) == {"rollout", "reward", "learner"}
        for phase in layout["phases"].values():
            assert phase["seconds"] > 0 and 0 <= phase["outside_model_share"] < 1
            assert phase["tflops_per_s"] > 0  # true FLOPs were counted
        assert layout["samples_per_s"] == pytest.approx(4 / layout["seconds"])  # P * K = 2 * 2 samples
    # The reference layout's learner also runs v_old and v_ref: 3 forwards per timestep against ours' 1.
    ref, ours = record["layouts"]["reference"], record["layouts"]["ours"]
    assert ref["flops_per_group"]["learner"] > 2 * ours["flops_per_group"]["learner"]
    assert ours["flops_per_group"]["rollout"] > ref["flops_per_group"]["rollout"]
    assert record["ratio"] == pytest.approx(ours["samples_per_s"] / ref["samples_per_s"])


@pytest.mark.parametrize(
    ("peak_1", "peak_2", "budget", "expected"),
    [
        (30 * GIB, 40 * GIB, 72 * GIB, 4),  # base 20 + 10/sample: 4 -> 60 fits, 8 -> 100 does not
        (30 * GIB, 40 * GIB, 130 * GIB, 8),
        (30 * GIB, 40 * GIB, 45 * GIB, 2),
        (30 * GIB, 40 * GIB, 20 * GIB, 1),  # nothing fits: the smallest, and the run shows the OOM
        (30 * GIB, 30 * GIB, 31 * GIB, 8),  # no growth measured: the largest
    ],
)
def test_learner_micro_batch_from_free_memory(peak_1, peak_2, budget, expected):
    assert choose_micro_batch(peak_1, peak_2, budget) == expected


def test_attention_flops_count_grouped_heads_at_the_query_heads():
    """2 products of b·h·s_q·s_k·d each, 2 FLOPs per multiply-add: 2·2·28·100·80·(128 + 128) = 229,376,000, the
    same for 4 grouped key/value heads as for 28 (each query head still attends over all 80 keys)."""
    q = (2, 28, 100, 128)
    assert attention_flops(q, (2, 28, 80, 128), (2, 28, 80, 128)) == 229_376_000
    assert attention_flops(q, (2, 4, 80, 128), (2, 4, 80, 128)) == 229_376_000
