"""A small but trainable FluxKontextPipeline for the CPU learning demo, saved with `save_pretrained`.

Why not `tiny_models`: those pipelines exist to exercise the plumbing; their 8x VAE squeezes a 32 px image
into 4x4x4 numbers and their transformer has one block of width 32, so no amount of training makes them edit.
This pipeline keeps the real classes and the real loading path (`DiffusionPipeline.from_pretrained`), the tiny
CLIP/T5 text encoders and tokenizers of `tiny_models`, and changes two components:

- the VAE downsamples 2x (two encoder blocks), so a 32 px image is a 16x16x4 latent, 8x8 = 64 packed tokens
  (6x fewer numbers than pixels, enough for a short supervised fit to reconstruct the synthetic scenes);
- the transformer has two double-stream and two single-stream blocks of width 64 (2 heads of 32), about
  0.48 M parameters: small enough for a few hundred CPU training steps per minute, large enough to learn
  "copy the input, move the object".

The weights are random (seeded); `motionnft_core.models.warmstart` fits them to the synthetic pairs. Image sizes must be
multiples of 4 (2x VAE, 2x2 packing).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxKontextPipeline, FluxTransformer2DModel

from motionnft_core.cache import build_atomically
from motionnft_core.models.tiny import build_tiny_flux_kontext, has_pipeline


@dataclass(frozen=True)
class DemoSizes:
    """Sizes of the demo transformer and VAE (the text encoders are tiny_models' ones)."""

    num_layers: int = 2  # double-stream (text + image) blocks
    num_single_layers: int = 2  # single-stream blocks
    num_attention_heads: int = 2
    attention_head_dim: int = 32  # wide heads: 12 rotary dims per image axis, so attention can find positions
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)  # (image index, row, column); sums to attention_head_dim
    vae_channels: tuple[int, ...] = (16, 32)  # one entry per VAE block: 2 blocks -> 2x downsampling
    latent_channels: int = 4
    vae_norm_groups: int = 8


def demo_transformer(sizes: DemoSizes, seed: int, *, text_dim: int, pooled_dim: int) -> FluxTransformer2DModel:
    """Random FLUX transformer of `sizes` for text features of width `text_dim` (T5) and `pooled_dim` (CLIP)."""
    if sum(sizes.axes_dims_rope) != sizes.attention_head_dim:
        raise ValueError(f"axes_dims_rope {sizes.axes_dims_rope} must sum to attention_head_dim")
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * sizes.latent_channels,  # 2x2 packing
        num_layers=sizes.num_layers,
        num_single_layers=sizes.num_single_layers,
        attention_head_dim=sizes.attention_head_dim,
        num_attention_heads=sizes.num_attention_heads,
        joint_attention_dim=text_dim,
        pooled_projection_dim=pooled_dim,
        guidance_embeds=True,  # as Kontext [dev]: the policy feeds its distilled guidance value
        axes_dims_rope=tuple(sizes.axes_dims_rope),
    )


def demo_vae(sizes: DemoSizes, seed: int) -> AutoencoderKL:
    """Random AutoencoderKL with len(vae_channels) blocks (2 ** (blocks - 1) downsampling), FLUX-style (no quant
    convs). shift_factor 0 / scaling_factor 1 until `motionnft_core.models.warmstart` measures the latent statistics."""
    torch.manual_seed(seed)
    n = len(sizes.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(sizes.vae_channels),
        layers_per_block=1,
        latent_channels=sizes.latent_channels,
        norm_num_groups=sizes.vae_norm_groups,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0,
        scaling_factor=1.0,
    )


def build_demo_flux_kontext(out_dir: str | os.PathLike, seed: int = 0, sizes: DemoSizes | None = None) -> Path:
    """Random demo FluxKontextPipeline saved into `out_dir` (idempotent: an existing pipeline is returned)."""
    sizes = sizes or DemoSizes()

    def write(dst: Path) -> None:
        with tempfile.TemporaryDirectory(dir=dst.parent) as scratch:
            base = build_tiny_flux_kontext(Path(scratch) / "tiny", seed=seed)  # tokenizers and text encoders
            pipe = FluxKontextPipeline.from_pretrained(base)
            transformer = demo_transformer(
                sizes,
                seed,
                text_dim=pipe.text_encoder_2.config.d_model,
                pooled_dim=pipe.text_encoder.config.hidden_size,  # CLIP pooler_output
            )
            pipe = FluxKontextPipeline.from_pretrained(base, transformer=transformer, vae=demo_vae(sizes, seed))
            pipe.save_pretrained(dst)
        (dst / "demo_sizes.json").write_text(json.dumps(asdict(sizes), indent=1))

    return build_atomically(out_dir, write, complete=has_pipeline, what="pipeline (no model_index.json)")
