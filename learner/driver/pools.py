"""Builds the actor pools of a run from its config: the one place where the roles are wired together.

Each pool's actors receive a small picklable factory (`functools.partial` of `load_policy`, of
`build_reward_scorer`) and their config section, and build their models in their own process, on their own node,
so no model ever travels through the driver or depends on its disk. Pool sizes, GPUs and custom resources per
role come from `cluster.*`; the judge's API key (`secret_from_env`) travels only as actor arguments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import ray

from actors.rollout import RolloutWorker
from actors.sampler import ReferenceForwards
from learner.driver.recovery import RESTART_OPTIONS, WorkerPool
from learner.trainer.checkpoint import check_reachable
from learner.trainer.fsdp_worker import LearnerGroup
from motionnft_core.config import Config
from motionnft_core.models.policy import load_policy
from motionnft_core.models.tiny_judge import judge_source
from motionnft_core.models.weights import weight_kind
from motionnft_core.secret import Secret, secret_from_env
from rewards.eval_scorer import build_eval_scorer
from rewards.judge_server import JudgeServerActor
from rewards.scorer import RewardScorer, build_reward_scorer
from rewards.worker import RewardWorker


@dataclass
class Pools:
    rollouts: WorkerPool
    rewards: WorkerPool
    learner: LearnerGroup | None  # None: an evaluation's pools
    judges: list[Any]
    new_rollout: Callable[[int], Any] | None = None  # starts rollout worker i (an elastic pool adds them)

    def shutdown(self) -> None:
        for j in self.judges:  # stop the vLLM processes cleanly before the actors go
            try:
                ray.get(j.stop.remote(), timeout=60)
            except Exception as e:  # noqa: BLE001 - shutdown continues, but says what failed
                print(f"warning: judge replica did not stop cleanly: {e!r}", flush=True)
        closing = [a.close.remote() for a in self.rewards.actors]  # their scorers' asyncio tasks end, not vanish
        try:
            ray.get(closing, timeout=30)
        except Exception as e:  # noqa: BLE001 - a dead or hung worker is killed below all the same
            print(f"warning: a reward worker did not close cleanly: {e!r}", flush=True)
        if self.learner is not None:
            self.learner.shutdown()
        for a in [*self.rollouts.actors, *self.rewards.actors, *self.judges]:
            ray.kill(a)  # also a removed one: killing twice is harmless

    def rebuild_learner(self, cfg: Config) -> None:
        """A rank was lost: the whole group goes (the survivors wait in a collective) and a new one starts; it
        holds the initial weights until the caller restores a checkpoint."""
        if self.learner is not None:
            self.learner.shutdown()
        self.learner = start_learner(cfg)


def start_learner(cfg: Config) -> LearnerGroup:
    """The learner group, placed, checked and started (loaded, ranks met)."""
    learner = place_learner(cfg)
    learner.start()  # shuts the group down itself if a rank fails
    return learner


def place_learner(cfg: Config) -> LearnerGroup:
    """The learner group, placed (its resources reserved) and checked, nothing loaded yet: a local checkpoint dir
    the ranks' nodes cannot reach is refused here, before anything loads."""
    c = cfg.cluster
    learner = LearnerGroup(
        functools.partial(load_policy, cfg.model, use_gpu=c.learner_gpus > 0), cfg.nft, cfg.learner, c,
        mixed_precision=c.learner_gpus > 0 and cfg.model.dtype != "float32",
        parity=cfg.rollout if cfg.rollout.parity_check else None, start=False,
    )  # fmt: skip
    try:
        check_reachable(cfg.checkpoint, learner.node_ids, ray.get_runtime_context().get_node_id())
    except BaseException:
        learner.shutdown()
        raise
    return learner


def start_judges(cfg: Config, api_key: Secret, *, local: bool = False, rubric: bool = False) -> list[Any]:
    """The vLLM judge replicas the service starts (`cluster.judge_replicas`), each on its node's address (on
    loopback when `local`: a one-machine cluster, where Ray's node address is the machine's routable one) and
    answering only requests with `api_key`; none when `reward.judge.url` names an existing endpoint, or when
    `reward.judge_weight` is 0 unless the evaluation's `rubric` needs them. Each replica finds (or builds) its
    model on its own node."""
    j, c = cfg.reward.judge, cfg.cluster
    if j.url or (cfg.reward.judge_weight == 0 and not rubric):
        return []
    model = functools.partial(judge_source, j, cfg.model.cache_dir)
    return [
        JudgeServerActor.options(num_cpus=c.cpus_per_actor, num_gpus=c.judge_gpus, resources=c.judge_resources)
        .remote(model, j, api_key=api_key, host="127.0.0.1" if local else None)
        for _ in range(c.judge_replicas)
    ]


def start_rollout_worker(cfg: Config, policy: Callable[[], Any], reference: ReferenceForwards | None, i: int) -> Any:
    """Rollout worker `rollout-i`, asking for the resources of `cluster.rollout_*` (restarted by Ray on a crash)."""
    c = cfg.cluster
    return (
        ray.remote(RolloutWorker)
        .options(num_cpus=c.cpus_per_actor, num_gpus=c.rollout_gpus, resources=c.rollout_resources, **RESTART_OPTIONS)
        .remote(f"rollout-{i}", policy, cfg.rollout, weight_kind(cfg.nft), reference)
    )


def start_reward_worker(cfg: Config, build_scorer: Callable[[], RewardScorer], judge_urls: tuple[str, ...],
                        judge_key: Secret | None) -> Any:  # fmt: skip
    """A reward worker asking for the resources of `cluster.reward_*` (restarted by Ray on a crash); its
    evaluation scorer (MAS, and the rubric when `judge_urls` are given) is built on its first evaluation call."""
    c = cfg.cluster
    build_eval = functools.partial(
        build_eval_scorer, cfg.reward.flow, cfg.reward.judge, judge_urls,
        device="cuda" if c.reward_gpus > 0 else "cpu", cache_dir=cfg.model.cache_dir, judge_key=judge_key,
    )  # fmt: skip
    return (
        ray.remote(RewardWorker)
        .options(num_cpus=c.cpus_per_actor, num_gpus=c.reward_gpus, resources=c.reward_resources, **RESTART_OPTIONS)
        .remote(build_scorer, build_eval=build_eval)
    )


def build_pools(cfg: Config, *, local: bool = False, evaluation: bool = False, rubric: bool = False) -> Pools:
    """Learner group, judge replicas, reward workers and rollout workers, each ready; if any fails to start,
    the others are shut down before the error propagates.

    They load at the same time: at full size the learner's model, the rollouts' and the judge's vLLM server each
    take minutes, and one after the other they added up. The learner is placed first (its placement group
    reserves its resources, so the other actors cannot fragment the nodes it packs onto) and checked before
    anything loads. Every actor loads its model on its own node (`load_policy` without a path resolves
    `model.*` there). The rollouts sample only once the driver has published version 0 (old = θ at init).

    `evaluation`: the pools of an evaluation command (evaluation/): no learner; with `rubric`, the judge replicas
    started for the rubric whatever `reward.judge_weight` (without it no judge at all); reward workers whose
    training scorer is the flow reward alone (only their evaluation scorer and flow estimator are used); rollout
    workers without reference forwards or the parity probe (there is no learner to compare with) that hold the
    run's policy with its adapter empty (the base policy)."""
    c, n = cfg.cluster, cfg.nft
    if evaluation:
        cfg = replace(cfg, rollout=replace(cfg.rollout, parity_check=False))
    crashes = (c.worker_crashes, c.crash_window_s)  # restarts are unlimited; a crash loop stops the run
    pools = Pools(WorkerPool("rollout", [], *crashes), WorkerPool("reward", [], *crashes),
                  None if evaluation else place_learner(cfg), [])  # fmt: skip
    try:
        j = cfg.reward.judge
        key = secret_from_env(j.api_key_env, generate=not j.url)  # a started judge always gets one
        judged = not evaluation or rubric  # an evaluation without the rubric (flow reward only) needs no judge
        pools.judges = start_judges(cfg, key, local=local, rubric=evaluation) if judged else []
        reference = None
        if n.reference_forwards == "rollout" and not evaluation:
            reference = ReferenceForwards(seed=cfg.learner.seed, fraction=n.timestep_fraction)
        rollout_policy = functools.partial(
            load_policy, cfg.model, use_gpu=c.rollout_gpus > 0, lora=None if n.full_finetune else n
        )
        pools.new_rollout = functools.partial(start_rollout_worker, cfg, rollout_policy, reference)
        pools.rollouts.actors = [pools.new_rollout(i) for i in range(c.rollout_workers)]
        if pools.learner is not None:
            pools.learner.start()  # while the rollouts and judges load
        urls = (j.url,) if j.url and judged else tuple(ray.get([judge.url.remote() for judge in pools.judges]))
        scored = replace(cfg.reward, flow_weight=1.0, judge_weight=0.0) if evaluation else cfg.reward
        build_scorer = functools.partial(
            build_reward_scorer, scored, () if evaluation else urls, device="cuda" if c.reward_gpus > 0 else "cpu",
            cache_dir=cfg.model.cache_dir, judge_key=key, heat=n.motion_focal and not evaluation,
        )  # fmt: skip
        pools.rewards.actors = [start_reward_worker(cfg, build_scorer, urls, key) for _ in range(c.reward_workers)]
        ray.get([a.ready.remote() for a in pools.rollouts.actors + pools.rewards.actors])
    except BaseException:
        pools.shutdown()
        raise
    return pools
