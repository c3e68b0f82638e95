"""A run's identity, its metrics and its learner across real kills (issue 13, parts 2, 3 and 4): `learner.main`
processes that SIGKILL themselves at exact points (MOTIONNFT_KILL_AT) or lose a learner rank to a SIGKILL, then
go on. Every step appears in metrics.jsonl exactly once; another run's checkpoints, or changed training math,
are refused before anything starts; a lost rank is rebuilt in the same process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
P, K = 2, 4  # configs/tiny_cpu.yaml: prompts per step, group size


def _command(tmp: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MOTIONNFT_KILL_AT")}
    env.update(HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "learner.main", "--config", str(ROOT / "configs/tiny_cpu.yaml"),
           "reward.judge_weight=0", "reward.flow_weight=1", "nft.group_min_std=-1", "nft.group_max_mean=2",
           "learner.steps=5", "checkpoint.every=2", f"checkpoint.dir={tmp / 'ckpt'}", f"logging.dir={tmp / 'run'}",
           *args]  # fmt: skip
    return cmd, env


def _main(tmp: Path, *args: str, kill_at: str = "") -> subprocess.CompletedProcess:
    cmd, env = _command(tmp, *args)
    if kill_at:
        env["MOTIONNFT_KILL_AT"] = kill_at
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)


def _main_at_once(tmp: Path, *runs: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Several starts at the same time (each with its own args), e.g. starts that must all be refused."""
    procs = []
    for args in runs:
        cmd, env = _command(tmp, *args)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))  # fmt: skip
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=420)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def _steps(tmp: Path) -> list[int]:
    path = tmp / "run" / "metrics.jsonl"
    return [json.loads(x)["step"] for x in (path.read_text() if path.exists() else "").splitlines() if x.strip()]


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _learner_ranks(driver: int) -> list[int]:
    """This run's learner rank processes (Ray names them `ray::LearnerWorker...`), found below its driver."""
    ranks = []
    for pid in _descendants(driver):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::LearnerWorker"):
                ranks.append(pid)
        except OSError:
            pass
    return sorted(ranks)


def _main_losing_a_rank(tmp: Path, *args: str, after_step: int) -> tuple[subprocess.CompletedProcess, list[int]]:
    """A run of which one learner rank is SIGKILLed once step `after_step` is logged."""
    cmd, env = _command(tmp, *args)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed: list[int] = []

    def kill_a_rank() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and after_step not in _steps(tmp):
            time.sleep(0.2)
        ranks = _learner_ranks(proc.pid)
        if len(ranks) == 2:
            os.kill(ranks[1], signal.SIGKILL)
            killed.append(ranks[1])

    watcher = threading.Thread(target=kill_a_rank, daemon=True)
    watcher.start()
    out, err = proc.communicate(timeout=480)
    watcher.join(timeout=5)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), killed


def test_every_step_logged_once_across_kills_a_lost_rank_and_refused_starts(tmp_path):
    # 1. Killed between step 1's checkpoint commit and its metrics line.
    first = _main(tmp_path, kill_at="after_commit:1")
    assert first.returncode == -signal.SIGKILL, first.stdout[-2000:] + first.stderr[-2000:]
    assert _steps(tmp_path) == [0]
    run_id = json.loads((tmp_path / "ckpt" / "step_00000002" / "driver.json").read_text())["driver"]["run_id"]

    # 2. A fresh start into that checkpoint dir, and a resume with other training math, are refused at once.
    other_math = ("nft.beta=0.5", "data.seed=3", "cluster.rollout_workers=1", "--resume")
    fresh, changed = _main_at_once(tmp_path, (), other_math)
    assert fresh.returncode == 2 and "checkpoint.dir:" in fresh.stderr and "already holds checkpoints" in fresh.stderr
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert ("2 training-relevant key(s): data.seed: 0 in the checkpoint, 3 now; nft.beta: 1.0 in the checkpoint, "
            "0.5 now") in changed.stderr
    assert _steps(tmp_path) == [0]  # untouched by the refused starts

    # 3. Resumed (step 1's line comes from its checkpoint; operational keys may change: here the rollout pool
    #    becomes elastic from 1 worker, and regrows at once to the 2 it had at the checkpoint), and a learner rank
    #    is SIGKILLed once step 2 is logged: the group is rebuilt in-process and the run goes on from the latest
    #    checkpoint, redoing (and relogging in place) the steps after it; the rollout pool stays as it is.
    elastic = ("cluster.rollout_workers=1", "cluster.rollout_workers_max=2", "cluster.rollout_scale_patience=1000")
    resumed, killed = _main_losing_a_rank(tmp_path, *elastic, "--resume", after_step=2)
    out = resumed.stdout + resumed.stderr
    assert killed, "no learner rank was found to kill"
    assert resumed.returncode == 0, out[-4000:]
    assert f"resumed from step_00000002: step 2, policy version 2, run {run_id}" in out
    assert out.count("rollout pool: adding rollout-1 (the pool had 2 workers at the checkpoint)") == 1
    assert "rollout worker 1 could not join" not in out and "rollout worker 1 did not join" not in out
    found = re.search(r"a learner rank is gone \((\w+).*rebuilding the learner group "
                      r"\(recovery 1 of 3 within 3600 s\), then going on from step_(\d+)", out)  # fmt: skip
    assert found, out[-3000:]
    assert found.group(1) in ("ActorDiedError", "RayActorError") and int(found.group(2)) in (2, 4)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert sum(r["groups/total"] for r in rows) * K == 5 * P * K  # every sample counted once
    assert [r["policy/version"] for r in rows] == [1, 2, 3, 4, 5]
    driver = json.loads((tmp_path / "ckpt" / "step_00000005" / "driver.json").read_text())["driver"]
    assert driver["run_id"] == run_id and driver["rollout_workers"] == 2
