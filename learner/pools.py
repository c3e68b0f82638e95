"""Builds the actor pools of a run from its config: the only place where config meets the plain classes.

Each pool gets a small picklable factory (`PolicySpec`, `RewardSpec`) that its actors call in their own process,
so no model ever travels through the driver. Pool sizes and GPUs per role come from `cluster.*`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.config import Config


def builder_key(module: Any) -> str:
    """A short hash of a builder module's source: caches of what it built are never reused across code changes."""
    return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:10]


def resolve_model_path(cfg: Config) -> str:
    """The pipeline to load: `model.path`, or a tiny random one built offline into the cache (once)."""
    if not cfg.model.tiny:
        return cfg.model.path
    from models import tiny as tiny_models

    out = Path(cfg.model.cache_dir).expanduser() / "tiny" / f"{cfg.model.family}-{builder_key(tiny_models)}"
    if not (out / "model_index.json").exists():
        tiny_models.build_tiny(cfg.model.family, out)
    return str(out)


def resolve_judge_path(cfg: Config) -> str:
    j = cfg.reward.judge
    if not j.tiny:
        return j.model_path
    from models import tiny_judge

    out = Path(cfg.model.cache_dir).expanduser() / "tiny" / f"judge-{builder_key(tiny_judge)}"
    if not (out / "config.json").exists():
        tiny_judge.build_tiny_judge(out)
    return str(out)


@dataclass(frozen=True)
class PolicySpec:
    """How an actor loads its policy; an empty LoRA adapter is added when `lora` is set (rollouts)."""

    path: str
    family: str
    dtype: str
    guidance: float
    cache_dir: str
    use_gpu: bool
    lora: tuple[int, int, tuple[str, ...]] | None = None  # (rank, alpha, targets)
    max_sequence_length: int = 512  # Kontext T5 padding

    @classmethod
    def for_run(cls, cfg: Config, path: str, *, use_gpu: bool, lora=None) -> PolicySpec:
        """The spec of a run's policy (`model.*`) at `path` (the resolved pipeline dir)."""
        m = cfg.model
        return cls(path=path, family=m.family, dtype=m.dtype, guidance=m.guidance, cache_dir=m.cache_dir,
                   use_gpu=use_gpu, lora=lora, max_sequence_length=m.max_sequence_length)  # fmt: skip

    def __call__(self):
        from models.policy import EditPolicy

        extra = (
            {"guidance_scale": self.guidance, "max_sequence_length": self.max_sequence_length}
            if self.family == "flux_kontext"
            else {}
        )
        policy = EditPolicy.from_pretrained(
            self.path,
            family=self.family,
            dtype=getattr(torch, self.dtype),
            device="cuda" if self.use_gpu else "cpu",
            cache_dir=str(Path(self.cache_dir).expanduser() / "models"),
            **extra,
        )
        if self.lora is not None:
            rank, alpha, targets = self.lora
            policy.add_lora(rank=rank, alpha=alpha, target_modules=list(targets))
        return policy


@dataclass(frozen=True)
class RewardSpec:
    """How a reward actor builds its scorer; a component with weight 0 is never built."""

    flow_weight: float
    judge_weight: float
    flow: dict[str, Any]  # estimator kind + kwargs, flow-reward constants
    judge_urls: tuple[str, ...]
    judge: dict[str, Any] = field(default_factory=dict)
    batch_pairs: int = 32
    max_wait_ms: float = 20.0

    def __call__(self):
        from rewards.judge import JudgeClient
        from rewards.worker import RewardScorer

        flow = build_flow_scorer(self.flow) if self.flow_weight > 0 else None
        judges = [JudgeClient(url, **self.judge) for url in self.judge_urls] if self.judge_weight > 0 else []
        return RewardScorer(
            flow, judges, flow_weight=self.flow_weight, judge_weight=self.judge_weight,
            batch_pairs=self.batch_pairs, max_wait_ms=self.max_wait_ms,
        )  # fmt: skip


def build_flow_scorer(settings: dict[str, Any]):
    """A FlowRewardScorer from `flow_settings` (estimator kind + kwargs, DESIGN §3 constants)."""
    from rewards.flow_model import build_flow_estimator
    from rewards.flow_scorer import FlowRewardScorer

    f = dict(settings)
    estimator = build_flow_estimator(f.pop("kind"), **f.pop("estimator_kwargs"))
    return FlowRewardScorer(estimator, max_batch=f.pop("max_batch"), **f)


def flow_settings(cfg: Config, use_gpu: bool) -> dict[str, Any]:
    f = cfg.reward.flow
    if f.estimator.startswith("raft"):
        est = {"weights": f.weights or None, "num_updates": f.num_updates, "max_batch": f.max_batch,
               "device": "cuda" if use_gpu else "cpu", "cache_dir": cfg.model.cache_dir}  # fmt: skip
    else:
        est = {}
    return {
        "kind": f.estimator, "estimator_kwargs": est, "max_batch": f.max_batch,
        "q": f.q, "m": f.motion_threshold, "tau": f.tau, "kappa": f.kappa,
        "a": f.w_magnitude, "b": f.w_direction, "c": f.w_move, "quantize": f.quantize,
    }  # fmt: skip


@dataclass
class Pools:
    param_server: Any
    rollouts: list[Any]
    rewards: list[Any]
    learner: Any  # LearnerGroup
    judges: list[Any]

    def shutdown(self) -> None:
        import ray

        for j in self.judges:  # stop the vLLM processes cleanly before the actors go
            try:
                ray.get(j.stop.remote(), timeout=60)
            except Exception as e:  # noqa: BLE001 - shutdown continues, but says what failed
                print(f"warning: judge replica did not stop cleanly: {e!r}", flush=True)
        if self.learner is not None:
            self.learner.shutdown()
        for a in [self.param_server, *self.rollouts, *self.rewards, *self.judges]:
            ray.kill(a)


def build_pools(cfg: Config) -> Pools:
    import ray

    from actors.param_server import ParameterServer
    from actors.rollout import ReferenceForwards, RolloutWorker
    from learner.fsdp_worker import LearnerGroup, NFTHyper
    from rewards.judge import JudgeServerActor
    from rewards.worker import RewardWorker

    c, n = cfg.cluster, cfg.nft
    path = resolve_model_path(cfg)
    lora = None if n.full_finetune else (n.lora_rank, n.lora_alpha, tuple(n.lora_targets))
    weight_kind = "full" if n.full_finetune else "lora"

    param_server = ray.remote(num_cpus=0)(ParameterServer).remote(keep=2)

    # Learner first: it publishes version 0 (old = θ at init) before any rollout samples.
    hyper = NFTHyper(
        beta=n.beta, adv_clip_max=n.adv_clip_max, kl_weight=n.kl_weight, timestep_fraction=n.timestep_fraction,
        decay_schedule=n.decay_schedule, ema_cap=n.ema_cap, lr=n.lr, betas=(n.adam_beta1, n.adam_beta2),
        weight_decay=n.weight_decay, grad_clip=n.grad_clip, lora_rank=n.lora_rank, lora_alpha=n.lora_alpha,
        lora_targets=tuple(n.lora_targets), micro_batch=cfg.learner.micro_batch, seed=cfg.learner.seed,
        full_finetune=n.full_finetune,
    )  # fmt: skip
    learner = LearnerGroup(
        c.learner_ranks,
        gpus_per_rank=c.learner_gpus,
        cpus_per_rank=c.cpus_per_actor,
        build_policy=PolicySpec.for_run(cfg, path, use_gpu=c.learner_gpus > 0),
        hyper=hyper,
        options={
            "mixed_precision": c.learner_gpus > 0 and cfg.model.dtype != "float32",
            "activation_checkpointing": cfg.learner.activation_checkpointing,
        },  # fmt: skip
        backend=cfg.learner.backend,
    )

    judges: list[Any] = []
    urls: tuple[str, ...] = ()
    if cfg.reward.judge_weight > 0:
        j = cfg.reward.judge
        if j.url:
            urls = (j.url,)
        else:
            judge_path = resolve_judge_path(cfg)
            judges = [
                JudgeServerActor.options(num_cpus=c.cpus_per_actor, num_gpus=c.judge_gpus).remote(
                    judge_path,
                    served_model_name=j.served_model_name,
                    tensor_parallel_size=j.tensor_parallel_size,
                    max_model_len=j.max_model_len,
                )  # fmt: skip
                for _ in range(c.judge_replicas)
            ]
            urls = tuple(ray.get([s.url.remote() for s in judges]))

    reward_spec = RewardSpec(
        flow_weight=cfg.reward.flow_weight,
        judge_weight=cfg.reward.judge_weight,
        flow=flow_settings(cfg, c.reward_gpus > 0),
        judge_urls=urls,
        judge={"model": cfg.reward.judge.served_model_name, "mode": cfg.reward.judge.mode,
               "timeout_s": cfg.reward.judge.timeout_s, "max_retries": cfg.reward.judge.max_retries,
               "backoff_s": cfg.reward.judge.backoff_s, "max_concurrency": cfg.reward.judge.max_concurrency},
        batch_pairs=cfg.reward.batch_pairs,
        max_wait_ms=cfg.reward.max_wait_ms,
    )  # fmt: skip
    rewards = [
        ray.remote(RewardWorker)
        .options(num_cpus=c.cpus_per_actor, num_gpus=c.reward_gpus, max_restarts=2, max_task_retries=2)
        .remote(reward_spec)  # fmt: skip
        for _ in range(c.reward_workers)
    ]

    r = cfg.rollout
    sampler_kwargs = {"group_size": r.group_size, "num_steps": r.num_steps, "height": r.height, "width": r.width,
                      "micro_batch": r.micro_batch, "seed": r.seed}  # fmt: skip
    if n.reference_forwards == "rollout":
        sampler_kwargs["reference"] = ReferenceForwards(seed=cfg.learner.seed, fraction=n.timestep_fraction)
    rollouts = [
        ray.remote(RolloutWorker)
        .options(num_cpus=c.cpus_per_actor, num_gpus=c.rollout_gpus, max_restarts=2, max_task_retries=2)
        .remote(  # fmt: skip
            f"rollout-{i}",
            param_server,
            PolicySpec.for_run(cfg, path, use_gpu=c.rollout_gpus > 0, lora=lora),
            sampler_kwargs,
            weight_kind,
        )
        for i in range(c.rollout_workers)
    ]
    ray.get([a.ready.remote() for a in rollouts + rewards])
    return Pools(param_server, rollouts, rewards, learner, judges)
