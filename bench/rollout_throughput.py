"""Rollout throughput and weight-sync latency, each against a naive baseline measured in the same run.

1. Sampling: candidates/s of `Sampler` (each prompt encoded once, K candidates of several groups batched into one
   transformer call per solver step) vs a naive loop of K separate diffusers pipeline calls per prompt.
2. Weight sync: latency for N rollout actors to hold a new version when the weights are put in the object store
   once and every actor fetches the same reference, vs the driver sending a copy to each actor.

    python bench/rollout_throughput.py                       # tiny models, CPU (defaults)
    python bench/rollout_throughput.py --model DIR --family flux_kontext --size 512 --device cuda --group 8 \\
        --prompts 4 --micro-batch 16 --dtype bfloat16         # full-size transformer on a GPU (no Ray part)

Prints `ratio` lines; transformer TFLOP/s come from torch's FLOP counter over one forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.sampler import Sampler  # noqa: E402
from bench.scratch import scratch_dir  # noqa: E402
from bench.stats import machine, ratio_line  # noqa: E402
from motionnft_core.config import RolloutConfig  # noqa: E402
from motionnft_core.data.motionedit import MotionEditDataset  # noqa: E402
from motionnft_core.data.synthetic import generate_synthetic  # noqa: E402
from motionnft_core.models.policy import EditPolicy  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def transformer_flops(policy: EditPolicy, sampler: Sampler, example) -> float:
    """FLOPs of one transformer forward on a micro-batch of `rollout.micro_batch` candidates."""
    from torch.utils.flop_counter import FlopCounterMode

    from motionnft_core.models.policy import Conditioning

    cond = policy.encode([example.prompt], example.input_image[None].to(policy.device))
    b = sampler.cfg.micro_batch
    gens = [torch.Generator().manual_seed(i) for i in range(b)]
    x = policy.prepare_latents(b, sampler.cfg.height, sampler.cfg.width, gens)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        policy.velocity(x, torch.full((b,), 0.5, device=x.device), Conditioning.cat([cond] * b))
    return float(counter.get_total_flops())


def naive_loop(policy: EditPolicy, examples, k: int, steps: int, size: int) -> None:
    """K separate pipeline calls per prompt (re-encoding the prompt and image every time)."""
    pipe = policy.pipe
    for ex in examples:
        image = ex.input_image.to(policy.device).float()[None] / 255.0
        for i in range(k):
            kwargs = {"image": image, "prompt": ex.prompt, "height": size, "width": size, "num_inference_steps": steps,
                      "generator": torch.Generator().manual_seed(i), "output_type": "pt"}  # fmt: skip
            kwargs.update(policy.stock_call_kwargs(size, size))
            pipe(**kwargs)


def bench_sampling(args, policy: EditPolicy, examples) -> None:
    cfg = RolloutConfig(group_size=args.group, num_steps=args.steps, height=args.size, width=args.size,
                        micro_batch=args.micro_batch)  # fmt: skip
    sampler = Sampler(policy, cfg)
    n = len(examples) * args.group
    for _ in range(args.warmup):
        sampler.sample(examples[:1], step=0, version=0)
        naive_loop(policy, examples[:1], 1, args.steps, args.size)
    rates: dict[str, list[float]] = {"grouped": [], "naive": []}
    for r in range(args.rounds):  # each round times both paths back to back: one ratio per round
        sync(args.device)
        t0 = time.perf_counter()
        sampler.sample(examples, step=r, version=0)
        sync(args.device)
        rates["grouped"].append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        naive_loop(policy, examples, args.group, args.steps, args.size)
        sync(args.device)
        rates["naive"].append(n / (time.perf_counter() - t0))
    grouped, naive = statistics.median(rates["grouped"]), statistics.median(rates["naive"])
    ratios = [g / v for g, v in zip(rates["grouped"], rates["naive"], strict=True)]
    print(f"sampling {policy.family} {args.size}px K={args.group} P={len(examples)} steps={args.steps}: "
          f"grouped {grouped:.2f} cand/s  naive {naive:.2f} cand/s  {ratio_line(ratios)}")  # fmt: skip
    flops = transformer_flops(policy, sampler, examples[0])
    rows = len(examples) * args.group
    calls = -(-rows // args.micro_batch) * args.steps  # transformer calls per sample() of all prompts
    sec_per_sample_call = 1.0 / grouped * rows  # wall time of one sample() over all prompts
    tflops = flops * calls / sec_per_sample_call / 1e12
    print(f"transformer: {flops / args.micro_batch / 1e9:.3f} GFLOP per candidate per forward; "
          f"achieved {tflops:.4f} TFLOP/s in grouped sampling (incl. encode/decode time)")  # fmt: skip


def bench_weight_sync(args, policy: EditPolicy) -> None:
    import ray

    from motionnft_core.models.weights import PolicyWeights, WeightManifest

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=args.workers + 1, include_dashboard=False, log_to_driver=False)

    class Holder:
        """A rollout's weight endpoint without the sampler: loads into a policy in place."""

        def __init__(self, path: str, family: str, kind: str) -> None:
            p = EditPolicy.from_pretrained(path, family=family)
            if kind == "lora":
                p.add_lora(rank=args.lora_rank, alpha=args.lora_rank * 2, target_modules=["to_q", "to_k", "to_v"])
            self.weights = PolicyWeights(p, kind)

        def load_ref(self, version: int, manifest: bytes, refs: list) -> int:
            self.weights.load(version, manifest, ray.get(refs[0]))
            return version

        def load_value(self, version: int, manifest: bytes, state: dict) -> int:
            self.weights.load(version, manifest, state)
            return version

    for kind in ("lora", "full"):
        holders = [ray.remote(num_cpus=1)(Holder).remote(args.model, policy.family, kind) for _ in range(args.workers)]
        local = ray.get(holders[0].__ray_call__.remote(lambda self: self.weights.state_dict()))
        mb = sum(t.numel() * t.element_size() for t in local.values()) / 2**20
        times = {"by_ref": [], "by_value": []}
        for v in range(1, args.sync_repeats + 2):
            state = {k: t + 0.001 * v for k, t in local.items()}
            manifest = WeightManifest.of(state, version=v, kind=kind).pack()
            t0 = time.perf_counter()
            ref = ray.put(state)  # the learner's one publish
            ray.get([h.load_ref.remote(v, manifest, [ref]) for h in holders])
            t1 = time.perf_counter()
            manifest2 = WeightManifest.of(state, version=v + 1000, kind=kind).pack()
            ray.get([h.load_value.remote(v + 1000, manifest2, state) for h in holders])  # a copy per actor
            t2 = time.perf_counter()
            if v > 1:  # the first round warms up the actors
                times["by_ref"].append(t1 - t0)
                times["by_value"].append(t2 - t1)
        by_ref, by_value = statistics.median(times["by_ref"]), statistics.median(times["by_value"])
        ratios = [b / a for a, b in zip(times["by_ref"], times["by_value"], strict=True)]
        print(f"weight sync {kind} ({mb:.2f} MiB) to {args.workers} actors: one put + refs {by_ref * 1e3:.1f} ms  "
              f"copy per actor {by_value * 1e3:.1f} ms  {ratio_line(ratios)}")  # fmt: skip
        for h in holders:
            ray.kill(h)
    ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="pipeline dir; empty builds the tiny one")
    p.add_argument("--family", default="flux_kontext", choices=["flux_kontext", "qwen_image_edit"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of the sampling comparison")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="actors for the weight-sync part (0 skips it)")
    p.add_argument("--sync-repeats", type=int, default=3)
    p.add_argument("--lora-rank", type=int, default=32)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.model:
        from motionnft_core.models.tiny import build_tiny

        args.model = str(build_tiny(args.family, scratch_dir("bench-tiny-") / args.family))
    policy = EditPolicy.from_pretrained(args.model, family=args.family, dtype=getattr(torch, args.dtype),
                                        device=args.device)  # fmt: skip
    src = generate_synthetic(scratch_dir("bench-data-"), max(args.prompts, 4), size=max(args.size, 32))
    ds = MotionEditDataset.from_source(str(src), resolution=(args.size, args.size), on_error="raise")
    print(f"rollout throughput, {machine()}", flush=True)
    bench_sampling(args, policy, [ds[i] for i in range(args.prompts)])
    if args.workers > 0:
        bench_weight_sync(args, policy)


if __name__ == "__main__":
    main()
