"""The scale simulation's model calls (bench/scale_sim.py), installed in every Ray worker process it starts.

Each model call still runs, on the tiny model, so outputs, gradients and object transfers stay real; then it waits
until the GPU duration it stands for has passed since it began. A call whose real CPU time
already exceeds that duration (2 cores shared by every actor) overran its hold: each call is logged, and the
simulation reports the share that overran, since those make it slower than the GPUs it stands for.

The durations are per sample (per pair for the flow estimator), times the call's batch: a transformer forward
without gradient (rollout sampling, reference forwards), a forward whose backward follows (gradient enabled: the
learner's forward/backward, held as one: the wait comes after the next backward, from the forward's start), a
VAE decode (the group's encode folded in), a flow estimate. They come as JSON in MOTIONNFT_SIM_HOLDS, with the
folder for the call logs.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

ENV = "MOTIONNFT_SIM_HOLDS"


def install() -> None:
    """Ray's worker_process_setup_hook: wrap the model calls of this process (nothing without MOTIONNFT_SIM_HOLDS)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    holds = json.loads(spec)
    log = Path(holds["log_dir"]) / f"calls-{os.getpid()}.jsonl"
    # One thread per worker: the simulation's actors ask for no CPU, and several busy workers each spinning
    # torch's default 2 threads on 2 cores left every call waiting on the others (load 9, calls 10x slower).
    torch.set_num_threads(1)

    from rewards.flow_model import ClassicalFlow, RAFTFlow

    training = Training(log)

    def forward(self, x_t, *args, **kwargs) -> float:
        return x_t.shape[0] * holds["forward_s"]

    for cls in defining_classes("velocity"):
        cls.velocity = training.forward(cls.velocity, lambda self, x_t, *a, **k: x_t.shape[0] * holds["train_s"],
                                        held(cls.velocity, forward, "velocity", log))  # fmt: skip
    for cls in defining_classes("decode"):
        cls.decode = held(cls.decode, lambda self, x0, *a, **k: x0.shape[0] * holds["decode_s"], "decode", log)
    for cls in (ClassicalFlow, RAFTFlow):
        cls.__call__ = held(cls.__call__, lambda self, src, dst: src.shape[0] * holds["flow_s"], "flow", log)
    torch.Tensor.backward = training.backward(torch.Tensor.backward)


def defining_classes(method: str) -> list[type]:
    """The classes whose own `method` every policy family runs: wrapping each of them once holds every family's
    call exactly once (a family inheriting the method is held through its base; wrapping it too would hold twice)."""
    from motionnft_core.models.families import policy_classes

    owners = {next(k for k in cls.__mro__ if method in vars(k)) for cls in policy_classes().values()}
    return sorted(owners, key=lambda k: k.__qualname__)


def _wait(name: str, hold: float, t0: float, log: Path) -> None:
    """Sleep until `hold` seconds have passed since `t0`; the call logged with its real time."""
    real = time.perf_counter() - t0
    if real < hold:
        time.sleep(hold - real)
    with log.open("a") as f:
        f.write(json.dumps({"call": name, "hold": hold, "real": real}) + "\n")


def held(fn: Callable, seconds: Callable[..., float], name: str, log: Path) -> Callable:
    """`fn`, lasting at least `seconds(*args)` from its start."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        _wait(name, seconds(*args, **kwargs), t0, log)
        return out

    return call


class Training:
    """Forwards with gradient and the backward after them, held as one call: from the first such forward's start,
    their summed durations, waited out once the backward is done."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.started: float | None = None
        self.hold = 0.0

    def forward(self, fn: Callable, seconds: Callable[..., float], no_grad: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if not torch.is_grad_enabled():
                return no_grad(*args, **kwargs)
            if self.started is None:
                self.started = time.perf_counter()
            self.hold += seconds(*args, **kwargs)
            return fn(*args, **kwargs)

        return call

    def backward(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            if self.started is not None:
                started, hold, self.started, self.hold = self.started, self.hold, None, 0.0
                _wait("forward+backward", hold, started, self.log)
            return out

        return call


def read_calls(log_dir: Path, *, clear: bool = False) -> list[dict]:
    """Every call logged under `log_dir` (all processes); with `clear`, the logs are removed once read."""
    calls = []
    for path in sorted(log_dir.glob("calls-*.jsonl")):
        calls += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if clear:
            path.unlink()
    return calls
