"""The flow stage (stages a and b on the motion): the estimator the flow reward uses (rewards/flow_model.py) measures
each candidate pair's input -> target flow; motionnft_core/global_motion.py splits it into camera and object motion.
A plain class: Ray Data runs it in actors (`map_batches(FlowStage, concurrency=flow.workers, num_gpus=flow.gpus)`),
bench/curation_flow_gpu.py on a bare GPU machine.

Measures (flow pixels over the image diagonal, so thresholds do not depend on the resolution):
motion = mean |flow|, object_motion = mean |flow - camera|, camera_share = global_motion.camera_share.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from curation.config import CurateConfig, FilterConfig
from curation.rows import batch_rows, image, rows_batch
from motionnft_core.global_motion import camera_share, split_motion
from rewards.flow_model import build_flow_estimator


def decide(motion: float, object_motion: float, share: float, cfg: FilterConfig) -> tuple[str, str] | None:
    """(stage, reason) of a drop, or None when the pair goes on to the judge. In this order: near-static (a), mostly
    camera motion, too large, no object motion left (b)."""
    if motion < cfg.min_motion:
        return "a", "static"
    if share > cfg.max_camera_share:
        return "b", "camera_motion"
    if motion > cfg.max_motion:
        return "b", "too_large"
    if object_motion < cfg.min_object_motion:
        return "b", "no_object_motion"
    return None


def motion_measures(flow: torch.Tensor) -> dict[str, np.ndarray]:
    """motion, object_motion and camera_share (each (B,)) of pixel flows (B, H, W, 2)."""
    height, width = flow.shape[1:3]
    diagonal = math.hypot(height, width)
    flow = flow.float()
    _, obj = split_motion(flow)
    return {
        "motion": (torch.linalg.vector_norm(flow, dim=-1).mean(dim=(1, 2)) / diagonal).cpu().numpy(),
        "object_motion": (torch.linalg.vector_norm(obj, dim=-1).mean(dim=(1, 2)) / diagonal).cpu().numpy(),
        "camera_share": camera_share(flow).cpu().numpy(),
    }


class FlowStage:
    """Measures the motion of every `candidate` pair of a batch and drops those stages a and b refuse."""

    def __init__(self, cfg: CurateConfig, device: str | None = None):
        if device is None:
            device = "cuda" if cfg.flow.gpus > 0 and torch.cuda.is_available() else "cpu"
        self.cfg, self.device = cfg, device
        self.estimator = build_flow_estimator(cfg.flow, device=device, cache_dir=cfg.input.cache_dir)

    def measure(self, inputs: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
        """The measures of uint8 (B, H, W, 3) input and target frames."""
        src = torch.from_numpy(np.ascontiguousarray(inputs)).permute(0, 3, 1, 2)
        dst = torch.from_numpy(np.ascontiguousarray(targets)).permute(0, 3, 1, 2)
        return motion_measures(self.estimator(src, dst))

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        todo = [r for r in rows if r["kind"] == "pair" and r["status"] == "candidate"]
        by_size: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for row in todo:
            by_size.setdefault((int(row["height"]), int(row["width"])), []).append(row)
        for group in by_size.values():
            measures = self.measure(np.stack([image(r, "input") for r in group]),
                                    np.stack([image(r, "target") for r in group]))  # fmt: skip
            for i, row in enumerate(group):
                values = {name: float(v[i]) for name, v in measures.items()}
                row.update(values)
                drop = decide(values["motion"], values["object_motion"], values["camera_share"], self.cfg.filter)
                if drop is not None:
                    row.update(status="dropped", stage=drop[0], reason=drop[1])
        return rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return rows_batch(self.process(batch_rows(batch)))
