"""Motion-focal token weights (learner/trainer/motion_focal.py) by hand values, the policies' packing of them, their
place in the NFT loss, and the reward side that sends the heat (nft.motion_focal)."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxKontextPipeline, QwenImageEditPipeline

from learner.trainer.motion_focal import focal_mix, normalize_mean_one, pool_to_grid, token_weights
from learner.trainer.nft_loss import nft_loss
from motionnft_core.config import (
    Config,
    ConfigError,
    DataConfig,
    FlowRewardConfig,
    JudgeConfig,
    ModelConfig,
    NFTConfig,
    RewardConfig,
    validate,
)
from motionnft_core.models.policy import EditPolicy
from rewards.flow_scorer import FlowRewardScorer
from rewards.scorer import RewardScorer
from tests.unit.golden.make_golden import PixelFlow, flow_items, loss_inputs, score_groups


def test_pool_to_grid_is_the_block_mean():
    heat = torch.tensor([[0.0, 2.0, 4.0, 4.0], [2.0, 0.0, 4.0, 4.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 8.0]])
    assert pool_to_grid(heat, 2, 2).tolist() == [[1.0, 4.0], [1.0, 2.0]]


def test_normalised_heat_has_mean_1_and_a_still_target_gives_ones():
    assert normalize_mean_one(torch.tensor([1.0, 3.0, 0.0, 0.0])).tolist() == [1.0, 3.0, 0.0, 0.0]
    assert normalize_mean_one(torch.tensor([[2.0, 6.0], [0.0, 0.0]])).tolist() == [[0.5, 1.5], [1.0, 1.0]]
    with pytest.raises(ValueError, match=">= 0"):
        normalize_mean_one(torch.tensor([1.0, -1.0]))


def test_the_mix_keeps_mean_1_and_m_0_is_all_ones():
    heat = torch.tensor([0.0, 0.5, 3.5, 0.0], dtype=torch.float64)
    assert focal_mix(heat, 0.0).tolist() == [1.0, 1.0, 1.0, 1.0]
    assert focal_mix(heat, 1.0).tolist() == heat.tolist()
    assert focal_mix(heat, 0.5).tolist() == [0.5, 0.75, 2.25, 0.5]
    assert focal_mix(heat, 0.5).mean() == 1.0
    with pytest.raises(ValueError, match="motion_focal_mix"):
        focal_mix(heat, 1.5)


@pytest.mark.parametrize("pipeline", [FluxKontextPipeline, QwenImageEditPipeline])
def test_pack_map_puts_each_2x2_patch_on_its_token_in_row_major_order(pipeline):
    policy = SimpleNamespace(pipe=pipeline)
    latent = torch.arange(16, dtype=torch.float64).reshape(4, 4)  # token (0, 0) covers 0, 1, 4, 5 ...
    assert EditPolicy.pack_map(policy, latent).tolist() == [2.5, 4.5, 10.5, 12.5]


def test_flux2_pack_map_patchifies_then_packs_as_its_pipeline_does():
    from diffusers import Flux2Pipeline

    from motionnft_core.models.families.flux2 import Flux2Policy

    policy = SimpleNamespace(pipe=Flux2Pipeline)
    latent = torch.arange(16, dtype=torch.float64).reshape(4, 4)  # token (0, 0) covers 0, 1, 4, 5 ...
    assert Flux2Policy.pack_map(policy, latent).tolist() == [2.5, 4.5, 10.5, 12.5]
    wide = torch.arange(8, dtype=torch.float64).reshape(2, 4)  # one row of two tokens: patches (0,1,4,5), (2,3,6,7)
    assert Flux2Policy.pack_map(policy, wide).tolist() == [2.5, 4.5]


def test_token_weights_of_an_object_moving_in_one_corner():
    """64 x 64 pixels, an 8x VAE: an 8 x 8 latent, 16 tokens; the object moves 4 px in pixels 0:16 x 0:16, so
    exactly token 0 is hot."""
    heat = torch.zeros(64, 64)
    heat[:16, :16] = 4.0
    packed = EditPolicy.pack_map
    w = token_weights(heat, (8, 8), lambda m: packed(SimpleNamespace(pipe=FluxKontextPipeline), m), mix=0.5)
    assert w.tolist() == [0.5 + 0.5 * 16.0] + [0.5] * 15
    assert w.mean() == 1.0


def test_loss_with_all_one_weights_is_the_plain_loss_bit_for_bit():
    def run(weight):
        x = loss_inputs()
        v_theta = x.pop("v_theta").requires_grad_(True)
        loss, m = nft_loss(v_theta, *x.values(), beta=0.8, token_weight=weight)
        loss.backward()
        return loss, m, v_theta.grad

    plain, ones = run(None), run(focal_mix(torch.rand(4, 8, dtype=torch.float64), 0.0))
    assert torch.equal(plain[0], ones[0]) and torch.equal(plain[2], ones[2])
    assert all(torch.equal(plain[1][k], ones[1][k]) for k in plain[1])


def test_weights_enter_only_the_squared_errors_of_the_positive_and_negative_terms():
    x = loss_inputs()
    x["valid"] = torch.ones(4, dtype=torch.bool)
    weight = torch.ones(4, 8, dtype=torch.float64)
    weight[:, 0] = 3.0
    weight[:, 1:] = 5.0 / 7.0  # mean 1
    _, plain = nft_loss(*x.values(), beta=1.0)
    _, focal = nft_loss(*x.values(), beta=1.0, token_weight=weight)
    # beta = 1: x+ = x_t - t v_theta; the normaliser mean|x+ - x0| is the unweighted one
    t = x["t"].reshape(4, 1, 1)
    err = x["x_t"] - t * x["v_theta"] - x["x0"]
    norm = err.double().abs().mean(dim=(1, 2), keepdim=True)
    expected = (err**2 * weight[..., None] / norm).mean(dim=(1, 2)).mean()
    assert focal["loss_pos"] == pytest.approx(float(expected), rel=1e-6)  # err**2 is float32 in the loss
    assert focal["loss_pos"] != plain["loss_pos"] and focal["loss_neg"] != plain["loss_neg"]
    assert torch.equal(focal["kl_loss"], plain["kl_loss"])  # the reference term stays unweighted
    with pytest.raises(ValueError, match="token_weight shape"):
        nft_loss(*x.values(), token_weight=torch.ones(4, 6))


def test_the_reward_side_sends_the_prompts_heat_once_per_group():
    items = flow_items()
    plain = FlowRewardScorer(PixelFlow(), FlowRewardConfig()).score(items)
    hot = FlowRewardScorer(PixelFlow(), FlowRewardConfig(), heat=True).score(items)
    for item, a, b in zip(items, plain, hot, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a) and set(b) - set(a) == {"heat"}
        v_gt = PixelFlow()(item.input[None], item.target[None])[0]
        assert torch.equal(b["heat"], torch.linalg.vector_norm(v_gt, dim=-1))
    cfg = RewardConfig(flow_weight=1.0, judge_weight=0.0)
    scorer = RewardScorer(FlowRewardScorer(PixelFlow(), cfg.flow, heat=True), [], cfg)
    (group,) = score_groups(scorer, items[:1])
    assert torch.equal(group.heat, hot[0]["heat"]) and "flow/heat" not in group.components


def test_motion_focal_needs_the_flow_reward():
    judge_only = RewardConfig(flow_weight=0.0, judge_weight=1.0, judge=JudgeConfig(tiny=True))
    cfg = Config(model=ModelConfig(tiny=True), data=DataConfig(synthetic=4), nft=NFTConfig(motion_focal=True),
                 reward=judge_only)  # fmt: skip
    with pytest.raises(ConfigError, match="nft.motion_focal"):
        validate(cfg)


def test_the_trainer_step_with_mix_0_is_the_plain_step_and_the_heat_moves_it(world1, tiny_pipelines):
    """Tiny FLUX Kontext at 32 px (4 latent tokens): nft.motion_focal with m = 0 trains exactly as without it; with
    m = 1 and all the motion in one corner the step differs; a sample without its heat is refused."""
    import dataclasses

    from learner.trainer.nft_trainer import NFTTrainer
    from tests.learner_harness import SIZE, load_policy, make_samples, sections

    heat = torch.zeros(SIZE, SIZE)
    heat[:16, :16] = 5.0  # the first token's patch

    def step(heat_of_samples, **nft):
        policy = load_policy(tiny_pipelines["flux_kontext"], "flux_kontext")
        samples = [dataclasses.replace(s, heat=heat_of_samples) for s in make_samples(policy, 4, seed=3)]
        trainer = NFTTrainer(policy, *sections(lr=1e-2, **nft))
        metrics = trainer.train_step(samples, len(samples), 0)
        return metrics, {n: p.detach().clone() for n, p in trainer.theta.items()}

    plain, plain_theta = step(None)
    zero, zero_theta = step(heat, motion_focal=True, motion_focal_mix=0.0)
    assert all(zero[k] == plain[k] for k in ("loss", "loss_pos", "loss_neg", "kl_loss", "grad_norm"))
    assert all(torch.equal(zero_theta[n], plain_theta[n]) for n in plain_theta)
    hot, _ = step(heat, motion_focal=True, motion_focal_mix=1.0)
    assert hot["loss_pos"] != plain["loss_pos"] and hot["kl_loss"] == plain["kl_loss"]
    with pytest.raises(ValueError, match="nft.motion_focal: prompt 'prompt-0' came without its motion heat"):
        step(None, motion_focal=True)
