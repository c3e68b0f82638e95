"""The curation's flow stage as a plain class on one GPU, no Ray (curation/stage_flow.py: FlowStage): pairs/s of
RAFT flow plus the camera vs object split at a stated resolution and batch, for sizing `flow.workers`,
`flow.batch_size` and `flow.max_batch` on a GPU cluster.

`python bench/curation_flow_gpu.py OUTPUT_DIR [--side 512] [--batch 16] [--pairs 128] [--estimator raft_large]
[--weights FILE]`: writes OUTPUT_DIR/curation_flow.jsonl (one JSON line) and prints it. Without --weights RAFT has
random weights: the speed is the same, the flows mean nothing. On a machine without CUDA it runs on the CPU (a
smoke run, not a figure).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from curation.config import load_curate_config  # noqa: E402
from curation.samples import texture  # noqa: E402
from curation.stage_flow import FlowStage  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output dir for curation_flow.jsonl")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16, help="pairs per call (flow.max_batch)")
    parser.add_argument("--pairs", type=int, default=128, help="pairs timed (after one warm-up batch)")
    parser.add_argument("--estimator", default="raft_large", help="raft_large | raft_small | dis | farneback")
    parser.add_argument("--updates", type=int, default=12, help="RAFT refinement iterations")
    parser.add_argument("--weights", default="", help="RAFT weights file (default: random weights)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    cfg = load_curate_config(None, [
        "input.videos=/unused", "judge.scripted=x:y", f"flow.estimator={args.estimator}",
        f"flow.weights={args.weights}", f"flow.num_updates={args.updates}", f"flow.max_batch={args.batch}",
        f"flow.gpus={1 if cuda else 0}",
    ])  # fmt: skip
    stage = FlowStage(cfg)
    src = np.stack([texture(args.side, args.side, i) for i in range(args.batch)])
    dst = np.roll(src, (3, 5), axis=(1, 2))
    stage.measure(src, dst)  # warm-up: cuDNN autotuning, allocations
    if cuda:
        torch.cuda.synchronize()
    calls = max(1, args.pairs // args.batch)
    began = time.perf_counter()
    for _ in range(calls):
        measures = stage.measure(src, dst)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    device = torch.cuda.get_device_name() if cuda else f"CPU {platform.machine()}"
    pairs = calls * args.batch
    record = {
        "date": time.strftime("%Y-%m-%d"), "device": device,
        "estimator": args.estimator, "updates": args.updates, "side": args.side, "batch": args.batch,
        "pairs": pairs, "seconds": round(seconds, 3), "pairs_per_s": round(pairs / seconds, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "camera_share_mean": float(np.mean(measures["camera_share"])),
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "curation_flow.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
