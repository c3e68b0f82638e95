"""Checkpoints: sharded learner state with torch.distributed.checkpoint, driver state, a diffusers export.

Layout under `checkpoint.dir` (a local dir or s3://bucket/prefix)::

    step_00000020/learner/      DCP shards (θ, old, eval EMA, optimizer, step): each rank writes its own
    step_00000020/lora/         rank 0: the eval-EMA adapter, pytorch_lora_weights.safetensors (diffusers layout)
    step_00000020/transformer/  ... or, for full fine-tuning, the eval-EMA transformer
    step_00000020/driver.json   the driver: step, policy version, data cursor, banned prompts, resolved config
    step_00000020/COMMITTED     the driver, last: a checkpoint without it is never picked up

Weights are written where they live (`save_rank`, in each learner rank): to S3, each rank stages its own
files on its own node and uploads them itself; the driver only checks that every file a rank reported is
there, then writes driver.json and the marker. It never holds weights. A local dir must be one every rank
reaches (the driver's node, or a shared filesystem: `checkpoint.shared_fs`, checked at start-up by
`check_reachable`). Local checkpoints are assembled under `.tmp-step_*` and renamed into place; on S3 a step
written again first loses its marker, then its old objects.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from motionnft_core import s3
from motionnft_core.config import CheckpointConfig, ConfigError

MARKER = "COMMITTED"
LEARNER = "learner"  # the DCP shards' folder inside a step
_STEP_DIR = re.compile(r"step_(\d+)")


def save_sharded(state: dict[str, Any], path: str | Path) -> None:
    """Collective: every rank writes its shards of `state` (DTensors stay sharded) under `path`."""
    dcp.save(state, checkpoint_id=str(path))


def load_sharded(state: dict[str, Any], path: str | Path) -> None:
    """Collective: loads in place into the tensors of `state` (resharding if the world size changed)."""
    dcp.load(state, checkpoint_id=str(path))


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _is_mine(rel: str, rank: int) -> bool:
    """DCP names a rank's shards `__<rank>_<n>.distcp` and rank 0 writes `.metadata`; the export is rank 0's."""
    folder, _, name = rel.partition("/")
    if folder != LEARNER:
        return rank == 0
    return name.startswith(f"__{rank}_") or (rank == 0 and name == ".metadata")


def save_rank(
    state: dict[str, Any], target: str, rank: int, *, export: Callable[[Path], Any] | None = None,
    retry: s3.S3Retry | None = None,
) -> list[str]:
    """Collective: this rank's part of a checkpoint at `target`, a dir every rank reaches or an s3:// prefix.

    Its DCP shards go under learner/; `export(dir)`, when given (rank 0), writes the diffusers export into
    `dir`. For S3 the files are staged in this node's temp dir and uploaded by this rank (transient S3 errors
    retried as `retry` says), so nothing depends on another node's disk. Returns the paths this rank wrote,
    relative to `target`, for the driver to check.
    """
    remote = s3.is_s3_uri(target)
    with tempfile.TemporaryDirectory(prefix="motionnft-ckpt-") if remote else contextlib.nullcontext(target) as base:
        base = Path(base)
        save_sharded(state, base / LEARNER)
        if export is not None:
            export(base)
        written = (p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
        mine = sorted(rel for rel in written if _is_mine(rel, rank))
        if remote:
            for rel in mine:
                s3.upload_file(base / rel, f"{target}/{rel}", retry=retry)
    return mine


def load_rank(state: dict[str, Any], source: str, *, retry: s3.S3Retry | None = None) -> None:
    """Collective: loads the learner shards at `source` (a dir or an s3:// prefix) in place into `state`; from
    S3 each rank downloads into its own node's temp dir, removed afterwards."""
    if not s3.is_s3_uri(source):
        load_sharded(state, source)
        return
    with tempfile.TemporaryDirectory(prefix="motionnft-restore-") as tmp:
        load_sharded(state, s3.download_prefix(source, tmp, retry=retry))


def check_reachable(cfg: CheckpointConfig, rank_nodes: list[str], driver_node: str) -> None:
    """A local `checkpoint.dir` works only where every rank and the driver see the same files."""
    if s3.is_s3_uri(cfg.dir) or cfg.shared_fs or all(n == driver_node for n in rank_nodes):
        return
    away = sum(n != driver_node for n in rank_nodes)
    raise ConfigError(
        f"checkpoint.dir: {cfg.dir!r} is a local path, but {away} of {len(rank_nodes)} learner ranks run on "
        "another node than the driver, whose disks it cannot reach: use an s3:// URI, or set "
        "checkpoint.shared_fs=true if the path is a filesystem every node mounts"
    )


class CheckpointManager:
    """Driver-side bookkeeping: where step N goes, the commit, which checkpoint is the latest complete one,
    retention. It never holds weights: ranks write their shards from their nodes, and evaluation fetches only
    the LoRA export, on the node that loads it (models/weights.lora_export_here)."""

    def __init__(self, root: str, *, keep: int, retry: s3.S3Retry | None = None) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint keep must be >= 1 (the newest checkpoint is never deleted), got {keep}")
        self.root, self.keep = str(root).rstrip("/"), keep
        self.remote, self.retry = s3.is_s3_uri(self.root), retry
        if self.remote:
            s3.split_s3_uri(self.root)  # a malformed URI fails here, not at the first save
        else:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- writing

    def begin(self, step: int) -> str:
        """Where the ranks write step N before it is committed: a `.tmp-step_N` dir beside the final one
        (renamed at commit), or on S3 the final prefix, emptied of an earlier attempt (its marker first, so
        it never looks complete while it is overwritten)."""
        if self.remote:
            uri = f"{self.root}/{step_name(step)}"
            s3.delete_object(f"{uri}/{MARKER}", retry=self.retry)
            s3.delete_prefix(uri, retry=self.retry)
            return uri
        path = Path(self.root) / f".tmp-{step_name(step)}"
        if path.exists():
            shutil.rmtree(path)  # a crashed earlier attempt at the same step
        path.mkdir(parents=True)
        return str(path)

    def commit(self, step: int, target: str, driver_state: dict[str, Any], *, written: Iterable[str]) -> str:
        """Check that every file the ranks reported `written` is at `target`, write driver.json, then the
        marker (atomically, for a local dir: a rename); returns the checkpoint's location."""
        written = set(written)
        if f"{LEARNER}/.metadata" not in written:
            raise RuntimeError(f"checkpoint step {step}: no rank reported the DCP metadata; not committed")
        found = self._files(target)
        if missing := sorted(written - found):
            raise RuntimeError(f"checkpoint step {step}: {len(missing)} file(s) the learner ranks wrote are not "
                               f"under {target} ({missing[:3]}); not committed")  # fmt: skip
        state = json.dumps(driver_state, indent=1)
        if self.remote:
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "driver.json").write_text(state)
                (Path(tmp) / MARKER).write_text(str(step))
                s3.upload_file(Path(tmp) / "driver.json", f"{target}/driver.json", retry=self.retry)
                # last: only now is it complete
                s3.upload_file(Path(tmp) / MARKER, f"{target}/{MARKER}", retry=self.retry)
            location = target
        else:
            (Path(target) / "driver.json").write_text(state)
            (Path(target) / MARKER).write_text(str(step))
            final = Path(self.root) / step_name(step)
            if final.exists():
                shutil.rmtree(final)
            Path(target).rename(final)
            location = str(final)
        self._prune(step)
        return location

    def _files(self, where: str) -> set[str]:
        if self.remote:
            return {uri[len(where) + 1 :] for uri in s3.list_prefix(where, retry=self.retry)}
        return {p.relative_to(where).as_posix() for p in Path(where).rglob("*") if p.is_file()}

    def delete_all(self) -> int:
        """Remove every checkpoint under the root, complete or not (`--overwrite`); returns how many steps."""
        if self.remote:
            names = {k[len(self.root) + 1 :].split("/")[0] for k in s3.list_prefix(self.root, retry=self.retry)}
            names = {n for n in names if _STEP_DIR.fullmatch(n)}
            for name in names:
                s3.delete_prefix(f"{self.root}/{name}", retry=self.retry)
            return len(names)
        paths = [p for p in Path(self.root).iterdir() if _STEP_DIR.fullmatch(p.name.removeprefix(".tmp-"))]
        for path in paths:
            shutil.rmtree(path)
        return len(paths)

    def _prune(self, written: int) -> None:
        """Keep the newest `keep` complete checkpoints, and always the one just `written`."""
        for step in [s for s in self.complete_steps()[: -self.keep] if s != written]:
            if self.remote:
                s3.delete_prefix(f"{self.root}/{step_name(step)}", retry=self.retry)
            else:
                shutil.rmtree(Path(self.root) / step_name(step), ignore_errors=True)

    # ---------------------------------------------------------------- reading

    def complete_steps(self) -> list[int]:
        """Steps whose `step_N/COMMITTED` marker exists, ascending (staging dirs and partial uploads never)."""
        if self.remote:
            children = [k[len(self.root) + 1 :].split("/") for k in s3.list_prefix(self.root, retry=self.retry)]
            names = {parts[0] for parts in children if len(parts) == 2 and parts[1] == MARKER}
        else:
            names = {p.parent.name for p in Path(self.root).glob(f"step_*/{MARKER}")}
        return sorted(int(m.group(1)) for n in names if (m := _STEP_DIR.fullmatch(n)))

    def latest(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def location(self, step: int) -> str:
        """The dir or s3:// prefix of complete checkpoint `step` (what the learner ranks load from)."""
        where = f"{self.root}/{step_name(step)}"
        if self.remote:
            complete = f"{where}/{MARKER}" in s3.list_prefix(where, retry=self.retry)
        else:
            complete = Path(where, MARKER).is_file()
        if not complete:
            raise FileNotFoundError(f"checkpoint {where} is not complete (no {MARKER} marker)")
        return where

    def driver_state(self, step: int) -> dict[str, Any]:
        where = self.location(step)
        if not self.remote:
            return json.loads((Path(where) / "driver.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            local = s3.download_file(f"{where}/driver.json", Path(tmp) / "driver.json", retry=self.retry)
            return json.loads(local.read_text())


def export_lora(
    state: dict[str, torch.Tensor], out_dir: str | Path, *, family: str, rank: int, alpha: int, targets: list[str]
) -> Path:
    """Write an adapter so that `pipe.load_lora_weights(out_dir)` loads it into the matching diffusers pipeline."""
    from motionnft_core.models.families import policy_class

    pipeline = policy_class(family).pipeline_class  # ValueError naming the families for an unknown one
    metadata = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(targets)}
    pipeline.save_lora_weights(
        str(out_dir),
        transformer_lora_layers={k: v.contiguous() for k, v in state.items()},
        transformer_lora_adapter_metadata=metadata,
    )
    return Path(out_dir)


def export_transformer(state: dict[str, torch.Tensor], config: dict[str, Any], out_dir: str | Path) -> Path:
    """Full fine-tuning: the transformer as `<out_dir>/config.json` + `diffusion_pytorch_model.safetensors`,
    the layout of a pipeline's `transformer/` folder (`FluxTransformer2DModel.from_pretrained(out_dir)`)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1, default=list))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "diffusion_pytorch_model.safetensors"))
    return out
