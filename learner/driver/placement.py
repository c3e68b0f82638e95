"""Start-up check of the pools' resource asks against the cluster: a pool that can never be placed fails at
once, naming its config keys, instead of waiting forever for resources no node (or node type) offers.

An actor fits if one alive node, or one of the autoscaler's node types (`cluster.node_types`), has at least
its ask of every resource. Without node types the cluster is what is alive now, so all asks together must
also fit in its total. Only impossibilities are reported: when the check passes, Ray still does the packing.
"""

from __future__ import annotations

from dataclasses import dataclass

from motionnft_core.config import Config, ConfigError


@dataclass(frozen=True)
class PoolAsk:
    name: str
    count: int
    ask: dict[str, float]  # per actor
    keys: str  # the config keys that set it, for the message


def pool_asks(cfg: Config) -> list[PoolAsk]:
    c = cfg.cluster

    def ask(gpus: float, custom: dict[str, float]) -> dict[str, float]:
        out = {"CPU": c.cpus_per_actor, "GPU": gpus, **custom}
        return {k: v for k, v in out.items() if v > 0}

    pools = [
        PoolAsk("learner", c.learner_ranks, ask(c.learner_gpus, c.learner_resources),
                "cluster.learner_ranks/learner_gpus/learner_resources/cpus_per_actor"),
        PoolAsk("rollout", c.rollout_workers, ask(c.rollout_gpus, c.rollout_resources),
                "cluster.rollout_workers/rollout_gpus/rollout_resources/cpus_per_actor"),
        PoolAsk("reward", c.reward_workers, ask(c.reward_gpus, c.reward_resources),
                "cluster.reward_workers/reward_gpus/reward_resources/cpus_per_actor"),
    ]  # fmt: skip
    if cfg.reward.judge_weight > 0 and not cfg.reward.judge.url:
        pools.append(PoolAsk("judge", c.judge_replicas, ask(c.judge_gpus, c.judge_resources),
                             "cluster.judge_replicas/judge_gpus/judge_resources/cpus_per_actor, "
                             f"reward.judge.tensor_parallel_size={cfg.reward.judge.tensor_parallel_size}"))  # fmt: skip
    return pools


def _fits(ask: dict[str, float], offer: dict[str, float]) -> bool:
    return all(offer.get(k, 0.0) + 1e-9 >= v for k, v in ask.items())


def _show(resources: dict[str, float], keys: set[str] | None = None) -> str:
    shown = sorted((k, v) for k, v in resources.items() if keys is None or k in keys)
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in shown) + "}"


def _largest(offers: list[dict[str, float]], ask: dict[str, float]) -> str:
    """The distinct offers, biggest first, shown in the resources the ask names (plus CPU and GPU)."""
    keys = {"CPU", "GPU", *ask}
    distinct = {_show(o, keys): o for o in offers}
    ranked = sorted(distinct.items(), key=lambda kv: (-kv[1].get("GPU", 0.0), -kv[1].get("CPU", 0.0)))
    return ", ".join(text for text, _ in ranked[:4]) or "none"


def placement_problems(pools: list[PoolAsk], nodes: list[dict[str, float]],
                       node_types: dict[str, dict[str, float]]) -> list[str]:  # fmt: skip
    """One message per pool that can never be placed on `nodes` (alive, total resources) or `node_types`."""
    offers = [*nodes, *node_types.values()]
    problems = [
        f"the {p.name} pool asks {_show(p.ask)} per actor ({p.keys}), but no "
        f"{'node or node type' if node_types else 'node'} offers that much; offers: {_largest(offers, p.ask)}"
        for p in pools
        if not any(_fits(p.ask, o) for o in offers)
    ]
    if not node_types and not problems:
        total: dict[str, float] = {}
        for node in nodes:
            for k, v in node.items():
                total[k] = total.get(k, 0.0) + v
        needed: dict[str, float] = {}
        for p in pools:
            for k, v in p.ask.items():
                needed[k] = needed.get(k, 0.0) + p.count * v
        short = {k: v for k, v in needed.items() if v > total.get(k, 0.0) + 1e-9}
        if short:
            have = {k: total.get(k, 0.0) for k in short}
            problems.append(
                f"the pools together ask {_show(short)} but the cluster has {_show(have)} and no autoscaler node "
                "types are declared (cluster.node_types); asks per pool: "
                + "; ".join(f"{p.name} {p.count} x {_show(p.ask)}" for p in pools)
            )
    return problems


def check_placement(cfg: Config, nodes: list[dict[str, float]]) -> None:
    """Raise ConfigError listing every pool of `cfg` that can never be placed on `nodes` / `cluster.node_types`."""
    problems = placement_problems(pool_asks(cfg), nodes, cfg.cluster.node_types)
    if problems:
        raise ConfigError("pools that can never be placed:\n  " + "\n  ".join(problems))


def alive_nodes() -> list[dict[str, float]]:
    """Total resources of every alive node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
