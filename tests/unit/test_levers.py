"""Speed levers of the GPU path, each behind a config flag, each equivalent on CPU to the plain path:
regional compilation in rollouts and learner (with FP8 rollouts too: tests/unit/test_fp8.py has the rest of FP8), the
cuDNN SDPA switch, and colocated sampling from the learner's own old adapter (what the single-GPU benchmark does).
Tiny FLUX Kontext, world-1 gloo group, 32 px."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from actors.sampler import Sampler
from learner.trainer.nft_trainer import NFTTrainer
from motionnft_core.config import RolloutConfig
from motionnft_core.models.weights import PolicyWeights, WeightManifest
from tests.learner_harness import EditPrompt, edit_prompts, load_policy, make_samples, rank_samples, sections

ROLLOUT = RolloutConfig(group_size=2, num_steps=3, height=32, width=32, micro_batch=4)
COMPILE_TOL = 1e-5  # inductor fuses float32 ops differently; measured differences are ~1e-7


def _prompts() -> list[EditPrompt]:
    return edit_prompts(("move the red square 4 pixels to the right", "turn the car left"))


def _trained(path, lr: float = 1e-2, **learner) -> tuple[NFTTrainer, list]:
    """A trainer one step in (old != θ != base), and its samples."""
    policy = load_policy(path, "flux_kontext")
    samples = make_samples(policy, 4, seed=3)
    trainer = NFTTrainer(policy, *sections(lr=lr, **learner))
    trainer.train_step(rank_samples(samples, 1, 0, 2), len(samples), 0)
    return trainer, samples


@pytest.mark.slow  # torch.compile of the tiny transformer: 60-90 s of CPU, past what the fast loop can hold
def test_learner_compile_gives_the_eager_step(world1, tiny_pipelines):
    # DESIGN's lr 3e-4: AdamW's first steps move an entry by ~lr whatever its gradient, so entries whose gradient
    # nearly cancels carry the compiled kernels' rounding up to ~1e-4 * lr (as in test_fsdp_learner).
    path = tiny_pipelines["flux_kontext"]
    eager, samples = _trained(path, lr=3e-4)
    compiled, _ = _trained(path, lr=3e-4, compile=True)
    a = eager.train_step(rank_samples(samples, 1, 0, 2), len(samples), 1)
    b = compiled.train_step(rank_samples(samples, 1, 0, 2), len(samples), 1)
    for key in ("loss", "policy_loss", "kl_loss", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=COMPILE_TOL, abs=1e-7), key
    theta_a, theta_b = eager.gather("theta"), compiled.gather("theta")
    assert max((theta_a[n] - theta_b[n]).abs().max().item() for n in theta_a) < 1e-6
    blocks = [m for m in compiled.policy.transformer.modules() if getattr(m, "_motionnft_compiled", False)]
    assert len(blocks) == 2  # the tiny transformer's one double and one single block


@pytest.mark.slow  # torch.compile again, 50-70 s
def test_rollout_compile_gives_the_eager_groups(tiny_pipelines):
    path = tiny_pipelines["flux_kontext"]
    eager = Sampler(load_policy(path, "flux_kontext"), ROLLOUT).sample(_prompts(), step=0, version=0)
    compiled = Sampler(load_policy(path, "flux_kontext"), dataclasses.replace(ROLLOUT, compile=True))
    out = compiled.sample(_prompts(), step=0, version=0)
    for (ga, ia), (gb, ib) in zip(eager, out, strict=True):
        torch.testing.assert_close(gb.x0, ga.x0, rtol=COMPILE_TOL, atol=COMPILE_TOL)
        assert (ia.int() - ib.int()).abs().max() <= 1  # uint8 rounding of nearly equal pixels
    # rollout.fp8 on the compiled blocks (converted after compiling, as bench/train_step.py does): the eager FP8
    # groups, and with FP8 off again the compiled plain ones (no stale graph either way).
    fp8 = dataclasses.replace(ROLLOUT, fp8=True)
    eager8 = Sampler(load_policy(path, "flux_kontext"), fp8).sample(_prompts(), step=0, version=0)
    compiled8 = Sampler(compiled.policy, dataclasses.replace(fp8, compile=True)).sample(_prompts(), step=0, version=0)
    again = compiled.sample(_prompts(), step=0, version=0)
    for (gb, _), (ge, _), (g8, _), (ga, _) in zip(out, eager8, compiled8, again, strict=True):
        torch.testing.assert_close(g8.x0, ge.x0, rtol=COMPILE_TOL, atol=COMPILE_TOL)
        assert (g8.x0 - gb.x0).abs().max() > 100 * COMPILE_TOL  # FP8 did run
        torch.testing.assert_close(ga.x0, gb.x0, rtol=COMPILE_TOL, atol=COMPILE_TOL)


def test_cudnn_sdpa_is_off_for_training_unless_asked(world1, tiny_pipelines):
    """bench/README.md: the cuDNN SDPA backend crashes in the backward on torch 2.11 + CUDA 13; the learner turns it off
    (a process-wide switch; flash and the other backends stay). On a CPU it changes nothing else."""
    path = tiny_pipelines["flux_kontext"]
    off, samples = _trained(path)
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    on, _ = _trained(path, cudnn_sdpa=True)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()
    a = off.train_step(rank_samples(samples, 1, 0, 2), len(samples), 1)
    b = on.train_step(rank_samples(samples, 1, 0, 2), len(samples), 1)
    assert a["loss"] == b["loss"]


def test_colocated_sampling_equals_a_rollout_holding_the_published_weights(world1, tiny_pipelines):
    """`NFTTrainer.old_policy()` samples what a separate rollout worker loaded with the published old weights
    samples, and leaves θ trainable afterwards."""
    path = tiny_pipelines["flux_kontext"]
    trainer, samples = _trained(path)
    nft = trainer.nft
    rollout = load_policy(path, "flux_kontext")
    rollout.add_lora(rank=nft.lora_rank, alpha=nft.lora_alpha, target_modules=list(nft.lora_targets))
    old = trainer.gather("old")
    PolicyWeights(rollout, "lora").load(1, WeightManifest.of(old, version=1, kind="lora").pack(), old)
    expected = Sampler(rollout, ROLLOUT).sample(_prompts(), step=2, version=1)
    with trainer.old_policy() as colocated:
        got = Sampler(colocated, ROLLOUT).sample(_prompts(), step=2, version=1)
    for (ga, _), (gb, _) in zip(expected, got, strict=True):
        torch.testing.assert_close(gb.x0, ga.x0, rtol=1e-5, atol=1e-6)
    assert all(p.requires_grad for p in trainer.theta.values())
    assert not any(p.requires_grad for p in trainer.old.values())
    assert trainer.train_step(rank_samples(samples, 1, 0, 2), len(samples), 1)["grad_norm"] > 0
