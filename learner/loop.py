"""The driver: one DiffusionNFT step after another, as DESIGN §1 lists them.

Contract: the driver only schedules. Rollout workers sample groups (tensors stay in the object store), reward
workers score them (the driver fetches P*K floats), the driver turns rewards into optimality r and a group
mask (light math, as verl does advantages), the learner group trains on the valid groups by reference and
publishes the new old-policy weights: rank 0 returns them as one object, and the driver hands that reference
(with its version and manifest) to every later rollout call; a rollout loads it only when its version differs.

Overlap: rollouts for up to `rollout.max_staleness` later steps are in flight while the learner trains, each
sampling with the weights published when it was submitted, so at most that many versions old when trained on.
Which version a rollout uses is fixed at submission, not by timing, so a run is reproducible. A checkpoint step
is a drain point (no later rollouts in flight), so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from common.config import Config, config_to_dict
from data.motionedit import ExampleServer, load_splits
from learner.checkpoint import LEARNER, CheckpointManager, step_name
from learner.nft_loss import group_filter, optimality, saturated_groups
from learner.placement import alive_nodes, check_placement
from learner.pools import Pools, build_pools
from models.weights import PublishedWeights


@contextlib.contextmanager
def timed(name: str, timing: dict[str, float]):
    t0 = time.perf_counter()
    yield
    timing[name] = timing.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class DriverState:
    """Everything the driver needs to resume: saved in each checkpoint's driver.json."""

    step: int = 0  # next step to run
    version: int = 0  # newest published policy version (= optimizer steps taken)
    epoch: int = 0  # data cursor: pass over the training prompts ...
    position: int = 0  # ... and index into that pass's permutation
    banned: list[str] = field(default_factory=list)  # prompts whose group saturated (DESIGN §5)


class PromptCursor:
    """Draws P prompt indices per step: a seeded permutation per pass, skipping banned prompts."""

    def __init__(self, ids: list[str], seed: int) -> None:
        self.ids, self.seed = ids, seed

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.ids)))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def draw(self, n: int, state: DriverState) -> list[int]:
        banned = set(state.banned)
        if len(banned) >= len(self.ids):
            raise RuntimeError("every training prompt is banned (its group saturated); nothing left to train on")
        out: list[int] = []
        while len(out) < n:
            order = self._order(state.epoch)
            while state.position < len(order) and len(out) < n:
                i = order[state.position]
                state.position += 1
                if self.ids[i] not in banned:
                    out.append(i)
            if state.position >= len(order):
                state.epoch, state.position = state.epoch + 1, 0
        return out


@dataclass
class StepRollouts:
    """The refs of one step's groups: for the learner, the reward workers, and the driver's metadata."""

    prompt_ids: list[str]
    examples: list[Any]
    groups: list[Any]
    images: list[Any]
    meta: list[Any]


def group_stats(rewards: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, K) rewards -> optimality r (P, K), valid groups (P,), saturated groups to ban (P,) (DESIGN §5).

    Validity and bans always come from the rewards themselves, so `nft.invert_reward` changes only the
    direction of learning, never which groups train."""
    n = cfg.nft
    r = optimality(rewards, clip=n.adv_clip_max)
    if n.invert_reward:  # control experiment: the same updates towards the worse candidates
        r = 1.0 - r
    valid = group_filter(rewards, min_std=n.group_min_std, max_mean=n.group_max_mean)
    banned = saturated_groups(rewards, max_std=n.group_min_std, min_mean=n.group_max_mean)
    return r, valid, banned


class MetricsLog:
    """One JSON line per step in `<logging.dir>/metrics.jsonl` and a short printed line every N steps."""

    def __init__(self, run_dir: Path, every: int, resume: bool) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path, self.every = run_dir / "metrics.jsonl", every
        if not resume:
            self.path.write_text("")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if step % self.every == 0:
            keys = ("reward/mean", "reward/std", "learner/loss", "groups/valid", "staleness/mean",
                    "perf/samples_per_s", "timing_s/step")  # fmt: skip
            shown = "  ".join(f"{k} {metrics[k]:.4g}" for k in keys if k in metrics)
            print(f"step {step}  {shown}", flush=True)


def init_ray(cfg: Config) -> None:
    if ray.is_initialized():  # a caller (bench, notebook) already chose the cluster
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
    else:  # embedded cluster (laptop, CI): on loopback, so no token auth (see ENVIRONMENT.md)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=cfg.cluster.num_cpus or None, include_dashboard=False,
                 _node_ip_address="127.0.0.1")  # fmt: skip


# ------------------------------------------------------------------------------------------------ phases


def submit_rollouts(pools: Pools, examples_server, indices: list[int], ids: list[str], step: int,
                    weights: PublishedWeights) -> StepRollouts:  # fmt: skip
    """Spread one step's prompts over the rollout workers; several groups per call share transformer calls.
    Every call carries the weights to sample with (one reference, fetched only by a worker that lacks them)."""
    examples = [examples_server.get.remote(i) for i in indices]
    n = len(pools.rollouts)
    groups, images, meta = [None] * len(indices), [None] * len(indices), [None] * len(indices)
    for w, worker in enumerate(pools.rollouts):
        mine = list(range(w, len(indices), n))
        if not mine:
            continue
        refs = worker.sample.options(num_returns=3 * len(mine)).remote(step, weights, *[examples[i] for i in mine])
        for j, i in enumerate(mine):
            groups[i], images[i], meta[i] = refs[3 * j : 3 * j + 3]
    return StepRollouts([ids[i] for i in indices], examples, groups, images, meta)


def score_groups(pools: Pools, batch: StepRollouts):
    """Every group goes to a reward worker as soon as it exists (Ray resolves the refs); fetch P*K floats."""
    n = len(pools.rewards)
    refs = [pools.rewards[g % n].score.remote(batch.examples[g], batch.images[g]) for g in range(len(batch.groups))]
    return ray.get(refs), ray.get(batch.meta)


def publish(pools: Pools, version: int) -> PublishedWeights:
    """The learner's old adapter as version `version`: rank 0's gathered weights stay in the object store; the
    driver keeps their reference and the few-hundred-byte manifest."""
    manifest, tensors = pools.learner.publishable("old", version)
    return PublishedWeights(version, ray.get(manifest), tensors)


def reward_counters(pools: Pools) -> dict[str, float]:
    """Counters of all reward workers since they started (judge requests, retries, timeouts, failures; flow
    estimator calls and target-flow cache hits), summed, as `reward_workers/<name>`."""
    total: dict[str, float] = {}
    for counters in ray.get([w.counters.remote() for w in pools.rewards]):
        for key, value in counters.items():
            total[f"reward_workers/{key}"] = total.get(f"reward_workers/{key}", 0.0) + value
    return total


def step_metrics(rewards, meta, r, valid, version: int, timing: dict[str, float], n_samples: int) -> dict:
    R = torch.tensor([g.reward for g in rewards], dtype=torch.float64)
    m: dict[str, float] = {"reward/mean": R.mean().item(), "reward/std": R.std(unbiased=False).item(),
                           "groups/valid": float(valid.sum()), "groups/total": float(len(rewards)),
                           "optimality/mean": r.mean().item()}  # fmt: skip
    for key in rewards[0].components:
        m[f"reward/{key}"] = float(torch.tensor([g.components[key] for g in rewards]).mean())
    stale = [version - x["version"] for x in meta]
    m["staleness/mean"], m["staleness/max"] = sum(stale) / len(stale), float(max(stale))
    m["timing_s/rollout_worker"] = max(x["total_s"] for x in meta)
    m.update({f"timing_s/{k}": v for k, v in timing.items()})
    m["perf/samples_per_s"] = n_samples / timing["step"]
    return m


# ------------------------------------------------------------------------------------------------ the loop


def train(cfg: Config, *, resume: bool = False) -> dict[str, float]:
    run_dir = Path(cfg.logging.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    init_ray(cfg)
    check_placement(cfg, alive_nodes())  # a pool no node (type) can ever hold fails now, naming its keys
    train_ds, eval_ds = load_splits(cfg)
    print(f"data: {len(train_ds)} train / {len(eval_ds)} eval examples; "
          f"{cfg.samples_per_step} samples per step ({cfg.rollout.prompts_per_step} prompts x "
          f"{cfg.rollout.group_size})", flush=True)  # fmt: skip
    ckpt = CheckpointManager(cfg.checkpoint.dir, keep=cfg.checkpoint.keep, cache_dir=cfg.model.cache_dir)
    state = DriverState()
    pools = build_pools(cfg)
    last: dict[str, float] = {}
    try:
        latest = ckpt.latest() if resume else None
        if latest is not None:
            state = DriverState(**ckpt.driver_state(latest)["driver"])
            pools.learner.load(f"{ckpt.location(latest)}/{LEARNER}")  # each rank reads from its own node
            print(f"resumed from {step_name(latest)}: step {state.step}, policy version {state.version}", flush=True)
        elif resume:
            print(f"--resume: no complete checkpoint under {cfg.checkpoint.dir}; starting fresh", flush=True)
        weights = publish(pools, state.version)
        cursor = PromptCursor(train_ds.ids, cfg.data.seed)
        # On the driver's node, where the data was loaded; decoded examples go to the object store.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        examples = ray.remote(num_cpus=0)(ExampleServer).options(scheduling_strategy=here).remote(train_ds)
        log = MetricsLog(run_dir, cfg.logging.every, resume=latest is not None)
        steps, ahead = cfg.learner.steps, cfg.rollout.max_staleness
        pending: dict[int, StepRollouts] = {}

        for step in range(state.step, steps):
            metrics, timing = {}, {}
            save_now = step == steps - 1 or (cfg.checkpoint.every > 0 and (step + 1) % cfg.checkpoint.every == 0)
            with timed("step", timing):
                # 1. Rollouts: this step's groups, plus later steps up to the staleness bound (never past a
                #    checkpoint step, which is a drain point).
                with timed("rollout_submit", timing):
                    horizon = step if save_now else min(step + ahead, steps - 1)
                    for s in range(step, horizon + 1):
                        if s not in pending:
                            # Sampled with the weights published now: at training time they are at most
                            # s - step <= max_staleness versions old (steps without a valid group publish none).
                            idx = cursor.draw(cfg.rollout.prompts_per_step, state)
                            pending[s] = submit_rollouts(pools, examples, idx, train_ds.ids, s, weights)
                    batch = pending.pop(step)
                # 2-3. Rewards: each group is scored as soon as its rollout finishes.
                with timed("rollout_and_reward", timing):
                    rewards, meta = score_groups(pools, batch)
                # 4. Group statistics -> optimality and validity; saturated prompts are banned from now on.
                with timed("stats", timing):
                    R = torch.tensor([g.reward for g in rewards], dtype=torch.float64)
                    r, valid, banned = group_stats(R, cfg)
                    state.banned += [batch.prompt_ids[g] for g in range(len(rewards)) if banned[g]]
                # 5. Learner: NFT step on the valid groups (by reference), then the old policy moves and is published.
                with timed("train", timing):
                    keep = [g for g in range(len(rewards)) if valid[g]]
                    if keep:
                        learner = pools.learner.train_step([batch.groups[g] for g in keep],
                                                           [r[g].tolist() for g in keep], step)  # fmt: skip
                        metrics.update({f"learner/{k}": v for k, v in learner.items()})
                with timed("publish", timing):
                    if keep:
                        state.version += 1
                        weights = publish(pools, state.version)
                state.step = step + 1
                with timed("checkpoint", timing):
                    if save_now:
                        save_checkpoint(cfg, ckpt, pools, state)
            metrics.update(step_metrics(rewards, meta, r, valid, state.version - (1 if keep else 0), timing,
                                        cfg.samples_per_step))  # fmt: skip
            metrics["groups/banned_total"] = float(len(state.banned))
            metrics["policy/version"] = float(state.version)
            metrics.update(reward_counters(pools))
            log.write(step, metrics)
            last = metrics
    finally:
        pools.shutdown()
    return last


def save_checkpoint(cfg: Config, ckpt: CheckpointManager, pools: Pools, state: DriverState) -> str:
    """Each learner rank writes its shards (rank 0 also the eval-EMA export for diffusers) from its own node;
    the driver checks they all arrived, then writes its state and the commit marker. It holds no weights."""
    target = ckpt.begin(state.step)
    written = pools.learner.save(target, export=cfg.checkpoint.export_lora)
    where = ckpt.commit(state.step, target, {"driver": asdict(state), "config": config_to_dict(cfg)}, written=written)
    print(f"checkpoint: {where}", flush=True)
    return where
