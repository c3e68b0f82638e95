"""The seed and noise contract between rollouts and learner (docs/algorithm.md); torch only.

Every random draw of a run is a function of named integers and ids, never of batching, placement or world size:
candidate k of a prompt at a step starts from the noise of `candidate_seed`, and its training times and eps come
from `training_draws` under `training_seed`. The learner and a rollout computing reference forwards
(`nft.reference_forwards: rollout`) both call `training_draws`, so the x_t at which the rollout evaluates
v_old / v_ref is exactly the x_t the learner trains at; a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from its parts ("/"-joined, hashed): reproducible, and distinct for distinct parts."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def candidate_seed(base_seed: int, step: int, prompt_id: str, k: int) -> int:
    """Noise seed of candidate k of a prompt at a step: reproducible, distinct, independent of batching."""
    return derive_seed(base_seed, step, prompt_id, k)


def training_seed(seed: int, step: int, prompt_id: str, k: int) -> int:
    """Seed of candidate k's training draws at a step: the same on every rank, on the rollout, after a resume."""
    return derive_seed("train", seed, step, prompt_id, k)


def per_sample(t: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) so it broadcasts over ``like``'s non-batch dims."""
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"{name} must have shape ({like.shape[0]},) (one per sample), got {tuple(t.shape)}")
    return t.view(-1, *([1] * (like.ndim - 1)))


def noised(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Flow-matching forward process (docs/algorithm.md): ``x_t = (1 - t) * x0 + t * eps``.

    Args:
        x0: (B, ...) clean latents.  eps: (B, ...) noise.  t: (B,) times in [0, 1], one per sample.
    Returns:
        (B, ...) x_t.
    """
    if eps.shape != x0.shape:
        raise ValueError(f"eps shape {tuple(eps.shape)} must equal x0 shape {tuple(x0.shape)}")
    t = per_sample(t, x0, "t")
    return (1 - t) * x0 + t * eps


def training_timesteps(
    sigmas: torch.Tensor,
    *,
    fraction: float,
    generator: torch.Generator,
    num_samples: int = 1,
) -> torch.Tensor:
    """The training times t of each sample (docs/algorithm.md): a random subset of the rollout grid, random order.

    As the reference (train_nft_sd3.py / train_nft_qwen_image_edit.py): every sample gets its own
    ``randperm`` over ALL ``steps`` grid points (the scheduler's timesteps: the sigmas the model was
    evaluated at, without the final 0), and the timestep loop uses the first ``int(steps * fraction)``
    entries. So with 6 steps each sample trains on 5 distinct points chosen uniformly at random (any of the
    six may be the one left out, sigma = 1 included), in random order; not the first five.

    Args:
        sigmas: (steps,) rollout grid (e.g. ``FlowDPMSolver.timesteps``).
        fraction: share of grid points used per sample (``nft.timestep_fraction``).
        generator: explicit RNG (on ``sigmas``' device).
        num_samples: number of samples B.
    Returns:
        (B, int(steps * fraction)) times; column j is the j-th training timestep of each sample.
    """
    if sigmas.ndim != 1 or sigmas.numel() == 0:
        raise ValueError(f"sigmas must be a non-empty 1-D tensor, got shape {tuple(sigmas.shape)}")
    steps = sigmas.numel()
    n_train = int(steps * fraction)
    if not (0.0 < fraction <= 1.0) or n_train < 1:
        raise ValueError(f"fraction must be in (0, 1] and keep >= 1 of {steps} steps, got {fraction}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    order = torch.stack(
        [torch.randperm(steps, generator=generator, device=sigmas.device) for _ in range(num_samples)]
    )  # (B, steps): one permutation per sample, as the reference's perms_time
    return sigmas[order[:, :n_train]]


def training_draws(
    sigmas: torch.Tensor, shape: torch.Size | tuple[int, ...], *, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's training times and noise, in the one order every consumer must use.

    The generator first permutes the grid (``training_timesteps``), then draws eps for timestep 0, 1, ...

    Returns:
        times (T,) and eps (T, *shape), float32 on the CPU.
    """
    g = torch.Generator().manual_seed(seed)
    times = training_timesteps(sigmas.float().cpu(), fraction=fraction, generator=g)[0]
    eps = torch.stack([torch.randn(tuple(shape), generator=g) for _ in range(times.numel())])
    return times, eps
