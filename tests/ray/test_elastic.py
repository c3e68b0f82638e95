"""The elastic rollout pool (learner/driver/elastic.py): its measurements and decisions by hand, then a real run on
Ray's
real autoscaler (fake multi-node provider, in the namespaced harness of tests/multinode.py) whose bottleneck moves
from the rollouts to the learner (MOTIONNFT_SLOW_AT stalls one, then the other): the pool grows, the autoscaler
adds a node for the new worker, which takes work; then the pool shrinks and the autoscaler removes the node; every
step trains on its groups exactly once."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from learner.driver.elastic import RolloutScaler, rollout_load
from motionnft_core.config import ClusterConfig, ConfigError
from motionnft_core.faults import stall_at
from tests.multinode import NamespacedCluster, can_run

ROOT = Path(__file__).resolve().parents[2]


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


def test_stall_spec():
    spec = "rollout.sample:0-2=1.5, learner.rank0.train_step:4=2,rollout.sample:2=0.5"
    assert [stall_at(spec, "rollout.sample", n) for n in range(4)] == [1.5, 1.5, 2.0, 0.0]
    assert stall_at(spec, "learner.rank0.train_step", 4) == 2.0
    assert stall_at(spec, "learner.rank1.train_step", 4) == 0.0
    with pytest.raises(ValueError, match="MOTIONNFT_SLOW_AT: 'rollout.sample=1'"):
        stall_at("rollout.sample=1", "rollout.sample", 0)


# ------------------------------------------------------------------------------------------------ the real thing

STEPS, ROLLOUTS_SLOW, LEARNER_SLOW = 14, (0, 6), (7, 13)
NODE_TYPE = {"rollout_node": {"resources": {"CPU": 1, "rollout_slot": 1}, "max_workers": 2}}


@pytest.mark.slow
@pytest.mark.skipif(can_run() is not None, reason=str(can_run()))
def test_the_pool_follows_the_bottleneck_on_the_real_autoscaler(tmp_path):
    cluster = NamespacedCluster({}, log_dir=tmp_path / "logs", head_cpus=2, autoscale=NODE_TYPE)
    run_dir = tmp_path / "run"
    args = [
        f"learner.steps={STEPS}", "learner.micro_batch=8", "cluster.learner_ranks=1", "cluster.rollout_workers=1",
        "cluster.rollout_workers_min=1", "cluster.rollout_workers_max=2", "cluster.rollout_scale_patience=1",
        "cluster.rollout_resources={rollout_slot: 1}", "cluster.node_types={rollout_node: {CPU: 1, rollout_slot: 1}}",
        "reward.judge_weight=0", "reward.flow_weight=1", "nft.group_min_std=-1", "nft.group_max_mean=2",
        "checkpoint.every=0", f"checkpoint.dir={run_dir}/ckpt", f"logging.dir={run_dir}", "logging.image_every=0",
        f"model.cache_dir={cluster.disk}/cache",
    ]  # fmt: skip
    slow = (f"rollout.sample:{ROLLOUTS_SLOW[0]}-{ROLLOUTS_SLOW[1]}=3,"
            f"learner.rank0.train_step:{LEARNER_SLOW[0]}-{LEARNER_SLOW[1]}=3")  # fmt: skip
    cluster.start()
    try:
        # The code from this checkout, not a `--working-dir` copy: the autoscaler's nodes share the head's disk and
        # session dir, and one node's runtime-env agent deleting the copy it no longer needs removed the working
        # dir of another node's workers (their imports then failed in os.getcwd()).
        env = {"MOTIONNFT_SLOW_AT": slow, "PYTHONPATH": str(ROOT)}
        out = cluster.submit(["python", "-m", "learner.main", "--config", str(ROOT / "configs/tiny_cpu.yaml"), *args],
                             runtime_env={"env_vars": env})  # fmt: skip
    finally:
        cluster.stop()
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in log, log[-5000:]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    print("step  wait  busy  workers joining nodes")
    for m in metrics:
        print(f"{m['step']:4d}  {m['pool/rollout_wait']:.2f}  {m['pool/rollout_busy']:.2f}  "
              f"{m['pool/rollout_workers']:.0f}  {m['pool/rollout_joining']:.0f}  {m['cluster/nodes']:.0f}")
    print("\n".join(x for x in log.splitlines() if "rollout pool" in x or "rollout worker" in x))

    # Every step once, each of its groups scored once (the reward worker's counter) and trained on.
    assert [m["step"] for m in metrics] == list(range(STEPS))
    assert [m["reward_workers/groups"] for m in metrics] == [2 * (s + 1) for s in range(STEPS)]
    assert all(m["groups/valid"] == 2 for m in metrics)
    rows = [pq.read_table(run_dir / "lineage" / f"step_{s:08d}.parquet").to_pylist() for s in range(STEPS)]
    for m, step_rows in zip(metrics, rows, strict=True):
        assert sorted((r["prompt_id"], r["k"]) for r in step_rows) == sorted(
            (p, k) for p in m["prompts"] for k in range(4)
        )

    # Rollouts the bottleneck: the pool grew, the autoscaler added a node, and the new worker sampled groups.
    assert "rollout pool: adding rollout-1" in log
    assert "rollout worker 1 joined the rollout pool" in log
    grown = [m["step"] for m in metrics if m["pool/rollout_workers"] == 2]
    assert grown and all(metrics[s]["cluster/nodes"] == 3 for s in grown), grown  # head + two rollout nodes
    assert {r["worker"] for r in sum(rows, [])} == {"rollout-0", "rollout-1"}
    # The learner the bottleneck: the pool shrank back, and the autoscaler removed the idle node.
    assert "rollout pool: removing rollout-1" in log
    assert metrics[-1]["pool/rollout_workers"] == 1 and metrics[-1]["cluster/nodes"] == 2
    # Drained at the end of step max(grown) + 1 (the first to report one worker up); the next step's groups were
    # sampled ahead, before that, possibly on it; every later group comes from rollout-0.
    late = [r["worker"] for s in range(max(grown) + 3, STEPS) for r in rows[s]]
    assert late and set(late) == {"rollout-0"}


# ------------------------------------------------------------------------------------------------ the pool's states


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
    pool = WorkerPool("rollout", [worker.remote("rollout-0")], 10, 3600.0)
    prepare = lambda actor: actor.prepare.remote(3)  # noqa: E731
    joined = pool.add(worker.remote("rollout-1"), prepare, timeout_s=60)
    unplaceable = pool.add(worker.options(resources={"no_such_node": 1}).remote("rollout-2"), prepare, timeout_s=1)
    refused = pool.add(worker.remote("rollout-3", parity_ok=False), prepare, timeout_s=60)
    assert pool.size() == 4 and pool.up() == [0]  # joining workers take no work yet
    ray.get(pool.joining[joined])
    time.sleep(1.2)
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
    pool.crashed(joined, time.monotonic(), RuntimeError("gone"))  # a removed worker's failure is no crash
    assert pool.crashes.total == 0 and pool.up() == [0]
    for actor in pool.actors:
        ray.kill(actor)
