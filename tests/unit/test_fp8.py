"""FP8 no-grad forwards (a lower-precision lever, motionnft_core/models/fp8.py): the quantization by hand, the layer
against its own float emulation and against the plain layer, and the tiny policies sampling and computing their
reference forwards in FP8 within a stated tolerance of full precision, while everything with gradients, the parity probe
and the evaluation stay exact. CPU `torch._scaled_mm` runs the same row-wise product the GPU does. FP8 in regionally
compiled blocks: tests/unit/test_levers.py (it shares that test's compilation)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from actors.sampler import ReferenceForwards, Sampler
from motionnft_core.config import ConfigError, RolloutConfig
from motionnft_core.config_loader import load_config
from motionnft_core.models import fp8
from motionnft_core.models.parity import ParityProbe
from motionnft_core.models.policy import EditPolicy
from motionnft_core.models.weights import PolicyWeights, WeightManifest
from tests.conftest import FAMILY_PARAMS
from tests.learner_harness import EditPrompt, edit_prompts

SIZE = 32
ROLLOUT = RolloutConfig(group_size=2, num_steps=3, height=SIZE, width=SIZE, micro_batch=4, seed=5)
LORA = {"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
LAYER_TOL = 0.05  # relative L2 error of one FP8 layer: 3 mantissa bits round by <= 1/16, ~2-3 % after the sum
MODEL_TOL = 0.03  # relative L2 error of the tiny transformers' velocities and sampled latents (measured 0.2-1 %)
# A trained adapter moves a layer by a fraction of its weight. Far larger random adapters (B ~ 0.3 N(0, 1): updates
# 3.5x the weight, 7.9x on FLUX.2's single-block `attn.to_out`) make FLUX.2's single blocks, whose adapters also drive
# the fused MLP input and output, a random map of high gain: the FP8 error of their 512 text tokens then reached
# 1.5-6 % in v_old (flux2_dev mean 3.4 %, klein 2.7 %, over ten timesteps; 0.2-0.7 % with the adapter off; Kontext
# 1 %). At a share of 0.5 every family measures 0.3-1 %.
ADAPTER_SHARE = 0.5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_quantization_by_hand():
    x = torch.tensor([[896.0, 1.0, -0.5, 0.0], [448.0, 3.3, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    scale = fp8.rowwise_scale(x)
    assert scale.flatten().tolist() == [2.0, 1.0, 1.0]  # amax / 448; an all-zero row keeps scale 1
    q = fp8.to_fp8(x, scale)
    assert q.dtype == torch.float8_e4m3fn
    back = q.float() * scale
    # 896/2 = 448 (the largest e4m3 value), 0.5 and 0.25 are exact; 3.3 lies between 3.25 and 3.5 (3 mantissa bits
    # give steps of 0.25 in [2, 4)) and rounds to 3.25.
    assert back.tolist() == [[896.0, 1.0, -0.5, 0.0], [448.0, 3.25, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert fp8.to_fp8(torch.tensor([[1000.0]]), torch.ones(1, 1)).float().item() == 448.0  # saturates


def _layer(seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(64, 48, bias=bias)


def test_fp8_layer_is_its_float_emulation_and_close_to_the_plain_layer():
    layer = _layer()
    x = torch.randn(2, 7, 64)
    plain = layer(x).detach()
    assert fp8.convert([layer]) == 1 and isinstance(layer, fp8.FP8Linear)
    with torch.no_grad(), fp8.fp8_forwards(layer):
        got = layer(x)
    xs, ws = fp8.rowwise_scale(x.reshape(-1, 64)), fp8.rowwise_scale(layer.weight)
    emulated = (fp8.to_fp8(x.reshape(-1, 64), xs).float() * xs) @ (fp8.to_fp8(layer.weight, ws).float() * ws).T
    torch.testing.assert_close(got, (emulated + layer.bias).reshape(2, 7, 48), rtol=1e-5, atol=1e-5)
    assert 0 < rel(got, plain) < LAYER_TOL


def test_fp8_layer_is_exact_with_gradients_or_when_off_and_keeps_its_keys():
    layer, plain = _layer(), _layer()
    keys = list(layer.state_dict())
    fp8.convert([layer])
    assert list(layer.state_dict()) == keys  # the float8 copy is not saved or published
    x = torch.randn(5, 64, requires_grad=True)
    with fp8.fp8_forwards(layer):
        y = layer(x)  # gradients on: the plain product
    assert torch.equal(y, plain(x))
    y.sum().backward()
    assert layer.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))  # FP8 off (the default)
        with fp8.fp8_forwards(layer):
            assert not torch.equal(layer(x), plain(x))
        assert not layer.fp8_on  # restored on leaving


def test_refresh_follows_a_changed_weight():
    layer = _layer()
    fp8.convert([layer])
    with torch.no_grad():
        layer.weight.mul_(3.0)
        fp8.refresh(layer)
        x = torch.randn(4, 64)
        with fp8.fp8_forwards(layer):
            got = layer(x)
        assert rel(got, nn.functional.linear(x, layer.weight, layer.bias)) < LAYER_TOL


def test_only_aligned_plain_linears_outside_adapters_and_modulations_convert():
    block = nn.ModuleDict({
        "to_q": nn.Linear(32, 32), "odd": nn.Linear(32, 20), "norm": nn.ModuleDict({"linear": nn.Linear(32, 96)}),
        "lora_A": nn.Linear(32, 16), "img_mod": nn.Sequential(nn.SiLU(), nn.Linear(32, 192)),
    })  # fmt: skip
    assert fp8.convert([block]) == 1
    assert isinstance(block["to_q"], fp8.FP8Linear)
    assert not any(isinstance(block[k], fp8.FP8Linear) for k in ("odd", "lora_A"))
    assert not isinstance(block["norm"]["linear"], fp8.FP8Linear) and not isinstance(block["img_mod"][1], fp8.FP8Linear)
    assert fp8.convert([block]) == 1  # idempotent


def test_devices_without_fp8_products_are_refused():
    with pytest.raises(ValueError, match="no FP8 matrix products on mps"):
        fp8.check_fp8_device(torch.device("mps"))
    fp8.check_fp8_device(torch.device("cpu"))


def test_fp8_reference_needs_the_reference_forwards_on_the_rollout(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {tiny: true}\ndata: {synthetic: 4}\nreward: {judge_weight: 0}\n"
                    "rollout: {fp8_reference: true}\n")
    with pytest.raises(ConfigError, match="rollout.fp8_reference"):
        load_config(path)
    cfg = load_config(path, ["nft.reference_forwards=rollout"])
    assert cfg.rollout.fp8_reference and not cfg.rollout.fp8


def _prompts() -> list[EditPrompt]:
    return edit_prompts(("make the woman turn her head toward the dog", "move the red square to the right"), SIZE)


def _policy(path, family: str) -> EditPolicy:
    """A tiny policy with a trained-looking adapter (B not zero), so v_old and v_ref differ: random A and B, B scaled
    so that each adapted layer's update is ADAPTER_SHARE of its weight (||scaling B A|| = ADAPTER_SHARE ||W||)."""
    policy = EditPolicy.from_pretrained(str(path), family=family)
    policy.add_lora(**LORA)
    g = torch.Generator().manual_seed(1)
    trained = {k: torch.randn(v.shape, generator=g) for k, v in policy.lora_state_dict().items()}
    for name, module in policy.transformer.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = trained[f"{name}.lora_A.weight"], trained[f"{name}.lora_B.weight"]
            update = (b @ a).norm() * module.scaling["default"]
            trained[f"{name}.lora_B.weight"] = b * (ADAPTER_SHARE * module.base_layer.weight.norm() / update)
    policy.load_lora_state_dict(trained)
    return policy


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_fp8_rollout_samples_close_to_full_precision(tiny_pipelines, family):
    path = tiny_pipelines[family]
    reference = ReferenceForwards(seed=0, fraction=0.99)
    plain_sampler = Sampler(_policy(path, family), ROLLOUT, reference)
    plain = plain_sampler.sample(_prompts(), step=1, version=0)
    policy = _policy(path, family)
    sampler = Sampler(policy, dataclasses.replace(ROLLOUT, fp8=True), reference)
    converted = fp8.fp8_layers(policy.transformer)
    assert converted and all(layer.in_features % 16 == 0 for layer in converted)
    lora_bases = [m.base_layer for m in policy.transformer.modules() if hasattr(m, "lora_A")]
    assert lora_bases and all(isinstance(b, fp8.FP8Linear) for b in lora_bases)  # the adapters wrap FP8 layers
    got = sampler.sample(_prompts(), step=1, version=0)
    for (ga, ia), (gb, ib) in zip(plain, got, strict=True):
        assert 0 < rel(gb.x0, ga.x0) < MODEL_TOL
        assert ib.shape == ia.shape and ib.dtype == torch.uint8
        # rollout.fp8 alone leaves the reference forwards (they enter the loss) in full precision: at the FP8
        # candidates, they are what the plain policy computes there
        ids = [(gb.prompt_id, k) for k in range(len(gb.seeds))]
        again = plain_sampler._reference_velocities(gb.x0, gb.cond.repeat_interleave(len(ids)), gb.sigmas, ids, 1)
        for key in ("v_old", "v_ref"):
            torch.testing.assert_close(gb.reference[key], again[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_fp8_reference_forwards_close_to_full_precision(tiny_pipelines, family):
    path = tiny_pipelines[family]
    reference = ReferenceForwards(seed=0, fraction=0.99)
    plain = Sampler(_policy(path, family), ROLLOUT, reference).sample(_prompts(), step=1, version=0)
    got = Sampler(_policy(path, family), dataclasses.replace(ROLLOUT, fp8_reference=True), reference).sample(
        _prompts(), step=1, version=0
    )
    for (ga, _), (gb, _) in zip(plain, got, strict=True):
        torch.testing.assert_close(gb.x0, ga.x0)  # the sampling stays full precision
        assert rel(ga.reference["v_old"], ga.reference["v_ref"]) > 0.01  # the adapter matters (measured 1.5-7 %)
        for key in ("v_old", "v_ref"):
            assert 0 < rel(gb.reference[key], ga.reference[key]) < MODEL_TOL, key


def test_parity_probe_and_full_weight_loads_see_the_plain_model(tiny_pipelines):
    """The parity probe compares the loaded weights with the learner's, so it runs the plain layers (exactly the
    learner's numbers); a full fine-tune's weight push re-quantizes the FP8 copies."""
    path = tiny_pipelines["flux_kontext"]
    plain, policy = _policy(path, "flux_kontext"), _policy(path, "flux_kontext")
    Sampler(policy, dataclasses.replace(ROLLOUT, fp8=True))
    probe = ParityProbe.build(plain, ROLLOUT)
    assert torch.equal(probe.output(policy), probe.output(plain))
    weights = PolicyWeights(policy, "full")
    new = {k: v.detach() * 1.5 for k, v in weights.state_dict().items()}
    weights.load(1, WeightManifest.of(new, version=1, kind="full").pack(), new)
    layer = fp8.fp8_layers(policy.transformer)[0]
    x = torch.randn(3, layer.in_features)
    with torch.no_grad(), fp8.fp8_forwards(layer):
        assert rel(layer(x), nn.functional.linear(x, layer.weight, layer.bias)) < LAYER_TOL

