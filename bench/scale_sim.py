"""SCALE SIMULATION (a simulation, and labelled as one in every line it prints): the training loop at N GPUs on
this CPU machine, where no multi-GPU machine is lent.

What is real: the driver (`learner.driver.loop.train`), the pools and their actors, Ray's scheduling, the object store,
the learner group, the tiny models' outputs and gradients. What is simulated: each GPU is a custom Ray resource
`sim_gpu` (N of them; every rollout and reward actor asks for one; the learner group is one rank standing for
all its GPUs, see `simulate`), and each model call lasts the GPU duration it stands for (bench/sim_holds.py:
the tiny call runs, then waits out the rest). The durations per sample come from the training-step benchmark
measured on a GPU (bench/results/train_step.jsonl, the device named in every line), split into calls as
`CallCosts.from_record` documents. Not simulated: the
judge (the reward is the flow reward alone here; a judge GPU serves ~17 policy GPUs, bench/README.md), the learner's
gradient all-reduce between GPUs and the weight push over the network, both of which add to a real step.

It prints:
- the per-call costs it uses, and where they come from;
- for 8-64 GPUs, the pool sizes that balance rollout, reward and learner (the split with the highest predicted
  throughput of the overlapped loop), from the same costs: a prediction, not a measurement;
- for each simulated size, the overlapped loop (`rollout.max_staleness=1`) against the sequential one (0) in the
  same run, samples/s at GPU speed and `ratio`, against the prediction;
- the driver's own overhead: the driver process's CPU time per step (its Python loop and Ray's client threads)
  as a share of the step's wall time;
- the share of model calls whose real CPU time overran their hold (then the simulation runs slower than the GPUs).

    python bench/scale_sim.py                 # 8 simulated GPUs at the measured costs (~10 min here)
    python bench/scale_sim.py --gpus 16 --scale 1   # on 2 cores, 16 needs full-length holds (the tiny models'
                                                    # CPU time grows with P = 3 x GPUs)
    python bench/scale_sim.py --ci            # 4 simulated GPUs, short holds (a test runs it)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.scratch import scratch_dir  # noqa: E402
from bench.sim_holds import ENV, read_calls  # noqa: E402
from bench.stats import append_record, machine  # noqa: E402
from motionnft_core.config import NFTConfig  # noqa: E402
from motionnft_core.config_loader import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ROOT / "bench" / "results" / "train_step.jsonl"
RESULTS = ROOT / "bench" / "results" / "scale_sim.jsonl"
LABEL = "SIMULATION"
LOOPS = {0: "sequential", 1: "overlapped"}  # rollout.max_staleness -> the loop it makes


@dataclasses.dataclass(frozen=True)
class CallCosts:
    """GPU seconds per sample of each model call, and the loop's shape that turns them into per-role costs."""

    forward_s: float  # one transformer forward without gradient
    train_s: float  # one transformer forward + backward (LoRA)
    decode_s: float  # VAE decode, with the group's encode folded in
    flow_s: float  # one flow estimate (per pair)
    solver_steps: int
    timesteps: int  # trained per sample: int(nft.timestep_fraction * solver_steps)
    source: str

    @classmethod
    def from_record(cls, record: dict, layout: str = "ours+compile") -> CallCosts:
        """Split a train_step.jsonl line's per-phase seconds into calls. With S solver steps and T trained timesteps
        per sample, per sample: the reference layout's rollout is S forwards + decode, ours adds the 2T reference
        forwards (so forward = their difference / 2T, decode = the rest, both eager); `layout`'s rollout is S + 2T
        forwards + decode (decode is not compiled: forward = (rollout - decode) / (S + 2T)) and its learner T
        forward/backwards. The flow estimate is `layout`'s reward phase per sample."""
        layouts = record["layouts"]
        if "seconds" not in layouts.get(layout, {}):
            raise ValueError(f"{layout!r} was not measured in that run (layouts: {sorted(layouts)})")
        steps = record["solver_steps"]
        t = int(NFTConfig().timestep_fraction * steps)

        def per_sample(name: str, phase: str) -> float:
            return layouts[name]["phases"][phase]["seconds_per_sample"]

        eager_forward = (per_sample("ours", "rollout") - per_sample("reference", "rollout")) / (2 * t)
        decode = per_sample("reference", "rollout") - steps * eager_forward
        return cls(
            forward_s=(per_sample(layout, "rollout") - decode) / (steps + 2 * t),
            train_s=per_sample(layout, "learner") / t,
            decode_s=decode,
            flow_s=per_sample(layout, "reward"),
            solver_steps=steps,
            timesteps=t,
            source=f"{record['family']} {layout}, {record['device']}, {record['date'][:10]}",
        )

    def role_seconds(self) -> dict[str, float]:
        """GPU seconds per sample of each pool, reference forwards on the rollout (`nft.reference_forwards`)."""
        return {
            "rollout": (self.solver_steps + 2 * self.timesteps) * self.forward_s + self.decode_s,
            "reward": self.flow_s,
            "learner": self.timesteps * self.train_s,
        }

    def scaled(self, factor: float) -> dict[str, float]:
        return {k: getattr(self, k) * factor for k in ("forward_s", "train_s", "decode_s", "flow_s")}


@dataclasses.dataclass(frozen=True)
class Split:
    rollout: int
    reward: int
    learner: int

    @property
    def gpus(self) -> int:
        return self.rollout + self.reward + self.learner


def predicted_step_s(split: Split, costs: CallCosts, prompts: int, group: int, overlapped: bool) -> float:
    """A step's seconds from the per-role costs: a rollout worker samples whole groups, a reward worker scores
    whole groups, a learner rank trains its share of the samples. Sequential: rollout, then the last group's
    reward, then the learner. Overlapped (staleness 1): the next step's rollouts run while the learner trains."""
    role = costs.role_seconds()
    rollout = math.ceil(prompts / split.rollout) * group * role["rollout"]
    reward = max(math.ceil(prompts / split.reward) * group * role["reward"] - rollout, 0) + group * role["reward"]
    learner = math.ceil(prompts * group / split.learner) * role["learner"]
    return max(rollout + reward, learner) if overlapped else rollout + reward + learner


def balanced_split(gpus: int, costs: CallCosts, prompts: int, group: int) -> Split:
    """The split of `gpus` with the highest predicted overlapped throughput (ties: the larger learner)."""
    splits = [Split(r, w, gpus - r - w) for r, w in itertools.product(range(1, gpus), repeat=2) if r + w < gpus]
    return min(splits, key=lambda s: (predicted_step_s(s, costs, prompts, group, True), -s.learner))


# ------------------------------------------------------------------------------------------------ simulating


def simulate(split: Split, costs: CallCosts, *, scale: float, prompts: int, group: int, steps: int,
             staleness: int, workdir: Path) -> dict:  # fmt: skip
    """One training run of `steps` on the simulated GPUs (Ray must already be up: `simulated_cluster`). Times are
    at GPU speed: the holds run `scale` times the GPU durations, so measured seconds are divided by `scale`. The
    learner group is one rank standing for `split.learner` GPUs (data parallel: its forward/backward holds are
    divided by them), since on 2 cores the tiny model's FSDP collectives between several rank processes, not the
    holds, would set the learner's pace; the gradient all-reduce of real GPUs is not simulated."""
    import learner.driver.loop as loop

    run = workdir / f"run-{split.gpus}gpu-staleness{staleness}"
    sim_gpu, learner_gpus = "{sim_gpu: 1}", f"{{sim_gpu: {split.learner}}}"
    overrides = [
        f"rollout.group_size={group}", f"rollout.prompts_per_step={prompts}", f"rollout.micro_batch={group}",
        f"rollout.num_steps={costs.solver_steps}", "rollout.height=32", "rollout.width=32",
        f"rollout.max_staleness={staleness}", f"learner.steps={steps}", "learner.micro_batch=8",
        f"data.synthetic={max(2 * prompts, 8)}", "data.synthetic_size=32",
        "reward.judge_weight=0", "reward.flow_weight=1", "reward.flow.estimator=farneback",
        "nft.reference_forwards=rollout", "nft.group_min_std=-1", "nft.group_max_mean=2",
        f"cluster.rollout_workers={split.rollout}", f"cluster.reward_workers={split.reward}",
        "cluster.learner_ranks=1", "cluster.cpus_per_actor=0",
        f"cluster.rollout_resources={sim_gpu}", f"cluster.reward_resources={sim_gpu}",
        f"cluster.learner_resources={learner_gpus}", "checkpoint.every=0", f"checkpoint.dir={run}/ckpt",
        f"logging.dir={run}", "logging.tensorboard=false", "logging.image_every=0",
    ]  # fmt: skip
    cfg = load_config(str(ROOT / "configs" / "tiny_cpu.yaml"), overrides)

    marks: list[tuple[float, float]] = []  # (wall, driver CPU) when each step's metrics are written
    write = loop.MetricsLog.write

    def marked(self, step, metrics):
        marks.append((time.perf_counter(), time.process_time()))
        return write(self, step, metrics)

    loop.MetricsLog.write = marked
    try:
        loop.train(cfg)
    finally:
        loop.MetricsLog.write = write
    timed = range(1, len(marks) - 1)  # step 0 starts the pools; the last step drains
    wall = [marks[i][0] - marks[i - 1][0] for i in timed]
    cpu = [marks[i][1] - marks[i - 1][1] for i in timed]
    samples = prompts * group
    return {
        "staleness": staleness,
        "samples_per_s": samples / statistics.mean(wall) * scale,
        "step_s": statistics.mean(wall) / scale,
        "driver_overhead": sum(cpu) / sum(wall),
        "timed_steps": len(wall),
    }


@contextlib.contextmanager
def simulated_cluster(gpus: int, holds: dict) -> Iterator[None]:
    """The embedded Ray cluster with `gpus` simulated GPUs (resource `sim_gpu`), every worker process holding its
    model calls for `holds` (bench/sim_holds.py, installed by Ray's worker_process_setup_hook)."""
    import ray

    from learner.driver.local_cluster import start_local_ray

    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {ENV: json.dumps(holds), "PYTHONPATH": path}
    start_local_ray(None, resources={"sim_gpu": gpus},
                    runtime_env={"worker_process_setup_hook": "bench.sim_holds.install", "env_vars": env})
    try:
        yield
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measured", default=str(MEASURED), help="train_step.jsonl of a GPU run (its last line)")
    p.add_argument("--family", default="flux_kontext")
    p.add_argument("--layout", default="ours+compile")
    p.add_argument("--gpus", type=int, nargs="*", default=[8], help="simulated sizes (balanced splits)")
    p.add_argument("--table", type=int, nargs="*", default=[8, 16, 32, 64], help="sizes of the predicted table")
    p.add_argument("--prompts-per-gpu", type=int, default=3,
                   help="P = this x GPUs groups per step (3 at 8 GPUs: configs/flux_kontext.yaml's P=24)")
    p.add_argument("--prompts", type=int, default=0, help="P groups per step at every size (0: --prompts-per-gpu)")
    p.add_argument("--group", type=int, default=8, help="K candidates per group")
    p.add_argument("--steps", type=int, default=5, help="training steps per simulated run (2 are not timed)")
    p.add_argument("--scale", type=float, default=0.5,
                   help="holds at this fraction of the GPU durations (at 0.25, 2 cores set the pace)")
    p.add_argument("--staleness", type=int, nargs="*", default=[0, 1], choices=(0, 1),
                   help="the loops: 0 sequential, 1 overlapped (both: their ratio)")
    p.add_argument("--ci", action="store_true", help="3 GPUs, P=2, K=2, 3 steps, holds x0.5, the overlapped loop")
    p.add_argument("--results", default=str(RESULTS), help="JSON-lines file to append the run to")
    args = p.parse_args(argv)
    if args.ci:
        args.gpus, args.table, args.prompts, args.group, args.steps, args.scale = [3], [8], 2, 2, 3, 0.5
        args.staleness = [1]

    records = [json.loads(x) for x in Path(args.measured).read_text().splitlines() if x.strip()]
    measured = [r for r in records if r["family"] == args.family and r["size"] == "full"]
    if not measured:
        raise SystemExit(f"{args.measured}: no full-size {args.family} run (run bench/gpu_train_step.sh)")
    costs = CallCosts.from_record(measured[-1], args.layout)
    role = costs.role_seconds()
    k = args.group

    def prompts(gpus: int) -> int:
        return args.prompts or args.prompts_per_gpu * gpus

    print(f"{LABEL}: per-call GPU seconds per sample from {costs.source}: forward {costs.forward_s:.4f}, "
          f"forward+backward {costs.train_s:.4f}, decode {costs.decode_s:.4f}, flow {costs.flow_s:.4f}; per sample: "
          f"rollout {role['rollout']:.3f}, reward {role['reward']:.4f}, learner {role['learner']:.3f}; K={k}, "
          f"P={args.prompts or f'{args.prompts_per_gpu} x GPUs'}; the judge not included", flush=True)  # fmt: skip

    record: dict = {"bench": "scale_sim", "simulation": True, "machine": machine(),
                    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "costs": dataclasses.asdict(costs), "group": k, "scale": args.scale, "predicted": [],
                    "simulated": []}  # fmt: skip
    for n in args.table:
        s = balanced_split(n, costs, prompts(n), k)
        over, seq = (prompts(n) * k / predicted_step_s(s, costs, prompts(n), k, o) for o in (True, False))
        record["predicted"].append({"gpus": n, "prompts": prompts(n), **dataclasses.asdict(s),
                                    "overlapped_samples_per_s": over, "sequential_samples_per_s": seq})  # fmt: skip
        print(f"{LABEL} predicted, {n} GPUs, P={prompts(n)}: rollout {s.rollout}, reward {s.reward}, learner "
              f"{s.learner} -> overlapped {over:.2f} samples/s ({over / n:.3f} per GPU), sequential {seq:.2f}  "
              f"ratio {over / seq:.2f}", flush=True)  # fmt: skip

    workdir = scratch_dir("scale-sim-")
    (workdir / "calls").mkdir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for n in args.gpus:
        split, p_n = balanced_split(n, costs, prompts(n), k), prompts(n)
        holds = {**costs.scaled(args.scale), "log_dir": str(workdir / "calls")}
        holds["train_s"] /= split.learner  # one learner rank stands for split.learner GPUs
        with simulated_cluster(n, holds):
            runs = {st: simulate(split, costs, scale=args.scale, prompts=p_n, group=k, steps=args.steps,
                                 staleness=st, workdir=workdir) for st in args.staleness}  # fmt: skip
        predicted = p_n * k / predicted_step_s(split, costs, p_n, k, True)
        calls = read_calls(workdir / "calls", clear=True)  # this size's calls, every loop
        overran = sum(c["real"] > c["hold"] for c in calls) / max(len(calls), 1)
        loops = {LOOPS[st]: run for st, run in runs.items()}
        record["simulated"].append({"gpus": n, "prompts": p_n, **dataclasses.asdict(split), **loops,
                                    "predicted_overlapped_samples_per_s": predicted, "calls": len(calls),
                                    "calls_overran": overran})  # fmt: skip
        shown = ", ".join(f"{name} {run['samples_per_s']:.2f} samples/s (driver overhead "
                          f"{100 * run['driver_overhead']:.1f} % of a step)" for name, run in loops.items())
        if len(loops) == 2:
            ratio = loops["overlapped"]["samples_per_s"] / loops["sequential"]["samples_per_s"]
            record["simulated"][-1]["ratio"] = ratio
            shown += f"  ratio {ratio:.2f}"
        print(f"{LABEL}, {n} simulated GPUs, P={p_n} (rollout {split.rollout}, reward {split.reward}, learner "
              f"{split.learner}), at GPU speed: {shown}; predicted overlapped {predicted:.2f} samples/s; "
              f"{100 * overran:.1f} % of {len(calls)} model calls overran their hold", flush=True)  # fmt: skip
    append_record(args.results, record)
    return record


if __name__ == "__main__":
    main()
