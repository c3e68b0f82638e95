"""The reward worker: the async Ray shell around `RewardScorer` (rewards/scorer.py), one per reward GPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from common import telemetry
from common.faults import fault_point
from common.net import whereabouts
from rewards.scorer import GroupReward, RewardScorer


class RewardWorker:
    """Wrap at the call site: `ray.remote(num_gpus=g)(RewardWorker)`; the scorer is built in the actor's process.
    `name` tags its metrics (default: reward-<head of its actor id>)."""

    def __init__(self, build_scorer: Callable[[], RewardScorer], name: str = "") -> None:
        telemetry.bind("reward", name or telemetry.actor_name("reward"))
        self.scorer = build_scorer()
        self.calls = 0
        self.busy = telemetry.Busy()  # busy while any group is being scored (calls overlap)

    def ready(self) -> bool:
        return True

    def where(self) -> str:
        return whereabouts()

    async def score(self, example: Any, candidates: torch.Tensor) -> GroupReward:
        self.calls += 1
        with self.busy.call():
            fault_point("reward.score", self.calls)
            return await self.scorer.score(
                example.id, example.prompt, example.input_image, example.target_image, candidates
            )

    def counters(self) -> dict[str, int]:
        return self.scorer.counters()
