"""Evaluation edits as the pipelines make them (MotionEdit-Bench protocol, docs/evaluation.md), not as rollouts do.

The benchmark's edits come from each pipeline's own sampler: the flow-matching Euler scheduler
(`FlowMatchEulerDiscreteScheduler.step`: `x ← x + (σ_next − σ)·v` in float32) on the model's own shifted sigma
grid (`EditPolicy.sigmas`, ending at 0), `eval.num_steps` (28) steps, the noise of `eval.seed` (42) for every
row; each family's guidance from its policy (`eval_cfg`, `eval_guidance`): FLUX.1 Kontext and FLUX.2 [dev] with
their distilled guidance (`eval.kontext_guidance` 2.5, `eval.flux2_guidance` 4.0), Qwen-Image-Edit and -Plus with
true CFG `eval.qwen_true_cfg` (4.0) against `eval.negative_prompt` (" "), FLUX.2 [klein] Base with CFG
`eval.klein_base_cfg` (4.0) against "", each combined as its pipeline does (motionnft_core/guidance.py).
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


class EvalSampler:
    """One edit per call with the pipeline's settings from `eval.*` (module docstring); runs without Ray."""

    def __init__(self, policy: EditPolicy, cfg: EvalConfig) -> None:
        self.policy, self.cfg = policy, cfg
        self.guidance = policy.eval_cfg(cfg)  # None: no CFG

    @torch.no_grad()
    def sample(self, prompt: str, image: torch.Tensor, references: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """The edit of uint8 `image` (3, H, W) by `prompt`, conditioned also on the further input images `references`
        (each (3, H, W), in order) where the family takes them: uint8 (3, H, W) on the CPU."""
        policy, cfg = self.policy, self.cfg
        height, width = image.shape[-2:]
        inputs = [im[None] for im in (image, *references)]
        cond = policy.encode([prompt], inputs)
        guidance = self.guidance
        uncond = policy.encode([guidance.negative_prompt], inputs) if guidance is not None else None
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed)  # the same noise for every row
        x = policy.prepare_latents(1, height, width, generator)  # float32 (1, L, D)
        sigmas = torch.cat([policy.sigmas(cfg.num_steps, height, width), torch.zeros(1)])
        with policy.eval_guidance(cfg):
            for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
                v = policy.velocity(x, torch.tensor(sigma), cond).float()
                if guidance is not None:
                    v_uncond = policy.velocity(x, torch.tensor(sigma), uncond).float()
                    v = guidance.combine(v, v_uncond, guidance.scale)
                x = x + (sigma_next - sigma) * v
        return policy.decode(x, height, width)[0].cpu()
