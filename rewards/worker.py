"""The reward worker: the async Ray shell around `RewardScorer` (rewards/scorer.py), one per reward GPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from common.faults import fault_point
from common.net import whereabouts
from rewards.scorer import GroupReward, RewardScorer


class RewardWorker:
    """Wrap at the call site: `ray.remote(num_gpus=g)(RewardWorker)`; the scorer is built in the actor's process."""

    def __init__(self, build_scorer: Callable[[], RewardScorer]) -> None:
        self.scorer = build_scorer()
        self.calls = 0

    def ready(self) -> bool:
        return True

    def where(self) -> str:
        return whereabouts()

    async def score(self, example: Any, candidates: torch.Tensor) -> GroupReward:
        self.calls += 1
        fault_point("reward.score", self.calls)
        return await self.scorer.score(
            example.id, example.prompt, example.input_image, example.target_image, candidates
        )

    def counters(self) -> dict[str, int]:
        return self.scorer.counters()
