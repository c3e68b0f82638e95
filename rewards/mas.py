"""Motion alignment score (MAS) of MotionEdit-Bench (arXiv 2512.10284 §5.2; docs/evaluation.md), on flow tensors.

The evaluation counterpart of the training reward (rewards/flow_reward.py), scored 0-100 per edit:
```
V_pred = F(input, edit) / diag,  V_gt = F(input, target) / diag              (diag = sqrt(H² + W²))
D_mag  = mean over pixels and both components of (|V_pred − V_gt| + ε) ** q  (q = 0.4)
w      = (|V_gt| / max |V_gt|) · [|V_gt| > τ]                                 per pixel
D_dir  = Σ w · (1 − cos(V_pred, V_gt)) / 2  /  (Σ w + ε)
D      = α · D_mag + (1 − α) · D_dir
MAS    = 100 · (1 − clip((D − d_min) / (d_max − d_min), 0, 1))
MAS    = 0 when mean|V_pred| / mean|V_gt| < min_ratio (0.01): an edit that barely moves scores nothing
```
Pure torch, per-sample over a batch: flows (B, H, W, 2) in pixels in, (B,) tensors out. The pieces shared with
the training reward are imported from it (diagonal normalisation, L_q, the per-pixel cosine error with unit
vectors `V / max(|V|, ε)`), not re-derived. Every constant is a keyword argument without a default: the
values live in `eval.*` (motionnft_core/config.py; why each default: docs/config-notes.md); `mas_constants`
maps them.
"""

import torch

from motionnft_core.config import EvalConfig
from rewards.flow_reward import compensate, cosine_error, magnitude_error, normalized_pair


def mas_constants(cfg: EvalConfig) -> dict[str, float]:
    """`eval.mas_*` as the keyword arguments of `motion_alignment_score`."""
    return {"alpha": cfg.mas_alpha, "tau": cfg.mas_tau, "d_min": cfg.mas_d_min, "d_max": cfg.mas_d_max,
            "eps": cfg.mas_eps, "q": cfg.mas_q, "min_ratio": cfg.mas_min_motion_ratio}  # fmt: skip


def motion_weights(v_gt: torch.Tensor, *, tau: float, eps: float) -> torch.Tensor:
    """`w = (|V_gt| / max |V_gt|) · [|V_gt| > τ]` per pixel: pixels that move more count more in D_dir.

    The max is taken per sample and floored at eps only so that a target that moves nowhere gives w = 0
    instead of 0/0 (a pixel with w > 0 has |V_gt| > τ >= 0, so the floor never changes a weight otherwise).
    v_gt: (B, H, W, 2), normalised -> (B, H, W) in [0, 1].
    """
    mag = torch.linalg.vector_norm(v_gt, dim=-1)  # (B, H, W)
    peak = mag.amax(dim=(1, 2), keepdim=True).clamp_min(eps)
    return (mag / peak) * (mag > tau).to(mag.dtype)


def weighted_direction_error(v_pred: torch.Tensor, v_gt: torch.Tensor, *, tau: float, eps: float) -> torch.Tensor:
    """`D_dir = Σ w·(1 − cos)/2 / (Σ w + ε)`: the direction error, weighted towards the target's main motion.

    Unlike the training reward's 0/1 mask, weights grow with |V_gt|, so slow background drift above τ matters
    little. A zero prediction has error 0.5 where w > 0 (D_dir just under 0.5), an unmoving target D_dir = 0.
    v_pred, v_gt: (B, H, W, 2), normalised -> (B,) in [0, 1).
    """
    w = motion_weights(v_gt, tau=tau, eps=eps)
    err = cosine_error(v_pred, v_gt, eps=eps)
    return (w * err).sum(dim=(1, 2)) / (w.sum(dim=(1, 2)) + eps)


def mean_magnitude(flow: torch.Tensor) -> torch.Tensor:
    """`mean |V|` over the pixels: (B, H, W, 2) -> (B,)."""
    return torch.linalg.vector_norm(flow, dim=-1).mean(dim=(1, 2))


def mas_from_distance(distance: torch.Tensor, *, d_min: float, d_max: float) -> torch.Tensor:
    """`MAS = 100 · (1 − clip((D − d_min) / (d_max − d_min), 0, 1))`: (B,) -> (B,) in [0, 100]."""
    if not d_max > d_min:
        raise ValueError(f"d_max ({d_max}) must exceed d_min ({d_min})")
    return 100.0 * (1.0 - ((distance - d_min) / (d_max - d_min)).clamp(0.0, 1.0))


def motion_alignment_score(
    v_pred: torch.Tensor,
    v_gt: torch.Tensor,
    *,
    alpha: float,
    tau: float,
    d_min: float,
    d_max: float,
    eps: float,
    q: float,
    min_ratio: float,
) -> dict[str, torch.Tensor]:
    """MAS of a batch of edits from their pixel flows (module docstring for the formula).

    v_pred: (B, H, W, 2) flow input -> edit, in pixels; v_gt: the same shape, flow input -> target.
    Returns per-sample (B,) tensors: `d_mag`, `d_dir`, `distance` (D), `motion_ratio` (mean|V_pred| /
    mean|V_gt|, the denominator floored at eps so the table stays finite), `static` (1.0 where the ratio rule
    fired, else 0.0) and `mas`. The ratio rule tests `mean|V_pred| < min_ratio · mean|V_gt|`, so a target that
    does not move at all never triggers it (its ratio is undefined) and is scored by D alone.
    Half-precision flows are upcast to float32. Raises ValueError naming the argument for NaN/inf, a wrong
    shape or dtype, or mismatched shapes.
    """
    v_pred, v_gt = normalized_pair(v_pred, v_gt)

    d_mag = magnitude_error(v_pred, v_gt, q=q, eps=eps)
    d_dir = weighted_direction_error(v_pred, v_gt, tau=tau, eps=eps)
    distance = alpha * d_mag + (1.0 - alpha) * d_dir
    mean_pred, mean_gt = mean_magnitude(v_pred), mean_magnitude(v_gt)
    static = mean_pred < min_ratio * mean_gt  # (B,) bool
    mas = torch.where(static, torch.zeros_like(distance), mas_from_distance(distance, d_min=d_min, d_max=d_max))
    return {
        "d_mag": d_mag,
        "d_dir": d_dir,
        "distance": distance,
        "motion_ratio": mean_pred / mean_gt.clamp_min(eps),
        "static": static.to(distance.dtype),
        "mas": mas,
    }


def camera_compensated_mas(v_pred: torch.Tensor, v_gt: torch.Tensor, **constants: float) -> torch.Tensor:
    """MAS (B,) of the object motion alone: both flows with their dominant global (camera) motion removed first
    (`rewards.flow_reward.compensate`), as a run trained with `reward.flow.camera_compensation` is rewarded. An extra
    column beside MotionEdit-Bench's own MAS, which stays as published. constants: `mas_constants`."""
    obj_pred, obj_gt, _ = compensate(v_pred, v_gt)
    return motion_alignment_score(obj_pred, obj_gt, **constants)["mas"]
