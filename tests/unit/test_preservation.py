"""The static-region preservation term (rewards/preservation.py) by hand values, and its path through the flow scorer
and the reward scorer (reward.preservation_weight)."""

import pytest
import torch

from motionnft_core.config import ConfigError, FlowRewardConfig, RewardConfig
from rewards.flow_scorer import FlowItem, FlowRewardScorer, preservation_constants
from rewards.preservation import blend_preservation, grid_mask, preservation_score, static_mask
from rewards.scorer import RewardScorer
from tests.unit.golden.make_golden import PixelFlow, flow_items, score_groups

H = W = 32
THRESHOLD = 0.005  # diagonals: 0.23 px at 32 x 32


def object_move(old: slice, new: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth flows of an object in rows 8:16 moving from columns `old` to `new`: forward (input -> target) at
    its old place, backward (target -> input) at its new place."""
    forward, backward = torch.zeros(1, H, W, 2), torch.zeros(1, H, W, 2)
    shift = new.start - old.start
    forward[0, 8:16, old, 0] = shift
    backward[0, 8:16, new, 0] = -shift
    return forward, backward


def scene() -> tuple[torch.Tensor, torch.Tensor]:
    """Input: a textured background with a white object at rows 8:16, columns 4:12; target: moved to 10:18."""
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 200, (3, H, W), generator=g, dtype=torch.uint8)
    image[:, 8:16, 4:12] = 255
    target = image.clone()
    target[:, 8:16, 4:12] = 0
    target[:, 8:16, 10:18] = 255
    return image, target


def test_old_and_new_places_of_a_moved_object_are_never_static():
    forward, backward = object_move(slice(4, 12), slice(10, 18))
    static = static_mask(forward, backward, threshold=THRESHOLD)[0]
    assert not static[8:16, 4:18].any()  # old place, new place and what lies between
    assert static.sum() == H * W - 8 * 14
    cells = grid_mask(static[None], 8)[0]  # 4 x 4 px cells: rows 8:16 -> cells 2, 3; columns 4:18 -> cells 1..4
    assert not cells[2:4, 1:5].any() and cells.sum() == 64 - 8


def test_an_edit_equal_to_the_input_outside_the_moving_region_scores_1():
    image, target = scene()
    forward, backward = object_move(slice(4, 12), slice(10, 18))
    static = static_mask(forward, backward, threshold=THRESHOLD)[0]
    wild = image.clone()
    wild[:, 8:16, 4:18] = torch.randint(0, 256, (3, 8, 14), dtype=torch.uint8)  # anything inside the moving region
    r_pres, share = preservation_score(torch.stack([target, wild, image]), image, static, grid=8)
    assert r_pres.tolist() == [1.0, 1.0, 1.0]
    assert share.tolist() == [56 / 64] * 3


def test_a_repainted_background_scores_lower_by_its_distance():
    image, target = scene()
    forward, backward = object_move(slice(4, 12), slice(10, 18))
    static = static_mask(forward, backward, threshold=THRESHOLD)[0]
    repainted = target.clone()
    repainted[:, :4, :] = 255 - repainted[:, :4, :]  # the top rows (static) repainted
    half = target.clone()
    half[:, :4, :16] = 255 - half[:, :4, :16]
    r_pres, _ = preservation_score(torch.stack([target, half, repainted]), image, static, grid=32)
    top = (255 - 2 * image[:, :4].float()).abs() / 255  # |(255 - x) - x| / 255 per pixel, per channel
    expected = 1.0 - top.mean(dim=0).sum() / (H * W - 8 * 14)
    assert r_pres[0] == 1.0
    assert r_pres[2] == pytest.approx(float(expected), abs=1e-6)
    assert r_pres[2] < r_pres[1] < r_pres[0]


def test_no_static_cell_scores_1_and_the_blend_is_exact():
    image, _ = scene()
    static = torch.zeros(H, W, dtype=torch.bool)
    r_pres, share = preservation_score(torch.stack([255 - image]), image, static, grid=8)
    assert r_pres.tolist() == [1.0] and share.tolist() == [0.0]
    out = blend_preservation(torch.tensor([0.8, 0.4], dtype=torch.float64), torch.tensor([1.0, 0.5]), weight=0.25)
    assert out.tolist() == [0.75 * 0.8 + 0.25, 0.75 * 0.4 + 0.25 * 0.5]


def test_the_flow_scorer_adds_r_pres_with_one_backward_flow_per_prompt_cached():
    image, target = scene()
    repainted = target.clone()
    repainted[:, :4] = 255 - repainted[:, :4]
    items = [*flow_items(), FlowItem("scene", image, target, torch.stack([target, image, repainted]))]
    plain = FlowRewardScorer(PixelFlow(), FlowRewardConfig())
    pres = FlowRewardScorer(PixelFlow(), FlowRewardConfig(),
                            preservation=preservation_constants(RewardConfig(preservation_weight=0.3)))  # fmt: skip
    for a, b in zip(plain.score(items), pres.score(items), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)  # the flow reward itself is unchanged
        assert set(b) - set(a) == {"preservation", "static_share"}
    assert pres.pairs_estimated == plain.pairs_estimated + len(items)  # one target -> input flow per prompt
    scene_scores = pres.score(items[-1:])[0]["preservation"]
    assert scene_scores[0] == 1.0 and scene_scores[1] == 1.0 and scene_scores[2] < 1.0
    assert pres.cache_hits == 2  # the scene's second call: both of its directions from the cache


def test_reward_scorer_blends_and_logs_its_own_metric():
    items = flow_items()
    cfg = RewardConfig(flow_weight=1.0, judge_weight=0.0, preservation_weight=0.5)
    scorer = RewardScorer(FlowRewardScorer(PixelFlow(), cfg.flow, preservation=preservation_constants(cfg)), [], cfg)
    (group,) = score_groups(scorer, items[:1])
    flow, pres = group.components["flow/reward"], group.components["preservation/score"]
    assert group.reward == [0.5 * f + 0.5 * p for f, p in zip(flow, pres, strict=True)]
    assert "flow/preservation" not in group.components and "preservation/static_share" in group.components


def test_preservation_needs_the_flow_reward():
    assert preservation_constants(RewardConfig()) is None
    with pytest.raises(ConfigError, match="reward.preservation_weight"):
        RewardConfig(flow_weight=0.0, judge_weight=1.0, preservation_weight=0.2)
    with pytest.raises(ValueError, match="preservation_weight"):
        RewardScorer(FlowRewardScorer(PixelFlow(), FlowRewardConfig()), [],
                     RewardConfig(judge_weight=0.0, preservation_weight=0.2))  # fmt: skip
