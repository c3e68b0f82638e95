"""The judge's vLLM server as a Ray actor: it serves the tiny random Qwen2-VL judge, then stops, leaving nothing
of the server in the temp dir (the client and server alone: tests/unit/test_judge.py)."""

import asyncio
import tempfile
from pathlib import Path

import httpx
import pytest
import ray
import torch

from motionnft_core.config import JudgeConfig
from motionnft_core.models.tiny_judge import build_tiny_judge
from rewards.judge import JudgeClient
from rewards.judge_server import JudgeServerActor

INSTRUCTION = "Make the person raise both arms above the head."


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return build_tiny_judge(tmp_path_factory.mktemp("judge") / "tiny_judge")


def _cfg(**overrides) -> JudgeConfig:
    """reward.judge with the tiny judge's context (2048 tokens: a 1 GiB CPU KV cache holds it)."""
    return JudgeConfig(max_model_len=2048, **overrides)


def _images(k: int = 3, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    source = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
    candidates = torch.randint(0, 256, (k, 3, size, size), dtype=torch.uint8, generator=g)
    return source, candidates


def _temp_dir_entries() -> set[str]:
    """What vLLM would leave in the temp dir: its ZMQ sockets and file-store rendezvous (vllm_dist_*), any
    `vllm-<port>-` scratch folder of ours."""
    def left(p: Path) -> bool:
        return p.is_socket() or p.name.startswith("vllm_dist_") or (p.name.startswith("vllm-") and p.is_dir())

    return {p.name for p in Path(tempfile.gettempdir()).iterdir() if left(p)}


@pytest.mark.slow  # a vLLM server of its own: 45 s on 2 cores (the fast loop's judge tests share one)
def test_judge_server_actor_serves_and_stops(judge_dir, tmp_path_factory, ray_cluster):
    files = {"log_path": tmp_path_factory.mktemp("actor") / "vllm.log"}
    before = _temp_dir_entries()
    actor = JudgeServerActor.options(num_cpus=1).remote(str(judge_dir), _cfg(), host="127.0.0.1", **files)
    try:
        assert ray.get(actor.ready.remote(), timeout=330) is True
        assert len(_temp_dir_entries() - before) == 1  # the server's own scratch folder, holding its sockets
        url = ray.get(actor.url.remote())
        source, candidates = _images()
        result = asyncio.run(JudgeClient(url, _cfg()).score(source, candidates[0], INSTRUCTION))
        assert 0.0 <= result.score <= 1.0 and result.attempts == 1
        ray.get(actor.stop.remote(), timeout=60)
        assert ray.get(actor.ready.remote()) is False
        with pytest.raises(httpx.ConnectError):
            httpx.get(url.removesuffix("/v1") + "/health", timeout=5)
        assert _temp_dir_entries() - before == set()  # stop() removed it: nothing of the server is left there
    finally:
        ray.kill(actor)
