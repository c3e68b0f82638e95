"""The policy families, one module each; this package's functions find a family's module and policy class.

Every family module (motionnft_core/family_registry.py lists them) defines:

- `POLICY`: its `EditPolicy` subclass (motionnft_core/models/policy.py), which carries what callers would otherwise
  ask by family name: the constructor's settings from `model.*` (`policy_kwargs`), the evaluation's sampling
  settings (`eval_cfg`, `eval_guidance`, `eval_sampling`), the stock pipeline's call arguments for the
  rollouts' settings (`stock_call_kwargs`), the LoRA target modules per block type (`lora_target_modules`), the
  name of its full-size config JSON (`config_name`);
- `tiny_components(seed)`: the components of its tiny random-weight pipeline (motionnft_core/models/tiny.py);
- `full_size_components(config, text_layers)`: the components at the real sizes (motionnft_core/models/full_size.py).

A module the registry does not list may hold what several families share (flux2.py: FLUX.2 [klein] and [dev];
flux.py: FLUX.1 Kontext and FLUX.2).
The modules are imported by name, on first use: importing a family's diffusers pipeline costs seconds.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from motionnft_core.family_registry import FAMILIES, FAMILY_MODULES


def family_module(family: str) -> ModuleType:
    """The module of `family`; ValueError naming the known ones for any other name."""
    if family not in FAMILY_MODULES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return importlib.import_module(FAMILY_MODULES[family])


def policy_class(family: str) -> type:
    """The `EditPolicy` subclass of `family`."""
    return family_module(family).POLICY


def policy_classes() -> dict[str, type]:
    """Every family's policy class, by family name (imports every family module)."""
    return {name: policy_class(name) for name in FAMILIES}
