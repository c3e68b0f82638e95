"""The Ray pools of the evaluation commands, and the policy a pool samples: built by training's own builder
(`learner.driver.pools.build_pools(evaluation=True)`), joined as training joins Ray
(`learner/driver/ray_session.py`), stopped on exit."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import ray

from learner.driver.heldout import sample_edits
from learner.driver.placement import alive_nodes, placement_problems, pool_asks
from learner.driver.pools import Pools, build_pools
from learner.driver.ray_session import init_ray
from motionnft_core import s3
from motionnft_core.config import Config, ConfigError, EvalConfig, RolloutConfig
from motionnft_core.models.weights import LoraExport


@contextmanager
def evaluation_pools(cfg: Config, *, rubric: bool) -> Iterator[Pools]:
    """Rollout workers holding the run's policy with an empty adapter and reward workers with the run's flow
    estimator; with `rubric`, also a rubric client on each reward worker for the judge at `reward.judge.url` or
    for the `cluster.judge_replicas` vLLM replicas started here. The cluster is checked first for pools it can
    never place. Every actor is stopped on exit, and a cluster this process started is shut down."""
    started = not ray.is_initialized()
    embedded = init_ray(cfg)
    try:
        check_evaluation_placement(cfg, rubric=rubric)
        pools = build_pools(cfg, local=embedded, evaluation=True, rubric=rubric)
        try:
            yield pools
        finally:
            pools.shutdown()
    finally:
        if started:
            ray.shutdown()


def check_evaluation_placement(cfg: Config, *, rubric: bool) -> None:
    """Raise ConfigError naming the keys of a pool of the evaluation (rollout, reward, and the judge for the
    `rubric`) that no node or node type can ever hold, instead of waiting forever for it
    (learner/driver/placement.py; there is no learner here)."""
    judged = replace(cfg, reward=replace(cfg.reward, judge_weight=1.0 if rubric else 0.0))  # replicas iff the rubric
    asks = [p for p in pool_asks(judged) if p.name != "learner"]
    if problems := placement_problems(asks, alive_nodes(), cfg.cluster.node_types):
        raise ConfigError("pools that can never be placed:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class Side:
    """One evaluated policy as the rollout workers sample it: a checkpoint's LoRA export (each worker loads it on
    its own node before its first edit, and again after Ray restarted it), or the base policy (`base`: the
    adapter off; a full fine-tuning run's base is the pipeline as loaded)."""

    export: LoraExport | None
    base: bool

    def sample(self, rollouts: list[Any], rows: list[Any], how: EvalConfig | RolloutConfig) -> list[Any]:
        """One edit reference per row, made with the pipeline's sampler (`eval.*`) or the rollout solver."""
        return sample_edits(rollouts, rows, how, base=self.base, export=self.export)


def policy_side(lora: str | None, cfg: Config) -> Side:
    """The side of the export at `lora` (None: the base policy)."""
    if lora is None:
        return Side(None, base=not cfg.nft.full_finetune)
    export = LoraExport(lora, cfg.nft.lora_rank, cfg.nft.lora_alpha, cfg.model.cache_dir,
                        s3.S3Retry.from_config(cfg.checkpoint))  # fmt: skip
    return Side(export, base=False)
