"""The GPU benchmark's tiny CPU mode and the scale simulation's: the same scripts, the same code paths, so they
never rot (the cost models by hand: tests/unit/test_bench_costs.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_gpu_whole_loop_cpu_mode_runs_every_check_that_needs_no_gpu(tmp_path):
    """bench/gpu_whole_loop.py --device cpu: the real `learner.main` (tiny model, gloo) for 2 steps with a
    checkpoint and export after each and a resume for a third; the GPU-only checks say so."""
    cmd = [sys.executable, "bench/gpu_whole_loop.py", str(tmp_path), "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = (tmp_path / "whole_loop.log").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("check ")]
    rows = [json.loads(line) for line in (tmp_path / "checks.jsonl").read_text().splitlines()]
    assert len(lines) == len(rows) and [r["check"] for r in rows] == [
        "imports", "cuda_transfer", "model", "run", "learner_process_group", "driver_never_initialises_cuda",
        "parity_probe", "memory_probe", "checkpoint", "export", "resume", "step_bench_flux_kontext"]  # fmt: skip
    skipped = {r["check"] for r in rows if r["status"] == "skipped"}
    assert skipped == {"cuda_transfer", "memory_probe", "step_bench_flux_kontext"}
    assert all(r["status"] == "pass" for r in rows if r["check"] not in skipped)
    assert "check learner_process_group: pass gloo backend, 1 rank(s)" in proc.stdout
    assert "steps logged [0, 1, 2]" in proc.stdout
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["driver/cuda_initialized"] for m in metrics] == [0.0, 0.0, 0.0]


def test_train_step_bench_tiny_mode_reports_every_phase_and_the_ratio(tmp_path):
    results = tmp_path / "train_step.jsonl"
    cmd = [sys.executable, "bench/train_step.py", "--size", "tiny", "--fp8", "--results", str(results)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ratio" in proc.stdout
    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert record["size"] == "tiny" and record["device"].startswith("CPU") and record["group"] == 2
    assert set(record["layouts"]) == {"reference", "ours", "ours+fp8"}
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
    fastest = max(r["samples_per_s"] for name, r in record["layouts"].items() if name != "reference")
    assert record["ratio"] == pytest.approx(fastest / ref["samples_per_s"])
    step = record["solver_step"]
    assert step["layout"] == "ours" and step["rows"] == 4  # the rollout's call: micro-batch 8, 2 groups of 2
    assert step["step_over_forward"] == pytest.approx(step["solver_step_s"] / step["forward_s"])
    assert record["fp8_copies_gib"] > 0  # made at the start, so every layout's memory counts them
    effect = record["fp8_effect"]  # FP8 moved the candidates and the reference velocities, a little
    assert 0 < effect["x0_rel_err"] < 0.03 and 0 < effect["v_old_rel_err"] < 0.03 and 0 < effect["v_ref_rel_err"] < 0.03
    # Its rewards, with and without FP8, are flow rewards of the same groups: in [0, 1], and the mean change per
    # candidate is at least the change of the means (the mean of |r8 - r| bounds |mean r8 - mean r|).
    assert 0 <= effect["reward_mean"] <= 1 and 0 <= effect["reward_mean_fp8"] <= 1
    assert effect["reward_abs_diff"] >= abs(effect["reward_mean_fp8"] - effect["reward_mean"]) - 1e-6


def test_scale_sim_ci_mode_runs_the_real_loop_on_simulated_gpus(tmp_path):
    """The real driver and pools on 3 simulated GPUs (a Ray resource), the overlapped loop, model calls held at half
    the measured GPU durations: the run completes, names itself a simulation and reports the loop's throughput,
    the driver's overhead and the calls that overran their hold (the full bench adds the sequential loop)."""
    results = tmp_path / "scale_sim.jsonl"
    cmd = [sys.executable, "bench/scale_sim.py", "--ci", "--results", str(results)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("SIMULATION")]
    assert len(lines) == 3, proc.stdout  # the costs, the 8-GPU prediction, the run
    assert "per-call GPU seconds" in lines[0] and "samples/s" in lines[2]
    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert record["simulation"] is True and record["predicted"][0]["gpus"] == 8
    (sim,) = record["simulated"]
    assert (sim["rollout"], sim["reward"], sim["learner"]) == (1, 1, 1) and "sequential" not in sim
    run = sim["overlapped"]
    assert run["samples_per_s"] > 0 and 0 < run["driver_overhead"] < 1 and run["timed_steps"] == 1
    assert sim["calls"] > 0 and 0 <= sim["calls_overran"] <= 1
