"""Run as a Ray job on the namespaced multi-node cluster (tests/system/test_multinode.py), never by pytest itself.

A judge replica the way the service starts it, placed on node B (`rollout_slot`), with the API key from the
job's runtime env; a reward worker placed on node A (`learner_slot`) scores one group through it; requests
from node A without the key and with a wrong one. Prints one `PROBE {json}` line for the test to read.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import httpx
import ray
import torch

from motionnft_core.config import JudgeConfig, RewardConfig
from motionnft_core.data.motionedit import MotionExample
from motionnft_core.models.tiny_judge import judge_source
from motionnft_core.net import node_address
from motionnft_core.secret import Secret, secret_from_env
from rewards.judge_server import JudgeServerActor
from rewards.scorer import build_reward_scorer
from rewards.worker import RewardWorker


@ray.remote(num_cpus=0.5, resources={"learner_slot": 1})
def unauthorized(url: str) -> dict[str, object]:
    """From node A: the chat API without a key and with a wrong one."""
    body = {"model": "judge", "messages": [{"role": "user", "content": "1"}], "max_tokens": 1}
    wrong = {"Authorization": f"Bearer {Secret('not-the-key').reveal()}"}
    return {
        "node": node_address(),
        "no_key": httpx.post(f"{url}/chat/completions", json=body, timeout=30).status_code,
        "wrong_key": httpx.post(f"{url}/chat/completions", json=body, headers=wrong, timeout=30).status_code,
    }


def main(cache_dir: str) -> None:
    ray.init()
    cfg = JudgeConfig(tiny=True, max_model_len=2048, max_retries=1, backoff_s=0.1, startup_timeout_s=240,
                      retry_budget_s=60)
    key = secret_from_env(cfg.api_key_env)
    assert key is not None, f"{cfg.api_key_env} must come from the job's runtime env"
    judge = JudgeServerActor.options(num_cpus=0.5, resources={"rollout_slot": 1}).remote(
        functools.partial(judge_source, cfg, cache_dir), cfg, api_key=key
    )
    url = ray.get(judge.url.remote())
    reward = RewardConfig(flow_weight=0.0, judge_weight=1.0, judge=cfg)
    scorer = functools.partial(build_reward_scorer, reward, [url], device="cpu", cache_dir=cache_dir, judge_key=key)
    worker = ray.remote(RewardWorker).options(num_cpus=0.5, resources={"learner_slot": 1}).remote(scorer)
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g)
    example = MotionExample("probe-0", "move the square to the right", image, image.roll(8, -1), None)
    candidates = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=g)
    group, _ = ray.get(worker.score.remote(example, candidates))
    counters = ray.get(worker.counters.remote())
    denied = ray.get(unauthorized.remote(url))
    log = ray.get(judge.log_tail.remote(100_000))
    ray.get(judge.stop.remote())
    print("PROBE " + json.dumps({
        "url": url, "judge_scores": group.components["judge/score"], "counters": counters, **denied,
        "key_in_judge_log": key.reveal() in log, "log_lines": len(log.splitlines()),
        "driver_node": node_address(), "key_env_set": bool(os.environ.get(cfg.api_key_env)),
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
