"""A real judge outage in a real run (part 1): `learner.main` with the tiny vLLM judge, whose server
process group is SIGKILLed at an exact point, while the reward worker holds before scoring step 1's first group.
With a short retry budget and no restart in sight, the run checkpoints its last completed step and stops naming
the judge's error, and a resume then finishes the run with every step logged once. (A killed judge that the
service restarts while the step waits: tests/system/test_survival.py.)"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import uuid
from pathlib import Path

import pytest

from tests import harness

pytestmark = pytest.mark.slow
P = 2  # configs/tiny_cpu.yaml: groups per step, each one reward.score call of the (single) reward worker
JUDGE_LOST_AT = f"reward.score:{P + 1}"  # the first group of step 1: the judge dies right before it is scored


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


def _run(tmp: Path, name: str, *args: str, kill_judge: bool = False) -> harness.Finished:
    """One run; with `kill_judge`, the reward worker holds at JUDGE_LOST_AT while the judge's whole process group
    is SIGKILLed, then goes on (motionnft_core/faults.py MOTIONNFT_HOLD_AT)."""
    args = (f"reward.judge.served_model_name={name}", "nft.group_min_std=-1", "nft.group_max_mean=2",
            "checkpoint.every=0", f"checkpoint.dir={tmp / 'ckpt'}", f"logging.dir={tmp / 'run'}",
            f"reward.judge.log_dir={tmp / 'judge-logs'}",
            "cluster.learner_ranks=1", "cluster.rollout_workers=1", *args)  # fmt: skip  (the judge is the point)
    if not kill_judge:
        return harness.run(*args, timeout_s=600)
    faults = tmp / "hold"

    def kill() -> None:
        group = _judge_group(name)
        assert group is not None, f"no judge server process serves {name}"
        os.killpg(group, signal.SIGKILL)

    driver = harness.start(*args, env=harness.hold_env(faults, JUDGE_LOST_AT))
    return harness.act_at_hold(driver, faults, JUDGE_LOST_AT, kill)


def test_past_the_budget_the_run_checkpoints_and_stops_then_resumes(tmp_path):
    name = f"judge-{uuid.uuid4().hex[:8]}"
    never = "reward.judge.restart_backoff_s=10000"  # no restart within this test
    proc = _run(tmp_path, name, "learner.steps=4", "reward.judge.retry_budget_s=3", never, kill_judge=True)
    out = proc.output
    assert proc.returncode == 1, out[-4000:]
    # Step 1's groups were not scored when the judge died (the reward worker held before the first of them, and
    # the second queued behind it): step 1 stops the run; step 0 is logged once and checkpointed.
    found = re.search(r"could not score (\d) group\(s\) of step (\d) within reward.judge.retry_budget_s=3s", out)
    assert found, out[-4000:]
    assert found.groups() == (str(P), "1") and "cannot reach http://127.0.0.1:" in out  # the judge's own error
    assert f"checkpointed the last completed step at {tmp_path / 'ckpt' / 'step_00000001'}" in out
    assert harness.steps_logged(tmp_path / "run") == [0]
    assert _judge_group(name) is None

    again = _run(tmp_path, name, "learner.steps=4", "--resume")
    assert again.returncode == 0, again.tail()
    assert "resumed from step_00000001: step 1, policy version 1" in again.stdout
    assert harness.steps_logged(tmp_path / "run") == [0, 1, 2, 3]
    # reward.judge.log_dir: one vLLM log per run's replica, there and not in the temp dir.
    logs = sorted((tmp_path / "judge-logs").glob(f"vllm-{name}-*.log"))
    assert len(logs) == 2 and all("Application startup complete" in p.read_text() for p in logs)
    assert not list(Path(tempfile.gettempdir()).glob(f"vllm-{name}-*.log"))
