"""The motion-lever ablation (bench/ablation_levers.py) stays alive: its short version (one seed, two steps, 8 held-out
rows) of the learning demo for the plain recipe and all three levers together (each lever's own code path runs in
`all`; one run per lever would add minutes to the suite), on the demo's shipped data without a pan (the warm start
the suite builds anyway), trains, evaluates with `evaluation.main heldout` and writes the JSON and the table with a
paired MAS gain (the full ablation is a bench command, docs/levers.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import harness

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
VARIANTS = ("baseline", "all")


def test_short_ablation_writes_a_paired_gain_per_lever(demo_cache, tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "bench/ablation_levers.py", "--variants", *VARIANTS, "--seeds", "0", "--steps", "2",
           "--pan-share", "0", "--eval-limit", "8", "--work", str(tmp_path / "runs"), "--cache", str(demo_cache),
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=harness.driver_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "ablation_levers.json").read_text())
    summary = result["summary"]
    assert sorted(summary) == sorted(VARIANTS)
    rows = result["setup"]["rows_per_seed"]
    for variant in VARIANTS[1:]:
        e = summary[variant]
        assert e["rows"] == rows and e["paired_seeds"] == [0]
        assert e["mas_gain"]["low"] <= e["mas_gain"]["mean"] <= e["mas_gain"]["high"]
        assert 0.0 <= e["win_rate"]["mean"] <= 1.0
    assert {"reward/preservation/score", "reward/flow/camera"} <= set(summary["all"]["metrics"])
    table = (out / "ablation_levers.md").read_text()
    assert all(f"| {v} |" in table for v in VARIANTS)
