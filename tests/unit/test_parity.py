"""Weight parity after a push (part 5): a rollout that loads a published version checks that it
computes what the learner's policy computes and that the adapter really binds; broken adapters are caught."""

from __future__ import annotations

import functools

import pytest
import torch
from peft import set_peft_model_state_dict

from actors.rollout import RolloutWorker
from motionnft_core.config import ConfigError, RolloutConfig
from motionnft_core.models.parity import (
    ParityError,
    ParityProbe,
    bound_adapter_modules,
    check_parity,
    expected_adapter_modules,
    parity_error,
)
from motionnft_core.models.policy import EditPolicy
from motionnft_core.models.weights import PublishedWeights, WeightManifest, WeightMismatchError
from tests.conftest import FAMILY_PARAMS

SIZE = 32
ROLLOUT = RolloutConfig(group_size=2, num_steps=2, height=SIZE, width=SIZE, seed=3)
LORA = {"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


def _policy(path, family: str) -> EditPolicy:
    policy = EditPolicy.from_pretrained(str(path), family=family)
    policy.add_lora(**LORA)
    return policy


def _trained(policy: EditPolicy, seed: int = 1) -> dict[str, torch.Tensor]:
    """An adapter as after some training: B no longer zero, so it moves the output."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in policy.lora_state_dict().items()}


class _Published:
    """What the learner publishes for a version: manifest, tensors and its own output on the probe."""

    def __init__(self, learner: EditPolicy, state: dict[str, torch.Tensor], version: int) -> None:
        learner.load_lora_state_dict(state)
        self.state = state
        self.weights = PublishedWeights(
            version, WeightManifest.of(state, version=version, kind="lora").pack(), None,
            ParityProbe.build(learner, ROLLOUT).output(learner),
        )  # fmt: skip


@pytest.fixture(scope="module", params=FAMILY_PARAMS)
def pair(request, tiny_pipelines):
    """A learner-side policy and a rollout worker (plain class) on the same tiny pipeline."""
    path, family = tiny_pipelines[request.param], request.param
    worker = RolloutWorker("rollout-7", functools.partial(_policy, path, family), ROLLOUT, "lora")
    return _policy(path, family), worker


def test_a_correct_push_passes_and_records_its_error(pair):
    learner, worker = pair
    pub = _Published(learner, _trained(learner), version=4)
    worker.load(pub.weights, pub.state)
    assert worker.weights.held == ("sample", 4)
    assert worker.parity_error is not None and worker.parity_error <= ROLLOUT.parity_tolerance["float32"]
    manifest = WeightManifest.unpack(pub.weights.manifest)
    assert expected_adapter_modules(manifest) == bound_adapter_modules(worker.weights.policy.transformer) > 0


def test_an_adapter_under_a_wrong_key_prefix_is_refused_by_name(pair):
    """The classic silent failure: keys saved with the pipeline-level `transformer.` prefix bind to nothing in
    peft. Our loader compares names first and refuses the version, naming the key; the worker keeps no version."""
    learner, worker = pair
    worker.weights.forget()
    good = _Published(learner, _trained(learner, seed=2), version=5)
    prefixed = {f"transformer.{k}": v for k, v in good.state.items()}
    broken = PublishedWeights(5, WeightManifest.of(prefixed, version=5, kind="lora").pack(), None, good.weights.probe)
    with pytest.raises(WeightMismatchError, match="lack tensor"):
        worker.load(broken, prefixed)
    assert worker.weights.held is None


def test_an_adapter_that_silently_binds_nothing_is_caught_by_the_probe(pair):
    """The same prefixed adapter loaded by peft's own loader, which skips keys that match nothing (how a sync
    silently binds zero modules): no error, the adapter keeps its old values, and only the probe sees it."""
    learner, worker = pair
    pub = _Published(learner, _trained(learner, seed=3), version=6)
    rollout = worker.weights.policy
    before = rollout.lora_state_dict()
    prefixed = {f"transformer.{k}": v for k, v in pub.state.items()}
    set_peft_model_state_dict(rollout.transformer, prefixed)
    assert all(torch.equal(before[k], v) for k, v in rollout.lora_state_dict().items())  # nothing bound
    manifest = WeightManifest.unpack(pub.weights.manifest)
    with pytest.raises(ParityError, match=r"rollout-7: policy version 6 does not compute .* max error") as e:
        check_parity(rollout, worker.probe, pub.weights.probe, manifest, 1e-4, worker="rollout-7")
    assert parity_error(worker.probe.output(rollout), pub.weights.probe) > 1e-2
    assert "tolerance 0.0001 for float32" in str(e.value)


def test_an_adapter_left_disabled_is_counted_unbound_and_the_worker_refuses_to_sample(pair):
    """Adapters switched off (as by an interrupted reference forward): names and shapes fit, the probe output
    differs, and the count says why; the worker holds no version, so the next call loads and checks again."""
    learner, worker = pair
    pub = _Published(learner, _trained(learner, seed=4), version=7)
    worker.weights.policy.transformer.disable_adapters()
    try:
        with pytest.raises(ParityError, match=r"0 of \d+ adapter modules bound") as e:
            worker.load(pub.weights, pub.state)
        assert "version 7" in str(e.value) and "rollout-7" in str(e.value)
        assert worker.weights.held is None
    finally:
        worker.weights.policy.transformer.enable_adapters()
    worker.load(pub.weights, pub.state)  # fixed: the same version passes
    assert worker.weights.version == 7


def test_parity_error_is_relative_to_the_peak():
    published = torch.tensor([[2.0, -4.0]])
    assert parity_error(published.clone(), published) == 0.0
    assert parity_error(torch.tensor([[2.0, -3.0]]), published) == pytest.approx(0.25)
    assert parity_error(torch.zeros(1, 3), published) == float("inf")  # another shape never passes


def test_parity_tolerance_config_is_checked():
    with pytest.raises(ConfigError, match="rollout.parity_tolerance"):
        RolloutConfig(parity_tolerance={"float64": 1e-3})
    with pytest.raises(ConfigError, match=r"rollout.parity_tolerance.bfloat16"):
        RolloutConfig(parity_tolerance={"bfloat16": 0.0})
