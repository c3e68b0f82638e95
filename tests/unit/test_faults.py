"""Fault injection (motionnft_core/faults.py): the stall spec, a SIGKILL at an exact point, once per marker dir, and
a hold at an exact point that waits for the test to let it go."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from motionnft_core import faults
from motionnft_core.faults import fault_point, stall_at
from tests import harness

ROOT = Path(__file__).resolve().parents[2]


def test_stall_spec():
    spec = "rollout.sample:0-2=1.5, learner.rank0.train_step:4=2,rollout.sample:2=0.5"
    assert [stall_at(spec, "rollout.sample", n) for n in range(4)] == [1.5, 1.5, 2.0, 0.0]
    assert stall_at(spec, "learner.rank0.train_step", 4) == 2.0
    assert stall_at(spec, "learner.rank1.train_step", 4) == 0.0
    with pytest.raises(ValueError, match="MOTIONNFT_SLOW_AT: 'rollout.sample=1'"):
        stall_at("rollout.sample=1", "rollout.sample", 0)


def _reach(point: str, n: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    """A fresh process that reaches fault point `point:n`, then prints PASSED."""
    code = f"from motionnft_core.faults import fault_point; fault_point({point!r}, {n}); print('PASSED')"
    env = {**harness.driver_env(), "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_kill_at_sigkills_at_that_point_only_and_once_per_marker_dir(tmp_path):
    env = {"MOTIONNFT_KILL_AT": "after_log:1,reward.score:3", "MOTIONNFT_FAULT_DIR": str(tmp_path)}
    assert _reach("after_log", 0, env).stdout == "PASSED\n"  # another n: nothing
    killed = _reach("reward.score", 3, env)
    assert killed.returncode == -signal.SIGKILL and "SIGKILL at reward.score:3" in killed.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reward.score:3"]
    assert _reach("reward.score", 3, env).stdout == "PASSED\n"  # a restarted process goes past it


def test_hold_waits_at_that_point_until_released_and_holds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MOTIONNFT_HOLD_AT", "after_log:2")
    monkeypatch.setenv("MOTIONNFT_FAULT_DIR", str(tmp_path))
    fault_point("after_log", 1)  # not the held point: returns at once
    reached = threading.Event()

    def reach() -> None:
        fault_point("after_log", 2)
        reached.set()

    thread = threading.Thread(target=reach, daemon=True)
    thread.start()
    harness.wait_held(tmp_path, "after_log:2", timeout_s=10)
    time.sleep(0.3)
    assert not reached.is_set()  # held: the test kills what it kills now
    harness.release(tmp_path, "after_log:2")
    assert reached.wait(timeout=10)
    began = time.monotonic()
    fault_point("after_log", 2)  # held once: a second arrival (a restarted worker) goes past
    assert time.monotonic() - began < 0.5


def test_a_hold_needs_its_marker_dir_and_gives_up_past_its_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("MOTIONNFT_HOLD_AT", "after_log:0")
    monkeypatch.delenv("MOTIONNFT_FAULT_DIR", raising=False)
    with pytest.raises(RuntimeError, match="MOTIONNFT_HOLD_AT=after_log:0: set MOTIONNFT_FAULT_DIR"):
        fault_point("after_log", 0)
    monkeypatch.setenv("MOTIONNFT_FAULT_DIR", str(tmp_path))
    with pytest.raises(TimeoutError, match="held at after_log:0 for 0 s and nobody made"):
        faults.hold("after_log:0", max_s=0.1)


def test_a_held_driver_that_exits_fails_the_wait(tmp_path):
    driver = harness.start("-c", "pass", module="this_module_does_not_exist", config=None)
    with pytest.raises(AssertionError, match="exited .* before it held at after_log:0"):
        harness.wait_held(tmp_path, "after_log:0", driver, timeout_s=60)
    driver.kill()
