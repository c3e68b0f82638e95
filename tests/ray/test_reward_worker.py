"""The reward pool: flow reward + live vLLM judge behind a RewardWorker actor, micro-batched across groups, its
counters and its Ray metrics (the plain scorer: tests/unit/test_reward_scorer.py)."""

from __future__ import annotations

import functools
import time

import pytest
import torch

from motionnft_core.config import FlowRewardConfig, JudgeConfig, RewardConfig
from rewards.scorer import build_reward_scorer
from rewards.worker import RewardWorker
from tests.conftest import synthetic_examples
from tests.prometheus import scrape

SIZE = 64
FLOW = FlowRewardConfig(estimator="dis")  # docs/algorithm.md constants, OpenCV flow on the CPU


def _reward(**overrides) -> RewardConfig:
    return RewardConfig(flow=FLOW, **overrides)


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return synthetic_examples(tmp_path_factory.mktemp("reward-data"), 6, size=SIZE, seed=3)


def _candidates(ex) -> torch.Tensor:
    """K=3: the ground truth itself (a perfect edit), the unchanged input (no motion), and the target flipped."""
    return torch.stack([ex.target_image, ex.input_image, ex.target_image.flip(-1)])


def test_reward_pool_scores_groups_with_flow_and_live_judge(ray_cluster, vllm_judge, examples, tmp_path):
    ray = ray_cluster
    url = vllm_judge.url
    cfg = _reward(judge=JudgeConfig(max_retries=2, backoff_s=0.1), batch_pairs=64, max_wait_ms=300)
    spec = functools.partial(build_reward_scorer, cfg, [url], device="cpu", cache_dir=str(tmp_path))
    worker = ray.remote(RewardWorker).options(num_cpus=0.5).remote(spec, "reward-live")
    example_refs = [ray.put(ex) for ex in examples[:3]]
    image_refs = [ray.put(_candidates(ex)) for ex in examples[:3]]
    results = ray.get([worker.score.remote(e, i)[0] for e, i in zip(example_refs, image_refs, strict=True)])
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
