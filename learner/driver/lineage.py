"""Per-sample lineage: one parquet file per step under <logging.dir>/lineage, a row per trained-on candidate
(prompt id, candidate index and seed, policy version, rollout worker, image digest, reward and its terms, the
judge's digit probabilities, optimality, group validity), so any candidate can be traced and replayed.

A step's file is written whole (temp file, then rename): a redone step replaces it, and a resume deletes the
files of the steps it will redo, so each step appears once, as in metrics.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


class Lineage:
    def __init__(self, run_dir: Path, *, resume_at: int = 0) -> None:
        self.dir = Path(run_dir) / "lineage"
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob("step_*.parquet"):
            if int(old.stem.removeprefix("step_")) >= resume_at:
                old.unlink()

    def path(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}.parquet"

    def write(self, step: int, prompt_ids: list[str], meta: list[dict], rewards: list[Any], r, valid) -> Path:
        """One row per candidate of the scored groups; `r` (P, K) optimality and `valid` (P,) from group_stats."""
        rows: dict[str, list] = {key: [] for key in ("step", "prompt_id", "k", "seed", "version", "worker",
                                                      "image_digest", "reward", "optimality", "valid",
                                                      "judge_digit_probs")}  # fmt: skip
        terms = sorted({key for g in rewards for key in g.components})
        rows.update({key: [] for key in terms})
        for g, (prompt_id, m, reward) in enumerate(zip(prompt_ids, meta, rewards, strict=True)):
            for k, value in enumerate(reward.reward):
                rows["step"].append(step)
                rows["prompt_id"].append(prompt_id)
                rows["k"].append(k)
                rows["seed"].append(m["seeds"][k])
                rows["version"].append(m["version"])
                rows["worker"].append(m["worker"])
                rows["image_digest"].append(m["digests"][k])
                rows["reward"].append(value)
                rows["optimality"].append(float(r[g, k]))
                rows["valid"].append(bool(valid[g]))
                probs = reward.judge_digit_probs[k] if reward.judge_digit_probs else None
                rows["judge_digit_probs"].append(None if probs is None else json.dumps(probs))
                for key in terms:
                    rows[key].append(reward.components[key][k] if key in reward.components else None)
        out, tmp = self.path(step), self.dir / f".step_{step:08d}.parquet.tmp"
        pq.write_table(pa.table(rows), tmp)
        tmp.replace(out)
        return out
