"""A tiny random-weight Qwen2-VL judge, built offline, that vLLM and transformers both load.

The real judge (Qwen2.5-VL-32B) is far too large for CPU tests; this model has the same architecture
family, the same chat/image plumbing and a tokenizer in which every digit 0-5 is a single token, so the
whole judge path (data-URL images -> vLLM -> structured digit choice -> log-probs) runs for real in seconds.
Its scores are random, which is all the tests need.
"""

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.utils import logging as hf_logging

from motionnft_core.cache import build_atomically, builder_key
from motionnft_core.config import JudgeConfig
from motionnft_core.models import tokenizers
from motionnft_core.models.tokenizers import CLIP_MEAN, CLIP_STD, QWEN_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS

SPECIAL_TOKENS = QWEN_SPECIAL_TOKENS  # ChatML + vision placeholders, as the policy-side Qwen tokenizer
BPE_VOCAB_SIZE = 600  # trained tokenizer size; the model's embedding table is padded to VOCAB_SIZE
VOCAB_SIZE = 640

CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE  # the same ChatML with Qwen2-VL vision placeholders

# A few sentences are enough: the byte-level alphabet already covers every character.
_TRAINING_TEXT = [
    "Here are two images: the original and the edited version.",
    "Rate the edit from 0 to 5. 0 1 2 3 4 5",
    "Instruction: make the person raise both arms above the head.",
    "The correct object was edited and the visual result is high quality.",
    "Preservation of identity, background and coherence of the scene.",
]


def _build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE, so each digit is its own token and no file has to come from a hub."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def _model_config(tokenizer: PreTrainedTokenizerFast) -> dict:
    """Hub-style (flat) Qwen2-VL config: readable by transformers 5.x and by vLLM."""
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    hidden = 128
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": hidden,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        # head_dim = 128 / 2 = 64; the three M-RoPE sections (t, h, w) must sum to head_dim / 2.
        "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vision_config": {
            "depth": 2,
            "embed_dim": 128,
            "num_heads": 2,
            "mlp_ratio": 2,
            "hidden_size": hidden,  # the patch merger projects into the text hidden size
            "in_chans": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "hidden_act": "quick_gelu",
        },
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }


def _preprocessor_config() -> dict:
    """Qwen2-VL image processor: 14-px patches merged 2x2, so an image costs (H/28)*(W/28) tokens."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "min_pixels": 56 * 56,
        "max_pixels": 28 * 28 * 256,
    }


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' (and huggingface_hub's) tqdm bars off for the block, as they were after it."""
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _write(out_dir: Path, seed: int) -> None:
    tokenizer = _build_tokenizer()
    for digit in "012345":
        ids = tokenizer.encode(digit, add_special_tokens=False)
        assert len(ids) == 1, f"digit {digit!r} must be one token, got {ids}"
    tokenizer.save_pretrained(out_dir)

    config = _model_config(tokenizer)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**config)).to(torch.bfloat16)
    with _no_progress_bars():  # built in the judge actor: its "Writing model shards" bar reached the job's console
        model.save_pretrained(out_dir)
    # save_pretrained writes transformers 5's nested layout; rewrite the flat hub form both loaders read.
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))

    (out_dir / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(), indent=2))
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))


def build_tiny_judge(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny judge into `out_dir` (about 1 M parameters, a few seconds) and return its path.

    Idempotent: an existing complete directory is returned untouched. The files are written to a
    sibling temp dir and renamed into place, so a concurrent or interrupted build never leaves a
    half-written model where a server would load it.
    """
    return build_atomically(
        out_dir, lambda tmp: _write(tmp, seed), what="tiny judge",
        complete=lambda p: (p / "config.json").is_file() and (p / "model.safetensors").is_file(),
    )  # fmt: skip


def judge_source(judge: JudgeConfig, cache_dir: str) -> str:
    """The judge model a run serves: `reward.judge.model_path`, or with `reward.judge.tiny` this tiny judge,
    built offline into `cache_dir` once (keyed by this module's source hash)."""
    if not judge.tiny:
        return judge.model_path
    out = Path(cache_dir).expanduser() / "tiny" / f"judge-{builder_key(sys.modules[__name__], tokenizers)}"
    return str(build_tiny_judge(out))
