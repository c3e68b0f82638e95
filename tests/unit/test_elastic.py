"""The elastic rollout pool's measurements and decisions (learner/driver/elastic.py), by hand. Its states on Ray:
tests/ray/test_elastic_pool.py; a run on Ray's real autoscaler: tests/system/test_autoscaler.py."""

from __future__ import annotations

import pytest

from learner.driver.elastic import RolloutScaler, rollout_load
from motionnft_core.config import ClusterConfig, ConfigError


def _meta(worker: str, done_at: float, call_s: float, groups: int = 1) -> list[dict]:
    return [{"worker": worker, "done_at": done_at, "call_s": call_s}] * groups


def test_rollout_load_counts_each_call_once():
    # Two workers; the step began at t=100 and took 10 s. rollout-0 sampled 2 groups in one 4 s call that ended
    # at 104, rollout-1 one group in a 6 s call that ended at 107: the driver waited 7 s of 10 on rollouts, and
    # the workers sampled (4 + 6) / (2 * 10) of the step.
    meta = _meta("rollout-0", 104.0, 4.0, groups=2) + _meta("rollout-1", 107.0, 6.0)
    assert rollout_load(meta, 100.0, 10.0, 2) == pytest.approx((0.7, 0.5))
    # Sampled ahead (done before the step began): no wait; an idle third worker lowers the busy fraction.
    assert rollout_load(_meta("rollout-0", 95.0, 3.0), 100.0, 10.0, 3) == pytest.approx((0.0, 0.1))
    assert rollout_load([], 100.0, 10.0, 2) == (0.0, 0.0)


def _scaler(**kw) -> RolloutScaler:
    return RolloutScaler(ClusterConfig(**{"rollout_workers": 1, "rollout_workers_max": 3, **kw}))


def test_scaler_grows_after_patience_and_stops_at_the_bounds():
    s = _scaler(rollout_scale_patience=2)
    assert s.decide(1, wait=0.8, busy=0.8, settling=False) == 0  # one slow step: not yet
    assert s.decide(1, wait=0.8, busy=0.8, settling=False) == 1
    assert s.decide(2, wait=0.8, busy=0.8, settling=True) == 0  # the new worker is joining: its effect unknown
    assert s.decide(2, wait=0.8, busy=0.8, settling=False) == 0  # patience counts again from the join
    assert s.decide(2, wait=0.8, busy=0.8, settling=False) == 1
    assert s.decide(3, wait=0.9, busy=0.9, settling=False) == 0
    assert s.decide(3, wait=0.9, busy=0.9, settling=False) == 0  # at rollout_workers_max
    assert s.decide(3, wait=0.8, busy=0.6, settling=False) == 0  # a fast step breaks the run of slow ones...


def test_scaler_shrinks_when_rollouts_idle_down_to_the_minimum():
    s = _scaler(rollout_workers=2, rollout_workers_min=1, rollout_scale_patience=1)
    assert s.decide(2, wait=0.0, busy=0.3, settling=False) == 0  # busy exactly at the threshold: stays
    assert s.decide(2, wait=0.0, busy=0.1, settling=False) == -1
    assert s.decide(1, wait=0.0, busy=0.1, settling=False) == 0  # at rollout_workers_min
    assert s.decide(1, wait=0.5, busy=0.5, settling=False) == 0  # wait must exceed rollout_grow_wait


def test_a_fixed_pool_never_changes():
    s = RolloutScaler(ClusterConfig(rollout_workers=2))
    assert not s.elastic
    assert [s.decide(2, wait=1.0, busy=0.0, settling=False) for _ in range(5)] == [0] * 5
    assert s.regrow(2, carried=4) == 0  # a resumed fixed pool is the size the config says


def test_a_resumed_elastic_pool_regrows_to_its_checkpointed_size_within_todays_bounds():
    s = _scaler(rollout_workers=2, rollout_workers_min=1, rollout_workers_max=5)
    assert s.regrow(2, carried=4) == 2  # it had 4 workers when the checkpoint was saved: 2 join at once
    assert s.regrow(2, carried=9) == 3  # rollout_workers_max is 5 now
    assert s.regrow(2, carried=1) == 0  # it had shrunk below today's start: the scaler drains if rollouts idle
    assert s.regrow(2, carried=0) == 0  # a checkpoint from before the size was kept


@pytest.mark.parametrize(("kw", "key"), [
    ({"rollout_workers": 2, "rollout_workers_max": 1}, "cluster.rollout_workers_max"),
    ({"rollout_workers": 2, "rollout_workers_min": 3}, "cluster.rollout_workers_min"),
    ({"rollout_grow_wait": 0.0}, "cluster.rollout_grow_wait"),
    ({"rollout_shrink_busy": 1.0}, "cluster.rollout_shrink_busy"),
    ({"rollout_scale_patience": 0}, "cluster.rollout_scale_patience"),
])  # fmt: skip
def test_bad_bounds_are_refused_naming_the_key(kw, key):
    with pytest.raises(ConfigError, match=key):
        ClusterConfig(**kw)
