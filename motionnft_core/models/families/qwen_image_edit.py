"""Qwen-Image-Edit (the first release): the policy over `QwenImageEditPipeline`, its tiny and full-size builders.

Qwen2.5-VL encodes the prompt with the input image; the input image's latents appended to the sequence (described
by `img_shapes`); a padding mask over the text. No CFG in rollouts and training (the recipe's); true CFG
(`eval.qwen_true_cfg` against `eval.negative_prompt`) in the evaluation, as the pipeline's published settings.
"""

import copy
from collections.abc import Sequence

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from motionnft_core.config import EvalConfig
from motionnft_core.guidance import CFG, rescaled_cfg
from motionnft_core.models.full_size import layers, real_config
from motionnft_core.models.policy import Conditioning, EditPolicy
from motionnft_core.models.tokenizers import build_qwen_processor, build_qwen_tokenizer, qwen_token_ids


class QwenImageEditPolicy(EditPolicy):
    """Qwen-Image-Edit: Qwen2.5-VL encodes prompt + input image; input-image latents appended to the
    sequence (described by `img_shapes`); a padding mask over the text; no CFG."""

    family = "qwen_image_edit"
    pipeline_class = QwenImageEditPipeline
    config_name = "qwen_image_edit"

    def __init__(self, pipe: QwenImageEditPipeline):
        super().__init__(pipe)

    def eval_cfg(self, cfg: EvalConfig) -> CFG | None:
        """True CFG `eval.qwen_true_cfg` against `eval.negative_prompt`, rescaled as the pipeline does."""
        return CFG.at(cfg.qwen_true_cfg, cfg.negative_prompt, rescaled_cfg)

    @classmethod
    def eval_sampling(cls, cfg: EvalConfig) -> dict:
        return {"qwen_true_cfg": cfg.qwen_true_cfg, "negative_prompt": cfg.negative_prompt}

    @classmethod
    def stock_call_kwargs(cls, height: int, width: int) -> dict:
        return {"true_cfg_scale": 1.0}

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], images: torch.Tensor | Sequence[torch.Tensor]) -> Conditioning:
        slots = self._input_slots(images)
        batch, height, width = self._check_images(prompts, slots[0])
        prompt_embeds, prompt_embeds_mask = self.encode_text(prompts, slots)
        return Conditioning(
            tensors={
                "prompt_embeds": prompt_embeds,  # (B, T, D_text), zero-padded to the longest prompt
                "prompt_embeds_mask": prompt_embeds_mask,  # (B, T) long, 1 = real token
                "image_latents": torch.cat([self._image_latents(slot) for slot in slots], dim=1),  # (B, n * L, D)
            },
            shared={},
            height=height,
            width=width,
        )

    def encode_text(self, prompts: Sequence[str], slots: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, mask) of the VL encoder, which sees the prompts with the input image at its own size
        (the processor resizes within its pixel budget; the pipeline first resizes it to ~1 MP, here the edit
        size is the training resolution)."""
        return self.pipe._get_qwen_prompt_embeds(
            list(prompts), list(slots[0].cpu()), device=self.device, dtype=self.dtype
        )

    def _image_latents(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> packed latents (B, L, D): the VAE's normalized mode, one video frame."""
        pixels = self._to_pixels(images).unsqueeze(2)  # (B, 3, 1, H, W): one frame for the video VAE
        latents = self.pipe._encode_vae_image(pixels, generator=None)  # (B, C, 1, h, w), normalized, mode
        batch, channels, _, h, w = latents.shape
        return self.pipe._pack_latents(latents, batch, channels, h, w)

    def transformer_inputs(self, cond: Conditioning, seq_len: int) -> dict:
        """The text with its padding mask, and `img_shapes`: the target's patch grid, then each input image's
        (every input image is at the edit's size)."""
        mask = cond.tensors["prompt_embeds_mask"]
        if mask.all():
            mask = None  # as the pipeline: no padding -> unmasked (flash-capable) attention
        patches = (1, cond.height // self.vae_scale_factor // 2, cond.width // self.vae_scale_factor // 2)
        inputs = cond.tensors["image_latents"].shape[1] // seq_len
        return {
            "guidance": None,
            "encoder_hidden_states_mask": mask,
            "encoder_hidden_states": cond.tensors["prompt_embeds"],
            "img_shapes": [[patches] * (1 + inputs)] * cond.batch,
        }

    @torch.no_grad()
    def decode(self, x0: torch.Tensor, height: int, width: int) -> torch.Tensor:
        self.check_size(height, width)
        latents = self.pipe._unpack_latents(x0.to(self.device), height, width, self.vae_scale_factor)
        latents = latents.to(self.vae.dtype)  # (B, C, 1, h, w)
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(self.vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        images = self.vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
        return self._to_uint8(images)


def tiny_components(seed: int, *, zero_cond_t: bool = False) -> dict:
    """Components of a tiny QwenImageEditPipeline (diffusers' dummy sizes, 8x VAE, 4 latent channels); `zero_cond_t`
    as Qwen-Image-Edit-2511's transformer (motionnft_core/models/families/qwen_image_edit_plus.py)."""
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
        zero_cond_t=zero_cond_t,
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

    scheduler = FlowMatchEulerDiscreteScheduler(**real_config(QwenImageEditPolicy.config_name)["scheduler"])  # real

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


def full_size_components(config: dict, text_layers: int | None) -> dict:
    """Components at the real sizes from `config` (motionnft_core/models/full_size.py)."""
    tokenizer = build_qwen_tokenizer()
    ids = qwen_token_ids(tokenizer)
    encoder = copy.deepcopy(config["text_encoder"])
    encoder["text_config"] = {**layers(encoder["text_config"], "num_hidden_layers", text_layers),
                              "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                              "pad_token_id": ids["<|endoftext|>"]}  # fmt: skip
    encoder["vision_config"] = layers(encoder["vision_config"], "depth", text_layers)
    encoder.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                   vision_token_id=ids["<|vision_pad|>"])  # fmt: skip
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**config["scheduler"]),
        "vae": AutoencoderKLQwenImage(**config["vae"]),
        "text_encoder": Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**encoder)),
        "tokenizer": tokenizer,
        "processor": build_qwen_processor(tokenizer),
        "transformer": QwenImageTransformer2DModel(**config["transformer"]),
    }


POLICY = QwenImageEditPolicy
