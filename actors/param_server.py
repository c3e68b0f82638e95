"""Versioned policy weights: the learner publishes once, every rollout pulls the same object by reference.

The weights themselves (a flat name -> tensor dict: the LoRA adapter by default, the full transformer for full
fine-tuning) live in Ray's object store; the server only keeps their references plus a small msgpack manifest
(names, shapes, dtypes, version) so that a mismatched publish is refused before any rollout fetches tensors, and
it records which version each rollout holds so the driver can bound staleness.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgpack
import torch


class WeightMismatchError(ValueError):
    """Published weights do not fit the policy (a name or shape differs); the holder keeps its old version."""


@dataclass(frozen=True)
class WeightManifest:
    """What a weight set contains, without the tensors; packs to a few hundred bytes with msgpack."""

    version: int
    kind: str  # "lora" | "full"
    entries: tuple[tuple[str, tuple[int, ...], str], ...]  # (name, shape, dtype), sorted by name

    @classmethod
    def of(cls, state: dict[str, torch.Tensor], *, version: int, kind: str = "lora") -> WeightManifest:
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


class WeightStore:
    """The plain state behind the ParameterServer actor (usable and tested without Ray).

    `payload` is opaque here: under Ray it is a one-element list holding the ObjectRef of the weights (a list so
    that Ray passes the reference through instead of fetching the tensors into this process).
    """

    def __init__(self, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.keep = keep
        self._versions: OrderedDict[int, tuple[bytes, Any]] = OrderedDict()
        self._holders: dict[str, int] = {}
        self._expected: WeightManifest | None = None

    def publish(self, manifest_bytes: bytes, payload: Any) -> int:
        manifest = WeightManifest.unpack(manifest_bytes)
        if self._versions and manifest.version <= self.latest_version:
            raise ValueError(f"version {manifest.version} is not newer than the latest {self.latest_version}")
        if self._expected is None:
            self._expected = manifest  # the first publish fixes the layout every later version must keep
        else:
            self._expected.check_matches(manifest)
        self._versions[manifest.version] = (manifest_bytes, payload)
        while len(self._versions) > self.keep:
            self._versions.popitem(last=False)
        return manifest.version

    @property
    def latest_version(self) -> int:
        if not self._versions:
            raise LookupError("no weights have been published yet")
        return next(reversed(self._versions))

    def latest(self) -> tuple[int, bytes, Any]:
        version = self.latest_version
        manifest, payload = self._versions[version]
        return version, manifest, payload

    def report(self, holder: str, version: int) -> None:
        """A rollout says which version it now samples with."""
        self._holders[holder] = version

    def holders(self) -> dict[str, int]:
        return dict(self._holders)

    def staleness(self) -> dict[str, int]:
        """Versions each holder is behind the newest publish."""
        latest = self.latest_version
        return {h: latest - v for h, v in self._holders.items()}


class ParameterServer:
    """Ray actor shell: `ray.remote(num_cpus=...)(ParameterServer)` at the call site (see learner/loop.py)."""

    def __init__(self, keep: int = 2) -> None:
        self.store = WeightStore(keep)

    def publish(self, manifest: bytes, payload: list) -> int:
        return self.store.publish(manifest, payload)

    def latest(self) -> tuple[int, bytes, list]:
        return self.store.latest()

    def latest_version(self) -> int:
        return self.store.latest_version

    def report(self, holder: str, version: int) -> None:
        self.store.report(holder, version)

    def holders(self) -> dict[str, int]:
        return self.store.holders()
