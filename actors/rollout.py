"""Grouped rollouts: K candidate edits per (image, instruction) from the old policy (DESIGN §1 step 2).

`Sampler` is the plain class that tests and bench/ drive directly. It encodes each prompt once, then runs the
candidates of all its groups through the ODE solver in micro-batches of up to `micro_batch` rows, so one
transformer call serves several groups. `RolloutWorker` is the Ray shell: it pulls the newest weights from the
parameter server before a batch and returns each group's training sample and decoded images as separate
objects, so reward workers never fetch latents and learners never fetch images.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from actors.param_server import WeightManifest, WeightMismatchError
from actors.solver import FlowDPMSolver
from learner.nft_loss import noised, training_draws, training_seed  # pure torch; shared with the learner
from models.policy import Conditioning, EditPolicy


class Prompt(Protocol):
    """What a rollout needs of a data row (data.motionedit.MotionExample satisfies it)."""

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
    reference: dict[str, torch.Tensor] | None = None  # v_old, v_ref (K, T, L, D) at the training draws (DESIGN §6)


@dataclass(frozen=True)
class ReferenceForwards:
    """Compute v_old and v_ref on the rollout (`nft.reference_forwards: rollout`, DESIGN §6).

    The rollout holds exactly the policy that generated the candidates plus the base model, so it can evaluate
    both at the learner's training draws (same seed, same order: `learner.nft_loss.training_draws`); the
    learner then runs only θ's forward and backward, and under staleness v_old is the true behaviour policy.
    """

    seed: int  # learner.seed
    fraction: float  # nft.timestep_fraction


def candidate_seed(base_seed: int, step: int, prompt_id: str, k: int) -> int:
    """Noise seed of candidate k of a prompt at a step: reproducible, distinct, independent of batching."""
    digest = hashlib.blake2b(f"{base_seed}/{step}/{prompt_id}/{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Sampler:
    """Samples groups with a deterministic DPM-Solver++(2M) on the policy's shifted sigma grid."""

    def __init__(
        self,
        policy: EditPolicy,
        *,
        group_size: int,
        num_steps: int,
        height: int,
        width: int,
        micro_batch: int,
        seed: int = 0,
        reference: ReferenceForwards | None = None,
    ) -> None:
        self.policy = policy
        self.reference = reference
        self.group_size = group_size
        self.num_steps = num_steps
        self.height = height
        self.width = width
        self.micro_batch = micro_batch
        self.seed = seed

    @torch.no_grad()
    def sample(self, prompts: list[Prompt], step: int, version: int) -> list[tuple[GroupSample, torch.Tensor]]:
        """For each prompt: (GroupSample, decoded candidates uint8 (K, 3, H, W))."""
        k, t0 = self.group_size, time.perf_counter()
        for p in prompts:
            if tuple(p.input_image.shape[-2:]) != (self.height, self.width):
                raise ValueError(
                    f"prompt {p.id!r}: input image is {tuple(p.input_image.shape[-2:])}, the rollout samples at "
                    f"{(self.height, self.width)}; load the data at rollout.height x rollout.width"
                )
        # 1. Encode each prompt's conditioning once.
        conds = [self.policy.encode([p.prompt], p.input_image[None]) for p in prompts]
        t_encode = time.perf_counter() - t0
        # 2. One row per candidate: its prompt's conditioning and its own seeded noise.
        seeds = [[candidate_seed(self.seed, step, p.id, i) for i in range(k)] for p in prompts]
        flat_seeds = [s for group in seeds for s in group]
        rows = [(g, i) for g in range(len(prompts)) for i in range(k)]
        sigmas = self.policy.sigmas(self.num_steps, self.height, self.width)
        x0_rows: list[torch.Tensor] = []
        images_rows: list[torch.Tensor] = []
        ref_rows: list[dict[str, torch.Tensor]] = []
        # 3. Solve the ODE for micro-batches of candidates, several groups per transformer call.
        for start in range(0, len(rows), self.micro_batch):
            chunk = rows[start : start + self.micro_batch]
            generators = [torch.Generator().manual_seed(flat_seeds[start + j]) for j in range(len(chunk))]
            x = self.policy.prepare_latents(len(chunk), self.height, self.width, generators)
            cond = Conditioning.cat([conds[g] for g, _ in chunk])
            x0 = self._solve(x, cond, sigmas)
            x0_rows.append(x0)
            images_rows.append(self.policy.decode(x0, self.height, self.width))
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
        for j in range(draws[0][0].numel()):
            t = torch.stack([times[j] for times, _ in draws]).to(x0.device, x0.dtype)
            x_t = noised(x0, torch.stack([eps[j] for _, eps in draws]).to(x0.device, x0.dtype), t)
            v_old.append(self.policy.velocity(x_t, t, cond).cpu())
            with self.policy.adapters_disabled():
                v_ref.append(self.policy.velocity(x_t, t, cond).cpu())
        return {"v_old": torch.stack(v_old, dim=1), "v_ref": torch.stack(v_ref, dim=1)}

    def _solve(self, x: torch.Tensor, cond: Conditioning, sigmas: torch.Tensor) -> torch.Tensor:
        solver = FlowDPMSolver()
        solver.set_timesteps(sigmas)
        for sigma in solver.timesteps:
            v = self.policy.velocity(x, sigma.expand(x.shape[0]).to(x.device), cond)
            x = solver.step(v, x)
        return x


class PolicyWeights:
    """Loads published weights into a policy in place; a mismatch leaves the old version untouched."""

    def __init__(self, policy: EditPolicy, kind: str = "lora") -> None:
        self.policy = policy
        self.kind = kind
        self.version = -1

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.kind == "lora":
            return self.policy.lora_state_dict()
        return {k: v.detach() for k, v in self.policy.transformer.named_parameters()}

    def manifest(self) -> WeightManifest:
        return WeightManifest.of(self.state_dict(), version=self.version, kind=self.kind)

    def load(self, version: int, manifest_bytes: bytes, state: dict[str, torch.Tensor]) -> None:
        published = WeightManifest.unpack(manifest_bytes)
        self.manifest().check_matches(published)
        if WeightManifest.of(state, version=version, kind=published.kind) != published:
            raise WeightMismatchError(f"version {version}: the tensors differ from their manifest")
        if self.kind == "lora":
            self.policy.load_lora_state_dict(state)
        else:
            with torch.no_grad():
                current = dict(self.policy.transformer.named_parameters())
                for name, tensor in state.items():
                    current[name].copy_(tensor)
        self.version = version


class RolloutWorker:
    """Ray shell over Sampler; wrap at the call site: `ray.remote(num_gpus=g)(RolloutWorker)`."""

    def __init__(
        self, name: str, param_server: Any, build_policy: Any, sampler_kwargs: dict[str, Any], weight_kind: str = "lora"
    ) -> None:
        policy = build_policy()
        self.name, self.param_server = name, param_server
        self.weights = PolicyWeights(policy, weight_kind)
        self.sampler = Sampler(policy, **sampler_kwargs)

    def ready(self) -> str:
        return self.name

    def version(self) -> int:
        return self.weights.version

    def sync(self, min_version: int = 0) -> int:
        """Pull the newest published weights if newer than ours; raise if they are older than min_version."""
        import ray

        version, manifest, (ref,) = ray.get(self.param_server.latest.remote())
        if version < min_version:
            raise RuntimeError(f"{self.name}: newest published version {version} < required {min_version}")
        if version != self.weights.version:
            self.weights.load(version, manifest, ray.get(ref))
            self.param_server.report.remote(self.name, version)
        return version

    def sample(self, step: int, min_version: int, *prompts: Prompt) -> list[Any]:
        """[group, images, meta] per prompt, flat; call with `.options(num_returns=3 * len(prompts))`.

        Three objects so each consumer fetches only its part: the learner the GroupSample, the reward worker
        the images, the driver the small metadata (version, timings).
        """
        self.sync(min_version)
        pairs = self.sampler.sample(list(prompts), step, self.weights.version)
        return [x for g, images in pairs for x in (g, images, {"version": g.version, "worker": self.name, **g.timing})]
