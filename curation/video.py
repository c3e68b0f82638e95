"""Finding and decoding videos: the listing (a local folder or an s3:// prefix), a stable key per video, its content
hash, the checks that name a bad video (zero length, enormous, truncated, unknown codec, too small or short) and
frame decoding with PyAV (FFmpeg)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from curation.config import ClipConfig, InputConfig
from motionnft_core import s3

HASH_CHUNK = 1 << 20


class BadVideo(Exception):
    """A video that cannot be used; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class VideoInfo:
    codec: str
    width: int
    height: int
    fps: float
    duration_s: float


def list_videos(cfg: InputConfig) -> list[str]:
    """Every video under `input.videos` (local paths or s3:// URIs), in path order, at most `input.limit`."""
    suffixes = tuple(e.lower() for e in cfg.extensions)
    if s3.is_s3_uri(cfg.videos):
        found = [u for u in s3.list_prefix(cfg.videos) if u.lower().endswith(suffixes)]
    else:
        root = Path(cfg.videos).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"input.videos: {str(root)!r} is not a folder")
        found = sorted(
            str(p) for p in root.rglob("*")
            if p.is_file() and p.suffix.lower() in suffixes
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )  # fmt: skip
    return found[: cfg.limit] if cfg.limit else found


def video_key(uri: str, root: str) -> str:
    """A file name for a video's commit: its path under the root made safe, plus 8 hex digits of the path (two
    paths that sanitise alike stay apart)."""
    rel = uri[len(root.rstrip("/")) + 1 :] if uri.startswith(root.rstrip("/") + "/") else uri
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", rel.replace("/", "__"))[-80:]
    return f"{safe}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


def local_copy(uri: str, cfg: InputConfig) -> Path:
    """The local file of a video: itself, or an s3:// object downloaded into `input.cache_dir` (kept by size)."""
    if not s3.is_s3_uri(uri):
        return Path(uri)
    bucket, key = s3.split_s3_uri(uri)
    return s3.download_file(uri, Path(cfg.cache_dir).expanduser() / bucket / key)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_file(path: Path, cfg: InputConfig) -> None:
    """Zero length or larger than `input.max_bytes`: BadVideo."""
    size = path.stat().st_size
    if size == 0:
        raise BadVideo("zero length")
    if size > cfg.max_bytes:
        raise BadVideo(f"enormous: {size} bytes > input.max_bytes ({cfg.max_bytes})")


def _info(container: av.container.InputContainer) -> VideoInfo:
    if not container.streams.video:
        raise BadVideo("no video stream")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if ctx is None or not ctx.name:
        raise BadVideo("unknown codec")
    rate = stream.average_rate or stream.guessed_rate or 0
    duration = 0.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    return VideoInfo(ctx.name, ctx.width, ctx.height, float(rate), duration)


def check_info(info: VideoInfo, inputs: InputConfig, clips: ClipConfig) -> None:
    """Too small, enormous or too short for one clip: BadVideo naming the key."""
    if min(info.width, info.height) < inputs.min_side:
        raise BadVideo(f"too small: {info.width}x{info.height}, shorter side < input.min_side ({inputs.min_side})")
    if info.width * info.height > inputs.max_pixels:
        raise BadVideo(f"enormous: {info.width}x{info.height} > input.max_pixels ({inputs.max_pixels})")
    if info.duration_s > inputs.max_duration_s:
        raise BadVideo(f"enormous: {info.duration_s:.0f} s > input.max_duration_s ({inputs.max_duration_s:.0f})")
    if 0 < info.duration_s < clips.clip_s:
        raise BadVideo(f"too short: {info.duration_s:.2f} s < clips.clip_s ({clips.clip_s})")
    if info.fps <= 0:
        raise BadVideo("no frame rate")


def decode(path: Path, inputs: InputConfig, clips: ClipConfig) -> tuple[VideoInfo, Iterator[tuple[float, np.ndarray]]]:
    """The video's info (checked) and an iterator of (time in seconds, RGB uint8 frame (H, W, 3)). Raises BadVideo
    for what FFmpeg cannot open or decode, at once or while iterating (a truncated stream)."""
    check_file(path, inputs)
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as err:
        raise BadVideo(f"cannot open: {err}") from err
    try:
        info = _info(container)
        check_info(info, inputs, clips)
    except BaseException:
        container.close()
        raise

    def frames() -> Iterator[tuple[float, np.ndarray]]:
        try:
            stream = container.streams.video[0]
            last = -1.0
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else last + 1.0 / info.fps
                if t <= last:  # a repeated or out-of-order timestamp: keep time strictly increasing
                    continue
                if t > inputs.max_duration_s:
                    raise BadVideo(f"enormous: longer than input.max_duration_s ({inputs.max_duration_s:.0f} s)")
                last = t
                yield t, frame.to_ndarray(format="rgb24")
        except (av.FFmpegError, ValueError) as err:
            raise BadVideo(f"cannot decode: {err}") from err
        finally:
            container.close()

    return info, frames()
