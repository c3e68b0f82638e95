"""Cutting a decoded video into clips that never cross a shot boundary, and naming what comes out.

Within each shot, clip k starts at the first frame at or after `shot start + k * stride_s` and ends at the first
frame at or after its start + `clip_s` (half a frame of tolerance on both, so 24 fps timestamps that round down
still count). A clip whose end is not reached before the next cut, or before the video ends, is not made. The
cutter streams: it keeps only the start frames of the clips still open, never the whole video.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from curation.config import ClipConfig, ShotConfig
from curation.shots import FrameSignature, is_cut, signature


@dataclass(frozen=True)
class Clip:
    """One clip: its shot (0-based), first and last frame's index and time (seconds)."""

    shot: int
    start_index: int
    end_index: int
    start_s: float
    end_s: float


class ClipCutter:
    """Feed frames in order (`feed`); get (clip, first frame, last frame) as each clip's last frame arrives."""

    def __init__(self, clips: ClipConfig, shots: ShotConfig, fps: float):
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.clips, self.shots = clips, shots
        self.tolerance = 0.5 / fps
        self.shot = -1
        self.shot_starts: list[float] = []  # start time of each shot
        self._previous: FrameSignature | None = None
        self._next_start = 0.0
        self._open: list[tuple[int, float, np.ndarray]] = []  # (index, time, frame) of clips not yet ended

    def feed(self, index: int, time_s: float, frame: np.ndarray) -> list[tuple[Clip, np.ndarray, np.ndarray]]:
        sig = signature(frame, self.shots.thumb_side)
        if self._previous is None or is_cut(self._previous, sig, self.shots):
            self.shot += 1
            self.shot_starts.append(time_s)
            self._open = []  # a clip never crosses the cut
            self._next_start = time_s
        self._previous = sig
        done = []
        still_open = []
        for start_index, start_s, start_frame in self._open:
            if time_s - start_s >= self.clips.clip_s - self.tolerance:
                done.append((Clip(self.shot, start_index, index, start_s, time_s), start_frame, frame))
            else:
                still_open.append((start_index, start_s, start_frame))
        self._open = still_open
        if time_s >= self._next_start - self.tolerance:
            self._open.append((index, time_s, frame))
            while self._next_start <= time_s + self.tolerance:
                self._next_start += self.clips.stride_s
        return done


def cut_clips(frames: Iterator[tuple[float, np.ndarray]], clips: ClipConfig, shots: ShotConfig,
              fps: float) -> list[tuple[Clip, np.ndarray, np.ndarray]]:  # fmt: skip
    """Every clip of (time, frame) pairs in order (a convenience over `ClipCutter`)."""
    cutter = ClipCutter(clips, shots, fps)
    out = []
    for i, (t, frame) in enumerate(frames):
        out.extend(cutter.feed(i, t, frame))
    return out


def pair_id(video_sha256: str, start_s: float, end_s: float) -> str:
    """Stable id of a pair: 16 hex digits of the video's content hash and the clip's times in milliseconds. The
    same video under another name gets the same ids; its ids share a prefix, so they group by video."""
    return f"{video_sha256[:16]}-{round(start_s * 1000):08d}-{round(end_s * 1000):08d}"


def split_of(video_sha256: str, eval_fraction: float, seed: int) -> str:
    """"eval" or "train" for every pair of a video, by a hash of (seed, content): a video is wholly on one side."""
    digest = hashlib.sha256(f"{seed}:{video_sha256}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2.0**64 < eval_fraction else "train"
