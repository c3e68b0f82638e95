"""The reward scorer: flow reward and judge client micro-batched across groups, blended, failing a group whose
judge cannot answer (the RewardWorker actor with a live vLLM judge: tests/ray/test_reward_worker.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from motionnft_core.config import FlowRewardConfig, JudgeConfig, RewardConfig
from rewards.flow_scorer import FlowItem, FlowRewardScorer, build_flow_scorer
from rewards.judge import JudgeClient, JudgeError
from rewards.scorer import RewardScorer, blend, build_reward_scorer
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
