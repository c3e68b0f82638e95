"""A group's motion heat (nft.motion_focal) outlives the reward worker that computed it: `RewardWorker.score`
returns it as a value of its own, owned by the caller (the driver), where a `ray.put` in the worker would die
with the worker, and a learner that fetches it after a reward-worker crash would fail its step."""

from __future__ import annotations

import pytest
import torch

from motionnft_core.config import RewardConfig
from motionnft_core.data.motionedit import MotionExample
from rewards.flow_scorer import FlowRewardScorer
from rewards.scorer import RewardScorer
from rewards.worker import RewardWorker
from tests.unit.golden.make_golden import PixelFlow

SIZE = 192  # a (192, 192) float32 heat is 144 KiB: held in the object store, not inlined in the owner's memory


def test_a_groups_heat_outlives_its_reward_worker(ray_cluster):
    ray = ray_cluster
    cfg = RewardConfig(flow_weight=1.0, judge_weight=0.0)
    scorer = lambda: RewardScorer(FlowRewardScorer(PixelFlow(), cfg.flow, heat=True), [], cfg)  # noqa: E731 (by value)
    worker = ray.remote(RewardWorker).options(num_cpus=0.5).remote(scorer, "reward-heat")
    image = torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    target = image.roll(6, -1)
    example = MotionExample("heat-0", "move it to the right", image, target, None)
    reward_ref, heat_ref = worker.score.remote(example, torch.stack([target, image]))
    group = ray.get(reward_ref)
    assert group.prompt_id == "heat-0" and len(group.reward) == 2
    assert group.heat is None  # the heat travels apart, by reference; the driver never fetches it

    ray.kill(worker, no_restart=True)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(worker.ready.remote(), timeout=60)  # the worker is gone
    fetch = ray.remote(lambda refs: ray.get(refs[0], timeout=60))  # as a learner rank: the ref inside a list
    heat = ray.get(fetch.options(num_cpus=0.5).remote([heat_ref]), timeout=120)  # fetched in another process
    expected = torch.linalg.vector_norm(PixelFlow()(image[None], target[None])[0], dim=-1)
    assert torch.equal(heat, expected) and heat.numel() * heat.element_size() > 100 * 1024
