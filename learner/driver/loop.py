"""The driver: one DiffusionNFT step after another, as docs/architecture.md lists them.

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
import dataclasses
import json
import random
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from learner.driver.board import BoardLog, draw_group
from learner.driver.elastic import RolloutScaler, rollout_load
from learner.driver.heldout import HeldOutEval
from learner.driver.identity import flat_config, new_run_id, training_keys_that_differ
from learner.driver.lineage import Lineage
from learner.driver.placement import alive_nodes, check_placement
from learner.driver.pools import Pools, build_pools
from learner.driver.ray_session import init_ray
from learner.driver.recovery import SlidingWindow, WorkerCrashLoop, WorkerPool
from learner.trainer.checkpoint import LEARNER, CheckpointManager, step_name
from learner.trainer.fsdp_worker import LearnerLost
from learner.trainer.nft_loss import group_filter, optimality, saturated_groups
from learner.trainer.nft_trainer import EMA, OLD
from motionnft_core import s3, telemetry
from motionnft_core.config import Config, ConfigError, LoggingConfig
from motionnft_core.config_loader import config_to_dict
from motionnft_core.data.motionedit import ExampleServer, load_splits
from motionnft_core.errors import lost_worker
from motionnft_core.faults import fault_point
from motionnft_core.models.weights import EVAL, SAMPLE, PublishedWeights
from motionnft_core.storage import check_writable
from rewards.judge import JudgeError
from rewards.scorer import GroupReward


@contextlib.contextmanager
def timed(name: str, timing: dict[str, float]):
    t0 = time.perf_counter()
    yield
    timing[name] = timing.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class DriverState:
    """Everything the driver needs to resume: saved in each checkpoint's driver.json."""

    run_id: str  # fixed at the run's first start, carried by every checkpoint
    step: int = 0  # next step to run
    version: int = 0  # newest published policy version (= optimizer steps taken)
    epoch: int = 0  # data cursor: pass over the training prompts ...
    position: int = 0  # ... and index into that pass's permutation
    banned: list[str] = field(default_factory=list)  # prompts whose group saturated (docs/algorithm.md)
    dropped_judge: int = 0  # groups left out because the judge could not score them (reward.judge.on_outage)
    base_mas: list[float] = field(default_factory=list)  # eval.every: the base policy's MAS per held-out row
    rollout_workers: int = 0  # the rollout pool's size after the step (an elastic pool regrows to it on resume)
    rollout_slow: int = 0  # the elastic pool's steps in a row that waited on rollouts ... (RolloutScaler)
    rollout_idle: int = 0  # ... and that left them idle


class PromptCursor:
    """Draws P prompt indices per step: a seeded permutation per pass, skipping banned prompts. It owns its
    place (`epoch`, `position`); the driver saves that in its state at a checkpoint."""

    def __init__(self, ids: list[str], seed: int, epoch: int = 0, position: int = 0) -> None:
        self.ids, self.seed, self.epoch, self.position = ids, seed, epoch, position

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.ids)))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def draw(self, n: int, banned: Collection[str]) -> list[int]:
        banned = set(banned)
        if len(banned) >= len(self.ids):
            raise RuntimeError("every training prompt is banned (its group saturated); nothing left to train on")
        out: list[int] = []
        while len(out) < n:
            order = self._order(self.epoch)
            while self.position < len(order) and len(out) < n:
                i = order[self.position]
                self.position += 1
                if self.ids[i] not in banned:
                    out.append(i)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return out


@dataclass
class StepRollouts:
    """The refs of one step's groups (for the learner, the reward workers, and the driver's metadata), and what
    a group needs to be sampled again, identically, if its rollout worker crashes: step, weights, worker, time."""

    step: int
    weights: PublishedWeights
    drawn_from: tuple[int, int]  # the cursor's (epoch, position) before it drew this step's prompts
    prompt_ids: list[str]
    examples: list[Any]
    groups: list[Any]
    images: list[Any]
    meta: list[Any]
    workers: list[int]  # the rollout worker of each group
    sent_at: list[float]  # when (time.monotonic) each group was sent to it

    def only(self, keep: list[int]) -> StepRollouts:
        per_group = (self.prompt_ids, self.examples, self.groups, self.images, self.meta, self.workers, self.sent_at)
        return StepRollouts(self.step, self.weights, self.drawn_from, *([x[g] for g in keep] for x in per_group))

    def resample(self, g: int, pool: WorkerPool) -> None:
        """Send group g again, to a rollout worker that is up (another one when there is): the same seeds and
        weights sample the same group."""
        w = pool.pick(avoid=self.workers[g])
        refs = pool.actors[w].sample.options(num_returns=3).remote(self.step, self.weights, self.examples[g])
        self.groups[g], self.images[g], self.meta[g] = refs
        self.workers[g], self.sent_at[g] = w, time.monotonic()


def group_stats(rewards: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, K) rewards -> optimality r (P, K), valid groups (P,), saturated groups to ban (P,) (docs/algorithm.md).

    Validity and bans always come from the rewards themselves, so `nft.invert_reward` changes only the
    direction of learning, never which groups train."""
    n = cfg.nft
    if rewards.shape[0] == 0:  # no group scored (reward.judge.on_outage=drop): nothing to train or ban
        none = torch.zeros(0, dtype=torch.bool)
        return rewards.clone(), none, none.clone()
    r = optimality(rewards, clip=n.adv_clip_max)
    if n.invert_reward:  # control experiment: the same updates towards the worse candidates
        r = 1.0 - r
    valid = group_filter(rewards, min_std=n.group_min_std, max_mean=n.group_max_mean)
    banned = saturated_groups(rewards, max_std=n.group_min_std, min_mean=n.group_max_mean)
    return r, valid, banned


class MetricsLog:
    """One JSON line per step in `<logging.dir>/metrics.jsonl` and a short printed line every N steps.

    Every step appears exactly once across kills and resumes: resuming at step S keeps the lines of steps
    before S - 1, the line of step S - 1 as written (or, if the kill came between the commit and the write,
    as the checkpoint carries it: `recovered`), and drops the lines of steps redone from S on."""

    def __init__(self, run_dir: Path, every: int, *, steps: int = 0, resume_at: int = 0,
                 recovered: dict | None = None) -> None:  # fmt: skip
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path, self.every, self.steps = run_dir / "metrics.jsonl", every, steps
        self.seconds: list[float] = []  # of the steps this process ran, checkpoints included: for the ETA
        lines: list[dict] = []
        if resume_at > 0 and self.path.exists():
            lines = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            lines = [x for x in lines if x["step"] < resume_at]
        if recovered is not None and all(x["step"] != recovered["step"] for x in lines):
            lines.append(recovered)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(x) + "\n" for x in sorted(lines, key=lambda x: x["step"])))
        tmp.replace(self.path)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.seconds.append(metrics.get("timing_s/step", 0.0) + metrics.get("timing_s/checkpoint", 0.0))
        if step % self.every == 0:
            keys = ("reward/mean", "reward/std", "learner/loss", "groups/valid", "staleness/mean",
                    "perf/samples_per_s", "timing_s/step")  # fmt: skip
            shown = "  ".join(f"{k} {metrics[k]:.4g}" for k in keys if k in metrics)
            if self.steps > step + 1:  # the mean of the last 10 steps, times the steps left
                recent = self.seconds[-10:]
                shown += f"  eta {_clock(sum(recent) / len(recent) * (self.steps - step - 1))}"
            print(f"step {step}  {shown}", flush=True)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ------------------------------------------------------------------------------------------------ phases


def submit_rollouts(pools: Pools, examples_server, indices: list[int], ids: list[str], step: int,
                    weights: PublishedWeights, drawn_from: tuple[int, int]) -> StepRollouts:  # fmt: skip
    """Spread one step's prompts over the rollout workers that are up; several groups per call share transformer
    calls. Every call carries the weights to sample with (one reference, fetched only by a worker that lacks
    them)."""
    examples = [examples_server.get.remote(i) for i in indices]
    up, n, now = pools.rollouts.up(), len(indices), time.monotonic()
    groups, images, meta, workers = [None] * n, [None] * n, [None] * n, [0] * n
    for j, w in enumerate(up):
        mine = list(range(j, n, len(up)))
        if not mine:
            continue
        call = pools.rollouts.actors[w].sample.options(num_returns=3 * len(mine))
        refs = call.remote(step, weights, *[examples[i] for i in mine])
        for k, i in enumerate(mine):
            groups[i], images[i], meta[i] = refs[3 * k : 3 * k + 3]
            workers[i] = w
    return StepRollouts(step, weights, drawn_from, [ids[i] for i in indices], examples, groups, images, meta, workers,
                        [now] * n)


def score_groups(pools: Pools, batch: StepRollouts) -> tuple[list[GroupReward | JudgeError], list[dict]]:
    """Every group goes to a reward worker as soon as it exists (Ray resolves the refs); fetch P*K floats. A
    group the judge could not score within its retry budget comes back as its JudgeError. A group whose rollout
    or reward worker crashed is sampled or scored again on a worker that is up, and the crash counted
    (learner/driver/recovery.py); any other error propagates."""
    up = pools.rewards.up()
    scorer = [up[g % len(up)] for g in range(len(batch.groups))]
    sent_at = [time.monotonic()] * len(scorer)

    def score(g: int) -> tuple[ray.ObjectRef, ray.ObjectRef]:
        """(reward ref, heat ref) of group g; the heat ref is this process's, so it outlives the reward worker."""
        return pools.rewards.actors[scorer[g]].score.remote(batch.examples[g], batch.images[g])

    calls = [score(g) for g in range(len(scorer))]
    refs, heats = [c[0] for c in calls], [c[1] for c in calls]
    results: list[GroupReward | JudgeError] = []
    for g in range(len(refs)):
        telemetry.queue_depths(sampled=batch.meta, scored=refs)  # each time a group is taken: what waits where
        while True:
            try:
                result = ray.get(refs[g])
                result.heat = heats[g]  # by reference: the learner fetches it (nft.motion_focal), never the driver
                results.append(result)
                break
            except ray.exceptions.RayError as e:  # raised in the reward worker, by an argument's task, or its death
                cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
                if isinstance(cause, JudgeError):
                    results.append(cause)
                    break
                if not lost_worker(e):
                    raise
                crash: Exception = cause
            lost = isinstance(crash, ray.exceptions.ObjectLostError)  # its images went with their node
            try:
                ray.get(batch.meta[g])  # did the group's rollout finish?
            except ray.exceptions.RayActorError as e:
                lost, crash = True, e
            if lost:
                pools.rollouts.crashed(batch.workers[g], batch.sent_at[g], crash)
                batch.resample(g, pools.rollouts)
            else:
                pools.rewards.crashed(scorer[g], sent_at[g], crash)
            scorer[g], sent_at[g] = pools.rewards.pick(avoid=scorer[g]), time.monotonic()
            refs[g], heats[g] = score(g)
    telemetry.queue_depths(sampled=batch.meta, scored=refs)
    return results, ray.get(batch.meta)


class RunStopped(RuntimeError):
    """The run ended on purpose (a judge outage past its budget), after saving what it could; the message says
    what happened, what was saved and how to go on."""


def publish(pools: Pools, version: int, which: str = OLD) -> PublishedWeights:
    """The learner's old adapter as policy version `version`, or (`which=EMA`) its eval EMA after step `version`:
    rank 0's gathered weights stay in the object store; the driver keeps their reference and the few-hundred-byte
    manifest."""
    manifest, tensors, probe = pools.learner.publishable(version, which)
    manifest, probe = ray.get([manifest, probe])  # a few hundred bytes and the probe output (KBs)
    return PublishedWeights(version, manifest, tensors, probe, purpose=EVAL if which == EMA else SAMPLE)


def reward_counters(pools: Pools) -> dict[str, float]:
    """Counters of the reward workers up, each since it started (judge requests, retries, timeouts, failures;
    flow estimator calls and target-flow cache hits), summed, as `reward_workers/<name>`; and the judge
    replicas' restarts."""
    total: dict[str, float] = {}
    sent_at = time.monotonic()
    asked = {w: pools.rewards.actors[w].counters.remote() for w in pools.rewards.up()}
    for w, ref in asked.items():
        try:
            counters = ray.get(ref)
        except ray.exceptions.RayActorError as e:  # it crashed since its last group (its node may be gone)
            pools.rewards.crashed(w, sent_at, e)
            continue
        for key, value in counters.items():
            name, gauge = f"reward_workers/{key}", key.endswith("_max") or "peak_" in key
            total[name] = max(total.get(name, 0.0), value) if gauge else total.get(name, 0.0) + value
    if pools.judges:
        restarts = []
        for ref in [j.restarts.remote() for j in pools.judges]:
            try:
                restarts.append(ray.get(ref))
            except ray.exceptions.RayActorError:  # a replica's actor is gone with its node
                total["judges/unreachable"] = total.get("judges/unreachable", 0.0) + 1
        total["judges/restarts"] = float(sum(restarts))
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
    if checked := [x["parity_error"] for x in meta if x.get("parity_error") is not None]:
        m["parity/max_error"] = max(checked)  # of the versions these groups were sampled with (models/parity.py)
    m.update({f"timing_s/{k}": v for k, v in timing.items()})
    m["perf/samples_per_s"] = n_samples / timing["step"]
    return m


# ------------------------------------------------------------------------------------------------ the loop


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Start (or resume) the run `cfg` describes and train to `learner.steps`; returns the last step's metrics."""
    run_dir = Path(cfg.logging.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:  # before anything starts: a checkpoint dir that cannot be written (credentials, endpoint, permissions)
        check_writable(cfg.checkpoint.dir)
    except (OSError, s3.S3Error) as e:  # FileNotFoundError (no bucket) is an OSError
        raise ConfigError(f"checkpoint.dir: {e}") from e
    retry = s3.S3Retry.from_config(cfg.checkpoint)
    ckpt = CheckpointManager(cfg.checkpoint.dir, keep=cfg.checkpoint.keep, retry=retry)
    state, recovered = start_state(cfg, ckpt, resume=resume, overwrite=overwrite)  # refusals before any start-up
    (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    embedded = init_ray(cfg)
    check_placement(cfg, alive_nodes())  # a pool no node (type) can ever hold fails now, naming its keys
    train_ds, eval_ds = load_splits(cfg)
    pools = build_pools(cfg, local=embedded)
    board = BoardLog(cfg.logging)
    try:
        print(startup_summary(cfg, state, len(train_ds), len(eval_ds), pools), flush=True)
        # On the driver's node, where the data was loaded; decoded examples go to the object store.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        examples = ray.remote(num_cpus=0)(ExampleServer).options(scheduling_strategy=here).remote(train_ds)
        driver = Driver(cfg, pools, ckpt, board, examples, train_ds.ids, HeldOutEval(cfg, eval_ds))
        return driver.run(state, recovered)
    finally:
        board.close()
        pools.shutdown()


def startup_summary(cfg: Config, state: DriverState, n_train: int, n_eval: int, pools: Pools) -> str:
    """What runs where and where it writes, in a few lines (the whole config is in <logging.dir>/config.json)."""
    m, n, c, j = cfg.model, cfg.nft, cfg.checkpoint, cfg.reward.judge
    weights = "full fine-tuning" if n.full_finetune else f"LoRA r{n.lora_rank} on {', '.join(n.lora_targets)}"
    judges = ("off (reward.judge_weight=0)" if cfg.reward.judge_weight == 0 else f"{j.url} (external)" if j.url
              else ", ".join(ray.get([judge.url.remote() for judge in pools.judges])))  # fmt: skip
    rollouts = "; ".join(ray.get([a.where.remote() for a in pools.rollouts.actors]))
    rewards = "; ".join(ray.get([a.where.remote() for a in pools.rewards.actors]))
    return "\n".join([
        f"run {state.run_id}: {m.family} ({m.path or 'tiny random weights'}, {m.dtype}), {weights}",
        f"data: {n_train} train / {n_eval} eval examples; {cfg.samples_per_step} samples per step "
        f"({cfg.rollout.prompts_per_step} prompts x {cfg.rollout.group_size}); steps {state.step} to "
        f"{cfg.learner.steps - 1}",
        f"rollout workers: {rollouts}",
        f"reward workers: {rewards}; judge: {judges}",
        f"writes: {cfg.logging.dir}/ (config.json, metrics.jsonl); checkpoints to {c.dir} "
        f"{f'every {c.every} steps and ' if c.every > 0 else ''}at the end, the last {c.keep} kept",
    ])  # fmt: skip


@dataclass
class StepResult:
    """What `run_step` made of one step, for `after_step` and `record`; or, in `outage`, why it could not end."""

    step: int
    save: bool  # a checkpoint step (a drain point: nothing of a later step is in flight after it)
    began: float  # wall clock (rollouts report when they finished in wall-clock time)
    workers: int  # rollout workers up when it began
    batch: StepRollouts | None = None  # the groups scored (all of them while `outage` is set)
    meta: list[dict] = field(default_factory=list)
    rewards: list[GroupReward] = field(default_factory=list)
    r: torch.Tensor | None = None  # optimality (P, K) of the scored groups
    valid: torch.Tensor | None = None  # (P,) the groups trained on
    failed: int = 0  # groups the judge could not score
    sampled_by: int = 0  # the policy version the step trained (staleness is measured against it)
    outage: tuple[JudgeError, int] | None = None  # reward.judge.on_outage=stop: the judge's error, groups it failed
    metrics: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)


class Driver:
    """One run's state and its steps, as docs/architecture.md lists them.

    It owns what lives across steps: the pools, the prompt cursor, the rollouts in flight for later steps
    (`pending`), the weights the rollouts sample with, the elastic scaler, the logs and the last step's metrics;
    `DriverState` is what a checkpoint keeps of it. `run_step` is the step (phases 1-5), `after_step` what the
    pools do after it (the held-out evaluation, the elastic pool), `record` what it leaves behind. A step that
    cannot end (a judge outage, a worker's crash loop, a lost learner rank) is handled in `run`, in one place.
    """

    def __init__(self, cfg: Config, pools: Pools, ckpt: CheckpointManager, board: BoardLog, examples: Any,
                 ids: list[str], held_out: HeldOutEval) -> None:  # fmt: skip
        self.cfg, self.pools, self.ckpt, self.board = cfg, pools, ckpt, board
        self.examples, self.ids, self.held_out = examples, ids, held_out
        self.scaler = RolloutScaler(cfg.cluster)
        self.learner_losses = SlidingWindow(cfg.learner.max_recoveries, cfg.learner.recovery_window_s)

    def run(self, state: DriverState, recovered: dict | None) -> dict[str, Any]:
        """The steps from `state.step` on; returns the last step's metrics."""
        self.restore(state, recovered, regrow_to=state.rollout_workers)  # an elastic pool: its checkpointed size
        while self.state.step < self.cfg.learner.steps:
            step = self.state.step
            try:
                result = self.run_step(step)
                if result.outage is None:
                    self.after_step(result)
                    self.record(result)
                    continue
                self.stop_on_judge_outage(result)
            except WorkerCrashLoop as e:
                raise RunStopped(f"{e}; the run is stopped (its latest checkpoint stays), fix the cause and run "
                                 "again with --resume") from e  # fmt: skip
            except LearnerLost as e:
                self.recover_learner(e)
        return self.last

    def restore(self, state: DriverState, recovered: dict | None, regrow_to: int) -> None:
        """Go on from `state`: the learner from its checkpoint, the weights published again, the logs trimmed to
        the steps before it, and an elastic rollout pool grown back to `regrow_to` workers."""
        cfg, pools = self.cfg, self.pools
        self.state, self.last, self.pending = state, {}, {}
        self.cursor = PromptCursor(self.ids, cfg.data.seed, state.epoch, state.position)
        self.scaler.slow, self.scaler.idle = state.rollout_slow, state.rollout_idle
        if state.step > 0:
            pools.learner.load(f"{self.ckpt.location(state.step)}/{LEARNER}", retry=self.ckpt.retry)  # each rank
        self.weights = publish(pools, state.version)
        if state.version == 0:  # a full fine-tune's base policy is measurable only now, by the weights as loaded
            self.held_out.measure_base(pools, self.weights, state.base_mas)
        self.log = MetricsLog(Path(cfg.logging.dir), cfg.logging.every, steps=cfg.learner.steps,
                              resume_at=state.step, recovered=recovered)  # fmt: skip
        self.board.start(resume_at=state.step)
        self.lineage = Lineage(Path(cfg.logging.dir), resume_at=state.step)
        for _ in range(self.scaler.regrow(pools.rollouts.size(), regrow_to)):
            self.add_rollout(f"the pool had {regrow_to} workers at the checkpoint")

    def run_step(self, step: int) -> StepResult:
        """Phases 1-5 of `step`; the state moves to the next step unless the judge's outage stops it."""
        cfg, pools, state = self.cfg, self.pools, self.state
        save = step == cfg.learner.steps - 1 or (cfg.checkpoint.every > 0 and (step + 1) % cfg.checkpoint.every == 0)
        out = StepResult(step, save, began=time.time(), workers=len(pools.rollouts.up()))
        with timed("step", out.timing):  # the step's work; a checkpoint's time is timing_s/checkpoint
            # 1. Rollouts: this step's groups, plus later steps' up to the staleness bound (never past a
            #    checkpoint step, which is a drain point).
            with timed("rollout_submit", out.timing):
                self.submit_ahead(step, last=step if save else min(step + cfg.rollout.max_staleness,
                                                                   cfg.learner.steps - 1))  # fmt: skip
                batch = self.pending.pop(step)
            # 2-3. Rewards: each group is scored as soon as its rollout finishes.
            with timed("rollout_and_reward", out.timing):
                results, meta = score_groups(pools, batch)
            failed = [g for g, x in enumerate(results) if isinstance(x, JudgeError)]
            if failed and cfg.reward.judge.on_outage == "stop":
                out.batch, out.outage = batch, (results[failed[0]], len(failed))
                return out
            scored = [g for g in range(len(results)) if g not in failed]  # on_outage=drop: the rest trains
            state.dropped_judge += len(failed)
            out.batch, out.meta, out.failed = batch.only(scored), [meta[g] for g in scored], len(failed)
            out.rewards = [results[g] for g in scored]
            # 4. Group statistics -> optimality and validity; saturated prompts are banned from now on.
            with timed("stats", out.timing):
                R = torch.tensor([g.reward for g in out.rewards], dtype=torch.float64)
                out.r, out.valid, banned = group_stats(R.reshape(len(scored), cfg.rollout.group_size), cfg)
                state.banned += [out.batch.prompt_ids[g] for g in range(len(scored)) if banned[g]]
            # 5. Learner: NFT step on the valid groups (by reference), then the old policy moves and is published.
            out.sampled_by = state.version
            keep = [g for g in range(len(scored)) if out.valid[g]]
            with timed("train", out.timing):
                if keep:
                    heats = [out.rewards[g].heat for g in keep] if cfg.nft.motion_focal else None  # refs
                    learner = pools.learner.train_step([out.batch.groups[g] for g in keep],
                                                       [out.r[g].tolist() for g in keep], step, heats)  # fmt: skip
                    out.metrics.update({f"learner/{k}": v for k, v in learner.items()})
            with timed("publish", out.timing):
                if keep:
                    state.version += 1
                    self.weights = publish(pools, state.version)
            state.step = step + 1
        return out

    def submit_ahead(self, step: int, last: int) -> None:
        """The groups of steps `step` to `last` not yet in flight, each sampled by the weights published now: at
        training time at most `last - step <= rollout.max_staleness` versions old (steps without a valid group
        publish none)."""
        for s in range(step, last + 1):
            if s not in self.pending:
                at = (self.cursor.epoch, self.cursor.position)
                idx = self.cursor.draw(self.cfg.rollout.prompts_per_step, self.state.banned)
                self.pending[s] = submit_rollouts(self.pools, self.examples, idx, self.ids, s, self.weights, at)

    def after_step(self, out: StepResult) -> None:
        """After the step, before it is recorded: the held-out evaluation when due (by the step's eval EMA, what
        its checkpoint exports) and the elastic pool's one change."""
        pools, state = self.pools, self.state
        if self.held_out.due(out.step):
            ema = publish(pools, out.step, which=EMA)
            out.metrics.update(self.held_out(pools, out.step, ema, state.base_mas))
        out.metrics.update(self.scale_rollouts(out))
        state.rollout_workers = pools.rollouts.size()
        state.rollout_slow, state.rollout_idle = self.scaler.slow, self.scaler.idle
        state.epoch, state.position = self.cursor.epoch, self.cursor.position  # saved only at a drain point

    def record(self, out: StepResult) -> None:
        """What a step leaves: its metrics line, lineage, checkpoint, TensorBoard and the live telemetry."""
        step, pools, state = out.step, self.pools, self.state
        metrics = out.metrics
        if out.rewards:
            metrics.update(step_metrics(out.rewards, out.meta, out.r, out.valid, out.sampled_by, out.timing,
                                        self.cfg.samples_per_step))  # fmt: skip
        else:  # on_outage=drop and the judge scored none: nothing trained, nothing published
            metrics.update({"groups/valid": 0.0, "groups/total": 0.0})
            metrics.update({f"timing_s/{k}": v for k, v in out.timing.items()})
        metrics.update({
            "prompts": list(out.batch.prompt_ids),  # the groups scored this step, by prompt id
            "groups/banned_total": float(len(state.banned)), "groups/dropped_judge": float(out.failed),
            "groups/dropped_judge_total": float(state.dropped_judge),  # carried by checkpoints, like bans
            "policy/version": float(state.version),
            "workers/rollout_crashes_total": float(pools.rollouts.crashes.total),  # since this process started
            "workers/reward_crashes_total": float(pools.rewards.crashes.total),
            # The driver only schedules: tensors reach it as CPU copies or not at all, so it never starts CUDA.
            "driver/cuda_initialized": float(torch.cuda.is_initialized()),
        })  # fmt: skip
        metrics.update(reward_counters(pools))
        if out.rewards:  # every scored candidate: seed, version, worker, image digest, reward terms, optimality
            self.lineage.write(step, out.batch.prompt_ids, out.meta, out.rewards, out.r, out.valid)
        if out.save:  # the step's metrics line travels in the checkpoint: a resume logs it exactly once
            began = time.perf_counter()
            save_checkpoint(self.cfg, self.ckpt, pools, state, {"step": step, **metrics})
            metrics["timing_s/checkpoint"] = time.perf_counter() - began
            fault_point("after_commit", step)
        self.log.write(step, metrics)
        self.board.scalars(step, metrics)
        telemetry.export_step(metrics)  # the same scalars, live, for Prometheus / Grafana (motionnft_step{key})
        if self.board.wants_images(step) and out.rewards:
            self.board.grids(step, image_grids(out.batch, out.rewards, self.cfg.logging))
        fault_point("after_log", step)
        pools.rollouts.release(in_use={w for b in self.pending.values() for w in b.workers})  # drained: removed
        self.last = metrics

    def stop_on_judge_outage(self, out: StepResult) -> None:
        """reward.judge.on_outage=stop: checkpoint the last completed step (unless it already is), then end the
        run naming the judge's error. The checkpoint's data cursor is where this step drew its prompts, so a
        resume redoes exactly this step."""
        step, (error, n_failed), j = out.step, out.outage, self.cfg.reward.judge
        saved = "no step was completed, nothing to checkpoint"
        if step > 0 and self.ckpt.latest() != step:
            epoch, position = out.batch.drawn_from
            at = dataclasses.replace(self.state, step=step, epoch=epoch, position=position,
                                     banned=list(self.state.banned))  # fmt: skip
            where = save_checkpoint(self.cfg, self.ckpt, self.pools, at, {"step": step - 1, **self.last})
            saved = f"checkpointed the last completed step at {where}"
        elif step > 0:
            saved = f"the last completed step is checkpointed at {self.ckpt.location(step)}"
        raise RunStopped(f"the judge could not score {n_failed} group(s) of step {step} within "
                         f"reward.judge.retry_budget_s={j.retry_budget_s:g}s: {error}. {saved}; run again with "
                         "--resume once the judge answers, or set reward.judge.on_outage=drop to train on without "
                         "those groups")  # fmt: skip

    def recover_learner(self, error: LearnerLost) -> None:
        """A lost rank: rebuild the learner group and go on from the latest checkpoint, in this process, at most
        `learner.max_recoveries` times within `learner.recovery_window_s`."""
        learner = self.cfg.learner
        if not self.learner_losses.record(time.monotonic()):
            raise RunStopped(f"{error}, and learner.max_recoveries={learner.max_recoveries} recoveries within "
                             f"learner.recovery_window_s={learner.recovery_window_s:g} are spent; run again with "
                             "--resume to go on from the latest checkpoint") from error  # fmt: skip
        latest = self.ckpt.latest()
        print(f"{error}: rebuilding the learner group (recovery {len(self.learner_losses)} of "
              f"{learner.max_recoveries} within {learner.recovery_window_s:g} s), then going on from "
              f"{step_name(latest) if latest else 'the start'}", flush=True)  # fmt: skip
        self.pools.rebuild_learner(self.cfg)
        if latest is None:
            state, recovered = DriverState(run_id=self.state.run_id), None
        else:
            state, recovered = resumed_state(self.ckpt, latest)
        self.restore(state, recovered, regrow_to=0)  # the rollout pool is the one that ran: as it is

    def add_rollout(self, why: str) -> None:
        """One rollout worker more; it takes work once it has loaded the current weights and passed their parity
        probe."""
        pool, timeout_s = self.pools.rollouts, self.scaler.join_timeout_s
        w = pool.add(self.pools.new_rollout(len(pool.actors)), lambda actor: actor.prepare.remote(self.weights),
                     timeout_s)  # fmt: skip
        print(f"rollout pool: adding rollout-{w} ({why})", flush=True)

    def scale_rollouts(self, out: StepResult) -> dict[str, float]:
        """The rollout pool's load in the step, and, when it is elastic, one worker added or drained
        (learner/driver/elastic.py)."""
        pool, scaler = self.pools.rollouts, self.scaler
        wait, busy = rollout_load(out.meta, out.began, out.timing["step"], out.workers)
        change = scaler.decide(pool.size(), wait, busy, settling=bool(pool.joining or pool.draining))
        if change > 0 and self.pools.new_rollout is not None:
            self.add_rollout(f"the learner waited on rollouts {wait:.0%} of the step, {scaler.patience} step(s) "
                             "in a row")  # fmt: skip
        elif change < 0 and (w := pool.drain()) is not None:
            print(f"rollout pool: removing rollout-{w} once its groups are trained on (rollout workers sampled "
                  f"{busy:.0%} of the step, {scaler.patience} step(s) in a row)", flush=True)  # fmt: skip
        return {"pool/rollout_wait": wait, "pool/rollout_busy": busy, "pool/rollout_workers": float(len(pool.up())),
                "pool/rollout_joining": float(len(pool.joining)), "cluster/nodes": float(len(alive_nodes()))}


def image_grids(batch: StepRollouts, rewards: list[GroupReward], logging: LoggingConfig) -> list:
    """The first `logging.image_groups` groups as thumbnail strips, drawn by tasks next to their images."""
    draw = ray.remote(num_cpus=0)(draw_group)
    shown = range(min(logging.image_groups, len(rewards)))
    drawn = ray.get([draw.remote(batch.examples[g], batch.images[g], rewards[g].reward, logging.image_size)
                     for g in shown])  # fmt: skip
    return [(batch.prompt_ids[g], prompt, rewards[g].reward, grid)
            for g, (prompt, grid) in zip(shown, drawn, strict=True)]  # fmt: skip


def start_state(cfg: Config, ckpt: CheckpointManager, *, resume: bool, overwrite: bool
                ) -> tuple[DriverState, dict | None]:  # fmt: skip
    """Where this run starts, and the metrics line of the step its checkpoint ended with.

    A checkpoint dir holds one run: a fresh start where checkpoints exist is refused unless `overwrite` (which
    deletes them), and `resume` refuses a checkpoint whose training-relevant config differs, naming the keys."""
    latest = ckpt.latest()
    if latest is not None and not resume:
        if not overwrite:
            raise ConfigError(f"checkpoint.dir: {cfg.checkpoint.dir} already holds checkpoints (latest "
                              f"{step_name(latest)}); pass --resume to continue that run, or --overwrite to delete "
                              "them and start anew")  # fmt: skip
        removed = ckpt.delete_all()
        print(f"--overwrite: deleted {removed} checkpoint(s) under {cfg.checkpoint.dir}", flush=True)
    if latest is None or not resume:
        if resume:
            print(f"--resume: no complete checkpoint under {cfg.checkpoint.dir}; starting fresh", flush=True)
        return DriverState(run_id=new_run_id()), None
    saved = ckpt.driver_state(latest)
    current, defaults = config_to_dict(cfg), config_to_dict(Config())
    if differ := training_keys_that_differ(saved["config"], current, defaults):
        was, now, default = (flat_config(c) for c in (saved["config"], current, defaults))
        saved_value = {k: repr(was[k]) if k in was else f"absent (the default {default.get(k)!r})" for k in differ}
        shown = "; ".join(f"{k}: {saved_value[k]} in the checkpoint, {now.get(k)!r} now" for k in differ)
        raise ConfigError(f"--resume: {ckpt.location(latest)} was trained with other values of {len(differ)} "
                          f"training-relevant key(s): {shown}. Start a new run in another checkpoint.dir, or "
                          "resume with the checkpoint's values")  # fmt: skip
    return resumed_state(ckpt, latest, saved)


def resumed_state(ckpt: CheckpointManager, step: int, saved: dict | None = None) -> tuple[DriverState, dict | None]:
    """The driver state checkpoint `step` holds, and the metrics line of the step it ended with."""
    saved = saved or ckpt.driver_state(step)
    state = DriverState(**saved["driver"])
    print(f"resumed from {step_name(step)}: step {state.step}, policy version {state.version}, "
          f"run {state.run_id}", flush=True)  # fmt: skip
    return state, saved.get("metrics")


def save_checkpoint(cfg: Config, ckpt: CheckpointManager, pools: Pools, state: DriverState,
                    metrics: dict[str, float]) -> str:  # fmt: skip
    """Each learner rank writes its shards (rank 0 also the eval-EMA export for diffusers) from its own node;
    the driver checks they all arrived, then writes its state and the commit marker. It holds no weights."""
    target = ckpt.begin(state.step)
    written = pools.learner.save(target, export=cfg.checkpoint.export_lora, retry=ckpt.retry)
    driver = {"driver": asdict(state), "config": config_to_dict(cfg), "metrics": metrics}
    where = ckpt.commit(state.step, target, driver, written=written)
    print(f"checkpoint: {where}", flush=True)
    return where
