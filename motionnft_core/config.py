"""Typed run configuration: one frozen dataclass per section, loaded from YAML plus dotted overrides.

Every default is the published MotionNFT / DiffusionNFT value (../shared/DESIGN.md §1, §3-§5) unless its help
says otherwise. Errors name the dotted key (`rollout.group_size`) and what was expected, so a bad run fails at
start-up, not inside a worker. This is the one module every package may import.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml


class ConfigError(ValueError):
    """A config key is unknown, of the wrong type or out of range; the message names the dotted key."""


def _f(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field whose help text feeds `--help`; tuples rather than lists, a dict is copied per instance.
    Float values must be finite (no .inf / .nan): `_coerce` and `_check_finite` refuse them."""
    metadata = {"help": help}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _check_finite(section: Any) -> None:
    """Every float of a section (also inside its dicts and lists) is finite:
    a section built in code fails like a parsed one (`_coerce` already refuses them in YAML and overrides)."""

    def floats(value: Any, key: str):
        if isinstance(value, float):
            yield key, value
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from floats(v, f"{key}.{k}")
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                yield from floats(v, f"{key}[{i}]")

    prefix = f"{section.SECTION}." if section.SECTION else ""
    for f in dataclasses.fields(section):
        for key, x in floats(getattr(section, f.name), f"{prefix}{f.name}"):
            _check(math.isfinite(x), key, "a finite number", x)


def _check_dir(key: str, value: str, *, s3: bool) -> None:
    """A directory the run writes: not empty; an s3:// URI (when allowed) needs a bucket name."""
    _check(bool(value.strip()), key, "a local dir" + (" or s3://bucket/prefix" if s3 else "") + ", not empty", value)
    if value.startswith("s3://"):
        _check(s3, key, "a local dir (not s3://: it is written with local file I/O)", value)
        bucket = value[len("s3://") :].partition("/")[0]
        _check(bool(bucket.strip()), key, "s3://bucket/prefix with a bucket name", value)


FAMILIES = ("flux_kontext", "qwen_image_edit")
DTYPES = ("float32", "bfloat16", "float16")
FLOW_ESTIMATORS = ("raft_large", "raft_small", "dis", "farneback")
DEMO_MOTIONS = ("right", "left", "up", "down", "translate", "any")  # a translation direction, any translation, any
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass(frozen=True)
class ModelConfig:
    SECTION: ClassVar[str] = "model"
    family: str = _f("flux_kontext", "policy family: flux_kontext | qwen_image_edit")
    path: str = _f("", "pipeline dir (save_pretrained layout) or s3://bucket/prefix; empty needs model.tiny=true")
    tiny: bool = _f(False, "build a tiny random-weight pipeline offline into cache_dir and train that")
    dtype: str = _f("bfloat16", "weights/compute dtype of rollouts and learner: float32 | bfloat16 | float16")
    guidance: float = _f(2.5, "FLUX Kontext distilled guidance embedding (rollouts and training); Qwen: unused")
    max_sequence_length: int = _f(512, "FLUX Kontext: T5 tokens the instruction is padded to (pipeline default)")
    cache_dir: str = _f("~/.cache/motionnft", "where S3 downloads and tiny models are kept")

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.family in FAMILIES, "model.family", f"one of {FAMILIES}", self.family)
        _check(self.dtype in DTYPES, "model.dtype", f"one of {DTYPES}", self.dtype)
        _check(self.guidance >= 0, "model.guidance", "a value >= 0", self.guidance)
        _check(self.max_sequence_length >= 1, "model.max_sequence_length", "an integer >= 1", self.max_sequence_length)


@dataclass(frozen=True)
class DataConfig:
    SECTION: ClassVar[str] = "data"
    source: str = _f("", "MotionEdit parquet / JSONL manifest / folder, local or s3://; empty needs data.synthetic")
    synthetic: int = _f(0, "if > 0 and source is empty: generate this many synthetic motion examples and use them")
    synthetic_size: int = _f(64, "side in pixels of generated synthetic images")
    eval_fraction: float = _f(0.1, "share of examples held out for evaluation (deterministic by id and seed)")
    on_error: str = _f("skip", "a bad row (missing field/file, corrupt image): skip (logged) | raise")
    upscale_small: bool = _f(
        False,
        "upscale (bilinear) images smaller than rollout.height x rollout.width, counted and logged; false = an "
        "image smaller on either side is a bad row (data.on_error)",
    )
    seed: int = _f(0, "seed of the split and of the prompt order")

    def __post_init__(self) -> None:
        _check(self.synthetic >= 0, "data.synthetic", "an integer >= 0", self.synthetic)
        _check(
            self.synthetic_size >= 16 and self.synthetic_size % 16 == 0,
            "data.synthetic_size",
            "a multiple of 16 >= 16",
            self.synthetic_size,
        )
        _check(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", "a value in [0, 1)", self.eval_fraction)
        _check(self.on_error in ("skip", "raise"), "data.on_error", "skip | raise", self.on_error)
        _check(isinstance(self.upscale_small, bool), "data.upscale_small", "true | false", self.upscale_small)


@dataclass(frozen=True)
class RolloutConfig:
    SECTION: ClassVar[str] = "rollout"
    group_size: int = _f(8, "K: candidate edits sampled per (image, instruction)")
    prompts_per_step: int = _f(24, "P: prompts per training step (P*K samples)")
    num_steps: int = _f(6, "DPM-Solver++(2M) steps on the shifted sigma grid linspace(1, 1/n, n)")
    height: int = _f(512, "edit height in pixels (multiple of 16)")
    width: int = _f(512, "edit width in pixels (multiple of 16)")
    micro_batch: int = _f(8, "candidates per transformer call (several groups share a call)")
    max_staleness: int = _f(1, "rollouts may use weights at most this many versions old (0 = on-policy)")
    seed: int = _f(0, "base seed; candidate noise is a function of (seed, step, prompt, k)")
    compile: bool = _f(
        False, "regional compilation: torch.compile each repeated transformer block for sampling (DESIGN §6)"
    )
    fp8: bool = _f(
        False, "sample with FP8 matrix products in the transformer blocks (no-grad, row-wise scaled; "
        "motionnft_core/models/fp8.py): "
        "a lossy rollout is allowed, the loss uses no rollout log-probs; GPUs with compute capability >= 8.9"
    )  # fmt: skip
    fp8_reference: bool = _f(
        False, "the reference forwards on the rollout (v_old, v_ref; nft.reference_forwards: rollout) in FP8 too: "
        "their error enters the loss (bench/train_step.py measures it)"
    )  # fmt: skip
    parity_check: bool = _f(
        True, "after loading each published version, compare the policy's output on a fixed probe with the "
        "learner's and count the adapter modules bound (motionnft_core/models/parity.py); a mismatch stops that rollout"
    )  # fmt: skip
    parity_tolerance: dict[str, float] = _f(
        {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3},
        "largest parity error allowed per model dtype, relative to the probe output's peak: float32 agrees to "
        "rounding, 16-bit differs by kernel choice (compiled or not, another GPU) within a few ulps of the peak",
    )

    def __post_init__(self) -> None:
        _check_finite(self)
        for dtype, tol in self.parity_tolerance.items():
            _check(dtype in DTYPES, "rollout.parity_tolerance", f"keys among {DTYPES}", dtype)
            _check(tol > 0, f"rollout.parity_tolerance.{dtype}", "a number > 0", tol)
        for key in ("group_size", "prompts_per_step", "num_steps", "micro_batch"):
            _check(getattr(self, key) >= 1, f"rollout.{key}", "an integer >= 1", getattr(self, key))
        _check(self.group_size >= 2, "rollout.group_size", "K >= 2 (group statistics need 2)", self.group_size)
        _check(self.num_steps >= 2, "rollout.num_steps", "an integer >= 2", self.num_steps)
        for key in ("height", "width"):
            v = getattr(self, key)
            _check(v >= 16 and v % 16 == 0, f"rollout.{key}", "a multiple of 16 >= 16", v)
        _check(self.max_staleness >= 0, "rollout.max_staleness", "an integer >= 0", self.max_staleness)


@dataclass(frozen=True)
class FlowRewardConfig:
    """Motion-alignment reward (DESIGN §3). Source of every constant's default: the published MotionNFT scorer,
    elainew728/motion-edit train/flow_grpo/motionedit_scorer.py (the paper gives the decomposition, the code the
    numbers); num_updates=12 is torchvision RAFT's default; max_batch is the H100 limit measured in DESIGN §6."""

    SECTION: ClassVar[str] = "reward.flow"
    estimator: str = _f("raft_large", "raft_large | raft_small (torchvision RAFT) | dis | farneback (OpenCV, CPU)")
    weights: str = _f("", "RAFT weights file, local or s3://; empty = random init (tests only)")
    num_updates: int = _f(12, "RAFT refinement iterations (torchvision default)")
    max_batch: int = _f(32, "pairs per estimator call (>32 at 512^2 hits a cuDNN grid_sample limit on H100)")
    cache_size: int = _f(4096, "input->target flows a reward worker keeps (LRU, float32 on the CPU: 2 MiB at 512^2)")
    q: float = _f(0.4, "exponent of the magnitude error L_q (reference scorer)")
    motion_threshold: float = _f(0.002, "m: |V_g| above which a pixel counts for the direction term (reference)")
    tau: float = _f(0.01, "movement hinge margin (reference scorer)")
    kappa: float = _f(0.5, "movement hinge share of the ground-truth motion (reference scorer)")
    w_magnitude: float = _f(0.7, "a: weight of L_q in D (reference scorer)")
    w_direction: float = _f(0.2, "b: weight of the direction error in D (reference scorer)")
    w_move: float = _f(0.1, "c: weight of the movement hinge in D (reference scorer)")
    quantize: bool = _f(True, "round the score to {0, .2, ..., 1} (reference scorer; s itself is logged)")

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.estimator in FLOW_ESTIMATORS, "reward.flow.estimator", f"one of {FLOW_ESTIMATORS}", self.estimator)
        _check(self.num_updates >= 1, "reward.flow.num_updates", "an integer >= 1", self.num_updates)
        _check(self.max_batch >= 1, "reward.flow.max_batch", "an integer >= 1", self.max_batch)
        _check(self.cache_size >= 0, "reward.flow.cache_size", "an integer >= 0", self.cache_size)
        _check(self.q > 0, "reward.flow.q", "a value > 0", self.q)
        for key in ("motion_threshold", "tau", "kappa", "w_magnitude", "w_direction", "w_move"):
            _check(getattr(self, key) >= 0, f"reward.flow.{key}", "a value >= 0", getattr(self, key))


@dataclass(frozen=True)
class JudgeConfig:
    SECTION: ClassVar[str] = "reward.judge"
    url: str = _f("", "existing OpenAI-compatible endpoint (http://host:port/v1); empty = start vLLM replicas")
    model_path: str = _f("", "judge model dir for the replicas the service starts (reference: Qwen2.5-VL-32B)")
    tiny: bool = _f(False, "build and serve a tiny random Qwen2-VL judge (CPU tests and demos)")
    served_model_name: str = _f("judge", "model name used in requests")
    mode: str = _f("score", "score: expected digit 0-5 from log-probs (training) | rubric: 3 criteria (eval)")
    tensor_parallel_size: int = _f(1, "vLLM tensor parallel size per replica")
    max_model_len: int = _f(4096, "vLLM context length")
    timeout_s: float = _f(60.0, "per-request timeout")
    max_retries: int = _f(3, "retries of a failed/unparseable request before the group fails (unreachable or "
                          "overloaded replicas are retried longer: retry_budget_s)")  # fmt: skip
    backoff_s: float = _f(0.5, "first retry delay; doubles per retry up to max_backoff_s")
    max_backoff_s: float = _f(30.0, "longest wait between two retries, and how long a failing replica is skipped")
    retry_budget_s: float = _f(
        600.0, "how long a judge call keeps retrying transport failures (refused, reset, timeout, 5xx) across the "
        "replicas, e.g. while a dead replica restarts (minutes on a GPU); then reward.judge.on_outage applies"
    )  # fmt: skip
    on_outage: str = _f(
        "stop", "a group the judge could not score within retry_budget_s: stop (checkpoint the last completed step, "
        "then end the run with the judge's error) | drop (leave the group out of the step, counted)"
    )  # fmt: skip
    restart_backoff_s: float = _f(5.0, "a dead replica the service started is restarted after this; doubles per "
                                  "restart in a row, up to 300 s")  # fmt: skip
    max_concurrency: int = _f(16, "in-flight requests per reward worker")
    image_format: str = _f("png", "how images are sent to the judge: png (lossless) | jpeg (smaller requests)")
    structured_output: bool = _f(
        True, "constrain the answer to one digit with vLLM structured output; false for servers without it"
    )
    startup_timeout_s: float = _f(300.0, "longest wait for a judge replica the service starts to answer /health")
    log_dir: str = _f("", "absolute folder, on each judge node, for the vLLM log of each replica the service "
                      "starts (made if missing; a restart appends to its replica's log; a mounted volume keeps them "
                      "past the node); empty = the node's temp dir")  # fmt: skip
    api_key_env: str = _f(
        "MOTIONNFT_JUDGE_API_KEY",
        "environment variable holding the judge's API key (set it from a secret; the key itself never goes in a "
        "config). Unset: replicas the service starts get a random key for the run; an external url gets none",
    )

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.mode in ("score", "rubric"), "reward.judge.mode", "score | rubric", self.mode)
        _check(self.timeout_s > 0, "reward.judge.timeout_s", "a value > 0", self.timeout_s)
        _check(self.max_retries >= 0, "reward.judge.max_retries", "an integer >= 0", self.max_retries)
        _check(self.backoff_s >= 0, "reward.judge.backoff_s", "a value >= 0", self.backoff_s)
        _check(self.max_backoff_s >= self.backoff_s, "reward.judge.max_backoff_s", "a value >= backoff_s",
               self.max_backoff_s)  # fmt: skip
        _check(self.retry_budget_s >= 0, "reward.judge.retry_budget_s", "a value >= 0", self.retry_budget_s)
        _check(self.on_outage in ("stop", "drop"), "reward.judge.on_outage", "stop | drop", self.on_outage)
        _check(self.restart_backoff_s >= 0, "reward.judge.restart_backoff_s", "a value >= 0", self.restart_backoff_s)
        _check(not self.log_dir or Path(self.log_dir).is_absolute(), "reward.judge.log_dir",
               "an absolute path (it is used on the judge's node), or empty", self.log_dir)  # fmt: skip
        _check(self.max_concurrency >= 1, "reward.judge.max_concurrency", "an integer >= 1", self.max_concurrency)
        _check(self.max_model_len >= 1, "reward.judge.max_model_len", "an integer >= 1", self.max_model_len)
        _check(self.image_format in ("png", "jpeg"), "reward.judge.image_format", "png | jpeg", self.image_format)
        _check(self.startup_timeout_s > 0, "reward.judge.startup_timeout_s", "a value > 0", self.startup_timeout_s)
        _check(
            self.tensor_parallel_size >= 1,
            "reward.judge.tensor_parallel_size",
            "an integer >= 1",
            self.tensor_parallel_size,
        )


@dataclass(frozen=True)
class RewardConfig:
    SECTION: ClassVar[str] = "reward"
    flow_weight: float = _f(0.5, "w_flow in R = w_flow*r_flow + w_mllm*r_mllm (0 = flow model never loaded)")
    judge_weight: float = _f(0.5, "w_mllm (0 = judge never started)")
    batch_pairs: int = _f(32, "candidate pairs a reward worker gathers across groups before one flow call")
    max_wait_ms: float = _f(20.0, "longest a reward worker waits to fill a batch")
    flow: FlowRewardConfig = field(default_factory=FlowRewardConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.flow_weight >= 0, "reward.flow_weight", "a value >= 0", self.flow_weight)
        _check(self.judge_weight >= 0, "reward.judge_weight", "a value >= 0", self.judge_weight)
        _check(
            self.flow_weight + self.judge_weight > 0,
            "reward.flow_weight",
            "flow_weight + judge_weight > 0",
            (self.flow_weight, self.judge_weight),
        )
        _check(self.batch_pairs >= 1, "reward.batch_pairs", "an integer >= 1", self.batch_pairs)
        _check(self.max_wait_ms >= 0, "reward.max_wait_ms", "a value >= 0", self.max_wait_ms)


@dataclass(frozen=True)
class NFTConfig:
    SECTION: ClassVar[str] = "nft"
    beta: float = _f(1.0, "mixing of v_theta and v_old in the implicit policies v+ / v-")
    adv_clip_max: float = _f(
        5.0, "clip of normalised advantages (r = clip(A)/(2*max) + 0.5) and factor of the policy loss (one constant)"
    )
    kl_weight: float = _f(1e-4, "weight of mean((v_theta - v_ref)^2)")
    timestep_fraction: float = _f(0.99, "train on int(fraction * num_steps) grid points per sample")
    group_min_std: float = _f(0.05, "a group trains only if its reward std > this ...")
    group_max_mean: float = _f(0.9, "... and its mean < this; std < min_std and mean > max_mean bans the prompt")
    decay_schedule: str = _f("linear_capped", "old-policy decay d(step): linear_capped | none | delayed")
    ema_cap: float = _f(0.9, "cap of the eval EMA decay min((1+k)/(10+k), cap)")
    lr: float = _f(3e-4, "AdamW learning rate")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    grad_clip: float = _f(1.0, "max global grad norm")
    full_finetune: bool = _f(False, "train all transformer weights instead of a LoRA adapter")
    lora_rank: int = _f(32, "LoRA rank r")
    lora_alpha: int = _f(64, "LoRA alpha")
    lora_targets: tuple[str, ...] = _f(LORA_TARGETS, "module names that get LoRA")
    reference_forwards: str = _f(
        "learner", "where v_old / v_ref are computed: learner | rollout (the rollout's behaviour policy, DESIGN §6)"
    )
    invert_reward: bool = _f(
        False, "control experiment: train on 1 - r (r = optimality); the policy should then get WORSE (issue 6)"
    )

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.beta > 0, "nft.beta", "a value > 0", self.beta)
        _check(self.adv_clip_max > 0, "nft.adv_clip_max", "a value > 0", self.adv_clip_max)
        _check(0 < self.timestep_fraction <= 1, "nft.timestep_fraction", "a value in (0, 1]", self.timestep_fraction)
        _check(
            self.decay_schedule in ("linear_capped", "none", "delayed"),
            "nft.decay_schedule",
            "linear_capped | none | delayed",
            self.decay_schedule,
        )
        _check(0 <= self.ema_cap < 1, "nft.ema_cap", "a value in [0, 1)", self.ema_cap)
        _check(self.lr > 0, "nft.lr", "a value > 0", self.lr)
        _check(
            0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
            "nft.adam_beta1",
            "betas in [0, 1)",
            (self.adam_beta1, self.adam_beta2),
        )
        _check(self.grad_clip > 0, "nft.grad_clip", "a value > 0", self.grad_clip)
        _check(self.lora_rank >= 1, "nft.lora_rank", "an integer >= 1", self.lora_rank)
        _check(self.lora_alpha >= 1, "nft.lora_alpha", "an integer >= 1", self.lora_alpha)
        _check(len(self.lora_targets) > 0, "nft.lora_targets", "a non-empty list of module names", self.lora_targets)
        _check(
            not (self.full_finetune and self.reference_forwards == "rollout"),
            "nft.reference_forwards",
            "'learner' with nft.full_finetune (a full-weight rollout holds no base model for v_ref)",
            self.reference_forwards,
        )
        _check(
            self.reference_forwards in ("learner", "rollout"),
            "nft.reference_forwards",
            "learner | rollout",
            self.reference_forwards,
        )


@dataclass(frozen=True)
class LearnerConfig:
    SECTION: ClassVar[str] = "learner"
    micro_batch: int = _f(
        4, "samples per forward/backward on one rank (gradients accumulate over the step); 0: from the GPU's free "
        "memory, probed at 1 and 2 samples on the first step (learner/trainer/memory.py)"
    )  # fmt: skip
    memory_fraction: float = _f(0.9, "with learner.micro_batch 0: the share of free GPU memory the learner plans on")
    activation_checkpointing: bool = _f(False, "recompute transformer blocks in backward (less memory, ~1.4x time)")
    backend: str = _f("auto", "torch.distributed backend: auto (nccl on GPU, gloo on CPU) | gloo | nccl")
    steps: int = _f(300, "training steps")
    seed: int = _f(0, "seed of timesteps and training noise")
    compile: bool = _f(False, "regional compilation of the transformer blocks for the learner's forwards/backward")
    cudnn_sdpa: bool = _f(
        False, "allow the cuDNN SDPA attention backend in training (it crashes in the backward on torch 2.11 + CUDA 13)"
    )
    max_recoveries: int = _f(
        3, "times within learner.recovery_window_s a run rebuilds its learner group after a rank dies and goes on "
        "from the latest checkpoint, in the same process (0 = the run ends at the first lost rank)"
    )  # fmt: skip
    recovery_window_s: float = _f(3600.0, "the sliding window (seconds) of learner.max_recoveries")

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.micro_batch >= 0, "learner.micro_batch", "an integer >= 1, or 0 (from free memory)",
               self.micro_batch)  # fmt: skip
        _check(0 < self.memory_fraction <= 1, "learner.memory_fraction", "a value in (0, 1]", self.memory_fraction)
        _check(self.max_recoveries >= 0, "learner.max_recoveries", "an integer >= 0", self.max_recoveries)
        _check(self.recovery_window_s > 0, "learner.recovery_window_s", "seconds > 0", self.recovery_window_s)
        _check(self.backend in ("auto", "gloo", "nccl"), "learner.backend", "auto | gloo | nccl", self.backend)
        _check(self.steps >= 1, "learner.steps", "an integer >= 1", self.steps)


@dataclass(frozen=True)
class CheckpointConfig:
    SECTION: ClassVar[str] = "checkpoint"
    dir: str = _f("runs/default/checkpoints", "local dir or s3://bucket/prefix for sharded checkpoints")
    every: int = _f(25, "save every N steps (and at the end); 0 = only at the end")
    keep: int = _f(3, "complete checkpoints kept (older ones deleted)")
    export_lora: bool = _f(
        True, "also write the eval-EMA weights for diffusers: lora/ (LoRA) or transformer/ (full fine-tuning)"
    )
    shared_fs: bool = _f(
        False, "a local dir is on a filesystem every node mounts at the same path (NFS, a PVC); without it a "
        "local dir is refused when a learner rank runs on another node than the driver (use s3://)"
    )  # fmt: skip
    s3_retries: int = _f(
        4, "s3:// dir: retries of each upload/download/delete of a checkpoint on transient errors (connection, "
        "5xx, throttling), on top of botocore's quick per-request retries; credential/access errors never retry"
    )  # fmt: skip
    s3_backoff_s: float = _f(2.0, "s3:// dir: wait before the first of those retries; doubles per retry (jittered)")

    def __post_init__(self) -> None:
        _check_finite(self)
        _check_dir("checkpoint.dir", self.dir, s3=True)
        _check(self.every >= 0, "checkpoint.every", "an integer >= 0", self.every)
        _check(self.keep >= 1, "checkpoint.keep", "an integer >= 1", self.keep)
        _check(self.s3_retries >= 0, "checkpoint.s3_retries", "an integer >= 0", self.s3_retries)
        _check(self.s3_backoff_s >= 0, "checkpoint.s3_backoff_s", "a value >= 0", self.s3_backoff_s)


@dataclass(frozen=True)
class ClusterConfig:
    SECTION: ClassVar[str] = "cluster"
    address: str = _f("", "Ray address; empty = RAY_ADDRESS when set (ray job submit), else a local cluster")
    num_cpus: int = _f(0, "CPUs of a local cluster (0 = all)")
    rollout_workers: int = _f(1, "rollout actors at the start (the pool's size unless it is elastic; a resumed "
                              "elastic pool then regrows at once to its size at the checkpoint)")  # fmt: skip
    rollout_workers_min: int = _f(0, "elastic rollout pool: fewest rollout actors (0 = cluster.rollout_workers)")
    rollout_workers_max: int = _f(
        0, "elastic rollout pool: most rollout actors (0 = cluster.rollout_workers); above the minimum the driver "
        "adds a worker while the learner waits on rollouts and removes one while rollouts idle; on an autoscaling "
        "cluster the autoscaler adds and removes the nodes for them"
    )  # fmt: skip
    rollout_grow_wait: float = _f(
        0.5, "grow the rollout pool by one worker when the driver waited on rollouts more than this fraction of a "
        "step, cluster.rollout_scale_patience steps in a row (0.5: rollouts, not training, set the pace)"
    )  # fmt: skip
    rollout_shrink_busy: float = _f(
        0.3, "shrink the rollout pool by one worker when its workers sampled less than this fraction of a step, "
        "cluster.rollout_scale_patience steps in a row; with 0.5 above, one worker more or less never flips the "
        "decision back"
    )  # fmt: skip
    rollout_scale_patience: int = _f(2, "steps in a row a grow or shrink condition must hold before the pool changes")
    rollout_join_timeout_s: float = _f(
        900.0, "a rollout worker added to an elastic pool that has not joined (placed, loaded, parity checked) after "
        "this many seconds is given up, so a cluster at its node limit does not freeze the pool's scaling"
    )  # fmt: skip

    @property
    def rollout_bounds(self) -> tuple[int, int]:
        """(fewest, most) rollout workers: both cluster.rollout_workers unless the pool is elastic."""
        return self.rollout_workers_min or self.rollout_workers, self.rollout_workers_max or self.rollout_workers

    rollout_gpus: float = _f(1.0, "GPUs per rollout actor (0 on CPU)")
    reward_workers: int = _f(1, "reward actors (flow model + judge client)")
    reward_gpus: float = _f(1.0, "GPUs per reward actor, for RAFT (0 on CPU)")
    judge_replicas: int = _f(1, "vLLM judge replicas started by the service (when reward.judge.url is empty)")
    judge_gpus: float = _f(1.0, "GPUs per judge replica (= tensor_parallel_size on GPU; 0 on CPU)")
    learner_ranks: int = _f(1, "learner actors, one torch.distributed rank each (FSDP2 shards over them)")
    learner_gpus: float = _f(1.0, "GPUs per learner rank (0 on CPU)")
    cpus_per_actor: float = _f(1.0, "CPUs reserved by each actor")
    learner_resources: dict[str, float] = _f({}, "custom Ray resources each learner rank asks for (places it on "
                                              "the node type that offers them, e.g. {learner_node: 1})")
    rollout_resources: dict[str, float] = _f({}, "custom Ray resources each rollout actor asks for")
    reward_resources: dict[str, float] = _f({}, "custom Ray resources each reward actor asks for")
    judge_resources: dict[str, float] = _f({}, "custom Ray resources each judge replica asks for")
    node_types: dict[str, dict[str, float]] = _f(
        {}, "resources of each node type the autoscaler may add, name -> {CPU, GPU, custom}; start-up checks "
        "every pool's ask against these and the nodes alive (empty: against the nodes alive only)"
    )  # fmt: skip
    worker_crashes: int = _f(
        10, "crashes one rollout or reward worker may have within cluster.crash_window_s; Ray restarts it without "
        "a lifetime limit and its groups are re-queued, but one crash more stops the run (a crash loop)"
    )  # fmt: skip
    crash_window_s: float = _f(3600.0, "the sliding window (seconds) of cluster.worker_crashes")
    metrics_export_port: int = _f(
        0, "port of a local cluster's Prometheus endpoint (Ray and motionnft_* metrics, on 127.0.0.1; 0 = a free "
        "port Ray picks, printed at start); a real cluster's nodes set theirs with ray start --metrics-export-port"
    )  # fmt: skip

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.worker_crashes >= 0, "cluster.worker_crashes", "an integer >= 0", self.worker_crashes)
        _check(self.crash_window_s > 0, "cluster.crash_window_s", "seconds > 0", self.crash_window_s)
        for section in ("learner", "rollout", "reward", "judge"):
            for name, amount in getattr(self, f"{section}_resources").items():
                what = "a custom resource >= 0 (CPU and GPU asks are cluster.cpus_per_actor and cluster.*_gpus)"
                _check(amount >= 0 and name not in ("CPU", "GPU"), f"cluster.{section}_resources.{name}", what, amount)
        for name, resources in self.node_types.items():
            for r, amount in resources.items():
                _check(amount >= 0, f"cluster.node_types.{name}.{r}", "a value >= 0", amount)
        for key in ("rollout_workers", "reward_workers", "learner_ranks"):
            _check(getattr(self, key) >= 1, f"cluster.{key}", "an integer >= 1", getattr(self, key))
        _check(0 <= self.rollout_workers_min <= self.rollout_workers, "cluster.rollout_workers_min",
               f"an integer from 1 to cluster.rollout_workers ({self.rollout_workers}), or 0", self.rollout_workers_min)
        _check(self.rollout_bounds[1] >= self.rollout_workers, "cluster.rollout_workers_max",
               f"an integer >= cluster.rollout_workers ({self.rollout_workers}), or 0", self.rollout_workers_max)
        _check(0 < self.rollout_grow_wait <= 1, "cluster.rollout_grow_wait", "a fraction in (0, 1]",
               self.rollout_grow_wait)
        _check(0 <= self.rollout_shrink_busy < 1, "cluster.rollout_shrink_busy", "a fraction in [0, 1)",
               self.rollout_shrink_busy)
        _check(self.rollout_scale_patience >= 1, "cluster.rollout_scale_patience", "an integer >= 1",
               self.rollout_scale_patience)
        _check(self.rollout_join_timeout_s > 0, "cluster.rollout_join_timeout_s", "seconds > 0",
               self.rollout_join_timeout_s)
        _check(self.judge_replicas >= 0, "cluster.judge_replicas", "an integer >= 0", self.judge_replicas)
        for key in ("rollout_gpus", "reward_gpus", "judge_gpus", "learner_gpus", "cpus_per_actor"):
            _check(getattr(self, key) >= 0, f"cluster.{key}", "a value >= 0", getattr(self, key))
        _check(self.num_cpus >= 0, "cluster.num_cpus", "an integer >= 0", self.num_cpus)
        _check(0 <= self.metrics_export_port <= 65535, "cluster.metrics_export_port", "a port from 1 to 65535, or 0",
               self.metrics_export_port)  # fmt: skip


@dataclass(frozen=True)
class LoggingConfig:
    SECTION: ClassVar[str] = "logging"
    dir: str = _f("runs/default", "run dir: resolved config, metrics.jsonl, TensorBoard events, plots")
    every: int = _f(1, "print a metrics line every N steps")
    tensorboard: bool = _f(True, "write TensorBoard event files under <logging.dir>/tensorboard (every scalar)")
    image_every: int = _f(50, "every N steps, an image grid per logged group in TensorBoard (0 = none)")
    image_groups: int = _f(2, "groups shown per image grid step: input | candidates by reward | target")
    image_size: int = _f(128, "pixel height of each tile of the image grid")

    def __post_init__(self) -> None:
        _check_finite(self)
        _check_dir("logging.dir", self.dir, s3=False)
        _check(self.every >= 1, "logging.every", "an integer >= 1", self.every)
        for key in ("image_every", "image_groups"):
            _check(getattr(self, key) >= 0, f"logging.{key}", "an integer >= 0", getattr(self, key))
        _check(self.image_size >= 8, "logging.image_size", "an integer >= 8", self.image_size)


@dataclass(frozen=True)
class DemoConfig:
    """The CPU learning demo (configs/learn_demo.yaml): data and a warm-started policy built by the run itself."""

    SECTION: ClassVar[str] = "demo"
    enabled: bool = _f(
        False, "build the demo data + warm-started demo pipeline (motionnft_core.models.warmstart) and train them"
    )
    examples: int = _f(400, "synthetic examples of the demo motion (train + held out, data.eval_fraction)")
    motion: str = _f("right", "motion kind of every example: right | left | up | down | translate | any")
    model_seed: int = _f(0, "seed of the random demo pipeline before its warm start")
    vae_steps: int = _f(600, "warm start: autoencoder steps")
    vae_lr: float = _f(2e-3, "warm start: autoencoder learning rate")
    vae_batch: int = _f(16, "warm start: autoencoder batch")
    steps: int = _f(400, "warm start: flow-matching steps of the transformer")
    lr: float = _f(3e-3, "warm start: flow-matching learning rate")
    batch: int = _f(32, "warm start: flow-matching batch")
    noop_fraction: float = _f(0.6, "warm start: share of flow-matching targets that are the input (a no-op edit)")
    warmup: int = _f(20, "warm start: linear learning-rate warm-up steps of both stages")
    weight_decay: float = _f(0.0, "warm start: AdamW weight decay of both stages")
    grad_clip: float = _f(1.0, "warm start: max global grad norm of both stages")
    seed: int = _f(0, "warm start: seed of batches and noise")

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.motion in DEMO_MOTIONS, "demo.motion", f"one of {DEMO_MOTIONS}", self.motion)
        _check(self.examples >= 2, "demo.examples", "an integer >= 2", self.examples)
        for key in ("vae_steps", "steps", "warmup"):
            _check(getattr(self, key) >= 0, f"demo.{key}", "an integer >= 0", getattr(self, key))
        _check(self.weight_decay >= 0, "demo.weight_decay", "a value >= 0", self.weight_decay)
        for key in ("vae_lr", "lr", "vae_batch", "batch", "grad_clip"):
            _check(getattr(self, key) > 0, f"demo.{key}", "a value > 0", getattr(self, key))
        _check(0 <= self.noop_fraction < 1, "demo.noop_fraction", "a value in [0, 1)", self.noop_fraction)


@dataclass(frozen=True)
class EvalConfig:
    """MotionEdit-Bench evaluation (issue 14, DESIGN §8). The paper publishes the MAS formula but not α, τ,
    d_min, d_max: their defaults carry over the published MotionNFT training scorer's constants
    (elainew728/motion-edit train/flow_grpo/motionedit_scorer.py), the closest published use of the same terms."""

    SECTION: ClassVar[str] = "eval"
    num_steps: int = _f(28, "sampling steps of the evaluation edits (the paper's protocol; training uses rollout.*)")
    seed: int = _f(42, "noise seed of every evaluation edit (the paper's protocol: one seed, the same for each row)")
    kontext_guidance: float = _f(2.5, "FLUX.1 Kontext: distilled guidance of the evaluation edits (its pipeline's "
                                 "default, the paper's protocol)")  # fmt: skip
    qwen_true_cfg: float = _f(
        4.0, "Qwen-Image-Edit: true CFG scale of the evaluation edits (the paper's protocol; guidance 1.0); <= 1 = off"
    )
    negative_prompt: str = _f(" ", "Qwen-Image-Edit: negative prompt of true CFG (diffusers' examples use \" \")")
    chunk_rows: int = _f(8, "edits scored per chunk written: a crash loses at most this many scored rows per policy")
    mas_alpha: float = _f(
        0.7, "α in D = α·D_mag + (1 − α)·D_dir: the reference scorer weighs L_q 0.7 against 0.2 direction + 0.1 "
        "movement hinge; MAS has no hinge (its 0.01 ratio rule replaces it), so direction takes the other 0.3"
    )  # fmt: skip
    mas_tau: float = _f(
        0.002, "τ: |V_gt| (diagonal-normalised) above which a pixel weighs in D_dir; the reference scorer's "
        "direction mask threshold (mthr = 0.002, about 1.4 px at 512²)"
    )  # fmt: skip
    mas_d_min: float = _f(
        1e-6**0.4, "d_min of the MAS clip: ε^0.4, the D_mag of a perfect match (the reference scorer's lower bound, "
        "the L_q of the target against itself), so a perfect edit scores MAS 100"
    )  # fmt: skip
    mas_d_max: float = _f(1.0, "d_max of the MAS clip: the reference scorer's upper bound (max_loss = 1.0)")
    mas_eps: float = _f(1e-6, "ε of D_mag, of D_dir's Σw + ε and of unit vectors V / max(|V|, ε): the reference's eps")
    mas_q: float = _f(0.4, "exponent of D_mag = mean((|V_pred − V_gt| + ε)^q): 0.4 in the published MAS formula")
    mas_min_motion_ratio: float = _f(
        0.01, "MAS = 0 when mean|V_pred| / mean|V_gt| is below this (published: an edit that does not move)"
    )
    chunk_retries: int = _f(
        3, "times a chunk of the comparison is sampled and scored again after it lost a worker (Ray restarts it; "
        "the restarted worker loads the checkpoint again before it edits)"
    )  # fmt: skip
    worker_wait_s: float = _f(600.0, "how long a comparison waits for a lost worker to be back before it gives up")
    pairwise: bool = _f(
        False, "also ask the judge which of the two edits of a row is better, the baseline's or the candidate's, "
        "in both orders (position bias cancels; rewards/pairwise.py): 2 more judge calls per row, with three "
        "images each (raise reward.judge.max_model_len to fit them: Qwen2.5-VL at 1024² needs about 4,300 tokens)"
    )  # fmt: skip
    tie_margin: float = _f(
        0.0, "candidate and baseline scores this close (|Δ| <= margin) tie, on Overall and on MAS (and a side-by-side "
        "preference this close to 0.5); 0 = only equal scores tie, the paper's rule as stated"
    )  # fmt: skip
    bootstrap_samples: int = _f(
        10000, "resamples of the rows for the bootstrap intervals (percentile method): 10x the 1,000 usually "
        "quoted as enough for 95 % percentile bounds, and cheap (~3 s for every metric and category of 1,015 rows)"
    )  # fmt: skip
    bootstrap_seed: int = _f(0, "seed of the bootstrap resampling (the intervals are deterministic given it)")
    confidence: float = _f(0.95, "coverage of the bootstrap intervals (percentile method)")
    every: int = _f(
        0, "during training, every N steps: MAS, its win rate against the base policy and the rubric "
        "Overall (runs with a judge) of the evaluation edits of eval.during_rows held-out rows by the step's eval "
        "EMA (what its checkpoint exports), logged as eval/* with the step; 0 = off"
    )  # fmt: skip
    during_rows: int = _f(
        8, "held-out rows (the first of the run's held-out split) evaluated every eval.every steps: each costs "
        "eval.num_steps forwards on a rollout worker; the base policy's are sampled once per run (a LoRA run's with "
        "its first evaluation, a full fine-tune's before its first step) and carried by checkpoints"
    )  # fmt: skip

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.num_steps >= 1, "eval.num_steps", "an integer >= 1", self.num_steps)
        _check(self.every >= 0, "eval.every", "an integer >= 0 (0 = off)", self.every)
        _check(self.during_rows >= 1, "eval.during_rows", "an integer >= 1", self.during_rows)
        _check(self.kontext_guidance >= 0, "eval.kontext_guidance", "a value >= 0", self.kontext_guidance)
        _check(self.qwen_true_cfg >= 0, "eval.qwen_true_cfg", "a value >= 0", self.qwen_true_cfg)
        _check(bool(self.negative_prompt), "eval.negative_prompt", "a non-empty string (\" \" is fine)",
               self.negative_prompt)  # fmt: skip
        _check(self.chunk_rows >= 1, "eval.chunk_rows", "an integer >= 1", self.chunk_rows)
        _check(0.0 <= self.mas_alpha <= 1.0, "eval.mas_alpha", "a value in [0, 1]", self.mas_alpha)
        _check(self.mas_tau >= 0, "eval.mas_tau", "a value >= 0", self.mas_tau)
        _check(self.mas_eps > 0, "eval.mas_eps", "a value > 0", self.mas_eps)
        _check(self.mas_q > 0, "eval.mas_q", "a value > 0", self.mas_q)
        _check(self.mas_d_min >= 0, "eval.mas_d_min", "a value >= 0", self.mas_d_min)
        _check(self.mas_d_max > self.mas_d_min, "eval.mas_d_max", f"a value > eval.mas_d_min ({self.mas_d_min})",
               self.mas_d_max)  # fmt: skip
        _check(self.mas_min_motion_ratio >= 0, "eval.mas_min_motion_ratio", "a value >= 0", self.mas_min_motion_ratio)
        _check(self.tie_margin >= 0, "eval.tie_margin", "a value >= 0", self.tie_margin)
        _check(self.chunk_retries >= 0, "eval.chunk_retries", "an integer >= 0", self.chunk_retries)
        _check(self.worker_wait_s > 0, "eval.worker_wait_s", "a value > 0", self.worker_wait_s)
        _check(self.bootstrap_samples >= 1, "eval.bootstrap_samples", "an integer >= 1", self.bootstrap_samples)
        _check(0.0 < self.confidence < 1.0, "eval.confidence", "a value in (0, 1)", self.confidence)


@dataclass(frozen=True)
class Config:
    SECTION: ClassVar[str] = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def samples_per_step(self) -> int:
        return self.rollout.prompts_per_step * self.rollout.group_size


def validate(cfg: Config) -> None:
    """Checks that need more than one field or section (each section checks its own ranges)."""
    if cfg.demo.enabled:
        _validate_demo(cfg)
    else:
        _check(
            bool(cfg.model.path) or cfg.model.tiny,
            "model.path",
            "a local dir or s3:// URI (or model.tiny=true)",
            cfg.model.path,
        )
        _check(
            bool(cfg.data.source) or cfg.data.synthetic > 0,
            "data.source",
            "a path/URI (or data.synthetic > 0)",
            cfg.data.source,
        )
    if cfg.reward.judge_weight > 0:
        j = cfg.reward.judge
        _check(
            bool(j.url or j.model_path or j.tiny),
            "reward.judge.url",
            "an endpoint URL, a reward.judge.model_path or reward.judge.tiny=true when reward.judge_weight > 0",
            j.url,
        )
        _check(
            bool(j.url) or cfg.cluster.judge_replicas >= 1,
            "cluster.judge_replicas",
            ">= 1 when the service starts the judge (reward.judge.url empty)",
            cfg.cluster.judge_replicas,
        )
        gpus = cfg.cluster.judge_gpus
        _check(
            bool(j.url) or gpus == 0 or gpus == j.tensor_parallel_size,
            "cluster.judge_gpus",
            f"= reward.judge.tensor_parallel_size ({j.tensor_parallel_size}): vLLM runs one tensor-parallel rank "
            "per GPU of its replica (0 on CPU)",
            gpus,
        )
    if cfg.model.tiny and cfg.model.path:
        raise ConfigError("model.tiny: set either model.path or model.tiny=true, not both")
    _check(cfg.learner.micro_batch >= 1 or cfg.cluster.learner_gpus > 0, "learner.micro_batch",
           "an integer >= 1 when cluster.learner_gpus is 0 (0 measures GPU memory)", cfg.learner.micro_batch)
    _check(not cfg.rollout.fp8_reference or cfg.nft.reference_forwards == "rollout", "rollout.fp8_reference",
           "false unless nft.reference_forwards is rollout (the learner's reference forwards stay full precision)",
           cfg.rollout.fp8_reference)  # fmt: skip
    _check(cfg.eval.every == 0 or cfg.data.eval_fraction > 0, "eval.every",
           "0 when data.eval_fraction is 0 (the evaluation during training needs held-out rows)", cfg.eval.every)


def _validate_demo(cfg: Config) -> None:
    """The demo builds its own data and pipeline; a run may not also name others (which would be ignored)."""
    given = (
        ("model.path", cfg.model.path, ""),
        ("model.tiny", cfg.model.tiny, False),
        ("data.source", cfg.data.source, ""),
        ("data.synthetic", cfg.data.synthetic, 0),
    )
    for key, value, empty in given:
        _check(value == empty, key, f"{empty!r} with demo.enabled=true (the demo builds its own data and model)", value)
    _check(cfg.model.family == "flux_kontext", "model.family", "flux_kontext for the demo", cfg.model.family)
    r = cfg.rollout
    _check(r.height == r.width, "rollout.width", f"= rollout.height ({r.height}) for the square demo images", r.width)


# --------------------------------------------------------------------------------------------------------------
# Loading: YAML -> nested dict -> dataclasses, with dotted overrides and type checks that name the key.


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Type-check one leaf; ints are accepted for floats, lists for tuples, nothing else is converted. Floats
    must be finite (YAML `.inf`/`.nan`, `1e999`)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, arg, value)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {
            _coerce(f"{key} (a key)", key_tp, k): _coerce(f"{key}.{k}", value_tp, v)
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            number = float(value)  # PyYAML reads `1e-4` (no dot) as a string; it is plainly a number
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        else:
            try:
                number = float(value)
            except OverflowError:  # an int beyond float range
                number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"{key}: unknown key{hint}")
        tp = hints[name]
        kwargs[name] = _build(tp, value, f"{key}.") if _is_section(tp) else _coerce(key, tp, value)
    return cls(**kwargs)  # keys left out keep their defaults


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (plain PyYAML keeps the last silently), at
    any depth; the error names the dotted key and the lines. `root` prefixes the keys (an override's key)."""

    root = ""

    def construct_document(self, node: yaml.Node) -> Any:
        self._paths: dict[int, str] = {}
        self._name_paths(node, self.root, set())
        return super().construct_document(node)

    def _name_paths(self, node: yaml.Node, path: str, seen: set[int]) -> None:
        """Dotted path of every collection node (`reward.flow`, `nft.lora_targets[0]`), before any is built."""
        if id(node) in seen:  # an alias of a node already named
            return
        seen.add(id(node))
        self._paths[id(node)] = path
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                self._name_paths(value_node, f"{path}.{name}" if path else str(name), seen)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._name_paths(item, f"{path}[{i}]", seen)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        path = self._paths.get(id(node), "")
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges; its keys may be overridden here, as YAML intends
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first_line.get(key)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            line = key_node.start_mark.line + 1
            if earlier is not None:
                dotted = f"{path}.{key}" if path else str(key)
                source = key_node.start_mark.name  # a file's name; "<unicode string>" for an override's value
                where = "" if source.startswith("<") else f" at line {line} of {source} (first at line {earlier})"
                raise ConfigError(f"{dotted}: duplicate key{where}; give each key once")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(stream: Any, root: str = "") -> Any:
    """`yaml.safe_load` that refuses duplicate keys (`_StrictLoader`)."""
    loader = _StrictLoader(stream)
    loader.root = root
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`rollout.group_size=4` -> ('rollout.group_size', 4); the value is parsed as a YAML literal."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. rollout.group_size=4")
    key, raw = text.split("=", 1)
    try:
        value = _load_yaml(raw, key.strip()) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from e
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides, then per-section and cross-section validation."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            with p.open("rb") as stream:  # a file stream: YAML marks (and duplicate-key errors) carry its name
                loaded = _load_yaml(stream) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r}: expected a mapping of sections at the top level")
        tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def load_config_or_exit(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """`load_config` for command lines: a bad config prints one line naming the key and exits with status 2,
    as argparse does for a bad flag (never a traceback)."""
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON dumps and checkpoints."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def config_from_dict(tree: dict[str, Any]) -> Config:
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per key: dotted name, type, default and help (for `--help`)."""
    lines: list[str] = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        value = getattr(defaults, f.name)
        if _is_section(tp):
            lines.extend(describe(tp, f"{prefix}{f.name}."))
            continue
        shown = list(value) if isinstance(value, tuple) else value
        tname = getattr(tp, "__name__", str(tp)).replace("typing.", "")
        lines.append(f"  {prefix}{f.name} ({tname}, default {shown!r}): {f.metadata.get('help', '')}")
    return lines
