"""Sample videos with a known truth, written with a real H.264 encoder (PyAV): the tests' five cases and the
documented tiny command's input. `python -m curation.samples DIR [--side 64] [--fps 12]`.

Each scene is a smooth random texture (optical flow has something to track everywhere) with coloured squares:

- `objects.mp4`: a still camera, two squares moving steadily: every clip is a motion pair (kept);
- `pan.mp4`: the camera pans over a still scene: the motion is all camera motion (dropped, stage b);
- `still.mp4`: nothing moves (dropped as near-static, stage a);
- `cut.mp4`: a short shot, then a hard cut to another scene where a square moves: clips start at the cut, never
  across it (the second shot's clip is kept);
- `corrupt.mp4`: a truncated H.264 file (named and skipped).

`TRUTH` says which clips (by start second) each video should keep; a clip lasts `CLIP_S` seconds.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import numpy as np

CLIP_S = 3.0
# video -> (clip start seconds that are kept, clip start seconds that are cut but dropped); None: a bad video
TRUTH: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "objects.mp4": ((0.0, 3.0), ()),
    "pan.mp4": ((), (0.0,)),
    "still.mp4": ((), (0.0, 3.0)),
    "cut.mp4": ((2.0,), ()),
    "corrupt.mp4": None,
}
CUT_AT_S = 2.0  # cut.mp4: the second shot starts here


def texture(height: int, width: int, seed: int, blur: float = 2.0) -> np.ndarray:
    """Smooth random RGB texture, uint8 (H, W, 3)."""
    noise = np.random.default_rng(seed).random((height, width, 3)).astype(np.float32)
    tex = cv2.GaussianBlur(noise, (0, 0), blur)
    return ((tex - tex.min()) / (tex.max() - tex.min()) * 255).round().astype(np.uint8)


def _square(frame: np.ndarray, x: float, y: float, patch: np.ndarray) -> None:
    """Paste a square patch with its top left corner at (x, y) (rounded), clipped to the frame."""
    h, w = frame.shape[:2]
    size = patch.shape[0]
    x0, y0 = int(round(x)), int(round(y))
    xa, ya, xb, yb = max(0, x0), max(0, y0), min(w, x0 + size), min(h, y0 + size)
    frame[ya:yb, xa:xb] = patch[ya - y0 : yb - y0, xa - x0 : xb - x0]




def _objects(side: int, fps: int, seconds: float, seed: int) -> Iterator[np.ndarray]:
    """A still background, two squares crossing it at side/16 pixels per second."""
    background = texture(side, side, seed)
    size, speed = max(4, side // 3), side / 16
    red, blue = np.full((size, size, 3), (250, 40, 40), np.uint8), np.full((size, size, 3), (40, 40, 250), np.uint8)
    for i in range(round(seconds * fps) + 1):
        t = i / fps
        frame = background.copy()
        _square(frame, side * 0.05 + speed * t, side * 0.15, red)
        _square(frame, side * 0.75 - speed * t, side * 0.55, blue)
        yield frame


def _pan(side: int, fps: int, seconds: float, seed: int) -> Iterator[np.ndarray]:
    """A window sliding right over a larger still scene at side/24 pixels per second (the camera pans)."""
    n = round(seconds * fps) + 1
    speed = side / 24
    scene = texture(side, side + int(speed * seconds) + 2, seed)
    for i in range(n):
        x = speed * i / fps
        x0, frac = int(x), x - int(x)
        a, b = scene[:, x0 : x0 + side].astype(np.float32), scene[:, x0 + 1 : x0 + 1 + side].astype(np.float32)
        yield ((1 - frac) * a + frac * b).round().astype(np.uint8)  # sub-pixel shift, no jumps


def _still(side: int, fps: int, seconds: float, seed: int) -> Iterator[np.ndarray]:
    frame = texture(side, side, seed)
    for _ in range(round(seconds * fps) + 1):
        yield frame


def _cut(side: int, fps: int, seconds: float, seed: int) -> Iterator[np.ndarray]:
    """A still shot of one scene until CUT_AT_S, then moving objects over another scene."""
    first = (texture(side, side, seed + 100, blur=4.0)[..., ::-1] * 0.6).astype(np.uint8)  # another, darker scene
    n_first = round(CUT_AT_S * fps)
    for _ in range(n_first):
        yield first
    yield from _objects(side, fps, seconds - CUT_AT_S, seed + 7)


def write_video(path: Path, frames: Iterator[np.ndarray], fps: int) -> Path:
    """Encode RGB frames as H.264 (yuv420p) in an MP4 with PyAV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream("libx264", rate=fps)
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": "12", "preset": "veryfast"}
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    return path


def write_samples(out_dir: str | Path, *, side: int = 64, fps: int = 12, seed: int = 0) -> dict[str, Path]:
    """The five sample videos of the module docstring in `out_dir`; returns {name: path}."""
    out = Path(out_dir)
    made = {
        "objects.mp4": write_video(out / "objects.mp4", _objects(side, fps, 2 * CLIP_S, seed), fps),
        "pan.mp4": write_video(out / "pan.mp4", _pan(side, fps, CLIP_S, seed + 1), fps),
        "still.mp4": write_video(out / "still.mp4", _still(side, fps, 2 * CLIP_S, seed + 2), fps),
        "cut.mp4": write_video(out / "cut.mp4", _cut(side, fps, CUT_AT_S + CLIP_S, seed + 3), fps),
    }
    whole = write_video(out / ".corrupt-source.mp4", _objects(side, fps, CLIP_S, seed + 4), fps)
    data = whole.read_bytes()
    (out / "corrupt.mp4").write_bytes(data[: len(data) // 2])  # truncated: the index (moov atom) is lost
    whole.unlink()
    made["corrupt.mp4"] = out / "corrupt.mp4"
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m curation.samples", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write the videos into")
    parser.add_argument("--side", type=int, default=64, help="frame side in pixels (even)")
    parser.add_argument("--fps", type=int, default=12, help="frames per second")
    args = parser.parse_args(argv)
    for name, path in write_samples(args.out, side=args.side, fps=args.fps).items():
        print(f"{name}: {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
