"""TensorBoard for a run: every scalar of metrics.jsonl, and every `logging.image_every` steps an image grid
per logged group (input | candidates sorted by reward, best first | target) with its rewards as the caption.

The grid is drawn by a Ray task next to the images (`group_grid`): only the small thumbnail strip reaches the
driver. A resumed run purges the events from its first step on, so each step appears once, as in metrics.jsonl.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from motionnft_core.config import LoggingConfig


def group_grid(example: Any, candidates: torch.Tensor, rewards: list[float], size: int) -> torch.Tensor:
    """uint8 (3, size, (K + 2) * width) strip: input, the K candidates by reward (best first), target."""
    order = sorted(range(len(rewards)), key=lambda k: -rewards[k])
    tiles = [example.input_image, *(candidates[k].cpu() for k in order), example.target_image]
    h, w = tiles[0].shape[-2:]
    width = max(1, round(w * size / h))
    resized = [F.interpolate(t[None].float(), size=(size, width), mode="area")[0] for t in tiles]
    return torch.cat(resized, dim=-1).round().clamp(0, 255).to(torch.uint8)


def draw_group(example: Any, candidates: torch.Tensor, rewards: list[float], size: int) -> tuple[str, torch.Tensor]:
    """(prompt, `group_grid`): the body of the Ray task that draws a group next to its images. It lives here, in
    a module of light imports, because the task's worker process imports the module that defines it (from
    learner.driver.loop that took 6 s of CPU at a run's first grid, from here 2 s)."""
    return example.prompt, group_grid(example, candidates, rewards, size)


class BoardLog:
    """The run's TensorBoard writer (no-op when `logging.tensorboard` is off)."""

    def __init__(self, cfg: LoggingConfig) -> None:
        self.cfg = cfg
        self.writer: SummaryWriter | None = None

    def start(self, resume_at: int = 0) -> None:
        """(Re)open the writer for steps from `resume_at` on: events of those steps from earlier runs are purged."""
        self.close()
        if self.cfg.tensorboard:
            self.writer = SummaryWriter(str(Path(self.cfg.dir) / "tensorboard"), purge_step=resume_at or None)

    def wants_images(self, step: int) -> bool:
        return self.writer is not None and self.cfg.image_every > 0 and step % self.cfg.image_every == 0

    def scalars(self, step: int, metrics: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def grids(self, step: int, grids: list[tuple[str, str, list[float], torch.Tensor]]) -> None:
        """(prompt id, instruction, rewards, grid) per group: the grid as an image, the rewards as its caption."""
        if self.writer is None:
            return
        for i, (prompt_id, instruction, rewards, grid) in enumerate(grids):
            ranked = ", ".join(f"{r:.4f}" for r in sorted(rewards, reverse=True))
            self.writer.add_image(f"groups/{i}", grid, step)
            self.writer.add_text(f"groups/{i}", f"{prompt_id}: {instruction!r}; rewards, best first: {ranked}", step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def encode_png(image: torch.Tensor) -> bytes:
    """uint8 (3, H, W) as PNG bytes (lossless: the report's grid shows the edit exactly). Run as a Ray task next
    to the edit; it lives here, not in learner.driver.heldout,
    so that the task's worker imports little."""
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()
