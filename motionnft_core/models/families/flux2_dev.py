"""FLUX.2 [dev]: the policy over `Flux2Pipeline` (FLUX.2's transformer and VAE, flux2.py) with a Mistral-Small-3.1
text encoder (`Mistral3ForConditionalGeneration`, the stacked hidden states of layers 10, 20 and 30), its tiny and
full-size builders.

A guidance-distilled transformer: its guidance embedding takes `model.guidance` in rollouts and training (one
transformer call per step, no CFG: the recipe's) and `eval.flux2_guidance` in the evaluation (the model card's 4).
Its size plan (a 32 B transformer and a 24 B encoder on one 80 GB GPU): `model.prompt_cache` and
`model.text_encoder_offload` (flux2.py, docs/models.md).
"""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

from motionnft_core.config import ModelConfig
from motionnft_core.models.families import flux2
from motionnft_core.models.full_size import layers, real_config
from motionnft_core.models.tokenizers import build_pixtral_processor

TEXT_LAYERS = 31  # the pipeline reads hidden states 10, 20 and 30: a cut encoder keeps at least 30 layers + 1


class Flux2DevPolicy(flux2.Flux2Policy):
    """FLUX.2 [dev]: Mistral-Small-3.1 text, a distilled guidance embedding (flux2.Flux2Policy does the rest)."""

    family = "flux2_dev"
    pipeline_class = Flux2Pipeline
    config_name = "flux2_dev"
    eval_guidance_key = "flux2_guidance"

    @classmethod
    def stock_call_kwargs(cls, height: int, width: int) -> dict:
        return {"guidance_scale": ModelConfig.guidance}  # the policy's default guidance embedding


def _mistral3(processor, text: dict, vision: dict) -> Mistral3ForConditionalGeneration:
    tokenizer = processor.tokenizer
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    return Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=MistralConfig(**text, **ids), vision_config=PixtralVisionConfig(**vision),
        image_token_index=tokenizer.convert_tokens_to_ids(processor.image_token), spatial_merge_size=2,
        multimodal_projector_bias=False, projector_hidden_act="gelu",
        tie_word_embeddings=text.get("tie_word_embeddings", False),  # Mistral-Small's lm_head is its own
    ))  # fmt: skip


def tiny_components(seed: int) -> dict:
    """Components of a tiny Flux2Pipeline: a 31-layer Mistral of width 16 (the pipeline stacks layers 10, 20, 30)
    with a one-layer Pixtral vision tower (the pipeline encodes text only)."""
    processor = build_pixtral_processor()
    components = flux2.tiny_vae_and_transformer(seed, joint_attention_dim=3 * 16, guidance_embeds=True)
    torch.manual_seed(seed)
    text_encoder = _mistral3(
        processor,
        {"vocab_size": len(processor.tokenizer), "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": TEXT_LAYERS, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
         "max_position_embeddings": 1024},
        {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
         "head_dim": 8, "image_size": 64, "patch_size": 16},
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(**real_config("flux2_dev")["scheduler"])  # the real one
    return {**components, "scheduler": scheduler, "text_encoder": text_encoder, "tokenizer": processor}


def full_size_components(config: dict, text_layers: int | None) -> dict:
    """Components at the real sizes from `config` (motionnft_core/models/full_size.py); a cut text encoder keeps
    `TEXT_LAYERS`, the layers the pipeline reads."""
    processor = build_pixtral_processor()
    count = None if text_layers is None else max(text_layers, TEXT_LAYERS)
    text = layers(config["text_encoder"]["text_config"], "num_hidden_layers", count)
    return {**flux2.full_vae_and_transformer(config), "tokenizer": processor,
            "text_encoder": _mistral3(processor, text, config["text_encoder"]["vision_config"])}  # fmt: skip


POLICY = Flux2DevPolicy
