"""What the tests need of a store beyond what the service does: seeding an S3 prefix with a local tree, and a
local copy of a checkpoint to look inside."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from learner.trainer.checkpoint import CheckpointManager, step_name
from motionnft_core import s3


def upload_dir(src_dir: str | os.PathLike, uri: str) -> None:
    """Every file under `src_dir` to the prefix `uri`, keeping relative paths."""
    src_dir = Path(src_dir)
    assert src_dir.is_dir(), src_dir
    for path in sorted(p for p in src_dir.rglob("*") if p.is_file()):
        s3.upload_file(path, f"{uri.rstrip('/')}/{path.relative_to(src_dir).as_posix()}")


def local_copy(ckpt: CheckpointManager, step: int, cache: Path) -> Path:
    """A local directory holding checkpoint `step`: the directory itself, or a fresh download of its S3 prefix
    under `cache`, one folder per checkpoint root (never a stale copy: DCP shards of one model have identical
    sizes)."""
    where = ckpt.location(step)
    if not ckpt.remote:
        return Path(where)
    root_key = hashlib.blake2b(ckpt.root.encode(), digest_size=6).hexdigest()
    dest = cache / root_key / step_name(step)
    shutil.rmtree(dest, ignore_errors=True)
    return s3.download_prefix(where, dest, retry=ckpt.retry)
