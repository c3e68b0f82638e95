"""Motion-alignment reward on optical-flow tensors (docs/algorithm.md, exact).

Pure torch: every function takes flows of shape (B, H, W, 2) in the same units and returns per-sample (B,)
tensors, so a whole micro-batch of candidates is scored in one call. `V_p = flow(input -> candidate)` is the
prediction, `V_g = flow(input -> ground truth)` the target. One function per formula of docs/algorithm.md; the
constants are keyword arguments with the published defaults (config values fed in by the caller).

Checked term by term against the reference `MotionEditScorer` (elainew728/motion-edit,
train/flow_grpo/motionedit_scorer.py): the same normalisation, L_q, masked direction error, movement hinge,
weights, clip and rounding. Two details differ only in form: the reference computes `lo` as the L_q of the
ground truth against itself (equal to `eps**q` up to float rounding) and guards `1 - lo` with
`clamp_min(1e-6)`, which never binds for `lo < 1`.
"""

import math

import torch

from motionnft_core.global_motion import check_flow, split_motion

# The published defaults (docs/algorithm.md), one per line; every function below takes these as keyword arguments.
Q = 0.4  # exponent of the robust magnitude error L_q
EPS = 1e-6  # added to |V_p - V_g| before the power; floor of |V| for unit vectors; lo = EPS ** Q
MOVE_THRESHOLD = 0.002  # m: pixels whose normalised |V_g| exceeds this count in the direction error
TAU = 0.01  # movement hinge margin
KAPPA = 0.5  # movement hinge: the candidate must move at least KAPPA times the target's mean motion
WEIGHT_LQ, WEIGHT_DIR, WEIGHT_MOVE = 0.7, 0.2, 0.1  # a, b, c of D = a·L_q + b·dir + c·move
LEVELS = 5  # quantization: reward = round(LEVELS · s) / LEVELS


def normalize_by_diagonal(flow: torch.Tensor) -> torch.Tensor:
    """Divide a pixel flow by the image diagonal `d = sqrt(H² + W²)` (docs/algorithm.md).

    Makes every term invariant to the image resolution: an edit scaled with its image scores the same.
    flow: (B, H, W, 2) in pixels -> (B, H, W, 2) in diagonals.
    """
    height, width = flow.shape[1], flow.shape[2]
    return flow / math.sqrt(height * height + width * width)


def magnitude_error(v_pred: torch.Tensor, v_gt: torch.Tensor, *, q: float = Q, eps: float = EPS) -> torch.Tensor:
    """`L_q = mean over pixels and both components of (|V_p − V_g| + eps) ** q` (docs/algorithm.md).

    q < 1 makes the error robust: a few badly wrong pixels cost less than in an L1/L2 error.
    v_pred, v_gt: (B, H, W, 2), normalised -> (B,).
    """
    return ((v_pred - v_gt).abs() + eps).pow(q).mean(dim=(1, 2, 3))


def cosine_error(v_pred: torch.Tensor, v_gt: torch.Tensor, *, eps: float = EPS) -> torch.Tensor:
    """Per-pixel `(1 − cos(V_p, V_g)) / 2` in [0, 1], the direction error of the motion reward and of MAS.

    Unit vectors are `V / max(|V|, eps)`, so a zero vector has cos = 0 and error 0.5 (neither right nor wrong).
    v_pred, v_gt: (B, H, W, 2) -> (B, H, W).
    """
    unit_pred = v_pred / torch.linalg.vector_norm(v_pred, dim=-1, keepdim=True).clamp_min(eps)
    unit_gt = v_gt / torch.linalg.vector_norm(v_gt, dim=-1, keepdim=True).clamp_min(eps)
    cos = (unit_pred * unit_gt).sum(dim=-1).clamp(-1.0, 1.0)
    return (1.0 - cos) / 2.0


def direction_error(
    v_pred: torch.Tensor, v_gt: torch.Tensor, *, m: float = MOVE_THRESHOLD, eps: float = EPS
) -> torch.Tensor:
    """`dir = Σ_{|V_g|>m} (1 − cos(V_p, V_g)) / 2  /  max(#{|V_g|>m}, 1)` (docs/algorithm.md).

    `cosine_error` per pixel, so a zero prediction has error 0.5, and a target that moves nowhere (empty mask)
    gives error 0.
    v_pred, v_gt: (B, H, W, 2), normalised -> (B,) in [0, 1].
    """
    err = cosine_error(v_pred, v_gt, eps=eps)  # (B, H, W)
    mask = (torch.linalg.vector_norm(v_gt, dim=-1) > m).to(err.dtype)
    return (err * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2)).clamp_min(1.0)


def movement_hinge(v_pred: torch.Tensor, v_gt: torch.Tensor, *, tau: float = TAU, kappa: float = KAPPA) -> torch.Tensor:
    """`move = max(0, τ + κ·mean|V_g| − mean|V_p|)` (docs/algorithm.md).

    Penalises an edit that barely moves (the trivial "copy the input" answer) relative to the target motion.
    v_pred, v_gt: (B, H, W, 2), normalised -> (B,) >= 0.
    """
    mean_gt = torch.linalg.vector_norm(v_gt, dim=-1).mean(dim=(1, 2))
    mean_pred = torch.linalg.vector_norm(v_pred, dim=-1).mean(dim=(1, 2))
    return (tau + kappa * mean_gt - mean_pred).clamp_min(0.0)


def alignment_distance(
    l_q: torch.Tensor,
    direction: torch.Tensor,
    move: torch.Tensor,
    *,
    a: float = WEIGHT_LQ,
    b: float = WEIGHT_DIR,
    c: float = WEIGHT_MOVE,
) -> torch.Tensor:
    """`D = a·L_q + b·dir + c·move` (docs/algorithm.md). All (B,) -> (B,)."""
    return a * l_q + b * direction + c * move


def alignment_score(distance: torch.Tensor, *, q: float = Q, eps: float = EPS) -> torch.Tensor:
    """`s = 1 − clip((D − lo) / (1 − lo), 0, 1)` with `lo = eps ** q` (docs/algorithm.md).

    lo is the L_q of a perfect match; a perfect match has D = a·lo + c·move <= a·lo + c·τ <= lo with the
    defaults, so it scores exactly 1 through the clip. (B,) -> (B,) in [0, 1].
    """
    lo = eps**q
    return 1.0 - ((distance - lo) / (1.0 - lo)).clamp(0.0, 1.0)


def quantize_reward(score: torch.Tensor, *, levels: int = LEVELS) -> torch.Tensor:
    """`r = round(levels · s) / levels`, e.g. {0, .2, .4, .6, .8, 1} for levels = 5 (docs/algorithm.md).

    torch.round rounds half to even (as Python's round and the reference do): s = 0.5 -> 2.5 -> 2 -> 0.4.
    (B,) -> (B,).
    """
    if not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels: expected a positive int, got {levels!r}")
    return torch.round(levels * score).clamp(0, levels) / levels


def normalized_pair(v_pred: torch.Tensor, v_gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both pixel flows checked (finite, (B, H, W, 2), the same shape), upcast to at least float32 and divided by
    the image diagonal: the common start of the training reward and of MAS (rewards/mas.py)."""
    check_flow("v_pred", v_pred)
    check_flow("v_gt", v_gt)
    if v_pred.shape != v_gt.shape:
        raise ValueError(f"v_pred and v_gt shapes differ: {tuple(v_pred.shape)} vs {tuple(v_gt.shape)}")
    dtype = torch.promote_types(torch.promote_types(v_pred.dtype, v_gt.dtype), torch.float32)
    return normalize_by_diagonal(v_pred.to(dtype)), normalize_by_diagonal(v_gt.to(dtype))


def motion_alignment_reward(
    v_pred: torch.Tensor,
    v_gt: torch.Tensor,
    *,
    q: float = Q,
    eps: float = EPS,
    m: float = MOVE_THRESHOLD,
    tau: float = TAU,
    kappa: float = KAPPA,
    a: float = WEIGHT_LQ,
    b: float = WEIGHT_DIR,
    c: float = WEIGHT_MOVE,
    levels: int = LEVELS,
    quantize: bool = True,
    camera_compensation: bool = False,
    camera_penalty: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The motion-alignment reward for a batch of (prediction, target) pixel flows.

    v_pred: (B, H, W, 2) flow input -> candidate, in pixels; v_gt: the same shape, flow input -> ground truth.
    Returns per-sample (B,) float tensors: `l_q`, `direction`, `move`, `distance` (D), `score` (s) and `reward`
    (the quantized s when `quantize`, else s). Half-precision flows are upcast to float32 first.
    `camera_compensation` (`reward.flow.camera_compensation`): the terms compare object motion only (`compensate`),
    and the result adds `camera` (the edit's mean camera motion, in diagonals) and `camera_excess` (by how much it
    exceeds the ground truth's); `camera_penalty` · camera_excess is added to D.
    Raises ValueError (naming the argument) for NaN/inf, a wrong shape or dtype, or mismatched shapes.
    """
    camera: dict[str, torch.Tensor] = {}
    if camera_compensation:
        v_pred, v_gt, camera = compensate(v_pred, v_gt)
    v_pred, v_gt = normalized_pair(v_pred, v_gt)

    l_q = magnitude_error(v_pred, v_gt, q=q, eps=eps)
    direction = direction_error(v_pred, v_gt, m=m, eps=eps)
    move = movement_hinge(v_pred, v_gt, tau=tau, kappa=kappa)
    distance = alignment_distance(l_q, direction, move, a=a, b=b, c=c)
    if camera_compensation and camera_penalty > 0:
        distance = distance + camera_penalty * camera["camera_excess"]
    score = alignment_score(distance, q=q, eps=eps)
    reward = quantize_reward(score, levels=levels) if quantize else score
    out = {"l_q": l_q, "direction": direction, "move": move, "distance": distance, "score": score, "reward": reward}
    return {**out, **camera}


def compensate(v_pred: torch.Tensor, v_gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Remove each flow's dominant global (camera) motion: the object parts of both pixel flows, and per sample the
    edit's mean camera motion `camera` and `camera_excess` = max(0, mean|camera_pred| − mean|camera_gt|), both in
    image diagonals (the robust affine fit of motionnft_core/global_motion.py, deterministic)."""
    check_flow("v_pred", v_pred)
    check_flow("v_gt", v_gt)
    cam_pred, obj_pred = split_motion(v_pred)
    cam_gt, obj_gt = split_motion(v_gt)
    cam_pred_n, cam_gt_n = normalize_by_diagonal(cam_pred), normalize_by_diagonal(cam_gt)
    mean_pred = torch.linalg.vector_norm(cam_pred_n, dim=-1).mean(dim=(1, 2))
    mean_gt = torch.linalg.vector_norm(cam_gt_n, dim=-1).mean(dim=(1, 2))
    return obj_pred, obj_gt, {"camera": mean_pred, "camera_excess": (mean_pred - mean_gt).clamp_min(0.0)}
