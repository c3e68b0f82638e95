"""`RewardScorer.close` (rewards/scorer.py) and `RewardWorker.close`: the flow batcher task ends when the reward
worker stops, so its process no longer prints "Task was destroyed but it is pending!" on the way out."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest
import torch

from motionnft_core.config import RewardConfig
from rewards.flow_scorer import FlowItem
from rewards.scorer import RewardScorer
from rewards.worker import RewardWorker

DESTROYED = "Task was destroyed but it is pending"


class _Flow:
    """Stands for FlowRewardScorer: every candidate scores 1."""

    def score(self, items: list[FlowItem]) -> list[dict[str, torch.Tensor]]:
        return [{"reward": torch.ones(len(item.candidates))} for item in items]


def _score_once(scorer: RewardScorer) -> asyncio.Task:
    """One group of one candidate, scored in a task of its own."""
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    return asyncio.get_running_loop().create_task(scorer.score("p", "move it", image, image, image[None]))


def _run_worker(close: bool) -> None:
    """As a reward worker's process lives and ends: score a group on its event loop, (close,) the loop goes."""
    worker = RewardWorker(lambda: RewardScorer(_Flow(), [], RewardConfig(flow_weight=1.0, judge_weight=0.0)))
    loop = asyncio.new_event_loop()

    async def life(worker: RewardWorker) -> None:
        reward = await _score_once(worker.scorer)
        assert reward.reward == [1.0]
        if close:
            await worker.close()
            assert worker.scorer._batcher is None

    loop.run_until_complete(life(worker))
    loop.close()  # the loop ends without cancelling what is left, as a killed actor's does
    del worker, loop
    gc.collect()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the unclosed one's loop is gone
def test_closed_worker_leaves_no_pending_task(caplog):
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _run_worker(close=False)  # the symptom, so that this test can fail
    assert DESTROYED in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _run_worker(close=True)
    assert DESTROYED not in caplog.text


def test_close_cancels_waiting_callers_and_a_new_score_starts_a_new_batcher():
    async def main() -> None:
        waits = RewardConfig(flow_weight=1.0, judge_weight=0.0, max_wait_ms=10_000, batch_pairs=64)
        scorer = RewardScorer(_Flow(), [], waits)
        await scorer.close()  # never scored: nothing to stop
        waiting = _score_once(scorer)  # parked in the batch, which waits for more pairs
        await asyncio.sleep(0.05)
        await scorer.close()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        scorer.max_wait_s = 0.0
        assert (await _score_once(scorer)).reward == [1.0]
        await scorer.close()

    asyncio.run(main())
