"""Decoding and cutting one video (a Ray Data `flat_map` task): stage a's file checks, the clips, their first and
last frames at the output resolution, perceptual hashes, and near-duplicates within the video."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from PIL import Image

from curation.clips import ClipCutter, pair_id
from curation.config import CurateConfig
from curation.dedup import NearDuplicates, phash
from curation.rows import new_row
from curation.video import BadVideo, decode, local_copy, sha256_file
from motionnft_core.data.motionedit import _fit


def fit(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """A frame at the output resolution by the training loader's rule (centre crop to the aspect, bilinear)."""
    return np.asarray(_fit(Image.fromarray(frame), (height, width)))


def cut_video(item: dict[str, Any], cfg: CurateConfig) -> list[dict[str, Any]]:
    """Every row of one video (`item`: `video`, `video_key`): one `video` row, then one `pair` row per clip. A bad
    video yields its `video` row alone, status `bad` and the reason; nothing raises."""
    video, key = item["video"], item["video_key"]
    base = {"video": video, "video_key": key}
    try:
        path = local_copy(video, cfg.input)
        sha = sha256_file(path)
        info, frames = decode(path, cfg.input, cfg.clips)
        cutter = ClipCutter(cfg.clips, cfg.shots, info.fps)
        clips = []
        n_frames = 0
        for t, frame in frames:
            clips.extend(cutter.feed(n_frames, t, frame))
            n_frames += 1
        if n_frames == 0:
            raise BadVideo("no frame decoded")
    except BadVideo as err:
        return [new_row(kind="video", status="bad", stage="a", reason=f"bad video: {err}", video_rows=1, **base)]
    except OSError as err:  # unreadable, or an s3:// object that cannot be fetched
        return [new_row(kind="video", status="bad", stage="a", reason=f"bad video: cannot read: {err}", video_rows=1,
                        **base)]  # fmt: skip
    h, w = cfg.clips.height, cfg.clips.width
    duplicates = NearDuplicates(cfg.filter.dedup_distance)
    rows = []
    for clip, first, last in clips:
        source, target = fit(first, h, w), fit(last, h, w)
        pid = pair_id(sha, clip.start_s, clip.end_s)
        row = new_row(pair_id=pid, shot=clip.shot, start_s=clip.start_s, end_s=clip.end_s, height=h, width=w,
                      input_rgb=source.tobytes(), target_rgb=target.tobytes(), input_hash=phash(source),
                      target_hash=phash(target), video_sha256=sha, **base)  # fmt: skip
        earlier = duplicates.check(pid, row["input_hash"], row["target_hash"])
        if earlier is not None:
            row.update(status="dropped", stage="a", reason=f"near_duplicate of {earlier}")
        rows.append(row)
    summary = {"codec": info.codec, "width": info.width, "height": info.height, "fps": info.fps,
               "duration_s": info.duration_s, "frames": n_frames, "shots": cutter.shot + 1,
               "shot_starts_s": cutter.shot_starts, "clips": len(clips)}  # fmt: skip
    video_row = new_row(kind="video", status="ok", video_sha256=sha, info=json.dumps(summary), **base)
    out = [video_row, *rows]
    for row in out:
        row["video_rows"] = len(out)
    return out
