"""FLUX.2: what [dev] (`Flux2Pipeline`) and [klein] (`Flux2KleinPipeline`) share, the `Flux2Transformer2DModel`
and the `AutoencoderKLFlux2`; flux2_dev.py and flux2_klein.py add their text encoders (Mistral-Small-3.1, Qwen3).

Not a family by itself (the registry lists the two that build on it). What differs from FLUX.1 Kontext:

- latents: 32 VAE channels patchified 2x2 *before* packing and normalised by the VAE's batch-norm statistics, so a
  token is 128 channels, packed row-major (B, h * w, 128) with 4-axis position ids (t, h, w, l);
- input images: each one's latents appended to the sequence in the order given, its position ids at t = 10, 20, ...
  (the pipeline's `_prepare_image_ids`); the first input image is the motion source;
- text: hidden states of three layers of the text encoder stacked, padded to `model.max_sequence_length` tokens
  (the pipeline's default 512) and attended unmasked, position ids (0, 0, 0, l);
- the sigma grid's shift: the pipeline's `compute_empirical_mu(image tokens, steps)`, not Kontext's `calculate_shift`;
- the text encoder's size ([dev]'s 24 B encoder beside its 32 B transformer does not fit one 80 GB GPU): the
  conditioning is encoded once per group; `model.prompt_cache` keeps the embeddings of the prompts seen (an example's
  prompt is encoded once a run), and `model.text_encoder_offload` keeps the encoder in CPU memory, streaming its
  layers to the GPU for the prompts not cached;
- LoRA: the double-stream blocks name their layers as FLUX.1's (`to_q`, ..., `to_out.0`, `add_*_proj`,
  `to_add_out`); each single-stream block has one fused `attn.to_qkv_mlp_proj` (q, k, v and the MLP's input) and a
  bare `attn.to_out` (attention and MLP output), which `lora_target_modules` adds (`tests/unit/test_flux2.py` counts
  the adapted layers per block type).
"""

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

from motionnft_core.config import ModelConfig
from motionnft_core.models.families.flux import FluxPolicy
from motionnft_core.models.policy import Conditioning

MU_STEPS = 50  # the pipelines' default step count: the shift `shift_mu` gives when no step count is asked
ATTENTION = ("to_q", "to_k", "to_v")  # a double block's separate projections; a single block fuses them


class Flux2Policy(FluxPolicy):
    """FLUX.2's latents, input images, sigma grid and LoRA targets (module docstring); the transformer call is
    flux.FluxPolicy's, the text encoder the subclass's (`encode_text`)."""

    max_input_images = 4  # this service's bound (each input image adds an edit's worth of tokens), not the model's

    def __init__(
        self,
        pipe,
        *,
        guidance_scale: float = ModelConfig.guidance,
        max_sequence_length: int = ModelConfig.max_sequence_length,
        text_encoder_offload: bool = ModelConfig.text_encoder_offload,
        prompt_cache: int = ModelConfig.prompt_cache,
    ):
        super().__init__(pipe, guidance_scale=guidance_scale, max_sequence_length=max_sequence_length)
        self.prompt_cache = PromptCache(prompt_cache)
        self.text_encoder_offload = text_encoder_offload
        if text_encoder_offload:
            offload_layers(pipe.text_encoder, self.device)

    @classmethod
    def place(cls, pipe, device: torch.device | str, **policy_kwargs):
        """With `text_encoder_offload` the text encoder stays in CPU memory (the constructor streams it)."""
        if not policy_kwargs.get("text_encoder_offload"):
            return pipe.to(device)
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module) and name != "text_encoder":
                module.to(device)
        return pipe

    @classmethod
    def policy_kwargs(cls, model: ModelConfig) -> dict:
        return {**super().policy_kwargs(model), "text_encoder_offload": model.text_encoder_offload,
                "prompt_cache": model.prompt_cache}  # fmt: skip

    def lora_target_modules(self, requested: Sequence[str]) -> list[str]:
        """The requested names in the double-stream blocks, and in each single-stream block the fused
        `attn.to_qkv_mlp_proj` where q, k or v is requested and the bare `attn.to_out` where `to_out.0` is (named
        one by one: a suffix `to_out` would also match the double blocks' `to_out` list)."""
        targets = list(requested)
        singles = range(len(self.transformer.single_transformer_blocks))
        if any(name in requested for name in ATTENTION):
            targets.append("to_qkv_mlp_proj")
        if "to_out.0" in requested:
            targets += [f"single_transformer_blocks.{i}.attn.to_out" for i in singles]
        return targets

    # ------------------------------------------------------------------ grids and latents
    def shift_mu(self, height: int, width: int, num_steps: int | None = None) -> float:
        """The pipeline's empirical mu for this many image tokens and steps (`MU_STEPS` when not given)."""
        return compute_empirical_mu(self.seq_len(height, width), num_steps or MU_STEPS)

    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """linspace(1, 1/n, n) shifted by the pipeline's empirical mu of (tokens, n), as `Flux2*Pipeline.__call__`."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if num_steps == 1:
            self.check_size(height, width)
            return torch.ones(1, dtype=torch.float32)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        mu = self.shift_mu(height, width, num_steps)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        return scheduler.sigmas[:-1].to(device="cpu", dtype=torch.float32)

    def prepare_latents(
        self, batch: int, height: int, width: int, generator: torch.Generator | list[torch.Generator]
    ) -> torch.Tensor:
        self.check_size(height, width)
        latents, _ = self.pipe.prepare_latents(
            batch, self.latent_channels, height, width, torch.float32, self.device, generator
        )
        return latents

    # ------------------------------------------------------------------ phases
    def pack_map(self, latent_map: torch.Tensor) -> torch.Tensor:
        """A per-latent-pixel map (h, w) in the token order (L,): FLUX.2 first folds each 2x2 patch into the
        channels (`_patchify_latents`), then packs the patches row-major (`_pack_latents`), the pipeline's own
        two steps; each token gets the mean of its patch (the motion-focal weights)."""
        h, w = latent_map.shape
        packed = self.pipe._pack_latents(self.pipe._patchify_latents(latent_map.reshape(1, 1, h, w)))  # (1, L, 4)
        return packed[0].mean(dim=-1)

    def encode_text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds (B, T, D), text_ids (B, T, 4)): the cached embeddings of the prompts seen before, the text
        encoder's for the others (one batch), kept in the cache (on the CPU) when it is on."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self.prompt_cache))
        fresh = {}
        if missing:
            embeds = self._prompt_embeds(missing)
            fresh = dict(zip(missing, embeds, strict=True))
            for prompt, row in fresh.items():
                self.prompt_cache.put(prompt, row)
        rows = [fresh[p] if p in fresh else self.prompt_cache.get(p) for p in prompts]
        prompt_embeds = torch.stack([row.to(self.device) for row in rows])
        return prompt_embeds, self.pipe._prepare_text_ids(prompt_embeds).to(self.device)

    def _prompt_embeds(self, prompts: list[str]) -> torch.Tensor:
        """The text encoder's embeddings (B, T, D) of `prompts` (the family's pipeline's `encode_prompt`)."""
        return self.pipe.encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )[0]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], images: torch.Tensor | Sequence[torch.Tensor]) -> Conditioning:
        slots = self._input_slots(images)
        batch, height, width = self._check_images(prompts, slots[0])
        prompt_embeds, text_ids = self.encode_text(prompts)
        # Each input image: VAE mode, 2x2 patchify, batch-norm normalise (the pipeline's `_encode_vae_image`).
        latents = [self.pipe._encode_vae_image(self._to_pixels(slot), generator=None) for slot in slots]
        image_ids = self.pipe._prepare_image_ids([lat[:1] for lat in latents])[0]  # (n * L, 4): t = 10, 20, ...
        target_ids = self.pipe._prepare_latent_ids(latents[0])[0]  # (L, 4): t = 0
        return Conditioning(
            tensors={
                "prompt_embeds": prompt_embeds,  # (B, T, 3 * text hidden)
                "image_latents": torch.cat([self.pipe._pack_latents(lat) for lat in latents], dim=1),  # (B, n*L, D)
            },
            shared={"txt_ids": text_ids[0], "img_ids": torch.cat([target_ids, image_ids.to(target_ids)], dim=0)},
            height=height,
            width=width,
        )

    @torch.no_grad()
    def decode(self, x0: torch.Tensor, height: int, width: int) -> torch.Tensor:
        self.check_size(height, width)
        h, w = height // (self.vae_scale_factor * 2), width // (self.vae_scale_factor * 2)
        batch, _, channels = x0.shape
        latents = x0.to(self.device, self.vae.dtype).reshape(batch, h, w, channels).permute(0, 3, 1, 2)
        bn = self.vae.bn
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)
        latents = latents * std.to(latents) + bn.running_mean.view(1, -1, 1, 1).to(latents)
        latents = self.pipe._unpatchify_latents(latents)
        images = self.vae.decode(latents, return_dict=False)[0]
        return self._to_uint8(images)


class PromptCache:
    """Prompt -> its embeddings (T, D) on the CPU, the `size` most recently used (size 0: nothing is kept)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._rows: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, prompt: str) -> torch.Tensor:
        self._rows.move_to_end(prompt)
        return self._rows[prompt]

    def put(self, prompt: str, row: torch.Tensor) -> None:
        if self.size == 0:
            return
        self._rows[prompt] = row.detach().to("cpu")
        self._rows.move_to_end(prompt)
        while len(self._rows) > self.size:
            self._rows.popitem(last=False)


def offload_layers(module: torch.nn.Module, device: torch.device) -> None:
    """Keep `module`'s weights in CPU memory and stream each layer's to `device` while it runs (accelerate's
    `cpu_offload`, what diffusers' sequential offload uses): the text encoder then costs the GPU one layer."""
    from accelerate import cpu_offload

    module.to("cpu")
    cpu_offload(module, execution_device=device)


# ---------------------------------------------------------------------------------------- builders
def tiny_vae_and_transformer(seed: int, *, joint_attention_dim: int, guidance_embeds: bool) -> dict:
    """A tiny `AutoencoderKLFlux2` (8x, 4 latent channels -> 16 after patchify) with random batch-norm statistics
    (so the normalisation is exercised), and a tiny `Flux2Transformer2DModel` with two blocks of each type."""
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8),  # 4 blocks -> 8x downsampling, as the real one
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape) * 0.1)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape) + 0.5)

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        in_channels=16,  # 4 latent channels x (2x2 patchify)
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,  # 3 x the text encoder's hidden size
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),  # sums to attention_head_dim
        guidance_embeds=guidance_embeds,
    )
    return {"vae": vae, "transformer": transformer}


def full_vae_and_transformer(config: dict) -> dict:
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**config["scheduler"]),
        "vae": AutoencoderKLFlux2(**config["vae"]),
        "transformer": Flux2Transformer2DModel(**config["transformer"]),
    }
