"""Shot-boundary detection: a hard cut lies between two consecutive frames that differ much more than motion makes
them differ. Two measures, each with its threshold (`shots.*`, docs/curation.md):

- colour: half the L1 distance of the frames' normalised 16-bin histograms, averaged over R, G and B (0 = the
  same colours, 1 = no colour in common). Motion and camera moves keep a scene's colours; a cut changes them.
- structure: the mean absolute difference of 32 x 32 grey thumbnails (area-averaged), over 255. A cut between two
  scenes of the same palette still changes what is where; motion between two frames 1/24 s apart moves a
  thumbnail pixel by a fraction of its width.

A cut is declared when either reaches its threshold. Fades and dissolves are not cuts (no single frame pair
changes enough); a clip across one is left to stage b's "too large" and stage c's setting-consistency check.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np

from curation.config import ShotConfig

HIST_BINS = 16


@dataclass(frozen=True)
class FrameSignature:
    """What the detector keeps of a frame: per-channel normalised histograms (3, 16) and a grey thumbnail in [0, 1]."""

    hist: np.ndarray
    thumb: np.ndarray


def signature(frame: np.ndarray, thumb_side: int = ShotConfig.thumb_side) -> FrameSignature:
    """The signature of an RGB uint8 frame (H, W, 3)."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 frame (H, W, 3), got {frame.dtype} {frame.shape}")
    hist = np.stack([np.bincount(frame[..., c].ravel() >> 4, minlength=HIST_BINS) for c in range(3)])
    hist = hist.astype(np.float64) / (frame.shape[0] * frame.shape[1])
    grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    thumb = cv2.resize(grey, (thumb_side, thumb_side), interpolation=cv2.INTER_AREA).astype(np.float64) / 255.0
    return FrameSignature(hist, thumb)


def cut_scores(a: FrameSignature, b: FrameSignature) -> tuple[float, float]:
    """(colour distance, structure distance) of two consecutive frames, each in [0, 1]."""
    colour = float(0.5 * np.abs(a.hist - b.hist).sum(axis=1).mean())
    structure = float(np.abs(a.thumb - b.thumb).mean())
    return colour, structure


def is_cut(a: FrameSignature, b: FrameSignature, cfg: ShotConfig) -> bool:
    colour, structure = cut_scores(a, b)
    return colour >= cfg.hist_threshold or structure >= cfg.diff_threshold


def detect_shots(frames: Iterable[np.ndarray], cfg: ShotConfig) -> list[int]:
    """Indices of the frames that start a shot (the first frame always does)."""
    starts: list[int] = []
    previous = None
    for i, frame in enumerate(frames):
        sig = signature(frame, cfg.thumb_side)
        if previous is None or is_cut(previous, sig, cfg):
            starts.append(i)
        previous = sig
    return starts
