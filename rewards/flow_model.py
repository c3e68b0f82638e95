"""Optical-flow estimators behind one interface (docs/algorithm.md).

Every estimator maps two uint8 image batches (B, 3, H, W) to a float32 pixel flow (B, H, W, 2), where
`flow[b, y, x] = (dx, dy)` says where pixel (x, y) of `src` moved to in `dst`. `RAFTFlow` (torchvision RAFT,
the default, GPU) and `ClassicalFlow` (OpenCV DIS or Farneback, CPU, no weights) are interchangeable, so the
reward scorer and the tests do not care which one runs.

Weights come from a local file or S3, never from a hub: torchvision's `raft_*(weights=...)` download path is
never used.
"""

import logging
import math
import tempfile
import warnings
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from motionnft_core import s3
from motionnft_core.config import FlowEstimatorConfig

logger = logging.getLogger(__name__)

RAFT_VARIANTS = ("large", "small")  # torchvision's raft_large / raft_small, imported when built (a reward
# worker on DIS flow then never imports torchvision: 1.5 s of its start-up on a CPU)
RAFT_MIN_SIDE = 128  # RAFT's correlation pyramid needs H, W >= 128 (ENVIRONMENT gotcha 10)
RAFT_PAD_MULTIPLE = 8  # RAFT works on a 1/8-resolution grid
RAFT_RANDOM_INIT_SEED = 0  # random-init weights are seeded, so two random RAFTFlow objects agree

DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
# cv2.calcOpticalFlowFarneback(pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags): OpenCV's
# documented example values; 4 levels so a pyramid still reaches shifts of a few tens of pixels.
FARNEBACK_PARAMS = (0.5, 4, 15, 3, 5, 1.2, 0)


class FlowEstimator(Protocol):
    """uint8 (B, 3, H, W) src, dst -> float32 (B, H, W, 2) flow src -> dst, in pixels."""

    def __call__(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor: ...


def check_image_pair(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Raise ValueError unless src and dst are uint8 (B, 3, H, W) batches of the same shape."""
    for name, images in (("src", src), ("dst", dst)):
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3 or min(images.shape) == 0:
            raise ValueError(f"{name}: expected a non-empty uint8 batch (B, 3, H, W), got {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise ValueError(f"{name}: expected dtype uint8, got {images.dtype}")
    if src.shape != dst.shape:
        raise ValueError(f"src and dst sizes differ: {tuple(src.shape)} vs {tuple(dst.shape)}")


def check_flow_output(flow: torch.Tensor, estimator: str) -> torch.Tensor:
    """Raise ValueError if an estimator produced NaN/inf (a broken model must not become a reward)."""
    if not torch.isfinite(flow).all():
        bad = (~torch.isfinite(flow)).sum().item()
        raise ValueError(f"{estimator} produced {bad} NaN/inf flow values for a batch of shape {tuple(flow.shape)}")
    return flow


def download_s3(uri: str, cache_dir: str | Path) -> Path:
    """Download s3://bucket/key into cache_dir/bucket/key (motionnft_core.s3: cached by size, renamed into place)."""
    bucket, key = s3.split_s3_uri(uri)
    if not key or key.endswith("/"):
        raise ValueError(f"weights: expected s3://bucket/key, got {uri!r}")
    return s3.download_file(uri, Path(cache_dir).expanduser() / bucket / key)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a plain state_dict from a .safetensors file or a torch .pth/.pt file (tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights: no such file {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"weights: {str(path)!r} holds a {type(state).__name__}, expected a state_dict")
    return state


class RAFTFlow:
    """torchvision RAFT (large or small) as a FlowEstimator.

    Per chunk of <= max_batch pairs: images go to [-1, 1]; a side below 128 px is first resized up (bilinear,
    the aspect ratio kept) and the flow resized back and rescaled per axis; the images are replicate-padded to
    a multiple of 8 and the flow cropped back; the flow of the last of `num_updates` refinements is returned
    as float32 (B, H, W, 2) on `device`. `reward.flow.max_batch` is 32 because larger batches hit a cuDNN
    grid_sample limit at 512² on an H100 (docs/algorithm.md).

    weights: a local .pth/.safetensors state_dict, or s3://bucket/key (downloaded into cache_dir, or into a
    temporary directory that is removed after loading). None builds seeded RANDOM weights and warns: for
    tests and benchmarks only, the flows mean nothing.
    """

    def __init__(
        self,
        variant: str,
        *,
        num_updates: int,
        max_batch: int,
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
    ):
        if variant not in RAFT_VARIANTS:
            raise ValueError(f"variant: expected one of {sorted(RAFT_VARIANTS)}, got {variant!r}")
        if num_updates < 1:
            raise ValueError(f"num_updates: expected >= 1, got {num_updates}")
        if max_batch < 1:
            raise ValueError(f"max_batch: expected >= 1, got {max_batch}")
        self.variant, self.num_updates, self.max_batch = variant, num_updates, max_batch
        self.device = torch.device(device)
        from torchvision.models import optical_flow

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RAFT_RANDOM_INIT_SEED)
            model = getattr(optical_flow, f"raft_{variant}")(weights=None, progress=False)
        if weights is None:
            message = (
                f"RAFTFlow({variant!r}): no weights given, using RANDOM weights: flows are meaningless (tests only)"
            )
            logger.warning(message)
            warnings.warn(message, UserWarning, stacklevel=2)
        else:
            _load_raft_weights(model, variant, str(weights), cache_dir)
        self.model = model.eval().requires_grad_(False).to(self.device)

    @torch.inference_mode()
    def __call__(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        check_image_pair(src, dst)
        chunks = [
            self._flow_chunk(src[i : i + self.max_batch], dst[i : i + self.max_batch])
            for i in range(0, src.shape[0], self.max_batch)
        ]
        return check_flow_output(torch.cat(chunks), f"RAFTFlow({self.variant!r})")

    def _flow_chunk(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        height, width = src.shape[-2:]
        images = torch.cat([src, dst]).to(self.device, non_blocking=True).float() / 127.5 - 1.0  # (2b, 3, H, W)

        # 1. Resize up so the shorter side is >= RAFT_MIN_SIDE (RAFT fails below it).
        scale = max(1.0, RAFT_MIN_SIDE / min(height, width))
        run_h, run_w = math.ceil(height * scale), math.ceil(width * scale)
        if (run_h, run_w) != (height, width):
            images = F.interpolate(images, size=(run_h, run_w), mode="bilinear", align_corners=False)

        # 2. Replicate-pad to a multiple of 8, split evenly between the two sides.
        pad_h, pad_w = -run_h % RAFT_PAD_MULTIPLE, -run_w % RAFT_PAD_MULTIPLE
        top, left = pad_h // 2, pad_w // 2
        images = F.pad(images, (left, pad_w - left, top, pad_h - top), mode="replicate")

        # 3. Run RAFT; keep the final refinement, crop the padding away.
        image1, image2 = images.chunk(2)
        flow = self.model(image1, image2, num_flow_updates=self.num_updates)[-1]  # (b, 2, H', W')
        flow = flow[:, :, top : top + run_h, left : left + run_w]

        # 4. Undo the resize: resample the field and scale each component back to original pixels.
        if (run_h, run_w) != (height, width):
            flow = F.interpolate(flow, size=(height, width), mode="bilinear", align_corners=False)
            flow = flow * torch.tensor([width / run_w, height / run_h], device=flow.device).view(1, 2, 1, 1)
        return flow.permute(0, 2, 3, 1).float().contiguous()  # (b, H, W, 2)


def _load_raft_weights(model: torch.nn.Module, variant: str, weights: str, cache_dir: str | Path | None) -> None:
    """Load a local or s3:// state_dict into model; every key must match (a wrong variant fails loudly)."""
    if not weights.startswith("s3://"):
        state = load_state_dict(weights)
    elif cache_dir is not None:
        state = load_state_dict(download_s3(weights, cache_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="raft-weights-") as tmp:
            state = load_state_dict(download_s3(weights, tmp))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # missing/unexpected keys or shape mismatches
        raise ValueError(f"weights: {weights!r} is not a RAFT-{variant} state_dict: {err}") from err


class ClassicalFlow:
    """OpenCV dense flow on CPU (DIS by default, or Farneback) as a FlowEstimator; needs no weights.

    Works on grayscale images, one pair at a time (OpenCV has no batch API); the result is on the CPU.
    preset picks the DIS speed/quality trade-off ("ultrafast", "fast", "medium"); Farneback ignores it.
    """

    def __init__(self, method: str = "dis", preset: str = "medium"):
        if method not in ("dis", "farneback"):
            raise ValueError(f"method: expected 'dis' or 'farneback', got {method!r}")
        if preset not in DIS_PRESETS:
            raise ValueError(f"preset: expected one of {sorted(DIS_PRESETS)}, got {preset!r}")
        self.method, self.preset = method, preset

    def __call__(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        check_image_pair(src, dst)
        src_gray, dst_gray = _to_gray(src), _to_gray(dst)
        flows = [self._flow_pair(a, b) for a, b in zip(src_gray, dst_gray, strict=True)]
        return check_flow_output(torch.from_numpy(np.stack(flows)), f"ClassicalFlow({self.method!r})")

    def _flow_pair(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        if self.method == "dis":
            # A fresh object per pair: no state carries over, so a pair's flow does not depend on its batch.
            return cv2.DISOpticalFlow_create(DIS_PRESETS[self.preset]).calc(src, dst, None)
        return cv2.calcOpticalFlowFarneback(src, dst, None, *FARNEBACK_PARAMS)


def _to_gray(images: torch.Tensor) -> list[np.ndarray]:
    """uint8 (B, 3, H, W) RGB -> B contiguous uint8 (H, W) grayscale arrays."""
    hwc = images.detach().cpu().permute(0, 2, 3, 1).contiguous().numpy()
    return [cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) for image in hwc]


def build_flow_estimator(cfg: FlowEstimatorConfig, *, device: str = "cpu",
                         cache_dir: str | None = None) -> FlowEstimator:  # fmt: skip
    """The estimator `reward.flow.estimator` (or the curation's `flow.estimator`) names: "raft_large" | "raft_small"
    (torchvision RAFT with its `weights`, `num_updates`, `max_batch`) | "dis" | "farneback" (OpenCV on the CPU, no
    weights)."""
    if cfg.estimator in ("raft_large", "raft_small"):
        return RAFTFlow(
            cfg.estimator.removeprefix("raft_"), weights=cfg.weights or None, num_updates=cfg.num_updates,
            max_batch=cfg.max_batch, device=device, cache_dir=cache_dir,
        )  # fmt: skip
    return ClassicalFlow(method=cfg.estimator)
