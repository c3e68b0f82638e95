"""The one row shape every Ray Data stage passes on (a fixed set of columns, so blocks always share a schema).

A video yields one `video` row (its info, or why it is bad) and one `pair` row per clip. `video_rows` on each row
is how many rows the video yields in all: the driver commits a video once it has seen that many.
A pair's `status` moves from `candidate` to `dropped` (with the `stage` and `reason`), `unverified` (the judge
could not answer) or `kept`; a `video` row's status is `ok` or `bad`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

CRITERIA = ("setting_consistency", "meaningful_motion", "subject_integrity", "visual_quality")
MOTION = ("motion", "object_motion", "camera_share")

DEFAULTS: dict[str, Any] = {
    "kind": "pair",  # pair | video
    "video": "",  # the video's path or s3:// URI
    "video_key": "",  # the file name of its commit (curation/video.py: video_key)
    "video_sha256": "",
    "video_rows": 0,
    "pair_id": "",
    "shot": -1,
    "start_s": math.nan,
    "end_s": math.nan,
    "height": 0,
    "width": 0,
    "input_rgb": b"",  # raw RGB uint8 (height, width, 3)
    "target_rgb": b"",
    "input_hash": "",  # perceptual hashes (curation/dedup.py)
    "target_hash": "",
    "status": "candidate",
    "stage": "",  # a | b | c: the stage that dropped it
    "reason": "",
    **dict.fromkeys(MOTION, math.nan),
    **dict.fromkeys(CRITERIA, math.nan),  # expected digits 0-5
    "summary": "",
    "instruction": "",
    "category": "",
    "judge_attempts": 0,
    "info": "",  # JSON: a video row's decoding info
}


def new_row(**values: Any) -> dict[str, Any]:
    unknown = set(values) - set(DEFAULTS)
    if unknown:
        raise KeyError(f"unknown row columns {sorted(unknown)}")
    return {**DEFAULTS, **values}


def image(row: dict[str, Any], which: str) -> np.ndarray:
    """`input` or `target` of a pair row as an RGB uint8 array (H, W, 3)."""
    data = row[f"{which}_rgb"]
    return np.frombuffer(bytes(data), dtype=np.uint8).reshape(int(row["height"]), int(row["width"]), 3)


def batch_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """A Ray Data numpy batch as row dicts (plain Python values)."""
    n = len(next(iter(batch.values()))) if batch else 0
    return [{k: (v[i].item() if isinstance(v[i], np.generic) else v[i]) for k, v in batch.items()} for i in range(n)]


def rows_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Row dicts as a Ray Data numpy batch (strings and bytes as object columns)."""
    out: dict[str, np.ndarray] = {}
    for key, default in DEFAULTS.items():
        values = [r[key] for r in rows]
        if isinstance(default, str | bytes):
            column = np.empty(len(values), dtype=object)
            column[:] = values
            out[key] = column
        else:
            out[key] = np.asarray(values, dtype=type(default))
    return out
