"""The family registry and what a family with several input images (Qwen-Image-Edit-2509/2511) adds: conditioning on
every input image in order, the same edit as the stock pipeline's, a LoRA export the stock pipeline loads, the
synthetic layout reference changing the edit, the full-size transformer's size and FLOPs on the meta device.

Per-family tests that every family shares (loading, velocity, sigma grid, LoRA plumbing) are in test_policy.py.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus
from torch.utils.flop_counter import FlopCounterMode

from actors.sampler import Sampler
from motionnft_core.config import FAMILIES, EvalConfig, ModelConfig, RolloutConfig
from motionnft_core.models.families import family_module, policy_class
from motionnft_core.models.families.flux import FluxPolicy
from motionnft_core.models.full_size import build_full_size, config_path, parameter_counts
from motionnft_core.models.policy import EditPolicy
from tests.conftest import (
    DOUBLE_STREAM_TARGETS,
    EDIT_PROMPT,
    assert_the_stock_pipeline_loads_the_export,
    random_input_images,
    random_lora_policy,
    synthetic_examples,
    to_pil,
)

PLUS = "qwen_image_edit_plus"
SIZE = 64


@pytest.fixture(scope="module")
def plus(tiny_pipelines) -> EditPolicy:
    return EditPolicy.from_pretrained(tiny_pipelines[PLUS], family=PLUS)


# ------------------------------------------------------------------------------------------------ registry
def test_the_registry_feeds_the_config_and_every_family_is_complete():
    assert ModelConfig.__dataclass_fields__["family"].metadata  # the choices come from the registry
    assert FAMILIES == ("flux_kontext", "qwen_image_edit", PLUS, "flux2_klein", "flux2_dev")
    for family in FAMILIES:
        module = family_module(family)
        assert module.POLICY.family == family and policy_class(family) is module.POLICY
        assert callable(module.tiny_components) and callable(module.full_size_components)
        assert config_path(family).is_file()
    with pytest.raises(ValueError, match="'flux_dev'"):
        policy_class("flux_dev")
    with pytest.raises(ValueError, match="family"):
        ModelConfig(family="flux_dev")


def test_each_family_names_its_evaluation_guidance():
    """The `eval.*` keys a report and a comparison's manifest show (`eval_sampling`), and the distilled guidance
    scale while the evaluation samples (`eval_guidance`): `eval.*`'s for Kontext and FLUX.2 [dev], put back after;
    [klein] has no guidance embedding to set."""
    cfg = EvalConfig(kontext_guidance=3.5, flux2_guidance=4.5, klein_base_cfg=5.0, qwen_true_cfg=6.0,
                     negative_prompt="blur")  # fmt: skip
    qwen = {"qwen_true_cfg": 6.0, "negative_prompt": "blur"}
    expected = {"flux_kontext": {"kontext_guidance": 3.5}, "qwen_image_edit": qwen, PLUS: qwen,
                "flux2_klein": {"klein_base_cfg": 5.0}, "flux2_dev": {"flux2_guidance": 4.5}}  # fmt: skip
    assert {family: policy_class(family).eval_sampling(cfg) for family in FAMILIES} == expected
    for family, inside in {"flux_kontext": 3.5, "flux2_dev": 4.5, "flux2_klein": 1.0}.items():
        policy = object.__new__(policy_class(family))  # no pipeline: eval_guidance reads and sets the scale only
        policy.guidance_scale = 1.0
        with policy.eval_guidance(cfg):
            assert policy.guidance_scale == inside, family
        assert policy.guidance_scale == 1.0
    with pytest.raises(TypeError, match="Misnamed.eval_guidance_key: eval.kontext_scale is no key"):
        type("Misnamed", (FluxPolicy,), {"eval_guidance_key": "kontext_scale"})


def test_single_image_families_refuse_a_second_input_image(tiny_pipelines):
    policy = EditPolicy.from_pretrained(tiny_pipelines["qwen_image_edit"], family="qwen_image_edit")
    with pytest.raises(ValueError, match="qwen_image_edit takes 1 to 1 input images per example, got 2"):
        policy.encode([EDIT_PROMPT], random_input_images(2, seed=0))


# ------------------------------------------------------------------------------------------------ several inputs
def test_plus_conditions_on_every_input_image_in_order(plus):
    one, two = random_input_images(2, seed=1)
    x = plus.prepare_latents(1, SIZE, SIZE, torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7])
    single = plus.encode([EDIT_PROMPT], [one])
    both = plus.encode([EDIT_PROMPT], [one, two])
    swapped = plus.encode([EDIT_PROMPT], [two, one])
    tokens = plus.seq_len(SIZE, SIZE)
    assert single.tensors["image_latents"].shape[1] == tokens and both.tensors["image_latents"].shape[1] == 2 * tokens
    assert torch.equal(both.tensors["image_latents"][:, :tokens], single.tensors["image_latents"])
    v_single, v_both, v_swapped = (plus.velocity(x, sigma, c) for c in (single, both, swapped))
    assert (v_both - v_single).abs().max() > 1e-4  # the second image matters ...
    assert (v_both - v_swapped).abs().max() > 1e-4  # ... and so does the order
    with pytest.raises(ValueError, match="1 to 3 input images per example, got 4"):
        plus.encode([EDIT_PROMPT], random_input_images(4, seed=2))
    with pytest.raises(ValueError, match="one shape"):
        plus.encode([EDIT_PROMPT], [one, random_input_images(1, seed=3, size=SIZE + 16)[0]])


def test_plus_matches_the_stock_pipeline_with_two_inputrandom_input_images(plus, monkeypatch):
    """The first Euler step of `QwenImageEditPlusPipeline.__call__` with two input images equals the policy's, its
    ~1 MP input-image size set to the edit's (the policy makes the input images' latents at the edit's size)."""
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", SIZE * SIZE)
    images = random_input_images(2, seed=4)
    noise = plus.prepare_latents(1, SIZE, SIZE, torch.Generator().manual_seed(3))
    grid = plus.sigmas(2, SIZE, SIZE)
    x1 = noise + (grid[1] - grid[0]) * plus.velocity(noise, grid[:1], plus.encode([EDIT_PROMPT], images))

    def stop(pipe, step, timestep, callback_kwargs):
        pipe._interrupt = True  # the remaining steps are skipped; the latents come back as they are
        return {}

    reference = plus.pipe([to_pil(im) for im in images], EDIT_PROMPT, height=SIZE, width=SIZE, num_inference_steps=2,
                          latents=noise, output_type="latent", callback_on_step_end=stop,
                          **plus.stock_call_kwargs(SIZE, SIZE)).images  # fmt: skip
    torch.testing.assert_close(x1, reference, atol=1e-5, rtol=1e-5)


def test_plus_lora_export_loads_into_the_stock_pipeline(tiny_pipelines, tmp_path):
    policy = random_lora_policy(tiny_pipelines[PLUS], PLUS)
    assert_the_stock_pipeline_loads_the_export(policy, tiny_pipelines[PLUS], tmp_path / "lora",
                                               DOUBLE_STREAM_TARGETS)  # fmt: skip


def test_the_synthetic_reference_changes_the_edit(plus, tmp_path):
    """`data.synthetic_reference`: the same examples with a second input image; the sampler's edit changes with it
    (same seed, same noise), and without it the data is what it was."""
    plain = synthetic_examples(tmp_path / "plain", 2, size=SIZE, seed=0)
    with_ref = _synthetic_with_reference(tmp_path / "ref", 2)
    for a, b in zip(plain, with_ref, strict=True):
        assert a.id == b.id and torch.equal(a.input_image, b.input_image)
        assert torch.equal(a.target_image, b.target_image)
        assert a.reference_images == () and len(b.reference_images) == 1 and b.input_images[0] is b.input_image
    sampler = Sampler(plus, RolloutConfig(group_size=2, prompts_per_step=1, num_steps=2, height=SIZE, width=SIZE))
    ((_, edits_plain),) = sampler.sample(plain[:1], step=0, version=0)
    ((_, edits_ref),) = sampler.sample(with_ref[:1], step=0, version=0)
    assert (edits_plain.int() - edits_ref.int()).abs().max() > 0


def _synthetic_with_reference(folder, n: int) -> list:
    from motionnft_core.data.motionedit import MotionEditDataset
    from motionnft_core.data.synthetic import generate_synthetic

    src = generate_synthetic(folder, n, size=SIZE, seed=0, reference=True)
    data = MotionEditDataset.from_source(str(src), resolution=(SIZE, SIZE), on_error="raise")
    return [data[i] for i in range(n)]


# ------------------------------------------------------------------------------------------------ full size
def test_plus_full_size_transformer_size_and_flops_on_meta():
    """Qwen-Image-Edit-2511: the 20.4 B transformer; one 512^2 sample with one input image is 1024 target + 1024
    input tokens + ~300 text tokens. Each token passes its stream's weights (image or text: half the blocks' weights
    each, less the 6.8 B of per-sample modulation), 6.8 B, so the matmuls are 2 * 6.8e9 * 2348 = 31.9 TFLOPs, and
    attention 4 * 2348^2 * 3072 * 60 = 4.1 TFLOPs: ~36 TFLOPs per forward (measured 36.0)."""
    pipe = build_full_size(PLUS, device="meta", text_layers=1)
    counts = parameter_counts(pipe)
    assert 20.3e9 <= counts["transformer"] <= 20.5e9 and pipe.transformer.config.zero_cond_t
    meta = {"device": "meta", "dtype": torch.bfloat16}
    patches = (1, 32, 32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        pipe.transformer(hidden_states=torch.empty(1, 2048, 64, **meta), timestep=torch.full((1,), 0.5, **meta),
                         encoder_hidden_states=torch.empty(1, 300, 3584, **meta), encoder_hidden_states_mask=None,
                         img_shapes=[[patches, patches]], return_dict=False)  # fmt: skip
    flops = counter.get_total_flops()
    print(f"{PLUS}: transformer {counts['transformer'] / 1e9:.2f} B parameters, {flops / 1e12:.1f} TFLOPs per "
          "forward of one 512^2 sample with one input image")  # fmt: skip
    assert 34e12 < flops < 38e12
