"""Training-step throughput: the overlapped driver loop vs a strictly sequential one, in the same run.

Both runs use the same config on the same embedded Ray cluster; the only difference is `rollout.max_staleness`:
1 lets rollouts for step t+1 run while the learner trains step t, 0 makes every step rollout -> reward -> train.
Step 0 (start-up, first loads) is excluded from the mean.

    python bench/step_throughput.py [--config configs/tiny_cpu.yaml] [--steps 6] [--rounds 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.scratch import scratch_dir  # noqa: E402
from bench.stats import machine, ratio_line  # noqa: E402
from motionnft_core.config_loader import load_config  # noqa: E402


def run(config: str, overrides: list[str], staleness: int, steps: int) -> tuple[float, float, float]:
    from learner.driver.loop import train

    tmp = scratch_dir(f"bench-staleness{staleness}-")
    fixed = [f"rollout.max_staleness={staleness}", f"learner.steps={steps}", "checkpoint.every=0",
             f"checkpoint.dir={tmp}/ckpt", f"logging.dir={tmp}/run"]  # fmt: skip
    cfg = load_config(config, [*overrides, *fixed])
    train(cfg)

    rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:-1]  # skip start-up and the final step (a checkpoint drain point)
    rate = sum(r["perf/samples_per_s"] for r in timed) / len(timed)
    stale = sum(r["staleness/mean"] for r in timed) / len(timed)
    train_s = sum(r["learner/train_s"] for r in timed) / len(timed)
    return rate, stale, train_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3, help="each round runs all three loops once: one ratio each")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides = args.overrides or ["reward.judge_weight=0", "reward.flow_weight=1", "nft.group_min_std=-1",
                                   "nft.group_max_mean=2"]  # fmt: skip
    print(f"step throughput, {machine()}", flush=True)
    rows: dict[str, list[tuple[float, float, float]]] = {"sequential": [], "overlapped": [], "shipped": []}
    for _ in range(args.rounds):
        rows["sequential"].append(run(args.config, overrides, 0, args.steps))
        rows["overlapped"].append(run(args.config, overrides, 1, args.steps))
        rows["shipped"].append(run(args.config, [*overrides, "nft.reference_forwards=rollout"], 1, args.steps))

    def median(name: str, i: int) -> float:
        return statistics.median(r[i] for r in rows[name])

    overlap = [o[0] / s[0] for o, s in zip(rows["overlapped"], rows["sequential"], strict=True)]
    refs = [o[2] / r[2] for o, r in zip(rows["overlapped"], rows["shipped"], strict=True)]
    print(
        f"step throughput: overlapped {median('overlapped', 0):.2f} samples/s (mean staleness "
        f"{median('overlapped', 1):.2f})  sequential {median('sequential', 0):.2f} samples/s (staleness "
        f"{median('sequential', 1):.2f})  {ratio_line(overlap)}"
    )
    print(
        f"learner step: v_old/v_ref from the rollouts {median('shipped', 2):.2f} s  computed by the learner "
        f"{median('overlapped', 2):.2f} s  {ratio_line(refs)}  (overlapped loop: {median('shipped', 0):.2f} samples/s)"
    )


if __name__ == "__main__":
    main()
