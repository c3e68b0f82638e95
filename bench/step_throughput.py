"""Training-step throughput: the overlapped driver loop vs a strictly sequential one, in the same run.

Both runs use the same config on the same embedded Ray cluster; the only difference is `rollout.max_staleness`:
1 lets rollouts for step t+1 run while the learner trains step t, 0 makes every step rollout -> reward -> train.
Step 0 (start-up, first loads) is excluded from the mean.

    python bench/step_throughput.py [--config configs/tiny_cpu.yaml] [--steps 6] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import load_config  # noqa: E402


def run(config: str, overrides: list[str], staleness: int, steps: int) -> tuple[float, float, float]:
    from learner.loop import train

    tmp = tempfile.mkdtemp(prefix=f"bench-staleness{staleness}-")
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
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides = args.overrides or ["reward.judge_weight=0", "reward.flow_weight=1", "nft.group_min_std=-1",
                                   "nft.group_max_mean=2"]  # fmt: skip
    sequential, s0, _ = run(args.config, overrides, 0, args.steps)
    overlapped, s1, learner_refs = run(args.config, overrides, 1, args.steps)
    shipped, _, rollout_refs = run(args.config, [*overrides, "nft.reference_forwards=rollout"], 1, args.steps)
    print(
        f"step throughput: overlapped {overlapped:.2f} samples/s (mean staleness {s1:.2f})  "
        f"sequential {sequential:.2f} samples/s (staleness {s0:.2f})  ratio {overlapped / sequential:.2f}"
    )
    print(
        f"learner step: v_old/v_ref from the rollouts {rollout_refs:.2f} s  computed by the learner "
        f"{learner_refs:.2f} s  ratio {learner_refs / rollout_refs:.2f}  (overlapped loop: {shipped:.2f} samples/s)"
    )


if __name__ == "__main__":
    main()
