"""Tiny random-weight pipelines of every family, built offline and saved to disk.

Tests, CPU runs and benchmarks of the plumbing need the real pipeline classes and the real loading path
(`DiffusionPipeline.from_pretrained`) but not the real 12-20 B weights. Sizes follow diffusers' own pipeline
tests (`get_dummy_components` in tests/pipelines/flux/test_pipeline_flux_kontext.py and
tests/pipelines/qwenimage/test_qwenimage_edit.py), with two deliberate differences: both VAEs downsample 8x
like the real ones (so image sizes must be multiples of 16, as in production), and every tokenizer is
trained here from a few sentences (the tests download theirs from the hub, which we cannot reach).
`torch.manual_seed(seed)` runs before each component, so a seed fixes every weight. Tokenizers and schedulers
are the real pipelines' kind (motionnft_core/models/tokenizers.py, motionnft_core/models/configs/). Each family's
components are its module's `tiny_components` (motionnft_core/models/families/); this module builds and caches.
"""

import os
import sys
from pathlib import Path

from motionnft_core.cache import build_atomically, builder_key
from motionnft_core.config import FAMILIES, ModelConfig
from motionnft_core.models import tokenizers
from motionnft_core.models.families import family_module, policy_class
from motionnft_core.models.full_size import config_path


def has_pipeline(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def _build(family: str, out_dir: str | os.PathLike, seed: int) -> Path:
    pipeline_cls, components = policy_class(family).pipeline_class, family_module(family).tiny_components
    return build_atomically(
        out_dir, lambda tmp: pipeline_cls(**components(seed)).save_pretrained(tmp), complete=has_pipeline,
        what="pipeline (no model_index.json)",
    )  # fmt: skip


def build_tiny_flux_kontext(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Tiny random FluxKontextPipeline saved with `save_pretrained` into `out_dir`; returns the path."""
    return _build("flux_kontext", out_dir, seed)


def build_tiny(family: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny pipeline of `family` (one of FAMILIES) into `out_dir`."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return _build(family, out_dir, seed)


def pipeline_source(model: ModelConfig) -> str:
    """The pipeline a run loads: `model.path`, or with `model.tiny` the tiny one, built offline into
    `model.cache_dir` once (the directory name carries this module's source hash, so code changes rebuild)."""
    if not model.tiny:
        return model.path
    families = [family_module(f) for f in FAMILIES]  # a family may build on another's components
    key = builder_key(sys.modules[__name__], *families, tokenizers, config_path(model.family))
    out = Path(model.cache_dir).expanduser() / "tiny" / f"{model.family}-{key}"
    return str(build_tiny(model.family, out))
