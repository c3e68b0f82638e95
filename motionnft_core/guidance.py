"""Classifier-free guidance of the evaluation edits: how a family combines its conditional and unconditional
velocities, one pure function per rule, and `CFG`, the rule with its scale and negative prompt that a policy
gives the evaluation sampler (rollouts and training sample without CFG, the recipe's)."""

from collections.abc import Callable
from dataclasses import dataclass

import torch


def plain_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """`u + s·(v − u)`: FLUX.2 [klein] Base's guidance (diffusers Flux2KleinPipeline). Any shape."""
    return uncond + scale * (cond - uncond)


def rescaled_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen-Image's true CFG: `c = u + s·(v − u)`, rescaled per token to the conditional prediction's norm,
    `c · |v| / |c|` (diffusers QwenImageEditPipeline; keeps the scale of v for large s). (B, L, D) -> (B, L, D)."""
    combined = plain_cfg(cond, uncond, scale)
    return combined * (cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))


@dataclass(frozen=True)
class CFG:
    """Guidance of an evaluation edit: `combine(v(prompt), v(negative_prompt), scale)` at every step."""

    scale: float
    negative_prompt: str
    combine: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]

    def __post_init__(self) -> None:
        if not self.scale > 1.0:
            raise ValueError(f"CFG scale must be > 1 (<= 1 is no CFG: give none), got {self.scale}")

    @classmethod
    def at(cls, scale: float, negative_prompt: str, combine: Callable) -> "CFG | None":
        """The guidance at `scale`, or None where the scale turns it off (<= 1, as the pipelines and `eval.*`)."""
        return cls(scale, negative_prompt, combine) if scale > 1.0 else None
