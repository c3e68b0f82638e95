"""MkDocs hook: fills `docs/configuration.md` with the configuration reference, generated from the config schema
(`motionnft_core.config`'s dataclasses, the same source as `python -m learner.main --help`), so the page cannot
drift from the code. Fields are read generically (`dataclasses.fields`, `field.metadata`): any metadata beside
`help` (declared bounds such as `ge`, `le`, `choices`) is shown in the bounds column. The curation's own schema
(`curation.config`) fills `docs/curation.md` the same way."""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

# The reference documents the checkout being built, not whatever copy of the package is installed.
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from curation import config as curation_schema  # noqa: E402
from motionnft_core import config as schema  # noqa: E402

PLACEHOLDER = "<!-- config-reference -->"
CURATION_PLACEHOLDER = "<!-- curation-config-reference -->"
BOUND_WORDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _cell(text: str) -> str:
    """Markdown-table safe: no pipes or line breaks inside a cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value)


def _bounds(metadata: typing.Mapping[str, Any]) -> str:
    parts = []
    for key, value in metadata.items():
        if key == "help":
            continue
        if key in BOUND_WORDS:
            parts.append(f"{BOUND_WORDS[key]} {value}")
        elif key == "rule":  # config.py's declared `Rule`: its own wording of what it accepts, if it declares any
            declared = any(getattr(value, name) is not None for name in ("ge", "gt", "le", "lt", "multiple_of",
                                                                          "choices", "expected"))  # fmt: skip
            if declared:
                parts.append(value.expectation(integer=False))
        elif key == "choices":
            parts.append("one of " + ", ".join(str(x) for x in value))
        else:
            parts.append(f"{key}: {value}")
    return "; ".join(parts)


def config_entries(cls: type = schema.Config, prefix: str = "") -> list[tuple[str, str, str, str, str]]:
    """(dotted key, type, default, bounds, help) of every key of the schema, sections recursed, in schema order."""
    entries: list[tuple[str, str, str, str, str]] = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            entries.extend(config_entries(tp, f"{prefix}{f.name}."))
            continue
        entries.append((f"{prefix}{f.name}", _type_name(tp), _default(getattr(defaults, f.name)),
                        _bounds(f.metadata), f.metadata.get("help", "")))  # fmt: skip
    return entries


def render_reference(cls: type = schema.Config) -> str:
    """One table per section (`reward.flow` and `reward.judge` apart from `reward`): key, type, default, bounds,
    meaning."""
    entries = config_entries(cls)
    with_bounds = any(bounds for *_, bounds, _ in entries)  # the column appears once the schema declares bounds
    by_section: dict[str, list[tuple[str, str, str, str, str]]] = {}
    for entry in entries:
        by_section.setdefault(entry[0].rpartition(".")[0], []).append(entry)
    head = ("key", "type", "default", *(("bounds",) if with_bounds else ()), "meaning")
    out = []
    for section, rows in by_section.items():
        out += [f"## `{section}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key, tp, default, bounds, help_ in rows:
            cells = [f"`{key}`", f"`{_cell(tp)}`", f"`{_cell(default)}`", *([_cell(bounds)] if with_bounds else []),
                     _cell(help_)]  # fmt: skip
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if CURATION_PLACEHOLDER in markdown:
        markdown = markdown.replace(CURATION_PLACEHOLDER, render_reference(curation_schema.CurateConfig))
    if PLACEHOLDER not in markdown:
        return markdown
    return markdown.replace(PLACEHOLDER, render_reference())
