"""Grouped rollouts: K candidate edits per (image, instruction) from the old policy (docs/architecture.md, phase 2).

`Sampler` is the plain class that the rollout worker, the evaluation and bench/ drive directly. It encodes each
prompt once, then runs the candidates of all its groups through the ODE solver in micro-batches of up to
`rollout.micro_batch` rows, so one transformer call serves several groups. Candidate noise and, with reference
forwards, the training draws come from the seed contract of motionnft_core/noise.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from actors.solver import FlowDPMSolver
from motionnft_core.config import RolloutConfig
from motionnft_core.models.fp8 import fp8_forwards
from motionnft_core.models.policy import Conditioning, EditPolicy
from motionnft_core.noise import candidate_seed, noised, training_draws, training_seed


class Prompt(Protocol):
    """What a rollout needs of a data row (motionnft_core.data.motionedit.MotionExample satisfies it)."""

    id: str
    prompt: str
    input_image: torch.Tensor  # uint8 (3, H, W)


@dataclass
class GroupSample:
    """One prompt's K candidates as the learner needs them; travels through the object store."""

    prompt_id: str
    x0: torch.Tensor  # (K, L, D) clean latents in the transformer's packed layout
    cond: Conditioning  # batch 1: shared by the K candidates
    sigmas: torch.Tensor  # (num_steps,) the rollout's sigma grid; training timesteps are drawn from it
    version: int  # policy version that generated the candidates
    seeds: list[int]  # noise seed of each candidate
    timing: dict[str, float] = field(default_factory=dict)
    reference: dict[str, torch.Tensor] | None = None  # v_old, v_ref (K, T, L, D) at the training draws


@dataclass(frozen=True)
class ReferenceForwards:
    """Compute v_old and v_ref on the rollout (`nft.reference_forwards: rollout`, bench/README.md).

    The rollout holds exactly the policy that generated the candidates plus the base model, so it can evaluate
    both at the learner's training draws (same seed, same order: `motionnft_core.noise.training_draws`); the learner
    then runs only θ's forward and backward, and under staleness v_old is the true behaviour policy.
    """

    seed: int  # learner.seed
    fraction: float  # nft.timestep_fraction


class Sampler:
    """Samples groups with a deterministic DPM-Solver++(2M) on the policy's shifted sigma grid."""

    def __init__(self, policy: EditPolicy, cfg: RolloutConfig, reference: ReferenceForwards | None = None) -> None:
        self.policy, self.cfg, self.reference = policy, cfg, reference
        if cfg.compile:
            policy.compile_blocks()
        if cfg.fp8 or cfg.fp8_reference:
            policy.use_fp8()

    @torch.no_grad()
    def sample(
        self, prompts: list[Prompt], step: int, version: int, *, group_size: int | None = None
    ) -> list[tuple[GroupSample, torch.Tensor]]:
        """For each prompt: (GroupSample, decoded candidates uint8 (K, 3, H, W)).

        K is `rollout.group_size` unless `group_size` says otherwise (the evaluation samples one edit each).
        """
        c = self.cfg
        k, t0 = group_size or c.group_size, time.perf_counter()
        for p in prompts:
            if tuple(p.input_image.shape[-2:]) != (c.height, c.width):
                raise ValueError(
                    f"prompt {p.id!r}: input image is {tuple(p.input_image.shape[-2:])}, the rollout samples at "
                    f"{(c.height, c.width)}; load the data at rollout.height x rollout.width"
                )
        # 1. Encode each prompt's conditioning once, on every input image: the motion source, then any references.
        inputs = [[im[None] for im in (p.input_image, *getattr(p, "reference_images", ()))] for p in prompts]
        conds = [self.policy.encode([p.prompt], ims) for p, ims in zip(prompts, inputs, strict=True)]
        t_encode = time.perf_counter() - t0
        # 2. One row per candidate: its prompt's conditioning and its own seeded noise.
        seeds = [[candidate_seed(c.seed, step, p.id, i) for i in range(k)] for p in prompts]
        flat_seeds = [s for group in seeds for s in group]
        rows = [(g, i) for g in range(len(prompts)) for i in range(k)]
        sigmas = self.policy.sigmas(c.num_steps, c.height, c.width)
        x0_rows: list[torch.Tensor] = []
        images_rows: list[torch.Tensor] = []
        ref_rows: list[dict[str, torch.Tensor]] = []
        # 3. Solve the ODE for micro-batches of candidates, several groups per transformer call.
        for start in range(0, len(rows), c.micro_batch):
            chunk = rows[start : start + c.micro_batch]
            generators = [torch.Generator().manual_seed(flat_seeds[start + j]) for j in range(len(chunk))]
            x = self.policy.prepare_latents(len(chunk), c.height, c.width, generators)
            cond = Conditioning.cat([conds[g] for g, _ in chunk])
            x0 = self.solve(x, cond, sigmas)
            x0_rows.append(x0)
            images_rows.append(self.policy.decode(x0, c.height, c.width))
            if self.reference is not None:
                ids = [(prompts[g].id, i) for g, i in chunk]
                ref_rows.append(self._reference_velocities(x0, cond, sigmas, ids, step))
        x0_all, images_all = torch.cat(x0_rows), torch.cat(images_rows)
        ref_all = {key: torch.cat([r[key] for r in ref_rows]) for key in ("v_old", "v_ref")} if ref_rows else None
        elapsed = time.perf_counter() - t0
        timing = {"encode_s": t_encode, "sample_s": elapsed - t_encode, "total_s": elapsed}
        out = []
        for g, p in enumerate(prompts):
            sl = slice(g * k, (g + 1) * k)
            sample = GroupSample(
                prompt_id=p.id,
                x0=x0_all[sl].clone(),
                cond=conds[g],
                sigmas=sigmas.clone(),
                version=version,
                seeds=seeds[g],
                timing=timing,
                reference=None if ref_all is None else {key: v[sl].clone() for key, v in ref_all.items()},
            )
            out.append((sample, images_all[sl].clone()))
        return out

    def _reference_velocities(self, x0, cond, sigmas, ids: list[tuple[str, int]], step: int) -> dict[str, torch.Tensor]:
        """v_old (this policy) and v_ref (adapters off) at each candidate's training draws: (B, T, L, D) each."""
        draws = [
            training_draws(sigmas, x0.shape[1:], fraction=self.reference.fraction,
                           seed=training_seed(self.reference.seed, step, prompt_id, k))
            for prompt_id, k in ids
        ]  # fmt: skip
        v_old, v_ref = [], []
        with fp8_forwards(self.policy.transformer, self.cfg.fp8_reference):
            for j in range(draws[0][0].numel()):
                t = torch.stack([times[j] for times, _ in draws]).to(x0.device, x0.dtype)
                x_t = noised(x0, torch.stack([eps[j] for _, eps in draws]).to(x0.device, x0.dtype), t)
                v_old.append(self.policy.velocity(x_t, t, cond).cpu())
                with self.policy.adapters_disabled():
                    v_ref.append(self.policy.velocity(x_t, t, cond).cpu())
        return {"v_old": torch.stack(v_old, dim=1), "v_ref": torch.stack(v_ref, dim=1)}

    def solve(self, x: torch.Tensor, cond: Conditioning, sigmas: torch.Tensor) -> torch.Tensor:
        """Noise x (B, L, D) to clean latents along `sigmas`, row b conditioned on `cond` row b: one velocity per
        step, in FP8 with `rollout.fp8`."""
        solver = FlowDPMSolver()
        solver.set_timesteps(sigmas)
        with fp8_forwards(self.policy.transformer, self.cfg.fp8):
            for sigma in solver.timesteps:
                v = self.policy.velocity(x, sigma.expand(x.shape[0]).to(x.device), cond)
                x = solver.step(v, x)
        return x
