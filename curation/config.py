"""The curation run's typed configuration (`python -m curation.main --config configs/curate_<name>.yaml`): one frozen
dataclass per section, each field declaring its default, help and bounds exactly as the training config does
(motionnft_core/config.py: the same `_f` fields, `ConfigError` texts naming the dotted key, and the same YAML loader
and `key=value` overrides, motionnft_core/config_loader.py). docs/curation.md explains every key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from motionnft_core.config import (
    ConfigError,
    FlowEstimatorConfig,
    JudgeConfig,
    JudgeServingConfig,
    _check,
    _dir,
    _f,
    _Section,
)
from motionnft_core.config_loader import describe, exit_on_config_error, load_schema

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
DEDUP_SCOPES = ("video", "global")


def _extensions(key: str, value: tuple[str, ...]) -> None:
    for i, ext in enumerate(value):
        _check(ext.startswith(".") and len(ext) > 1, f"{key}[{i}]", "a file suffix such as .mp4", ext)


@dataclass(frozen=True)
class InputConfig(_Section):
    SECTION: ClassVar[str] = "input"
    videos: str = _f("", "folder of videos (searched recursively, hidden entries ignored) or s3://bucket/prefix")
    extensions: tuple[str, ...] = _f(VIDEO_EXTENSIONS, "file suffixes taken as videos (case-insensitive)",
                                     non_empty=True, check=_extensions,
                                     expected="a non-empty list of suffixes")  # fmt: skip
    limit: int = _f(0, "preview: only the first N videos in path order (0 = all)", ge=0)
    min_side: int = _f(64, "a video whose shorter side is below this many pixels is skipped as too small", ge=16)
    max_bytes: int = _f(8 * 2**30, "a larger file is skipped as enormous (bytes)", ge=1)
    max_pixels: int = _f(3840 * 2160, "a video with more pixels per frame is skipped as enormous", ge=1)
    max_duration_s: float = _f(4 * 3600.0, "a longer video is skipped as enormous (seconds)", gt=0)
    cache_dir: str = _f("~/.cache/motionnft/curation", "where s3:// videos are downloaded to (kept by size)")


@dataclass(frozen=True)
class ClipConfig(_Section):
    SECTION: ClassVar[str] = "clips"
    clip_s: float = _f(3.0, "clip length in seconds: its first frame is the input, its last the target (MotionEdit: "
                       "3 s)", gt=0)  # fmt: skip
    stride_s: float = _f(3.0, "seconds between the starts of two clips of a shot: below clip_s the clips overlap, "
                         "above it they leave gaps", gt=0)  # fmt: skip
    height: int = _f(512, "output image height: frames are centre-cropped to the aspect ratio and resized (a "
                     "multiple of 16, at least the training's rollout.height)", ge=16, multiple_of=16)  # fmt: skip
    width: int = _f(512, "output image width (a multiple of 16, at least the training's rollout.width)",
                    ge=16, multiple_of=16)  # fmt: skip


@dataclass(frozen=True)
class ShotConfig(_Section):
    """Shot-boundary detection (curation/shots.py): a cut lies between two consecutive frames whose colour
    histograms or grey thumbnails differ by at least a threshold."""

    SECTION: ClassVar[str] = "shots"
    hist_threshold: float = _f(0.3, "cut when half the L1 distance of the two frames' normalised 16-bin RGB "
                               "histograms reaches this (0 = same colours, 1 = disjoint)", gt=0, le=1)  # fmt: skip
    diff_threshold: float = _f(0.1, "cut when the mean absolute difference of the two frames' grey thumbnails, "
                               "over 255, reaches this (PySceneDetect's content threshold is 27/255)",
                               gt=0, le=1)  # fmt: skip
    thumb_side: int = _f(32, "side in pixels of the grey thumbnails compared", ge=4)


@dataclass(frozen=True)
class FlowConfig(FlowEstimatorConfig):
    """The flow stage: the estimator the flow reward uses (its keys are `reward.flow`'s, FlowEstimatorConfig), in
    Ray Data actors."""

    SECTION: ClassVar[str] = "flow"
    batch_size: int = _f(32, "pairs per Ray Data batch handed to a flow actor", ge=1)
    workers: int = _f(1, "flow actors (Ray Data `concurrency`)", ge=1)
    gpus: float = _f(1.0, "GPUs per flow actor (0 on CPU)", ge=0)
    cpus: float = _f(1.0, "CPUs per flow actor", ge=0)


@dataclass(frozen=True)
class FilterConfig(_Section):
    """Stages a and b. Motion is measured in flow pixels over the image diagonal (resolution-free), as MAS does."""

    SECTION: ClassVar[str] = "filter"
    min_motion: float = _f(0.002, "stage a: a pair whose mean flow magnitude / diagonal is below this is near-static",
                           ge=0)  # fmt: skip
    dedup_distance: int = _f(6, "stage a: a pair whose input and target perceptual hashes (64 bits each) are both "
                             "within this many bits of an earlier pair's is a near-duplicate", ge=0, le=64)  # fmt: skip
    dedup_scope: str = _f("video", "near-duplicates looked for within each video (before the flow stage) | global "
                          "(also across videos, at the end, in path order: deterministic on resume)",
                          choices=DEDUP_SCOPES, expected=f"one of {DEDUP_SCOPES}")  # fmt: skip
    max_camera_share: float = _f(0.6, "stage b: a pair whose camera share (the fitted global motion's share of the "
                                 "flow) is above this is mostly camera motion", ge=0, le=1)  # fmt: skip
    min_object_motion: float = _f(0.002, "stage b: a pair whose object motion (mean magnitude / diagonal of the "
                                  "flow left after removing the global motion) is below this has none",
                                  ge=0)  # fmt: skip
    max_motion: float = _f(0.2, "stage b: a pair whose mean flow magnitude / diagonal is above this is too large "
                           "(a missed cut, a shake)", gt=0)  # fmt: skip

    def _check_related(self) -> None:
        _check(self.max_motion > self.min_motion, "filter.max_motion", f"a value > filter.min_motion "
               f"({self.min_motion})", self.max_motion)  # fmt: skip


@dataclass(frozen=True)
class CurateJudgeConfig(JudgeServingConfig):
    """Stage c: the judge server and client the trainer uses (rewards/judge_server.py, rewards/judge.py; their keys
    are `reward.judge`'s, JudgeServingConfig), then the curation's own."""

    SECTION: ClassVar[str] = "judge"
    retry_budget_s: float = _f(120.0, "how long one call retries transport failures across the replicas; then the "
                               "pair is unverified", ge=0)  # fmt: skip
    scripted: str = _f("", "module:Class of a plain judge with the client's methods instead of a server (tests)")
    replicas: int = _f(1, "vLLM replicas this run starts (judge.url empty)", ge=1)
    gpus: float = _f(1.0, "GPUs per replica (0 on CPU)", ge=0)
    cpus: float = _f(1.0, "CPUs per replica and per judge actor of the pipeline", ge=0)
    pass_digit: float = _f(3.0, "a criterion passes when its expected digit (0-5) reaches this", ge=0, le=5)
    max_tokens: int = _f(96, "longest motion summary and instruction generated (tokens)", ge=1)
    workers: int = _f(1, "judge actors of the pipeline (Ray Data `concurrency`)", ge=1)
    batch_size: int = _f(8, "pairs per Ray Data batch handed to a judge actor", ge=1)

    def _check_related(self) -> None:
        _check(len(self.given()) <= 1, "judge.url", "only one of judge.url, judge.model_path, judge.tiny=true and "
               "judge.scripted", self.given())  # fmt: skip
        _check(not self.scripted or ":" in self.scripted, "judge.scripted", "module:Class", self.scripted)
        super()._check_related()

    def given(self) -> list[str]:
        """Which of the four judge sources are set (exactly one must be)."""
        sources = (("url", self.url), ("model_path", self.model_path), ("tiny", self.tiny), ("scripted", self.scripted))
        return [name for name, value in sources if value]

    def client_config(self) -> JudgeConfig:
        """The shared keys in the trainer's form (`reward.judge`): scored from log-probs, and a call that fails for
        good drops the pair (unverified) instead of stopping anything; the trainer-only keys keep their defaults."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(JudgeServingConfig)}
        return JudgeConfig(**shared, mode="score", on_outage="drop")


@dataclass(frozen=True)
class OutputConfig(_Section):
    SECTION: ClassVar[str] = "output"
    dir: str = _f("runs/curation", "run folder: dataset/ (the training set), manifest.jsonl, run.json, summary, "
                  "pairs.png, and work/ (per-video commits, kept for resuming)", check=_dir(s3=False))  # fmt: skip
    eval_fraction: float = _f(0.1, "share of source videos held out for evaluation (by a hash of the video's "
                              "content and output.seed: a video is wholly on one side)", ge=0, lt=1)  # fmt: skip
    seed: int = _f(0, "seed of the train/eval split")
    preview_pairs: int = _f(6, "kept and dropped pairs shown (each) in pairs.png", ge=0)


@dataclass(frozen=True)
class CurateClusterConfig(_Section):
    SECTION: ClassVar[str] = "cluster"
    address: str = _f("", "Ray cluster to join (also RAY_ADDRESS, as under `ray job submit`); empty = an embedded "
                      "one-machine cluster")  # fmt: skip
    num_cpus: int = _f(0, "logical CPUs of the embedded cluster (0 = the machine's)", ge=0)
    decode_workers: int = _f(2, "Ray Data tasks decoding and cutting videos at once (`concurrency`)", ge=1)
    decode_cpus: float = _f(1.0, "CPUs per decoding task", gt=0)


@dataclass(frozen=True)
class CurateConfig:
    SECTION: ClassVar[str] = ""
    input: InputConfig = field(default_factory=InputConfig)
    clips: ClipConfig = field(default_factory=ClipConfig)
    shots: ShotConfig = field(default_factory=ShotConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    judge: CurateJudgeConfig = field(default_factory=CurateJudgeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    cluster: CurateClusterConfig = field(default_factory=CurateClusterConfig)


def validate(cfg: CurateConfig) -> None:
    """Checks that span sections."""
    _dir(s3=True)("input.videos", cfg.input.videos)
    _check(len(cfg.judge.given()) == 1, "judge.url", "an endpoint URL, a judge.model_path, judge.tiny=true or "
           "judge.scripted (module:Class)", cfg.judge.url)  # fmt: skip
    _check(Path(cfg.output.dir).expanduser().resolve() != Path(cfg.input.videos).expanduser().resolve()
           or cfg.input.videos.startswith("s3://"), "output.dir", "a folder other than input.videos",
           cfg.output.dir)  # fmt: skip


def load_curate_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> CurateConfig:
    """Defaults <- YAML file <- dotted overrides, then the cross-section checks (raises ConfigError)."""
    return load_schema(CurateConfig, path, overrides, validate)


def load_curate_config_or_exit(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> CurateConfig:
    return exit_on_config_error(lambda: load_curate_config(path, overrides))


def describe_keys() -> list[str]:
    """One line per key (`--help-config`)."""
    return describe(CurateConfig)


__all__ = ["ConfigError", "CurateConfig", "describe_keys", "load_curate_config", "load_curate_config_or_exit"]
