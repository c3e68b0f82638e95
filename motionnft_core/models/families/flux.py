"""What FLUX.1 Kontext (flux_kontext.py) and FLUX.2 (flux2.py) share: the text padded to `model.max_sequence_length`
tokens, text and image position ids (`txt_ids`, `img_ids`) in the conditioning's shared tensors, and a distilled
guidance embedding where the transformer has one, `model.guidance` in rollouts and training and the family's
`eval.*` key in the evaluation. Not a family by itself (the registry lists the modules that build on it).
"""

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import fields

import torch

from motionnft_core.config import EvalConfig, ModelConfig
from motionnft_core.models.policy import Conditioning, EditPolicy


class FluxPolicy(EditPolicy):
    """The FLUX transformers' call (module docstring); the subclass encodes, decodes and names its evaluation's
    guidance key."""

    pads_text = True  # the text is padded to max_sequence_length, and FLUX attends to the padding
    eval_guidance_key: str | None = None  # the `eval.*` scale of the distilled guidance; None: no guidance embedding

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        key = cls.eval_guidance_key
        if key is not None and key not in {f.name for f in fields(EvalConfig)}:
            raise TypeError(f"{cls.__name__}.eval_guidance_key: eval.{key} is no key of the eval section")

    def __init__(
        self,
        pipe,
        *,
        guidance_scale: float = ModelConfig.guidance,
        max_sequence_length: int = ModelConfig.max_sequence_length,
    ):
        super().__init__(pipe)
        self.guidance_scale = guidance_scale  # the distilled guidance embedding, where the transformer has one
        self.max_sequence_length = max_sequence_length

    @classmethod
    def policy_kwargs(cls, model: ModelConfig) -> dict:
        return {"guidance_scale": model.guidance, "max_sequence_length": model.max_sequence_length}

    @classmethod
    def eval_sampling(cls, cfg: EvalConfig) -> dict:
        if cls.eval_guidance_key is None:
            return super().eval_sampling(cfg)
        return {cls.eval_guidance_key: getattr(cfg, cls.eval_guidance_key)}

    def eval_guidance(self, cfg: EvalConfig) -> AbstractContextManager[None]:
        """The distilled guidance set to `eval.<eval_guidance_key>` while sampling, then put back."""
        if self.eval_guidance_key is None:
            return super().eval_guidance(cfg)
        return self.guidance_as(getattr(cfg, self.eval_guidance_key))

    @contextmanager
    def guidance_as(self, scale: float) -> Iterator[None]:
        """The distilled guidance scale set to `scale` while inside, then put back (the evaluation samples with the
        published setting, rollouts and training with `model.guidance`)."""
        saved = self.guidance_scale
        self.guidance_scale = scale
        try:
            yield
        finally:
            self.guidance_scale = saved

    def transformer_inputs(self, cond: Conditioning, seq_len: int) -> dict:
        """The T5 / stacked text embeddings, the position ids, and the guidance embedding's scale per row (float32,
        as the pipelines make it) where the transformer has one."""
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((cond.batch,), self.guidance_scale, device=self.device, dtype=torch.float32)
        return {
            "guidance": guidance,
            "encoder_hidden_states": cond.tensors["prompt_embeds"],
            "txt_ids": cond.shared["txt_ids"],
            "img_ids": cond.shared["img_ids"],
        }
