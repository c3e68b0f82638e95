"""Flow-reward throughput: the batched FlowRewardScorer path vs a naive per-pair loop, in one run.

    python -m bench.reward_throughput                                   # CPU: DIS and RAFT-small at 128²
    python -m bench.reward_throughput --estimators raft --variant large --size 512 --pairs 256 --device cuda

"pairs" are scored candidates. Batched: `FlowRewardScorer.score` over all prompts at once with an empty cache,
so each prompt's input -> target flow is computed once and all pairs travel in chunks of <= --max-batch.
Naive: one estimator call per candidate holding its two pairs (input -> candidate, input -> target: the
target flow is recomputed for every candidate), then the reward of that one candidate. RAFT runs with
seeded random weights unless --weights is given; the speed does not depend on the weights.
"""

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from bench.stats import machine, ratio_line
from motionnft_core.config import FlowRewardConfig
from rewards.flow_model import ClassicalFlow, FlowEstimator, RAFTFlow
from rewards.flow_reward import motion_alignment_reward
from rewards.flow_scorer import FlowItem, FlowRewardScorer


def synthetic_items(num_prompts: int, k: int, size: int, seed: int = 0) -> list[FlowItem]:
    """Smooth random textures; the target and the K candidates are the input shifted by a few pixels."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for p in range(num_prompts):
        coarse = torch.rand(1, 3, size // 8, size // 8, generator=gen)
        image = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0] * 255
        image = image.clamp(0, 255).to(torch.uint8)
        shifts = torch.randint(-6, 7, (k + 1, 2), generator=gen).tolist()
        target = image.roll(tuple(shifts[0]), dims=(1, 2))
        candidates = torch.stack([image.roll(tuple(s), dims=(1, 2)) for s in shifts[1:]])
        items.append(FlowItem(f"prompt-{p}", image, target, candidates))
    return items


def run_batched(estimator: FlowEstimator, items: list[FlowItem], max_batch: int) -> None:
    FlowRewardScorer(estimator, FlowRewardConfig(max_batch=max_batch)).score(items)  # fresh scorer: cold cache


def run_naive(estimator: FlowEstimator, items: list[FlowItem]) -> None:
    for item in items:
        for candidate in item.candidates:
            src = item.input[None].expand(2, -1, -1, -1)
            flows = estimator(src, torch.stack([candidate, item.target]))
            motion_alignment_reward(flows[:1], flows[1:])["reward"].cpu()


def _seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the timer must not stop before the GPU does
    return time.perf_counter() - start


def report(label: str, estimator: FlowEstimator, items: list[FlowItem], args, device: torch.device) -> None:
    """Time both paths on the same items and print one line.

    Warm-up rounds first (untimed: first calls pay allocation and kernel setup); then each timed round runs both
    paths back to back and gives one ratio, so a burst of load from other processes hits both alike; the line
    gives the median rate of each path and the median and range of the ratios.
    """
    paths = {
        "batched": lambda: run_batched(estimator, items, args.max_batch),
        "naive": lambda: run_naive(estimator, items),
    }
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for round_index in range(args.warmup + args.iters):
        for name, fn in paths.items():
            took = _seconds(fn, device)
            if round_index >= args.warmup:
                seconds[name].append(took)
    ratios = [n / b for b, n in zip(seconds["batched"], seconds["naive"], strict=True)]
    batched = args.pairs / statistics.median(seconds["batched"])
    naive = args.pairs / statistics.median(seconds["naive"])
    print(f"{label}  batched {batched:.1f} pairs/s  naive {naive:.1f} pairs/s  {ratio_line(ratios)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--estimators", default="dis,raft", help="comma list of: dis, farneback, raft")
    parser.add_argument("--variant", default="small", choices=["small", "large"], help="RAFT variant")
    parser.add_argument("--weights", default=None, help="RAFT weights (local path or s3://); default random")
    parser.add_argument("--num-updates", type=int, default=12, help="RAFT refinement iterations")
    parser.add_argument("--device", default="cpu", help="RAFT device (DIS/Farneback always run on the CPU)")
    parser.add_argument("--size", type=int, default=128, help="square image side in pixels")
    parser.add_argument("--pairs", type=int, default=16, help="candidates scored per round")
    parser.add_argument("--k", type=int, default=8, help="candidates per prompt (group size)")
    parser.add_argument("--max-batch", type=int, default=32, help="pairs per estimator call (batched path)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of each path")
    parser.add_argument("--iters", type=int, default=3, help="timed rounds (each gives one ratio)")
    # One thread by default: the CPU run is about the ratio, and on a busy 2-core box two OpenMP threads thrash
    # (measured: DIS 10 vs 146 pairs/s naive under load 7); 0 keeps torch's own choice.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()

    if args.pairs % args.k:
        parser.error(f"--pairs ({args.pairs}) must be a multiple of --k ({args.k})")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    items = synthetic_items(args.pairs // args.k, args.k, args.size)
    print(
        f"{args.pairs} pairs = {len(items)} prompts x {args.k} candidates, {args.size}x{args.size}, "
        f"device {device}, torch threads {torch.get_num_threads()}, "
        f"warm-up rounds {args.warmup}, timed rounds {args.iters}; {machine()}",
        flush=True,
    )
    for name in args.estimators.split(","):
        if name == "raft":
            label = f"raft_{args.variant}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore" if args.weights is None else "default")
                estimator = RAFTFlow(
                    args.variant, weights=args.weights, num_updates=args.num_updates, max_batch=args.max_batch,
                    device=device,
                )  # fmt: skip
        else:
            label, estimator = name, ClassicalFlow(method=name)
        run_device = device if name == "raft" else torch.device("cpu")
        report(label, estimator, items, args, run_device)


if __name__ == "__main__":
    main()
