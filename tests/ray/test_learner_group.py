"""The Ray LearnerGroup (docs/algorithm.md): 2 ranks as Ray actors train, publish, save and load like a plain trainer,
and a rank that cannot start fails the group fast. The pure trainer: tests/unit/test_fsdp_learner.py."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch

from actors.rollout import RolloutWorker
from actors.sampler import Sampler
from learner.trainer.fsdp_worker import LearnerGroup
from learner.trainer.nft_loss import old_policy_decay
from learner.trainer.nft_trainer import NFTTrainer, TrainSample
from motionnft_core.config import ClusterConfig, ModelConfig, RolloutConfig
from motionnft_core.models import policy as policies
from motionnft_core.models.weights import PolicyWeights, PublishedWeights, WeightManifest
from tests.learner_harness import PROMPTS, rank_samples, sections

ROLLOUT = RolloutConfig(group_size=2, num_steps=3, height=32, width=32, micro_batch=4)
TWO_RANKS = ClusterConfig(learner_ranks=2, learner_gpus=0, cpus_per_actor=1)


@dataclass
class _Prompt:
    id: str
    prompt: str
    input_image: torch.Tensor


def test_learner_group_on_ray(ray_cluster, world1, tiny_paths, tmp_path):
    """2 ranks as Ray actors in a placement group: train on rollout GroupSamples passed by reference, publish,
    save and load; the step matches a plain 1-rank trainer on the same samples."""
    ray = ray_cluster
    model = ModelConfig(dtype="float32", cache_dir=str(tmp_path / "cache"))
    spec = functools.partial(policies.load_policy, model, str(tiny_paths["flux_kontext"]), use_gpu=False)
    # DESIGN lr 3e-4: at 1e-2, AdamW's first step amplifies world-size rounding to ~1e-6 (see below)
    nft, learner = sections(backend="gloo")
    group = LearnerGroup(spec, nft, learner, TWO_RANKS, parity=ROLLOUT)
    try:
        # Rollouts: the old policy (version 0) samples 2 prompts x 2 candidates; refs go to the learners.
        rollout_policy = functools.partial(spec, lora=nft)()
        weights = PolicyWeights(rollout_policy, "lora")
        manifest_ref, weights_ref, _ = group.publishable(0)
        weights.load(0, ray.get(manifest_ref), ray.get(weights_ref))  # names and shapes fit the rollout adapter
        g = torch.Generator().manual_seed(0)
        prompts = [
            _Prompt(f"p{i}", text, torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8))
            for i, text in enumerate(PROMPTS)
        ]
        groups = [gs for gs, _ in Sampler(rollout_policy, ROLLOUT).sample(prompts, step=0, version=weights.version)]
        refs = [ray.put(gs) for gs in groups]
        r = [[1.0, 0.0], [0.25]]  # 3 samples: uneven on 2 ranks; group 1's second candidate is left out

        theta0 = ray.get(group.gather("theta"))
        metrics = group.train_step(refs, r, step=0)
        assert metrics["n_valid"] == 3 and metrics["old_decay"] == old_policy_decay(1)
        manifest_ref, weights_ref, probe_ref = group.publishable(1)
        manifest, old1 = WeightManifest.unpack(ray.get(manifest_ref)), ray.get(weights_ref)
        # Weight parity: a rollout loading version 1 computes what the 2 sharded ranks' old policy computes.
        rollout = RolloutWorker("rollout-0", lambda: rollout_policy, ROLLOUT, "lora")
        rollout.load(PublishedWeights(1, ray.get(manifest_ref), None, ray.get(probe_ref)), old1)
        assert rollout.weights.version == 1 and rollout.parity_error <= ROLLOUT.parity_tolerance["float32"]
        assert manifest.version == 1 and manifest == WeightManifest.of(old1, version=1, kind="lora")
        theta1 = ray.get(group.gather("theta"))
        d = old_policy_decay(1)
        for name, t in old1.items():  # old = d * old + (1 - d) * θ, from old = θ0
            torch.testing.assert_close(t, d * theta0[name] + (1 - d) * theta1[name], rtol=0, atol=1e-7)

        # The same step by a plain 1-rank trainer in this process. Its gradients sum in another order, and the
        # first AdamW step moves an entry by lr * g / (|g| + eps) whatever |g| is, so entries whose gradient
        # nearly cancels carry rounding up to ~1e-4 * lr; at lr 3e-4 that is far below the tolerance.
        plain = NFTTrainer(spec(), nft, learner)
        samples = [
            TrainSample(gs.prompt_id, k, gs.x0[k], gs.cond, gs.sigmas, rk)
            for gs, rs in zip(groups, r, strict=True)
            for k, rk in enumerate(rs)
        ]
        reference = plain.train_step(rank_samples(samples, 1, 0, learner.micro_batch), len(samples), 0)
        assert metrics["loss"] == pytest.approx(reference["loss"], rel=1e-6)
        for name, t in plain.gather("theta").items():
            torch.testing.assert_close(theta1[name], t, rtol=0, atol=1e-6)

        # Save after step 0 (each rank its own shards, rank 0 also the LoRA export); step 1; load; step 1 again
        # gives the same loss.
        written = group.save(str(tmp_path / "ckpt"), export=True)
        assert written == ["learner/.metadata", "learner/__0_0.distcp", "learner/__1_0.distcp",
                           "lora/pytorch_lora_weights.safetensors"]  # fmt: skip
        uninterrupted = group.train_step(refs, r, step=1)
        assert group.load(str(tmp_path / "ckpt" / "learner")) == 1
        assert group.train_step(refs, r, step=1)["loss"] == uninterrupted["loss"]
    finally:
        group.shutdown()


@pytest.mark.slow  # two rank actors started: one of the fast loop's longest tests (CI runs it)
def test_learner_group_fails_fast_when_a_rank_fails_to_start(ray_cluster, tiny_paths):
    import time

    from tests.learner_harness import BrokenOnRank1

    t0 = time.time()
    with pytest.raises(ray_cluster.exceptions.RayTaskError, match="rank 1 cannot load its model"):
        LearnerGroup(BrokenOnRank1(str(tiny_paths["flux_kontext"])), *sections(), TWO_RANKS)
    assert time.time() - t0 < 120
