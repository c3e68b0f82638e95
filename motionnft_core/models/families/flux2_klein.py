"""FLUX.2 [klein]: the policy over `Flux2KleinPipeline` (FLUX.2's transformer and VAE, flux2.py) with a Qwen3 text
encoder (the stacked hidden states of layers 9, 18 and 27), its tiny and full-size builders.

The variants (docs/models.md): 4B (Qwen3-4B) and 9B (Qwen3-8B), each distilled (4 steps, no CFG) or base (50 steps,
CFG 4 against ""); one pipeline class loads all four (`is_distilled` in its `model_index.json`). No guidance
embedding; rollouts and training sample every variant without CFG (the recipe's); the evaluation samples a base
checkpoint with CFG `eval.klein_base_cfg`, as its pipeline does, and a distilled one without.
"""

from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from transformers import Qwen3Config, Qwen3ForCausalLM

from motionnft_core.config import EvalConfig
from motionnft_core.guidance import CFG, plain_cfg
from motionnft_core.models.families import flux2
from motionnft_core.models.full_size import layers, real_config
from motionnft_core.models.tokenizers import build_qwen_tokenizer

TEXT_LAYERS = 28  # the pipeline reads hidden states 9, 18 and 27: a cut encoder keeps at least 27 layers + 1


class Flux2KleinPolicy(flux2.Flux2Policy):
    """FLUX.2 [klein]: Qwen3 text, no guidance embedding (flux2.Flux2Policy does the rest)."""

    family = "flux2_klein"
    pipeline_class = Flux2KleinPipeline
    config_name = "flux2_klein"

    @property
    def is_distilled(self) -> bool:
        """The checkpoint's own flag (`Flux2KleinPipeline`'s config): a distilled [klein] ignores CFG."""
        return bool(self.pipe.config.get("is_distilled", False))

    def eval_cfg(self, cfg: EvalConfig) -> CFG | None:
        """A base checkpoint: CFG `eval.klein_base_cfg` against "" (the pipeline's negative prompt), combined as
        the pipeline does; a distilled one: none (the pipeline ignores its guidance scale)."""
        return None if self.is_distilled else CFG.at(cfg.klein_base_cfg, "", plain_cfg)

    @classmethod
    def eval_sampling(cls, cfg: EvalConfig) -> dict:
        return {"klein_base_cfg": cfg.klein_base_cfg}  # used by a base checkpoint only (`eval_cfg`)

    @classmethod
    def stock_call_kwargs(cls, height: int, width: int) -> dict:
        return {"guidance_scale": 1.0}  # <= 1: no CFG, whether the checkpoint is distilled or base


def _qwen3(tokenizer, **config) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(Qwen3Config(**config, pad_token_id=tokenizer.pad_token_id,
                                        eos_token_id=tokenizer.eos_token_id))  # fmt: skip


def tiny_components(seed: int) -> dict:
    """Components of a tiny Flux2KleinPipeline: a 28-layer Qwen3 of width 16 (the pipeline stacks layers 9, 18, 27)."""
    import torch

    tokenizer = build_qwen_tokenizer()
    components = flux2.tiny_vae_and_transformer(seed, joint_attention_dim=3 * 16, guidance_embeds=False)
    torch.manual_seed(seed)
    text_encoder = _qwen3(
        tokenizer, vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        tie_word_embeddings=True,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(**real_config("flux2_klein")["scheduler"])  # the real one
    return {**components, "scheduler": scheduler, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "is_distilled": True}  # fmt: skip


def full_size_components(config: dict, text_layers: int | None) -> dict:
    """Components at the real sizes from `config` (motionnft_core/models/full_size.py); a cut text encoder keeps
    `TEXT_LAYERS`, the layers the pipeline reads."""
    tokenizer = build_qwen_tokenizer()
    count = None if text_layers is None else max(text_layers, TEXT_LAYERS)
    text = layers(config["text_encoder"], "num_hidden_layers", count)
    return {**flux2.full_vae_and_transformer(config), "text_encoder": _qwen3(tokenizer, **text),
            "tokenizer": tokenizer, "is_distilled": True}  # fmt: skip


POLICY = Flux2KleinPolicy
