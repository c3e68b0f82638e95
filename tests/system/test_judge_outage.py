"""A real judge outage in a real run (issue 13, part 1): `learner.main` with the tiny vLLM judge, whose server
process group is SIGKILLed mid-run. With a short retry budget and no restart in sight, the run checkpoints its
last completed step and stops naming the judge's error, and a resume then finishes the run with every step
logged once. (A killed judge that the service restarts while the step waits: tests/system/test_survival.py.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _judge_group(name: str) -> int | None:
    """The process group of the vLLM server serving `name`: its supervisor (`python -c ...`) leads it."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 2 and argv[1] == b"-c" and name.encode() in argv:
            return int(pid)
    return None


def _steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(x)["step"] for x in text.splitlines() if x.strip()]


def _run(tmp: Path, name: str, *args: str, kill_after_step: int | None = None
         ) -> tuple[subprocess.CompletedProcess, float | None]:  # fmt: skip
    """One run; with `kill_after_step`, the judge's whole process group is SIGKILLed once that step is logged."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "learner.main", "--config", str(ROOT / "configs/tiny_cpu.yaml"),
           f"reward.judge.served_model_name={name}", "nft.group_min_std=-1", "nft.group_max_mean=2",
           "checkpoint.every=0", f"checkpoint.dir={tmp / 'ckpt'}", f"logging.dir={tmp / 'run'}",
           f"reward.judge.log_dir={tmp / 'judge-logs'}",
           "cluster.learner_ranks=1", "cluster.rollout_workers=1", *args]  # fmt: skip  (the judge is the point)
    killed_at: list[float] = []

    def kill() -> None:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and kill_after_step not in _steps_logged(tmp / "run"):
            time.sleep(0.2)
        group = _judge_group(name)
        if group is not None:
            os.killpg(group, signal.SIGKILL)
            killed_at.append(time.monotonic())

    watcher = threading.Thread(target=kill, daemon=True) if kill_after_step is not None else None
    if watcher:
        watcher.start()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if watcher:
        watcher.join(timeout=5)
    return proc, (killed_at[0] if killed_at else None)


def test_past_the_budget_the_run_checkpoints_and_stops_then_resumes(tmp_path):
    name = f"judge-{uuid.uuid4().hex[:8]}"
    never = "reward.judge.restart_backoff_s=10000"  # no restart within this test
    proc, killed = _run(tmp_path, name, "learner.steps=4", "reward.judge.retry_budget_s=3", never, kill_after_step=0)
    out = proc.stdout + proc.stderr
    assert killed is not None and proc.returncode == 1, out[-4000:]
    # The first step whose groups were not yet scored when the judge died (step 1, or a later one if its
    # rewards were already in) stops the run; the steps before it are logged once and checkpointed.
    found = re.search(r"could not score (\d) group\(s\) of step (\d) within reward.judge.retry_budget_s=3s", out)
    assert found, out[-4000:]
    stopped = int(found.group(2))
    assert 1 <= stopped <= 3 and "cannot reach http://127.0.0.1:" in out  # the judge's own error, through Ray
    assert f"checkpointed the last completed step at {tmp_path / 'ckpt' / f'step_{stopped:08d}'}" in out
    assert _steps_logged(tmp_path / "run") == list(range(stopped))
    assert _judge_group(name) is None

    again, _ = _run(tmp_path, name, "learner.steps=4", "--resume")
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert f"resumed from step_{stopped:08d}: step {stopped}, policy version {stopped}" in again.stdout
    assert _steps_logged(tmp_path / "run") == [0, 1, 2, 3]
    # reward.judge.log_dir: one vLLM log per run's replica, there and not in the temp dir.
    logs = sorted((tmp_path / "judge-logs").glob(f"vllm-{name}-*.log"))
    assert len(logs) == 2 and all("Application startup complete" in p.read_text() for p in logs)
    assert not list(Path(tempfile.gettempdir()).glob(f"vllm-{name}-*.log"))
