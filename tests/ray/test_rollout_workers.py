"""Rollout workers as Ray actors: versioned weights handed over by reference with each call, for both model
families (the plain sampler and weight hand-off: tests/unit/test_rollout.py)."""

from __future__ import annotations

import functools

import pytest
import torch

from actors.rollout import RolloutWorker
from actors.sampler import Sampler
from motionnft_core.config import ModelConfig, NFTConfig, RolloutConfig
from motionnft_core.models.policy import load_policy
from motionnft_core.models.weights import PublishedWeights, WeightManifest
from tests.conftest import FAMILY_PARAMS, synthetic_examples

SIZE, K, STEPS = 32, 3, 3
LORA = {"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> list:
    """Two examples through the real data path (synthetic parquet -> MotionEditDataset), built once per module."""
    return synthetic_examples(tmp_path_factory.mktemp("rollout-data"), 4, size=SIZE, seed=0, take=2)


def _published(state: dict[str, torch.Tensor], version: int, tensors) -> PublishedWeights:
    return PublishedWeights(version, WeightManifest.of(state, version=version, kind="lora").pack(), tensors)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_rollout_workers_on_ray(ray_cluster, tiny_pipelines, family, examples, tmp_path):
    """Two rollout actors get versioned weights handed over by reference with each call and sample groups."""
    ray = ray_cluster
    model = ModelConfig(family=family, dtype="float32", cache_dir=str(tmp_path / "cache"))
    lora = NFTConfig(lora_rank=LORA["rank"], lora_alpha=LORA["alpha"], lora_targets=tuple(LORA["target_modules"]))
    spec = functools.partial(load_policy, model, str(tiny_pipelines[family]), use_gpu=False, lora=lora)
    cfg = RolloutConfig(group_size=K, num_steps=STEPS, height=SIZE, width=SIZE, micro_batch=8, seed=0)
    workers = [ray.remote(num_cpus=0.5)(RolloutWorker).remote(f"r{i}", spec, cfg, "lora") for i in range(2)]
    ray.get([w.ready.remote() for w in workers])
    local = spec()
    v0 = local.lora_state_dict()
    w0 = _published(v0, 0, ray.put(v0))
    refs_in = [ray.put(e) for e in examples]

    refs = workers[0].sample.options(num_returns=6).remote(0, w0, *refs_in)
    group0, images0, meta0 = ray.get(refs[0]), ray.get(refs[1]), ray.get(refs[2])
    assert meta0["version"] == 0 and group0.version == 0 and images0.shape == (K, 3, SIZE, SIZE)
    # The plain Sampler with the same weights gives the same candidates as the actor.
    expected = Sampler(local, cfg).sample(examples, step=0, version=0)[0][0].x0
    torch.testing.assert_close(group0.x0, expected)

    g = torch.Generator().manual_seed(1)
    v1 = {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in v0.items()}
    w1 = _published(v1, 1, ray.put(v1))
    g1 = ray.get(workers[0].sample.options(num_returns=3).remote(0, w1, refs_in[0])[0])
    assert g1.version == 1 and not torch.allclose(g1.x0, group0.x0)
    # The second worker never sampled at v0: it loads v1 straight away and samples exactly what the first does.
    g1b = ray.get(workers[1].sample.options(num_returns=3).remote(0, w1, refs_in[0])[0])
    torch.testing.assert_close(g1b.x0, g1.x0)
    # A worker that already holds a version does not load it again: a handle of version 1 whose reference holds
    # other tensors (same names and shapes) changes nothing.
    other = _published(v1, 1, ray.put({k: torch.randn_like(v) for k, v in v1.items()}))
    again = ray.get(workers[0].sample.options(num_returns=3).remote(0, other, refs_in[0])[0])
    torch.testing.assert_close(again.x0, g1.x0)
    # Mismatched weights are refused by the worker (naming the tensor) and it keeps sampling with v1.
    bad = {k: v[:1] for k, v in v1.items()}
    with pytest.raises(ray.exceptions.RayTaskError, match="WeightMismatchError"):
        ray.get(workers[0].sample.options(num_returns=3).remote(0, _published(bad, 2, ray.put(bad)), refs_in[0])[0])
    still = ray.get(workers[0].sample.options(num_returns=3).remote(0, w1, refs_in[0])[0])
    assert still.version == 1
    torch.testing.assert_close(still.x0, g1.x0)
    for a in workers:
        ray.kill(a)
