"""A run's identity, its metrics and its learner across real kills (parts 2, 3 and 4): `learner.main`
processes that SIGKILL themselves at exact points (MOTIONNFT_KILL_AT) or lose a learner rank to a SIGKILL, then
go on. Every step appears in metrics.jsonl exactly once; another run's checkpoints, or changed training math,
are refused before anything starts; a lost rank is rebuilt in the same process."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from tests import harness

pytestmark = pytest.mark.slow
P, K = 2, 4  # configs/tiny_cpu.yaml: prompts per step, group size
RANK_LOST_AFTER = 2  # the driver holds once this step is logged; a learner rank is SIGKILLed there


def _args(tmp: Path, *args: str) -> list[str]:
    return ["reward.judge_weight=0", "reward.flow_weight=1", "nft.group_min_std=-1", "nft.group_max_mean=2",
            "learner.steps=5", "checkpoint.every=2", f"checkpoint.dir={tmp / 'ckpt'}", f"logging.dir={tmp / 'run'}",
            *args]  # fmt: skip


def _main_at_once(tmp: Path, *runs: tuple[str, ...]) -> list[harness.Finished]:
    """Several starts at the same time (each with its own args), e.g. starts that must all be refused."""
    drivers = [harness.start(*_args(tmp, *args)) for args in runs]
    try:
        return [d.wait(timeout_s=420) for d in drivers]
    finally:
        for d in drivers:
            d.kill()


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


def _main_losing_a_rank(tmp: Path, *args: str, after_step: int) -> tuple[harness.Finished, list[int]]:
    """A run of which learner rank 1 is SIGKILLed while the driver holds right after logging step `after_step`
    (MOTIONNFT_HOLD_AT after_log:<step>): the next learner call finds the rank gone."""
    faults, point = tmp / "hold", f"after_log:{after_step}"
    killed: list[int] = []

    def kill_a_rank() -> None:
        ranks = _learner_ranks(driver.pid)
        if len(ranks) == 2:
            os.kill(ranks[1], signal.SIGKILL)
            killed.append(ranks[1])

    driver = harness.start(*_args(tmp, *args), env=harness.hold_env(faults, point))
    return harness.act_at_hold(driver, faults, point, kill_a_rank), killed


def test_every_step_logged_once_across_kills_a_lost_rank_and_refused_starts(tmp_path):
    # 1. Killed between step 1's checkpoint commit and its metrics line.
    first = harness.run(*_args(tmp_path), env={"MOTIONNFT_KILL_AT": "after_commit:1"}, timeout_s=420)
    assert first.returncode == -signal.SIGKILL, first.stdout[-2000:] + first.stderr[-2000:]
    assert harness.steps_logged(tmp_path / "run") == [0]
    run_id = harness.driver_state(tmp_path / "ckpt", step=2)["run_id"]

    # 2. A fresh start into that checkpoint dir, and a resume with other training math, are refused at once.
    other_math = ("nft.beta=0.5", "data.seed=3", "cluster.rollout_workers=1", "--resume")
    fresh, changed = _main_at_once(tmp_path, (), other_math)
    assert fresh.returncode == 2 and "checkpoint.dir:" in fresh.stderr and "already holds checkpoints" in fresh.stderr
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert ("2 training-relevant key(s): data.seed: 0 in the checkpoint, 3 now; nft.beta: 1.0 in the checkpoint, "
            "0.5 now") in changed.stderr
    assert harness.steps_logged(tmp_path / "run") == [0]  # untouched by the refused starts

    # 3. Resumed (step 1's line comes from its checkpoint; operational keys may change: here the rollout pool
    #    becomes elastic from 1 worker, and regrows at once to the 2 it had at the checkpoint), and a learner rank
    #    is SIGKILLed while the driver holds right after logging step 2: the group is rebuilt in-process and the
    #    run goes on from the latest checkpoint (step_00000002: the next is saved after step 3), redoing (and
    #    relogging in place) step 2; the rollout pool stays as it is.
    elastic = ("cluster.rollout_workers=1", "cluster.rollout_workers_max=2", "cluster.rollout_scale_patience=1000")
    resumed, killed = _main_losing_a_rank(tmp_path, *elastic, "--resume", after_step=RANK_LOST_AFTER)
    out = resumed.stdout + resumed.stderr
    assert killed, "no learner rank was found to kill"
    assert resumed.returncode == 0, out[-4000:]
    assert f"resumed from step_00000002: step 2, policy version 2, run {run_id}" in out
    assert out.count("rollout pool: adding rollout-1 (the pool had 2 workers at the checkpoint)") == 1
    assert "rollout worker 1 could not join" not in out and "rollout worker 1 did not join" not in out
    found = re.search(r"a learner rank is gone \((\w+).*rebuilding the learner group "
                      r"\(recovery 1 of 3 within 3600 s\), then going on from step_(\d+)", out)  # fmt: skip
    assert found, out[-3000:]
    assert found.group(1) in ("ActorDiedError", "RayActorError")
    assert found.group(2) == "00000002"  # the latest checkpoint when the rank died: step 3's comes after step 3
    assert out.count("rebuilding the learner group") == 1
    rows = harness.metrics_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert sum(r["groups/total"] for r in rows) * K == 5 * P * K  # every sample counted once
    assert [r["policy/version"] for r in rows] == [1, 2, 3, 4, 5]
    driver = harness.driver_state(tmp_path / "ckpt")  # the final checkpoint's
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step_*"))[-1] == "step_00000005"
    assert driver["run_id"] == run_id and driver["rollout_workers"] == 2
