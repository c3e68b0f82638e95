"""Batched FlowRewardScorer against a per-pair loop, its flow cache and its size rules (DIS estimator)."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from motionnft_core.config import FlowRewardConfig
from rewards.flow_model import ClassicalFlow
from rewards.flow_reward import motion_alignment_reward
from rewards.flow_scorer import FlowItem, FlowRewardScorer

KEYS = ("l_q", "direction", "move", "distance", "score", "reward")


def scorer_of(estimator, **flow) -> FlowRewardScorer:
    """A scorer with `reward.flow` at its defaults (docs/algorithm.md) except `flow`."""
    return FlowRewardScorer(estimator, FlowRewardConfig(**flow))


def textured_image(height: int, width: int, seed: int) -> torch.Tensor:
    """Smooth random RGB texture, uint8 (3, H, W)."""
    noise = np.random.default_rng(seed).random((height, width, 3)).astype(np.float32)
    tex = cv2.GaussianBlur(noise, (0, 0), 2.0)
    tex = ((tex - tex.min()) / (tex.max() - tex.min()) * 255).round().astype(np.uint8)
    return torch.from_numpy(tex).permute(2, 0, 1).contiguous()


def make_item(prompt_id: str, seed: int, k: int = 3, size: tuple[int, int] = (64, 80)) -> FlowItem:
    """Target = input shifted by (3, 2) px; candidates shifted by other amounts, so rewards differ."""
    image = textured_image(*size, seed=seed)
    target = image.roll((2, 3), dims=(1, 2))
    shifts = [(2, 3), (0, 0), (-2, -3), (1, 5), (4, 0)][:k]
    candidates = torch.stack([image.roll(s, dims=(1, 2)) for s in shifts])
    return FlowItem(prompt_id, image, target, candidates)


class CountingEstimator:
    """The real DIS estimator, counting its calls and the pairs it saw (not a mock: the flows are real)."""

    def __init__(self):
        self.inner, self.calls, self.batch_sizes = ClassicalFlow(), 0, []

    def __call__(self, src, dst):
        self.calls += 1
        self.batch_sizes.append(src.shape[0])
        return self.inner(src, dst)


def per_pair_loop(item: FlowItem, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The naive path: one estimator call per pair, rewards one candidate at a time."""
    est = ClassicalFlow()
    v_gt = est(item.input[None], (item.target if target is None else target)[None])
    rows = [motion_alignment_reward(est(item.input[None], c[None]), v_gt) for c in item.candidates]
    return {key: torch.cat([row[key] for row in rows]) for key in KEYS}


def test_batched_equals_per_pair_loop_exactly():
    items = [make_item("a", 0), make_item("b", 1, k=5), make_item("c", 2, size=(48, 72))]
    scorer = scorer_of(ClassicalFlow(), max_batch=4)
    results = scorer.score(items)
    for item, result in zip(items, results, strict=True):
        expected = per_pair_loop(item)
        for key in KEYS:
            assert result[key].shape == (len(item.candidates),)
            assert torch.equal(result[key], expected[key]), (item.prompt_id, key, result[key], expected[key])
    # The shift equal to the target's scores 1; the unmoved and the opposite candidates score less.
    reward = results[0]["reward"]
    assert reward[0].item() == 1.0
    assert reward[1].item() < 1.0 and reward[2].item() < reward[1].item()


def test_pairs_are_batched_and_target_flow_is_cached():
    counting = CountingEstimator()
    scorer = scorer_of(counting, max_batch=5)
    items = [make_item("a", 0, k=4), make_item("b", 1, k=4), make_item("c", 2, k=4)]

    scorer.score(items)  # 3 target pairs + 12 candidate pairs, one size -> ceil(15 / 5) = 3 calls
    assert counting.calls == 3 and counting.batch_sizes == [5, 5, 5]
    assert (scorer.cache_hits, scorer.cache_misses, scorer.pairs_estimated) == (0, 3, 15)

    scorer.score(items)  # targets cached: 12 candidate pairs -> 3 calls of 5, 5, 2
    assert counting.calls == 6 and counting.batch_sizes[3:] == [5, 5, 2]
    assert (scorer.cache_hits, scorer.cache_misses, scorer.pairs_estimated) == (3, 3, 27)


def test_repeated_prompt_in_one_call_computes_its_target_once():
    counting = CountingEstimator()
    scorer = scorer_of(counting, max_batch=32)
    first, second = make_item("a", 0, k=2), make_item("a", 0, k=3)
    results = scorer.score([first, second])
    assert counting.batch_sizes == [1 + 2 + 3]
    assert torch.equal(results[0]["reward"], results[1]["reward"][:2])


def test_cache_is_lru():
    counting = CountingEstimator()
    scorer = scorer_of(counting, cache_size=2)
    a, b, c = make_item("a", 0, k=1), make_item("b", 1, k=1), make_item("c", 2, k=1)

    def pairs_for(item: FlowItem) -> int:
        before = scorer.pairs_estimated
        scorer.score([item])
        return scorer.pairs_estimated - before  # 2 = target recomputed, 1 = cache hit

    assert [pairs_for(a), pairs_for(b)] == [2, 2]  # cache: a, b
    assert pairs_for(a) == 1  # hit; a is now the most recent
    assert pairs_for(c) == 2  # evicts b, the least recent
    assert [pairs_for(a), pairs_for(b)] == [1, 2]


def test_items_of_different_sizes_go_in_separate_calls():
    counting = CountingEstimator()
    scorer = scorer_of(counting, max_batch=32)
    scorer.score([make_item("a", 0, k=2, size=(64, 80)), make_item("b", 1, k=3, size=(48, 72))])
    assert sorted(counting.batch_sizes) == [3, 4]


def test_target_of_another_size_is_resized_to_the_input_size():
    item = make_item("a", 0)
    big_target = F.interpolate(item.target[None].float(), scale_factor=2, mode="nearest")[0].to(torch.uint8)
    result = scorer_of(ClassicalFlow()).score([FlowItem("a", item.input, big_target, item.candidates)])[0]
    # The documented resize: bilinear, align_corners=False, rounded back to uint8. From a 2x nearest upscale
    # the bilinear sample points fall on 2x2 blocks of equal value, so the resize gives the target back.
    resized = F.interpolate(big_target[None].float(), size=(64, 80), mode="bilinear", align_corners=False)
    resized = resized[0].round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(resized, item.target)
    expected = per_pair_loop(item, target=resized)
    for key in KEYS:
        assert torch.equal(result[key], expected[key]), key


def test_candidate_of_another_size_raises():
    item = make_item("p7", 0)
    wrong = torch.zeros(2, 3, 64, 96, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"prompt_id='p7'\): candidates are \(64, 96\) but the input is \(64, 80\)"):
        scorer_of(ClassicalFlow()).score([FlowItem("p7", item.input, item.target, wrong)])


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("input", torch.zeros(3, 64, 80), r"\.input: expected a uint8 tensor"),
        ("target", torch.zeros(1, 3, 64, 80, dtype=torch.uint8), r"\.target: expected a non-empty \(3, H, W\)"),
        ("candidates", torch.zeros(3, 64, 80, dtype=torch.uint8), r"\.candidates: expected a non-empty \(K, 3"),
        ("candidates", torch.zeros(0, 3, 64, 80, dtype=torch.uint8), r"\.candidates: expected a non-empty \(K, 3"),
    ],
)
def test_bad_items_raise(field, value, match):
    item = make_item("a", 0)
    fields = {"prompt_id": "a", "input": item.input, "target": item.target, "candidates": item.candidates}
    fields[field] = value
    with pytest.raises(ValueError, match=match):
        scorer_of(ClassicalFlow()).score([FlowItem(**fields)])


def test_reward_constants_come_from_the_config():
    item = make_item("a", 0)
    raw = scorer_of(ClassicalFlow(), quantize=False).score([item])[0]
    assert torch.equal(raw["reward"], raw["score"])
    est = ClassicalFlow()
    v_gt, v_pred = est(item.input[None], item.target[None]), est(item.input[None], item.candidates[1:2])
    custom = {"q": 0.5, "motion_threshold": 0.01, "tau": 0.02, "kappa": 0.3, "w_magnitude": 0.5,
              "w_direction": 0.3, "w_move": 0.2}  # fmt: skip
    got = scorer_of(ClassicalFlow(), **custom).score([item])[0]
    expected = motion_alignment_reward(v_pred, v_gt, q=0.5, m=0.01, tau=0.02, kappa=0.3, a=0.5, b=0.3, c=0.2)
    for key in KEYS:
        torch.testing.assert_close(got[key][1:2], expected[key], rtol=0, atol=0)
