"""What docs/metrics.md documents, parsed from its tables, and the check a whole run calls on its metrics.jsonl:
every key a run logs must have a row (a unit test checks the Ray series; a run's keys need a real run)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS_DOC = ROOT / "docs" / "metrics.md"
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|")


def _section_keys(heading: str, path: Path = METRICS_DOC) -> list[str]:
    """The first-column keys of every table row under the level-2 `heading`, up to the next level-2 heading."""
    keys: list[str] = []
    inside = False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            inside = line[3:].strip() == heading
            continue
        if inside and (m := ROW.match(line)):
            keys.append(m.group(1))
    if not keys:
        raise AssertionError(f"{path}: no table rows under '## {heading}'")
    return keys


def documented_metric_keys(path: Path = METRICS_DOC) -> list[str]:
    """The keys of metrics.jsonl that the page documents, in its order."""
    return _section_keys("metrics.jsonl", path)


def documented_series(path: Path = METRICS_DOC) -> list[str]:
    """The Ray metric series that the page documents."""
    return _section_keys("Ray metrics", path)


def undocumented_keys(metrics_jsonl: Path, path: Path = METRICS_DOC) -> list[str]:
    """Keys some line of a run's metrics.jsonl logs that the page has no row for, sorted."""
    documented = set(documented_metric_keys(path))
    logged = {key for line in metrics_jsonl.read_text().splitlines() if line.strip() for key in json.loads(line)}
    return sorted(logged - documented)


def assert_metrics_documented(metrics_jsonl: Path) -> None:
    missing = undocumented_keys(metrics_jsonl)
    assert not missing, f"{METRICS_DOC.relative_to(ROOT)} has no row for the logged key(s) {missing}: add them"
