"""Weight parity: does a rollout's policy compute what the learner's published policy computes?

A weight sync can fail silently: an adapter loaded under the wrong names binds to nothing, a node resolves
another base model, a scale differs. Names and shapes (motionnft_core/models/weights.py) cannot see that. So with each
version the learner publishes its policy's output on one fixed probe (a fixed prompt and input image, seeded
noise, one noise level); a rollout that loads the version computes the same and compares, and also counts the
adapter modules that actually take part in its forward. At version 0 the adapter is zero (B = 0 at init), so
the probe then checks the base model; the count catches an unbound adapter from the first version on.
Plain torch: the learner (learner/trainer/fsdp_worker.py) and the rollout (actors/rollout.py) call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from motionnft_core.config import RolloutConfig
from motionnft_core.models.policy import Conditioning, EditPolicy
from motionnft_core.models.weights import WeightManifest

PROBE_PROMPT = "parity probe: the person raises the left arm and turns the head to the right"
PROBE_SIGMA = 0.5  # mid-trajectory: both the noise and the prediction weigh in


class ParityError(RuntimeError):
    """A rollout's policy does not compute what the learner published; that rollout must not sample."""


@dataclass(frozen=True)
class ParityProbe:
    """The probe's inputs, built identically in every process from the rollout config alone."""

    cond: Conditioning
    x_t: torch.Tensor  # (1, L, D) float32
    sigma: float

    @classmethod
    def build(cls, policy: EditPolicy, rollout: RolloutConfig) -> ParityProbe:
        """At the rollout's size (the kernels sampling runs), from `rollout.seed`."""
        h, w, gen = rollout.height, rollout.width, torch.Generator().manual_seed(rollout.seed)
        image = torch.randint(0, 256, (1, 3, h, w), generator=gen, dtype=torch.uint8)
        cond = policy.encode([PROBE_PROMPT], image)
        x_t = policy.prepare_latents(1, h, w, torch.Generator().manual_seed(rollout.seed + 1))
        return cls(cond=cond, x_t=x_t, sigma=PROBE_SIGMA)

    @torch.no_grad()
    def output(self, policy: EditPolicy) -> torch.Tensor:
        """The velocity of `policy` as it is now (active adapter) on the probe, float32 on the CPU."""
        return policy.velocity(self.x_t, torch.tensor(self.sigma), self.cond).float().cpu()


def parity_error(mine: torch.Tensor, published: torch.Tensor) -> float:
    """max |mine - published| relative to the published output's peak (so one tolerance fits any model scale)."""
    if mine.shape != published.shape:
        return float("inf")
    peak = published.abs().max().clamp_min(1e-6)
    return ((mine - published).abs().max() / peak).item()


def bound_adapter_modules(transformer: torch.nn.Module, adapter: str = "default") -> int:
    """Modules where `adapter` really takes part in the forward: present, active, not disabled, not merged."""
    return sum(
        1
        for m in transformer.modules()
        if isinstance(m, BaseTunerLayer)
        and adapter in getattr(m, "lora_A", {})
        and adapter in m.active_adapters
        and not m.disable_adapters
        and not m.merged
    )


def expected_adapter_modules(manifest: WeightManifest) -> int:
    """How many modules the published adapter has (one lora_A per module); 0 for full weights."""
    return sum(1 for name, _, _ in manifest.entries if name.endswith(".lora_A.weight"))


def check_parity(
    policy: EditPolicy,
    probe: ParityProbe,
    published: torch.Tensor,
    manifest: WeightManifest,
    tolerance: float,
    *,
    worker: str,
) -> float:
    """Raise ParityError naming worker, version and what differs; return the error when it is within tolerance."""
    expected = expected_adapter_modules(manifest)
    bound = bound_adapter_modules(policy.transformer) if expected else 0
    error = parity_error(probe.output(policy), published)
    if bound != expected or not error <= tolerance:
        raise ParityError(
            f"{worker}: policy version {manifest.version} does not compute what the learner published: "
            f"max error {error:.3g} relative to the output's peak (tolerance {tolerance:g} for "
            f"{str(policy.dtype).removeprefix('torch.')}, rollout.parity_tolerance), {bound} of {expected} adapter "
            "modules bound; this rollout samples nothing until a version passes"
        )
    return error
