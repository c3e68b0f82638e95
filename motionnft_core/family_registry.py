"""The registry of policy families: each name the service trains and the module that implements it.

Kept at the bottom of the import levels (it imports nothing) so that the config reads the names for
`model.family`'s choices without loading any model code; `motionnft_core.models.families.family_module(name)` imports
the module. Adding a family is one entry here, one module under motionnft_core/models/families/ (its policy class,
its tiny builder, its full-size builder) and one JSON of its full-size configs (docs/development.md).
"""

FAMILY_MODULES: dict[str, str] = {
    "flux_kontext": "motionnft_core.models.families.flux_kontext",
    "qwen_image_edit": "motionnft_core.models.families.qwen_image_edit",
    "qwen_image_edit_plus": "motionnft_core.models.families.qwen_image_edit_plus",
    "flux2_klein": "motionnft_core.models.families.flux2_klein",
    "flux2_dev": "motionnft_core.models.families.flux2_dev",
}
FAMILIES: tuple[str, ...] = tuple(FAMILY_MODULES)
