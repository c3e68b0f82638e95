"""Static-region preservation reward (docs/algorithm.md, "Static-region preservation"): what should not move, should
not change.

The flow reward only sees motion; an edit that repaints the background while moving the object right scores as
well as a clean one. Here the ground truth says where nothing moves: a pixel is static when the flow is low in both
directions, input -> target (the object's old place moves) and target -> input (its new place moves). On a fixed
grid of cells (so the term does not depend on the image size), a cell is static only when all its pixels are, and
the edit should equal the input there:
```
r_pres = 1 − mean over static cells and channels of |edit − input| / 255        in [0, 1]
R      = (1 − w) · R_today + w · r_pres                                          (w = reward.preservation_weight)
```
with both images area-averaged onto the grid. A target without a static cell gives r_pres = 1 (nothing to keep).
Pure torch; flows (B, H, W, 2) in pixels, images uint8 (B, 3, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rewards.flow_reward import normalize_by_diagonal


def static_mask(forward: torch.Tensor, backward: torch.Tensor, *, threshold: float) -> torch.Tensor:
    """Pixels where the ground truth does not move: |flow| <= threshold (in image diagonals) in both directions.

    forward: input -> target, backward: target -> input, both (B, H, W, 2) in pixels -> (B, H, W) bool.
    """
    moving = torch.linalg.vector_norm(normalize_by_diagonal(forward.float()), dim=-1) > threshold
    moving |= torch.linalg.vector_norm(normalize_by_diagonal(backward.float()), dim=-1) > threshold
    return ~moving


def grid_mask(static: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, H, W) bool -> (B, grid, grid) bool: a cell is static only if every pixel of it is (adaptive pooling, so a
    cell touching the moving region is left out)."""
    moving = F.adaptive_max_pool2d((~static).float()[:, None], grid)[:, 0]
    return moving == 0


def grid_images(images: torch.Tensor, grid: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, grid, grid) in [0, 1], area-averaged onto the grid."""
    return F.adaptive_avg_pool2d(images.float() / 255.0, grid)


def preservation_score(
    edits: torch.Tensor, source: torch.Tensor, static: torch.Tensor, *, grid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`r_pres` of each edit and the share of grid cells that count as static.

    edits: uint8 (K, 3, H, W); source: uint8 (3, H, W) the input; static: (H, W) or (K, H, W) bool from
    `static_mask`. Returns ((K,) r_pres in [0, 1], (K,) static share in [0, 1]).
    """
    if edits.shape[-2:] != source.shape[-2:] or static.shape[-2:] != source.shape[-2:]:
        raise ValueError(f"preservation_score: edits {tuple(edits.shape)}, source {tuple(source.shape)} and mask "
                         f"{tuple(static.shape)} must share H x W")  # fmt: skip
    k = edits.shape[0]
    cells = grid_mask(static.expand(k, *source.shape[-2:]), grid).float()  # (K, g, g)
    diff = (grid_images(edits, grid) - grid_images(source[None], grid)).abs().mean(dim=1)  # (K, g, g)
    n = cells.sum(dim=(1, 2))
    distance = (diff * cells).sum(dim=(1, 2)) / n.clamp_min(1.0)
    return (1.0 - distance).clamp(0.0, 1.0), n / (grid * grid)


def blend_preservation(reward: torch.Tensor, r_pres: torch.Tensor, *, weight: float) -> torch.Tensor:
    """`R = (1 − w) · R + w · r_pres`: the preservation term blended into the reward (both (K,))."""
    return (1.0 - weight) * reward + weight * r_pres.to(reward.dtype)
