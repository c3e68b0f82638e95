"""Full-size pipelines of every family with random weights, from the real model configs kept in
motionnft_core/models/configs/ (nothing comes from a hub): for benchmarks on a GPU, and to check the configs on a CPU.

`build_full_size(family, device="meta")` builds every module without memory (parameter counts, shapes); `device="cuda"`
constructs each module directly on the GPU in the target dtype with its own initialisation. A random-weight model costs
exactly what the real one costs (bench/README.md). Tokenizers are the small offline ones of
motionnft_core/models/tokenizers.py (their ids fit the real vocabularies) and the text encoders' special-token ids are
set to theirs. `text_layers` cuts the text encoders to that many layers at their real widths: the conditioning is
encoded once per group, and stand-ins leave the GPU memory to what a benchmark measures. Each family's components
are its module's `full_size_components` (motionnft_core/models/families/).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from motionnft_core.config import FAMILIES
from motionnft_core.models.families import family_module, policy_class

CONFIG_DIR = Path(__file__).with_name("configs")


def config_path(family: str) -> Path:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return CONFIG_DIR / f"{policy_class(family).config_name}.json"


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


def layers(config: dict, key: str, count: int | None) -> dict:
    """`config` with `key` (a text encoder's layer count) set to `count`; as is for None."""
    return config if count is None else {**config, key: count}


def build_full_size(
    family: str, *, device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16,
    text_layers: int | None = None,
) -> DiffusionPipeline:  # fmt: skip
    """The `family` pipeline at its real sizes with random weights on `device` (see the module docstring)."""
    config = real_config(family)
    pipeline_cls, components = policy_class(family).pipeline_class, family_module(family).full_size_components
    with _constructing(device, dtype):
        return pipeline_cls(**components(config, text_layers))


def parameter_counts(pipe: DiffusionPipeline) -> dict[str, int]:
    """Parameters per model component (works on the meta device)."""
    return {name: sum(p.numel() for p in module.parameters()) for name, module in pipe.components.items()
            if isinstance(module, torch.nn.Module)}  # fmt: skip
