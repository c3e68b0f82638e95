"""Tokenizers and the Qwen2-VL / Pixtral processors of the pipelines, built offline from a few sentences (no hub).

Every tokenizer is the real kind (CLIP byte-level BPE, T5 Unigram, Qwen2 byte-level BPE with ChatML and vision
tokens), small and deterministic: the same one in every process and on every machine. The tiny pipelines, the
tiny judge and the full-size benchmark pipelines use them; their ids fit any real vocabulary.
"""

import json

from tokenizers import AddedToken, pre_tokenizers, trainers
from transformers import (
    CLIPTokenizer,
    PixtralImageProcessor,
    PixtralProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    T5Tokenizer,
)

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

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # the Qwen2-VL image processors' normalisation
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


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


# Mistral's system / instruction markers around each message; an image part renders as the image token.
MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{% else %}[INST]{% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}<|image_pad|>{% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'system' %}[/SYSTEM_PROMPT]{% else %}[/INST]{% endif %}"
    "{% endfor %}"
)


def build_pixtral_processor() -> PixtralProcessor:
    """The processor of FLUX.2 [dev]'s Mistral-Small-3.1 encoder (a `PixtralProcessor`, which the pipeline calls
    `apply_chat_template` on), over this module's Qwen2 BPE with a Mistral-style chat template and `<|image_pad|>` as
    the image token (the real one is Mistral's Tekken tokenizer; the ids fit its vocabulary)."""
    return PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=build_qwen_tokenizer(),
                            chat_template=MISTRAL_CHAT_TEMPLATE, image_token="<|image_pad|>")  # fmt: skip


def qwen_token_ids(tokenizer: Qwen2Tokenizer) -> dict[str, int]:
    """The ids of the ChatML / vision special tokens in `tokenizer` (a Qwen2-VL config must name them)."""
    return {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}


def build_qwen_processor(tokenizer: Qwen2Tokenizer) -> Qwen2VLProcessor:
    """Qwen2-VL processor: 14-px patches merged 2x2, the condition image capped at 256 vision tokens."""
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=14,
            merge_size=2,
            temporal_patch_size=2,
            min_pixels=56 * 56,
            max_pixels=28 * 28 * 256,  # caps the vision tokens of the condition image at 256
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        ),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_CHAT_TEMPLATE,
    )


