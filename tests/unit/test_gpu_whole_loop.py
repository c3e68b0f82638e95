"""bench/gpu_whole_loop.py's pure parts: the summary lines and what each check reads from a run's outputs."""

from __future__ import annotations

import json

from bench.gpu_whole_loop import (
    Report,
    check_backend,
    check_checkpoints,
    check_driver_cuda,
    check_memory_probe,
    check_parity,
    check_resume,
    fp8_verdict,
    summary_line,
)


def test_one_line_per_check_and_the_jsonl(tmp_path, capsys):
    report = Report(tmp_path, "CPU test")
    report.run("ok", lambda: (True, "2 steps", {"seconds": 1.5}))
    report.run("bad", lambda: (False, "exit 1", {}))
    report.run("skip", lambda: "skipped: no GPU")
    report.run("boom", lambda: 1 / 0)
    assert capsys.readouterr().out.splitlines() == [
        "check ok: pass 2 steps", "check bad: FAIL exit 1", "check skip: skipped: no GPU",
        "check boom: FAIL ZeroDivisionError: division by zero"]  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "checks.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["pass", "fail", "skipped", "fail"] and rows[0]["seconds"] == 1.5
    assert report.failed == ["bad", "boom"] and all(r["device"] == "CPU test" for r in rows)
    assert summary_line({"check": "x", "status": "pass"}) == "check x: pass"


def test_the_learner_group_must_be_nccl_on_a_gpu_and_gloo_on_a_cpu():
    log = "(LearnerWorker pid=1) learner process group: gloo backend, 1 ranks, on cpu\n"
    assert check_backend(log, gpu=False)[0] and not check_backend(log, gpu=True)[0]
    assert check_backend(log.replace("gloo", "nccl"), gpu=True)[0]
    assert not check_backend("nothing", gpu=False)[0]


def test_driver_cuda_parity_and_resume_read_metrics():
    rows = [{"step": 0, "driver/cuda_initialized": 0.0, "parity/max_error": 0.01},
            {"step": 1, "driver/cuda_initialized": 0.0, "parity/max_error": 0.02}]  # fmt: skip
    assert check_driver_cuda(rows)[0] and not check_driver_cuda([*rows, {"driver/cuda_initialized": 1.0}])[0]
    assert not check_driver_cuda([{"step": 0}])[0]  # missing: not a pass
    assert check_parity(rows, 3e-2)[0] and not check_parity(rows, 1e-2)[0] and not check_parity([{}], 1)[0]
    assert check_resume([*rows, {"step": 2}], 0, 2)[0]
    assert not check_resume([*rows, {"step": 1}, {"step": 2}], 0, 2)[0]  # a step logged twice
    assert not check_resume([*rows, {"step": 2}], 1, 2)[0]


def test_memory_probe_line_and_checkpoints(tmp_path):
    line = "learner micro-batch 3 of 4 samples per rank, from free memory (peaks 10.5 / 12.0 GiB at 1 / 2 samples)"
    ok, detail, values = check_memory_probe(f"(LearnerWorker pid=7) {line}")
    assert ok and values["micro_batch"] == 3 and "10.5 / 12.0 GiB" in detail
    assert not check_memory_probe("learner micro-batch 2")[0]
    (tmp_path / "step_00000001").mkdir()
    (tmp_path / "step_00000001" / "driver.json").write_text("{}")
    assert check_checkpoints(tmp_path, [1])[0] and not check_checkpoints(tmp_path, [1, 2])[0]


def test_the_step_bench_passes_on_fp8_within_the_cpu_tests_tolerance():
    layouts = {"reference": {"samples_per_s": 0.3}, "ours+compile+fp8": {"samples_per_s": 0.44}}
    record = {"ratio": 1.45, "layouts": layouts,
              "fp8_effect": {"x0_rel_err": 0.01, "v_old_rel_err": 0.02, "v_ref_rel_err": 0.02}}  # fmt: skip
    ok, detail, values = fp8_verdict(record)
    assert ok and "ratio 1.45 (target 1.4)" in detail and "x0_rel_err 0.01" in detail and values["ratio"] == 1.45
    assert not fp8_verdict({**record, "fp8_effect": {**record["fp8_effect"], "x0_rel_err": 0.05}})[0]
    assert not fp8_verdict({**record, "fp8_effect": {"error": "RuntimeError('no fp8')"}})[0]
    no_fp8 = {**record, "layouts": {**record["layouts"], "ours+compile+fp8": {"error": "x"}}}
    assert not fp8_verdict(no_fp8)[0] and "ours+compile+fp8 failed" in fp8_verdict(no_fp8)[1]
