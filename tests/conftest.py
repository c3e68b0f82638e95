"""Shared pytest fixtures.

S3: ``s3_server`` runs moto's standalone S3 server as a real process on loopback (boto3 talks HTTP to it,
exactly as to AWS or MinIO) and points the standard AWS environment at it for the whole session;
``s3_bucket`` gives each test a fresh, empty bucket on that server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from motionnft_core.net import free_port

# ------------------------------------------------------------------------------------------------ tests by kind

TESTS = Path(__file__).resolve().parent
KINDS = ("unit", "ray", "system")  # no Ray; the session's shared Ray cluster; whole runs (all slow)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects anything: every collected test is checked
def pytest_collection_modifyitems(config, items):
    """Each test sits in its kind's folder (docs/development.md, "Tests"): every test under tests/system is
    marked slow, and no test under tests/unit uses the session's Ray cluster."""
    wrong = []
    for item in items:
        parts = item.path.resolve().relative_to(TESTS).parts
        kind = parts[0] if len(parts) > 1 else ""
        if kind not in KINDS:
            wrong.append(f"{item.nodeid}: a test file belongs in tests/unit, tests/ray or tests/system")
        elif kind == "system" and item.get_closest_marker("slow") is None:
            wrong.append(f"{item.nodeid}: tests/system holds whole runs, all slow: mark the module (pytestmark)")
        elif kind == "unit" and "ray_cluster" in item.fixturenames:
            wrong.append(f"{item.nodeid}: uses the Ray cluster (ray_cluster): it belongs in tests/ray")
    if wrong:
        raise pytest.UsageError("tests in the wrong place:\n" + "\n".join(wrong))


# ------------------------------------------------------------------------------------------------ S3 (moto)

MOTO_START_TIMEOUT_S = 30.0
MOTO_START_ATTEMPTS = 3  # a freshly picked free port can be taken by someone else before moto binds it
_AWS_ENV_CLEARED = (  # would otherwise override the test endpoint/credentials or read host config
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)


def _wait_until_answering(proc: subprocess.Popen, endpoint: str, timeout_s: float) -> bool:
    """Poll until the server answers HTTP; False if the process died or the time ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1.0):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means it is serving
        except OSError:
            time.sleep(0.1)
    return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server process on 127.0.0.1; yields its endpoint URL (``http://127.0.0.1:<port>``).

    For the session it sets AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID=test, AWS_SECRET_ACCESS_KEY=test and
    AWS_DEFAULT_REGION=us-east-1 (clearing profile/session variables that would override them), so any
    ``boto3.client("s3")`` reaches the server; the environment is restored and the process stopped at the end.
    """
    log_dir = tmp_path_factory.mktemp("moto")
    proc, endpoint, log_path = None, None, None
    for attempt in range(MOTO_START_ATTEMPTS):
        port = free_port("127.0.0.1")
        endpoint = f"http://127.0.0.1:{port}"
        log_path = log_dir / f"moto-{attempt}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if _wait_until_answering(proc, endpoint, MOTO_START_TIMEOUT_S):
            break
        _stop(proc)
        proc = None
    if proc is None:
        pytest.fail(f"moto server did not start in {MOTO_START_ATTEMPTS} attempts; last log:\n{log_path.read_text()}")

    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in _AWS_ENV_CLEARED:
                mp.delenv(name, raising=False)
            mp.setenv("AWS_ENDPOINT_URL", endpoint)
            mp.setenv("AWS_ACCESS_KEY_ID", "test")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "test")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
            yield endpoint
    finally:
        _stop(proc)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the moto server (unique name); emptied and deleted after the test."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield name
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=name):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=name, Delete={"Objects": keys})
    client.delete_bucket(Bucket=name)


# ------------------------------------------------------------------------------------------------ models, Ray

FAMILIES = ("flux_kontext", "qwen_image_edit", "qwen_image_edit_plus", "flux2_klein", "flux2_dev")
# Tests parametrized by family: the first two families in the fast loop, every family in the whole suite (the
# newer families' own fast tests are in tests/unit/test_families.py and test_flux2.py).
FAMILY_PARAMS = [pytest.param(f, marks=() if f in FAMILIES[:2] else pytest.mark.slow) for f in FAMILIES]


EDIT_PROMPT = "move the red square to the left"
DOUBLE_STREAM_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def random_input_images(n: int, seed: int, size: int = 64) -> list:
    """`n` random uint8 input images (1, 3, size, size): one per input slot of a multi-image family."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, 3, size, size), generator=g, dtype=torch.uint8) for _ in range(n)]


def to_pil(image):
    """A (1, 3, H, W) uint8 image as the PIL image a stock pipeline takes."""
    from PIL import Image

    return Image.fromarray(image[0].permute(1, 2, 0).numpy())


def synthetic_examples(folder: Path, n: int, *, size: int, seed: int, take: int | None = None) -> list:
    """`take` (default all) of `n` synthetic examples through the real data path (parquet -> MotionEditDataset)."""
    from motionnft_core.data.motionedit import MotionEditDataset
    from motionnft_core.data.synthetic import generate_synthetic

    src = generate_synthetic(folder, n, size=size, seed=seed)
    data = MotionEditDataset.from_source(str(src), resolution=(size, size), on_error="raise")
    return [data[i] for i in range(len(data) if take is None else take)]


def random_lora_policy(pipeline_dir: Path, family: str):
    """The tiny policy with a rank-4 adapter on DOUBLE_STREAM_TARGETS (the family's own layers added) holding seeded
    random weights, so an export of it changes what the stock pipeline computes."""
    import torch

    from motionnft_core.models.policy import EditPolicy

    policy = EditPolicy.from_pretrained(pipeline_dir, family=family)
    policy.add_lora(rank=4, alpha=8, target_modules=DOUBLE_STREAM_TARGETS)
    g = torch.Generator().manual_seed(7)
    trained = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in policy.lora_state_dict().items()}
    policy.load_lora_state_dict(trained)
    return policy


def assert_the_stock_pipeline_loads_the_export(policy, pipeline_dir: Path, folder: Path, targets: list[str]):
    """Exports `policy`'s adapter (on `targets`) into `folder`, loads it into the stock diffusers pipeline with
    `load_lora_weights`, and checks the velocity moves from the base one to exactly the policy's; returns that
    pipeline."""
    import torch

    from learner.trainer.checkpoint import export_lora
    from motionnft_core.models.policy import EditPolicy

    export_lora(policy.lora_state_dict(), folder, family=policy.family, rank=4, alpha=8, targets=targets)
    stock = type(policy.pipe).from_pretrained(pipeline_dir)
    loaded = EditPolicy.from_pipe(stock)
    cond = loaded.encode([EDIT_PROMPT], random_input_images(2, seed=5))
    x = loaded.prepare_latents(1, 64, 64, torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        v_base = loaded.velocity(x, sigma, cond)
        stock.load_lora_weights(folder, adapter_name="default")
        v_loaded = loaded.velocity(x, sigma, cond)
        v_trained = policy.velocity(x, sigma, cond)
    assert (v_loaded - v_base).abs().max() > 1e-3  # the adapter changes the stock pipeline's output ...
    torch.testing.assert_close(v_loaded, v_trained, atol=1e-6, rtol=0)  # ... exactly as trained
    return stock


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory) -> dict:
    """Both tiny random pipelines, built offline once per session (saved with save_pretrained)."""
    from motionnft_core.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("tiny_pipelines")
    return {family: build_tiny(family, root / family, seed=0) for family in FAMILIES}


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray cluster for the session (token auth off: it listens on loopback only)."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not ray.is_initialized():  # workers report metrics every 1 s (Ray's default: 10 s) for tests that scrape them
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 _system_config={"metrics_report_interval_ms": 1000})  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory) -> dict[str, Path]:
    """Both tiny pipelines under the session's base temp dir, built once (build_tiny is idempotent)."""
    from motionnft_core.models.tiny import build_tiny

    root = tmp_path_factory.getbasetemp() / "tiny"  # shared with test_checkpoint
    return {family: build_tiny(family, root / family) for family in ("flux_kontext", "qwen_image_edit")}


@pytest.fixture(scope="module")
def world1(tmp_path_factory):
    """A world-1 gloo group in this process (NFTTrainer needs torch.distributed even alone); the thread count and
    the cuDNN SDPA switch (a trainer sets it, process-wide) are what they were after the module."""
    import torch
    import torch.distributed as dist

    store = tmp_path_factory.mktemp("dist") / "store"
    threads = torch.get_num_threads()
    cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()
    torch.set_num_threads(1)  # the box is shared; one thread is faster than contending for two
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    torch.set_num_threads(threads)
    torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)


# ------------------------------------------------------------------------------------ the learning demo's warm start

LEARN_DEMO = Path(__file__).resolve().parents[1] / "configs" / "learn_demo.yaml"
DEMO_BUILD_TIMEOUT_S = 1200.0


def _lowest_priority() -> None:
    """In the child before exec: run only on CPU time nothing else wants (SCHED_IDLE; nice 19 where refused)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


@pytest.fixture(scope="session", autouse=True)
def _demo_built_early(request, tmp_path_factory):
    """When the learning demo's tests are selected, its warm start (about 3 min of CPU) is built from the session's
    start by `python -m motionnft_core.models.warmstart`, at the lowest CPU priority: the tests before it leave a
    third of the
    CPU idle while they wait on Ray, servers and restarts, so the demo finds it built. Yields (process, cache dir,
    log) or None; the process is stopped at the end if it still runs."""
    if not any(item.path.name == "test_learning_demo.py" for item in request.session.items):
        yield None
        return
    cache = tmp_path_factory.mktemp("learn_demo_cache")
    log = cache.parent / "learn_demo_cache.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "motionnft_core.models.warmstart", "--config", str(LEARN_DEMO),
                                 f"model.cache_dir={cache}"], cwd=LEARN_DEMO.parents[1], env=env, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=_lowest_priority)  # fmt: skip
    try:
        yield proc, cache, log
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def demo_cache(_demo_built_early) -> Path:
    """`model.cache_dir` holding the learning demo's data and warm start, once the early build has finished."""
    assert _demo_built_early is not None, "the learning demo's build starts only when its tests are selected"
    proc, cache, log = _demo_built_early
    try:
        rc = proc.wait(timeout=DEMO_BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the learning demo's warm start was not built in {DEMO_BUILD_TIMEOUT_S:.0f} s: {log}")
    assert rc == 0, f"building the learning demo's warm start failed ({log}):\n" + log.read_text()[-4000:]
    return cache


# ------------------------------------------------------------------------------------------------ vLLM judge


@pytest.fixture(scope="session")
def vllm_judge(tmp_path_factory):
    """One real vLLM server (the tiny random Qwen2-VL judge, CPU, on 127.0.0.1) for the whole session: each
    start costs ~17 s on 2 cores, so the tests that only need a live judge share this one."""
    from motionnft_core.config import JudgeConfig
    from motionnft_core.models.tiny_judge import build_tiny_judge
    from rewards.judge_server import VLLMServer

    path = build_tiny_judge(tmp_path_factory.mktemp("judge") / "tiny_judge")
    log = tmp_path_factory.mktemp("vllm-judge") / "vllm.log"
    with VLLMServer(path, JudgeConfig(max_model_len=2048), log_path=log) as server:
        print(f"vLLM start-up {server.startup_s:.1f} s")
        yield server
