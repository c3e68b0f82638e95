"""Tiny random-weight FLUX.1 Kontext and Qwen-Image-Edit pipelines, built offline and saved to disk.

Tests, CPU runs and benchmarks of the plumbing need the real pipeline classes and the real loading path
(`DiffusionPipeline.from_pretrained`) but not the real 12-20 B weights. Sizes follow diffusers' own pipeline
tests (`get_dummy_components` in tests/pipelines/flux/test_pipeline_flux_kontext.py and
tests/pipelines/qwenimage/test_qwenimage_edit.py), with two deliberate differences: both VAEs downsample 8x
like the real ones (so image sizes must be multiples of 16, as in production), and every tokenizer is
trained here from a few sentences (the tests download theirs from the hub, which we cannot reach).
`torch.manual_seed(seed)` runs before each component, so a seed fixes every weight.
"""

import json
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
from tokenizers import AddedToken, pre_tokenizers, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from common.cache import build_atomically, builder_key
from common.config import FAMILIES, ModelConfig

# Enough text for the BPE / Unigram trainers to learn a few merges; every character still has a token.
_TRAINING_TEXT = [
    "make the person raise both arms above the head",
    "turn the car so that it faces left",
    "the dog sits down on the grass next to the bench",
    "open the door and let the cat walk outside",
    "rotate the camera to show the side view of the building",
    "two people shake hands in front of a red wall",
    "a photo of a cup of coffee on a wooden table 0 1 2 3 4 5 6 7 8 9",
    "Describe the key features of the input image, then explain how the user's text instruction should "
    "alter or modify the image.",
]

# Real FLUX.1 Kontext [dev] scheduler: resolution-dependent shift between 256 and 4096 image tokens.
FLUX_KONTEXT_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

# Real Qwen-Image(-Edit) scheduler: exponential dynamic shift up to 8192 tokens, stretched to end at 0.02.
QWEN_IMAGE_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}

# Special tokens of the Qwen2.5-VL tokenizer that the processor and the edit prompt template use.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# ChatML; image parts render as the vision placeholder the processor expands to one <|image_pad|> per patch.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ['image', 'image_url'] %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# ---------------------------------------------------------------------------------------- tokenizers
def _bpe_vocab_and_merges(backend, trainer, specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train `backend` (a tokenizers.Tokenizer) in place; return its BPE vocab and merges, canonicalised.

    The trainer runs to completion (vocab_size above what the text can yield), where the token and merge *sets*
    are fixed; only the ids and the order of equal-count merges depend on the process's hash seed. Ids are
    therefore reassigned (specials first, then by length and text) and merges sorted the same way, so the same
    seed builds the same tiny model in every process and on every machine.
    """
    backend.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    if len(model["vocab"]) >= trainer.vocab_size:
        raise RuntimeError(f"BPE training stopped at vocab_size={trainer.vocab_size}: raise it to train to completion")
    tokens = specials + sorted((t for t in model["vocab"] if t not in specials), key=lambda t: (len(t), t))
    merges = sorted((tuple(m) for m in model["merges"]), key=lambda m: (len(m[0]) + len(m[1]), m))
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(vocab_size: int = 1000) -> CLIPTokenizer:
    """CLIP byte-level BPE trained on a few sentences with CLIP's own normalizer and pre-tokenizer."""
    backend = CLIPTokenizer().backend_tokenizer  # carries CLIP's normalizer / pre-tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    vocab, merges = _bpe_vocab_and_merges(backend, trainer, ["<|startoftext|>", "<|endoftext|>"])
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # CLIP's 77-token context


def build_t5_tokenizer() -> T5Tokenizer:
    """T5 Unigram (sentencepiece-style, pad=0, eos=1, unk=2) over the words and characters of a few sentences.

    The pieces are listed, not trained: Unigram EM prunes differently from process to process, and a tiny test
    model needs the same tokenizer everywhere. Whole words ("▁move") score above single characters, so known
    words are one token and anything else falls back to characters.
    """
    words = sorted({"\u2581" + w for line in _TRAINING_TEXT for w in line.split()})
    chars = sorted({c for line in _TRAINING_TEXT for c in line if not c.isspace()} | {"\u2581"})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(w, -2.0) for w in words] + [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def build_qwen_tokenizer(vocab_size: int = 600) -> Qwen2Tokenizer:
    """Qwen2 byte-level BPE with the ChatML / vision special tokens, trained on a few sentences."""
    backend = Qwen2Tokenizer().backend_tokenizer  # carries Qwen2's split regex + ByteLevel
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    vocab, merges = _bpe_vocab_and_merges(backend, trainer, list(QWEN_SPECIAL_TOKENS))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    # Registered as added tokens so they are never split (their ids are the trained ones).
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS]}
    )
    return tokenizer


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

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_KONTEXT_SCHEDULER)
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
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=14,
            merge_size=2,
            temporal_patch_size=2,
            min_pixels=56 * 56,
            max_pixels=28 * 28 * 256,  # caps the vision tokens of the condition image at 256
            image_mean=_CLIP_MEAN,
            image_std=_CLIP_STD,
        ),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_CHAT_TEMPLATE,
    )

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

    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)

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


def build_tiny_qwen_image_edit(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Tiny random QwenImageEditPipeline saved with `save_pretrained` into `out_dir`; returns the path."""
    return _build("qwen_image_edit", out_dir, seed)


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
    out = Path(model.cache_dir).expanduser() / "tiny" / f"{model.family}-{builder_key(sys.modules[__name__])}"
    return str(build_tiny(model.family, out))
