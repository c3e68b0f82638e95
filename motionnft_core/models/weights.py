"""The weight wire format between learner and rollouts: a versioned manifest, the tensors by reference, and
in-place loading into a policy that refuses weights which do not fit.

The learner's rank 0 returns the gathered weights (a flat name -> tensor dict: the LoRA adapter, or the whole
transformer with `nft.full_finetune`) as one object in Ray's object store plus a msgpack manifest (names, shapes,
dtypes, version, a few hundred bytes). The driver wraps both in a `PublishedWeights` and hands that same object to
every rollout call (Ray's pattern of passing one reference to many consumers); a rollout whose policy already
holds that version never fetches the tensors. Plain Python: nothing here needs Ray.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import torch

from motionnft_core import s3
from motionnft_core.config import Config, NFTConfig
from motionnft_core.models import fp8
from motionnft_core.models.policy import EditPolicy, load_policy
from motionnft_core.models.tiny import pipeline_source

WEIGHT_KINDS = ("lora", "full")
SAMPLE, EVAL = "sample", "eval"  # what a published version is for: sampling rollouts, or the eval EMA of a step
PURPOSES = (SAMPLE, EVAL)


def weight_kind(nft: NFTConfig) -> str:
    """What the learner publishes: the LoRA adapter, or with `nft.full_finetune` every transformer weight."""
    return "full" if nft.full_finetune else "lora"


class WeightMismatchError(ValueError):
    """Published weights do not fit the policy (a name or shape differs); the holder keeps its old version."""


@dataclass(frozen=True)
class WeightManifest:
    """What a weight set contains, without the tensors; packs to a few hundred bytes with msgpack."""

    version: int
    kind: str  # "lora" | "full"
    entries: tuple[tuple[str, tuple[int, ...], str], ...]  # (name, shape, dtype), sorted by name

    @classmethod
    def of(cls, state: dict[str, torch.Tensor], *, version: int, kind: str) -> WeightManifest:
        if kind not in WEIGHT_KINDS:
            raise ValueError(f"weight kind must be one of {WEIGHT_KINDS}, got {kind!r}")
        entries = tuple((n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in sorted(state.items()))
        return cls(version=version, kind=kind, entries=entries)

    def pack(self) -> bytes:
        return msgpack.packb({"version": self.version, "kind": self.kind, "entries": [list(e) for e in self.entries]})

    @classmethod
    def unpack(cls, data: bytes) -> WeightManifest:
        d = msgpack.unpackb(data)
        entries = tuple((n, tuple(shape), dtype) for n, shape, dtype in d["entries"])
        return cls(version=d["version"], kind=d["kind"], entries=entries)

    @property
    def numel(self) -> int:
        total = 0
        for _, shape, _ in self.entries:
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def check_matches(self, other: WeightManifest) -> None:
        """Raise WeightMismatchError naming the first differing tensor (dtype may differ: loading casts)."""
        if self.kind != other.kind:
            raise WeightMismatchError(f"weight kind {other.kind!r} does not match the policy's {self.kind!r}")
        mine = {n: s for n, s, _ in self.entries}
        theirs = {n: s for n, s, _ in other.entries}
        for name in sorted(mine.keys() - theirs.keys()):
            raise WeightMismatchError(f"published weights lack tensor {name!r} (version {other.version})")
        for name in sorted(theirs.keys() - mine.keys()):
            raise WeightMismatchError(f"published weights have unexpected tensor {name!r} (version {other.version})")
        for name, shape in sorted(mine.items()):
            if theirs[name] != shape:
                raise WeightMismatchError(
                    f"tensor {name!r} has shape {list(theirs[name])} in version {other.version}, "
                    f"the policy expects {list(shape)}"
                )


@dataclass(frozen=True)
class PublishedWeights:
    """One published policy version as the driver hands it to rollouts.

    `tensors` is the ObjectRef of the weights dict. Nested in this object, Ray passes it on as a reference
    instead of resolving it, so a rollout fetches the tensors only when its version differs.
    """

    version: int  # SAMPLE: the policy version (= optimizer steps taken); EVAL: the step whose EMA it is
    manifest: bytes  # WeightManifest.pack()
    tensors: Any
    probe: torch.Tensor | None = None  # the learner's output on the parity probe (motionnft_core/models/parity.py); KBs
    purpose: str = SAMPLE

    def __post_init__(self) -> None:
        if self.purpose not in PURPOSES:
            raise ValueError(f"published weights' purpose must be one of {PURPOSES}, got {self.purpose!r}")

    @property
    def key(self) -> tuple[str, int]:
        """What a holder compares: the eval EMA of step 3 and policy version 3 are different weights."""
        return self.purpose, self.version


class PolicyWeights:
    """Loads published weights into a policy in place; a mismatch leaves the old version untouched."""

    def __init__(self, policy: EditPolicy, kind: str) -> None:
        if kind not in WEIGHT_KINDS:
            raise ValueError(f"weight kind must be one of {WEIGHT_KINDS}, got {kind!r}")
        self.policy = policy
        self.kind = kind
        # The published (purpose, version) the policy holds; None while it holds anything else (the weights it was
        # built with, a checkpoint's export, or a version that failed its parity probe): the next publish loads.
        self.held: tuple[str, int] | None = None

    @property
    def version(self) -> int | None:
        return self.held[1] if self.held is not None else None

    def holds(self, weights: PublishedWeights) -> bool:
        return self.held == weights.key

    def forget(self) -> None:
        """What the policy holds is no longer a published version."""
        self.held = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.kind == "lora":
            return self.policy.lora_state_dict()
        return {k: v.detach() for k, v in self.policy.transformer.named_parameters()}

    def manifest(self) -> WeightManifest:
        return WeightManifest.of(self.state_dict(), version=-1 if self.held is None else self.held[1], kind=self.kind)

    def load(self, version: int, manifest_bytes: bytes, state: dict[str, torch.Tensor], purpose: str = SAMPLE) -> None:
        published = WeightManifest.unpack(manifest_bytes)
        self.manifest().check_matches(published)
        if WeightManifest.of(state, version=version, kind=published.kind) != published:
            raise WeightMismatchError(f"version {version}: the tensors differ from their manifest")
        if self.kind == "lora":
            self.policy.load_lora_state_dict(state)
        else:
            with torch.no_grad():
                current = dict(self.policy.transformer.named_parameters())
                for name, tensor in state.items():
                    current[name].copy_(tensor)
            fp8.refresh(self.policy.transformer)  # float8 copies of the weights (rollout.fp8) follow them
        self.held = (purpose, version)


LORA_FILE = "pytorch_lora_weights.safetensors"  # what checkpoint exports write and diffusers' loader reads


@dataclass(frozen=True)
class LoraExport:
    """A checkpoint's LoRA export as a worker loads it: where it is (a dir or an s3:// prefix), the rank and alpha
    the run trained with, and where on the worker's node an S3 export is downloaded to."""

    location: str
    rank: int
    alpha: int
    cache_dir: str
    retry: s3.S3Retry | None = None


@contextmanager
def lora_export_here(location: str | Path, *, cache_dir: str | Path, retry: s3.S3Retry | None = None) -> Iterator[Path]:
    """A local directory holding the LoRA export at `location`: a local directory as it is, or an s3:// prefix
    (a checkpoint's `lora/` on S3) downloaded on this node into a fresh temporary directory under `cache_dir`,
    removed on exit. So a worker on any node of a cluster reads the export itself: the driver's disk is not
    its own. A fresh directory each time, never a cached copy: a rewritten export may have the same size."""
    if not s3.is_s3_uri(str(location)):
        yield Path(location)
        return
    root = Path(cache_dir).expanduser() / "lora_exports"
    root.mkdir(parents=True, exist_ok=True)
    local = Path(tempfile.mkdtemp(prefix="export-", dir=root))  # unique: workers on one node may fetch at once
    try:
        yield s3.download_prefix(str(location).rstrip("/"), local, retry=retry)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def check_lora_export(lora_dir: str | Path, *, rank: int, alpha: int) -> Path:
    """The export's file; raise unless `lora_dir` holds one whose rank / alpha match the run's `nft.lora_rank`
    / `nft.lora_alpha` (alpha sets the adapter's scale alpha / rank, which the tensors alone do not carry)."""
    from safetensors import safe_open

    path = Path(lora_dir) / LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no exported LoRA at {path} (written by checkpoint.export_lora)")
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if raw is None:
        return path  # an export without metadata: diffusers infers rank from the tensors
    meta = json.loads(raw)
    found = (meta.get("transformer.r"), meta.get("transformer.lora_alpha"))
    if found != (rank, alpha):
        raise ValueError(
            f"{path}: adapter has rank/alpha {found}, the config says nft.lora_rank/nft.lora_alpha = {(rank, alpha)}"
        )
    return path


def read_lora_export(policy: EditPolicy, lora_dir: str | Path) -> dict[str, torch.Tensor]:
    """A diffusers LoRA export (`<lora_dir>/pytorch_lora_weights.safetensors`) as the state dict of the policy's
    own adapter (`EditPolicy.lora_state_dict` names), read by the pipeline's own `lora_state_dict`: a worker
    built like a rollout worker then evaluates a checkpoint by `load_lora_state_dict`, which refuses any
    missing, unexpected or misshapen tensor, with the export's values exactly."""
    state = type(policy.pipe).lora_state_dict(str(lora_dir))
    prefix = "transformer."
    other = sorted(k for k in state if not k.startswith(prefix))
    if other:
        raise ValueError(f"{lora_dir}: the export holds non-transformer LoRA tensors (e.g. {other[0]!r})")
    return {k.removeprefix(prefix): v for k, v in state.items()}


def load_exported_policy(cfg: Config, lora: str | Path | None) -> EditPolicy:
    """The run's base pipeline in this process (`model.*`, as rollout workers load it) with the adapter exported at
    `lora` (a diffusers layout dir, or an s3:// prefix fetched here) loaded by diffusers' own `load_lora_weights`:
    what a user of the stock pipeline gets from a checkpoint (tests and bench/ compare with it)."""
    path = pipeline_source(cfg.model)
    policy = load_policy(cfg.model, path, use_gpu=torch.cuda.is_available())
    if lora is not None:
        with lora_export_here(lora, cache_dir=cfg.model.cache_dir, retry=s3.S3Retry.from_config(cfg.checkpoint)) as d:
            check_lora_export(d, rank=cfg.nft.lora_rank, alpha=cfg.nft.lora_alpha)
            policy.pipe.load_lora_weights(str(d), adapter_name="default")
    return policy
