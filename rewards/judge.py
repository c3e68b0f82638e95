"""MLLM judge client (docs/algorithm.md): asks vLLM's OpenAI-compatible chat API for scores (the server the service
starts is in rewards/judge_server.py; an external endpoint works the same).

Training score (reference method of MotionNFT): the judge sees [input image, candidate] and an instruction
asking for one digit 0-5; the first generated token is constrained to the six digits with vLLM structured
output, its log-probs over the digits are softmaxed and `r = sum(k * p_k) / 5`. Evaluation rubric: the same
call once per criterion (instruction fidelity, preservation, coherence), each mapped to [0, 1], and their mean.
Side by side (evaluation, `compare`): [input, edit A, edit B] and one digit, 0 = A clearly better, 5 = B.
Every prompt's text is in rewards/judge_prompts.py. Callers with prompts of their own (video curation,
curation/prompts.py) ask for a digit (`rate`), free text (`generate`) or one of a few labels (`choose`).

A timeout, HTTP error or unparseable reply is retried with exponential backoff and counted in
`JudgeClient.metrics`; when the retry budget is spent a `JudgeError` is raised. A failure never becomes a score.
"""

import asyncio
import base64
import io
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import torch
from PIL import Image

from motionnft_core import telemetry
from motionnft_core.config import JudgeConfig
from motionnft_core.secret import Secret
from rewards.judge_prompts import RUBRIC, pairwise_prompt, rubric_prompt, score_prompt

DIGITS = ("0", "1", "2", "3", "4", "5")
MAX_DIGIT = 5
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG"}  # reward.judge.image_format -> PIL format
# The six digits' raw probability mass must be within this of 1: otherwise the digit choice was not applied (an
# old server, an ignored request key) and the log-probs would not mean what the score assumes.
DIGIT_MASS_TOL = 0.05

METRIC_KEYS = (
    "requests",  # HTTP attempts sent
    "retries",  # attempts after the first one of a call
    "timeouts",  # attempts that hit timeout_s
    "connection_errors",  # attempts that could not reach the server (refused, reset)
    "server_errors",  # HTTP 5xx / 408 / 429 replies (retried)
    "client_errors",  # other non-200 replies (not retried: the request itself is wrong)
    "unparseable",  # 200 replies without six digit log-probs summing to ~1
    "failures",  # JudgeErrors raised
    "peak_in_flight",  # most requests in flight at once (a gauge, bounded by max_concurrency)
    "failovers",  # attempts sent to another replica than the previous attempt of the same call
    "waits_no_replica",  # times a call waited because every replica was being skipped after failures
    "latency_ms_sum",  # wall time of the answered (HTTP) attempts, for the mean latency ...
    "latency_ms_max",  # ... and the slowest one (a gauge)
)
# The events among them: also counted live as the Ray counter motionnft_judge_events{event}
# (motionnft_core/telemetry.py).
EVENT_KEYS = tuple(k for k in METRIC_KEYS if k not in ("peak_in_flight", "latency_ms_sum", "latency_ms_max"))
CHOICE_MAX_TOKENS = 32  # tokens a `choose` answer may take (the longest label, with room for any tokenizer)

T = TypeVar("T")


class JudgeError(RuntimeError):
    """A judge call that failed for good: carries the reason, the last reply text and the attempt count."""

    def __init__(self, reason: str, last_reply: str | None, attempts: int):
        self.reason = reason
        self.last_reply = last_reply
        self.attempts = attempts
        reply = "none" if last_reply is None else repr(last_reply[:500])
        super().__init__(f"judge failed after {attempts} attempt(s): {reason}; last reply: {reply}")

    def __reduce__(self):  # Ray pickles it to the driver: rebuild from the fields, not from the message
        return JudgeError, (self.reason, self.last_reply, self.attempts)


class UnparseableReply(ValueError):
    """A 200 reply whose first token does not carry a usable distribution over the six digits."""


@dataclass(frozen=True)
class JudgeScore:
    """One judged candidate.

    score: in [0, 1]; in rubric mode the mean of `sub_scores`.
    digit_probs: softmax over the digits 0..5 (score mode), or one such list per criterion (rubric mode).
    attempts: HTTP attempts this score took (summed over criteria in rubric mode).
    """

    score: float
    digit_probs: list[float] | dict[str, list[float]]
    attempts: int
    sub_scores: dict[str, float] | None = None


def digit_probs_from_reply(reply: Mapping, *, mass_tol: float = DIGIT_MASS_TOL) -> list[float]:
    """Softmax over the digits 0..5 of the first generated token's log-probs in a chat-completion reply.

    Digits are found by token text, not id, so the tokenizer does not matter. With the structured choice
    active, vLLM reports post-mask log-probs: the six digits carry all the mass (the rest is -9999). The raw
    digit mass must be within `mass_tol` of 1, otherwise the choice was not applied (an old server, a
    `guided_choice` that was silently ignored) and the numbers would not mean what we think.
    Raises UnparseableReply with the reason.
    """
    try:
        top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        found: dict[str, float] = {}
        for entry in top:
            token = entry["token"]
            if token in DIGITS and token not in found:  # sorted by log-prob: keep the first occurrence
                found[token] = float(entry["logprob"])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise UnparseableReply(f"no first-token top_logprobs ({type(exc).__name__}: {exc})") from exc
    missing = [d for d in DIGITS if d not in found]
    if missing:
        raise UnparseableReply(f"digits {missing} missing from the first token's top_logprobs")
    logprobs = [found[d] for d in DIGITS]
    if not all(math.isfinite(lp) for lp in logprobs):
        raise UnparseableReply(f"non-finite digit log-probs {logprobs}")
    mass = sum(math.exp(lp) for lp in logprobs)
    if abs(mass - 1.0) > mass_tol:
        raise UnparseableReply(f"digit probabilities sum to {mass:.4f}, not 1 +- {mass_tol}")
    top_lp = max(logprobs)
    exps = [math.exp(lp - top_lp) for lp in logprobs]
    total = sum(exps)
    return [e / total for e in exps]


def expected_digit(probs: Sequence[float]) -> float:
    """E = sum(k * p_k) over the digits 0..5."""
    if len(probs) != MAX_DIGIT + 1:
        raise ValueError(f"expected {MAX_DIGIT + 1} digit probabilities, got {len(probs)}")
    return sum(k * p for k, p in enumerate(probs))


def expected_digit_score(probs: Sequence[float]) -> float:
    """r = sum(k * p_k) / 5: the expected digit mapped to [0, 1]."""
    return expected_digit(probs) / MAX_DIGIT


def text_from_reply(reply: Mapping) -> str:
    """The generated text of a chat-completion reply, stripped; UnparseableReply when there is none."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise UnparseableReply(f"no message content ({type(exc).__name__}: {exc})") from exc
    if not isinstance(content, str) or not content.strip():
        raise UnparseableReply(f"empty or non-text content {content!r}")
    return content.strip()


def choice_from_reply(reply: Mapping, choices: Sequence[str]) -> str:
    """The one of `choices` a reply names: exactly, else ignoring case and surrounding quotes and dots;
    UnparseableReply otherwise (without a structured choice a model may answer anything)."""
    text = text_from_reply(reply)
    if text in choices:
        return text
    folded = {c.casefold(): c for c in choices}
    found = folded.get(text.strip("\"'. ").casefold())
    if found is None:
        raise UnparseableReply(f"{text[:80]!r} is none of {list(choices)}")
    return found


def _check_image(name: str, image: torch.Tensor, ndim: int = 3) -> None:
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise ValueError(f"{name} must be uint8 (0..255), got {image.dtype}")
    if image.ndim != ndim or image.shape[-3] != 3:
        want = "(3, H, W)" if ndim == 3 else "(K, 3, H, W)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(image.shape)}")


def _data_url(image: torch.Tensor, image_format: str) -> str:
    """uint8 (3, H, W) -> data URL the OpenAI chat API accepts as an image_url."""
    pixels = image.detach().cpu().permute(1, 2, 0).contiguous().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format=IMAGE_FORMATS[image_format])
    return f"data:image/{image_format};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


async def _gather_or_cancel(coros: Iterable[Awaitable]) -> list:
    """asyncio.gather that cancels the siblings when one fails, so a failed group stops sending requests."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@dataclass
class _LoopState:
    """HTTP pool and semaphore of one event loop (both are bound to the loop that created them)."""

    http: httpx.AsyncClient
    semaphore: asyncio.Semaphore


class JudgeClient:
    """Async judge client over vLLM's OpenAI-compatible chat API (docs/algorithm.md), set up by `reward.judge`.

    mode: "score" (training: one expected-digit score) or "rubric" (evaluation: three criteria).
    Replicas: `base_urls` are equivalent servers. Each attempt goes to the next replica that is not being
    skipped; a replica that fails to answer (refused, reset, timeout, 5xx) is skipped for backoff_s * 2**n
    after its n-th failure in a row, at most max_backoff_s (a circuit breaker), so the others take the load;
    when every replica is skipped the call waits.
    Retries: the wait before retry n is backoff_s * 2**(n-1), at most max_backoff_s. An unparseable reply is
    retried max_retries times; a transport failure as long as the next try would begin within
    retry_budget_s of the call's start, which rides out a replica that restarts (with retry_budget_s = 0:
    max_retries times). max_concurrency bounds the requests in
    flight from this client per event loop. structured_output=False drops the vLLM digit choice, for servers
    without it; the reply must then still put ~all first-token mass on the digits, or it counts as unparseable.
    api_key: sent as `Authorization: Bearer` (vLLM's --api-key); None sends no credentials.
    """

    def __init__(self, base_urls: str | Sequence[str], cfg: JudgeConfig, api_key: Secret | None = None):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("JudgeClient needs at least one base URL")
        self.base_urls = [u.rstrip("/") for u in urls]
        self.cfg = cfg
        self._api_key = api_key
        self.metrics: dict[str, int] = dict.fromkeys(METRIC_KEYS, 0)
        self._skip_until = [0.0] * len(self.base_urls)  # monotonic time until which a replica is skipped
        self._fails = [0] * len(self.base_urls)  # its transport failures in a row
        self._next = 0
        self._in_flight = 0
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()

    # ---- public API -------------------------------------------------------------------------------------
    async def score(self, input_image: torch.Tensor, candidate: torch.Tensor, instruction: str) -> JudgeScore:
        """Judge one candidate edit of `input_image` (both uint8 (3, H, W)) against `instruction`."""
        _check_image("input_image", input_image)
        _check_image("candidate", candidate)
        self._check_instruction(instruction)
        source_url = _data_url(input_image, self.cfg.image_format)
        return await self._judge(source_url, _data_url(candidate, self.cfg.image_format), instruction)

    async def score_many(
        self, input_image: torch.Tensor, candidates: torch.Tensor, instruction: str
    ) -> list[JudgeScore]:
        """Judge K candidates (uint8 (K, 3, H, W)) of one input; at most max_concurrency requests in flight.

        If any candidate fails for good, the others are cancelled and the JudgeError propagates: the group
        fails as a whole rather than being half-scored.
        """
        _check_image("input_image", input_image)
        _check_image("candidates", candidates, ndim=4)
        self._check_instruction(instruction)
        source_url = _data_url(input_image, self.cfg.image_format)  # encoded once per group
        return await _gather_or_cancel(
            self._judge(source_url, _data_url(c, self.cfg.image_format), instruction) for c in candidates
        )

    async def compare(
        self, input_image: torch.Tensor, first: torch.Tensor, second: torch.Tensor, instruction: str
    ) -> tuple[list[float], int]:
        """Two edits of `input_image` side by side (all uint8 (3, H, W)), whatever the mode: the judge's digit
        probabilities (0 = `first` clearly better, 5 = `second`) and the attempts used; JudgeError when the
        retry budget is spent. Position bias is the caller's to cancel (ask both orders)."""
        for name, image in (("input_image", input_image), ("first", first), ("second", second)):
            _check_image(name, image)
        self._check_instruction(instruction)
        urls = [_data_url(image, self.cfg.image_format) for image in (input_image, first, second)]
        return await self._ask(urls, pairwise_prompt(instruction))

    async def rate(self, images: Sequence[torch.Tensor], prompt: str) -> tuple[list[float], int]:
        """One digit 0-5 about `images` (uint8 (3, H, W), in order) asked with a whole `prompt` of the caller's:
        the digit probabilities and the attempts used; JudgeError when the retry budget is spent."""
        urls = self._image_urls(images)
        self._check_instruction(prompt)
        return await self._ask(urls, prompt)

    async def generate(self, images: Sequence[torch.Tensor], prompt: str, max_tokens: int) -> tuple[str, int]:
        """Free text (greedy, at most `max_tokens`) about `images` (possibly none): the stripped text and the
        attempts used. An empty answer counts as unparseable (retried); JudgeError when the budget is spent."""
        urls = self._image_urls(images)
        self._check_instruction(prompt)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        body = self._request_body(urls, prompt, max_tokens=max_tokens, digits=False)
        return await self._request(body, text_from_reply)

    async def choose(self, images: Sequence[torch.Tensor], prompt: str, choices: Sequence[str]) -> tuple[str, int]:
        """One of `choices` (constrained with vLLM structured output unless `structured_output` is off) about
        `images`: the choice and the attempts used; JudgeError when the retry budget is spent."""
        urls = self._image_urls(images)
        self._check_instruction(prompt)
        if len(choices) < 2 or len(set(choices)) != len(choices):
            raise ValueError(f"choices must be at least two distinct labels, got {list(choices)}")
        body = self._request_body(urls, prompt, max_tokens=CHOICE_MAX_TOKENS, digits=False)
        if self.cfg.structured_output:
            body["structured_outputs"] = {"choice": list(choices)}
        return await self._request(body, lambda reply: choice_from_reply(reply, choices))

    async def aclose(self) -> None:
        """Close the HTTP pool of the running event loop."""
        state = self._states.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.http.aclose()

    async def __aenter__(self) -> "JudgeClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    # ---- internals ----------------------------------------------------------------------------------------
    def _image_urls(self, images: Sequence[torch.Tensor]) -> list[str]:
        for i, image in enumerate(images):
            _check_image(f"images[{i}]", image)
        return [_data_url(image, self.cfg.image_format) for image in images]

    @staticmethod
    def _check_instruction(instruction: str) -> None:
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"instruction must be a non-empty string, got {instruction!r}")

    async def _judge(self, source_url: str, candidate_url: str, instruction: str) -> JudgeScore:
        images = [source_url, candidate_url]
        if self.cfg.mode == "score":
            probs, attempts = await self._ask(images, score_prompt(instruction))
            return JudgeScore(score=expected_digit_score(probs), digit_probs=probs, attempts=attempts)
        answers = await _gather_or_cancel(self._ask(images, rubric_prompt(name, instruction)) for name in RUBRIC)
        probs = {name: p for name, (p, _) in zip(RUBRIC, answers, strict=True)}
        sub_scores = {name: expected_digit_score(p) for name, p in probs.items()}
        return JudgeScore(
            score=sum(sub_scores.values()) / len(sub_scores),
            digit_probs=probs,
            attempts=sum(a for _, a in answers),
            sub_scores=sub_scores,
        )

    def _request_body(self, image_urls: Sequence[str], prompt: str, *, max_tokens: int = 1,
                      digits: bool = True) -> dict:  # fmt: skip
        """A chat request: images then the prompt. `digits`: one token, its log-probs, the digit choice."""
        content = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
        content.append({"type": "text", "text": prompt})
        body: dict[str, Any] = {
            "model": self.cfg.served_model_name,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
        if not digits:
            return body
        body["logprobs"] = True
        body["top_logprobs"] = 20  # vLLM's maximum; the six digits are all that survive the choice mask
        if self.cfg.structured_output:
            # NOT "guided_choice": vLLM >= 0.1x ignores that key silently and returns free text.
            body["structured_outputs"] = {"choice": list(DIGITS)}
        return body

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            n = self.cfg.max_concurrency
            limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
            headers = {"Authorization": f"Bearer {self._api_key.reveal()}"} if self._api_key else {}
            http = httpx.AsyncClient(timeout=httpx.Timeout(self.cfg.timeout_s), limits=limits, headers=headers)
            state = _LoopState(http=http, semaphore=asyncio.Semaphore(self.cfg.max_concurrency))
            self._states[loop] = state
        return state

    def _backoff(self, n: int) -> float:
        """backoff_s * 2**n, at most max_backoff_s: the wait before a retry, and a failing replica's skip."""
        return min(self.cfg.backoff_s * 2**n, self.cfg.max_backoff_s)

    def _replica(self) -> tuple[int, float]:
        """(replica to try next, seconds to wait first): round robin over those not being skipped, else the one
        skipped the shortest."""
        now, n = time.monotonic(), len(self.base_urls)
        for i in range(n):
            k = (self._next + i) % n
            if self._skip_until[k] <= now:
                self._next = k + 1
                return k, 0.0
        k = min(range(n), key=lambda j: self._skip_until[j])
        self._next = k + 1
        return k, self._skip_until[k] - now

    async def _ask(self, image_urls: Sequence[str], prompt: str) -> tuple[list[float], int]:
        """One digit question about the images (data URLs, in order): (digit probabilities, attempts used)."""
        return await self._request(self._request_body(image_urls, prompt), digit_probs_from_reply)

    async def _request(self, body: dict, parse: Callable[[Any], T]) -> tuple[T, int]:
        """One request with retries and failover: (`parse` of the reply's JSON, attempts used), or JudgeError. A
        reply `parse` rejects with ValueError (UnparseableReply) is retried max_retries times."""
        state = self._state()
        cfg, began = self.cfg, time.monotonic()
        reason, last_reply, previous, unparseable = "no attempt made", None, None, 0
        attempt = 0
        while True:
            attempt += 1
            delay = self._backoff(attempt - 2) if attempt > 1 else 0.0
            k, wait = self._replica()
            if wait > delay:
                self._count("waits_no_replica")
            if attempt > 1:
                self._count("retries")
                self._count("failovers", int(k != previous))
            pause = max(delay, wait)
            if cfg.retry_budget_s > 0:  # a replica skipped past the budget is still tried once, at its end
                pause = min(pause, max(0.0, began + cfg.retry_budget_s - time.monotonic()))
            await asyncio.sleep(pause)
            url, previous = f"{self.base_urls[k]}/chat/completions", k
            transport_failure = True
            async with state.semaphore:
                self._count("requests")
                self._in_flight += 1
                self.metrics["peak_in_flight"] = max(self.metrics["peak_in_flight"], self._in_flight)
                sent = time.monotonic()
                try:
                    response = await state.http.post(url, json=body)
                except httpx.TimeoutException as exc:
                    self._count("timeouts")
                    reason, last_reply = f"timeout after {cfg.timeout_s}s at {url} ({type(exc).__name__})", None
                    response = None
                except httpx.RequestError as exc:  # refused, reset, protocol or decoding failure
                    self._count("connection_errors")
                    reason, last_reply = f"cannot reach {url} ({type(exc).__name__}: {exc})", None
                    response = None
                finally:
                    self._in_flight -= 1
            if response is not None:
                elapsed = time.monotonic() - sent
                telemetry.observe(telemetry.JUDGE_LATENCY, elapsed)
                ms = int(1000 * elapsed)
                self.metrics["latency_ms_sum"] += ms
                self.metrics["latency_ms_max"] = max(self.metrics["latency_ms_max"], ms)
                last_reply, status = response.text, response.status_code
                if status >= 500 or status in (408, 429):
                    self._count("server_errors")
                    reason = f"HTTP {status} from {url}"
                elif status != 200:
                    self._count("client_errors")
                    self._count("failures")
                    why = ("the API key is missing or wrong: reward.judge.api_key_env names the variable that holds it"
                           if status in (401, 403) else "a bad request")  # fmt: skip
                    raise JudgeError(f"HTTP {status} from {url} ({why}; not retried)", last_reply, attempt)
                else:
                    transport_failure, self._fails[k] = False, 0
                    try:
                        return parse(response.json()), attempt
                    except ValueError as exc:  # UnparseableReply, or a body that is not JSON
                        self._count("unparseable")
                        unparseable += 1
                        reason = f"unparseable reply ({exc})"
            if transport_failure:  # skip this replica a while, longer each failure in a row: the others take the load
                self._fails[k] += 1
                now = time.monotonic()
                self._skip_until[k] = now + self._backoff(self._fails[k])
                next_try = max(self._backoff(attempt - 1), min(self._skip_until) - now)
                within_budget = now + next_try - began < cfg.retry_budget_s
                if within_budget or (cfg.retry_budget_s == 0 and attempt <= cfg.max_retries):
                    continue  # the next try still falls within the budget (no budget: max_retries tries)
                reason += f" (retried for {now - began:.0f}s: reward.judge.retry_budget_s)"
            elif unparseable <= cfg.max_retries:
                continue
            break
        self._count("failures")
        raise JudgeError(reason, last_reply, attempt)

    def _count(self, event: str, n: int = 1) -> None:
        """An event in `metrics` (summed into the driver's step line) and in the live Ray counter, per worker."""
        self.metrics[event] += n
        telemetry.count(telemetry.JUDGE_EVENTS, n, event=event)
