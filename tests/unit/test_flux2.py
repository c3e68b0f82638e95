"""FLUX.2 [klein] and [dev] (motionnft_core/models/families/flux2*.py): LoRA on every block type, conditioning on
every input image in order, the same edit as the stock pipeline's, a LoRA export the stock pipeline loads, [dev]'s
size plan (prompt cache, text encoder offloaded), the full-size transformers' sizes and FLOPs on the meta device.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from actors.eval_sampler import EvalSampler
from motionnft_core.config import EvalConfig
from motionnft_core.models.full_size import CONFIG_DIR, build_full_size, parameter_counts
from motionnft_core.models.policy import EditPolicy
from tests.conftest import (
    DOUBLE_STREAM_TARGETS,
    EDIT_PROMPT,
    assert_the_stock_pipeline_loads_the_export,
    random_input_images,
    random_lora_policy,
    to_pil,
)

KLEIN, DEV = "flux2_klein", "flux2_dev"
FLUX2 = [KLEIN, DEV]
SIZE = 64


@pytest.fixture(scope="module")
def klein(tiny_pipelines) -> EditPolicy:
    return EditPolicy.from_pretrained(tiny_pipelines[KLEIN], family=KLEIN)


def _adapted(transformer: torch.nn.Module) -> dict[str, list[str]]:
    """The adapted layers per block type: {"double": [...], "single": [...], "other": [...]}."""
    found: dict[str, list[str]] = {"double": [], "single": [], "other": []}
    for name, module in transformer.named_modules():
        if hasattr(module, "lora_A") and len(module.lora_A):
            kind = ("single" if name.startswith("single_transformer_blocks.") else
                    "double" if name.startswith("transformer_blocks.") else "other")  # fmt: skip
            found[kind].append(name.split(".attn.")[-1])
    return found


@pytest.mark.parametrize("family", FLUX2)
def test_lora_covers_every_block_type(tiny_pipelines, family):
    """The attention targets adapt 8 layers in each double-stream block and the fused `to_qkv_mlp_proj` and bare
    `to_out` in each single-stream block; nothing else."""
    policy = EditPolicy.from_pretrained(tiny_pipelines[family], family=family)
    doubles, singles = len(policy.transformer.transformer_blocks), len(policy.transformer.single_transformer_blocks)
    policy.add_lora(rank=2, alpha=2, target_modules=DOUBLE_STREAM_TARGETS)
    found = _adapted(policy.transformer)
    assert sorted(found["double"]) == sorted(DOUBLE_STREAM_TARGETS * doubles)
    assert sorted(found["single"]) == sorted(["to_qkv_mlp_proj", "to_out"] * singles)
    assert found["other"] == []
    only_q = EditPolicy.from_pretrained(tiny_pipelines[family], family=family)
    only_q.add_lora(rank=2, alpha=2, target_modules=["to_q"])  # no to_out.0 asked: no single-block to_out
    assert _adapted(only_q.transformer)["single"] == ["to_qkv_mlp_proj"] * singles


def test_klein_conditions_on_every_input_image_in_order(klein):
    one, two = random_input_images(2, seed=1)
    x = klein.prepare_latents(1, SIZE, SIZE, torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7])
    single, both, swapped = (klein.encode([EDIT_PROMPT], imgs) for imgs in ([one], [one, two], [two, one]))
    tokens = klein.seq_len(SIZE, SIZE)
    assert both.tensors["image_latents"].shape[1] == 2 * tokens
    assert torch.equal(both.shared["img_ids"][tokens:2 * tokens], single.shared["img_ids"][tokens:])
    assert both.shared["img_ids"][2 * tokens:, 0].unique().tolist() == [20]  # the second image at t = 20
    v_single, v_both, v_swapped = (klein.velocity(x, sigma, c) for c in (single, both, swapped))
    assert (v_both - v_single).abs().max() > 1e-4  # the second image matters ...
    assert (v_both - v_swapped).abs().max() > 1e-4  # ... and so does the order
    with pytest.raises(ValueError, match="1 to 4 input images per example, got 5"):
        klein.encode([EDIT_PROMPT], random_input_images(5, seed=2))


@pytest.mark.parametrize("family, inputs", [(KLEIN, 1), (KLEIN, 2), (DEV, 2)])
def test_flux2_matches_the_stock_pipeline(tiny_pipelines, family, inputs):
    """The first Euler step of `Flux2KleinPipeline.__call__` / `Flux2Pipeline.__call__` (the text encoder, VAE
    latents, position ids, empirical shift, guidance, timestep scaling) equals the policy's, with one and with two
    input images; and the policy's decode of the stock pipeline's latents equals the stock pipeline's image."""
    klein = EditPolicy.from_pretrained(tiny_pipelines[family], family=family)
    images = random_input_images(inputs, seed=4)
    noise = klein.prepare_latents(1, SIZE, SIZE, torch.Generator().manual_seed(3))
    grid = klein.sigmas(2, SIZE, SIZE)
    x1 = noise + (grid[1] - grid[0]) * klein.velocity(noise, grid[:1], klein.encode([EDIT_PROMPT], images))

    seen = {}

    def stop(pipe, step, timestep, callback_kwargs):
        seen["latents"] = callback_kwargs["latents"]
        pipe._interrupt = True  # the remaining steps are skipped
        return {}

    h = SIZE // 16
    unpacked = noise.reshape(1, h, h, -1).permute(0, 3, 1, 2)  # the pipeline packs the latents it is given
    out = klein.pipe([to_pil(im) for im in images], EDIT_PROMPT, height=SIZE, width=SIZE, num_inference_steps=2,
                     latents=unpacked, output_type="pt", callback_on_step_end=stop,
                     **klein.stock_call_kwargs(SIZE, SIZE)).images  # fmt: skip
    torch.testing.assert_close(x1, seen["latents"], atol=1e-5, rtol=1e-5)
    decoded = klein.decode(seen["latents"], SIZE, SIZE)
    expected = (out * 255).round().to(torch.uint8)
    assert (decoded.int() - expected.int()).abs().max() <= 1


@pytest.mark.parametrize("distilled", [True, False], ids=["distilled", "base"])
def test_klein_evaluation_edit_is_the_stock_pipelines_at_the_published_setting(tiny_pipelines, distilled):
    """The evaluation edit of a [klein] checkpoint equals `Flux2KleinPipeline.__call__`'s whole sampling at
    `guidance_scale` = `eval.klein_base_cfg` for the same noise and steps: the pipeline applies CFG against "" to a
    base checkpoint and ignores it for a distilled one, and so does the evaluation; on a base checkpoint the CFG
    changes the edit."""
    pipe = Flux2KleinPipeline.from_pretrained(tiny_pipelines[KLEIN])
    pipe.register_to_config(is_distilled=distilled)
    policy = EditPolicy.from_pipe(pipe)
    cfg = EvalConfig(num_steps=3, seed=11)
    sampler = EvalSampler(policy, cfg)
    assert (sampler.guidance is None) == distilled
    images = random_input_images(2, seed=6)
    edit = sampler.sample(EDIT_PROMPT, images[0][0], [images[1][0]])

    noise = policy.prepare_latents(1, SIZE, SIZE, torch.Generator().manual_seed(cfg.seed))
    h = SIZE // 16
    stock = pipe([to_pil(im) for im in images], EDIT_PROMPT, height=SIZE, width=SIZE, num_inference_steps=3,
                 guidance_scale=cfg.klein_base_cfg, latents=noise.reshape(1, h, h, -1).permute(0, 3, 1, 2),
                 output_type="pt").images[0]  # fmt: skip
    assert (edit.int() - (stock * 255).round().int()).abs().max() <= 1
    unguided = EvalSampler(policy, EvalConfig(num_steps=3, seed=11, klein_base_cfg=1.0))
    assert unguided.guidance is None
    if not distilled:
        assert (edit.int() - unguided.sample(EDIT_PROMPT, images[0][0], [images[1][0]]).int()).abs().max() > 1


@pytest.mark.parametrize("family", FLUX2)
def test_flux2_lora_export_loads_into_the_stock_pipeline(tiny_pipelines, tmp_path, family):
    policy = random_lora_policy(tiny_pipelines[family], family)
    assert any("single_transformer_blocks" in k and "to_qkv_mlp_proj" in k for k in policy.lora_state_dict())
    stock = assert_the_stock_pipeline_loads_the_export(policy, tiny_pipelines[family], tmp_path / "lora",
                                                       policy.lora_target_modules(DOUBLE_STREAM_TARGETS))  # fmt: skip
    assert len(_adapted(stock.transformer)["single"]) == 2 * len(stock.transformer.single_transformer_blocks)


# ------------------------------------------------------------------------------------------------ [dev]'s size plan
def test_dev_prompt_cache_and_offloaded_text_encoder(tiny_pipelines):
    """[dev]'s plan for one 80 GB GPU: with `text_encoder_offload` the encoder's weights stay in CPU memory (streamed
    layer by layer), with `prompt_cache` a prompt seen before is not encoded again; the conditioning is the same."""
    plain = EditPolicy.from_pretrained(tiny_pipelines[DEV], family=DEV)
    planned = EditPolicy.from_pretrained(tiny_pipelines[DEV], family=DEV, text_encoder_offload=True, prompt_cache=2)
    assert hasattr(planned.pipe.text_encoder, "_hf_hook")  # accelerate's offload hook: weights fetched per layer
    assert not hasattr(plain.pipe.text_encoder, "_hf_hook")
    calls = []
    planned.pipe.text_encoder.register_forward_hook(lambda module, args, out: calls.append(1))
    images = random_input_images(1, seed=6)
    first = planned.encode([EDIT_PROMPT], images)
    again = planned.encode([EDIT_PROMPT], images)
    other = planned.encode(["turn the car", EDIT_PROMPT], [torch.cat(images * 2)])
    assert len(calls) == 2  # EDIT_PROMPT once, then only the new prompt
    reference = plain.encode([EDIT_PROMPT], images)
    for cond in (first, again):
        torch.testing.assert_close(cond.tensors["prompt_embeds"], reference.tensors["prompt_embeds"])
        assert torch.equal(cond.shared["txt_ids"], reference.shared["txt_ids"])
    torch.testing.assert_close(other.tensors["prompt_embeds"][1:], reference.tensors["prompt_embeds"])
    planned.encode(["a", "b"], [torch.cat(images * 2)])  # two new prompts: the cache keeps the last 2
    assert len(planned.prompt_cache) == 2 and EDIT_PROMPT not in planned.prompt_cache
    assert len(plain.prompt_cache) == 0  # off by default


# ------------------------------------------------------------------------------------------------ full size
def _flops(transformer, image_tokens: int, text_tokens: int) -> float:
    meta = {"device": "meta", "dtype": torch.bfloat16}
    guidance = torch.full((1,), 4.0, **meta) if transformer.config.guidance_embeds else None
    text = torch.empty(1, text_tokens, transformer.config.joint_attention_dim, **meta)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        transformer(hidden_states=torch.empty(1, image_tokens, 128, **meta), timestep=torch.full((1,), 0.5, **meta),
                    guidance=guidance, encoder_hidden_states=text, return_dict=False,
                    img_ids=torch.zeros(image_tokens, 4, dtype=torch.long, device="meta"),
                    txt_ids=torch.zeros(text_tokens, 4, dtype=torch.long, device="meta"))  # fmt: skip
    return counter.get_total_flops()


def test_klein_4b_full_size_and_flops_on_meta():
    """FLUX.2 [klein] 4B: one 512^2 sample with one input image is 1024 target + 1024 input + 512 text tokens (the
    text is padded to 512). Every token passes its stream's weights, 325 d^2 = 3.07 B with d = 3072 (5 double blocks
    of 13 d^2 per stream, 20 single blocks of 13 d^2), so the matmuls are 2 * 3.07e9 * 2560 = 15.7 TFLOPs, and
    attention 4 * 2560^2 * 3072 * 25 = 2.0 TFLOPs: ~17.7 TFLOPs per forward."""
    pipe = build_full_size(KLEIN, device="meta")
    counts = parameter_counts(pipe)
    assert 3.8e9 <= counts["transformer"] <= 4.0e9
    assert 3.9e9 <= counts["text_encoder"] <= 4.1e9  # Qwen3-4B, its embedding tied
    cut = build_full_size(KLEIN, device="meta", text_layers=1)  # keeps the 28 layers the pipeline reads
    assert cut.text_encoder.config.num_hidden_layers == 28
    flops = _flops(pipe.transformer, 2048, 512)
    print(f"{KLEIN} 4B: transformer {counts['transformer'] / 1e9:.2f} B parameters, {flops / 1e12:.1f} TFLOPs per "
          "forward of one 512^2 sample with one input image")  # fmt: skip
    assert 17e12 < flops < 18.5e12


def test_dev_full_size_and_flops_on_meta():
    """FLUX.2 [dev]: the 32 B transformer (8 double and 48 single blocks of d = 6144: 8 * 26 d^2 + 48 * 13 d^2 =
    832 d^2 = 31.4 B, with the modulation and embedders 32.2 B) and the 24 B Mistral-Small-3.1 encoder. One 512^2
    sample with one input image is 2560 tokens: every token passes 8 * 13 d^2 + 48 * 13 d^2 = 728 d^2 = 27.5 B, so
    2 * 27.5e9 * 2560 = 140.7 TFLOPs of matmuls, and attention 4 * 2560^2 * 6144 * 56 = 9.0 TFLOPs: ~150 TFLOPs."""
    pipe = build_full_size(DEV, device="meta")
    counts = parameter_counts(pipe)
    assert 32.0e9 <= counts["transformer"] <= 32.4e9
    assert 23.5e9 <= counts["text_encoder"] <= 24.5e9
    flops = _flops(pipe.transformer, 2048, 512)
    print(f"{DEV}: transformer {counts['transformer'] / 1e9:.2f} B, text encoder {counts['text_encoder'] / 1e9:.2f} B "
          f"parameters, {flops / 1e12:.1f} TFLOPs per forward of one 512^2 sample with one input image")
    assert 145e12 < flops < 155e12


def test_klein_9b_transformer_on_meta():
    """FLUX.2 [klein] 9B's transformer (diffusers' FLUX.2 conversion script, 'klein-9b'): 8 double and 24
    single blocks of d = 4096, 26 d^2 and 13 d^2 each, 520 d^2 = 8.7 B with the modulation and embedders."""
    config = json.loads((CONFIG_DIR / "flux2_klein_9b.json").read_text())
    with torch.device("meta"):
        transformer = Flux2Transformer2DModel(**config["transformer"])
    count = sum(p.numel() for p in transformer.parameters())
    print(f"{KLEIN} 9B: transformer {count / 1e9:.2f} B parameters, "
          f"{_flops(transformer, 2048, 512) / 1e12:.1f} TFLOPs per forward of one 512^2 sample with one input image")
    assert 8.9e9 <= count <= 9.3e9
