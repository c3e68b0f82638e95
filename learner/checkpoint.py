"""Checkpoints: sharded learner state with torch.distributed.checkpoint, driver state, a diffusers LoRA export.

Layout under `checkpoint.dir` (a local dir or s3://bucket/prefix)::

    step_00000020/learner/      DCP shards (θ, old, eval EMA, optimizer, step) written by every rank
    step_00000020/driver.json   step, policy version, data cursor, banned prompts, resolved config
    step_00000020/lora/         the eval-EMA adapter as pytorch_lora_weights.safetensors (diffusers layout)
    step_00000020/COMMITTED     written last: a checkpoint without it is never picked up

Local checkpoints are assembled under `.tmp-step_*` and renamed into place; S3 ones are staged in a local
dir, uploaded, and committed by uploading the marker last (a step written again first loses its marker, then
its old objects). The local cache of an S3 root (staging, restores) is keyed by the root, and a restore is
downloaded afresh, so two runs sharing a cache never read each other's shards (DCP shards of one model have
identical sizes, so a size-based cache check cannot tell them apart).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from common import s3

MARKER = "COMMITTED"
_STEP_DIR = re.compile(r"step_(\d+)")


def save_sharded(state: dict[str, Any], path: str | Path) -> None:
    """Collective: every rank writes its shards of `state` (DTensors stay sharded) under `path`."""
    dcp.save(state, checkpoint_id=str(path))


def load_sharded(state: dict[str, Any], path: str | Path) -> None:
    """Collective: loads in place into the tensors of `state` (resharding if the world size changed)."""
    dcp.load(state, checkpoint_id=str(path))


def step_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    """Driver-side bookkeeping: where step N goes, which checkpoint is the latest complete one, retention."""

    def __init__(self, root: str, *, keep: int, cache_dir: str | Path) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint keep must be >= 1 (the newest checkpoint is never deleted), got {keep}")
        self.root, self.keep = str(root).rstrip("/"), keep
        self.remote = s3.is_s3_uri(self.root)
        root_key = hashlib.blake2b(self.root.encode(), digest_size=6).hexdigest()
        self.cache = Path(cache_dir).expanduser() / "checkpoints" / root_key  # one cache per root
        if self.remote:
            s3.split_s3_uri(self.root)  # a malformed URI fails here, not at the first save
        else:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- writing

    def staging_dir(self, step: int) -> Path:
        """Where the ranks write step N before it is committed (same filesystem as the root when local)."""
        base = self.cache / "staging" if self.remote else Path(self.root)
        path = base / f".tmp-{step_name(step)}"
        if path.exists():
            shutil.rmtree(path)  # a crashed earlier attempt at the same step
        path.mkdir(parents=True)
        return path

    def commit(self, step: int, staging: Path, driver_state: dict[str, Any]) -> str:
        """Write driver.json, then atomically make the checkpoint visible; returns its location."""
        (staging / "driver.json").write_text(json.dumps(driver_state, indent=1))
        (staging / MARKER).write_text(str(step))
        if self.remote:
            uri = f"{self.root}/{step_name(step)}"
            # A step written before (a re-run after a crash) must not look complete while it is overwritten,
            # nor keep shards the new save does not have: its marker goes first, then everything else.
            bucket, key = s3.split_s3_uri(f"{uri}/{MARKER}")
            s3.s3_client().delete_object(Bucket=bucket, Key=key)
            s3.delete_prefix(uri)
            s3.upload_dir(staging, uri, skip={MARKER})
            s3.upload_file(staging / MARKER, f"{uri}/{MARKER}")  # last: only now is it complete
            shutil.rmtree(staging)
            location = uri
        else:
            final = Path(self.root) / step_name(step)
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
            location = str(final)
        self._prune()
        return location

    def _prune(self) -> None:
        for step in self.complete_steps()[: -self.keep]:
            if self.remote:
                s3.delete_prefix(f"{self.root}/{step_name(step)}")
            else:
                shutil.rmtree(Path(self.root) / step_name(step), ignore_errors=True)

    # ---------------------------------------------------------------- reading

    def complete_steps(self) -> list[int]:
        """Steps whose `step_N/COMMITTED` marker exists, ascending (staging dirs and partial uploads never)."""
        if self.remote:
            children = [k[len(self.root) + 1 :].split("/") for k in s3.list_prefix(self.root)]
            names = {parts[0] for parts in children if len(parts) == 2 and parts[1] == MARKER}
        else:
            names = {p.parent.name for p in Path(self.root).glob(f"step_*/{MARKER}")}
        return sorted(int(m.group(1)) for n in names if (m := _STEP_DIR.fullmatch(n)))

    def latest(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def local_copy(self, step: int) -> Path:
        """A local directory holding checkpoint `step` (from S3: downloaded afresh, never a stale copy)."""
        if not self.remote:
            path = Path(self.root) / step_name(step)
            if not (path / MARKER).is_file():
                raise FileNotFoundError(f"checkpoint {path} is not complete (no {MARKER} marker)")
            return path
        uri = f"{self.root}/{step_name(step)}"
        if f"{uri}/{MARKER}" not in s3.list_prefix(uri):
            raise FileNotFoundError(f"checkpoint {uri} is not complete (no {MARKER} marker)")
        dest = self.cache / "restore" / step_name(step)
        shutil.rmtree(dest, ignore_errors=True)
        return s3.download_prefix(uri, dest)

    def driver_state(self, step: int) -> dict[str, Any]:
        return json.loads((self.local_copy(step) / "driver.json").read_text())


def export_lora(
    state: dict[str, torch.Tensor], out_dir: str | Path, *, family: str, rank: int, alpha: int, targets: list[str]
) -> Path:
    """Write an adapter so that `pipe.load_lora_weights(out_dir)` loads it into the matching diffusers pipeline."""
    from diffusers import FluxKontextPipeline, QwenImageEditPipeline

    pipelines = {"flux_kontext": FluxKontextPipeline, "qwen_image_edit": QwenImageEditPipeline}
    if family not in pipelines:
        raise ValueError(f"export_lora: family must be one of {sorted(pipelines)}, got {family!r}")
    pipeline = pipelines[family]
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
