"""The elastic rollout pool: one worker more while the learner waits on rollouts, one fewer while they idle.

After every step the driver measures two fractions of the step's wall time: how long it waited for the step's
last rollout (`wait`; 0 when the rollouts were done before the step began, sampled ahead), and how much of it the
rollout workers spent sampling (`busy`, summed over workers, per worker). `cluster.rollout_scale_patience` steps
in a row of wait > `cluster.rollout_grow_wait` add a worker (up to `cluster.rollout_workers_max`), of busy <
`cluster.rollout_shrink_busy` remove one (down to `cluster.rollout_workers_min`). One change at a time: while a
worker joins or drains, its effect is not measured yet, so nothing else changes. A resumed run's pool starts at
`cluster.rollout_workers`, the size that start-up checks can place, and the workers it had beyond that when its
checkpoint was saved join at once, as added ones do.

A new worker asks for the same resources as the others; on an autoscaling cluster its pending actor is what makes
the autoscaler add a node, and a removed worker's idle node is what it removes. The new worker loads the current
weights and passes the parity probe (`RolloutWorker.prepare`) before it takes work; a removed worker first drains:
it gets no new groups and is killed once none of its groups is still waiting for the learner, so no group is lost.
The seeds of a group depend on its step and prompt only, so which worker samples it changes nothing.
"""

from __future__ import annotations

from motionnft_core.config import ClusterConfig


def rollout_load(meta: list[dict], began: float, step_s: float, workers: int) -> tuple[float, float]:
    """(wait, busy) of one step: `meta` of its groups (their worker, wall-clock `done_at` and the call's wall time
    `call_s`; groups of one call share them), `began` the step's wall-clock start, `workers` the pool's workers up
    during the step."""
    if not meta or step_s <= 0:
        return 0.0, 0.0
    calls = {(m["worker"], m["done_at"]): m["call_s"] for m in meta}  # one entry per sample call
    wait = max(0.0, max(done for _, done in calls) - began) / step_s
    busy = sum(calls.values()) / (max(workers, 1) * step_s)
    return min(wait, 1.0), min(busy, 1.0)


class RolloutScaler:
    """When to add or remove a rollout worker (plain: no Ray; the driver acts on its answers)."""

    def __init__(self, cluster: ClusterConfig) -> None:
        self.fewest, self.most = cluster.rollout_bounds
        self.grow_wait, self.shrink_busy = cluster.rollout_grow_wait, cluster.rollout_shrink_busy
        self.patience, self.join_timeout_s = cluster.rollout_scale_patience, cluster.rollout_join_timeout_s
        self.slow = self.idle = 0  # steps in a row with the grow / shrink condition (checkpointed by the driver)

    @property
    def elastic(self) -> bool:
        return self.most > self.fewest

    def regrow(self, size: int, carried: int) -> int:
        """How many workers a resumed elastic pool of `size` adds to get back to `carried`, its size when the
        checkpoint was saved (`DriverState.rollout_workers`; 0: nothing to regrow), within today's bounds. One
        worker a `patience` steps would take many steps to find that size again."""
        if not self.elastic or carried <= 0:
            return 0
        return max(0, min(carried, self.most) - size)

    def decide(self, size: int, wait: float, busy: float, *, settling: bool) -> int:
        """+1 (add a worker), -1 (remove one) or 0, after a step measured (wait, busy) with `size` workers;
        `settling`: a worker is joining or draining."""
        if not self.elastic or settling:
            self.slow = self.idle = 0
            return 0
        self.slow = self.slow + 1 if wait > self.grow_wait else 0
        self.idle = self.idle + 1 if busy < self.shrink_busy else 0
        if self.slow >= self.patience and size < self.most:
            self.slow = 0
            return 1
        if self.idle >= self.patience and size > self.fewest:
            self.idle = 0
            return -1
        return 0
