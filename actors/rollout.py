"""The rollout worker: the Ray shell around `Sampler` (actors/sampler.py), one per rollout GPU.

Each call carries the weights it must sample with (`PublishedWeights`, handed over by the driver); the worker
loads them in place when its version differs and returns each group's training sample, its decoded images and
small metadata as separate objects, so reward workers never fetch latents and learners never fetch images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from actors.sampler import Prompt, ReferenceForwards, Sampler
from common.config import RolloutConfig
from models.policy import EditPolicy
from models.weights import PolicyWeights, PublishedWeights


class RolloutWorker:
    """Wrap at the call site: `ray.remote(num_gpus=g)(RolloutWorker)`."""

    def __init__(
        self,
        name: str,
        build_policy: Callable[[], EditPolicy],
        cfg: RolloutConfig,
        weight_kind: str,
        reference: ReferenceForwards | None = None,
    ) -> None:
        policy = build_policy()
        self.name = name
        self.weights = PolicyWeights(policy, weight_kind)
        self.sampler = Sampler(policy, cfg, reference)

    def ready(self) -> str:
        return self.name

    def sample(self, step: int, weights: PublishedWeights, *prompts: Prompt) -> list[Any]:
        """[group, images, meta] per prompt, flat; call with `.options(num_returns=3 * len(prompts))`.

        Three objects so each consumer fetches only its part: the learner the GroupSample, the reward worker
        the images, the driver the small metadata (version, timings).
        """
        if weights.version != self.weights.version:
            self.weights.load(weights.version, weights.manifest, ray.get(weights.tensors))
        pairs = self.sampler.sample(list(prompts), step, self.weights.version)
        return [x for g, images in pairs for x in (g, images, {"version": g.version, "worker": self.name, **g.timing})]
