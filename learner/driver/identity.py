"""A run's identity: its id and the part of its config that decides what it learns. Every checkpoint carries
both (driver.json), so a run can refuse to continue another run's checkpoints, or its own under changed math.

Operational keys may change between a run and its resume: where things go, how many actors, batch and
memory levers, how long to train, how patient the judge client is, how a run is evaluated (`eval.*`).
Everything else is training-relevant.
"""

from __future__ import annotations

import uuid
from typing import Any

OPERATIONAL = (
    "logging", "checkpoint", "cluster", "learner.steps",
    "model.cache_dir",
    "rollout.micro_batch", "rollout.compile",
    "learner.micro_batch", "learner.memory_fraction", "learner.activation_checkpointing", "learner.backend",
    "learner.compile",
    "learner.cudnn_sdpa", "learner.max_recoveries", "learner.recovery_window_s",
    "reward.batch_pairs", "reward.max_wait_ms", "reward.flow.max_batch", "reward.flow.cache_size",
    "reward.judge.url", "reward.judge.timeout_s", "reward.judge.max_retries", "reward.judge.backoff_s",
    "reward.judge.max_concurrency", "reward.judge.startup_timeout_s", "reward.judge.api_key_env",
    "reward.judge.max_backoff_s", "reward.judge.retry_budget_s", "reward.judge.on_outage",
    "reward.judge.restart_backoff_s", "reward.judge.restart_backoff_max_s", "reward.judge.log_dir",
    "data.on_error",
    "eval",
)  # fmt: skip


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`config_to_dict` output as {dotted key: value} (mapping-valued keys such as cluster.node_types stay whole)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and dotted.count(".") < 2:
            out.update(flat_config(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def _operational(key: str) -> bool:
    return any(key == op or key.startswith(f"{op}.") for op in OPERATIONAL)


_ABSENT = object()  # a key one config lacks and the schema does not know: equal to no value


def training_keys_that_differ(saved: dict[str, Any], current: dict[str, Any],
                              defaults: dict[str, Any] | None = None) -> list[str]:  # fmt: skip
    """The training-relevant dotted keys whose values differ between two configs (as `config_to_dict` gives).

    A key one side lacks counts as its value in `defaults` (the schema's): a checkpoint written before a key
    existed resumes under the key's default, which keeps the behaviour of before (a new lever is off by default),
    and is refused only when the run now sets the key otherwise."""
    a, b, d = flat_config(saved), flat_config(current), flat_config(defaults or {})
    return sorted(k for k in a.keys() | b.keys()
                  if not _operational(k) and a.get(k, d.get(k, _ABSENT)) != b.get(k, d.get(k, _ABSENT)))  # fmt: skip
