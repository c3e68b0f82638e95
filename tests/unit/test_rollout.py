"""Grouped rollouts and versioned weight hand-off in plain classes, for both model families (the Ray actors:
tests/ray/test_rollout_workers.py)."""

from __future__ import annotations

import pytest
import torch

from actors.sampler import Sampler
from motionnft_core.config import RolloutConfig
from motionnft_core.models.policy import EditPolicy
from motionnft_core.models.weights import PolicyWeights, PublishedWeights, WeightManifest, WeightMismatchError
from tests.conftest import FAMILIES, synthetic_examples

SIZE, K, STEPS = 32, 3, 3
LORA = {"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> list:
    """Two examples through the real data path (synthetic parquet -> MotionEditDataset), built once per module."""
    return synthetic_examples(tmp_path_factory.mktemp("rollout-data"), 4, size=SIZE, seed=0, take=2)


def _policy(path, family: str) -> EditPolicy:
    policy = EditPolicy.from_pretrained(str(path), family=family)
    policy.add_lora(**LORA)
    return policy


def _sampler(policy, micro_batch: int = 8, seed: int = 0) -> Sampler:
    cfg = RolloutConfig(group_size=K, num_steps=STEPS, height=SIZE, width=SIZE, micro_batch=micro_batch, seed=seed)
    return Sampler(policy, cfg)


def _published(state: dict[str, torch.Tensor], version: int, tensors) -> PublishedWeights:
    return PublishedWeights(version, WeightManifest.of(state, version=version, kind="lora").pack(), tensors)


def _perturbed(policy: EditPolicy, scale: float = 0.5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in policy.lora_state_dict().items()}


@pytest.fixture(scope="module", params=FAMILIES)
def family_policy(request, tiny_pipelines):
    return request.param, _policy(tiny_pipelines[request.param], request.param)


def test_group_shapes_and_distinct_candidates(family_policy, examples):
    family, policy = family_policy
    out = _sampler(policy).sample(examples, step=0, version=7)
    assert len(out) == 2
    for (group, images), ex in zip(out, examples, strict=True):
        assert group.prompt_id == ex.id and group.version == 7 and len(group.seeds) == K
        assert group.x0.shape[0] == K and group.x0.ndim == 3
        assert group.cond.batch == 1
        assert group.sigmas.shape == (STEPS,)
        assert images.shape == (K, 3, SIZE, SIZE) and images.dtype == torch.uint8
        flat = group.x0.flatten(1)
        for i in range(K):
            for j in range(i + 1, K):
                assert not torch.allclose(flat[i], flat[j]), f"{family}: candidates {i} and {j} are identical"


def test_same_seed_same_candidates_and_batching_invariance(family_policy, examples):
    _, policy = family_policy
    a = _sampler(policy, micro_batch=8).sample(examples, step=3, version=0)
    b = _sampler(policy, micro_batch=1).sample(examples, step=3, version=0)  # one candidate per call
    for (ga, ia), (gb, ib) in zip(a, b, strict=True):
        torch.testing.assert_close(ga.x0, gb.x0, rtol=1e-4, atol=1e-5)
        assert (ia.int() - ib.int()).abs().max() <= 1
    c = _sampler(policy, micro_batch=8).sample(examples, step=4, version=0)
    assert not torch.allclose(a[0][0].x0, c[0][0].x0)  # another step draws other noise
    # One candidate per prompt (the evaluation's K = 1) is candidate 0 of the full group: same seed, same edit.
    one = _sampler(policy, micro_batch=8).sample(examples, step=3, version=0, group_size=1)
    for (g1, _), (ga, _) in zip(one, a, strict=True):
        assert g1.x0.shape[0] == 1 and g1.seeds == ga.seeds[:1]
        torch.testing.assert_close(g1.x0, ga.x0[:1], rtol=1e-4, atol=1e-5)


def test_published_weights_change_output_and_v0_restores(family_policy, examples):
    _, policy = family_policy
    weights = PolicyWeights(policy, "lora")
    v0 = policy.lora_state_dict()
    base = _sampler(policy).sample(examples[:1], step=0, version=0)[0][0].x0
    v1 = _perturbed(policy)
    weights.load(1, WeightManifest.of(v1, version=1, kind="lora").pack(), v1)
    changed = _sampler(policy).sample(examples[:1], step=0, version=1)[0][0].x0
    assert weights.version == 1
    assert (changed - base).abs().max() > 1e-3
    weights.load(2, WeightManifest.of(v0, version=2, kind="lora").pack(), v0)
    restored = _sampler(policy).sample(examples[:1], step=0, version=2)[0][0].x0
    assert torch.equal(restored, base)


def test_mismatched_weights_are_rejected_and_old_kept(family_policy):
    _, policy = family_policy
    weights = PolicyWeights(policy, "lora")
    before = policy.lora_state_dict()
    bad = _perturbed(policy)
    name = sorted(bad)[0]
    bad[name] = torch.zeros(bad[name].shape[0] + 1, *bad[name].shape[1:])
    with pytest.raises(WeightMismatchError, match=name):
        weights.load(5, WeightManifest.of(bad, version=5, kind="lora").pack(), bad)
    missing = dict(_perturbed(policy))
    missing.pop(name)
    with pytest.raises(WeightMismatchError, match="lack tensor"):
        weights.load(5, WeightManifest.of(missing, version=5, kind="lora").pack(), missing)
    lying = _perturbed(policy)  # manifest says one thing, the tensors another
    manifest = WeightManifest.of(lying, version=5, kind="lora").pack()
    lying[name] = lying[name][:1]
    with pytest.raises(WeightMismatchError):
        weights.load(5, manifest, lying)
    after = policy.lora_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert weights.held is None  # a failed load leaves no published version held


def test_manifest_round_trip_is_compact():
    state = {"a.lora_A.weight": torch.zeros(4, 16), "a.lora_B.weight": torch.zeros(16, 4, dtype=torch.bfloat16)}
    m = WeightManifest.of(state, version=3, kind="lora")
    packed = m.pack()
    assert WeightManifest.unpack(packed) == m and len(packed) < 100 and m.numel == 128
