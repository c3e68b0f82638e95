"""Tiny random-weight FLUX.1 Kontext and Qwen-Image-Edit pipelines, built offline and saved to disk.

Tests, CPU runs and benchmarks of the plumbing need the real pipeline classes and the real loading path
(`DiffusionPipeline.from_pretrained`) but not the real 12-20 B weights. Sizes follow diffusers' own pipeline
tests (`get_dummy_components` in tests/pipelines/flux/test_pipeline_flux_kontext.py and
tests/pipelines/qwenimage/test_qwenimage_edit.py), with two deliberate differences: both VAEs downsample 8x
like the real ones (so image sizes must be multiples of 16, as in production), and every tokenizer is
trained here from a few sentences (the tests download theirs from the hub, which we cannot reach).
`torch.manual_seed(seed)` runs before each component, so a seed fixes every weight. Tokenizers and schedulers
are the real pipelines' kind (motionnft_core/models/tokenizers.py, motionnft_core/models/configs/).
"""

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxTransformer2DModel,
    QwenImageEditPipeline,
    QwenImageTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    T5Config,
    T5EncoderModel,
)

from motionnft_core.cache import build_atomically, builder_key
from motionnft_core.config import FAMILIES, ModelConfig
from motionnft_core.models import tokenizers
from motionnft_core.models.full_size import config_path, real_config
from motionnft_core.models.tokenizers import (
    build_clip_tokenizer,
    build_qwen_processor,
    build_qwen_tokenizer,
    build_t5_tokenizer,
    qwen_token_ids,
)


# ---------------------------------------------------------------------------------------- pipelines
def _flux_kontext_components(seed: int) -> dict:
    """Components of a tiny FluxKontextPipeline (diffusers' dummy sizes, 8x VAE, 4 latent channels)."""
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x (2x2 packing)
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # = T5 d_model
        pooled_projection_dim=32,  # = CLIP hidden size
        guidance_embeds=True,  # Kontext [dev] is guidance-distilled
        axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
    )

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
            max_position_embeddings=77,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,  # != 2, so the pooled output is taken at the first eos
            pad_token_id=tokenizer.pad_token_id,
        )
    )

    torch.manual_seed(seed)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's t5-v1_1-xxl
            is_encoder_decoder=False,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    )

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),  # 4 blocks -> 8x downsampling, as FLUX's VAE
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,  # FLUX's VAE has neither quant conv
        use_post_quant_conv=False,
        shift_factor=0.1159,  # FLUX's latent normalization
        scaling_factor=0.3611,
    )

    scheduler = FlowMatchEulerDiscreteScheduler(**real_config("flux_kontext")["scheduler"])  # the real one
    return {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "transformer": transformer,
        "image_encoder": None,
        "feature_extractor": None,
    }


def _qwen_image_edit_components(seed: int) -> dict:
    """Components of a tiny QwenImageEditPipeline (diffusers' dummy sizes, 8x VAE, 4 latent channels)."""
    tokenizer = build_qwen_tokenizer()
    ids = qwen_token_ids(tokenizer)
    processor = build_qwen_processor(tokenizer)

    z_dim = 4
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=z_dim * 4,  # packed 2x2 latents
        out_channels=z_dim,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,  # = text encoder hidden size
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),  # sums to attention_head_dim
    )

    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=z_dim * 2,
        z_dim=z_dim,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # 3 downsamples -> 8x spatial, as the real VAE
        latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075],  # the real VAE's first four channels
        latents_std=[2.8184, 1.4541, 2.3275, 2.6558],
    )

    scheduler = FlowMatchEulerDiscreteScheduler(**real_config("qwen_image_edit")["scheduler"])  # the real one

    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                # head_dim 8: the three M-RoPE sections (t, h, w) sum to head_dim / 2.
                "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                "rope_theta": 1_000_000.0,
                "bos_token_id": ids["<|endoftext|>"],
                "eos_token_id": ids["<|im_end|>"],
                "pad_token_id": ids["<|endoftext|>"],
            },
            vision_config={
                "depth": 2,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": 16,
            },
            vocab_size=len(tokenizer),
            hidden_size=16,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            vision_token_id=ids["<|vision_pad|>"],
        )
    )

    return {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "processor": processor,
        "transformer": transformer,
    }


_BUILDERS: dict[str, tuple[type, Callable[[int], dict]]] = {
    "flux_kontext": (FluxKontextPipeline, _flux_kontext_components),
    "qwen_image_edit": (QwenImageEditPipeline, _qwen_image_edit_components),
}


def has_pipeline(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def _build(family: str, out_dir: str | os.PathLike, seed: int) -> Path:
    pipeline_cls, components = _BUILDERS[family]
    return build_atomically(
        out_dir, lambda tmp: pipeline_cls(**components(seed)).save_pretrained(tmp), complete=has_pipeline,
        what="pipeline (no model_index.json)",
    )  # fmt: skip


def build_tiny_flux_kontext(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Tiny random FluxKontextPipeline saved with `save_pretrained` into `out_dir`; returns the path."""
    return _build("flux_kontext", out_dir, seed)


def build_tiny(family: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny pipeline of `family` ("flux_kontext" | "qwen_image_edit") into `out_dir`."""
    if family not in _BUILDERS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return _build(family, out_dir, seed)


def pipeline_source(model: ModelConfig) -> str:
    """The pipeline a run loads: `model.path`, or with `model.tiny` the tiny one, built offline into
    `model.cache_dir` once (the directory name carries this module's source hash, so code changes rebuild)."""
    if not model.tiny:
        return model.path
    key = builder_key(sys.modules[__name__], tokenizers, config_path(model.family))
    out = Path(model.cache_dir).expanduser() / "tiny" / f"{model.family}-{key}"
    return str(build_tiny(model.family, out))
