"""Evaluation edits with the pipelines' own settings (actors/eval_sampler.py): CFG as Qwen-Image and FLUX.2 [klein]
Base combine it (motionnft_core/guidance.py), and seeded one-row sampling on the tiny pipelines."""

import pytest
import torch

from actors.eval_sampler import EvalSampler
from motionnft_core.config import EvalConfig
from motionnft_core.guidance import CFG, plain_cfg, rescaled_cfg
from motionnft_core.models.policy import EditPolicy


def test_cfg_rules_hand_computed():
    cond = torch.tensor([[[3.0, 4.0]]])  # |v| = 5
    uncond = torch.tensor([[[1.0, 0.0]]])
    # c = u + 4 (v - u) = (1, 0) + 4 (2, 4) = (9, 16): plain CFG; |c| = sqrt(337), rescaled to |v| = 5: Qwen's.
    assert torch.allclose(plain_cfg(cond, uncond, 4.0), torch.tensor([[[9.0, 16.0]]]))
    assert torch.allclose(rescaled_cfg(cond, uncond, 4.0), torch.tensor([[[9.0, 16.0]]]) * 5 / 337**0.5, atol=1e-6)
    for rule in (plain_cfg, rescaled_cfg):
        assert torch.allclose(rule(cond, uncond, 1.0), cond)  # scale 1: the conditional prediction
    with pytest.raises(ValueError, match="CFG scale must be > 1"):
        CFG(1.0, "", plain_cfg)
    assert CFG.at(1.0, "", plain_cfg) is None and CFG.at(4.0, " ", rescaled_cfg) == CFG(4.0, " ", rescaled_cfg)


@pytest.mark.parametrize("family", ["flux_kontext", "qwen_image_edit"])
def test_edits_are_seeded_per_row_and_use_the_family_guidance(tiny_pipelines, family):
    policy = EditPolicy.from_pretrained(tiny_pipelines[family], family=family, dtype=torch.float32, device="cpu")
    cfg = EvalConfig(num_steps=2, qwen_true_cfg=4.0, kontext_guidance=3.5)
    sampler = EvalSampler(policy, cfg)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = sampler.sample("turn the head to the left", image)
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, sampler.sample("turn the head to the left", image))  # eval.seed: the same noise
    other = EvalSampler(policy, EvalConfig(num_steps=2, seed=7, qwen_true_cfg=4.0, kontext_guidance=3.5))
    assert not torch.equal(a, other.sample("turn the head to the left", image))
    assert (sampler.guidance is not None) == (family == "qwen_image_edit")
    if family == "flux_kontext":
        assert policy.guidance_scale == 2.5  # eval.kontext_guidance only while sampling; put back afterwards
