"""The full-size pipelines of the GPU benchmark, checked on the meta device (no memory, no weights): the real
parameter counts, and the policy's phases at 512² with the real shapes (bench/README.md: 2·32² image tokens + 512 text
tokens of width 4096 for Kontext)."""

from __future__ import annotations

import pytest
import torch

from motionnft_core.models.full_size import build_full_size, parameter_counts
from motionnft_core.models.policy import EditPolicy

SIZE = 512
# Published sizes: FLUX.1 Kontext [dev] 12 B transformer, T5-v1.1-XXL encoder, CLIP ViT-L/14 text encoder;
# Qwen-Image(-Edit) 20 B transformer, Qwen2.5-VL-7B; FLUX.2 [klein] 4B: 4 B transformer, Qwen3-4B;
# FLUX.2 [dev]: 32 B transformer, Mistral-Small-3.1 24 B; every VAE well under 0.2 B.
EXPECTED_BILLIONS = {
    "flux_kontext": {"transformer": (11.8, 12.0), "text_encoder_2": (4.7, 4.8), "text_encoder": (0.12, 0.13),
                     "vae": (0.08, 0.09)},
    "qwen_image_edit": {"transformer": (20.3, 20.5), "text_encoder": (8.2, 8.4), "vae": (0.12, 0.13)},
    "qwen_image_edit_plus": {"transformer": (20.3, 20.5), "text_encoder": (8.2, 8.4), "vae": (0.12, 0.13)},
    "flux2_klein": {"transformer": (3.8, 4.0), "text_encoder": (3.9, 4.1), "vae": (0.08, 0.09)},
    "flux2_dev": {"transformer": (32.0, 32.4), "text_encoder": (23.5, 24.5), "vae": (0.08, 0.09)},
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(EXPECTED_BILLIONS))
def test_real_configs_have_the_published_sizes(family):
    counts = parameter_counts(build_full_size(family, device="meta"))
    assert set(counts) == set(EXPECTED_BILLIONS[family])
    for name, (lo, hi) in EXPECTED_BILLIONS[family].items():
        assert lo <= counts[name] / 1e9 <= hi, (name, counts[name])
    stand_in = parameter_counts(build_full_size(family, device="meta", text_layers=1))
    assert stand_in["transformer"] == counts["transformer"]  # only the text encoders shrink
    assert sum(stand_in.values()) < sum(counts.values())


def test_flux_kontext_policy_phases_at_full_size_on_meta():
    pipe = build_full_size("flux_kontext", device="meta", text_layers=1)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.transformer.device.type == "meta"
    policy = EditPolicy.from_pipe(pipe)  # T5 padding 512, guidance 2.5: the pipeline's defaults
    cond = policy.encode(["move the cup to the left", "turn the car"], torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8))
    assert cond.tensors["prompt_embeds"].shape == (2, 512, 4096)
    assert cond.tensors["pooled_prompt_embeds"].shape == (2, 768)
    assert cond.tensors["image_latents"].shape == (2, 32 * 32, 64)
    assert cond.shared["img_ids"].shape == (2 * 32 * 32, 3)  # target tokens, then the condition image's
    x = policy.prepare_latents(2, SIZE, SIZE, [torch.Generator().manual_seed(i) for i in range(2)])
    v = policy.velocity(x, torch.tensor([0.9, 0.4]), cond)
    assert v.shape == (2, 1024, 64)
    assert policy.decode(v, SIZE, SIZE).shape == (2, 3, SIZE, SIZE)
    assert policy.sigmas(6, SIZE, SIZE).shape == (6,)


def test_qwen_image_edit_transformer_and_vae_at_full_size_on_meta():
    """The Qwen2.5-VL encoder computes data-dependent positions and the policy checks the text mask for padding,
    neither possible without data: the transformer is called as `QwenImageEditPolicy.velocity` calls it, with the
    encoder's output shapes (~300 text tokens of width 3584, the condition image's packed latents)."""
    policy = EditPolicy.from_pipe(build_full_size("qwen_image_edit", device="meta", text_layers=1))
    meta = {"device": "meta", "dtype": torch.bfloat16}
    x = policy.prepare_latents(2, SIZE, SIZE, [torch.Generator().manual_seed(i) for i in range(2)])
    assert x.shape == (2, 32 * 32, 64) and policy.seq_len(SIZE, SIZE) == 1024
    patches = (1, SIZE // 16, SIZE // 16)
    out = policy.transformer(
        hidden_states=torch.cat([x.to(torch.bfloat16), torch.empty(2, 1024, 64, **meta)], dim=1),
        timestep=torch.full((2,), 0.5, **meta),
        encoder_hidden_states=torch.empty(2, 300, 3584, **meta),
        encoder_hidden_states_mask=None,
        img_shapes=[[patches, patches]] * 2,
        return_dict=False,
    )[0]
    assert out.shape == (2, 2048, 64)  # target and condition tokens; velocity keeps the first 1024
    assert policy.decode(out[:, :1024], SIZE, SIZE).shape == (2, 3, SIZE, SIZE)
