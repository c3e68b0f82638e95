"""The generated documentation covers the code: the configuration reference lists every config key, and the
metrics page lists every Ray series and the counters the reward workers report. (A whole run checks the keys of
its real metrics.jsonl: tests/system/test_e2e.py.)"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import typing

from motionnft_core import config, telemetry
from rewards.judge import METRIC_KEYS
from tests.metrics_doc import ROOT, documented_metric_keys, documented_series, undocumented_keys


def _hook():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs" / "hooks" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _all_keys(cls: type = config.Config, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def test_the_configuration_reference_lists_every_key_with_its_default_and_help():
    page = _hook().render_reference()
    rows = {m.group(1): line for line in page.splitlines() if (m := re.match(r"^\| `([^`]+)` \|", line))}
    keys = _all_keys()
    assert len(keys) > 100
    assert sorted(set(keys) - set(rows)) == [], "config keys without a row in the configuration reference"
    assert sorted(set(rows) - set(keys)) == []
    assert "| `rollout.group_size` | `int` | `8` |" in rows["rollout.group_size"]
    assert "| `reward.flow.q` | `float` | `0.4` |" in rows["reward.flow.q"]
    assert "K: candidate edits" in rows["rollout.group_size"]
    assert "## `reward.judge`" in page and "## `eval`" in page


def test_the_reference_shows_declared_bounds_from_field_metadata():
    hook = _hook()

    @dataclasses.dataclass(frozen=True)
    class Section:
        SECTION: typing.ClassVar[str] = "demo_section"
        size: int = dataclasses.field(default=4, metadata={"help": "how many", "ge": 1, "le": 8})
        mode: str = dataclasses.field(default="a", metadata={"help": "which", "choices": ("a", "b")})

    entries = hook.config_entries(Section, "s.")
    assert entries == [("s.size", "int", "4", ">= 1; <= 8", "how many"), ("s.mode", "str", "'a'", "one of a, b",
                                                                            "which")]  # fmt: skip


def test_the_configuration_page_has_the_placeholder_the_hook_fills():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert _hook().PLACEHOLDER in page
    assert "hooks/config_reference.py" in (ROOT / "mkdocs.yml").read_text()


def test_the_evaluation_page_lists_every_eval_parameter():
    page = (ROOT / "docs" / "evaluation.md").read_text()
    rows = set(re.findall(r"^\| `(eval\.[a-z0-9_]+)` \|", page, re.MULTILINE))
    assert rows == {f"eval.{f.name}" for f in dataclasses.fields(config.EvalConfig)}


def test_the_metrics_page_lists_every_ray_series_of_the_telemetry_schema():
    assert sorted(documented_series()) == sorted(telemetry.SERIES)


def test_the_metrics_page_lists_every_reward_worker_counter():
    keys = set(documented_metric_keys())
    assert len(keys) == len(documented_metric_keys()), "a metrics.jsonl key has two rows"
    for counter in METRIC_KEYS:  # the judge client's counters, for training and for the evaluation's rubric
        assert f"reward_workers/judge/{counter}" in keys and f"reward_workers/eval_judge/{counter}" in keys
    for counter in ("estimator_calls", "pairs_estimated", "cache_hits", "cache_misses"):
        assert f"reward_workers/flow/{counter}" in keys


def test_a_metrics_line_with_an_unknown_key_is_caught(tmp_path):
    lines = tmp_path / "metrics.jsonl"
    lines.write_text('{"step": 0, "reward/mean": 0.5, "learner/loss": 1.0}\n{"step": 1, "no/such_key": 2}\n')
    assert undocumented_keys(lines) == ["no/such_key"]


def test_the_curation_page_lists_every_curation_key():
    from curation.config import CurateConfig

    page = (ROOT / "docs" / "curation.md").read_text()
    assert _hook().CURATION_PLACEHOLDER in page and "curation.md" in (ROOT / "mkdocs.yml").read_text()
    rendered = _hook().on_page_markdown(page, None, None, None)
    rows = set(re.findall(r"^\| `([a-z_.]+)` \|", rendered, re.MULTILINE))
    keys = set(_all_keys(CurateConfig))
    assert len(keys) > 50 and keys <= rows
    assert "python -m curation.samples" in page and "configs/curate_tiny.yaml" in page
