"""MAS (rewards/mas.py) against values computed by hand on tiny flows, and its `eval.*` config keys.

Flows are (B, 3, 4, 2) so the image diagonal is exactly 5 and normalised values are easy to write down.
"""

import inspect
import math

import pytest
import torch

from motionnft_core.config import ConfigError, EvalConfig
from motionnft_core.config_loader import load_config
from rewards.mas import (
    mas_constants,
    mas_from_distance,
    motion_alignment_score,
    motion_weights,
    weighted_direction_error,
)

H, W = 3, 4  # diagonal 5
EPS = 1e-6
SIMPLE = {"alpha": 0.5, "tau": 0.4, "d_min": 0.0, "d_max": 1.0, "eps": EPS, "q": 0.4, "min_ratio": 0.01}


def constant(dx: float, dy: float, h: int = H, w: int = W) -> torch.Tensor:
    """A (1, h, w, 2) float64 flow moving every pixel by (dx, dy) pixels."""
    return torch.tensor([dx, dy], dtype=torch.float64).expand(1, h, w, 2).clone()


def two_regions() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows 0-1 left half (region A, 6 px) and the rest (region B, 6 px), in pixels (diagonal 5):
    V_gt: A moves (0, 5) -> normalised |V| = 1; B moves (0, 2.5) -> |V| = 0.5.
    V_pred: equal to V_gt on A (error 0); the opposite of V_gt on B (cos = -1, error 1)."""
    gt = torch.zeros(1, H, W, 2, dtype=torch.float64)
    pred = torch.zeros_like(gt)
    a = torch.zeros(H, W, dtype=torch.bool)
    a[:, :2] = True
    gt[0, a] = torch.tensor([0.0, 5.0], dtype=torch.float64)
    gt[0, ~a] = torch.tensor([0.0, 2.5], dtype=torch.float64)
    pred[0, a] = gt[0, a]
    pred[0, ~a] = -gt[0, ~a]
    return pred, gt


def test_two_regions_hand_computed():
    pred, gt = two_regions()
    out = motion_alignment_score(pred, gt, **SIMPLE)
    # D_mag: 24 components; A's 12 and B's 6 x-components differ by 0, B's 6 y-components by |-0.5 - 0.5| = 1.
    d_mag = (18 * EPS**0.4 + 6 * (1 + EPS) ** 0.4) / 24
    # tau = 0.4: both regions weigh, w = 1 on A and 0.5 on B; errors 0 on A, 1 on B.
    d_dir = (6 * 0.5 * 1.0) / (6 * 1.0 + 6 * 0.5 + EPS)
    distance = 0.5 * d_mag + 0.5 * d_dir
    assert out["d_mag"].item() == pytest.approx(d_mag, rel=1e-12)
    assert out["d_dir"].item() == pytest.approx(d_dir, rel=1e-12)
    assert out["distance"].item() == pytest.approx(distance, rel=1e-12)
    assert out["mas"].item() == pytest.approx(100 * (1 - distance), rel=1e-12)  # d_min 0, d_max 1: no clip
    assert out["mas"].item() == pytest.approx(70.68, abs=0.01)
    assert out["motion_ratio"].item() == pytest.approx(1.0) and out["static"].item() == 0.0


@pytest.mark.parametrize(
    ("tau", "d_dir"),
    [
        (0.4, 3.0 / (9.0 + EPS)),  # both regions: w = 1 (A), 0.5 (B)
        (0.5, 0.0),  # |V_gt| = 0.5 on B is not > 0.5: only A weighs, and its error is 0
        (0.6, 0.0),
        (1.0, 0.0),  # nothing above tau: empty weights give 0, not 0/0
    ],
)
def test_threshold_tau_is_strict_and_selects_pixels(tau, d_dir):
    pred, gt = two_regions()
    out = motion_alignment_score(pred, gt, **{**SIMPLE, "tau": tau})
    assert out["d_dir"].item() == pytest.approx(d_dir, abs=1e-12)


def test_weights_are_relative_to_the_largest_motion():
    mags = torch.tensor([0.0, 0.2, 0.5, 1.0], dtype=torch.float64)
    v_gt = torch.stack([mags, torch.zeros_like(mags)], dim=-1).view(1, 1, 4, 2)
    assert motion_weights(v_gt, tau=0.3, eps=EPS).flatten().tolist() == [0.0, 0.0, 0.5, 1.0]
    assert motion_weights(2 * v_gt, tau=0.3, eps=EPS).flatten().tolist() == [0.0, 0.4 / 2, 0.5, 1.0]
    assert motion_weights(torch.zeros_like(v_gt), tau=0.0, eps=EPS).flatten().tolist() == [0.0] * 4  # no NaN


def test_weighting_makes_the_main_motion_count_more():
    """Same errors, weights 1 vs 0.5: a wrong direction on the big motion costs twice that on the small one."""
    pred, gt = two_regions()
    wrong_big = torch.where(gt.norm(dim=-1, keepdim=True) > 3, -gt, gt)
    wrong_small = pred  # wrong on B (the smaller motion)
    big = weighted_direction_error(wrong_big / 5, gt / 5, tau=0.4, eps=EPS).item()
    small = weighted_direction_error(wrong_small / 5, gt / 5, tau=0.4, eps=EPS).item()
    assert big == pytest.approx(6 / 9, abs=1e-6) and small == pytest.approx(3 / 9, abs=1e-6)


def test_zero_prediction_has_direction_error_one_half():
    gt = constant(3.0, 4.0)
    out = motion_alignment_score(torch.zeros_like(gt), gt, **{**SIMPLE, "tau": 0.0})
    assert out["d_dir"].item() == pytest.approx(0.5 * 12 / (12 + EPS), rel=1e-12)


@pytest.mark.parametrize(
    ("pred_norm", "static"),
    [
        (0.0, True),  # copies the input
        (0.009, True),  # ratio 0.009 < 0.01
        (0.011, False),  # ratio 0.011: scored by D
        (1.0, False),
    ],
)
def test_ratio_rule_zeroes_an_edit_that_does_not_move(pred_norm, static):
    gt = constant(3.0, 4.0)  # normalised (0.6, 0.8): |V_gt| = 1
    pred = constant(3.0 * pred_norm, 4.0 * pred_norm)  # same direction, |V_pred| = pred_norm
    out = motion_alignment_score(pred, gt, **SIMPLE)
    assert out["motion_ratio"].item() == pytest.approx(pred_norm, rel=1e-9, abs=1e-12)
    assert out["static"].item() == float(static)
    # Scored by D: direction right (D_dir = 0), D_mag = mean((1 - pred_norm) * (0.6, 0.8) + eps) ** 0.4.
    d_mag = (((0.6 * (1 - pred_norm) + EPS) ** 0.4) + ((0.8 * (1 - pred_norm) + EPS) ** 0.4)) / 2
    expected = 0.0 if static else 100 * (1 - 0.5 * d_mag)
    assert out["mas"].item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert out["d_mag"].item() == pytest.approx(d_mag, rel=1e-9)  # the terms are reported even when MAS = 0


def test_unmoving_target_is_scored_by_distance_not_the_ratio_rule():
    zero = torch.zeros(1, H, W, 2, dtype=torch.float64)
    out = motion_alignment_score(zero, zero, **SIMPLE)
    assert out["static"].item() == 0.0 and out["d_dir"].item() == 0.0
    assert out["mas"].item() == pytest.approx(100 * (1 - 0.5 * EPS**0.4), rel=1e-12)
    assert math.isfinite(out["motion_ratio"].item())


@pytest.mark.parametrize(
    ("distance", "mas"),
    [
        (0.05, 100.0),  # below d_min: clipped to 100
        (0.1, 100.0),
        (0.2, 75.0),  # (0.2 - 0.1) / 0.4 = 0.25
        (0.4, 25.0),
        (0.5, 0.0),
        (0.9, 0.0),  # above d_max: clipped to 0
    ],
)
def test_clip_at_both_ends(distance, mas):
    got = mas_from_distance(torch.tensor([distance], dtype=torch.float64), d_min=0.1, d_max=0.5)
    assert got.item() == pytest.approx(mas, abs=1e-9)


def test_perfect_edit_scores_100_with_the_defaults():
    """d_min = ε^0.4 is the D_mag of a perfect match, and D = α·ε^0.4 <= d_min: MAS 100 through the clip."""
    gt = constant(3.0, 4.0)
    out = motion_alignment_score(gt.clone(), gt, **mas_constants(EvalConfig()))
    assert out["mas"].item() == 100.0 and out["d_dir"].item() == 0.0


def test_invariant_to_resolution_and_batched_per_sample():
    pred, gt = two_regions()
    big_pred = pred.repeat_interleave(2, 1).repeat_interleave(2, 2) * 2  # the same edit at twice the size
    big_gt = gt.repeat_interleave(2, 1).repeat_interleave(2, 2) * 2
    small = motion_alignment_score(pred, gt, **SIMPLE)
    big = motion_alignment_score(big_pred, big_gt, **SIMPLE)
    assert big["mas"].item() == pytest.approx(small["mas"].item(), rel=1e-6)  # up to ε in Σw + ε (4x the pixels)
    batch = motion_alignment_score(torch.cat([pred, gt]), torch.cat([gt, gt]), **SIMPLE)  # (edit, perfect)
    assert batch["mas"][0].item() == pytest.approx(small["mas"].item(), rel=1e-12)
    assert batch["mas"][1].item() == pytest.approx(100 * (1 - 0.5 * EPS**0.4), rel=1e-12)
    half = motion_alignment_score(pred.half(), gt.half(), **SIMPLE)  # upcast to float32
    assert half["mas"].dtype == torch.float32 and half["mas"].item() == pytest.approx(small["mas"].item(), rel=1e-5)


def test_bad_flows_are_refused_naming_the_argument():
    gt = constant(3.0, 4.0)
    bad = gt.clone()
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="v_pred: flow has 1 NaN/inf"):
        motion_alignment_score(bad, gt, **SIMPLE)
    with pytest.raises(ValueError, match="shapes differ"):
        motion_alignment_score(gt, constant(3.0, 4.0, h=4), **SIMPLE)
    with pytest.raises(ValueError, match=r"v_gt: expected shape \(B, H, W, 2\)"):
        motion_alignment_score(gt, gt[..., :1], **SIMPLE)
    with pytest.raises(ValueError, match="d_max"):
        mas_from_distance(torch.zeros(1), d_min=0.5, d_max=0.5)


def test_config_keys_map_onto_the_function_and_are_checked():
    params = {k for k, p in inspect.signature(motion_alignment_score).parameters.items() if p.kind == p.KEYWORD_ONLY}
    assert set(mas_constants(EvalConfig())) == params
    cfg = load_config(None, ["model.tiny=true", "data.synthetic=8", "reward.judge_weight=0", "eval.mas_alpha=0.25"])
    assert mas_constants(cfg.eval)["alpha"] == 0.25
    for override, key in [
        ("eval.mas_alpha=1.5", "eval.mas_alpha"),
        ("eval.mas_d_max=0.001", "eval.mas_d_max"),  # below the default d_min
        ("eval.mas_eps=0", "eval.mas_eps"),
        ("eval.mas_tau=-1", "eval.mas_tau"),
        ("eval.confidence=1.0", "eval.confidence"),
        ("eval.bootstrap_samples=0", "eval.bootstrap_samples"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, ["model.tiny=true", "data.synthetic=8", "reward.judge_weight=0", override])


def test_eval_keys_leave_a_runs_identity_alone():
    """eval.* changes how a run is judged, not what it learns: a resume ignores it, also in a checkpoint from
    before the section existed."""
    from learner.driver.identity import training_keys_that_differ
    from motionnft_core.config_loader import config_to_dict

    minimal = ["model.tiny=true", "data.synthetic=8", "reward.judge_weight=0"]
    old = {k: v for k, v in config_to_dict(load_config(None, minimal)).items() if k != "eval"}
    changed = config_to_dict(load_config(None, [*minimal, "eval.mas_alpha=0.5", "eval.num_steps=10"]))
    assert training_keys_that_differ(old, changed) == []
