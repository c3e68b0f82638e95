"""The elastic rollout pool's states on Ray (learner/driver/recovery.py WorkerPool): workers join, drain and leave.
Its decisions by hand: tests/unit/test_elastic.py; on Ray's real autoscaler: tests/system/test_autoscaler.py."""

from __future__ import annotations

import time

import pytest

from tests.fake_clock import Clock


def test_workers_join_drain_and_leave_the_pool(ray_cluster, capsys):
    from learner.driver.recovery import WorkerPool

    ray = ray_cluster

    class _Worker:
        def __init__(self, name: str, parity_ok: bool = True) -> None:
            self.name, self.parity_ok = name, parity_ok

        def ready(self) -> str:
            return self.name

        def where(self) -> str:
            return f"{self.name}: here"

        def prepare(self, version: int) -> float:
            if not self.parity_ok:
                raise RuntimeError(f"{self.name}: policy version {version} does not compute what the learner published")
            return 1e-7

    worker = ray.remote(num_cpus=0)(_Worker)  # defined here: pickled by value (this test module is not importable)
    clock = Clock()  # the join deadlines run on it: the test moves it past one instead of sleeping
    pool = WorkerPool("rollout", [worker.remote("rollout-0")], 10, 3600.0, clock=clock)
    prepare = lambda actor: actor.prepare.remote(3)  # noqa: E731
    joined = pool.add(worker.remote("rollout-1"), prepare, timeout_s=60)
    unplaceable = pool.add(worker.options(resources={"no_such_node": 1}).remote("rollout-2"), prepare, timeout_s=1)
    refused = pool.add(worker.remote("rollout-3", parity_ok=False), prepare, timeout_s=60)
    assert pool.size() == 4 and pool.up() == [0]  # joining workers take no work yet
    ray.wait([pool.joining[joined], pool.joining[refused]], num_returns=2)  # prepared, and refused (an error)
    clock.now += 1.5  # past the unplaceable worker's 1 s to join
    assert pool.up() == [0, joined]
    out = capsys.readouterr().out
    assert "rollout worker 1 joined the rollout pool (rollout-1: here, parity error 1e-07)" in out
    assert "rollout worker 2 did not join the pool in time" in out
    assert "rollout worker 3 could not join the pool (" in out and "does not compute what the learner" in out
    assert pool.removed == {unplaceable, refused} and pool.size() == 2

    assert pool.drain() == joined and pool.up() == [0] and pool.size() == 1
    assert pool.drain() is None  # the last worker up stays
    assert pool.release(in_use={joined}) == []  # one of its groups is still queued: it stays until trained on
    assert pool.release(in_use=set()) == [joined] and pool.live() == [0]
    deadline = time.monotonic() + 20  # ray.kill is asynchronous: the removed worker dies soon after
    while time.monotonic() < deadline:
        try:
            ray.get(pool.actors[joined].ready.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the removed worker still answers")
    pool.crashed(joined, clock(), RuntimeError("gone"))  # a removed worker's failure is no crash
    assert pool.crashes.total == 0 and pool.up() == [0]
    for actor in pool.actors:
        ray.kill(actor)
