"""FP8 sampling's effect on the motion reward, measured on a policy that really edits. Random full-size weights
(bench/train_step.py --fp8) show the size of FP8's error, not what it does to a reward; this runs the CPU learning
demo's warm-started policy (configs/learn_demo.yaml, built on first use into `model.cache_dir`, ~2 min), whose edits
move objects and whose flow rewards spread inside a group.

Every held-out example gets K candidates with the same seeds twice, in full precision and with `rollout.fp8`, both
scored by the run's flow reward. Printed: the mean reward each way; the mean |change| of a candidate's reward
against the spread of rewards inside a group (what advantages are made of); how often a group's best candidate
stays the best; the mean |change| of the optimality r that the loss weighs each candidate with (docs/algorithm.md, over
steps of `rollout.prompts_per_step` groups as in training). One JSON line goes to `--results`.

    python bench/fp8_reward.py                              # the demo's held-out examples, K=8
    python bench/fp8_reward.py --cache DIR --limit 8 --group 4   # quick, with a demo built in DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.sampler import Sampler  # noqa: E402
from bench.stats import append_record, machine  # noqa: E402
from bench.train_step import score  # noqa: E402
from learner.trainer.nft_loss import optimality  # noqa: E402
from motionnft_core.config_loader import load_config_or_exit  # noqa: E402
from motionnft_core.data.motionedit import load_splits  # noqa: E402
from motionnft_core.models.warmstart import resolve_demo  # noqa: E402
from motionnft_core.models.weights import load_exported_policy  # noqa: E402
from rewards.flow_scorer import build_flow_scorer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "fp8_reward.jsonl"


def rewards_of(sampler: Sampler, scorer, examples: list, per_call: int) -> torch.Tensor:
    """Flow rewards (N, K), float64, of `examples` sampled `per_call` groups at a time (step 0: fixed seeds)."""
    chunks = [examples[i : i + per_call] for i in range(0, len(examples), per_call)]
    return torch.cat([score(scorer, chunk, sampler.sample(chunk, step=0, version=0)) for chunk in chunks])


def compare(plain: torch.Tensor, fp8: torch.Tensor, per_step: int, clip: float) -> dict[str, float]:
    """The FP8 rewards (N, K) against the full-precision ones of the same candidates."""
    r_plain = torch.cat([optimality(plain[i : i + per_step], clip=clip) for i in range(0, len(plain), per_step)])
    r_fp8 = torch.cat([optimality(fp8[i : i + per_step], clip=clip) for i in range(0, len(fp8), per_step)])
    return {
        "reward_mean": plain.mean().item(),
        "reward_mean_fp8": fp8.mean().item(),
        "reward_abs_change": (fp8 - plain).abs().mean().item(),
        "reward_group_std": plain.std(dim=1, correction=0).mean().item(),
        "same_best_share": (fp8.argmax(dim=1) == plain.argmax(dim=1)).double().mean().item(),
        "optimality_abs_change": (r_fp8 - r_plain).abs().mean().item(),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "learn_demo.yaml"), help="a demo config")
    p.add_argument("--cache", default="", help="model.cache_dir (where the demo is, or is built)")
    p.add_argument("--limit", type=int, default=0, help="held-out examples (0: all)")
    p.add_argument("--group", type=int, default=8, help="K candidates per example")
    p.add_argument("--results", default=str(RESULTS), help="JSON-lines file to append the run to")
    args = p.parse_args(argv)
    overrides = [f"model.cache_dir={args.cache}"] if args.cache else []
    cfg = resolve_demo(load_config_or_exit(args.config, overrides))
    _, held_out = load_splits(cfg)
    n = len(held_out) if args.limit <= 0 else min(args.limit, len(held_out))
    examples = [held_out[i] for i in range(n)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer = build_flow_scorer(cfg.reward.flow, device=device, cache_dir=cfg.model.cache_dir)
    policy = load_exported_policy(cfg, None)  # the warm start: what the demo's training starts from
    rollout = dataclasses.replace(cfg.rollout, group_size=args.group)
    per_call = max(1, rollout.micro_batch // args.group)
    rewards, seconds = {}, {}
    for name, fp8 in (("plain", False), ("fp8", True)):
        t0 = time.perf_counter()
        rewards[name] = rewards_of(Sampler(policy, dataclasses.replace(rollout, fp8=fp8)), scorer, examples, per_call)
        seconds[name] = time.perf_counter() - t0
        print(f"{name}: {n} examples x {args.group} candidates sampled and scored in {seconds[name]:.0f} s", flush=True)
    result = compare(rewards["plain"], rewards["fp8"], cfg.rollout.prompts_per_step, cfg.nft.adv_clip_max)
    record = {
        "bench": "fp8_reward", "machine": machine(), "date": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"), "config": Path(args.config).name, "examples": n, "group": args.group,
        "flow_estimator": cfg.reward.flow.estimator, "seconds": seconds, **result,
    }  # fmt: skip
    print(f"FP8 sampling, {n} held-out examples x {args.group} ({machine()}): mean flow reward "
          f"{result['reward_mean']:.4f} -> {result['reward_mean_fp8']:.4f}; a candidate's reward moves by "
          f"{result['reward_abs_change']:.4f} on average against a spread of {result['reward_group_std']:.4f} inside "
          f"its group; the best candidate stays the best in {100 * result['same_best_share']:.0f} % of groups; the "
          f"optimality r moves by {result['optimality_abs_change']:.4f} on average", flush=True)  # fmt: skip
    append_record(args.results, record)
    return record


if __name__ == "__main__":
    main()
