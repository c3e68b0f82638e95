"""The elastic rollout pool on Ray's real autoscaler (fake multi-node provider, in the namespaced harness of
tests/multinode.py) in a run whose bottleneck moves from the rollouts to the learner (MOTIONNFT_SLOW_AT stalls one,
then the other): the pool grows, the autoscaler adds a node for the new worker, which takes work; then the pool
shrinks and the autoscaler removes the node; every step trains on its groups exactly once."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.harness import metrics_rows
from tests.multinode import NamespacedCluster, can_run

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(can_run() is not None, reason=str(can_run()))]

STEPS, ROLLOUTS_SLOW, LEARNER_SLOW = 14, (0, 6), (7, 13)
NODE_TYPE = {"rollout_node": {"resources": {"CPU": 1, "rollout_slot": 1}, "max_workers": 2}}


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
    metrics = metrics_rows(run_dir)
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
