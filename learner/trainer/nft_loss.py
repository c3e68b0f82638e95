"""DiffusionNFT loss and its statistics (docs/algorithm.md), one pure function per formula; torch only.

Checked against the reference code: NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py`` and
``flow_grpo/stat_tracking.py``; elainew728/motion-edit ``train/scripts/train_nft_qwen_image_edit.py`` and
``train/flow_grpo/stat_tracking.py`` (same math, plus the validity mask and prompt banning).

Shapes: P prompts (groups) of K candidates; B samples in a training micro-batch; latents are (B, ...).
The forward process x_t and the training draws (times, eps) are the rollout-learner contract: motionnft_core/noise.py.
"""

import torch

from motionnft_core.noise import per_sample

# ----------------------------------------------------------------------------- group statistics


def _check_rewards(rewards: torch.Tensor) -> torch.Tensor:
    """Rewards as float64 (the reference does its statistics in float64 numpy); (P, K), finite."""
    if rewards.ndim != 2 or rewards.numel() == 0:
        raise ValueError(f"rewards must have shape (P, K) with P, K >= 1, got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"rewards must be finite, got {rewards.tolist()}")
    return rewards.detach().to(torch.float64)


def optimality(rewards: torch.Tensor, *, eps: float = 1e-4, clip: float = 5.0) -> torch.Tensor:
    """Optimality r in [0, 1] of every sample (docs/algorithm.md).

    ``A = (R - mean_group R) / (std_all R + eps)``  (per-group mean, *global* std over all P*K samples),
    ``r = clip(clip(A, -clip, clip) / (2 * clip) + 0.5, 0, 1)``  (= ``clip(A, -5, 5) / 10 + 0.5`` at clip=5).

    The std is the population std (``correction=0``), as the reference's ``np.std`` (stat_tracking.py,
    ``global_std=True``). Groups are rows: the reference groups by prompt text, which is the same unless one
    step draws a prompt twice. Statistics run in float64; the result has the rewards' floating dtype.

    Args:
        rewards: (P, K) blended rewards R of one training step.
    Returns:
        (P, K) optimality r.
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    r64 = _check_rewards(rewards)
    advantage = (r64 - r64.mean(dim=1, keepdim=True)) / (r64.std(correction=0) + eps)  # (P, K)
    r = (advantage.clamp(-clip, clip) / clip) / 2.0 + 0.5
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return r.clamp(0.0, 1.0).to(out_dtype)


def group_filter(rewards: torch.Tensor, *, min_std: float = 0.05, max_mean: float = 0.9) -> torch.Tensor:
    """Valid groups (docs/algorithm.md): ``std_group R > min_std and mean_group R < max_mean``.

    Samples of other groups are excluded from the loss (motion-edit's ``valid_mask`` built from the
    tracker's per-prompt std and mean; population std, as ``np.std``).

    Args:
        rewards: (P, K).
    Returns:
        (P,) bool.
    """
    r64 = _check_rewards(rewards)
    return (r64.std(dim=1, correction=0) > min_std) & (r64.mean(dim=1) < max_mean)


def saturated_groups(rewards: torch.Tensor, *, max_std: float = 0.05, min_mean: float = 0.9) -> torch.Tensor:
    """Groups whose prompt is banned from later sampling (docs/algorithm.md): ``std < max_std and mean > min_mean``.

    Same thresholds as ``group_filter`` (reference: ``ban_std_thres``, ``ban_mean_thres``); a group can be
    neither valid nor saturated (e.g. all candidates scoring 0).

    Args:
        rewards: (P, K).
    Returns:
        (P,) bool.
    """
    r64 = _check_rewards(rewards)
    return (r64.std(dim=1, correction=0) < max_std) & (r64.mean(dim=1) > min_mean)


# ----------------------------------------------------------------------------- the loss


def _mean_valid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of x (B,) over valid samples; 0 (still part of the graph) when none is valid.

    ``torch.where`` rather than the reference's ``x * mask``: equal for finite values, but a NaN in an
    excluded sample cannot leak into the loss.
    """
    n_valid = valid.sum().clamp_min(1)
    return torch.where(valid, x, torch.zeros_like(x)).sum() / n_valid


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    v_ref: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    valid: torch.Tensor,
    *,
    beta: float = 1.0,
    adv_clip_max: float = 5.0,
    kl_weight: float = 1e-4,
    weight_floor: float = 1e-5,
    token_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT loss at one training timestep (docs/algorithm.md)::

        v+ = beta * v_theta + (1 - beta) * v_old          v- = (1 + beta) * v_old - beta * v_theta
        x+ = x_t - t * v+                                 x- = x_t - t * v-
        L+ = mean((x+ - x0)^2 / sg(max(mean|x+ - x0|, weight_floor)))      L- likewise
        loss = adv_clip_max * mean_valid((r * L+ + (1 - r) * L-) / beta)
               + kl_weight * mean_valid(mean((v_theta - v_ref)^2))

    ``mean`` is over each sample's non-batch dims. As in the reference (motion-edit
    train_nft_qwen_image_edit.py, "adaptive weighting"): the weights are computed in float64 under no_grad,
    the squared error is divided elementwise by them, so L+, L- and the loss come out in float64;
    ``v_old`` and ``v_ref`` are detached; ``adv_clip_max`` is the reference's name for the "5" factor
    (the same constant that clips A). Invalid samples are excluded from both means; with no valid sample the
    loss is 0 but still has a graph (motion-edit's ``mean_by_mask`` returns ``x.sum() * 0``), so
    ``backward`` works and adds zero gradients.

    ``token_weight`` (B, L) (nft.motion_focal, learner/trainer/motion_focal.py): each token's squared error in L+
    and L- is multiplied by its weight; the stop-gradient normalisers and the KL term stay unweighted. None is
    the plain loss.

    Args:
        v_theta: (B, ...) velocity of the trained policy (with grad).
        v_old: (B, ...) velocity of the old (sampling) policy.  v_ref: (B, ...) velocity of the base model.
        x_t: (B, ...) noised latents the velocities were computed at.  x0: (B, ...) clean latents.
        t: (B,) times.  r: (B,) optimality in [0, 1].  valid: (B,) bool, False = excluded.
    Returns:
        (loss, metrics): loss is a float64 scalar; metrics are detached 0-dim tensors (no host sync here):
        ``loss, policy_loss, kl_loss, loss_pos, loss_neg`` (means over valid samples) and ``n_valid``.
    """
    for name, v in (("v_theta", v_theta), ("v_old", v_old), ("v_ref", v_ref), ("x_t", x_t)):
        if v.shape != x0.shape:
            raise ValueError(f"{name} shape {tuple(v.shape)} must equal x0 shape {tuple(x0.shape)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (the loss divides by it), got {beta}")
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got dtype {valid.dtype}")
    t_b = per_sample(t, x0, "t")
    per_sample(r, x0, "r")
    per_sample(valid, x0, "valid")
    if token_weight is not None:
        if x0.ndim < 2 or token_weight.shape != x0.shape[:2]:
            raise ValueError(f"token_weight shape {tuple(token_weight.shape)} must be x0's (B, L) "
                             f"{tuple(x0.shape[:2])}")  # fmt: skip
        token_weight = token_weight.detach().reshape(*token_weight.shape, *([1] * (x0.ndim - 2)))
    v_old, v_ref = v_old.detach(), v_ref.detach()
    dims = tuple(range(1, x0.ndim))  # non-batch dims

    v_pos = beta * v_theta + (1.0 - beta) * v_old
    v_neg = (1.0 + beta) * v_old - beta * v_theta
    x_pos = x_t - t_b * v_pos  # x0 implied by the positive policy
    x_neg = x_t - t_b * v_neg  # x0 implied by the implicit negative policy

    def adaptive_l2(x_hat: torch.Tensor) -> torch.Tensor:
        """mean((x_hat - x0)^2 / sg(max(mean|x_hat - x0|, weight_floor))), (B,) float64."""
        with torch.no_grad():
            weight = (x_hat.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp_min(weight_floor)
        squared = (x_hat - x0) ** 2
        if token_weight is not None:
            squared = squared * token_weight
        return (squared / weight).mean(dim=dims)

    loss_pos = adaptive_l2(x_pos)  # (B,)
    loss_neg = adaptive_l2(x_neg)  # (B,)
    r64 = r.detach().to(torch.float64)
    per_sample_policy = (r64 * loss_pos + (1.0 - r64) * loss_neg) / beta  # (B,)
    per_sample_kl = ((v_theta - v_ref) ** 2).mean(dim=dims)  # (B,)

    policy_loss = adv_clip_max * _mean_valid(per_sample_policy, valid)
    kl_loss = _mean_valid(per_sample_kl, valid)
    loss = policy_loss + kl_weight * kl_loss

    metrics = {
        "loss": loss.detach(),
        "policy_loss": policy_loss.detach(),
        "kl_loss": kl_loss.detach(),
        "loss_pos": _mean_valid(loss_pos.detach(), valid),
        "loss_neg": _mean_valid(loss_neg.detach(), valid),
        "n_valid": valid.sum(),
    }
    return loss, metrics


# ----------------------------------------------------------------------------- schedules


def old_policy_decay(
    step: int,
    *,
    schedule: str = "linear_capped",
    linear_rate: float = 0.001,
    linear_cap: float = 0.5,
    delay_steps: int = 75,
    delayed_rate: float = 0.0075,
    delayed_cap: float = 0.999,
) -> float:
    """Decay d of the old-policy update ``old <- d * old + (1 - d) * theta`` (docs/algorithm.md).

    ``step`` counts optimizer steps done so far: the reference calls ``return_decay(global_step, ...)``
    after the step's update has incremented ``global_step``, so the first update uses step = 1.
    Schedules (reference ``decay_type`` 1, 0, 2):
      "linear_capped": min(linear_rate * step, linear_cap)
      "none":          0 (old = theta after every step)
      "delayed":       0 for step < delay_steps, else min(delayed_rate * (step - delay_steps), delayed_cap)
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    # 1) no memory: the old policy follows theta exactly
    if schedule == "none":
        return 0.0
    # 2) linear ramp from 0, capped
    if schedule == "linear_capped":
        return min(linear_rate * step, linear_cap)
    # 3) flat at 0 for a warm-up, then a steeper ramp to a higher cap
    if schedule == "delayed":
        if step < delay_steps:
            return 0.0
        return min(delayed_rate * (step - delay_steps), delayed_cap)
    raise ValueError(f"unknown old-policy decay schedule {schedule!r}; expected 'linear_capped', 'none' or 'delayed'")


def ema_decay(k: int, *, cap: float = 0.9) -> float:
    """Decay of the eval EMA of theta after optimizer step k (docs/algorithm.md): ``min((1 + k) / (10 + k), cap)``.

    As the reference's ``EMAModuleWrapper.get_current_decay`` (called with the incremented global step).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return min((1 + k) / (10 + k), cap)
