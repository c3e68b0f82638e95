"""The deployment files stay in step with the code: they parse, and what they launch exists."""

import shlex
from pathlib import Path

import yaml

from common.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_rayjob_entrypoint_runs_a_shipped_config():
    job = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "learner.main"]
    config = argv[argv.index("--config") + 1]
    load_config(ROOT / config)  # a valid config, not just an existing file
    assert job["spec"]["rayClusterSpec"]["rayVersion"] in (ROOT / "constraints" / "cpu.txt").read_text()


def test_autoscaler_config_parses_and_uses_the_project_image():
    cfg = yaml.safe_load((ROOT / "cluster" / "autoscaler.yaml").read_text())
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert cfg["docker"]["image"].startswith("motionnft")
    assert "rayproject/ray:2.60.0" in (ROOT / "Dockerfile").read_text()
