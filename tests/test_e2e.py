"""The main job end to end on Ray: `ray job submit`, checkpoint + resume equivalence, both model families.

Each run is a real `python -m learner.main` process (2 FSDP2 learner ranks over gloo, 2 rollout workers, a
reward worker). The judge is off here to keep the suite short (tests/test_reward_worker.py runs it live).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.net import free_port

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")  # the job's `python` must be this venv's
    env.pop("RAY_ADDRESS", None)
    return env


def _overrides(tmp: Path, steps: int, family: str = "flux_kontext") -> list[str]:
    return [
        f"model.family={family}",
        "reward.judge_weight=0",
        "reward.flow_weight=1",
        f"learner.steps={steps}",
        "checkpoint.every=3",
        f"checkpoint.dir={tmp / 'ckpt'}",
        f"logging.dir={tmp / 'run'}",
        # Every group trains (the tiny random policy's rewards barely vary), so each step has a learner loss.
        "nft.group_min_std=-1",
        "nft.group_max_mean=2",
        "cluster.num_cpus=4",
    ]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def _main(args: list[str], timeout: int = 420) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "learner.main", "--config", str(ROOT / "configs/tiny_cpu.yaml"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _wait_for_dashboard(url: str, timeout_s: float = 90.0) -> None:
    import urllib.request

    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(1)


@pytest.fixture(scope="module")
def submitted_run(tmp_path_factory):
    """Four steps submitted with `ray job submit` to a `ray start --head` cluster."""
    tmp = tmp_path_factory.mktemp("submitted")
    env, ray = _env(), os.path.join(VENV_BIN, "ray")
    dash = free_port("127.0.0.1")
    # The job agent's HTTP port defaults to a fixed 52365: another Ray cluster on the machine (the session's
    # embedded one, a user's) already holds it, and then no job agent ever registers. Give it a free one.
    start = [ray, "start", "--head", "--block", "--num-cpus=4", f"--port={free_port('127.0.0.1')}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             f"--dashboard-agent-listen-port={free_port('127.0.0.1')}", "--disable-usage-stats"]  # fmt: skip
    # --block in its own process group: stopping it stops exactly this cluster. (`ray stop` would kill every
    # Ray process on the machine, other test sessions' and users' clusters included.)
    head = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        _wait_for_dashboard(f"http://127.0.0.1:{dash}/api/version")
        cmd = [ray, "job", "submit", f"--address=http://127.0.0.1:{dash}", f"--working-dir={ROOT}", "--",
               "python", "-m", "learner.main", "--config", "configs/tiny_cpu.yaml", *_overrides(tmp, 4)]  # fmt: skip
        t0 = time.time()
        for _ in range(30):  # the dashboard answers before the head's job agent registers: wait for the agent
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent to submit job" not in proc.stdout + proc.stderr:
                break
            time.sleep(2)
        print(f"ray job submit took {time.time() - t0:.0f}s")
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
    return tmp, proc


def test_ray_job_submit_succeeds(submitted_run):
    tmp, proc = submitted_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    metrics = _metrics(tmp / "run")
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    for m in metrics:
        assert m["groups/valid"] == 2 and "learner/loss" in m and m["learner/n_valid"] == 8
    # Version 0 is the initial policy; every trained step publishes one more, so the versions after each step
    # are 1, 2, 3, 4; the samples a step trains on are never more than rollout.max_staleness (1) versions old.
    assert [m["policy/version"] for m in metrics] == [1, 2, 3, 4]
    assert all(0 <= m["staleness/max"] <= 1 for m in metrics)
    assert metrics[0]["staleness/max"] == 0  # nothing was published before step 0's rollouts but version 0
    # Reward-worker counters reach the metrics: every step's groups (2 per step) were scored.
    assert [m["reward_workers/groups"] for m in metrics] == [2, 4, 6, 8]
    steps = sorted(p.name for p in (tmp / "ckpt").glob("step_*"))
    assert steps == ["step_00000003", "step_00000004"]
    for name in steps:
        assert (tmp / "ckpt" / name / "COMMITTED").exists()
        assert (tmp / "ckpt" / name / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_resume_matches_uninterrupted_run(submitted_run, tmp_path):
    """Resume from the step-3 checkpoint of the submitted run: its step 3 equals the uninterrupted step 3."""
    tmp, proc = submitted_run
    assert proc.returncode == 0
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tmp / "ckpt" / "step_00000003", ckpt / "step_00000003")
    args = _overrides(tmp_path, 4) + ["--resume"]
    out = _main(args).stdout
    assert "resumed from step_00000003: step 3, policy version 3" in out
    resumed = _metrics(tmp_path / "run")
    full = _metrics(tmp / "run")
    assert [m["step"] for m in resumed] == [3]
    for key in ("reward/mean", "reward/std", "learner/loss", "learner/policy_loss", "learner/grad_norm"):
        assert resumed[0][key] == pytest.approx(full[3][key], rel=1e-6, abs=1e-9), key


def test_qwen_image_edit_trains(tmp_path):
    """Qwen-Image-Edit end to end, with v_old / v_ref computed on the rollout pool (DESIGN §6)."""
    _main(_overrides(tmp_path, 2, family="qwen_image_edit") + ["checkpoint.every=0", "nft.reference_forwards=rollout"])
    metrics = _metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [0, 1] and all("learner/loss" in m for m in metrics)
    assert (tmp_path / "ckpt" / "step_00000002" / "COMMITTED").exists()


def test_bad_config_fails_fast_naming_the_key(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "learner.main",
        "--config",
        str(ROOT / "configs/tiny_cpu.yaml"),
        "rollout.group_size=1",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "rollout.group_size" in proc.stderr


def test_full_finetune_end_to_end(tmp_path):
    """Full weights flow learner -> driver (by reference) -> rollouts; the checkpoint exports the EMA transformer."""
    _main(_overrides(tmp_path, 2) + ["nft.full_finetune=true", "checkpoint.every=0"])
    metrics = _metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [0, 1] and all("learner/loss" in m for m in metrics)
    assert metrics[1]["staleness/max"] <= 1
    step = tmp_path / "ckpt" / "step_00000002"
    assert (step / "COMMITTED").exists() and not (step / "lora").exists()
    assert (step / "transformer" / "diffusion_pytorch_model.safetensors").exists()


def test_steps_without_a_valid_group_publish_nothing_and_go_on(tmp_path):
    """Every group filtered out (std can never exceed 10): no update, no new version, and the overlapped
    rollouts of later steps still find the weights they may use."""
    _main(_overrides(tmp_path, 3) + ["nft.group_min_std=10", "checkpoint.every=0"])
    metrics = _metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    for m in metrics:
        assert m["groups/valid"] == 0 and "learner/loss" not in m
        assert m["staleness/max"] == 0  # nothing was ever published after version 0
