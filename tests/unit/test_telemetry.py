"""The Ray metrics schema and its plain parts (motionnft_core/telemetry.py), without Ray. The series themselves are
scraped from a live cluster's Prometheus endpoint: the driver's, rollouts', reward worker's and learner ranks' in
tests/system/test_e2e.py (two steps of the main job), the judge client's in tests/ray/test_reward_worker.py (live
vLLM)."""

from __future__ import annotations

import pytest

from motionnft_core import telemetry
from rewards.judge import EVENT_KEYS, METRIC_KEYS
from tests.fake_clock import Clock


def test_busy_fraction_is_the_share_of_wall_time_in_calls_since_the_last_report():
    clock = Clock(100.0)
    busy = telemetry.Busy(clock)
    with busy.call():  # the first window starts with the first call: loading a model is not idling
        clock.now += 2.0
    assert busy.last == 1.0
    clock.now += 3.0  # idle
    with busy.call():
        clock.now += 1.0
    assert busy.last == pytest.approx(1.0 / 4.0)


def test_overlapping_calls_of_an_async_actor_count_once():
    clock = Clock(100.0)
    busy = telemetry.Busy(clock)
    with busy.call():
        clock.now += 1.0
    clock.now += 4.0  # idle, then two calls overlap for 1 s of a 2 s busy stretch
    first = busy.call()
    first.__enter__()
    clock.now += 1.0
    with busy.call():
        clock.now += 1.0
    assert busy.last == 1.0  # not reported while a call is still in flight
    first.__exit__(None, None, None)
    assert busy.last == pytest.approx(2.0 / 6.0)


def test_a_wrong_kind_or_tag_fails_also_without_ray():
    with pytest.raises(ValueError, match="motionnft_queue_groups is a gauge tagged \\('queue',\\)"):
        telemetry.gauge(telemetry.QUEUE, 1.0, stage="reward")
    with pytest.raises(ValueError, match="is a counter"):
        telemetry.observe(telemetry.SAMPLES, 1.0)
    with pytest.raises(KeyError):
        telemetry.gauge("motionnft_not_a_series", 1.0)


def test_the_driver_exports_the_numeric_scalars_of_its_step_line(monkeypatch):
    seen = {}
    monkeypatch.setattr(telemetry, "gauge", lambda name, value, key: seen.update({key: (name, value)}))
    telemetry.export_step({"reward/mean": 0.5, "groups/valid": 2, "prompts": ["a", "b"], "flag": True})
    assert seen == {"reward/mean": (telemetry.STEP, 0.5), "groups/valid": (telemetry.STEP, 2.0)}


def test_prometheus_names_are_what_ray_exports():
    names = telemetry.prometheus_names()
    assert {"ray_motionnft_step", "ray_motionnft_samples_total", "ray_motionnft_judge_latency_seconds_bucket",
            "ray_motionnft_phase_seconds_sum", "ray_motionnft_phase_seconds_count"} <= names  # fmt: skip
    assert all(s.name.startswith(telemetry.PREFIX) for s in telemetry.SERIES.values())
    assert all(bool(s.buckets) == (s.kind == "histogram") for s in telemetry.SERIES.values())


def test_every_judge_event_is_a_counter_the_client_keeps():
    assert set(EVENT_KEYS) < set(METRIC_KEYS)
    assert {"requests", "retries", "timeouts", "failures"} <= set(EVENT_KEYS)
    assert not {k for k in EVENT_KEYS if k.endswith(("_max", "_sum")) or k.startswith("peak_")}
