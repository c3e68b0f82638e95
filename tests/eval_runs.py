"""Tiny evaluation runs for the evaluation tests (tests/unit/test_evaluate.py, tests/ray/test_evaluate_*.py): the
config tree of a tiny FLUX Kontext run, the `cluster` section for the session's CPU-only Ray cluster, the config
file, and checkpoints written the way the driver writes them (`export_lora` into `step_N/lora/`, then the COMMITTED
marker) with seeded random adapters instead of trained ones."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from learner.trainer.checkpoint import MARKER, export_lora, step_name
from motionnft_core.config import Config
from motionnft_core.models.weights import load_exported_policy

RANK, ALPHA, TARGETS = 4, 8, ["to_q", "to_k", "to_v", "to_out.0"]


def kontext_run_tree(root: Path) -> dict:
    """A tiny FLUX Kontext run under `root`: 8 synthetic 32 px examples (half held out), a 2-step solver, the DIS
    flow reward alone (no judge), an adapter of RANK/ALPHA on TARGETS; no `cluster` section."""
    return {
        "model": {"tiny": True, "family": "flux_kontext", "dtype": "float32", "cache_dir": str(root / "cache")},
        "data": {"synthetic": 8, "synthetic_size": 32, "eval_fraction": 0.5, "seed": 0},
        "rollout": {"group_size": 2, "prompts_per_step": 1, "num_steps": 2, "height": 32, "width": 32},
        "reward": {"flow_weight": 1.0, "judge_weight": 0.0, "flow": {"estimator": "dis", "quantize": False}},
        "nft": {"lora_rank": RANK, "lora_alpha": ALPHA, "lora_targets": TARGETS},
        "checkpoint": {"dir": str(root / "ckpt")},
        "logging": {"dir": str(root / "run")},
    }


def cpu_pools(rollout_workers: int, *, judge: bool = False) -> dict:
    """The `cluster` section on the session's Ray cluster: `rollout_workers` and one reward worker of half a CPU
    each, no GPU for any of them (nor for the judge with `judge`)."""
    pools = {"rollout_workers": rollout_workers, "reward_workers": 1, "cpus_per_actor": 0.5, "rollout_gpus": 0,
             "reward_gpus": 0}  # fmt: skip
    return pools | {"judge_gpus": 0} if judge else pools


def write_config(root: Path, tree: dict) -> Path:
    """`tree` as the run's YAML file, root/run.yaml."""
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def adapter_state(cfg: Config, seed: int) -> dict[str, torch.Tensor]:
    """Random (non-zero B) adapter weights of RANK on TARGETS with the names `EditPolicy.lora_state_dict` uses."""
    policy = load_exported_policy(cfg, None)
    policy.add_lora(rank=RANK, alpha=ALPHA, target_modules=TARGETS)
    g = torch.Generator().manual_seed(seed)
    return {k: 0.2 * torch.randn(v.shape, generator=g) for k, v in policy.lora_state_dict().items()}


def write_checkpoint(cfg: Config, step: int, state: dict[str, torch.Tensor], *, rank: int = RANK) -> Path:
    """`state` as the committed checkpoint of `step` under `checkpoint.dir` (exported as a FLUX Kontext adapter of
    `rank`); returns its folder."""
    ckpt = Path(cfg.checkpoint.dir) / step_name(step)
    export_lora(state, ckpt / "lora", family="flux_kontext", rank=rank, alpha=ALPHA, targets=TARGETS)
    (ckpt / MARKER).write_text(str(step))
    return ckpt
