"""A run's identity and its metrics across real kills (issue 13, parts 3 and 4): `learner.main` processes that
SIGKILL themselves at exact points (MOTIONNFT_KILL_AT), then resume. Every step appears in metrics.jsonl exactly
once; another run's checkpoints, or changed training math, are refused before anything starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
P, K = 2, 4  # configs/tiny_cpu.yaml: prompts per step, group size


def _main(tmp: Path, *args: str, kill_at: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MOTIONNFT_KILL_AT")}
    env.update(HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    if kill_at:
        env["MOTIONNFT_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "learner.main", "--config", str(ROOT / "configs/tiny_cpu.yaml"),
           "reward.judge_weight=0", "reward.flow_weight=1", "nft.group_min_std=-1", "nft.group_max_mean=2",
           "learner.steps=5", "checkpoint.every=2", f"checkpoint.dir={tmp / 'ckpt'}", f"logging.dir={tmp / 'run'}",
           *args]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)


def _steps(tmp: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_every_step_logged_once_across_kills_and_other_runs_refused(tmp_path):
    # 1. Killed after logging step 2, which no checkpoint covers yet (the last one is after step 1).
    first = _main(tmp_path, kill_at="after_log:2")
    assert first.returncode == -signal.SIGKILL, first.stdout[-2000:] + first.stderr[-2000:]
    assert _steps(tmp_path) == [0, 1, 2]
    run_id = json.loads((tmp_path / "ckpt" / "step_00000002" / "driver.json").read_text())["driver"]["run_id"]

    # 2. A fresh start into that checkpoint dir, and a resume with other training math, are refused at once.
    fresh = _main(tmp_path)
    assert fresh.returncode == 2 and "checkpoint.dir:" in fresh.stderr and "already holds checkpoints" in fresh.stderr
    changed = _main(tmp_path, "nft.beta=0.5", "data.seed=3", "cluster.rollout_workers=1", "--resume")
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert ("2 training-relevant key(s): data.seed: 0 in the checkpoint, 3 now; nft.beta: 1.0 in the checkpoint, "
            "0.5 now") in changed.stderr
    assert _steps(tmp_path) == [0, 1, 2]  # untouched by the refused starts

    # 3. Resumed (an operational key may change), killed between step 3's commit and its metrics line.
    second = _main(tmp_path, "cluster.rollout_workers=1", "--resume", kill_at="after_commit:3")
    assert second.returncode == -signal.SIGKILL, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"resumed from step_00000002: step 2, policy version 2, run {run_id}" in second.stdout
    assert _steps(tmp_path) == [0, 1, 2]  # step 2 redone and logged again in place of the old line; 3 lost so far

    # 4. Resumed again to the end: step 3's line comes from its checkpoint, step 4 is trained.
    third = _main(tmp_path, "--resume")
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert sum(r["groups/total"] for r in rows) * K == 5 * P * K  # every sample counted once
    assert [r["policy/version"] for r in rows] == [1, 2, 3, 4, 5]
    assert json.loads((tmp_path / "ckpt" / "step_00000005" / "driver.json").read_text())["driver"]["run_id"] == run_id

    # 5. --overwrite deletes the old run's checkpoints and starts a new run.
    over = _main(tmp_path, "learner.steps=1", "--overwrite")
    assert over.returncode == 0, over.stderr[-2000:]
    assert "--overwrite: deleted 3 checkpoint(s)" in over.stdout
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_00000001"]
    assert json.loads((tmp_path / "ckpt" / "step_00000001" / "driver.json").read_text())["driver"]["run_id"] != run_id
    assert _steps(tmp_path) == [0]
