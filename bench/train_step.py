"""The training step on one GPU, phase by phase, without Ray: the eager reference layout against ours, in one run.

One transformer serves both sides, as colocated pools would: the rollout samples with the learner's old adapter
(`NFTTrainer.old_policy`), P groups x K candidates with DPM-Solver++(2M) and VAE decode; the flow reward scores
them with RAFT-large (random weights, <= `reward.flow.max_batch` pairs per call); the learner takes one NFT step
(LoRA r=32, docs/algorithm.md). Two layouts run on the same models:

- reference: the published code's layout, eager: v_old and v_ref computed by the learner (`nft.reference_forwards:
  learner`), nothing compiled;
- ours: v_old and v_ref computed by the rollout (`nft.reference_forwards: rollout`);
- ours+compile (with `--compile`): ours with the transformer blocks regionally compiled (`rollout.compile`,
  `learner.compile`);
- ...+fp8 (with `--fp8`, last): the rollout's sampling and reference forwards in FP8 (`rollout.fp8`,
  `rollout.fp8_reference`, motionnft_core/models/fp8.py), compiled too with `--compile`. The float8 weight copies are
  made at the start (unused before this layout), so every layout's peak memory and the micro-batch probe include them.

A solver step is timed against a forward (`policy.velocity`) at the rollout's micro-batch, compiled with
`--compile` (target: at most 1.1x). With `--fp8`, FP8's effect on what the loss sees: the same groups (same seeds)
sampled in full precision and in FP8, their flow rewards compared with the spread inside a group, and the reference
velocities' relative error at the same candidates (random weights: the size of the error, not of a trained model's).

Each layout first runs untimed (warm-up; the true FLOPs of one group are counted then with
`torch.utils.flop_counter`, eagerly; the compiled layout warms up on the timed shapes), then P groups timed.
Printed per layout and phase: seconds, TFLOP/s, the share of time outside model calls (transformer, VAE, text
encoders, RAFT, backward: timed with synchronisation), peak GPU memory; then samples/s per GPU of each layout and
`ratio` against the reference layout. One JSON line per run is appended to
`--results`, with the device named.

    python bench/train_step.py --size full --device cuda --compile     # the GPU run (bench/gpu_train_step.sh)
    python bench/train_step.py --size tiny                              # the CPU smoke run (tests/system/test_bench.py)

Full size builds random weights from the real configs (motionnft_core/models/full_size.py); the text encoders are
1-layer stand-ins at their real widths unless `--full-text-encoders` (the conditioning is encoded once per group).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.sampler import ReferenceForwards, Sampler  # noqa: E402
from bench.scratch import scratch_dir  # noqa: E402
from bench.stats import append_record  # noqa: E402
from learner.trainer.memory import CudaMemory  # noqa: E402
from learner.trainer.nft_loss import optimality  # noqa: E402
from learner.trainer.nft_trainer import NFTTrainer, rank_share, train_sample  # noqa: E402
from motionnft_core.config import (  # noqa: E402
    FAMILIES,
    FlowRewardConfig,
    LearnerConfig,
    ModelConfig,
    NFTConfig,
    RolloutConfig,
)
from motionnft_core.data.motionedit import MotionExample  # noqa: E402
from motionnft_core.data.synthetic import make_example  # noqa: E402
from motionnft_core.models import fp8  # noqa: E402
from motionnft_core.models.families import policy_class  # noqa: E402
from motionnft_core.models.policy import EditPolicy, load_policy  # noqa: E402
from rewards.flow_scorer import FlowItem, FlowRewardScorer, build_flow_scorer  # noqa: E402

PHASES = ("rollout", "reward", "learner")
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "train_step.jsonl"


# ------------------------------------------------------------------------------------------------ measuring


class Clock:
    """Wall time per phase, and inside it the time spent in model calls (each call synchronised on the GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.model_seconds: dict[str, float] = defaultdict(float)
        self.peak_bytes: dict[str, int] = {}
        self._phase: str | None = None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._phase, t0 = name, time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] += time.perf_counter() - t0
            self._phase = None
            if self.cuda:
                self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), torch.cuda.max_memory_allocated())

    def timed(self, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            if self._phase is None:
                return fn(*args, **kwargs)
            self.sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.model_seconds[self._phase] += time.perf_counter() - t0

        return call

    @contextlib.contextmanager
    def watching(self, policy: EditPolicy, scorer: FlowRewardScorer) -> Iterator[None]:
        """Model calls are the policy's encode / velocity / decode, the flow estimator and every backward."""
        backward = torch.Tensor.backward
        for name in ("encode", "velocity", "decode"):
            setattr(policy, name, self.timed(getattr(policy, name)))
        estimator, scorer.estimator = scorer.estimator, self.timed(scorer.estimator)
        torch.Tensor.backward = self.timed(backward)
        try:
            yield
        finally:
            torch.Tensor.backward = backward
            scorer.estimator = estimator
            for name in ("encode", "velocity", "decode"):
                delattr(policy, name)  # the class's methods again


def attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The two matrix products of attention, with grouped key/value heads counted at the query's heads (torch 2.11's
    own formula rejects grouped heads, which Qwen2.5-VL's text encoder uses)."""
    b, heads, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * heads * s_q * s_k * (d_q + d_v)


ATTENTION_OPS = (torch.ops.aten._scaled_dot_product_efficient_attention,
                 torch.ops.aten._scaled_dot_product_flash_attention,
                 torch.ops.aten._scaled_dot_product_cudnn_attention)  # fmt: skip


@contextlib.contextmanager
def counting(flops: dict[str, float], name: str, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    with FlopCounterMode(display=False, custom_mapping=dict.fromkeys(ATTENTION_OPS, attention_flops)) as counter:
        yield
    flops[name] = flops.get(name, 0.0) + float(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------ one step


@dataclasses.dataclass
class Layout:
    name: str
    rollout: RolloutConfig
    reference: ReferenceForwards | None  # v_old / v_ref on the rollout (ours) or on the learner (None)


def one_step(layout: Layout, trainer: NFTTrainer, scorer: FlowRewardScorer, prompts: list, step: int,
             clock: Clock | None, flops: dict[str, float] | None) -> dict[str, float]:  # fmt: skip
    """Rollout -> flow reward -> group statistics -> NFT step, as the driver runs them (docs/architecture.md)."""
    phase = clock.phase if clock is not None else (lambda _: contextlib.nullcontext())
    count = flops is not None
    flops = flops if flops is not None else {}
    with phase("rollout"), counting(flops, "rollout", count), trainer.old_policy() as policy:
        pairs = Sampler(policy, layout.rollout, layout.reference).sample(prompts, step, version=step)
    with phase("reward"), counting(flops, "reward", count):
        rewards = score(scorer, prompts, pairs)
    r = optimality(rewards, clip=trainer.nft.adv_clip_max)
    samples = [train_sample(group, k, float(r[g, k])) for g, (group, _) in enumerate(pairs)
               for k in range(group.x0.shape[0])]  # fmt: skip
    with phase("learner"), counting(flops, "learner", count):
        metrics = trainer.train_step(rank_share(samples, 1, 0, trainer.learner.micro_batch), len(samples), step)
    return metrics


def score(scorer: FlowRewardScorer, prompts: list, pairs: list) -> torch.Tensor:
    """Flow rewards (P, K), float64. Images reach the reward worker through the object store, so on the CPU."""
    items = [FlowItem(p.id, p.input_image, p.target_image, images.cpu()) for p, (_, images) in
             zip(prompts, pairs, strict=True)]  # fmt: skip
    return torch.stack([s["reward"].double() for s in scorer.score(items)])


def solver_step_vs_forward(policy: EditPolicy, sampler: Sampler, prompt, rows: int, clock: Clock,
                           repeats: int = 3) -> dict[str, float]:  # fmt: skip
    """Seconds of one solver step (`Sampler.solve` over the grid, per step) and of one forward (`policy.velocity`)
    at `rows` candidates; the best of `repeats` each (warm: the layouts before compiled both)."""
    c = sampler.cfg
    cond = policy.encode([prompt.prompt], prompt.input_image[None]).repeat_interleave(rows)
    sigmas = policy.sigmas(c.num_steps, c.height, c.width)
    x = policy.prepare_latents(rows, c.height, c.width, [torch.Generator().manual_seed(i) for i in range(rows)])
    sigma = sigmas[:1].expand(rows).to(x.device)

    def best(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(repeats):
            clock.sync()
            t0 = time.perf_counter()
            fn()
            clock.sync()
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.no_grad():
        forward_s = best(lambda: policy.velocity(x, sigma, cond))
        step_s = best(lambda: sampler.solve(x, cond, sigmas)) / c.num_steps
    return {"rows": rows, "forward_s": forward_s, "solver_step_s": step_s, "step_over_forward": step_s / forward_s}


def fp8_effect(trainer: NFTTrainer, scorer: FlowRewardScorer, prompts: list, rollout: RolloutConfig,
               reference: ReferenceForwards, step: int) -> dict[str, float]:  # fmt: skip
    """The same groups sampled three ways: full precision; FP8 reference forwards only (the same candidates, so
    v_old / v_ref compare point by point); FP8 sampling (the candidates move; their rewards compare)."""
    plain_cfg = dataclasses.replace(rollout, fp8=False, fp8_reference=False)
    with trainer.old_policy() as policy:
        plain, refs8, sampled8 = (
            Sampler(policy, cfg, reference).sample(prompts, step, version=step)
            for cfg in (plain_cfg, dataclasses.replace(plain_cfg, fp8_reference=True),
                        dataclasses.replace(plain_cfg, fp8=True))
        )  # fmt: skip
    r_plain, r8 = score(scorer, prompts, plain), score(scorer, prompts, sampled8)

    def rel(key: str, a: list, b: list) -> float:
        x = torch.cat([g.reference[key] if key != "x0" else g.x0 for g, _ in a]).float()
        y = torch.cat([g.reference[key] if key != "x0" else g.x0 for g, _ in b]).float()
        return ((y - x).norm() / x.norm()).item()

    return {
        "reward_mean": r_plain.mean().item(), "reward_mean_fp8": r8.mean().item(),
        "reward_abs_diff": (r8 - r_plain).abs().mean().item(),
        "reward_group_std": r_plain.std(dim=1).mean().item(),  # the spread the advantages are made of
        "x0_rel_err": rel("x0", plain, sampled8),
        "v_old_rel_err": rel("v_old", plain, refs8), "v_ref_rel_err": rel("v_ref", plain, refs8),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ set-up


def build_policy(args, model: ModelConfig, device: torch.device) -> EditPolicy:
    if args.size == "tiny":
        from motionnft_core.models.tiny import build_tiny

        path = build_tiny(args.family, scratch_dir("bench-tiny-") / args.family)
        return load_policy(model, str(path), use_gpu=device.type == "cuda")
    from motionnft_core.models.full_size import build_full_size

    pipe = build_full_size(args.family, device=device, dtype=getattr(torch, model.dtype),
                           text_layers=None if args.full_text_encoders else 1)  # fmt: skip
    return EditPolicy.from_pipe(pipe, **policy_class(args.family).policy_kwargs(model))


def synthetic_prompts(n: int, size: int) -> list[MotionExample]:
    def chw(array) -> torch.Tensor:
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    out = []
    for i in range(n):
        ex = make_example(0, i, size)
        out.append(MotionExample(ex.id, ex.prompt, chw(ex.input_image), chw(ex.target_image), ex.category))
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"CPU {platform.machine()} x{os.cpu_count()}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("full", "tiny"), default="tiny")
    p.add_argument("--family", choices=FAMILIES, default="flux_kontext")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompts", type=int, default=0, help="P groups timed (0: 1 full size, 2 tiny)")
    p.add_argument("--group", type=int, default=0, help="K candidates per group (0: 8 full size, 2 tiny)")
    p.add_argument("--resolution", type=int, default=0, help="edit size in px (0: 512 full size, 32 tiny)")
    p.add_argument("--steps", type=int, default=6, help="solver steps")
    p.add_argument("--rollout-micro-batch", type=int, default=8)
    p.add_argument("--learner-micro-batch", type=int, default=0,
                   help="0: from the GPU's free memory (probed, learner/trainer/memory.py), 2 on a CPU")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="ours: regional compilation of rollout and learner")
    p.add_argument("--fp8", action="store_true", help="a last layout with FP8 rollout and reference forwards")
    p.add_argument("--full-text-encoders", action="store_true", help="real text encoders instead of 1-layer ones")
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="JSON-lines file to append the run to")
    args = p.parse_args(argv)
    full = args.size == "full"
    prompts_n, k = args.prompts or (1 if full else 2), args.group or (8 if full else 2)
    size = args.resolution or (512 if full else 32)
    device = torch.device(args.device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    # 1. Config sections: the published defaults (LoRA r=32, AdamW, timestep fraction, ...) at the benchmark's sizes.
    model = ModelConfig(family=args.family, dtype="bfloat16" if full else "float32")
    rollout = RolloutConfig(group_size=k, prompts_per_step=prompts_n, num_steps=args.steps, height=size, width=size,
                            micro_batch=args.rollout_micro_batch)  # fmt: skip
    nft = NFTConfig() if full else NFTConfig(lora_rank=4, lora_alpha=8)
    learner = LearnerConfig(micro_batch=args.learner_micro_batch or (0 if device.type == "cuda" else 2))
    flow = FlowRewardConfig(estimator="raft_large" if full else "raft_small")

    # 2. Models: one transformer for rollout and learner, a world-1 process group for FSDP2.
    t0 = time.perf_counter()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                            init_method=f"file://{scratch_dir('bench-dist-')}/store")  # fmt: skip
    policy = build_policy(args, model, device)
    trainer = NFTTrainer(policy, nft, learner, mixed_precision=device.type == "cuda" and model.dtype != "float32")
    scorer = build_flow_scorer(flow, device=device.type, cache_dir=scratch_dir("bench-flow-"))
    prompts = synthetic_prompts(prompts_n, size)
    print(f"built {args.size} {args.family} on {device_name(device)} in {time.perf_counter() - t0:.0f} s", flush=True)
    fp8_copies = 0
    if args.fp8:  # the float8 copies exist from here on (off until the FP8 layout), so the memory probe counts them
        layers = trainer.policy.use_fp8()
        fp8_copies = sum(m.weight_fp8.nbytes for m in fp8.fp8_layers(trainer.policy.transformer))
        print(f"FP8 copies of {layers} linear layers: {fp8_copies / 2**30:.1f} GiB", flush=True)

    # 3. The learner's micro-batch from the GPU's free memory, as `learner.micro_batch: 0` does
    # (learner/trainer/memory.py):
    #    probed on 2 candidates of one group, with the reference layout's learner (v_old / v_ref on it).
    if learner.micro_batch == 0:
        with trainer.old_policy() as policy:
            (group, _), = Sampler(policy, dataclasses.replace(rollout, group_size=2)).sample(prompts[:1], 0, version=0)
        samples = [train_sample(group, i, 0.5) for i in range(2)]
        chosen = trainer.fit_micro_batch(samples, prompts_n * k, 0, CudaMemory(device))
        probe = trainer.memory_probe
        print(f"learner micro-batch {chosen} (peaks {probe['peak_1'] / 2**30:.1f} / {probe['peak_2'] / 2**30:.1f} GiB "
              "at 1 / 2)", flush=True)  # fmt: skip

    # 4. The layouts: each warmed up on the timed run's shapes (FLOPs counted then, eagerly), then timed.
    refs_on_rollout = ReferenceForwards(seed=learner.seed, fraction=nft.timestep_fraction)
    layouts = [Layout("reference", rollout, None), Layout("ours", rollout, refs_on_rollout)]
    if args.compile:  # compiling is for good (the shared transformer's blocks, rollout and learner alike)
        layouts.append(Layout("ours+compile", dataclasses.replace(rollout, compile=True), refs_on_rollout))
    if args.fp8:  # last: the FP8 copies stay (off outside the rollout's forwards)
        last = layouts[-1]
        layouts.append(Layout(f"{last.name}+fp8", dataclasses.replace(last.rollout, fp8=True, fp8_reference=True),
                              refs_on_rollout))  # fmt: skip
    record = {
        "bench": "train_step", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device_name(device), "torch": torch.__version__, "family": args.family, "size": args.size,
        "resolution": size, "prompts": prompts_n, "group": k, "solver_steps": args.steps,
        "rollout_micro_batch": rollout.micro_batch, "learner_micro_batch": trainer.learner.micro_batch,
        "compile": args.compile, "fp8": args.fp8, "fp8_copies_gib": fp8_copies / 2**30,
        "text_encoders": "full" if args.full_text_encoders or not full else "1-layer stand-ins",
        "lora_rank": nft.lora_rank, "flow_estimator": flow.estimator, "layouts": {},
    }  # fmt: skip
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)  # the partial record below goes there too
    partial = results.with_suffix(".partial.json")  # what a run killed at its time limit still leaves
    report: dict[str, dict] = record["layouts"]
    step = 1
    for layout in layouts:
        flops: dict[str, float] = {}
        t_warm = time.perf_counter()
        optional = layout.name not in ("reference", "ours")
        try:
            if optional:  # a new batch size would recompile inside the timed run: all groups
                flops = dict(report["ours"]["flops_per_group"])  # the same arithmetic as ours, eager
                one_step(layout, trainer, scorer, prompts, step, None, None)
            else:
                one_step(layout, trainer, scorer, prompts[:1], step, None, flops)  # one group: its FLOPs
            step += 1
            print(f"{layout.name}: warmed up in {time.perf_counter() - t_warm:.0f} s", flush=True)
            clock = Clock(device)
            with clock.watching(trainer.policy, scorer):
                metrics = one_step(layout, trainer, scorer, prompts, step, clock, None)
            step += 1
        except Exception as e:  # noqa: BLE001 - only the optional layouts may fail; it is reported
            if not optional:
                raise
            print(f"{layout.name}: failed ({e!r}); reported without it", flush=True)
            report[layout.name] = {"error": repr(e)[:2000]}
            continue
        report[layout.name] = summarize(clock, flops, prompts_n, k, metrics)
        print_layout(layout.name, report[layout.name])
        partial.write_text(json.dumps(record, indent=1))

    # 5. The compiled solver step against a compiled forward; FP8's effect on rewards and reference velocities.
    timed = layouts[2] if "samples_per_s" in report.get("ours+compile", {}) else layouts[1]
    extras = [("solver_step", lambda: step_vs_forward(trainer, timed, prompts[0], device))]
    if args.fp8:
        extras.append(("fp8_effect", lambda: fp8_effect(trainer, scorer, prompts, layouts[-1].rollout,
                                                        refs_on_rollout, step)))  # fmt: skip
    for key, measure in extras:
        try:
            record[key] = measure()
        except Exception as e:  # noqa: BLE001 - reported, the layouts' figures stand
            record[key] = {"error": repr(e)[:2000]}
        print(f"{key}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in record[key].items()), flush=True)  # fmt: skip
        partial.write_text(json.dumps(record, indent=1))

    measured = {name: r for name, r in report.items() if "samples_per_s" in r}
    base = measured["reference"]["samples_per_s"]
    for name in measured:
        if name != "reference":
            rate = measured[name]["samples_per_s"]
            print(f"train step {args.family} {size}px P={prompts_n} K={k}: {name} {rate:.3f} samples/s, eager "
                  f"reference layout {base:.3f} samples/s  ratio {rate / base:.2f}  ({device_name(device)})",
                  flush=True)  # fmt: skip
    record["ratio"] = max(measured[name]["samples_per_s"] for name in measured if name != "reference") / base
    append_record(results, record)
    partial.unlink(missing_ok=True)
    dist.destroy_process_group()
    return record


def step_vs_forward(trainer: NFTTrainer, layout: Layout, prompt, device: torch.device) -> dict[str, float]:
    with trainer.old_policy() as policy:
        sampler = Sampler(policy, layout.rollout)
        rows = min(layout.rollout.micro_batch, layout.rollout.prompts_per_step * layout.rollout.group_size)
        return {"layout": layout.name, **solver_step_vs_forward(policy, sampler, prompt, rows, Clock(device))}


def summarize(clock: Clock, flops_one_group: dict[str, float], groups: int, k: int, metrics: dict) -> dict:
    phases = {}
    for name in PHASES:
        seconds = clock.seconds[name]
        flops = flops_one_group.get(name, 0.0) * groups  # FLOPs scale with the groups (same sizes)
        phases[name] = {
            "seconds": seconds,
            "seconds_per_sample": seconds / (groups * k),
            "tflops_per_s": flops / seconds / 1e12 if seconds > 0 else 0.0,
            "outside_model_share": 1.0 - clock.model_seconds[name] / seconds if seconds > 0 else 0.0,
            "peak_gib": clock.peak_bytes.get(name, 0) / 2**30,
        }
    total = sum(p["seconds"] for p in phases.values())
    model = sum(clock.model_seconds[name] for name in PHASES)
    return {"phases": phases, "seconds": total, "samples_per_s": groups * k / total,
            "outside_model_share": 1.0 - model / total, "loss": metrics["loss"],
            "flops_per_group": flops_one_group}  # fmt: skip


def print_layout(name: str, r: dict) -> None:
    for phase, p in r["phases"].items():
        print(f"{name:>9} {phase:<8} {p['seconds']:8.2f} s  {p['seconds_per_sample']:7.3f} s/sample  "
              f"{p['tflops_per_s']:7.1f} TFLOP/s  outside model calls {100 * p['outside_model_share']:5.1f} %  "
              f"peak {p['peak_gib']:6.1f} GiB", flush=True)  # fmt: skip
    print(f"{name:>9} total    {r['seconds']:8.2f} s  {r['samples_per_s']:.3f} samples/s  outside model calls "
          f"{100 * r['outside_model_share']:.1f} %", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
