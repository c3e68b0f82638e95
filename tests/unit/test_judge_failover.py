"""Judge client across replicas (part 1): failover, the skip-a-failing-replica breaker, a retry budget
in time, and the judge's error intact at the driver. The HTTP transport is scripted here (which replica is up
when); tests/system/test_judge_outage.py kills a real vLLM server."""

from __future__ import annotations

import asyncio
import math
import pickle
import time

import httpx
import pytest

from motionnft_core.config import JudgeConfig
from rewards.judge import JudgeClient, JudgeError

LIVE, DEAD = "http://live:1/v1", "http://dead:1/v1"
PROBS = [0.05, 0.05, 0.1, 0.2, 0.3, 0.3]
REPLY = {"choices": [{"logprobs": {"content": [{"top_logprobs": [
    {"token": str(d), "logprob": math.log(p)} for d, p in enumerate(PROBS)]}]}}]}  # fmt: skip


def _client(urls, up: dict[str, float], **cfg) -> tuple[JudgeClient, list[str]]:
    """A client whose transport answers a replica only once the time `up[host]` (seconds from now) has come."""
    t0, hits = time.monotonic(), []

    def handler(request: httpx.Request) -> httpx.Response:
        hits.append(request.url.host)
        if time.monotonic() - t0 < up.get(request.url.host, math.inf):
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json=REPLY)

    client = JudgeClient(urls, JudgeConfig(**{"backoff_s": 0.02, "max_backoff_s": 0.1, **cfg}))
    client.transport = httpx.MockTransport(handler)
    return client, hits


async def _ask(client: JudgeClient, n: int = 1) -> list:
    client._state().http._transport = client.transport  # only the transport is scripted, not the client
    return [await client._ask(["data:,", "data:,"], "prompt") for _ in range(n)]


def test_a_dead_replica_is_failed_over_and_then_skipped():
    client, hits = _client([DEAD, LIVE], {"live": 0.0}, backoff_s=0.2, max_backoff_s=1.0)  # dead skipped 0.4 s
    (probs, attempts), (_, second) = asyncio.run(_ask(client, 2))
    assert probs == pytest.approx(PROBS) and attempts == 2
    assert hits == ["dead", "live", "live"]  # the second call skips the replica that just failed
    assert second == 1 and client.metrics["failovers"] == 1 and client.metrics["connection_errors"] == 1


def test_a_restarting_replica_is_waited_for_within_the_budget():
    client, hits = _client([LIVE], {"live": 0.4}, max_retries=1, retry_budget_s=30)
    ((probs, attempts),) = asyncio.run(_ask(client))
    assert probs == pytest.approx(PROBS) and attempts == len(hits) > 2  # beyond max_retries: the budget held
    assert client.metrics["failures"] == 0 and client.metrics["requests"] == len(hits)
    assert client.metrics["connection_errors"] == len(hits) - 1  # refused until it was back, then answered


def test_after_the_budget_the_call_fails_naming_it():
    client, hits = _client([DEAD], {}, max_retries=1, retry_budget_s=0.3)
    began = time.monotonic()
    with pytest.raises(JudgeError, match=r"cannot reach .* \(retried for \d+s: reward.judge.retry_budget_s\)"):
        asyncio.run(_ask(client))
    assert time.monotonic() - began < 0.3 + 0.5 and len(hits) > 2  # no try is started past the budget
    assert client.metrics["failures"] == 1 and client.metrics["waits_no_replica"] >= 1


def test_a_call_starting_while_every_replica_is_skipped_waits_no_longer_than_its_budget():
    """Earlier failures skip the only replica for max_backoff_s (30 s); a new call with a 0.3 s budget still
    makes one try by the end of its budget and fails then, not after the skip."""
    client, hits = _client([DEAD], {}, backoff_s=10, max_backoff_s=30, retry_budget_s=0.3)
    client._fails[0], client._skip_until[0] = 5, time.monotonic() + 30
    began = time.monotonic()
    with pytest.raises(JudgeError, match="cannot reach"):
        asyncio.run(_ask(client))
    assert 0.25 < time.monotonic() - began < 1.5 and hits == ["dead"]
    assert client.metrics["waits_no_replica"] == 1


def test_judge_error_survives_pickling_with_its_message():
    err = JudgeError("HTTP 503 from http://judge/v1/chat/completions", "overloaded", 4)
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.attempts == 4 and back.last_reply == "overloaded"
