"""Test support for the learner and checkpoint tests (not collected: no `test_` prefix).

Runs NFTTrainer ranks the way LearnerWorker does, but without Ray: `run_jobs` spawns one process per rank
with torch.multiprocessing (several independent process groups at once, e.g. a world-2 job beside a
world-1 job), each rank calls `job(rank, world, out_dir, **kwargs)`, and rank 0 of each job saves what it
returns to `out_dir/<name>.pt`. Samples are random latents with real conditioning from the tiny policy, so
every rank builds the identical list from a seed and keeps only its share (`rank_samples`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from learner.trainer.nft_trainer import TrainSample, rank_share
from motionnft_core.config import LearnerConfig, NFTConfig
from motionnft_core.models.policy import EditPolicy

SIZE = 32  # edit pixel size: 2x2 = 4 packed latent tokens
NUM_STEPS = 3  # rollout grid -> int(3 * 0.99) = 2 training timesteps per sample
TEXT_TOKENS = 16  # FLUX's T5 length (512 in production; short here for speed)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
PROMPTS = ("make the person raise both arms", "turn the car left")
COLLECTIVE_TIMEOUT_S = 120  # a rank that dies must not leave its peer waiting for gloo's 30-minute default


def sections(**overrides: Any) -> tuple[NFTConfig, LearnerConfig]:
    """(cfg.nft, cfg.learner) with a small LoRA and micro-batch 2; every other value at its config default
    (docs/algorithm.md) unless overridden, each override going to the section that has the key."""
    base = {"lora_rank": 4, "lora_alpha": 8, "lora_targets": TARGETS, "micro_batch": 2, "seed": 0, **overrides}
    nft_keys = {f.name for f in dataclasses.fields(NFTConfig)}
    learner_keys = {f.name for f in dataclasses.fields(LearnerConfig)}
    unknown = base.keys() - nft_keys - learner_keys
    if unknown:
        raise KeyError(f"not a key of nft or learner: {sorted(unknown)}")
    nft = NFTConfig(**{k: v for k, v in base.items() if k in nft_keys})
    learner = LearnerConfig(**{k: v for k, v in base.items() if k in learner_keys})
    return nft, learner


def load_policy(path: str | Path, family: str) -> EditPolicy:
    kwargs = {"max_sequence_length": TEXT_TOKENS} if family == "flux_kontext" else {}
    return EditPolicy.from_pretrained(str(path), family=family, **kwargs)


def make_samples(policy: EditPolicy, n: int, *, seed: int, r: list[float] | None = None) -> list[TrainSample]:
    """n samples over len(PROMPTS) prompts (groups), random x0, optimality r (default spread over [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (len(PROMPTS), 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    conds = [policy.encode([p], images[i : i + 1]) for i, p in enumerate(PROMPTS)]
    sigmas = policy.sigmas(NUM_STEPS, SIZE, SIZE)
    tokens, channels = policy.seq_len(SIZE, SIZE), policy.transformer.config.in_channels
    r = r if r is not None else [(i % 4) / 3 for i in range(n)]
    out = []
    for i in range(n):
        group = i % len(PROMPTS)
        x0 = torch.randn(tokens, channels, generator=g)
        out.append(TrainSample(f"prompt-{group}", i // len(PROMPTS), x0, conds[group], sigmas, r[i]))
    return out


@dataclasses.dataclass
class EditPrompt:
    """A data row as a rollout needs it (actors.sampler.Prompt)."""

    id: str
    prompt: str
    input_image: torch.Tensor


def edit_prompts(texts: tuple[str, ...] = PROMPTS, size: int = SIZE) -> list[EditPrompt]:
    """One random uint8 input image per text, ids p0, p1, ... (seeded: the same rows every call)."""
    g = torch.Generator().manual_seed(0)
    return [EditPrompt(f"p{i}", t, torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8))
            for i, t in enumerate(texts)]  # fmt: skip


def rank_samples(samples: list[TrainSample], world: int, rank: int, micro_batch: int) -> list[TrainSample]:
    """This rank's share, padded exactly as a LearnerWorker pads (`learner.trainer.nft_trainer.rank_share`)."""
    return rank_share(samples, world, rank, micro_batch)


def full(t: torch.Tensor) -> torch.Tensor:
    """Unsharded copy on every rank (collective for DTensors)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def full_tree(x: Any) -> Any:
    """`full` over nested dicts/lists (optimizer state); scalars pass through. Collective."""
    if isinstance(x, dict):
        return {k: full_tree(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(full_tree(v) for v in x)
    return full(x) if isinstance(x, torch.Tensor) else x


def _entry(index: int, jobs: list[tuple[str, int, int]], fn: Callable, out_dir: str, kwargs: dict) -> None:
    name, rank, world = jobs[index]
    torch.set_num_threads(1)  # ranks share 2 cores; oversubscription only slows every rank
    store = Path(out_dir) / f"{name}.store"
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        result = fn(rank, world, out_dir, **kwargs)
        if rank == 0:
            torch.save(result, Path(out_dir) / f"{name}.pt")
    finally:
        dist.destroy_process_group()


def run_jobs(fn: Callable, worlds: dict[str, int], out_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Run `fn` as independent jobs {name: world size} at once; returns {name: rank 0's result}.

    `fn` must be importable (module level) because ranks are spawned; a failing rank raises here with its
    traceback, and the other ranks are terminated.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(name, rank, world) for name, world in worlds.items() for rank in range(world)]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_entry, args=(jobs, fn, str(out_dir), kwargs), nprocs=len(jobs), start_method="spawn")
    return {name: torch.load(out_dir / f"{name}.pt", weights_only=False) for name in worlds}


class BrokenOnRank1:
    """A policy factory that fails on rank 1 only (a LearnerGroup must then fail at once, not hang)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self) -> EditPolicy:
        if os.environ["RANK"] == "1":  # called before the rendezvous, like every build_policy
            raise RuntimeError("rank 1 cannot load its model")
        return load_policy(self.path, "flux_kontext")
