"""Qwen-Image-Edit-2509 / -2511 ("Plus"): the policy over `QwenImageEditPlusPipeline`, its tiny and full-size builders.

The components are Qwen-Image-Edit's (Qwen2.5-VL, the same VAE and MMDiT; 2511's transformer sets `zero_cond_t`, the
input images' tokens modulated at timestep 0), and an example has one to three input images: the VL encoder sees each
as "Picture i:" at ~384^2 pixels, and each one's latents are appended to the sequence in order, described by
`img_shapes`. The first input image is the motion source (the flow reward compares the edit with it). The pipeline
makes each input image's latents at ~1 MP; here they are made at the edit's size, the training resolution (as the
Qwen-Image-Edit policy does). No CFG in rollouts and training (the recipe's); true CFG (`eval.qwen_true_cfg` against
`eval.negative_prompt`) in the evaluation, the model cards' published setting (docs/models.md).
"""

from collections.abc import Sequence

import torch
from diffusers import QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions
from PIL import Image

from motionnft_core.models.families import qwen_image_edit
from motionnft_core.models.policy import Conditioning


class QwenImageEditPlusPolicy(qwen_image_edit.QwenImageEditPolicy):
    """Qwen-Image-Edit-2509/2511: one to three input images per example (module docstring), each prompt encoded with
    its pictures (`encode_text`); the rest (the input images' latents, the transformer call, the VAE decode, the
    evaluation's true CFG) is Qwen-Image-Edit's."""

    family = "qwen_image_edit_plus"
    pipeline_class = QwenImageEditPlusPipeline
    config_name = "qwen_image_edit_plus"
    max_input_images = 3  # the model cards: "optimal performance with 1 to 3 input images"

    def _condition_image(self, image: torch.Tensor) -> Image.Image:
        """uint8 (3, H, W) -> the PIL image the VL encoder sees, resized to ~384^2 pixels as the pipeline does."""
        height, width = image.shape[-2:]
        cond_width, cond_height = calculate_dimensions(CONDITION_IMAGE_SIZE, width / height)
        pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
        return self.pipe.image_processor.resize(pil, cond_height, cond_width)

    def encode_text(self, prompts: Sequence[str], slots: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, mask) of the VL encoder, one prompt at a time: the pipeline numbers the pictures of one
        prompt ("Picture 1: ... Picture n:"); the rows are zero-padded to the longest prompt, masked."""
        height, width = slots[0].shape[-2:]
        rows = []
        for row, prompt in enumerate(prompts):
            embeds, mask = self.pipe._get_qwen_prompt_embeds(
                [prompt], [self._condition_image(slot[row]) for slot in slots], device=self.device, dtype=self.dtype
            )
            rows.append(Conditioning({"prompt_embeds": embeds, "prompt_embeds_mask": mask}, {}, height, width))
        text = Conditioning.cat(rows)
        return text.tensors["prompt_embeds"], text.tensors["prompt_embeds_mask"]


def tiny_components(seed: int) -> dict:
    """Qwen-Image-Edit's tiny components with 2511's `zero_cond_t` transformer (its input-image tokens at t = 0)."""
    return qwen_image_edit.tiny_components(seed, zero_cond_t=True)


def full_size_components(config: dict, text_layers: int | None) -> dict:
    """Components at the real sizes from `config` (motionnft_core/models/full_size.py): Qwen-Image-Edit's kinds."""
    return qwen_image_edit.full_size_components(config, text_layers)


POLICY = QwenImageEditPlusPolicy
