"""Full-size FLUX.1 Kontext and Qwen-Image-Edit pipelines with random weights, from the real model configs kept in
motionnft_core/models/configs/ (nothing comes from a hub): for benchmarks on a GPU, and to check the configs on a CPU.

`build_full_size(family, device="meta")` builds every module without memory (parameter counts, shapes); `device="cuda"`
constructs each module directly on the GPU in the target dtype with its own initialisation. A random-weight model costs
exactly what the real one costs (bench/README.md). Tokenizers are the small offline ones of
motionnft_core/models/tokenizers.py (their ids fit the real vocabularies) and the text encoders' special-token ids are
set to theirs. `text_layers` cuts the text encoders to that many layers at their real widths: the conditioning is
encoded once per group, and stand-ins leave the GPU memory to what a benchmark measures.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    DiffusionPipeline,
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

from motionnft_core.config import FAMILIES
from motionnft_core.models.tokenizers import (
    build_clip_tokenizer,
    build_qwen_processor,
    build_qwen_tokenizer,
    build_t5_tokenizer,
    qwen_token_ids,
)

CONFIG_DIR = Path(__file__).with_name("configs")


def config_path(family: str) -> Path:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return CONFIG_DIR / f"{family}.json"


def real_config(family: str) -> dict:
    """The real component configs of `family` (transformer, vae, text encoder(s), scheduler)."""
    return json.loads(config_path(family).read_text())


@contextlib.contextmanager
def _constructing(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside are allocated on `device` in `dtype` (meta: no memory at all)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _layers(config: dict, key: str, layers: int | None) -> dict:
    return config if layers is None else {**config, key: layers}


def _flux_kontext(config: dict, text_layers: int | None) -> dict:
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    clip = {**_layers(config["text_encoder"], "num_hidden_layers", text_layers),
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    t5 = {**_layers(config["text_encoder_2"], "num_layers", text_layers), "pad_token_id": tokenizer_2.pad_token_id,
          "eos_token_id": tokenizer_2.eos_token_id, "decoder_start_token_id": tokenizer_2.pad_token_id}  # fmt: skip
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**config["scheduler"]),
        "vae": AutoencoderKL(**config["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**clip)),
        "tokenizer": tokenizer,
        "text_encoder_2": T5EncoderModel(T5Config(**t5)),
        "tokenizer_2": tokenizer_2,
        "transformer": FluxTransformer2DModel(**config["transformer"]),
        "image_encoder": None,
        "feature_extractor": None,
    }


def _qwen_image_edit(config: dict, text_layers: int | None) -> dict:
    tokenizer = build_qwen_tokenizer()
    ids = qwen_token_ids(tokenizer)
    encoder = copy.deepcopy(config["text_encoder"])
    encoder["text_config"] = {**_layers(encoder["text_config"], "num_hidden_layers", text_layers),
                              "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                              "pad_token_id": ids["<|endoftext|>"]}  # fmt: skip
    encoder["vision_config"] = _layers(encoder["vision_config"], "depth", text_layers)
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


_COMPONENTS = {"flux_kontext": (FluxKontextPipeline, _flux_kontext), "qwen_image_edit": (QwenImageEditPipeline,
                                                                                         _qwen_image_edit)}  # fmt: skip


def build_full_size(
    family: str, *, device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16,
    text_layers: int | None = None,
) -> DiffusionPipeline:  # fmt: skip
    """The `family` pipeline at its real sizes with random weights on `device` (see the module docstring)."""
    config = real_config(family)
    pipeline_cls, components = _COMPONENTS[family]
    with _constructing(device, dtype):
        return pipeline_cls(**components(config, text_layers))


def parameter_counts(pipe: DiffusionPipeline) -> dict[str, int]:
    """Parameters per model component (works on the meta device)."""
    return {name: sum(p.numel() for p in module.parameters()) for name, module in pipe.components.items()
            if isinstance(module, torch.nn.Module)}  # fmt: skip
