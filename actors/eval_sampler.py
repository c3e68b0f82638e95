"""Evaluation edits as the pipelines make them (MotionEdit-Bench protocol, docs/evaluation.md), not as rollouts do.

The benchmark's edits come from each pipeline's own sampler: the flow-matching Euler scheduler
(`FlowMatchEulerDiscreteScheduler.step`: `x ← x + (σ_next − σ)·v` in float32) on the model's own shifted sigma
grid (`EditPolicy.sigmas`, ending at 0), `eval.num_steps` (28) steps, the noise of `eval.seed` (42) for every
row; each family's guidance from its policy class (`eval_true_cfg`, `eval_guidance`): FLUX.1 Kontext with its
distilled guidance `eval.kontext_guidance` (2.5), Qwen-Image-Edit with true CFG `eval.qwen_true_cfg` (4.0) against
`eval.negative_prompt` (" "), combined as its pipeline does (`true_cfg`).
Not the 6-step DPM-Solver++ of training (actors/sampler.py).

The phases are the policy's (encode, prepare_latents, velocity, decode), so the edit is made at the data's
resolution (`rollout.height` x `rollout.width`), where the pipelines' `__call__` would first resize the input
to ~1 MP; and one row at a time with its own generator, so a row's edit does not depend on which rows share
its chunk (a resumed evaluation reproduces an uninterrupted one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from motionnft_core.config import EvalConfig
from motionnft_core.models.policy import EditPolicy


def true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen-Image's true CFG: `c = u + s·(v − u)`, rescaled per token to the conditional prediction's norm,
    `c · |v| / |c|` (diffusers QwenImageEditPipeline; keeps the scale of v for large s). (B, L, D) -> (B, L, D)."""
    combined = uncond + scale * (cond - uncond)
    return combined * (cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))


class EvalSampler:
    """One edit per call with the pipeline's settings from `eval.*` (module docstring); runs without Ray."""

    def __init__(self, policy: EditPolicy, cfg: EvalConfig) -> None:
        self.policy, self.cfg = policy, cfg
        self.true_cfg = policy.eval_true_cfg(cfg)
        self.use_cfg = self.true_cfg > 1.0

    @torch.no_grad()
    def sample(self, prompt: str, image: torch.Tensor, references: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """The edit of uint8 `image` (3, H, W) by `prompt`, conditioned also on the further input images `references`
        (each (3, H, W), in order) where the family takes them: uint8 (3, H, W) on the CPU."""
        policy, cfg = self.policy, self.cfg
        height, width = image.shape[-2:]
        inputs = [im[None] for im in (image, *references)]
        cond = policy.encode([prompt], inputs)
        uncond = policy.encode([cfg.negative_prompt], inputs) if self.use_cfg else None
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed)  # the same noise for every row
        x = policy.prepare_latents(1, height, width, generator)  # float32 (1, L, D)
        sigmas = torch.cat([policy.sigmas(cfg.num_steps, height, width), torch.zeros(1)])
        with policy.eval_guidance(cfg):
            for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
                v = policy.velocity(x, torch.tensor(sigma), cond).float()
                if uncond is not None:
                    v = true_cfg(v, policy.velocity(x, torch.tensor(sigma), uncond).float(), self.true_cfg)
                x = x + (sigma_next - sigma) * v
        return policy.decode(x, height, width)[0].cpu()
