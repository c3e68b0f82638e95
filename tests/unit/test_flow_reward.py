"""Hand-computed cases of the motion-alignment reward (docs/algorithm.md).

Most cases use a constant flow of (3, 4) pixels on a 30 x 40 image: the diagonal is 50, so the normalised
flow is (0.06, 0.08) with magnitude 0.1, which keeps the arithmetic checkable on paper.
"""

import math

import pytest
import torch

from rewards.flow_reward import (
    alignment_distance,
    alignment_score,
    direction_error,
    magnitude_error,
    motion_alignment_reward,
    movement_hinge,
    normalize_by_diagonal,
    quantize_reward,
)

H, W = 30, 40  # diagonal 50
EPS, Q = 1e-6, 0.4
LO = EPS**Q  # 10 ** -2.4 = 0.0039810717...
TOL = 1e-6  # float32 arithmetic on O(1) values


def constant_flow(dx: float, dy: float, batch: int = 1, height: int = H, width: int = W) -> torch.Tensor:
    flow = torch.empty(batch, height, width, 2)
    flow[..., 0], flow[..., 1] = dx, dy
    return flow


def test_normalize_by_diagonal():
    out = normalize_by_diagonal(constant_flow(3.0, 4.0))
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.06, 0.08]), atol=1e-7)


def test_perfect_match_scores_one():
    # L_q = lo, dir = 0 (cos = 1), move = max(0, 0.01 + 0.05 - 0.1) = 0 -> D = 0.7 lo <= lo -> s = 1.
    v = constant_flow(3.0, 4.0, batch=2)
    out = motion_alignment_reward(v, v.clone())
    assert torch.allclose(out["l_q"], torch.full((2,), LO), rtol=1e-5)
    assert torch.allclose(out["direction"], torch.zeros(2), atol=1e-7)  # cos = 1 - one float32 ulp at worst
    assert torch.equal(out["move"], torch.zeros(2))
    assert torch.allclose(out["distance"], torch.full((2,), 0.7 * LO), rtol=1e-5)
    assert torch.equal(out["score"], torch.ones(2))
    assert torch.equal(out["reward"], torch.ones(2))


def test_static_match_keeps_hinge_but_scores_one():
    # V_p = V_g = 0: empty direction mask -> dir = 0; move = tau = 0.01 (hinge active);
    # D = 0.7 lo + 0.1 * 0.01 = 0.0037868 < lo = 0.0039811 -> s = 1 (the case DESIGN's "D <= lo" covers).
    v = torch.zeros(1, H, W, 2)
    out = motion_alignment_reward(v, v.clone())
    assert out["direction"].item() == 0.0
    assert out["move"].item() == pytest.approx(0.01, abs=TOL)
    assert out["distance"].item() == pytest.approx(0.7 * LO + 0.001, abs=TOL)
    assert out["score"].item() == 1.0


def test_opposite_direction_is_low():
    # |V_p - V_g| = (0.12, 0.16): L_q = ((0.12+eps)^0.4 + (0.16+eps)^0.4) / 2 = (0.428223 + 0.480455) / 2 = 0.454339
    # dir = (1 - (-1)) / 2 = 1; move = max(0, 0.01 + 0.05 - 0.1) = 0
    # D = 0.7 * 0.454339 + 0.2 = 0.518037; s = 1 - (D - lo) / (1 - lo) = 0.483889; reward = round(2.419) / 5 = 0.4
    v_gt = constant_flow(3.0, 4.0)
    out = motion_alignment_reward(-v_gt, v_gt)
    l_q = ((0.12 + EPS) ** Q + (0.16 + EPS) ** Q) / 2
    assert out["l_q"].item() == pytest.approx(l_q, abs=TOL)
    assert out["l_q"].item() == pytest.approx(0.454339, abs=1e-6)
    assert out["direction"].item() == pytest.approx(1.0, abs=TOL)
    assert out["move"].item() == 0.0
    assert out["distance"].item() == pytest.approx(0.518037, abs=2e-6)
    assert out["score"].item() == pytest.approx(0.483889, abs=2e-6)
    assert out["reward"].item() == pytest.approx(0.4, abs=TOL)


def test_zero_prediction_against_moving_target():
    # V_p = 0: L_q = ((0.06+eps)^0.4 + (0.08+eps)^0.4) / 2 = (0.324559 + 0.364120) / 2 = 0.344326
    # dir = 0.5 (cos = 0 by the eps floor); move = max(0, 0.01 + 0.5 * 0.1 - 0) = 0.06 (hinge active)
    # D = 0.7 * 0.344326 + 0.2 * 0.5 + 0.1 * 0.06 = 0.347028; s = 0.655582; reward = round(3.278) / 5 = 0.6
    v_gt = constant_flow(3.0, 4.0)
    out = motion_alignment_reward(torch.zeros_like(v_gt), v_gt)
    assert out["l_q"].item() == pytest.approx(0.344326, abs=1e-6)
    assert out["direction"].item() == pytest.approx(0.5, abs=TOL)
    assert out["move"].item() == pytest.approx(0.06, abs=TOL)
    assert out["distance"].item() == pytest.approx(0.347028, abs=2e-6)
    assert out["score"].item() == pytest.approx(0.655582, abs=2e-6)
    assert out["reward"].item() == pytest.approx(0.6, abs=TOL)


def test_direction_mask_counts_only_moving_target_pixels():
    # Left half of the target moves by (3, 4) px (|V_g| = 0.1 > m); right half is static (excluded).
    # The prediction is perpendicular on the left (error 0.5) and opposite on the right (ignored) -> dir = 0.5.
    v_gt = torch.zeros(1, H, W, 2)
    v_gt[:, :, : W // 2] = torch.tensor([3.0, 4.0])
    v_pred = torch.zeros(1, H, W, 2)
    v_pred[:, :, : W // 2] = torch.tensor([-4.0, 3.0])
    v_pred[:, :, W // 2 :] = torch.tensor([-3.0, -4.0])
    d = direction_error(normalize_by_diagonal(v_pred), normalize_by_diagonal(v_gt))
    assert d.item() == pytest.approx(0.5, abs=TOL)


def test_movement_hinge_and_distance_by_hand():
    # mean|V_g| = 0.1, mean|V_p| = 0.02 -> move = 0.01 + 0.05 - 0.02 = 0.04
    v_gt = normalize_by_diagonal(constant_flow(3.0, 4.0))
    v_pred = normalize_by_diagonal(constant_flow(0.6, 0.8))
    move = movement_hinge(v_pred, v_gt)
    assert move.item() == pytest.approx(0.04, abs=TOL)
    dist = alignment_distance(torch.tensor([0.5]), torch.tensor([0.25]), move, a=0.7, b=0.2, c=0.1)
    assert dist.item() == pytest.approx(0.35 + 0.05 + 0.004, abs=TOL)
    # L_q of a perfect match is lo; s is clipped at 0 for D >= 1.
    assert magnitude_error(v_gt, v_gt).item() == pytest.approx(LO, rel=1e-5)
    assert alignment_score(torch.tensor([1.5])).item() == 0.0


@pytest.mark.parametrize(
    ("score", "levels", "expected"),
    [
        (0.0, 5, 0.0),
        (0.09, 5, 0.0),  # 0.45 -> 0
        (0.11, 5, 0.2),  # 0.55 -> 1
        (0.5, 5, 0.4),  # 2.5 -> 2: half to even, as Python's round and the reference's torch.round
        (0.7, 5, 0.8),  # 3.5 -> 4: half to even
        (0.93, 5, 1.0),  # 4.65 -> 5
        (1.0, 5, 1.0),
        (0.33, 10, 0.3),
        (0.37, 2, 0.5),  # 0.74 -> 1
    ],
)
def test_quantization_levels(score, levels, expected):
    out = quantize_reward(torch.tensor([score]), levels=levels)
    assert out.item() == pytest.approx(expected, abs=1e-7)


def test_quantize_rejects_bad_levels():
    with pytest.raises(ValueError, match="levels"):
        quantize_reward(torch.tensor([0.5]), levels=0)


def test_reward_values_lie_on_the_grid_and_quantize_off_returns_score():
    torch.manual_seed(0)
    v_gt = torch.randn(6, 16, 20, 2) * 3
    v_pred = v_gt + torch.randn(6, 16, 20, 2) * torch.linspace(0, 4, 6).view(6, 1, 1, 1)
    out = motion_alignment_reward(v_pred, v_gt)
    assert torch.equal(out["reward"] * 5, torch.round(out["reward"] * 5))
    raw = motion_alignment_reward(v_pred, v_gt, quantize=False)
    assert torch.equal(raw["reward"], raw["score"])
    assert torch.equal(raw["score"], out["score"])
    for key in ("l_q", "direction", "move", "distance", "score", "reward"):
        assert out[key].shape == (6,)


def test_scaling_image_and_flow_by_two_leaves_reward_unchanged():
    torch.manual_seed(1)
    v_gt = torch.randn(3, 12, 18, 2) * 2
    v_pred = v_gt + torch.randn(3, 12, 18, 2)

    def upscale(flow: torch.Tensor) -> torch.Tensor:
        # Each pixel becomes a 2x2 block, and each displacement doubles (the image is twice as large).
        return 2.0 * flow.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)

    small = motion_alignment_reward(v_pred, v_gt, quantize=False)
    large = motion_alignment_reward(upscale(v_pred), upscale(v_gt), quantize=False)
    for key in small:
        assert torch.allclose(small[key], large[key], atol=1e-6, rtol=0), key


def reference_loop(v_pred: torch.Tensor, v_gt: torch.Tensor) -> torch.Tensor:
    """Per-sample re-derivation of the reference scorer (CHW layout, lo as L_q(V_g, V_g)), unquantized."""
    scores = []
    for fp, fg in zip(v_pred.double(), v_gt.double(), strict=True):
        h, w, _ = fp.shape
        diag = math.sqrt(h * h + w * w)
        p, g = fp / diag, fg / diag
        l_q = ((p - g).abs() + EPS).pow(Q).mean()
        lo = ((g - g).abs() + EPS).pow(Q).mean()
        pc, gc = p.permute(2, 0, 1), g.permute(2, 0, 1)
        mp, mg = pc.norm(dim=0), gc.norm(dim=0)
        cos = ((pc / mp.clamp_min(EPS)) * (gc / mg.clamp_min(EPS))).sum(0).clamp(-1, 1)
        mask = (mg > 0.002).double()
        direction = ((1 - cos).clamp(0, 2) * 0.5 * mask).sum() / mask.sum().clamp_min(1)
        move = (0.01 + 0.5 * mg.mean() - mp.mean()).clamp_min(0)
        d = 0.7 * l_q + 0.2 * direction + 0.1 * move
        scores.append(1 - ((d - lo) / (1 - lo).clamp_min(1e-6)).clamp(0, 1))
    return torch.stack(scores)


def test_matches_reference_loop():
    torch.manual_seed(2)
    v_gt = torch.randn(5, 14, 22, 2) * 4
    v_gt[1] = 0.0  # static target: empty mask, hinge = tau
    v_pred = v_gt + torch.randn(5, 14, 22, 2) * torch.tensor([0.0, 0.5, 1.0, 3.0, 8.0]).view(5, 1, 1, 1)
    out = motion_alignment_reward(v_pred, v_gt, quantize=False)
    ref = reference_loop(v_pred, v_gt)
    diff = (out["score"].double() - ref).abs().max().item()
    assert diff < 1e-6, f"max |vectorized - loop| = {diff}"
    # float64 input stays float64 and then agrees to round-off.
    out64 = motion_alignment_reward(v_pred.double(), v_gt.double(), quantize=False)
    assert out64["score"].dtype == torch.float64
    assert (out64["score"] - ref).abs().max().item() < 1e-12


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("arg", ["v_pred", "v_gt"])
def test_non_finite_flow_raises(bad, arg):
    flows = {"v_pred": torch.zeros(2, 8, 8, 2), "v_gt": torch.zeros(2, 8, 8, 2)}
    flows[arg][1, 3, 4, 0] = bad
    with pytest.raises(ValueError, match=f"{arg}: flow has 1 NaN/inf"):
        motion_alignment_reward(flows["v_pred"], flows["v_gt"])


@pytest.mark.parametrize(
    ("v_pred", "v_gt", "match"),
    [
        (torch.zeros(8, 8, 2), torch.zeros(8, 8, 2), r"v_pred: expected shape \(B, H, W, 2\)"),
        (torch.zeros(1, 8, 8, 2), torch.zeros(1, 8, 8, 3), r"v_gt: expected shape \(B, H, W, 2\)"),
        (torch.zeros(1, 8, 8, 2), torch.zeros(1, 8, 9, 2), "v_pred and v_gt shapes differ"),
        (torch.zeros(2, 8, 8, 2), torch.zeros(1, 8, 8, 2), "v_pred and v_gt shapes differ"),
        (torch.zeros(1, 8, 8, 2, dtype=torch.int64), torch.zeros(1, 8, 8, 2), "v_pred: expected a floating"),
        (torch.zeros(0, 8, 8, 2), torch.zeros(0, 8, 8, 2), "v_pred: empty flow"),
    ],
)
def test_bad_shapes_raise(v_pred, v_gt, match):
    with pytest.raises(ValueError, match=match):
        motion_alignment_reward(v_pred, v_gt)
