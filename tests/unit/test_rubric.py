"""The evaluation rubric (rewards/rubric.py) over a scripted judge transport: 0-5 scores from the
digit probabilities, and a judge that times out or answers garbage retried, counted, then the row marked failed
(never scored 0) while the other rows are scored. The real vLLM judge answers the same calls in test_judge."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest
import torch

from motionnft_core.config import JudgeConfig
from rewards.judge_prompts import RUBRIC, prompt_digest, rubric_prompt
from rewards.rubric import CRITERIA, judge_model_name, judge_rubric_many, rubric_client

URL = "http://judge:1/v1"
# Per criterion (by its aspect line in the prompt): digit probabilities and their expected digit Σ k·p_k.
PROBS = {
    "instruction fidelity.": [0.0, 0.0, 0.0, 0.0, 0.5, 0.5],  # 4.5
    "preservation of the original.": [0.1, 0.1, 0.2, 0.2, 0.2, 0.2],  # 0.1 + 0.4 + 0.6 + 0.8 + 1.0 = 2.9
    "visual coherence.": [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],  # 2.0
}
EXPECTED = {"fidelity": 4.5, "preservation": 2.9, "coherence": 2.0}


def _reply(probs: list[float]) -> dict:
    top = [{"token": str(d), "logprob": math.log(p) if p > 0 else -9999.0} for d, p in enumerate(probs)]
    return {"choices": [{"logprobs": {"content": [{"top_logprobs": top}]}}]}


def _handler(seen: dict[tuple[str, str], int]):
    """Answers by the instruction: 'good' always, 'garbage' never parseably, 'slow' never in time, 'flaky' with
    garbage on the first attempt of each criterion and a good answer after."""

    def handle(request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["messages"][0]["content"][-1]["text"]
        aspect = next(a for a in PROBS if f"aspect of the edited image: {a}" in prompt)
        kind = next(k for k in ("good", "garbage", "slow", "flaky") if f"[{k}]" in prompt)
        seen[(kind, aspect)] = seen.get((kind, aspect), 0) + 1
        if kind == "slow":
            raise httpx.ReadTimeout("timed out", request=request)
        if kind == "garbage" or (kind == "flaky" and seen[(kind, aspect)] == 1):
            return httpx.Response(200, json={"choices": [{"message": {"content": "five stars"}, "logprobs": None}]})
        return httpx.Response(200, json=_reply(PROBS[aspect]))

    return handle


def _run(kinds: list[str], **cfg) -> tuple[list, dict, dict]:
    client = rubric_client(URL, JudgeConfig(**{"backoff_s": 0.001, "max_backoff_s": 0.01, "max_retries": 2,
                                               "retry_budget_s": 0, **cfg}))  # fmt: skip
    seen: dict[tuple[str, str], int] = {}
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)

    async def go():
        client._state().http._transport = httpx.MockTransport(_handler(seen))  # only the transport is scripted
        return await judge_rubric_many(client, [image] * len(kinds), [image] * len(kinds),
                                       [f"raise the arm [{k}]" for k in kinds])  # fmt: skip

    return asyncio.run(go()), client.metrics, seen


def test_scores_are_expected_digits_on_0_to_5_and_overall_is_their_mean():
    (row,), metrics, _ = _run(["good"])
    assert not row.failed and row.error == "" and row.attempts == 3  # one call per criterion
    for name, value in EXPECTED.items():
        assert getattr(row, name) == pytest.approx(value, abs=1e-9)
    assert row.overall == pytest.approx((4.5 + 2.9 + 2.0) / 3, abs=1e-9)
    assert row.digit_probs["preservation"] == pytest.approx(PROBS["preservation of the original."], abs=1e-9)
    assert metrics["requests"] == 3 and metrics["failures"] == 0


def test_garbage_and_timeouts_are_retried_counted_then_the_row_fails_and_the_others_are_scored():
    rows, metrics, seen = _run(["good", "garbage", "slow", "flaky"])
    good, garbage, slow, flaky = rows
    assert not good.failed and not flaky.failed
    assert flaky.attempts == 6 and flaky.overall == pytest.approx(good.overall)  # retried once per criterion
    for row, why in ((garbage, "unparseable reply"), (slow, "timeout")):
        assert row.failed and why in row.error
        assert (row.fidelity, row.preservation, row.coherence, row.overall, row.digit_probs) == (None,) * 5  # not 0
    # max_retries = 2: a criterion that never answers usably was tried 3 times before its row failed (its sibling
    # criteria may be cancelled once one of them fails, so at least one criterion reached 3).
    assert max(seen[("garbage", a)] for a in PROBS) == 3 and max(seen[("slow", a)] for a in PROBS) == 3
    assert metrics["failures"] >= 2 and metrics["unparseable"] >= 3 + 3 and metrics["timeouts"] >= 3
    assert metrics["retries"] >= 2 + 2 + 3


def test_the_rubric_client_asks_the_rubric_prompt_text():
    assert rubric_client(URL, JudgeConfig(mode="score")).cfg.mode == "rubric"
    assert list(CRITERIA) == list(RUBRIC)
    text = rubric_prompt("coherence", "turn the head")
    assert "turn the head" in text and "visual coherence." in text and "single digit from 0 to 5" in text
    assert len(prompt_digest()) == 12


def test_judge_model_name_says_what_judged():
    assert judge_model_name(JudgeConfig(model_path="s3://b/models/Qwen2.5-VL-32B-Instruct/")).startswith(
        "Qwen2.5-VL-32B-Instruct (s3://"
    )
    assert "tiny random-weight" in judge_model_name(JudgeConfig(tiny=True))
    assert judge_model_name(JudgeConfig(url="http://h:8000/v1", served_model_name="gemini")) == (
        "gemini at http://h:8000/v1"
    )
