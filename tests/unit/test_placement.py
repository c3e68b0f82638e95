"""Start-up placement check (learner/driver/placement.py): impossible pool asks fail at once, naming the config keys."""

from __future__ import annotations

import pytest

from learner.driver.placement import check_placement, placement_problems, pool_asks
from motionnft_core.config import ConfigError
from motionnft_core.config_loader import load_config

GPU_CONFIG = "configs/flux_kontext.yaml"  # 8 learner, 4 rollout, 1 reward GPU; a TP=2 judge on 2 GPUs; 4 CPUs each


def _cfg(*overrides: str):
    return load_config(GPU_CONFIG, list(overrides))


def test_asks_per_pool_come_from_the_cluster_section():
    asks = {p.name: p for p in pool_asks(_cfg("cluster.rollout_resources={rollout_node: 1}"))}
    assert asks["learner"].count == 8 and asks["learner"].ask == {"CPU": 4.0, "GPU": 1.0}
    assert asks["rollout"].ask == {"CPU": 4.0, "GPU": 1.0, "rollout_node": 1.0}
    assert asks["judge"].ask == {"CPU": 4.0, "GPU": 2.0}
    assert "judge" not in {p.name for p in pool_asks(_cfg("reward.judge.url=http://judge:8000/v1"))}
    assert "judge" not in {p.name for p in pool_asks(_cfg("reward.judge_weight=0"))}


def test_a_tp2_judge_on_one_gpu_node_types_is_refused_naming_its_keys():
    """The shipped mistake: a TP=2 judge while every node type has one GPU."""
    problems = placement_problems(pool_asks(_cfg()), [{"CPU": 8.0}], {"gpu": {"CPU": 24.0, "GPU": 1.0}})
    assert len(problems) == 1
    assert problems[0].startswith("the judge pool asks {CPU: 4, GPU: 2} per actor (cluster.judge_replicas/")
    assert "reward.judge.tensor_parallel_size=2" in problems[0] and "offers: {CPU: 24, GPU: 1}, {CPU: 8}" in problems[0]
    with pytest.raises(ConfigError, match="pools that can never be placed"):
        check_placement(_cfg("cluster.node_types={gpu: {CPU: 24, GPU: 1}}"), [{"CPU": 8.0}])


def test_node_types_make_room_that_is_not_alive_yet():
    """An autoscaling cluster starts with only its head: the node types are what counts."""
    cfg = _cfg("cluster.node_types={gpu8: {CPU: 192, GPU: 8}}")
    check_placement(cfg, [{"CPU": 8.0}])
    check_placement(_cfg("cluster.node_types={gpu: {CPU: 24, GPU: 1}, judge: {CPU: 48, GPU: 2}}"), [{"CPU": 8.0}])


def test_without_node_types_the_alive_cluster_must_hold_all_pools_together():
    nodes = [{"CPU": 192.0, "GPU": 8.0}]  # each pool fits one node, but 8 + 4 + 1 + 2 = 15 GPUs > 8
    problems = placement_problems(pool_asks(_cfg()), nodes, {})
    assert len(problems) == 1
    assert problems[0].startswith("the pools together ask {GPU: 15} but the cluster has {GPU: 8}")
    assert "learner 8 x {CPU: 4, GPU: 1}" in problems[0]
    assert placement_problems(pool_asks(_cfg()), nodes * 2, {}) == []  # two such nodes hold them


def test_custom_resources_must_be_offered_somewhere():
    cfg = _cfg("cluster.learner_resources={learner_node: 1}")
    problems = placement_problems(pool_asks(cfg), [{"CPU": 192.0, "GPU": 8.0}] * 2, {})
    assert len(problems) == 1 and "the learner pool asks {CPU: 4, GPU: 1, learner_node: 1}" in problems[0]
    ok = [{"CPU": 192.0, "GPU": 8.0, "learner_node": 8.0}, {"CPU": 192.0, "GPU": 8.0}]
    assert placement_problems(pool_asks(cfg), ok, {}) == []


def test_judge_gpus_must_equal_tensor_parallel_size():
    with pytest.raises(ConfigError, match=r"cluster.judge_gpus: expected = reward.judge.tensor_parallel_size \(2\)"):
        _cfg("cluster.judge_gpus=1")
    _cfg("cluster.judge_gpus=0")  # CPU


def test_resource_keys_are_checked_at_parse_time():
    with pytest.raises(ConfigError, match="cluster.rollout_resources.GPU"):
        _cfg("cluster.rollout_resources={GPU: 1}")
    with pytest.raises(ConfigError, match=r"cluster.node_types.gpu.GPU: expected a value >= 0"):
        _cfg("cluster.node_types={gpu: {GPU: -1}}")
    with pytest.raises(ConfigError, match="cluster.learner_resources: expected a mapping"):
        _cfg("cluster.learner_resources=3")
