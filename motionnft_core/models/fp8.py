"""FP8 no-grad forwards (`rollout.fp8`, `rollout.fp8_reference`): the transformer blocks' linear layers
run as float8 matrix products where no gradient is needed.

DiffusionNFT's loss uses no rollout log-probabilities (docs/algorithm.md), so the rollout may sample with a lossy model:
its error changes which edits are drawn, never a term of the loss. The reference forwards (v_old, v_ref) do enter
the loss, so they have their own flag. Scaling is row-wise (one scale per activation row and per weight output
channel, the amax mapped to float8_e4m3fn's largest value, 448): an outlier then coarsens only its own token or
channel, not the whole tensor, and `torch._scaled_mm` takes such scales directly. A layer keeps its full-precision
weight: with gradients enabled, or while FP8 is off (the default), it computes exactly what `nn.Linear` does, so
the parity probe, evaluation edits and a learner sharing the model (bench/) see the plain model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
ALIGN = 16  # torch._scaled_mm wants the inner and output dimensions in multiples of 16
# The adapters change every step; the timestep modulations (FLUX `norm*.linear`, Qwen `img_mod` / `txt_mod`) run on
# one row per sample, cost nothing, and scale every token.
SKIPPED = ("lora_", "norm", "_mod")


def rowwise_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-row scale (rows, 1), float32: the row's amax maps to FP8_MAX; an all-zero row gets scale 1."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to float8_e4m3fn (saturating at +-448): x ~ to_fp8(x, s).float() * s."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W.T + b with x quantized per row here and W (out, in) given quantized with scales (1, out)."""
    rows = x.reshape(-1, x.shape[-1])
    x_scale = rowwise_scale(rows)
    y = torch._scaled_mm(to_fp8(rows, x_scale), w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], w8.shape[0])


class FP8Linear(nn.Linear):
    """An `nn.Linear` that also holds its weight in float8 and uses it under no_grad while `fp8_on` is set.

    Made by `convert` from a live layer (its class swapped, parameters, hooks and state-dict keys untouched); the
    float8 copy is a non-persistent buffer, rebuilt by `refresh` after the weight changes in place.
    """

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    fp8_on: bool

    def refresh(self) -> None:
        with torch.no_grad():
            weight = self.weight.full_tensor() if isinstance(self.weight, DTensor) else self.weight  # FSDP2-sharded
            scale = rowwise_scale(weight)
            self.register_buffer("weight_fp8", to_fp8(weight, scale), persistent=False)
            self.register_buffer("weight_scale", scale.t().contiguous(), persistent=False)  # (1, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_on and not torch.is_grad_enabled():
            return fp8_linear(x, self.weight_fp8, self.weight_scale, self.bias)
        return F.linear(x, self.weight, self.bias)


def check_fp8_device(device: torch.device) -> None:
    """Raise unless `device` multiplies float8: any CPU (slowly, for tests), CUDA from compute capability 8.9."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(device)
            raise ValueError(
                f"rollout.fp8 / rollout.fp8_reference need FP8 matrix products (compute capability >= 8.9: Ada, "
                f"Hopper, Blackwell); {name} has {major}.{minor}: set both to false"
            )
    elif device.type != "cpu":
        raise ValueError(f"rollout.fp8 / rollout.fp8_reference: no FP8 matrix products on {device.type}")


def convert(blocks: list[nn.Module]) -> int:
    """Turn the plain linear layers inside `blocks` into `FP8Linear` (FP8 off); returns how many now are.

    Only exact `nn.Linear`s with both dimensions multiples of 16 and no name part in `SKIPPED`; idempotent.
    """
    count = 0
    for block in blocks:
        for name, module in block.named_modules():
            if isinstance(module, FP8Linear):
                count += 1
            elif (
                type(module) is nn.Linear
                and not any(s in name for s in SKIPPED)
                and module.in_features % ALIGN == 0
                and module.out_features % ALIGN == 0
            ):
                module.__class__ = FP8Linear
                module.fp8_on = False
                module.refresh()
                count += 1
    return count


def fp8_layers(model: nn.Module) -> list[FP8Linear]:
    return [m for m in model.modules() if isinstance(m, FP8Linear)]


def refresh(model: nn.Module) -> None:
    """Re-quantize every FP8 layer's weight (after a full fine-tune's weights were copied in)."""
    for layer in fp8_layers(model):
        layer.refresh()


@contextmanager
def fp8_forwards(model: nn.Module, on: bool = True) -> Iterator[None]:
    """No-grad forwards of `model` inside the block use FP8 (with `on`; otherwise the plain layers)."""
    layers = fp8_layers(model)
    before = [layer.fp8_on for layer in layers]
    for layer in layers:
        layer.fp8_on = on
    try:
        yield
    finally:
        for layer, was in zip(layers, before, strict=True):
            layer.fp8_on = was
