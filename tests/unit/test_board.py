"""TensorBoard of a run (learner/driver/board.py), without Ray: each step once across a resume; the grid's order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from learner.driver.board import BoardLog, group_grid
from motionnft_core.config import LoggingConfig
from motionnft_core.data.motionedit import MotionExample

ROOT = Path(__file__).resolve().parents[2]


def test_a_resume_purges_the_steps_it_redoes(tmp_path):
    board = BoardLog(LoggingConfig(dir=str(tmp_path)))
    board.start()
    for step in range(4):
        board.scalars(step, {"reward/mean": float(step), "prompts": ["a", "b"], "flag": True})
    board.start(resume_at=2)  # killed after step 3, resumed from the checkpoint of step 2
    for step in (2, 3):
        board.scalars(step, {"reward/mean": 10.0 + step})
    board.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(0, 0.0), (1, 1.0), (2, 12.0), (3, 13.0)]
    assert events.Tags()["scalars"] == ["reward/mean"]  # lists and booleans are not scalars


def test_grid_is_input_then_candidates_best_first_then_target():
    def flat(v: int) -> torch.Tensor:
        return torch.full((3, 16, 32), v, dtype=torch.uint8)

    example = MotionExample("p0", "raise the arm", flat(1), flat(9), None)
    candidates = torch.stack([flat(20), flat(30), flat(40)])
    grid = group_grid(example, candidates, [0.2, 0.9, 0.5], size=8)
    assert grid.shape == (3, 8, 16 * 5) and grid.dtype == torch.uint8
    assert [int(grid[0, 0, 16 * i]) for i in range(5)] == [1, 30, 40, 20, 9]


def test_the_ray_task_bodies_import_no_model_library():
    """`draw_group` and `encode_png` run as Ray tasks, whose fresh worker process imports the module that defines
    them: kept free of diffusers / transformers / peft, a run's first grid costs 2 s of CPU, not 6."""
    code = ("import sys, learner.driver.board; "
            "print(sorted(m for m in ('diffusers', 'transformers', 'peft', 'vllm') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
