"""Motion-focal token weights of the NFT loss (docs/algorithm.md, "Motion-focal loss"), after MotiF: the squared
error of each target token is weighted by how much the ground truth moves there, so learning concentrates where
the edit happens.

From the ground-truth input -> target flow magnitude |V_gt| (H, W) in pixels, which the reward side computes once
per prompt and sends with the group:
```
heat  = |V_gt| averaged onto the latent grid (H / f, W / f), then packed like the latents  (the policy's packing)
heat' = heat / mean(heat)                  mean 1 over the tokens: the loss keeps its scale (all ones if nothing moves)
w     = (1 − m) + m · heat'                m = nft.motion_focal_mix in [0, 1]; still mean 1; m = 0 gives ones
```
Pure torch, no model: the packing is passed in as a function (`EditPolicy.pack_map`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def pool_to_grid(heat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Area mean of a (H, W) map onto (rows, cols) cells (exact block means when they divide H and W)."""
    if heat.ndim != 2:
        raise ValueError(f"pool_to_grid: expected a (H, W) map, got shape {tuple(heat.shape)}")
    return F.adaptive_avg_pool2d(heat.double()[None, None], (rows, cols))[0, 0]


def normalize_mean_one(heat: torch.Tensor) -> torch.Tensor:
    """`heat / mean(heat)` over the last dim (tokens); a row that is zero everywhere (nothing moves) becomes ones."""
    if (heat < 0).any():
        raise ValueError("normalize_mean_one: the heat must be >= 0 (a flow magnitude)")
    mean = heat.mean(dim=-1, keepdim=True)
    return torch.where(mean > 0, heat / mean.clamp_min(torch.finfo(heat.dtype).tiny), torch.ones_like(heat))


def focal_mix(heat: torch.Tensor, mix: float) -> torch.Tensor:
    """`(1 − m) + m · heat`: m = 0 is the plain loss (all ones), m = 1 the heat alone."""
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"nft.motion_focal_mix: expected a value in [0, 1], got {mix}")
    return (1.0 - mix) + mix * heat


def token_weights(heat: torch.Tensor, latent_grid: tuple[int, int], pack: Callable[[torch.Tensor], torch.Tensor],
                  mix: float) -> torch.Tensor:  # fmt: skip
    """Per-token weights (L,) float64 of one sample: pixel heat (H, W) -> latent grid -> the policy's packed token
    order (`pack`: (h, w) -> (L,)) -> mean 1 -> mixed."""
    tokens = pack(pool_to_grid(heat, *latent_grid))
    return focal_mix(normalize_mean_one(tokens), mix)
