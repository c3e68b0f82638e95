"""Rollout and reward workers that crash: each crash counted in a sliding window, the work re-queued.

Ray restarts a crashed worker's process without a lifetime limit (`max_restarts=-1`) but retries none of its
tasks (`max_task_retries=0`), so every failure reaches the driver, which sends the group again to a worker that
is up (a survivor while the crashed one restarts, or for good when its node is gone) and counts the crash. A
worker may crash `cluster.worker_crashes` times within `cluster.crash_window_s`; one crash more is a crash loop
and stops the run, naming the worker. Tasks queued on a worker when it died fail with it: a failed task counts
as a new crash only if it was sent after the crash counted last.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import ray

from motionnft_core.errors import first_line

RESTART_OPTIONS = {"max_restarts": -1, "max_task_retries": 0}  # Ray restarts, the driver re-queues and counts


class WorkerCrashLoop(RuntimeError):
    """A worker crashed more often than `cluster.worker_crashes` within `cluster.crash_window_s`."""


class SlidingWindow:
    """At most `limit` events within any `window_s` seconds (plain: no Ray): the crashes of one worker, or the
    learner group's rebuilds (a long run on preemptible nodes may lose a rank every few hours and go on, while one
    that loses them back to back stops)."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit, self.window_s = limit, window_s
        self.times: deque[float] = deque()

    def record(self, now: float) -> bool:
        """Count one event at `now`; False once the events within the window are more than `limit`."""
        self.times.append(now)
        while self.times[0] <= now - self.window_s:
            self.times.popleft()
        return len(self.times) <= self.limit

    def __len__(self) -> int:
        return len(self.times)


class Crashes:
    """The crash record of one pool's workers, by index (plain: no Ray)."""

    def __init__(self, role: str, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.role, self.limit, self.window_s, self.clock = role, limit, window_s, clock
        self.recent: dict[int, SlidingWindow] = defaultdict(lambda: SlidingWindow(limit, window_s))
        self.last: dict[int, float] = defaultdict(lambda: -math.inf)
        self.total = 0

    def name(self, worker: int) -> str:
        return f"{self.role} worker {worker}"

    def record(self, worker: int, sent_at: float, error: BaseException) -> bool:
        """Count the failure of a task sent to `worker` at `sent_at` (this clock); False if it died with a crash
        already counted. Raises WorkerCrashLoop past the limit."""
        if sent_at < self.last[worker]:
            return False
        now = self.clock()
        self.last[worker] = now
        self.total += 1
        recent = self.recent[worker]
        if not recent.record(now):
            raise WorkerCrashLoop(
                f"{self.name(worker)} crashed {len(recent)} times within {self.window_s:g} s (cluster.worker_crashes="
                f"{self.limit} per cluster.crash_window_s); last error: {first_line(error)}"
            )
        return True


class WorkerPool:
    """The actors of one role and their crashes: which are up, and where (re-queued) work goes.

    A crashed worker is down until it answers a `ready` call again (a call sent while Ray restarts it fails
    with ActorUnavailableError, so it is sent again). While every worker is down, work waits for the first one
    back: a lost node's workers come back when Ray places them on another or a replacement node.

    An elastic pool (learner/driver/elastic.py) also has workers joining (up once their `prepare` call returns: weights
    loaded and parity checked) and draining (no new work; removed once the caller says their groups are used).
    A worker's index never changes and is never reused, so crash records and in-flight groups stay valid."""

    def __init__(self, role: str, actors: list[Any], limit: int, window_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.role, self.actors, self.clock = role, actors, clock
        self.crashes = Crashes(role, limit, window_s, clock)
        self.pings: dict[int, Any] = {}  # down workers -> their pending `ready` call
        self.joining: dict[int, Any] = {}  # added workers -> their pending `prepare` call
        self.join_deadline: dict[int, float] = {}  # added workers -> when (self.clock) to give up on them
        self.draining: set[int] = set()  # leaving workers: no new work
        self.removed: set[int] = set()  # killed for good

    def live(self) -> list[int]:
        """Every worker not removed: up, down, joining or draining."""
        return [w for w in range(len(self.actors)) if w not in self.removed]

    def size(self) -> int:
        """The pool's size as an elastic pool counts it: joining workers in, draining ones out."""
        return len(self.live()) - len(self.draining)

    def add(self, actor: Any, prepare: Callable[[Any], Any], timeout_s: float) -> int:
        """A new worker, up once `prepare(actor)` (a call returning a ref) succeeds; removed if that takes longer
        than `timeout_s` (no node for it: the cluster is at its limit). Returns its index."""
        self.actors.append(actor)
        w = len(self.actors) - 1
        self.joining[w] = prepare(actor)
        self.join_deadline[w] = self.clock() + timeout_s
        return w

    def drain(self) -> int | None:
        """Stop giving work to one worker that is up (the newest), if another stays up; returns it."""
        up = self.up()
        if len(up) < 2:
            return None
        self.draining.add(up[-1])
        return up[-1]

    def release(self, in_use: set[int]) -> list[int]:
        """Remove the draining workers none of whose groups is still in use; returns them."""
        done = sorted(self.draining - in_use)
        for w in done:
            self.remove(w)
        return done

    def remove(self, worker: int) -> None:
        ray.kill(self.actors[worker], no_restart=True)
        self.removed.add(worker)
        self.draining.discard(worker)
        self.joining.pop(worker, None)
        self.pings.pop(worker, None)

    def _poll_joining(self) -> None:
        for w, call in list(self.joining.items()):
            if not ray.wait([call], timeout=0)[0]:
                if self.clock() > self.join_deadline[w]:
                    print(f"{self.crashes.name(w)} did not join the pool in time (no node had room for it, or it "
                          "could not load); removed", flush=True)  # fmt: skip
                    self.remove(w)
                continue
            del self.joining[w]
            try:
                measured = ray.get(call)
            except (ray.exceptions.RayError, RuntimeError) as e:  # its parity check failed, or it died starting
                reason = first_line(getattr(e, "cause", None) or e)[:200]  # a task's error: the exception inside
                print(f"{self.crashes.name(w)} could not join the pool ({reason}); removed", flush=True)
                self.remove(w)
                continue
            where = ray.get(self.actors[w].where.remote())
            shown = "" if measured is None else f", parity error {measured:.2g}"
            print(f"{self.crashes.name(w)} joined the {self.role} pool ({where}{shown})", flush=True)

    def _poll(self) -> None:
        self._poll_joining()
        for w, ping in list(self.pings.items()):
            if not ray.wait([ping], timeout=0)[0]:
                continue
            try:
                ray.get(ping)
                del self.pings[w]
            except ray.exceptions.ActorUnavailableError:  # still restarting
                self.pings[w] = self.actors[w].ready.remote()
            except ray.exceptions.RayActorError as e:  # dead for good (its constructor failed): no restart
                raise WorkerCrashLoop(f"{self.crashes.name(w)} cannot be restarted: {first_line(e)}") from e

    def up(self) -> list[int]:
        """The workers up now; waits while none is."""
        waited, t0 = 0.0, time.monotonic()
        while True:
            self._poll()
            out = self.pings.keys() | self.joining.keys() | self.draining | self.removed
            if up := [w for w in range(len(self.actors)) if w not in out]:
                return up
            ray.wait([*self.pings.values(), *self.joining.values()], num_returns=1, timeout=10.0)
            time.sleep(0.5)  # a call to a worker Ray cannot place yet fails at once: do not spin on it
            if (elapsed := time.monotonic() - t0) >= waited + 60:
                waited = elapsed
                print(f"waiting {elapsed:.0f}s for a {self.role} worker to come back (Ray restarts crashed "
                      "workers; a lost node's workers need a node with room for them)", flush=True)  # fmt: skip

    def crashed(self, worker: int, sent_at: float, error: BaseException) -> None:
        """A task sent to `worker` at `sent_at` failed with the worker: count the crash unless it is one known
        (the worker is still down, or the task was sent before the crash counted last)."""
        if worker in self.pings or worker in self.removed or not self.crashes.record(worker, sent_at, error):
            return
        print(f"{self.crashes.name(worker)} crashed ({first_line(error)[:160]}); Ray restarts it, "
              "its groups are re-queued", flush=True)  # fmt: skip
        self.pings[worker] = self.actors[worker].ready.remote()

    def pick(self, avoid: int) -> int:
        """A worker that is up for re-queued work, another than `avoid` when there is one."""
        up = self.up()
        others = [w for w in up if w != avoid]
        return others[0] if others else up[0]
