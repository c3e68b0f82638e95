"""The judge's API key: never printed, never in argv or a config, always where the server and clients need it."""

from __future__ import annotations

import asyncio
import pickle

import httpx

from motionnft_core.config import JudgeConfig
from motionnft_core.config_loader import config_to_dict, load_config
from motionnft_core.secret import Secret, secret_from_env
from rewards.judge import JudgeClient


def test_a_secret_never_prints_but_survives_pickling():
    s = Secret("s3cr3t-value")
    shown = [repr(s), str(s), f"{s}", repr([s]), repr({"key": s})]
    assert all("s3cr3t" not in text for text in shown) and repr(s) == "Secret(****)"
    assert pickle.loads(pickle.dumps(s)).reveal() == "s3cr3t-value"  # actors receive it pickled


def test_secret_from_env(monkeypatch):
    monkeypatch.setenv("MY_KEY", "abc")
    assert secret_from_env("MY_KEY").reveal() == "abc"
    monkeypatch.setenv("MY_KEY", "")
    assert secret_from_env("MY_KEY") is None
    one, two = secret_from_env("MY_KEY", generate=True), secret_from_env("MY_KEY", generate=True)
    assert len(one.reveal()) >= 32 and one != two  # a fresh random key per run


def test_config_holds_the_variable_name_only(monkeypatch):
    monkeypatch.setenv("MOTIONNFT_JUDGE_API_KEY", "planted-key-123")
    cfg = load_config("configs/tiny_cpu.yaml")
    assert cfg.reward.judge.api_key_env == "MOTIONNFT_JUDGE_API_KEY"
    assert "planted-key-123" not in repr(config_to_dict(cfg))


def test_the_server_gets_the_key_in_its_environment_not_its_argv(tmp_path, monkeypatch):
    from rewards.judge_server import VLLMServer

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("VLLM_API_KEY", "inherited-by-accident")
    server = VLLMServer(tmp_path, JudgeConfig(), port=1, api_key=Secret("the-key"))
    assert "the-key" not in " ".join(server.command()) and "--api-key" not in server.command()
    assert server._environment()["VLLM_API_KEY"] == "the-key"
    assert "VLLM_API_KEY" not in VLLMServer(tmp_path, JudgeConfig(), port=1)._environment()


def test_the_client_sends_the_key_as_a_bearer_token():
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(401, text="unauthorized")

    async def ask(client: JudgeClient) -> str:
        state = client._state()
        state.http._transport = httpx.MockTransport(handler)  # only the transport is replaced, not the client
        try:
            await client._ask(["data:,", "data:,"], "prompt")
        except Exception as e:  # noqa: BLE001 - the message is what is checked
            return str(e)
        return ""

    message = asyncio.run(ask(JudgeClient("http://judge/v1", JudgeConfig(max_retries=0), Secret("k-123"))))
    assert seen == ["Bearer k-123"] and "the API key is missing or wrong" in message and "k-123" not in message
    asyncio.run(ask(JudgeClient("http://judge/v1", JudgeConfig(max_retries=0))))
    assert seen[-1] is None
