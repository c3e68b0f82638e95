"""Camera motion versus object motion in an optical-flow field.

Pure torch, batched, CPU or GPU. A pixel flow (B, H, W, 2), last dim (dx, dy), is split into the dominant global
motion of the frame (the camera) and what is left (the objects). Video curation uses the split to drop pairs whose
motion is mostly the camera's; the flow reward uses it to compensate camera motion.

The camera motion is an affine map of the image plane: pan, zoom, rotation and shear of a distant scene are all
affine, and a homography's projective terms are negligible over clips of a few seconds at the resolutions used
here. It is fitted by iteratively reweighted least squares (IRLS) with Tukey's biweight on the per-pixel residual
magnitude, not by RANSAC: IRLS is deterministic (no random sampling, so the same flow always gives the same split)
and runs a whole batch as a few batched 3x3 solves. A moving object covering a minority of the pixels ends with
zero weight, so it does not bend the fit. The constants are keyword arguments with these defaults.
"""

import math

import torch

IRLS_ITERS = 20  # reweighting rounds after the median-translation start
IRLS_SCALE = 4.685  # Tukey biweight constant c: a residual beyond c·sigma gets weight 0 (95% efficiency at a Gaussian)
MAD_FLOOR = 0.01  # pixels: floor of sigma, so an exactly fitted background (sigma 0) never divides by zero
RIDGE = 1e-9  # relative ridge on the normal equations: keeps degenerate inputs (a single row, all weight on one pixel)
# solvable without moving a well-posed fit measurably

# sigma of per-component Gaussian noise from the median of the residual *magnitude* |r|, which is Rayleigh
# distributed with median sigma·sqrt(2 ln 2): the 2-D counterpart of the 1-D factor 1.4826.
_MEDIAN_TO_SIGMA = 1.0 / math.sqrt(2.0 * math.log(2.0))


def check_flow(name: str, flow: object) -> None:
    """Raise ValueError naming `name` unless flow is a finite floating (B, H, W, 2) tensor."""
    if not isinstance(flow, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(flow).__name__}")
    if flow.ndim != 4 or flow.shape[-1] != 2:
        raise ValueError(f"{name}: expected shape (B, H, W, 2), got {tuple(flow.shape)}")
    if min(flow.shape[:3]) == 0:
        raise ValueError(f"{name}: empty flow of shape {tuple(flow.shape)}")
    if not flow.is_floating_point():
        raise ValueError(f"{name}: expected a floating dtype, got {flow.dtype}")
    if not torch.isfinite(flow).all():
        bad = (~torch.isfinite(flow)).sum().item()
        raise ValueError(f"{name}: flow has {bad} NaN/inf values")


def _check_weights(weights: object, flow: torch.Tensor) -> None:
    """Raise ValueError naming `weights` unless it is a finite, non-negative (B, H, W) tensor matching flow."""
    if not isinstance(weights, torch.Tensor):
        raise ValueError(f"weights: expected a torch.Tensor or None, got {type(weights).__name__}")
    if tuple(weights.shape) != tuple(flow.shape[:3]):
        raise ValueError(f"weights: expected shape {tuple(flow.shape[:3])} (B, H, W), got {tuple(weights.shape)}")
    if weights.dtype != torch.bool:
        if not weights.is_floating_point():
            raise ValueError(f"weights: expected a floating or bool dtype, got {weights.dtype}")
        if not torch.isfinite(weights).all():
            raise ValueError("weights: has NaN/inf values")
        if (weights < 0).any():
            raise ValueError("weights: has negative values")


def _check_size(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is upcast: the normal equations need at least float32."""
    return torch.promote_types(dtype, torch.float32)


def pixel_grid(
    height: int, width: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Pixel centres (x, y), origin at the image centre, divided by the half-diagonal: (H, W, 2).

    Centring and scaling to |p| <= 1 keep the fit's 3x3 normal equations well conditioned at any resolution
    (raw pixel coordinates would mix entries of order 1 and of order H·W); it changes only the parametrisation,
    not the affine flows that can be represented.
    """
    _check_size("height", height)
    _check_size("width", width)
    half_diag = 0.5 * math.sqrt(height * height + width * width)
    xs = (torch.arange(width, dtype=torch.float64, device=device) + 0.5 - width / 2) / half_diag
    ys = (torch.arange(height, dtype=torch.float64, device=device) + 0.5 - height / 2) / half_diag
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2): [..., 0] = x, [..., 1] = y
    return grid.to(dtype)


def _homogeneous(height: int, width: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(H·W, 3) rows (x, y, 1) of the normalised pixel grid."""
    grid = pixel_grid(height, width, dtype=dtype, device=device).reshape(-1, 2)
    return torch.cat([grid, torch.ones_like(grid[:, :1])], dim=1)


def _weighted_median(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Lower weighted median of each row of values (B, N) -> (B,); sort based, so deterministic.

    Without weights it is the lower median, by kthvalue (linear time instead of a sort).
    """
    if weights is None:
        return values.kthvalue((values.shape[1] + 1) // 2, dim=1).values
    ordered, order = values.sort(dim=1, stable=True)
    cum = weights.gather(1, order).cumsum(dim=1)
    half = 0.5 * cum[:, -1:]
    k = (cum < half).sum(dim=1, keepdim=True).clamp_max(values.shape[1] - 1)
    return ordered.gather(1, k).squeeze(1)


def _solve(points: torch.Tensor, target: torch.Tensor, w: torch.Tensor, ridge: float) -> torch.Tensor:
    """Weighted least squares of target (B, N, 2) on points (N, 3) with weights w (B, N) -> params (B, 2, 3)."""
    normal = torch.einsum("ni,bn,nj->bij", points, w, points)  # (B, 3, 3)
    rhs = torch.einsum("ni,bn,bnc->bic", points, w, target)  # (B, 3, 2)
    # the ridge scales with the total weight (a relative damping), plus the smallest normal number so an all-zero
    # weight map still solves (to zero motion) instead of failing
    damp = ridge * w.sum(dim=1) + torch.finfo(w.dtype).tiny  # (B,)
    eye = torch.eye(3, dtype=w.dtype, device=w.device)
    solution = torch.linalg.solve(normal + damp[:, None, None] * eye, rhs)  # (B, 3, 2)
    return solution.transpose(1, 2)


def fit_affine(
    flow: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    iters: int = IRLS_ITERS,
    scale: float = IRLS_SCALE,
    mad_floor: float = MAD_FLOOR,
    ridge: float = RIDGE,
) -> torch.Tensor:
    """The dominant (camera) motion of each flow as affine params A (B, 2, 3), in pixels per normalised point.

    The camera flow at the normalised pixel p = (x, y, 1) of `pixel_grid` is A @ p. The fit starts from the
    weighted median translation (robust to any minority motion from the first round), then repeats `iters`
    times: residual magnitudes |flow − A p|, sigma = max(median residual · 1/sqrt(2 ln 2), mad_floor), Tukey
    weight (1 − (r / (scale·sigma))²)² (zero beyond scale·sigma) times the prior `weights`, and a weighted
    least-squares solve of the 3x3 normal equations (with a tiny relative `ridge`, so never singular, never NaN).

    flow: (B, H, W, 2) pixels; weights: optional (B, H, W) non-negative prior weights, e.g. a validity mask.
    Half-precision input is fitted in float32; the params have the working dtype.
    Raises ValueError naming the argument for a wrong shape, dtype, NaN/inf or a bad constant.
    """
    check_flow("flow", flow)
    if weights is not None:
        _check_weights(weights, flow)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters: expected a positive int, got {iters!r}")
    if not scale > 0:
        raise ValueError(f"scale: expected > 0, got {scale!r}")
    if not mad_floor > 0:
        raise ValueError(f"mad_floor: expected > 0, got {mad_floor!r}")
    if not ridge >= 0:
        raise ValueError(f"ridge: expected >= 0, got {ridge!r}")

    batch, height, width, _ = flow.shape
    dtype = _work_dtype(flow.dtype)
    target = flow.to(dtype).reshape(batch, -1, 2)  # (B, N, 2)
    points = _homogeneous(height, width, dtype=dtype, device=flow.device)  # (N, 3)
    prior = None if weights is None else weights.to(dtype).reshape(batch, -1)  # (B, N)

    params = torch.zeros(batch, 2, 3, dtype=dtype, device=flow.device)
    params[:, 0, 2] = _weighted_median(target[..., 0], prior)
    params[:, 1, 2] = _weighted_median(target[..., 1], prior)
    for _ in range(iters):
        residual = torch.linalg.vector_norm(target - points @ params.transpose(1, 2), dim=-1)  # (B, N)
        sigma = (_weighted_median(residual, prior) * _MEDIAN_TO_SIGMA).clamp_min(mad_floor)  # (B,)
        u = residual / (scale * sigma[:, None])
        w = (1.0 - u * u).clamp_min(0.0).square()
        if prior is not None:
            w = w * prior
        params = _solve(points, target, w, ridge)
    return params


def affine_flow(params: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The flow (B, H, W, 2) in pixels of affine params (B, 2, 3) on an H×W frame (see `fit_affine`)."""
    if not isinstance(params, torch.Tensor):
        raise ValueError(f"params: expected a torch.Tensor, got {type(params).__name__}")
    if params.ndim != 3 or tuple(params.shape[1:]) != (2, 3):
        raise ValueError(f"params: expected shape (B, 2, 3), got {tuple(params.shape)}")
    if not params.is_floating_point():
        raise ValueError(f"params: expected a floating dtype, got {params.dtype}")
    _check_size("height", height)
    _check_size("width", width)
    dtype = _work_dtype(params.dtype)
    points = _homogeneous(height, width, dtype=dtype, device=params.device)  # (N, 3)
    return (points @ params.to(dtype).transpose(1, 2)).reshape(params.shape[0], height, width, 2)


def split_motion(flow: torch.Tensor, **fit_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(camera, object) flows, both (B, H, W, 2) pixels: camera = the fitted affine flow, object = flow − camera.

    fit_kwargs go to `fit_affine` (weights, iters, scale, mad_floor, ridge). Both have the fit's working dtype
    (half precision comes back as float32).
    """
    params = fit_affine(flow, **fit_kwargs)
    camera = affine_flow(params, flow.shape[1], flow.shape[2])
    return camera, flow.to(camera.dtype) - camera


def camera_share(flow: torch.Tensor, **fit_kwargs) -> torch.Tensor:
    """Share (B,) in [0, 1] of the motion explained by the camera: mean|camera| / (mean|camera| + mean|object|).

    Magnitudes are per pixel, means over all pixels (weighted by the prior `weights` when given, so masked-out
    pixels do not count). A still flow (both means 0) has share 0: no camera motion. fit_kwargs go to `fit_affine`.
    """
    camera, obj = split_motion(flow, **fit_kwargs)
    cam = torch.linalg.vector_norm(camera, dim=-1)  # (B, H, W)
    rest = torch.linalg.vector_norm(obj, dim=-1)
    weights = fit_kwargs.get("weights")
    if weights is not None:  # the means' common denominator cancels in the ratio
        cam, rest = cam * weights.to(cam.dtype), rest * weights.to(cam.dtype)
    cam, rest = cam.mean(dim=(1, 2)), rest.mean(dim=(1, 2))
    total = cam + rest
    return torch.where(total > 0, cam / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total))
