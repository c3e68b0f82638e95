"""The main job on a real multi-node Ray cluster (tests/multinode.py): a CPU-only head that runs the driver, node
A for the learner ranks, node B for rollouts, the reward worker and the judge, each node with its own IP and its
own private disk, S3 (moto) in a namespace of its own. Everything goes through `ray job submit`.

What a one-node cluster hides and these tests see: checkpoint shards written on the learner's node must reach
S3 from there (the driver's disk is not theirs), the restore must read them on that node again, models are found
on each actor's own node, the judge must listen on its node's address and refuse requests without its key.
"""

from __future__ import annotations

import json
import sys
import threading
import uuid
from pathlib import Path

import pytest

from tests import harness
from tests.harness import metrics_rows
from tests.multinode import NamespacedCluster, can_run

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(can_run() is not None, reason=str(can_run()))]

NODES = {"a": (2, {"learner_slot": 2}), "b": (4, {"rollout_slot": 4})}
PLACEMENT = [  # the mechanism a real cluster uses with the autoscaler's node types
    "cluster.learner_resources={learner_slot: 1}",
    "cluster.rollout_resources={rollout_slot: 1}",
    "cluster.reward_resources={rollout_slot: 1}",
    "cluster.judge_resources={rollout_slot: 1}",
]
COMPARED = ("reward/mean", "reward/std", "learner/loss", "learner/policy_loss", "learner/grad_norm")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = NamespacedCluster(NODES, log_dir=tmp_path_factory.mktemp("multinode-logs"))
    c.start()
    print(f"namespaced cluster up in {c.timings['start_s']:.1f}s")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def bucket(cluster) -> str:
    name = f"mn-{uuid.uuid4().hex[:10]}"
    cluster.s3(f"s3.create_bucket(Bucket={name!r})")
    return name


def _train(cluster: NamespacedCluster, run_dir: Path, ckpt: str, *extra: str,
           env: dict[str, str] | None = None) -> tuple[int, str]:  # fmt: skip
    args = [*PLACEMENT, "reward.judge_weight=0", "reward.flow_weight=1", "checkpoint.every=2",
            f"checkpoint.dir={ckpt}", f"logging.dir={run_dir}", f"model.cache_dir={cluster.disk}/cache",
            # every group trains (the tiny random policy's rewards barely vary), so each step has a loss
            "nft.group_min_std=-1", "nft.group_max_mean=2", *extra]  # fmt: skip
    out = cluster.submit(["python", "-m", "learner.main", "--config", "configs/tiny_cpu.yaml", *args], working_dir=ROOT,
                         runtime_env={"env_vars": env} if env else None)  # fmt: skip
    return out.returncode, out.stdout + out.stderr


def _objects(cluster: NamespacedCluster, bucket: str, prefix: str) -> list[str]:
    code = (f"pages = s3.get_paginator('list_objects_v2').paginate(Bucket={bucket!r}, Prefix={prefix!r})\n"
            "print(json.dumps(sorted(o['Key'] for p in pages for o in p.get('Contents', []))))")  # fmt: skip
    return json.loads(cluster.s3(code))


@pytest.fixture(scope="module")
def trained(cluster, bucket, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mn-run") / "run"
    rc, log = _train(cluster, run_dir, f"s3://{bucket}/run", "learner.steps=4")
    return rc, log, run_dir


def test_trains_with_each_rank_checkpointing_to_s3_from_its_own_node(cluster, bucket, trained):
    rc, log, run_dir = trained
    assert rc == 0 and "succeeded" in log, log[-4000:]
    metrics = metrics_rows(run_dir)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    for m in metrics:
        assert m["groups/valid"] == 2 and "learner/loss" in m and m["learner/n_valid"] == 8
    # Version 0 is the initial policy; every trained step publishes one more, so the versions after each step
    # are 1, 2, 3, 4; the samples a step trains on are never more than rollout.max_staleness (1) versions old.
    assert [m["policy/version"] for m in metrics] == [1, 2, 3, 4]
    assert all(0 <= m["staleness/max"] <= 1 for m in metrics)
    assert metrics[0]["staleness/max"] == 0  # nothing was published before step 0's rollouts but version 0
    # Reward-worker counters reach the metrics: every step's groups (2 per step) were scored.
    assert [m["reward_workers/groups"] for m in metrics] == [2, 4, 6, 8]
    for step in ("step_00000002", "step_00000004"):
        keys = _objects(cluster, bucket, f"run/{step}/")
        assert keys == [f"run/{step}/{name}" for name in (
            "COMMITTED", "driver.json", "learner/.metadata", "learner/__0_0.distcp", "learner/__1_0.distcp",
            "lora/pytorch_lora_weights.safetensors")], keys  # fmt: skip
    # The shards never touched the driver's disk, and the ranks left no staging behind on theirs.
    for node in ("head", "a"):
        found = cluster.in_node(cluster.node(node), ["find", cluster.disk, "-name", "*.distcp"]).stdout.split()
        assert found == [], (node, found)


def test_resume_on_the_cluster_matches_the_uninterrupted_run(cluster, bucket, trained, tmp_path):
    rc, log, full_dir = trained
    assert rc == 0, log[-4000:]
    # Only step 2 of the run exists under another prefix: a job stopped after its first checkpoint.
    cluster.s3(
        f"pages = s3.get_paginator('list_objects_v2').paginate(Bucket={bucket!r}, Prefix='run/step_00000002/')\n"
        "for key in [o['Key'] for p in pages for o in p.get('Contents', [])]:\n"
        f"    s3.copy_object(Bucket={bucket!r}, Key='stopped/' + key[4:],\n"
        f"                   CopySource={{'Bucket': {bucket!r}, 'Key': key}})"
    )
    rc, log = _train(cluster, tmp_path / "run", f"s3://{bucket}/stopped", "learner.steps=4", "--resume")
    assert rc == 0, log[-4000:]
    assert "resumed from step_00000002: step 2, policy version 2" in log
    resumed, full = metrics_rows(tmp_path / "run"), metrics_rows(full_dir)
    assert [m["step"] for m in resumed] == [1, 2, 3]  # step 1's line comes with its checkpoint
    for got, want in zip(resumed, full[1:], strict=True):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (got["step"], key)


@pytest.fixture(scope="module")
def refused(cluster, bucket, tmp_path_factory) -> dict[str, tuple[int, str, Path]]:
    """Three jobs that must be refused at start, submitted at once (each is mostly a job driver's start-up; one
    after the other they took 13 + 20 + 20 s): {name: (exit code, log, run dir)}."""
    root = tmp_path_factory.mktemp("refused")
    jobs = {
        "unreachable": ("s3://no-such-bucket-here/x",),
        "local": (str(root / "local" / "ckpt"),),
        "unplaceable": (f"s3://{bucket}/unplaceable", "cluster.judge_resources={gpu_node: 1}",
                        "reward.judge_weight=0.5"),
    }  # fmt: skip
    results: dict[str, tuple[int, str, Path]] = {}

    def submit(name: str) -> None:
        ckpt, *extra = jobs[name]
        rc, log = _train(cluster, root / name / "run", ckpt, "learner.steps=1", *extra)
        results[name] = (rc, log, root / name)

    threads = [threading.Thread(target=submit, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    return results


def test_an_unreachable_checkpoint_dir_is_refused_before_anything_starts(refused):
    rc, log, _ = refused["unreachable"]
    assert rc != 0
    assert "config error: checkpoint.dir: s3 bucket not found for s3://no-such-bucket-here/x" in log, log[-3000:]


def test_a_local_checkpoint_dir_is_refused_when_ranks_are_on_other_nodes(refused):
    rc, log, root = refused["local"]
    assert rc != 0
    assert "config error: checkpoint.dir:" in log and "is a local path, but 2 of 2 learner ranks" in log, log[-3000:]
    assert not (root / "ckpt").exists() or not any((root / "ckpt").iterdir())


def test_a_pool_no_node_can_hold_fails_at_start_naming_its_keys(refused):
    rc, log, _ = refused["unplaceable"]
    assert rc != 0
    assert "config error: pools that can never be placed" in log, log[-3000:]
    assert "the judge pool asks {CPU: 0.5, gpu_node: 1}" in log and "judge_resources" in log
    assert "the learner pool" not in log and "the rollout pool" not in log  # those fit


def test_judge_on_its_node_address_scored_from_another_node_and_locked(cluster):
    key = f"probe-{uuid.uuid4().hex}"
    out = cluster.submit(["python", "-m", "tests.judge_probe", f"{cluster.disk}/cache"], working_dir=ROOT,
                         runtime_env={"env_vars": {"MOTIONNFT_JUDGE_API_KEY": key}})  # fmt: skip
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    probe = json.loads(next(line for line in log.splitlines() if line.startswith("PROBE "))[6:])
    node_b, node_a = cluster.node("b").ip(), cluster.node("a").ip()
    assert probe["url"].startswith(f"http://{node_b}:")  # its node's address, not 127.0.0.1
    assert probe["node"] == node_a and probe["driver_node"] == cluster.head.ip()
    assert len(probe["judge_scores"]) == 3 and all(0.0 <= s <= 1.0 for s in probe["judge_scores"])
    assert probe["counters"]["judge/failures"] == 0 and probe["counters"]["judge/requests"] == 3
    assert probe["no_key"] == 401 and probe["wrong_key"] == 401
    assert probe["log_lines"] > 10 and probe["key_in_judge_log"] is False
    assert key not in log  # the job's own output


def test_a_lost_worker_node_is_replaced_and_the_run_finishes(cluster, bucket, trained, tmp_path):
    """Node B (both rollout workers and the reward worker) dies whole while the driver is held right after step 0
    is logged; then a replacement node with the same resources joins, as the autoscaler would add one. Ray
    restarts the workers there, the driver samples again the groups whose images were lost, and the run logs
    every step once, with the uninterrupted run's prompts."""
    _, _, full_dir = trained
    run_dir, result, hold = tmp_path / "run", {}, tmp_path / "hold"
    env = harness.hold_env(hold, "after_log:0")  # the driver, once step 0 is logged (the head sees this dir)

    def job() -> None:
        result["rc"], result["log"] = _train(cluster, run_dir, f"s3://{bucket}/lost-node", "learner.steps=4", env=env)

    thread = threading.Thread(target=job)
    thread.start()
    try:
        harness.wait_held(hold, "after_log:0", timeout_s=300)
        killed = cluster.kill_node("b")
    finally:
        harness.release(hold, "after_log:0")
    # The replacement comes only now: the driver meets every worker of node B gone, whatever the machine's speed.
    cluster.replace_node("b")
    print(f"node b: {killed} processes killed, a replacement started")
    thread.join(timeout=600)
    log = result.get("log", "")
    driver = "\n".join(x for x in log.splitlines() if "(raylet)" not in x and "[state-dump]" not in x)
    assert result.get("rc") == 0, driver[-6000:]
    print("\n".join(x for x in driver.splitlines() if any(k in x for k in ("crashed (", "rebuilding", "waiting "))))
    assert killed > 3  # raylet, workers, agents: the whole node
    metrics, full = metrics_rows(run_dir), metrics_rows(full_dir)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert [m["prompts"] for m in metrics] == [m["prompts"] for m in full]
    assert all(m["groups/total"] == 2 for m in metrics)
    # Step 1's groups were sampled on node B during step 0 (max_staleness 1): their images went with it, so each
    # group is sampled again and each of the two rollout workers' crash counted once; the reward worker's call
    # found it gone (once). The learner's input is what the new samples made: no rebuild.
    assert metrics[-1]["workers/rollout_crashes_total"] == 2 and metrics[-1]["workers/reward_crashes_total"] == 1
    assert "rebuilding the learner group" not in log, driver[-4000:]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
