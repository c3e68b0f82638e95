"""Optical-flow estimators: known shifts (classical), shapes/padding/batching and weight loading (RAFT)."""


import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torchvision.models.optical_flow import raft_small

from motionnft_core.config import ConfigError, FlowRewardConfig
from motionnft_core.net import free_port
from rewards.flow_model import ClassicalFlow, RAFTFlow, build_flow_estimator, check_flow_output

RAFT_UPDATES = 2  # refinements per RAFT call in these tests: shapes and loading do not need 12, CPU time does


def textured_image(height: int, width: int, seed: int = 0, blur: float = 2.0) -> np.ndarray:
    """Smooth random RGB texture, uint8 (H, W, 3): rich gradients everywhere, so flow is well defined."""
    noise = np.random.default_rng(seed).random((height, width, 3)).astype(np.float32)
    tex = cv2.GaussianBlur(noise, (0, 0), blur)
    return ((tex - tex.min()) / (tex.max() - tex.min()) * 255).round().astype(np.uint8)


def to_batch(*images: np.ndarray) -> torch.Tensor:
    return torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image in images])


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """RAFT at 128² is too small to gain from threads; on a busy 2-core box two OpenMP threads thrash (10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def random_raft_small():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return RAFTFlow("small", num_updates=RAFT_UPDATES, max_batch=2)


# ---- classical estimators ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dis", "farneback"])
@pytest.mark.parametrize(("dx", "dy"), [(3, -2), (-5, 4)])
def test_classical_recovers_a_known_shift(method, dx, dy):
    # np.roll moves content by (dx, dy): pixel (x, y) of src is at (x + dx, y + dy) in dst, so flow = (dx, dy).
    # Tolerance: an integer shift of a smooth texture is exactly representable, and both methods refine to a
    # few hundredths of a pixel (measured: DIS medium max 0.04 px, Farneback 0.01 px); 0.25 px max and
    # 0.05 px mean error leave margin for OpenCV versions yet fail for a sign error or a one-pixel bias.
    # The interior excludes 16 px at each border, where the wrap-around of np.roll breaks the shift.
    src = textured_image(160, 200, seed=1)
    dst = np.roll(src, (dy, dx), axis=(0, 1))
    flow = ClassicalFlow(method=method)(to_batch(src, src), to_batch(dst, src))
    assert flow.shape == (2, 160, 200, 2) and flow.dtype == torch.float32
    err = (flow[0, 16:-16, 16:-16] - torch.tensor([dx, dy], dtype=torch.float32)).abs()
    assert err.max().item() < 0.25, f"max error {err.max().item():.3f} px"
    assert err.mean().item() < 0.05, f"mean error {err.mean().item():.3f} px"
    # The second pair is (src, src): no motion.
    assert flow[1, 16:-16, 16:-16].abs().max().item() < 0.25


def test_classical_is_per_pair_deterministic():
    src = textured_image(96, 112, seed=2)
    dst = np.roll(src, (2, 3), axis=(0, 1))
    est = ClassicalFlow()
    both = est(to_batch(src, dst), to_batch(dst, src))
    assert torch.equal(both[0:1], est(to_batch(src), to_batch(dst)))
    assert torch.equal(both[1:2], est(to_batch(dst), to_batch(src)))


# ---- RAFT: shapes, padding, batching ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["small", "large"])
def test_raft_random_weights_batched_shapes(variant):
    with pytest.warns(UserWarning, match="RANDOM weights"):
        est = RAFTFlow(variant, num_updates=RAFT_UPDATES, max_batch=2)
    src = to_batch(*(textured_image(128, 128, seed=s) for s in range(3)))
    dst = src.roll(shifts=(2, 1), dims=(2, 3))
    flow = est(src, dst)  # 3 pairs in chunks of 2 and 1
    assert flow.shape == (3, 128, 128, 2) and flow.dtype == torch.float32
    # Chunking does not change a pair's flow (eval mode: no batch statistics). Tolerance: float32 kernels may
    # take different paths for different batch sizes.
    with pytest.warns(UserWarning, match="RANDOM weights"):
        one_chunk = RAFTFlow(variant, num_updates=RAFT_UPDATES, max_batch=8)(src, dst)
    diff = (flow - one_chunk).abs().max().item()
    assert diff < 1e-4, f"chunked vs single call: max diff {diff}"


@pytest.mark.parametrize(("height", "width"), [(130, 150), (64, 96), (127, 200)])
def test_raft_pads_and_resizes_to_the_input_size(random_raft_small, height, width):
    # 130 x 150: padded to 136 x 152; 64 x 96: resized up to 128 x 192 first; 127 x 200: both.
    src = to_batch(textured_image(height, width, seed=3), textured_image(height, width, seed=4))
    flow = random_raft_small(src, src.roll(1, dims=3))
    assert flow.shape == (2, height, width, 2) and flow.dtype == torch.float32
    assert torch.isfinite(flow).all()


def test_raft_small_input_contract_by_hand(random_raft_small):
    # 63 x 100 -> scale 128/63 -> 128 x 204 (ceil) -> replicate-pad width by 4 (2 left, 2 right) -> RAFT ->
    # crop -> bilinear back to 63 x 100 -> dx *= 100/204, dy *= 63/128 (the per-axis ratios differ here).
    src = to_batch(textured_image(63, 100, seed=7))
    dst = src.roll(2, dims=3)
    flow = random_raft_small(src, dst)
    images = torch.cat([src, dst]).float() / 127.5 - 1
    images = torch.nn.functional.interpolate(images, size=(128, 204), mode="bilinear", align_corners=False)
    images = torch.nn.functional.pad(images, (2, 2, 0, 0), mode="replicate")
    with torch.inference_mode():
        raw = random_raft_small.model(images[:1], images[1:], num_flow_updates=RAFT_UPDATES)[-1][..., 2:206]
    back = torch.nn.functional.interpolate(raw, size=(63, 100), mode="bilinear", align_corners=False)
    expected = (back * torch.tensor([100 / 204, 63 / 128]).view(1, 2, 1, 1)).permute(0, 2, 3, 1)
    diff = (flow - expected).abs().max().item()
    assert diff < 1e-5, f"max diff {diff}"


# ---- RAFT: weights ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_raft_small(tmp_path_factory):
    """A raft_small with weights unlike the seeded random init, saved as .pth and .safetensors."""
    torch.manual_seed(1234)
    model = raft_small(weights=None, progress=False).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder = tmp_path_factory.mktemp("raft")
    torch.save(state, folder / "raft_small.pth")
    save_file(state, folder / "raft_small.safetensors")
    return model, folder


def reference_flow(model: torch.nn.Module, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The torchvision model called by hand at a size needing no padding: [-1, 1] inputs, last refinement."""
    with torch.inference_mode():
        flows = model(src.float() / 127.5 - 1, dst.float() / 127.5 - 1, num_flow_updates=RAFT_UPDATES)
    return flows[-1].permute(0, 2, 3, 1)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_raft_loads_local_weights(saved_raft_small, random_raft_small, suffix):
    model, folder = saved_raft_small
    src = to_batch(textured_image(128, 136, seed=5))
    dst = src.roll(2, dims=2)
    est = RAFTFlow("small", weights=str(folder / f"raft_small{suffix}"), num_updates=RAFT_UPDATES, max_batch=2)
    flow = est(src, dst)
    assert torch.equal(flow, reference_flow(model, src, dst))
    # The loaded weights matter: the seeded random init gives a different flow.
    assert not torch.allclose(flow, random_raft_small(src, dst))


def test_raft_rejects_wrong_or_missing_weights(saved_raft_small, tmp_path):
    _, folder = saved_raft_small
    with pytest.raises(ValueError, match="not a RAFT-large state_dict"):
        RAFTFlow("large", weights=str(folder / "raft_small.pth"), num_updates=RAFT_UPDATES, max_batch=2)
    with pytest.raises(FileNotFoundError, match="no such file"):
        RAFTFlow("small", weights=str(tmp_path / "absent.pth"), num_updates=RAFT_UPDATES, max_batch=2)


def test_raft_nan_weights_raise_on_call(saved_raft_small, tmp_path):
    model, _ = saved_raft_small
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["update_block.flow_head.conv2.bias"].fill_(float("nan"))  # the last layer: every flow value becomes NaN
    torch.save(state, tmp_path / "nan.pth")
    est = RAFTFlow("small", weights=str(tmp_path / "nan.pth"), num_updates=1, max_batch=2)
    src = to_batch(textured_image(128, 128))
    with pytest.raises(ValueError, match=r"RAFTFlow\('small'\) produced \d+ NaN/inf"):
        est(src, src)


def test_raft_loads_weights_from_s3(saved_raft_small, tmp_path, monkeypatch):
    # A real S3 API (moto's server) reached through AWS_ENDPOINT_URL, as a MinIO endpoint would be.
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    model, folder = saved_raft_small
    port = free_port("127.0.0.1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # moto accepts any key
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        client = boto3.client("s3")
        client.create_bucket(Bucket="flow-weights")
        client.upload_file(str(folder / "raft_small.safetensors"), "flow-weights", "raft/small.safetensors")

        uri = "s3://flow-weights/raft/small.safetensors"
        cache = tmp_path / "cache"
        est = RAFTFlow("small", weights=uri, num_updates=RAFT_UPDATES, max_batch=2, cache_dir=cache)
        cached = cache / "flow-weights" / "raft" / "small.safetensors"
        assert cached.is_file()
        mtime = cached.stat().st_mtime_ns
        RAFTFlow("small", weights=uri, num_updates=RAFT_UPDATES, max_batch=2, cache_dir=cache)  # reuses the cached copy
        assert cached.stat().st_mtime_ns == mtime
        RAFTFlow("small", weights=uri, num_updates=RAFT_UPDATES, max_batch=2)  # no cache_dir: temporary download

        src = to_batch(textured_image(128, 128, seed=6))
        assert torch.equal(est(src, src.roll(3, dims=3)), reference_flow(model, src, src.roll(3, dims=3)))
        with pytest.raises(FileNotFoundError, match="s3 object not found: s3://.*absent.pth"):
            RAFTFlow("small", weights="s3://flow-weights/raft/absent.pth", num_updates=1, max_batch=2, cache_dir=cache)
    finally:
        server.stop()


# ---- input validation and the factory ---------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["dis", "raft"])
def test_bad_inputs_raise(estimator, random_raft_small):
    est = ClassicalFlow() if estimator == "dis" else random_raft_small
    image = to_batch(textured_image(128, 128))
    with pytest.raises(ValueError, match="src and dst sizes differ"):
        est(image, to_batch(textured_image(128, 136)))
    with pytest.raises(ValueError, match="src: expected dtype uint8"):
        est(image.float(), image)
    with pytest.raises(ValueError, match=r"dst: expected a non-empty uint8 batch \(B, 3, H, W\)"):
        est(image, image[0])


def test_check_flow_output_rejects_inf():
    flow = torch.zeros(1, 4, 4, 2)
    flow[0, 1, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="dis produced 1 NaN/inf"):
        check_flow_output(flow, "dis")


def test_build_flow_estimator_from_config():
    assert isinstance(build_flow_estimator(FlowRewardConfig(estimator="dis")), ClassicalFlow)
    assert build_flow_estimator(FlowRewardConfig(estimator="farneback")).method == "farneback"
    with pytest.warns(UserWarning, match="RANDOM"):
        raft = build_flow_estimator(FlowRewardConfig(estimator="raft_small", num_updates=3, max_batch=4))
    assert (raft.variant, raft.num_updates, raft.max_batch) == ("small", 3, 4)
    with pytest.raises(ConfigError, match="reward.flow.estimator"):
        FlowRewardConfig(estimator="gmflow")
    with pytest.raises(ValueError, match="preset"):
        ClassicalFlow(preset="slow")
    with pytest.raises(ValueError, match="variant"):
        RAFTFlow("huge", num_updates=1, max_batch=1)
