"""FLUX.1 Kontext [dev]: the policy over `FluxKontextPipeline`, its tiny and full-size builders.

CLIP pooled + T5 text; the input image's latents appended to the sequence (position-id index 0 set to 1); a
distilled guidance embedding instead of CFG, `model.guidance` in rollouts and training, `eval.kontext_guidance`
in the evaluation.
"""

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from motionnft_core.models.families.flux import FluxPolicy
from motionnft_core.models.full_size import layers, real_config
from motionnft_core.models.policy import Conditioning
from motionnft_core.models.tokenizers import build_clip_tokenizer, build_t5_tokenizer


class FluxKontextPolicy(FluxPolicy):
    """FLUX.1 Kontext: CLIP pooled + T5 text, input-image latents appended to the sequence (position-id
    index 0 set to 1), distilled guidance embedding instead of CFG (flux.FluxPolicy calls the transformer)."""

    family = "flux_kontext"
    pipeline_class = FluxKontextPipeline
    config_name = "flux_kontext"
    eval_guidance_key = "kontext_guidance"

    @classmethod
    def stock_call_kwargs(cls, height: int, width: int) -> dict:
        # No resize to a preferred Kontext resolution: the edit is made at the data's size.
        return {"guidance_scale": 2.5, "max_area": height * width, "_auto_resize": False}

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], images: torch.Tensor | Sequence[torch.Tensor]) -> Conditioning:
        images = self._input_slots(images)[0]
        batch, height, width = self._check_images(prompts, images)
        prompt_embeds, pooled_prompt_embeds, text_ids = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        latents = self.pipe._encode_vae_image(self._to_pixels(images), generator=None)  # (B, C, h, w), mode
        _, channels, h, w = latents.shape
        image_latents = self.pipe._pack_latents(latents, batch, channels, h, w)
        # Position ids stay float32 whatever the model dtype (the transformer reads them as float anyway).
        latent_ids = self.pipe._prepare_latent_image_ids(batch, h // 2, w // 2, self.device, torch.float32)
        image_ids = latent_ids.clone()
        image_ids[..., 0] = 1  # marks the condition image's tokens, as the pipeline does
        return Conditioning(
            tensors={
                "prompt_embeds": prompt_embeds,  # (B, T, 4096) T5
                "pooled_prompt_embeds": pooled_prompt_embeds,  # (B, 768) CLIP
                "image_latents": image_latents,  # (B, L, D)
            },
            shared={  # (T, 3) zeros and (2L, 3): target tokens, then the condition image's
                "txt_ids": text_ids.float(),
                "img_ids": torch.cat([latent_ids, image_ids], dim=0),
            },
            height=height,
            width=width,
        )

    def transformer_inputs(self, cond: Conditioning, seq_len: int) -> dict:
        """FLUX's inputs and Kontext's pooled CLIP projection."""
        return {**super().transformer_inputs(cond, seq_len), "pooled_projections": cond.tensors["pooled_prompt_embeds"]}

    @torch.no_grad()
    def decode(self, x0: torch.Tensor, height: int, width: int) -> torch.Tensor:
        self.check_size(height, width)
        latents = self.pipe._unpack_latents(x0.to(self.device), height, width, self.vae_scale_factor)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        images = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return self._to_uint8(images)


def tiny_components(seed: int) -> dict:
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
    text_encoder = _clip(tokenizer, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4, projection_dim=32, max_position_embeddings=77,
                         hidden_act="gelu", layer_norm_eps=1e-5)  # fmt: skip

    torch.manual_seed(seed)
    text_encoder_2 = _t5(tokenizer_2, vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                         num_heads=4, relative_attention_num_buckets=8,
                         feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's t5-v1_1-xxl
                         is_encoder_decoder=False)  # fmt: skip

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


def _clip(tokenizer, **config) -> CLIPTextModel:
    """CLIP with the tokenizer's special tokens (its eos != 2, so the pooled output is taken at the first eos)."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    return CLIPTextModel(CLIPTextConfig(**{**config, **ids}))


def _t5(tokenizer, **config) -> T5EncoderModel:
    """T5's encoder with the tokenizer's special tokens."""
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
           "decoder_start_token_id": tokenizer.pad_token_id}  # fmt: skip
    return T5EncoderModel(T5Config(**{**config, **ids}))


def full_size_components(config: dict, text_layers: int | None) -> dict:
    """Components at the real sizes from `config` (motionnft_core/models/full_size.py)."""
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**config["scheduler"]),
        "vae": AutoencoderKL(**config["vae"]),
        "text_encoder": _clip(tokenizer, **layers(config["text_encoder"], "num_hidden_layers", text_layers)),
        "tokenizer": tokenizer,
        "text_encoder_2": _t5(tokenizer_2, **layers(config["text_encoder_2"], "num_layers", text_layers)),
        "tokenizer_2": tokenizer_2,
        "transformer": FluxTransformer2DModel(**config["transformer"]),
        "image_encoder": None,
        "feature_extractor": None,
    }


POLICY = FluxKontextPolicy
