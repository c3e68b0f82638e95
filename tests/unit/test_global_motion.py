"""Camera/object split of hand-built flows (motionnft_core/global_motion.py).

Flows are built here from pixel-index coordinates (x = column, y = row, centre ((W − 1)/2, (H − 1)/2)),
independently of `pixel_grid`, so the tests also pin the normalisation convention. float64 where exactness matters.
"""

import math

import pytest
import torch

from motionnft_core.global_motion import affine_flow, camera_share, fit_affine, pixel_grid, split_motion

H = W = 64
F64 = torch.float64


def coords(height: int = H, width: int = W, dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel x, y relative to the image centre, each (H, W)."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=dtype), torch.arange(width, dtype=dtype), indexing="ij")
    return xs - (width - 1) / 2, ys - (height - 1) / 2


def stack(dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """(H, W) components -> (1, H, W, 2)."""
    return torch.stack([dx, dy], dim=-1)[None]


def pan(dx: float, dy: float, dtype: torch.dtype = F64) -> torch.Tensor:
    flow = torch.zeros(1, H, W, 2, dtype=dtype)
    flow[..., 0], flow[..., 1] = dx, dy
    return flow


def zoom(s: float) -> torch.Tensor:
    x, y = coords()
    return stack(s * x, s * y)


def rotation(angle: float) -> torch.Tensor:
    x, y = coords()
    c, s = math.cos(angle), math.sin(angle)
    return stack(c * x - s * y - x, s * x + c * y - y)


def shear(k: float) -> torch.Tensor:
    x, y = coords()
    return stack(k * y, torch.zeros_like(y))


def object_motion(dx: float, dy: float, rows=slice(8, 24), cols=slice(30, 46)) -> torch.Tensor:
    """A 16x16 object (off centre) moving by (dx, dy) on a still background."""
    flow = torch.zeros(1, H, W, 2, dtype=F64)
    flow[0, rows, cols, 0], flow[0, rows, cols, 1] = dx, dy
    return flow


def object_mask(rows=slice(8, 24), cols=slice(30, 46)) -> torch.Tensor:
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[rows, cols] = True
    return mask


def ripple() -> torch.Tensor:
    """A deterministic non-affine disturbance of a few tenths of a pixel, like flow-estimator noise."""
    x, y = coords()
    return stack(0.3 * torch.sin(0.7 * x + 0.3 * y), 0.2 * torch.cos(0.5 * y - 0.4 * x))


def test_pixel_grid_is_centred_and_scaled_by_the_half_diagonal():
    grid = pixel_grid(30, 40, dtype=F64)  # half-diagonal 25
    assert grid.shape == (30, 40, 2) and grid.dtype == F64
    assert torch.allclose(grid.mean(dim=(0, 1)), torch.zeros(2, dtype=F64), atol=1e-15)
    assert torch.allclose(grid[0, 0], torch.tensor([-19.5 / 25, -14.5 / 25], dtype=F64))
    assert torch.allclose(grid[29, 39], torch.tensor([19.5 / 25, 14.5 / 25], dtype=F64))
    assert torch.linalg.vector_norm(grid, dim=-1).max() < 1.0


def test_a_pure_pan_is_all_camera():
    flow = pan(6.0, -2.5)
    camera, obj = split_motion(flow)
    assert torch.allclose(camera, flow, atol=1e-6)
    assert torch.allclose(obj, torch.zeros_like(obj), atol=1e-6)
    expected = torch.tensor([[[0.0, 0.0, 6.0], [0.0, 0.0, -2.5]]], dtype=F64)
    assert torch.allclose(fit_affine(flow), expected, atol=1e-6)


@pytest.mark.parametrize(
    "flow", [zoom(0.05), zoom(-0.08), rotation(0.03), shear(0.04), zoom(0.03) + rotation(-0.02) + pan(1.5, 2.0)],
    ids=["zoom_in", "zoom_out", "rotation", "shear", "mixed"],
)
def test_zoom_rotation_and_shear_are_removed(flow):
    camera, obj = split_motion(flow)
    assert torch.allclose(camera, flow, atol=1e-6)
    assert obj.abs().max() < 1e-6


def test_the_params_map_normalised_points_to_pixels():
    """A zoom s·(p − c) in pixels is s·half_diagonal times the normalised point."""
    s = 0.05
    half_diag = 0.5 * math.hypot(H, W)
    expected = torch.tensor([[[s * half_diag, 0.0, 0.0], [0.0, s * half_diag, 0.0]]], dtype=F64)
    params = fit_affine(zoom(s))
    assert torch.allclose(params, expected, atol=1e-9)
    assert torch.allclose(affine_flow(params, H, W), zoom(s), atol=1e-9)


def test_a_moving_object_does_not_bend_the_camera_fit():
    """A 16x16 object moving 6 px right on a 64x64 frame that pans 6 px right."""
    camera_motion = pan(6.0, 0.0)
    flow = camera_motion + object_motion(6.0, 0.0)
    camera, obj = split_motion(flow)
    inside = object_mask()
    assert torch.allclose(camera, camera_motion, atol=1e-4)
    assert torch.allclose(obj[0][inside], torch.tensor([6.0, 0.0], dtype=F64).expand(int(inside.sum()), 2), atol=1e-4)
    assert torch.allclose(obj[0][~inside], torch.zeros(1, dtype=F64), atol=1e-4)


def test_a_moving_object_under_a_zoom_and_rotation():
    camera_motion = zoom(0.04) + rotation(0.02) + pan(-3.0, 1.0)
    obj_motion = object_motion(-5.0, 4.0, rows=slice(32, 64), cols=slice(0, 32))  # a quarter of the frame
    camera, obj = split_motion(camera_motion + obj_motion)
    assert torch.allclose(camera, camera_motion, atol=1e-4)
    assert torch.allclose(obj, obj_motion, atol=1e-4)


def test_a_still_flow_gives_zero_motion_and_share_zero():
    flow = torch.zeros(2, H, W, 2, dtype=F64)
    params = fit_affine(flow)
    camera, obj = split_motion(flow)
    share = camera_share(flow)
    for t in (params, camera, obj, share):
        assert torch.isfinite(t).all()
    assert torch.equal(params, torch.zeros_like(params))
    assert torch.equal(share, torch.zeros(2, dtype=F64))


def test_camera_share_of_a_pan_is_one_and_of_object_motion_zero():
    assert camera_share(pan(6.0, 3.0)).item() == pytest.approx(1.0, abs=1e-6)
    assert camera_share(object_motion(6.0, -2.0)).item() == pytest.approx(0.0, abs=1e-6)
    mixed = camera_share(pan(2.0, 0.0) + object_motion(8.0, 0.0)).item()  # mean|camera| 2, mean|object| 8/16
    assert mixed == pytest.approx(2.0 / 2.5, abs=1e-6)


def test_a_batch_gives_the_same_as_each_flow_alone():
    flows = [
        pan(6.0, -1.0),
        zoom(0.05) + object_motion(6.0, 0.0),
        rotation(0.03) + ripple(),
        torch.zeros(1, H, W, 2, dtype=F64),
    ]
    batched = fit_affine(torch.cat(flows))
    alone = torch.cat([fit_affine(f) for f in flows])
    assert torch.allclose(batched, alone, atol=1e-10)
    shares = camera_share(torch.cat(flows))
    assert torch.allclose(shares, torch.cat([camera_share(f) for f in flows]), atol=1e-10)


def test_float32_and_float64_agree():
    flow = zoom(0.04) + rotation(-0.02) + pan(3.0, 1.0) + object_motion(6.0, 2.0) + ripple()
    params64 = fit_affine(flow)
    params32 = fit_affine(flow.float())
    assert params32.dtype == torch.float32
    assert torch.allclose(params32.double(), params64, atol=1e-4)
    camera32, obj32 = split_motion(flow.float())
    camera64, obj64 = split_motion(flow)
    assert torch.allclose(camera32.double(), camera64, atol=1e-4)
    assert torch.allclose(obj32.double(), obj64, atol=1e-4)


def test_half_precision_is_fitted_in_float32():
    params = fit_affine(pan(2.0, 1.0).half())
    assert params.dtype == torch.float32
    assert torch.allclose(params[0, :, 2], torch.tensor([2.0, 1.0]), atol=1e-3)


def test_adding_a_known_affine_adds_its_params():
    flow = object_motion(6.0, 0.0) + pan(1.0, -2.0) + ripple()
    known = torch.tensor([[[2.0, -1.5, 3.0], [0.8, 1.2, -4.0]]], dtype=F64)
    shifted = fit_affine(flow + affine_flow(known, H, W))
    assert torch.allclose(shifted, fit_affine(flow) + known, atol=1e-6)


def test_prior_weights_exclude_masked_pixels():
    """An object over most of the frame is not a minority, but a mask that removes it leaves only the camera."""
    big = slice(0, 48)
    flow = pan(3.0, 1.0) + object_motion(-7.0, 5.0, rows=big, cols=big)  # 56% of the pixels
    weights = (~object_mask(rows=big, cols=big)).to(F64)[None]
    camera, _ = split_motion(flow, weights=weights)
    assert torch.allclose(camera, pan(3.0, 1.0), atol=1e-6)
    assert not torch.allclose(split_motion(flow)[0], pan(3.0, 1.0), atol=1e-2)  # the mask did the work
    assert camera_share(flow, weights=weights).item() == pytest.approx(1.0, abs=1e-6)
    ones = torch.ones(1, H, W, dtype=F64)
    mixed = zoom(0.05) + object_motion(6.0, 0.0)
    assert torch.allclose(fit_affine(mixed, weights=ones), fit_affine(mixed), atol=1e-12)
    assert torch.equal(fit_affine(mixed, weights=ones.bool()), fit_affine(mixed, weights=ones))


def test_all_zero_weights_and_degenerate_frames_never_give_nan():
    flow = pan(2.0, 1.0)
    assert torch.equal(fit_affine(flow, weights=torch.zeros(1, H, W, dtype=F64)), torch.zeros(1, 2, 3, dtype=F64))
    row = torch.full((1, 1, 9, 2), 2.0, dtype=F64)  # one row: y is constant, a singular normal matrix
    camera, obj = split_motion(row)
    assert torch.isfinite(camera).all() and obj.abs().max() < 1e-6
    single = torch.full((1, 1, 1, 2), 3.0)
    assert torch.isfinite(fit_affine(single)).all()
    assert torch.allclose(split_motion(single)[0], single, atol=1e-4)


def test_the_fit_is_deterministic():
    flow = zoom(0.04) + object_motion(6.0, 2.0) + ripple()
    assert torch.equal(fit_affine(flow), fit_affine(flow))


def _nan_flow() -> torch.Tensor:
    flow = pan(1.0, 1.0)
    flow[0, 3, 4, 1] = float("nan")
    return flow


@pytest.mark.parametrize(
    "flow",
    [torch.zeros(H, W, 2), torch.zeros(1, H, W, 3), torch.zeros(0, H, W, 2), torch.zeros(1, H, W, 2, dtype=torch.int64),
     _nan_flow(), [[0.0, 0.0]]],
    ids=["3d", "three_channels", "empty", "int", "nan", "not_a_tensor"],
)
def test_a_bad_flow_raises_naming_flow(flow):
    for fn in (fit_affine, split_motion, camera_share):
        with pytest.raises(ValueError, match=r"^flow: "):
            fn(flow)


@pytest.mark.parametrize(
    "weights",
    [torch.ones(H, W), torch.ones(1, H, W + 1), -torch.ones(1, H, W), torch.full((1, H, W), float("nan")),
     torch.ones(1, H, W, dtype=torch.int64)],
    ids=["2d", "wrong_width", "negative", "nan", "int"],
)
def test_bad_weights_raise_naming_weights(weights):
    with pytest.raises(ValueError, match=r"^weights: "):
        fit_affine(pan(1.0, 0.0), weights=weights)


def test_bad_params_and_constants_raise_naming_them():
    with pytest.raises(ValueError, match=r"^params: "):
        affine_flow(torch.zeros(1, 3, 3), H, W)
    with pytest.raises(ValueError, match=r"^height: "):
        affine_flow(torch.zeros(1, 2, 3), 0, W)
    for key, value in (("iters", 0), ("scale", 0.0), ("mad_floor", 0.0), ("ridge", -1.0)):
        with pytest.raises(ValueError, match=rf"^{key}: "):
            fit_affine(pan(1.0, 0.0), **{key: value})
