"""The reward scorer: flow reward and judge client micro-batched across groups, blended, failing a group whose
judge cannot answer (the RewardWorker actor with a live vLLM judge: tests/ray/test_reward_worker.py); closing it
ends its batcher task, so a reward worker's process no longer prints "Task was destroyed but it is pending!"."""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path

import pytest
import torch

from motionnft_core.config import FlowRewardConfig, JudgeConfig, RewardConfig
from rewards.flow_scorer import FlowItem, FlowRewardScorer, build_flow_scorer
from rewards.judge import JudgeClient, JudgeError
from rewards.scorer import RewardScorer, blend, build_reward_scorer
from rewards.worker import RewardWorker
from tests.conftest import synthetic_examples

SIZE = 64
FLOW = FlowRewardConfig(estimator="dis")  # docs/algorithm.md constants, OpenCV flow on the CPU


def _reward(**overrides) -> RewardConfig:
    return RewardConfig(flow=FLOW, **overrides)


def _dis(cache: Path) -> FlowRewardScorer:
    return build_flow_scorer(FLOW, device="cpu", cache_dir=str(cache))


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return synthetic_examples(tmp_path_factory.mktemp("reward-data"), 6, size=SIZE, seed=3)


def _candidates(ex) -> torch.Tensor:
    """K=3: the ground truth itself (a perfect edit), the unchanged input (no motion), and the target flipped."""
    return torch.stack([ex.target_image, ex.input_image, ex.target_image.flip(-1)])


def test_blend_weights():
    f, j = torch.tensor([1.0, 0.0]), torch.tensor([0.2, 0.6])
    torch.testing.assert_close(blend(f, j, flow_weight=0.5, judge_weight=0.5), torch.tensor([0.6, 0.3]))
    torch.testing.assert_close(blend(f, None, flow_weight=1.0, judge_weight=0.0), f)


def test_flow_only_scorer_batches_across_concurrent_groups(examples, tmp_path):
    cfg = _reward(flow_weight=1.0, judge_weight=0.0, batch_pairs=64, max_wait_ms=200)
    scorer = RewardScorer(_dis(tmp_path), [], cfg)

    async def score_all():
        return await asyncio.gather(
            *[scorer.score(ex.id, ex.prompt, ex.input_image, ex.target_image, _candidates(ex)) for ex in examples]
        )

    results = asyncio.run(score_all())
    assert scorer.metrics["groups"] == len(examples)
    assert scorer.metrics["flow_calls"] < len(examples)  # concurrent groups shared estimator calls
    # The same numbers as scoring each group alone.
    alone = _dis(tmp_path)
    for ex, res in zip(examples, results, strict=True):
        ref = alone.score([_flow_item(ex)])[0]
        assert res.reward == pytest.approx(ref["reward"].double().tolist())
        assert res.components["flow/l_q"] == pytest.approx(ref["l_q"].double().tolist())
        # A perfect edit beats no motion at all (on the unquantized score s: quantization may tie them).
        assert res.reward[0] == 1.0 and res.components["flow/score"][0] > res.components["flow/score"][1]


def _flow_item(ex):
    return FlowItem(ex.id, ex.input_image, ex.target_image, _candidates(ex))


def test_zero_weight_component_is_never_built(tmp_path):
    kwargs = {"device": "cpu", "cache_dir": str(tmp_path)}
    scorer = build_reward_scorer(_reward(flow_weight=0.0, judge_weight=1.0), ["http://127.0.0.1:9/v1"], **kwargs)
    assert scorer.flow is None and len(scorer.judges) == 1
    scorer = build_reward_scorer(_reward(flow_weight=1.0, judge_weight=0.0), ["http://127.0.0.1:9/v1"], **kwargs)
    assert scorer.judges == [] and scorer.flow is not None


def test_judge_failure_fails_the_group_instead_of_scoring(examples, tmp_path):
    """A dead judge endpoint: retried, counted, then the group raises (never a silent default score)."""
    cfg = JudgeConfig(max_retries=1, backoff_s=0.01, timeout_s=2, retry_budget_s=0)
    judge = JudgeClient("http://127.0.0.1:9/v1", cfg)
    scorer = RewardScorer(_dis(tmp_path), [judge], _reward())
    ex = examples[0]
    with pytest.raises(JudgeError):
        asyncio.run(scorer.score(ex.id, ex.prompt, ex.input_image, ex.target_image, _candidates(ex)))
    m = scorer.judge_metrics()  # K requests in flight at once: each retried before the group fails
    assert m["retries"] >= 1 and m["failures"] >= 1 and m["connection_errors"] >= 2
    counters = scorer.counters()  # what the driver logs as reward_workers/...
    assert counters["judge/retries"] == m["retries"] and counters["judge/failures"] == m["failures"]


# ------------------------------------------------------------------------------------------------ close

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
