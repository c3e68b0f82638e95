"""Reading a run's config: YAML file (duplicate keys refused) <- dotted `key=value` overrides -> the typed
sections of `motionnft_core.config` (or another schema built of them: the curation's, `load_schema`), type-checked leaf
by leaf with errors that name the dotted key; plus the plain-dict form (dumps, checkpoints) and the `--help` listing.
The schema and its checks are in config.py."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from motionnft_core.config import Config, ConfigError, validate

T = TypeVar("T")


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Type-check one leaf; ints are accepted for floats, lists for tuples, nothing else is converted. Floats
    must be finite (YAML `.inf`/`.nan`, `1e999`)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, arg, value)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {
            _coerce(f"{key} (a key)", key_tp, k): _coerce(f"{key}.{k}", value_tp, v)
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            number = float(value)  # PyYAML reads `1e-4` (no dot) as a string; it is plainly a number
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        else:
            try:
                number = float(value)
            except OverflowError:  # an int beyond float range
                number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"{key}: unknown key{hint}")
        tp = hints[name]
        kwargs[name] = _build(tp, value, f"{key}.") if _is_section(tp) else _coerce(key, tp, value)
    return cls(**kwargs)  # keys left out keep their defaults


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (plain PyYAML keeps the last silently), at
    any depth; the error names the dotted key and the lines. `root` prefixes the keys (an override's key)."""

    root = ""

    def construct_document(self, node: yaml.Node) -> Any:
        self._paths: dict[int, str] = {}
        self._name_paths(node, self.root, set())
        return super().construct_document(node)

    def _name_paths(self, node: yaml.Node, path: str, seen: set[int]) -> None:
        """Dotted path of every collection node (`reward.flow`, `nft.lora_targets[0]`), before any is built."""
        if id(node) in seen:  # an alias of a node already named
            return
        seen.add(id(node))
        self._paths[id(node)] = path
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                self._name_paths(value_node, f"{path}.{name}" if path else str(name), seen)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._name_paths(item, f"{path}[{i}]", seen)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        path = self._paths.get(id(node), "")
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges; its keys may be overridden here, as YAML intends
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first_line.get(key)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            line = key_node.start_mark.line + 1
            if earlier is not None:
                dotted = f"{path}.{key}" if path else str(key)
                source = key_node.start_mark.name  # a file's name; "<unicode string>" for an override's value
                where = "" if source.startswith("<") else f" at line {line} of {source} (first at line {earlier})"
                raise ConfigError(f"{dotted}: duplicate key{where}; give each key once")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(stream: Any, root: str = "") -> Any:
    """`yaml.safe_load` that refuses duplicate keys (`_StrictLoader`)."""
    loader = _StrictLoader(stream)
    loader.root = root
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`rollout.group_size=4` -> ('rollout.group_size', 4); the value is parsed as a YAML literal."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. rollout.group_size=4")
    key, raw = text.split("=", 1)
    try:
        value = _load_yaml(raw, key.strip()) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from e
    return key.strip(), value


def read_tree(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a YAML file (duplicate keys refused) with the dotted overrides set on it, unchecked."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            with p.open("rb") as stream:  # a file stream: YAML marks (and duplicate-key errors) carry its name
                loaded = _load_yaml(stream) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r}: expected a mapping of sections at the top level")
        tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return tree


def load_schema(schema: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                check: Callable[[T], None] | None = None) -> T:  # fmt: skip
    """Defaults <- YAML file <- dotted overrides into any tree of `_Section` dataclasses (training's `Config`, the
    curation's config), then `check` for what spans sections."""
    cfg = _build(schema, read_tree(path, overrides), "")
    if check is not None:
        check(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides, then per-section and cross-section validation."""
    return load_schema(Config, path, overrides, validate)


def exit_on_config_error(load: Callable[[], T]) -> T:
    """`load()` for command lines: a bad config prints one line naming the key and exits with status 2, as argparse
    does for a bad flag (never a traceback)."""
    try:
        return load()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def load_config_or_exit(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """`load_config` for command lines (`exit_on_config_error`)."""
    return exit_on_config_error(lambda: load_config(path, overrides))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON dumps and checkpoints."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def config_from_dict(tree: dict[str, Any], schema: type = Config,
                     check: Callable[[Any], None] | None = validate) -> Any:  # fmt: skip
    """A config from its plain-dict form (`config_to_dict`), by default training's."""
    cfg = _build(schema, tree, "")
    if check is not None:
        check(cfg)
    return cfg


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per key: dotted name, type, default and help (for `--help`)."""
    lines: list[str] = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        value = getattr(defaults, f.name)
        if _is_section(tp):
            lines.extend(describe(tp, f"{prefix}{f.name}."))
            continue
        shown = list(value) if isinstance(value, tuple) else value
        tname = tp.__name__ if typing.get_origin(tp) is None else str(tp).replace("typing.", "")
        lines.append(f"  {prefix}{f.name} ({tname}, default {shown!r}): {f.metadata.get('help', '')}")
    return lines
