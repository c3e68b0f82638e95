"""Live metrics for the Ray dashboard's Prometheus/Grafana: Ray custom metrics (`ray.util.metrics`) from the
driver and every actor, each series tagged with the Ray job, the pool and the worker that recorded it.

`SERIES` below is the whole schema: every name, kind and tag lives there, and `prometheus_names` says what
Prometheus sees (Ray adds the `ray_` prefix, counters get `_total`, histograms `_bucket`/`_sum`/`_count`), so
`cluster/grafana_dashboard.json` can be checked against the code. Ray's agent on each node serves them on the
node's metrics export port (`cluster.metrics_export_port` for the embedded cluster, `ray start
--metrics-export-port` on a real one); workers report every `metrics_report_interval_ms` (Ray's default: 10 s).

Why module state: a Ray metric is per process (Ray registers it in the process's core worker) and one process
is one worker, so its tags (`bind`) and the metric objects (created once, lazily) belong to the process. Without
Ray initialized, or installed (plain classes in tests and bench/), every call returns at once.
`RAY_enable_metrics_collection=0` on the nodes turns all of Ray's metrics off, these included.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

try:
    import ray
except ImportError:  # the GPU benchmark machine runs the plain classes without Ray: every call returns at once
    ray = None

PREFIX = "motionnft_"
COMMON_TAGS = ("job", "pool", "worker")  # the Ray job (one driver run), the role's pool, the worker in it
# Bucket edges are part of a series' schema (Grafana's quantiles read them), not tuning: seconds from a tiny
# CPU call to a full-size checkpoint upload; judge latency from a cached reply to a time-out. Ray 2.60 carries a
# histogram to its agent as bucket counts and rebuilds `_sum` from bucket midpoints: a mean from it is coarse
# (the driver's step line has the exact seconds of each step's phases).
PHASE_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0)
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class Series:
    """One Ray metric: its name (with PREFIX, without Ray's `ray_`), kind, help text and tags beyond COMMON_TAGS."""

    name: str
    kind: str  # "gauge" | "counter" | "histogram"
    help: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms only


STEP = "motionnft_step"
QUEUE = "motionnft_queue_groups"
BUSY = "motionnft_busy_fraction"
PHASE = "motionnft_phase_seconds"
SAMPLES = "motionnft_samples"
WEIGHT_BYTES = "motionnft_weight_sync_bytes"
JUDGE_EVENTS = "motionnft_judge_events"
JUDGE_LATENCY = "motionnft_judge_latency_seconds"

SERIES: dict[str, Series] = {s.name: s for s in (
    Series(STEP, "gauge", "the driver's last step line of metrics.jsonl, one series per numeric key (reward/mean, "
           "perf/samples_per_s, timing_s/train, staleness/max, groups/valid, reward_workers/judge/requests, ...)",
           ("key",)),
    Series(QUEUE, "gauge", "groups of the step being scored: queue=reward sampled and waiting for (or in) a reward "
           "worker, queue=learner scored and waiting for the step's learner call", ("queue",)),
    Series(BUSY, "gauge", "share of wall time this worker spent in calls since its previous call ended"),
    Series(PHASE, "histogram", "wall seconds of one call of a phase: rollout sample, fetch_weights, load_weights "
           "(with the parity check); reward score, flow (one batched call), judge (one group); learner forward and "
           "backward (summed over a step's micro-batches), train, publish, checkpoint", ("phase",), PHASE_BUCKETS_S),
    Series(SAMPLES, "counter", "candidates sampled by a rollout worker"),
    Series(WEIGHT_BYTES, "counter", "bytes of policy weights moved by the weight sync: published by learner rank 0, "
           "loaded by each rollout worker"),
    Series(JUDGE_EVENTS, "counter", "judge client events: requests, retries, timeouts, failures, connection_errors, "
           "server_errors, client_errors, unparseable, failovers, waits_no_replica", ("event",)),
    Series(JUDGE_LATENCY, "histogram", "wall seconds of each answered judge HTTP request", (), LATENCY_BUCKETS_S),
)}  # fmt: skip

_identity: dict[str, str] = {"pool": "driver", "worker": "driver"}
_metrics: dict[str, Any] = {}  # name -> ray.util.metrics object of this process, created on first use


def bind(pool: str, worker: str) -> None:
    """Name this process's worker: every series it records is tagged `pool` and `worker` (the driver's default
    is driver/driver). Called once by each actor's constructor."""
    _identity.update(pool=pool, worker=worker)


def actor_name(pool: str) -> str:
    """A stable name for an actor that was given none: its pool and the head of its Ray actor id (kept across
    restarts)."""
    actor = ray.get_runtime_context().get_actor_id() if _live() else None
    return f"{pool}-{actor[:8]}" if actor else pool


def prometheus_names() -> set[str]:
    """Every series name as Prometheus scrapes it from Ray (what a Grafana query may name)."""
    suffixes = {"gauge": ("",), "counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {f"ray_{s.name}{x}" for s in SERIES.values() for x in suffixes[s.kind]}


def gauge(name: str, value: float, **tags: str) -> None:
    _record(name, "gauge", value, tags)


def count(name: str, value: float = 1, **tags: str) -> None:
    if value > 0:  # Ray refuses increments <= 0; nothing happened
        _record(name, "counter", value, tags)


def observe(name: str, value: float, **tags: str) -> None:
    _record(name, "histogram", value, tags)


def seconds(phase: str, value: float) -> None:
    observe(PHASE, value, phase=phase)


@contextlib.contextmanager
def timed(phase: str) -> Iterator[None]:
    """Observe the block's wall seconds as `phase` (only when it completes: a failed call is not a phase time)."""
    t0 = time.perf_counter()
    yield
    seconds(phase, time.perf_counter() - t0)


def export_step(metrics: Mapping[str, Any]) -> None:
    """The driver's one call per step: every numeric scalar of the step's metrics line as `motionnft_step{key}`."""
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            gauge(STEP, float(value), key=key)


def queue_depths(sampled: list, scored: list) -> None:
    """The driver's queues while a step is scored, from the rollouts' and reward calls' refs (nothing fetched):
    groups sampled but not scored yet wait for a reward worker, scored ones for the rest of the step."""
    if not _live():
        return
    n = len(scored)
    rolled = len(ray.wait(sampled, num_returns=len(sampled), timeout=0, fetch_local=False)[0]) if sampled else 0
    done = len(ray.wait(scored, num_returns=n, timeout=0, fetch_local=False)[0]) if scored else 0
    gauge(QUEUE, float(max(rolled - done, 0)), queue="reward")
    gauge(QUEUE, float(done), queue="learner")


class Busy:
    """A worker's busy fraction: wall time with at least one call in flight (an async actor overlaps calls) over
    the wall time since its previous report, reported as `motionnft_busy_fraction` each time the last call in
    flight ends. The first call's window starts with it (loading the model is not idling)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.in_flight, self.busy_s = 0, 0.0
        self.began: float | None = None  # when the current busy stretch began
        self.window: float | None = None  # when the current report window began
        self.last: float | None = None  # the fraction reported last

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        now = self.clock()
        if self.in_flight == 0:
            self.began = now
            self.window = now if self.window is None else self.window
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._report(self.clock())

    def _report(self, now: float) -> None:
        self.busy_s += now - self.began
        if now > self.window:
            self.last = min(self.busy_s / (now - self.window), 1.0)
            gauge(BUSY, self.last)
        self.window, self.busy_s = now, 0.0


def _record(name: str, kind: str, value: float, tags: dict[str, str]) -> None:
    series = SERIES[name]  # checked without Ray too: a wrong call fails in the plain classes' tests
    if series.kind != kind or set(tags) != set(series.tags):
        raise ValueError(f"{name} is a {series.kind} tagged {series.tags}; recorded as a {kind} tagged {tuple(tags)}")
    if not _live():
        return
    metric = _metrics.get(name) or _create(series)
    tags = {"job": ray.get_runtime_context().get_job_id(), **_identity, **tags}
    getattr(metric, {"gauge": "set", "counter": "inc", "histogram": "observe"}[kind])(value, tags=tags)


def _live() -> bool:
    return ray is not None and ray.is_initialized()


def _create(series: Series) -> Any:
    from ray.util import metrics

    tags = (*COMMON_TAGS, *series.tags)
    if series.kind == "histogram":
        metric = metrics.Histogram(series.name, series.help, boundaries=list(series.buckets), tag_keys=tags)
    else:
        metric = {"gauge": metrics.Gauge, "counter": metrics.Counter}[series.kind](series.name, series.help, tags)
    _metrics[series.name] = metric
    return metric
