"""Typed run configuration: one frozen dataclass per section, each field declaring its default, help and bounds.

Every default is the published MotionNFT / DiffusionNFT value (docs/algorithm.md) unless its help
says otherwise; the reasoning behind the less obvious ones is in docs/config-notes.md. Errors name the dotted key
(`rollout.group_size`) and what was expected, so a bad run fails at start-up, not inside a worker. Reading YAML
and overrides is `motionnft_core.config_loader`'s job. This is the one module every package may import.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from motionnft_core.family_registry import FAMILIES


class ConfigError(ValueError):
    """A config key is unknown, of the wrong type or out of range; the message names the dotted key."""


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


# --------------------------------------------------------------------------------------------------------------
# Declared bounds. A small checker of our own rather than pydantic: the sections are frozen stdlib dataclasses
# that every role builds in code, pickles to Ray actors and compares, pydantic is no dependency of ours (only
# vLLM's, on the judge's side), and the error texts below are pinned by tests and read by users as they are.


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


@dataclass(frozen=True)
class Rule:
    """What one field accepts. Bounds and choices apply to the value, or to every number inside a mapping
    (reported as `section.key.name`); `check` is a named test for what bounds cannot say (paths)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    multiple_of: int | None = None
    choices: tuple[Any, ...] | None = None
    keys: tuple[str, ...] | None = None  # a mapping's allowed keys
    non_empty: bool = False
    check: Callable[[str, Any], None] | None = None  # (dotted key, value); raises ConfigError
    noun: str | None = None  # "an integer" / "a value" by the field's type, unless given
    expected: str | None = None  # the whole expectation, where the derived text would say less

    def expectation(self, integer: bool) -> str:
        """`expected ...` text of the error: `an integer >= 1`, `a value in [0, 1)`, `a multiple of 16 >= 16`."""
        if self.expected is not None:
            return self.expected
        if self.choices is not None:
            return " | ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in self.choices)
        noun = self.noun or ("an integer" if integer else "a value")
        if self.multiple_of is not None:
            noun = f"a multiple of {self.multiple_of}"
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        high = ("]", self.le) if self.le is not None else (")", self.lt) if self.lt is not None else None
        if low and high:
            return f"{noun} in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
        if low:
            return f"{noun} {'>=' if low[0] == '[' else '>'} {_num(low[1])}"
        if high:
            return f"{noun} {'<=' if high[0] == ']' else '<'} {_num(high[1])}"
        return noun

    def accepts(self, value: Any) -> bool:
        if self.choices is not None and not any(type(value) is type(c) and value == c for c in self.choices):
            return False
        if self.non_empty and len(value) == 0:
            return False
        if self.multiple_of is not None and value % self.multiple_of:
            return False
        return not (
            (self.ge is not None and not value >= self.ge)
            or (self.gt is not None and not value > self.gt)
            or (self.le is not None and not value <= self.le)
            or (self.lt is not None and not value < self.lt)
        )

    def apply(self, key: str, value: Any, integer: bool) -> None:
        """Raise ConfigError naming `key` (or `key.name` inside a mapping) unless `value` is accepted."""
        if self.check is not None:
            self.check(key, value)
        if isinstance(value, dict) and self.keys is not None:
            for name in value:
                _check(name in self.keys, key, f"keys among {self.keys}", name)
        self._leaves(key, value, integer)

    def _leaves(self, key: str, value: Any, integer: bool) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                self._leaves(f"{key}.{name}", item, integer=False)
        else:
            _check(self.accepts(value), key, self.expectation(integer), value)


def _f(default: Any, help: str, **rule: Any) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field: its default, a short help for `--help`, and what it accepts (`Rule`'s keywords:
    ge=, gt=, le=, lt=, multiple_of=, choices=, keys=, non_empty=, check=, noun=, expected=). Tuples rather than
    lists; a dict default is copied per instance. Floats must be finite (no .inf / .nan), anywhere."""
    metadata = {"help": help, "rule": Rule(**rule)}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _check_finite(section: Any) -> None:
    """Every float of a section (also inside its dicts and lists) is finite:
    a section built in code fails like a parsed one (the loader already refuses them in YAML and overrides)."""

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


def check_fields(section: Any) -> None:
    """The one walk over a section's declared rules: finite floats, then each field's `Rule` under its dotted key."""
    _check_finite(section)
    prefix = f"{section.SECTION}." if section.SECTION else ""
    for f in dataclasses.fields(section):
        rule = f.metadata.get("rule")
        if rule is not None:
            rule.apply(f"{prefix}{f.name}", getattr(section, f.name), integer=f.type in ("int", int))


class _Section:
    """Base of the sections: building one checks its declared rules; `_check_related` adds cross-field checks."""

    SECTION: ClassVar[str]

    def __post_init__(self) -> None:
        check_fields(self)
        self._check_related()

    def _check_related(self) -> None:
        """Checks relating several fields of the section (none by default)."""


def _dir(*, s3: bool) -> Callable[[str, Any], None]:
    """A directory the run writes: not empty; an s3:// URI (when allowed) needs a bucket name."""

    def check(key: str, value: str) -> None:
        _check(bool(value.strip()), key, "a local dir" + (" or s3://bucket/prefix" if s3 else "") + ", not empty",
               value)  # fmt: skip
        if value.startswith("s3://"):
            _check(s3, key, "a local dir (not s3://: it is written with local file I/O)", value)
            bucket = value[len("s3://") :].partition("/")[0]
            _check(bool(bucket.strip()), key, "s3://bucket/prefix with a bucket name", value)

    return check


def _absolute_or_empty(key: str, value: str) -> None:
    _check(not value or Path(value).is_absolute(), key, "an absolute path (it is used on the judge's node), or empty",
           value)  # fmt: skip


def _custom_resources(key: str, value: dict[str, float]) -> None:
    what = "a custom resource >= 0 (CPU and GPU asks are cluster.cpus_per_actor and cluster.*_gpus)"
    for name, amount in value.items():
        _check(amount >= 0 and name not in ("CPU", "GPU"), f"{key}.{name}", what, amount)


DEMO_FAMILIES = ("flux_kontext",)  # the demo's warm start fits a Kontext pipeline (motionnft_core/models/demo.py)
DTYPES = ("float32", "bfloat16", "float16")
FLOW_ESTIMATORS = ("raft_large", "raft_small", "dis", "farneback")
DEMO_MOTIONS = ("right", "left", "up", "down", "translate", "any")  # a translation direction, any translation, any
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass(frozen=True)
class ModelConfig(_Section):
    SECTION: ClassVar[str] = "model"
    family: str = _f("flux_kontext", f"policy family: {' | '.join(FAMILIES)} (motionnft_core/family_registry.py)",
                     choices=FAMILIES, expected=f"one of {FAMILIES}")  # fmt: skip
    path: str = _f("", "pipeline dir (save_pretrained layout) or s3://bucket/prefix; empty needs model.tiny=true")
    tiny: bool = _f(False, "build a tiny random-weight pipeline offline into cache_dir and train that")
    random_layers: int = _f(0, "if > 0: build a random-weight pipeline at the family's real widths with at most this "
                            "many transformer blocks of each kind and 1-layer text encoders, offline into "
                            "cache_dir, and train that (a whole run on one GPU, bench/README.md)", ge=0)  # fmt: skip
    dtype: str = _f("bfloat16", "weights/compute dtype of rollouts and learner: float32 | bfloat16 | float16",
                    choices=DTYPES, expected=f"one of {DTYPES}")  # fmt: skip
    guidance: float = _f(2.5, "FLUX Kontext distilled guidance embedding (rollouts and training); Qwen: unused", ge=0)
    max_sequence_length: int = _f(512, "FLUX Kontext: T5 tokens the instruction is padded to (pipeline default)",
                                  ge=1)  # fmt: skip
    text_encoder_offload: bool = _f(False, "FLUX.2: keep the text encoder in CPU memory and stream its layers to the "
                                    "GPU for a prompt not cached ([dev]: a 24 B encoder beside the 32 B transformer "
                                    "does not fit one 80 GB GPU)")  # fmt: skip
    prompt_cache: int = _f(0, "FLUX.2: prompts whose embeddings a policy keeps in CPU memory (LRU), so a prompt seen "
                           "again is not re-encoded; 0 = off", ge=0)  # fmt: skip
    cache_dir: str = _f("~/.cache/motionnft", "where S3 downloads and tiny models are kept")


@dataclass(frozen=True)
class DataConfig(_Section):
    SECTION: ClassVar[str] = "data"
    source: str = _f("", "MotionEdit parquet / JSONL manifest / folder, local or s3://; empty needs data.synthetic")
    synthetic: int = _f(0, "if > 0 and source is empty: generate this many synthetic motion examples and use them",
                        ge=0)  # fmt: skip
    synthetic_size: int = _f(64, "side in pixels of generated synthetic images", ge=16, multiple_of=16)
    synthetic_reference: bool = _f(False, "synthetic examples get a second input image, the object at its destination "
                                   "on a grey canvas (for families that take several input images)")  # fmt: skip
    synthetic_pan_share: float = _f(0.0, "share of generated examples (the demo's data) whose target also has a "
                                    "camera pan of synthetic_pan_pixels (motionnft_core/data/synthetic.py); 0 = off",
                                    ge=0, le=1)  # fmt: skip
    synthetic_pan_pixels: int = _f(3, "the camera pan of those examples, in pixels along one axis", ge=1)
    eval_fraction: float = _f(0.1, "share of examples held out for evaluation (deterministic by id and seed)",
                              ge=0, lt=1)  # fmt: skip
    on_error: str = _f("skip", "a bad row (missing field/file, corrupt image): skip (logged) | raise",
                       choices=("skip", "raise"))  # fmt: skip
    upscale_small: bool = _f(False, "upscale (bilinear, counted) images smaller than rollout.height x width; "
                             "false: such an image is a bad row (data.on_error)", choices=(True, False))  # fmt: skip
    seed: int = _f(0, "seed of the split and of the prompt order")
    split_column: str = _f("", "a column (or JSONL/meta key) whose value, train or eval, puts each row on its side, "
                           "as a curated set records it (split by source video: `split`); data.eval_fraction is "
                           "then unused. Empty: the split by id hash")  # fmt: skip


@dataclass(frozen=True)
class RolloutConfig(_Section):
    SECTION: ClassVar[str] = "rollout"
    group_size: int = _f(8, "K: candidate edits sampled per (image, instruction)",
                         ge=2, expected="K >= 2 (group statistics need 2)")  # fmt: skip
    prompts_per_step: int = _f(24, "P: prompts per training step (P*K samples)", ge=1)
    num_steps: int = _f(6, "DPM-Solver++(2M) steps on the shifted sigma grid linspace(1, 1/n, n)", ge=2)
    height: int = _f(512, "edit height in pixels (multiple of 16)", ge=16, multiple_of=16)
    width: int = _f(512, "edit width in pixels (multiple of 16)", ge=16, multiple_of=16)
    micro_batch: int = _f(8, "candidates per transformer call (several groups share a call)", ge=1)
    max_staleness: int = _f(1, "rollouts may use weights at most this many versions old (0 = on-policy)", ge=0)
    seed: int = _f(0, "base seed; candidate noise is a function of (seed, step, prompt, k)")
    compile: bool = _f(
        False, "regional compilation: torch.compile each repeated transformer block for sampling (bench/README.md)"
    )
    fp8: bool = _f(False, "sample with FP8 matrix products in the transformer blocks (motionnft_core/models/fp8.py); "
                   "needs compute capability >= 8.9")  # fmt: skip
    fp8_reference: bool = _f(False, "also the rollout's reference forwards (v_old, v_ref; nft.reference_forwards: "
                             "rollout) in FP8")  # fmt: skip
    parity_check: bool = _f(True, "after loading each published version, compare the policy with the learner's on a "
                            "fixed probe (motionnft_core/models/parity.py); a mismatch stops that rollout")  # fmt: skip
    parity_tolerance: dict[str, float] = _f(
        {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3},
        "largest parity error allowed per model dtype, relative to the probe output's peak",
        keys=DTYPES, gt=0, noun="a number",
    )


@dataclass(frozen=True)
class FlowEstimatorConfig(_Section):
    """The optical-flow estimator's keys (rewards/flow_model.py), declared once for the two sections that pick one:
    the flow reward (`reward.flow`) and the curation's flow stage (curation/config.py, `flow`). A base, never a
    section of its own. num_updates=12 is torchvision RAFT's default; max_batch is the H100 limit measured in
    bench/README.md."""

    estimator: str = _f("raft_large", "raft_large | raft_small (torchvision RAFT) | dis | farneback (OpenCV, CPU)",
                        choices=FLOW_ESTIMATORS, expected=f"one of {FLOW_ESTIMATORS}")  # fmt: skip
    weights: str = _f("", "RAFT weights file, local or s3://; empty = random init (tests only)")
    num_updates: int = _f(12, "RAFT refinement iterations (torchvision default)", ge=1)
    max_batch: int = _f(32, "pairs per estimator call (at most 32 at 512^2 on H100)", ge=1)


@dataclass(frozen=True)
class FlowRewardConfig(FlowEstimatorConfig):
    """Motion-alignment reward (docs/algorithm.md). Source of every constant's default: the published MotionNFT scorer,
    elainew728/motion-edit train/flow_grpo/motionedit_scorer.py (the paper gives the decomposition, the code the
    numbers); the estimator's keys are FlowEstimatorConfig's."""

    SECTION: ClassVar[str] = "reward.flow"
    cache_size: int = _f(4096, "input->target flows a reward worker keeps (LRU, float32 on the CPU: 2 MiB at 512^2)",
                         ge=0)  # fmt: skip
    q: float = _f(0.4, "exponent of the magnitude error L_q (reference scorer)", gt=0)
    motion_threshold: float = _f(0.002, "m: |V_g| above which a pixel counts for the direction term (reference)",
                                 ge=0)  # fmt: skip
    tau: float = _f(0.01, "movement hinge margin (reference scorer)", ge=0)
    kappa: float = _f(0.5, "movement hinge share of the ground-truth motion (reference scorer)", ge=0)
    w_magnitude: float = _f(0.7, "a: weight of L_q in D (reference scorer)", ge=0)
    w_direction: float = _f(0.2, "b: weight of the direction error in D (reference scorer)", ge=0)
    w_move: float = _f(0.1, "c: weight of the movement hinge in D (reference scorer)", ge=0)
    quantize: bool = _f(True, "round the score to {0, .2, ..., 1} (reference scorer; s itself is logged)")
    camera_compensation: bool = _f(False, "remove each flow's dominant global (camera) motion, a robust affine fit "
                                   "(motionnft_core/global_motion.py), before the terms: the reward compares object "
                                   "motion; logs reward/flow/camera")  # fmt: skip
    camera_penalty: float = _f(0.0, "with camera_compensation: D += this * max(0, the edit's mean camera motion - the "
                               "ground truth's), in image diagonals; 0 = no penalty", ge=0)  # fmt: skip


@dataclass(frozen=True)
class JudgeServingConfig(_Section):
    """The judge's server and client keys (rewards/judge_server.py, rewards/judge.py), declared once for the two
    sections that run a judge: the trainer's (`reward.judge`) and the curation's (curation/config.py, `judge`).
    A base, never a section of its own: its messages name the section that inherits it."""

    url: str = _f("", "existing OpenAI-compatible endpoint (http://host:port/v1); empty = start vLLM replicas")
    model_path: str = _f("", "judge model dir for the replicas the run starts (a Qwen2.5-VL class model; the "
                         "reference: Qwen2.5-VL-32B)")  # fmt: skip
    tiny: bool = _f(False, "build and serve a tiny random Qwen2-VL judge (CPU tests and demos: its verdicts mean "
                    "nothing)")  # fmt: skip
    served_model_name: str = _f("judge", "model name used in requests")
    max_model_len: int = _f(4096, "vLLM context length", ge=1)
    startup_timeout_s: float = _f(300.0, "longest wait for a judge replica the run starts to answer /health", gt=0)
    api_key_env: str = _f("MOTIONNFT_JUDGE_API_KEY", "environment variable holding the judge's API key (never the "
                          "key itself); unset: started replicas get a random key, an external url none")  # fmt: skip
    timeout_s: float = _f(60.0, "per-request timeout", gt=0)
    max_retries: int = _f(3, "retries of a failed/unparseable request before the call fails (transport failures: "
                          "retry_budget_s)", ge=0)  # fmt: skip
    backoff_s: float = _f(0.5, "first retry delay; doubles per retry up to max_backoff_s", ge=0)
    max_backoff_s: float = _f(30.0, "longest wait between two retries, and how long a failing replica is skipped",
                              ge=0)  # fmt: skip
    retry_budget_s: float = _f(600.0, "how long a judge call keeps retrying transport failures across the replicas; "
                               "then reward.judge.on_outage applies", ge=0)  # fmt: skip
    max_concurrency: int = _f(16, "in-flight requests per judge client (each reward worker or judge actor holds "
                              "one)", ge=1)  # fmt: skip
    image_format: str = _f("png", "how images are sent to the judge: png (lossless) | jpeg (smaller requests)",
                           choices=("png", "jpeg"))  # fmt: skip
    structured_output: bool = _f(True, "constrain each answer (a digit, a category) with vLLM structured output; "
                                 "false for servers without it")  # fmt: skip

    def _check_related(self) -> None:
        _check(self.max_backoff_s >= self.backoff_s, f"{self.SECTION}.max_backoff_s",
               f"a value >= {self.SECTION}.backoff_s", self.max_backoff_s)  # fmt: skip


@dataclass(frozen=True)
class JudgeConfig(JudgeServingConfig):
    """The training reward's judge: the shared server and client keys (JudgeServingConfig), then the trainer's."""

    SECTION: ClassVar[str] = "reward.judge"
    mode: str = _f("score", "score: expected digit 0-5 from log-probs (training) | rubric: 3 criteria (eval)",
                   choices=("score", "rubric"))  # fmt: skip
    tensor_parallel_size: int = _f(1, "vLLM tensor parallel size per replica", ge=1)
    on_outage: str = _f("stop", "a group the judge could not score in time: stop (checkpoint, then end the run) | "
                        "drop (leave the group out of the step, counted)", choices=("stop", "drop"))  # fmt: skip
    restart_backoff_s: float = _f(5.0, "a dead replica the service started is restarted after this; doubles per "
                                  "restart in a row, up to restart_backoff_max_s", ge=0)  # fmt: skip
    restart_backoff_max_s: float = _f(300.0, "longest wait before restarting a dead replica", ge=0)
    log_dir: str = _f("", "absolute folder, on each judge node, for each started replica's vLLM log (appended on "
                      "restart); empty = the node's temp dir", check=_absolute_or_empty)  # fmt: skip


@dataclass(frozen=True)
class RewardConfig(_Section):
    SECTION: ClassVar[str] = "reward"
    flow_weight: float = _f(0.5, "w_flow in R = w_flow*r_flow + w_mllm*r_mllm (0 = flow model never loaded)", ge=0)
    judge_weight: float = _f(0.5, "w_mllm (0 = judge never started)", ge=0)
    batch_pairs: int = _f(32, "candidate pairs a reward worker gathers across groups before one flow call", ge=1)
    max_wait_ms: float = _f(20.0, "longest a reward worker waits to fill a batch", ge=0)
    preservation_weight: float = _f(0.0, "w of the static-region term: R = (1 - w)*R + w*r_pres, r_pres = 1 - the "
                                    "edit's photometric distance to the input where the ground truth does not move "
                                    "(rewards/preservation.py); 0 = off", ge=0, le=1)  # fmt: skip
    preservation_threshold: float = _f(0.005, "a pixel is static when its ground-truth flow, both input->target and "
                                       "target->input, is at most this (in image diagonals)", ge=0)  # fmt: skip
    preservation_grid: int = _f(32, "side of the fixed grid the preservation term compares input and edit on "
                                "(a cell touching motion is left out)", ge=1)  # fmt: skip
    flow: FlowRewardConfig = field(default_factory=FlowRewardConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def _check_related(self) -> None:
        _check(
            self.flow_weight + self.judge_weight > 0,
            "reward.flow_weight",
            "flow_weight + judge_weight > 0",
            (self.flow_weight, self.judge_weight),
        )
        _check(self.preservation_weight == 0 or self.flow_weight > 0, "reward.preservation_weight",
               "0 when reward.flow_weight is 0 (the static region comes from the flow model)",
               self.preservation_weight)  # fmt: skip


@dataclass(frozen=True)
class NFTConfig(_Section):
    SECTION: ClassVar[str] = "nft"
    beta: float = _f(1.0, "mixing of v_theta and v_old in the implicit policies v+ / v-", gt=0)
    adv_clip_max: float = _f(
        5.0, "clip of normalised advantages (r = clip(A)/(2*max) + 0.5), also the policy loss's factor", gt=0
    )
    kl_weight: float = _f(1e-4, "weight of mean((v_theta - v_ref)^2)")
    timestep_fraction: float = _f(0.99, "train on int(fraction * num_steps) grid points per sample", gt=0, le=1)
    group_min_std: float = _f(0.05, "a group trains only if its reward std > this ...")
    group_max_mean: float = _f(0.9, "... and its mean < this; std < min_std and mean > max_mean bans the prompt")
    decay_schedule: str = _f("linear_capped", "old-policy decay d(step): linear_capped | none | delayed",
                             choices=("linear_capped", "none", "delayed"))  # fmt: skip
    ema_cap: float = _f(0.9, "cap of the eval EMA decay min((1+k)/(10+k), cap)", ge=0, lt=1)
    lr: float = _f(3e-4, "AdamW learning rate", gt=0)
    adam_beta1: float = _f(0.9, "AdamW beta1", ge=0, lt=1, expected="betas in [0, 1)")
    adam_beta2: float = _f(0.999, "AdamW beta2", ge=0, lt=1, expected="betas in [0, 1)")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    grad_clip: float = _f(1.0, "max global grad norm", gt=0)
    full_finetune: bool = _f(False, "train all transformer weights instead of a LoRA adapter")
    lora_rank: int = _f(32, "LoRA rank r", ge=1)
    lora_alpha: int = _f(64, "LoRA alpha", ge=1)
    lora_targets: tuple[str, ...] = _f(LORA_TARGETS, "module names that get LoRA",
                                       non_empty=True, expected="a non-empty list of module names")  # fmt: skip
    reference_forwards: str = _f(
        "learner", "where v_old / v_ref are computed: learner | rollout (the rollout's behaviour policy)",
        choices=("learner", "rollout"),
    )
    invert_reward: bool = _f(False, "control experiment: train on 1 - r (r = optimality); the policy should then "
                             "get WORSE")  # fmt: skip
    motion_focal: bool = _f(False, "weight each target token's squared error in L+ and L- by the ground-truth "
                            "motion there (|input->target flow|, pooled to the token grid, mean 1; "
                            "learner/trainer/motion_focal.py); needs reward.flow_weight > 0")  # fmt: skip
    motion_focal_mix: float = _f(0.5, "m of the motion-focal weights (1 - m) + m * heat: 0 = the plain loss, "
                                 "1 = the heat alone", ge=0, le=1)  # fmt: skip

    def _check_related(self) -> None:
        _check(
            not (self.full_finetune and self.reference_forwards == "rollout"),
            "nft.reference_forwards",
            "'learner' with nft.full_finetune (a full-weight rollout holds no base model for v_ref)",
            self.reference_forwards,
        )


@dataclass(frozen=True)
class LearnerConfig(_Section):
    SECTION: ClassVar[str] = "learner"
    micro_batch: int = _f(4, "samples per forward/backward on one rank (gradients accumulate over the step); "
                          "0: sized from the GPU's free memory (learner/trainer/memory.py)",
                          ge=0, expected="an integer >= 1, or 0 (from free memory)")  # fmt: skip
    memory_fraction: float = _f(0.9, "with learner.micro_batch 0: the share of free GPU memory the learner plans on",
                                gt=0, le=1)  # fmt: skip
    activation_checkpointing: bool = _f(False, "recompute transformer blocks in backward (less memory, ~1.4x time)")
    backend: str = _f("auto", "torch.distributed backend: auto (nccl on GPU, gloo on CPU) | gloo | nccl",
                      choices=("auto", "gloo", "nccl"))  # fmt: skip
    steps: int = _f(300, "training steps", ge=1)
    seed: int = _f(0, "seed of timesteps and training noise")
    compile: bool = _f(False, "regional compilation of the transformer blocks for the learner's forwards/backward")
    cudnn_sdpa: bool = _f(False, "allow the cuDNN SDPA attention backend in training")
    max_recoveries: int = _f(3, "times within learner.recovery_window_s a run rebuilds its learner group after a rank "
                             "dies and resumes from the latest checkpoint (0 = the first lost rank ends it)",
                             ge=0)  # fmt: skip
    recovery_window_s: float = _f(3600.0, "the sliding window (seconds) of learner.max_recoveries", gt=0,
                                  noun="seconds")  # fmt: skip


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    SECTION: ClassVar[str] = "checkpoint"
    dir: str = _f("runs/default/checkpoints", "local dir or s3://bucket/prefix for sharded checkpoints",
                  check=_dir(s3=True))  # fmt: skip
    every: int = _f(25, "save every N steps (and at the end); 0 = only at the end", ge=0)
    keep: int = _f(3, "complete checkpoints kept (older ones deleted)", ge=1)
    export_lora: bool = _f(
        True, "also write the eval-EMA weights for diffusers: lora/ (LoRA) or transformer/ (full fine-tuning)"
    )
    shared_fs: bool = _f(False, "a local dir is on a filesystem every node mounts at the same path (NFS, a PVC); "
                         "without it, learner ranks on other nodes need s3://")  # fmt: skip
    s3_retries: int = _f(4, "s3:// dir: retries of each checkpoint transfer on transient errors, beyond botocore's "
                         "own", ge=0)  # fmt: skip
    s3_backoff_s: float = _f(2.0, "s3:// dir: wait before the first of those retries; doubles per retry (jittered)",
                             ge=0)  # fmt: skip


@dataclass(frozen=True)
class ClusterConfig(_Section):
    SECTION: ClassVar[str] = "cluster"
    address: str = _f("", "Ray address; empty = RAY_ADDRESS when set (ray job submit), else a local cluster")
    num_cpus: int = _f(0, "CPUs of a local cluster (0 = all)", ge=0)
    rollout_workers: int = _f(1, "rollout actors at the start (the pool's size unless it is elastic)", ge=1)
    rollout_workers_min: int = _f(0, "elastic rollout pool: fewest rollout actors (0 = cluster.rollout_workers)")
    rollout_workers_max: int = _f(0, "elastic rollout pool: most rollout actors (0 = cluster.rollout_workers); the "
                                  "driver adds and removes workers between the two by load")  # fmt: skip
    rollout_grow_wait: float = _f(0.5, "grow the pool by one worker when the driver waited on rollouts more than this "
                                  "fraction of a step, cluster.rollout_scale_patience steps in a row",
                                  gt=0, le=1, noun="a fraction")  # fmt: skip
    rollout_shrink_busy: float = _f(0.3, "shrink the pool by one worker when its workers sampled less than this "
                                    "fraction of a step, cluster.rollout_scale_patience steps in a row",
                                    ge=0, lt=1, noun="a fraction")  # fmt: skip
    rollout_scale_patience: int = _f(2, "steps in a row a grow or shrink condition must hold before the pool changes",
                                     ge=1)  # fmt: skip
    rollout_join_timeout_s: float = _f(900.0, "a worker added to an elastic pool that has not joined (placed, loaded, "
                                       "parity checked) by then is given up", gt=0, noun="seconds")  # fmt: skip

    @property
    def rollout_bounds(self) -> tuple[int, int]:
        """(fewest, most) rollout workers: both cluster.rollout_workers unless the pool is elastic."""
        return self.rollout_workers_min or self.rollout_workers, self.rollout_workers_max or self.rollout_workers

    rollout_gpus: float = _f(1.0, "GPUs per rollout actor (0 on CPU)", ge=0)
    reward_workers: int = _f(1, "reward actors (flow model + judge client)", ge=1)
    reward_gpus: float = _f(1.0, "GPUs per reward actor, for RAFT (0 on CPU)", ge=0)
    judge_replicas: int = _f(1, "vLLM judge replicas started by the service (when reward.judge.url is empty)", ge=0)
    judge_gpus: float = _f(1.0, "GPUs per judge replica (= tensor_parallel_size on GPU; 0 on CPU)", ge=0)
    learner_ranks: int = _f(1, "learner actors, one torch.distributed rank each (FSDP2 shards over them)", ge=1)
    learner_gpus: float = _f(1.0, "GPUs per learner rank (0 on CPU)", ge=0)
    cpus_per_actor: float = _f(1.0, "CPUs reserved by each actor", ge=0)
    learner_resources: dict[str, float] = _f({}, "custom Ray resources each learner rank asks for (places it on "
                                              "the node type that offers them, e.g. {learner_node: 1})",
                                              check=_custom_resources)  # fmt: skip
    rollout_resources: dict[str, float] = _f({}, "custom Ray resources each rollout actor asks for",
                                              check=_custom_resources)  # fmt: skip
    reward_resources: dict[str, float] = _f({}, "custom Ray resources each reward actor asks for",
                                             check=_custom_resources)  # fmt: skip
    judge_resources: dict[str, float] = _f({}, "custom Ray resources each judge replica asks for",
                                            check=_custom_resources)  # fmt: skip
    node_types: dict[str, dict[str, float]] = _f({}, "resources of each node type the autoscaler may add, name -> "
                                                 "{CPU, GPU, custom}; start-up checks every pool's ask against them",
                                                 ge=0)  # fmt: skip
    worker_crashes: int = _f(10, "crashes one rollout or reward worker may have within cluster.crash_window_s; one "
                             "more stops the run (a crash loop)", ge=0)  # fmt: skip
    crash_window_s: float = _f(3600.0, "the sliding window (seconds) of cluster.worker_crashes",
                               gt=0, noun="seconds")  # fmt: skip
    metrics_export_port: int = _f(0, "port of a local cluster's Prometheus endpoint (on 127.0.0.1; 0 = a free port, "
                                  "printed at start)", ge=0, le=65535,
                                  expected="a port from 1 to 65535, or 0")  # fmt: skip

    def _check_related(self) -> None:
        _check(0 <= self.rollout_workers_min <= self.rollout_workers, "cluster.rollout_workers_min",
               f"an integer from 1 to cluster.rollout_workers ({self.rollout_workers}), or 0", self.rollout_workers_min)
        _check(self.rollout_bounds[1] >= self.rollout_workers, "cluster.rollout_workers_max",
               f"an integer >= cluster.rollout_workers ({self.rollout_workers}), or 0", self.rollout_workers_max)


@dataclass(frozen=True)
class LoggingConfig(_Section):
    SECTION: ClassVar[str] = "logging"
    dir: str = _f("runs/default", "run dir: resolved config, metrics.jsonl, TensorBoard events, plots",
                  check=_dir(s3=False))  # fmt: skip
    every: int = _f(1, "print a metrics line every N steps", ge=1)
    tensorboard: bool = _f(True, "write TensorBoard event files under <logging.dir>/tensorboard (every scalar)")
    image_every: int = _f(50, "every N steps, an image grid per logged group in TensorBoard (0 = none)", ge=0)
    image_groups: int = _f(2, "groups shown per image grid step: input | candidates by reward | target", ge=0)
    image_size: int = _f(128, "pixel height of each tile of the image grid", ge=8)


@dataclass(frozen=True)
class DemoConfig(_Section):
    """The CPU learning demo (configs/learn_demo.yaml): data and a warm-started policy built by the run itself."""

    SECTION: ClassVar[str] = "demo"
    enabled: bool = _f(
        False, "build the demo data + warm-started demo pipeline (motionnft_core.models.warmstart) and train them"
    )
    examples: int = _f(400, "synthetic examples of the demo motion (train + held out, data.eval_fraction)", ge=2)
    motion: str = _f("right", "motion kind of every example: right | left | up | down | translate | any",
                     choices=DEMO_MOTIONS, expected=f"one of {DEMO_MOTIONS}")  # fmt: skip
    model_seed: int = _f(0, "seed of the random demo pipeline before its warm start")
    vae_steps: int = _f(600, "warm start: autoencoder steps", ge=0)
    vae_lr: float = _f(2e-3, "warm start: autoencoder learning rate", gt=0)
    vae_batch: int = _f(16, "warm start: autoencoder batch", gt=0, noun="a value")
    steps: int = _f(400, "warm start: flow-matching steps of the transformer", ge=0)
    lr: float = _f(3e-3, "warm start: flow-matching learning rate", gt=0)
    batch: int = _f(32, "warm start: flow-matching batch", gt=0, noun="a value")
    noop_fraction: float = _f(0.6, "warm start: share of flow-matching targets that are the input (a no-op edit)",
                              ge=0, lt=1)  # fmt: skip
    warmup: int = _f(20, "warm start: linear learning-rate warm-up steps of both stages", ge=0)
    weight_decay: float = _f(0.0, "warm start: AdamW weight decay of both stages", ge=0)
    grad_clip: float = _f(1.0, "warm start: max global grad norm of both stages", gt=0)
    seed: int = _f(0, "warm start: seed of batches and noise")


@dataclass(frozen=True)
class EvalConfig(_Section):
    """MotionEdit-Bench evaluation (docs/evaluation.md). The paper publishes the MAS formula but not α, τ, d_min, d_max:
    their defaults carry over the published MotionNFT training scorer's constants (docs/config-notes.md)."""

    SECTION: ClassVar[str] = "eval"
    num_steps: int = _f(28, "sampling steps of the evaluation edits (the paper's protocol; training uses rollout.*)",
                        ge=1)  # fmt: skip
    seed: int = _f(42, "noise seed of every evaluation edit (the paper's protocol: one seed, the same for each row)")
    kontext_guidance: float = _f(2.5, "FLUX.1 Kontext: distilled guidance of the evaluation edits (the paper's "
                                 "protocol)", ge=0)  # fmt: skip
    flux2_guidance: float = _f(4.0, "FLUX.2 [dev]: distilled guidance of the evaluation edits (the model card's "
                               "guidance_scale 4)", ge=0)  # fmt: skip
    klein_base_cfg: float = _f(4.0, "FLUX.2 [klein] Base checkpoints: CFG scale of the evaluation edits against the "
                               "empty prompt (diffusers' Flux2KleinPipeline example; the distilled checkpoints "
                               "sample without CFG); <= 1 = off", ge=0)  # fmt: skip
    qwen_true_cfg: float = _f(4.0, "Qwen-Image-Edit and -Plus: true CFG scale of the evaluation edits (the paper's "
                              "protocol); <= 1 = off", ge=0)  # fmt: skip
    negative_prompt: str = _f(" ", "Qwen-Image-Edit and -Plus: negative prompt of true CFG (diffusers' examples "
                              "use \" \")", non_empty=True, expected="a non-empty string (\" \" is fine)")  # fmt: skip
    chunk_rows: int = _f(8, "edits scored per chunk written: a crash loses at most this many scored rows per policy",
                         ge=1)  # fmt: skip
    mas_alpha: float = _f(0.7, "α in D = α·D_mag + (1 − α)·D_dir", ge=0, le=1)
    mas_tau: float = _f(0.002, "τ: |V_gt| (diagonal-normalised) above which a pixel weighs in D_dir", ge=0)
    mas_d_min: float = _f(1e-6**0.4, "d_min of the MAS clip: ε^0.4, the D_mag of a perfect match (MAS 100)", ge=0)
    mas_d_max: float = _f(1.0, "d_max of the MAS clip: the reference scorer's upper bound (max_loss = 1.0)")
    mas_eps: float = _f(1e-6, "ε of D_mag, of D_dir's Σw + ε and of unit vectors V / max(|V|, ε): the reference's eps",
                        gt=0)  # fmt: skip
    mas_q: float = _f(0.4, "exponent of D_mag = mean((|V_pred − V_gt| + ε)^q): 0.4 in the published MAS formula",
                      gt=0)  # fmt: skip
    mas_min_motion_ratio: float = _f(
        0.01, "MAS = 0 when mean|V_pred| / mean|V_gt| is below this (published: an edit that does not move)", ge=0
    )
    chunk_retries: int = _f(3, "times a chunk of the comparison is sampled and scored again after it lost a worker",
                            ge=0)  # fmt: skip
    worker_wait_s: float = _f(600.0, "how long a comparison waits for a lost worker to be back before it gives up",
                              gt=0)  # fmt: skip
    pairwise: bool = _f(False, "also ask the judge which of a row's two edits is better, in both orders "
                        "(rewards/pairwise.py): 2 more judge calls per row, three images each")  # fmt: skip
    tie_margin: float = _f(0.0, "candidate and baseline scores this close (|Δ| <= margin) tie, on Overall, MAS and "
                           "side-by-side; 0 = only equal scores tie", ge=0)  # fmt: skip
    bootstrap_samples: int = _f(10000, "resamples of the rows for the bootstrap intervals (percentile method)", ge=1)
    bootstrap_seed: int = _f(0, "seed of the bootstrap resampling (the intervals are deterministic given it)")
    confidence: float = _f(0.95, "coverage of the bootstrap intervals (percentile method)", gt=0, lt=1)
    every: int = _f(0, "during training, every N steps: evaluate the step's eval EMA on eval.during_rows held-out "
                    "rows, logged as eval/*; 0 = off", ge=0, expected="an integer >= 0 (0 = off)")  # fmt: skip
    during_rows: int = _f(8, "held-out rows (the first of the split) evaluated every eval.every steps",
                          ge=1)  # fmt: skip

    def _check_related(self) -> None:
        _check(self.mas_d_max > self.mas_d_min, "eval.mas_d_max", f"a value > eval.mas_d_min ({self.mas_d_min})",
               self.mas_d_max)  # fmt: skip


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
            bool(cfg.model.path) or cfg.model.tiny or cfg.model.random_layers > 0,
            "model.path",
            "a local dir or s3:// URI (or model.tiny=true, or model.random_layers > 0)",
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
    if cfg.model.random_layers and (cfg.model.tiny or cfg.model.path):
        raise ConfigError("model.random_layers: set one of model.path, model.tiny=true and model.random_layers > 0")
    _check(cfg.learner.micro_batch >= 1 or cfg.cluster.learner_gpus > 0, "learner.micro_batch",
           "an integer >= 1 when cluster.learner_gpus is 0 (0 measures GPU memory)", cfg.learner.micro_batch)
    _check(not cfg.rollout.fp8_reference or cfg.nft.reference_forwards == "rollout", "rollout.fp8_reference",
           "false unless nft.reference_forwards is rollout (the learner's reference forwards stay full precision)",
           cfg.rollout.fp8_reference)  # fmt: skip
    _check(cfg.eval.every == 0 or cfg.data.eval_fraction > 0 or bool(cfg.data.split_column), "eval.every",
           "0 when data.eval_fraction is 0 (the evaluation during training needs held-out rows)", cfg.eval.every)
    _check(not cfg.nft.motion_focal or cfg.reward.flow_weight > 0, "nft.motion_focal",
           "false when reward.flow_weight is 0 (the motion heat comes from the flow model)", cfg.nft.motion_focal)


def _validate_demo(cfg: Config) -> None:
    """The demo builds its own data and pipeline; a run may not also name others (which would be ignored)."""
    given = (
        ("model.path", cfg.model.path, ""),
        ("model.tiny", cfg.model.tiny, False),
        ("model.random_layers", cfg.model.random_layers, 0),
        ("data.source", cfg.data.source, ""),
        ("data.synthetic", cfg.data.synthetic, 0),
    )
    for key, value, empty in given:
        _check(value == empty, key, f"{empty!r} with demo.enabled=true (the demo builds its own data and model)", value)
    _check(cfg.model.family in DEMO_FAMILIES, "model.family", f"one of {DEMO_FAMILIES} for the demo", cfg.model.family)
    r = cfg.rollout
    _check(r.height == r.width, "rollout.width", f"= rollout.height ({r.height}) for the square demo images", r.width)
