"""Curation throughput of stages a and b (decode, shots, clips, hashes, near-duplicates; flow and camera vs object
motion) on Ray Data, CPU only: videos/s and pairs/s per CPU core, and the gain from one to two Ray Data workers
(decoding tasks and flow actors), measured in one run: `ratio` = time with 1 worker / time with 2, each timed from
its first row out to its last. Each task and
actor asks for half a CPU, so two of each fit the 2-CPU cluster (asking for more than the cluster holds stalls
Ray Data's actor pool behind the tasks).

`python bench/curation.py [--side 128] [--fps 24] [--videos 12] [--seconds 12] [--results FILE]`: generated H.264
videos (two squares moving over a texture, curation/samples.py), DIS flow, an embedded cluster of 2 CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from curation.config import load_curate_config  # noqa: E402
from curation.pipeline import build_dataset  # noqa: E402
from curation.samples import _objects, write_video  # noqa: E402
from curation.video import list_videos, video_key  # noqa: E402


def run(videos_dir: Path, side: int, workers: int) -> tuple[float, int]:
    """(seconds, pairs) of stages a-b over every video with `workers` decoding tasks and flow actors, from the first
    row out to the last (the actors' start-up, imports and model build, is not throughput)."""
    cfg = load_curate_config(None, [
        f"input.videos={videos_dir}", "judge.scripted=x:y", f"clips.height={side}", f"clips.width={side}",
        "input.min_side=16", "flow.estimator=dis", "flow.gpus=0", "flow.cpus=0.5", "flow.batch_size=4",
        f"flow.workers={workers}", f"cluster.decode_workers={workers}", "cluster.decode_cpus=0.5",
    ])  # fmt: skip
    items = [{"video": v, "video_key": video_key(v, cfg.input.videos)} for v in list_videos(cfg.input)]
    began, pairs = None, 0
    for row in build_dataset(cfg, items, [], None, judge=False).iter_rows():
        began = began or time.perf_counter()
        pairs += row["kind"] == "pair"
    return time.perf_counter() - began, pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=128, help="video and output side in pixels")
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each video (clips of 3 s)")
    parser.add_argument("--results", default="", help="append one JSON line here")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="curation-bench-") as tmp:
        for i in range(args.videos):
            write_video(Path(tmp) / f"v{i:03d}.mp4", _objects(args.side, args.fps, args.seconds, seed=i), args.fps)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            run(Path(tmp), args.side, 1)  # warm-up: imports, actor start-up paths
            t1, pairs = run(Path(tmp), args.side, 1)
            t2, _ = run(Path(tmp), args.side, 2)
        finally:
            ray.shutdown()
    record = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "side": args.side, "fps": args.fps, "videos": args.videos, "seconds": args.seconds, "pairs": pairs,
        "one_worker_s": round(t1, 2), "two_workers_s": round(t2, 2), "ratio": round(t1 / t2, 2),
        "videos_per_s_per_core_1": round(args.videos / t1 / 2, 3), "pairs_per_s_per_core_1": round(pairs / t1 / 2, 3),
        "videos_per_s_per_core_2": round(args.videos / t2 / 2, 3), "pairs_per_s_per_core_2": round(pairs / t2 / 2, 3),
    }  # fmt: skip
    print(f"stages a-b at {args.side}x{args.side}, {args.fps} fps, {args.videos} videos of {args.seconds:g} s "
          f"({pairs} pairs), DIS flow: 1 worker {t1:.2f} s, 2 workers {t2:.2f} s, ratio {record['ratio']:.2f}; "
          f"per core (2 cores): {record['videos_per_s_per_core_2']} videos/s, {record['pairs_per_s_per_core_2']} "
          "pairs/s with 2 workers")  # fmt: skip
    print(json.dumps(record))
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
