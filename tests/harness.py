"""Run a driver (`learner.main`, `evaluation.main`) as a real subprocess and read what it wrote.

One place for what every whole-run test needs: the environment a driver runs in (offline, no token auth, no
outer Ray address, no fault injection leaking in from the caller), a bounded wait that kills the process on
timeout, the run's metrics.jsonl rows and the latest checkpoint's driver.json; and the hold points of
motionnft_core/faults.py (MOTIONNFT_HOLD_AT), where a test kills something from outside at an exact point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_CPU = ROOT / "configs" / "tiny_cpu.yaml"
VENV_BIN = str(Path(sys.executable).parent)
FAULT_ENV = ("MOTIONNFT_KILL_AT", "MOTIONNFT_SLOW_AT", "MOTIONNFT_HOLD_AT", "MOTIONNFT_FAULT_DIR")


def driver_env(**extra: str) -> dict[str, str]:
    """This process's environment for a driver: offline, token auth off, its own embedded Ray cluster (no
    RAY_ADDRESS), this venv's `python` first on PATH, no fault injection unless `extra` sets it."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k not in FAULT_ENV}
    env.update(HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


@dataclass
class Finished:
    """A driver that has exited: its exit code and output (stdout and stderr apart, unless merged)."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def tail(self, n: int = 4000) -> str:
        """The end of its output, for an assertion message."""
        return self.output[-n:]


class Driver:
    """A driver process started by `start`; `wait` bounds it and always leaves no process behind."""

    def __init__(self, args: list[str], env: dict[str, str], merge_output: bool, log: Path | None) -> None:
        self.args, self.log = args, log
        if log is not None:  # long or concurrent runs: a file, not a pipe nobody reads while they run
            with open(log, "w") as out:
                self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
            return
        err = subprocess.STDOUT if merge_output else subprocess.PIPE
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout_s: float) -> Finished:
        """Its exit code and output; killed (and the timeout raised) past `timeout_s`."""
        try:
            out, err = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        if self.log is not None:
            out = self.log.read_text()
        return Finished(self.args, self.proc.returncode, out or "", err or "")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def command(module: str, config: Path | str | None, *args: str) -> list[str]:
    """`python -m module [--config config] args...`."""
    return [sys.executable, "-m", module, *(["--config", str(config)] if config else []), *args]


def start(*args: str, module: str = "learner.main", config: Path | str | None = TINY_CPU,
          env: dict[str, str] | None = None, merge_output: bool = False,
          log: Path | None = None) -> Driver:  # fmt: skip
    """A driver started with `config` and `args` (overrides and flags), `env` on top of `driver_env()`; its output
    goes to `log` when given (then `Finished.stdout` holds both streams), else to pipes."""
    return Driver(command(module, config, *args), driver_env(**(env or {})), merge_output, log)


def run(*args: str, module: str = "learner.main", config: Path | str | None = TINY_CPU,
        env: dict[str, str] | None = None, timeout_s: float = 600, merge_output: bool = False) -> Finished:  # fmt: skip
    """`start`, then wait at most `timeout_s` for it."""
    return start(*args, module=module, config=config, env=env, merge_output=merge_output).wait(timeout_s)


def metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of `<run_dir>/metrics.jsonl` (none when it is not there yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def steps_logged(run_dir: Path) -> list[int]:
    return [row["step"] for row in metrics_rows(run_dir)]


def driver_state(ckpt_dir: Path, step: int | None = None) -> dict:
    """The `driver` section of the driver.json of checkpoint `step` (default: the latest committed one)."""
    ckpt_dir = Path(ckpt_dir)
    if step is None:
        committed = sorted(p for p in ckpt_dir.glob("step_*") if (p / "COMMITTED").exists())
        if not committed:
            raise FileNotFoundError(f"no committed checkpoint in {ckpt_dir}")
        path = committed[-1] / "driver.json"
    else:
        path = ckpt_dir / f"step_{step:08d}" / "driver.json"
    return json.loads(path.read_text())["driver"]


# ------------------------------------------------------------------------------------ hold points (faults.py)


def hold_env(fault_dir: Path, *points: str, **extra: str) -> dict[str, str]:
    """The environment that holds a run at `points` (`<name>:<n>`), markers in `fault_dir` (made here)."""
    Path(fault_dir).mkdir(parents=True, exist_ok=True)
    return {"MOTIONNFT_HOLD_AT": ",".join(points), "MOTIONNFT_FAULT_DIR": str(fault_dir), **extra}


def wait_held(fault_dir: Path, point: str, driver: Driver | None = None, timeout_s: float = 900) -> None:
    """Until a process is held at `point`; raises if `driver` exits first or the time runs out."""
    held = Path(fault_dir) / f"{point}.held"
    deadline = time.monotonic() + timeout_s
    while not held.exists():
        if driver is not None and not driver.running():
            done = driver.wait(timeout_s=10)
            raise AssertionError(f"the driver exited ({done.returncode}) before it held at {point}:\n{done.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing held at {point} within {timeout_s:.0f} s")
        time.sleep(0.05)


def release(fault_dir: Path, point: str) -> None:
    """Let the process held at `point` go on."""
    (Path(fault_dir) / f"{point}.go").touch()


def act_at_hold(driver: Driver, fault_dir: Path, point: str, action: Callable[[], object],
                timeout_s: float = 900) -> Finished:  # fmt: skip
    """Once `driver` (or a process of its run) holds at `point`, run `action` (the kill from outside), let it go
    on, and wait at most `timeout_s` for the run to end. Whatever fails, no driver is left running."""
    try:
        try:
            wait_held(fault_dir, point, driver, timeout_s)
            action()
        finally:
            release(fault_dir, point)
        return driver.wait(timeout_s)
    finally:
        driver.kill()
