"""The reward pool: flow reward + live vLLM judge behind a RewardWorker actor, micro-batched across groups."""

from __future__ import annotations

import asyncio
import functools
import os
import time

import pytest
import torch

from motionnft_core.config import FlowRewardConfig, JudgeConfig, RewardConfig
from motionnft_core.data.motionedit import MotionEditDataset
from motionnft_core.data.synthetic import generate_synthetic
from rewards.flow_scorer import FlowItem, FlowRewardScorer, build_flow_scorer
from rewards.judge import JudgeClient, JudgeError
from rewards.scorer import RewardScorer, blend, build_reward_scorer
from rewards.worker import RewardWorker
from tests.prometheus import scrape

os.environ["RAY_AUTH_MODE"] = "disabled"
SIZE = 64
FLOW = FlowRewardConfig(estimator="dis")  # DESIGN §3 constants, OpenCV flow on the CPU


def _reward(**overrides) -> RewardConfig:
    return RewardConfig(flow=FLOW, **overrides)


def _dis() -> FlowRewardScorer:
    return build_flow_scorer(FLOW, device="cpu", cache_dir="/tmp/motionnft-test-cache")


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    src = generate_synthetic(tmp_path_factory.mktemp("reward-data"), 6, size=SIZE, seed=3)
    ds = MotionEditDataset.from_source(str(src), resolution=(SIZE, SIZE), on_error="raise")
    return [ds[i] for i in range(len(ds))]


def _candidates(ex) -> torch.Tensor:
    """K=3: the ground truth itself (a perfect edit), the unchanged input (no motion), and the target flipped."""
    return torch.stack([ex.target_image, ex.input_image, ex.target_image.flip(-1)])


def test_blend_weights():
    f, j = torch.tensor([1.0, 0.0]), torch.tensor([0.2, 0.6])
    torch.testing.assert_close(blend(f, j, flow_weight=0.5, judge_weight=0.5), torch.tensor([0.6, 0.3]))
    torch.testing.assert_close(blend(f, None, flow_weight=1.0, judge_weight=0.0), f)


def test_flow_only_scorer_batches_across_concurrent_groups(examples):
    cfg = _reward(flow_weight=1.0, judge_weight=0.0, batch_pairs=64, max_wait_ms=200)
    scorer = RewardScorer(_dis(), [], cfg)

    async def score_all():
        return await asyncio.gather(
            *[scorer.score(ex.id, ex.prompt, ex.input_image, ex.target_image, _candidates(ex)) for ex in examples]
        )

    results = asyncio.run(score_all())
    assert scorer.metrics["groups"] == len(examples)
    assert scorer.metrics["flow_calls"] < len(examples)  # concurrent groups shared estimator calls
    # The same numbers as scoring each group alone.
    alone = _dis()
    for ex, res in zip(examples, results, strict=True):
        ref = alone.score([_flow_item(ex)])[0]
        assert res.reward == pytest.approx(ref["reward"].double().tolist())
        assert res.components["flow/l_q"] == pytest.approx(ref["l_q"].double().tolist())
        # A perfect edit beats no motion at all (on the unquantized score s: quantization may tie them).
        assert res.reward[0] == 1.0 and res.components["flow/score"][0] > res.components["flow/score"][1]


def _flow_item(ex):
    return FlowItem(ex.id, ex.input_image, ex.target_image, _candidates(ex))


def test_zero_weight_component_is_never_built():
    kwargs = {"device": "cpu", "cache_dir": "/tmp/motionnft-test-cache"}
    scorer = build_reward_scorer(_reward(flow_weight=0.0, judge_weight=1.0), ["http://127.0.0.1:9/v1"], **kwargs)
    assert scorer.flow is None and len(scorer.judges) == 1
    scorer = build_reward_scorer(_reward(flow_weight=1.0, judge_weight=0.0), ["http://127.0.0.1:9/v1"], **kwargs)
    assert scorer.judges == [] and scorer.flow is not None


def test_judge_failure_fails_the_group_instead_of_scoring(examples):
    """A dead judge endpoint: retried, counted, then the group raises (never a silent default score)."""
    cfg = JudgeConfig(max_retries=1, backoff_s=0.01, timeout_s=2, retry_budget_s=0)
    judge = JudgeClient("http://127.0.0.1:9/v1", cfg)
    scorer = RewardScorer(_dis(), [judge], _reward())
    ex = examples[0]
    with pytest.raises(JudgeError):
        asyncio.run(scorer.score(ex.id, ex.prompt, ex.input_image, ex.target_image, _candidates(ex)))
    m = scorer.judge_metrics()  # K requests in flight at once: each retried before the group fails
    assert m["retries"] >= 1 and m["failures"] >= 1 and m["connection_errors"] >= 2
    counters = scorer.counters()  # what the driver logs as reward_workers/...
    assert counters["judge/retries"] == m["retries"] and counters["judge/failures"] == m["failures"]


def test_reward_pool_scores_groups_with_flow_and_live_judge(ray_cluster, vllm_judge, examples):
    ray = ray_cluster
    url = vllm_judge.url
    cfg = _reward(judge=JudgeConfig(max_retries=2, backoff_s=0.1), batch_pairs=64, max_wait_ms=300)
    spec = functools.partial(build_reward_scorer, cfg, [url], device="cpu", cache_dir="/tmp/motionnft-test-cache")
    worker = ray.remote(RewardWorker).options(num_cpus=0.5).remote(spec, "reward-live")
    example_refs = [ray.put(ex) for ex in examples[:3]]
    image_refs = [ray.put(_candidates(ex)) for ex in examples[:3]]
    results = ray.get([worker.score.remote(e, i) for e, i in zip(example_refs, image_refs, strict=True)])
    for ex, res in zip(examples[:3], results, strict=True):
        assert res.prompt_id == ex.id and len(res.reward) == 3
        flow, judge = res.components["flow/reward"], res.components["judge/score"]
        assert all(0.0 <= j <= 1.0 for j in judge)
        assert res.reward == pytest.approx([0.5 * f + 0.5 * j for f, j in zip(flow, judge, strict=True)])
        score = res.components["flow/score"]
        assert flow[0] == 1.0 and score[0] > score[1]
        assert {"flow/l_q", "flow/direction", "flow/move", "flow/score"} <= res.components.keys()
    metrics = ray.get(worker.counters.remote())
    assert metrics["groups"] == 3 and metrics["flow_calls"] < 3
    assert metrics["judge/requests"] == 9 and metrics["judge/failures"] == 0
    # Every group of these 3 prompts needed its input -> target flow once: 3 misses, then estimated.
    assert metrics["flow/cache_misses"] == 3 and metrics["flow/pairs_estimated"] == 3 + 9
    # Until every series is in: a worker reports its metrics in batches, and the score phase can come a report later.
    live = _scrape_worker(ray, "reward-live", until=lambda x: x.get(("judge_latency", "")) == 9
                          and x.get(("phase", "judge")) == 3 and x.get(("phase", "score")) == 3)  # fmt: skip
    ray.kill(worker)
    # The same, live, as this worker's Ray metrics (motionnft_core/telemetry.py) on the node's Prometheus endpoint.
    assert live[("judge_events", "requests")] == 9 and ("judge_events", "failures") not in live
    assert live[("judge_latency", "")] == 9 and live[("judge_latency_sum", "")] > 0
    assert live[("phase", "judge")] == 3 and live[("phase", "score")] == 3
    assert live[("phase", "flow")] == metrics["flow_calls"] and 0 < live[("busy", "")] <= 1


def _scrape_worker(ray, worker: str, until, timeout_s: float = 30.0) -> dict[tuple[str, str], float]:
    """A worker's judge events, judge latency count and sum, phase call counts and busy fraction, scraped from the
    session node's Prometheus endpoint until `until` holds (workers report every second, conftest.ray_cluster)."""
    node = ray.nodes()[0]
    deadline = time.monotonic() + timeout_s
    while True:
        found: dict[tuple[str, str], float] = {}
        for s in scrape(node["MetricsExportPort"], "ray_motionnft_", host=node["NodeManagerAddress"]):
            if s.label("worker") != worker or s.label("pool") != "reward":
                continue
            key = {"ray_motionnft_judge_events_total": ("judge_events", s.label("event")),
                   "ray_motionnft_judge_latency_seconds_count": ("judge_latency", ""),
                   "ray_motionnft_judge_latency_seconds_sum": ("judge_latency_sum", ""),
                   "ray_motionnft_phase_seconds_count": ("phase", s.label("phase")),
                   "ray_motionnft_busy_fraction": ("busy", "")}.get(s.name)  # fmt: skip
            if key is not None:
                found[key] = s.value
        if until(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.25)
