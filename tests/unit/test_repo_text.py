"""The repository speaks for itself: no tracked file points outside it (a design document or notes that users do
not have, ticket numbers) or at the tooling of the machines it was developed on; and every module path or
dotted module the documentation names exists."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import typing
from pathlib import Path

import pytest

from motionnft_core.config import Config

ROOT = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()

# Each pattern is split so that this file does not match itself when it is read as text.
FORBIDDEN = [
    re.compile(re.escape("../" + "shared")),
    re.compile(re.escape("DESIGN" + " §")),
    re.compile(re.escape("ENVIRONMENT" + ".md")),
    re.compile(r"\bissues?" + r" #?\d+", re.IGNORECASE),
    # How GPU runs were once requested from a development sandbox: meaningless to a user.
    *(re.compile(re.escape(p), re.IGNORECASE) for p in (
        "device" + " tool", "run" + "(command=", "carry" + "=", "$" + "OUT", "budget" + "_left",
        "not" + " drawn", "lent" + " a device", "device" + " was lent", "GPU" + " was lent", "device" + "_train_step",
        "fetch_device" + "_wheels",
    )),
]  # fmt: skip


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [p for p in out.splitlines() if p != THIS and (ROOT / p).is_file()]


def offences(paths: list[str]) -> list[str]:
    found = []
    for path in paths:
        try:
            text = (ROOT / path).read_text()
        except UnicodeDecodeError:  # binary (images)
            continue
        for n, line in enumerate(text.splitlines(), 1):
            found += [f"{path}:{n}: {m.group(0)!r}" for pattern in FORBIDDEN if (m := pattern.search(line))]
    return found


def test_no_tracked_file_points_outside_the_repository():
    tracked = tracked_files()
    assert "README.md" in tracked and "docs/index.md" in tracked and "bench/gpu_train_step.sh" in tracked
    assert offences(tracked) == []


def test_the_scan_finds_each_kind_of_offence(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    lines = ["see " + "../" + "shared/notes", "DESIGN" + " §3", "Issue" + " 14", "issues" + " #7", "$" + "OUT/x",
             "carry" + "=[x]", "fine: tiss" + "ue 5, reiss" + "ue 2"]  # fmt: skip
    (tmp_path / "f.md").write_text("\n".join(lines))
    assert [x.split(":")[1] for x in offences(["f.md"])] == ["1", "2", "3", "4", "5", "6"]


# ------------------------------------------------------------------------------------------------ module names

PACKAGES = ("motionnft_core", "actors", "rewards", "learner", "evaluation")
DOCS = ["README.md", "bench/README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
SPAN = re.compile(r"`([^`\s]+)`")
PATH = re.compile(r"^(?:[\w-]+/)+[\w.-]+\.(?:py|sh|yaml|json|toml|txt)$")
DOTTED = re.compile(r"^[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+$")
OLD_NAMES_HEADING = "## Where modules went"  # development.md's table of old -> new module names


def _config_keys(cls: type = Config, prefix: str = "") -> set[str]:
    hints, keys = typing.get_type_hints(cls), set()
    for f in dataclasses.fields(cls):
        keys.add(f"{prefix}{f.name}")
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= _config_keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


def _module_exists(dotted: str) -> bool:
    """A module or package of the repository, or a name defined in one (`learner.driver.loop.Driver`)."""
    parts = dotted.split(".")
    for n in range(len(parts), 1, -1):
        base = ROOT.joinpath(*parts[:n])
        module = base.with_suffix(".py")
        if not (module.is_file() or (base / "__init__.py").is_file()):
            continue
        if n == len(parts):
            return True
        source = module.read_text() if module.is_file() else ""
        return re.search(rf"\b{re.escape(parts[n])}\b", source) is not None
    return False


def named_modules(doc: str) -> list[tuple[int, str]]:
    """(line, name) of every file path and dotted module of the repository that `doc` names in backticks."""
    keys, out, skipping = _config_keys(), [], False
    for n, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
        if line.startswith("## "):
            skipping = line.startswith(OLD_NAMES_HEADING)
        if skipping:
            continue
        for span in SPAN.findall(line):
            if PATH.match(span) and (ROOT / span.split("/")[0]).is_dir():  # (not another repository's paths)
                out.append((n, span))
            elif DOTTED.match(span) and span.split(".")[0] in PACKAGES and span not in keys:
                out.append((n, span))
    return out


@pytest.mark.parametrize("doc", DOCS)
def test_every_module_the_docs_name_exists(doc):
    names = named_modules(doc)
    missing = [f"{doc}:{n}: {name}" for n, name in names
               if not ((ROOT / name).exists() if "/" in name else _module_exists(name))]  # fmt: skip
    assert missing == []


def test_the_module_check_sees_paths_and_dotted_names():
    names = {name for _, name in named_modules("docs/architecture.md")}
    assert {"learner/driver/loop.py", "motionnft_core/models/weights.py"} <= names
    assert _module_exists("learner.driver.loop") and _module_exists("learner.driver.loop.Driver")
    assert not _module_exists("learner.loop") and not _module_exists("learner.driver.loop.NoSuchName")
