"""Crash accounting of rollout and reward workers (learner/driver/recovery.py): unlimited restarts, a cap per window."""

from __future__ import annotations

import pytest

from learner.driver.recovery import Crashes, WorkerCrashLoop
from motionnft_core.config import ClusterConfig, ConfigError
from tests.fake_clock import Clock


def test_crashes_past_the_window_never_add_up():
    clock = Clock()
    crashes = Crashes("rollout", limit=2, window_s=100.0, clock=clock)
    for t in range(0, 1000, 60):  # a crash a minute: never more than two within 100 s
        clock.now = float(t)
        assert crashes.record(0, sent_at=clock.now - 1, error=RuntimeError("killed"))
    assert crashes.total == 17  # no lifetime cap


def test_a_crash_loop_stops_with_the_worker_named():
    clock = Clock()
    crashes = Crashes("reward", limit=2, window_s=100.0, clock=clock)
    for t in (0.0, 10.0):
        clock.now = t
        crashes.record(1, sent_at=t - 1, error=RuntimeError("x"))
    clock.now = 20.0
    with pytest.raises(WorkerCrashLoop, match=r"reward worker 1 crashed 3 times within 100 s .*last error: boom"):
        crashes.record(1, sent_at=19.0, error=RuntimeError("boom\ntraceback"))
    crashes.record(0, sent_at=19.0, error=RuntimeError("x"))  # the other worker has its own count


def test_tasks_queued_on_a_worker_when_it_died_count_as_that_one_crash():
    clock = Clock()
    crashes = Crashes("rollout", limit=1, window_s=100.0, clock=clock)
    clock.now = 50.0
    assert crashes.record(0, sent_at=40.0, error=RuntimeError("killed"))
    clock.now = 51.0
    assert not crashes.record(0, sent_at=40.0, error=RuntimeError("killed"))  # sent before the crash: the same
    assert not crashes.record(0, sent_at=49.9, error=RuntimeError("killed"))
    assert crashes.total == 1
    clock.now = 60.0
    with pytest.raises(WorkerCrashLoop):  # sent after it: a new crash, the second within the window
        crashes.record(0, sent_at=55.0, error=RuntimeError("again"))


def test_crash_config_is_checked():
    with pytest.raises(ConfigError, match="cluster.worker_crashes"):
        ClusterConfig(worker_crashes=-1)
    with pytest.raises(ConfigError, match="cluster.crash_window_s"):
        ClusterConfig(crash_window_s=0)


def test_first_line_is_the_headline_or_the_error_type():
    from motionnft_core.errors import first_line

    assert first_line(RuntimeError("actor died\n  Traceback ...")) == "actor died"
    assert first_line(RuntimeError("")) == "RuntimeError"
