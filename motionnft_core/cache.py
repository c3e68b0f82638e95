"""Things built once into the local cache (tiny models, synthetic data, the demo warm start) and reused.

Two rules keep such a cache safe when several processes share it: a build is written to a sibling temporary
directory and renamed into place, so no reader ever sees half of it; and the directory name carries a hash of
the builder's source (`builder_key`), so a code change never reuses what older code built.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType


def builder_key(*sources: ModuleType | Path) -> str:
    """A short hash of what a build depends on (modules' source, data files): caches of what it built are never
    reused across changes of any of them."""
    digest = hashlib.sha256()
    for source in sources:
        path = Path(source.__file__) if isinstance(source, ModuleType) else Path(source)
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def build_atomically(
    out_dir: str | os.PathLike, write: Callable[[Path], None], *, complete: Callable[[Path], bool], what: str
) -> Path:
    """Run `write(tmp)` on a sibling temp dir and rename it into place, so no reader sees a half-written build.

    Idempotent: a complete `out_dir` is returned untouched; a non-empty incomplete one is an error. If another
    process renames first, its complete result is kept.
    """
    out_dir = Path(out_dir)
    if complete(out_dir):
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists but is not a complete {what}; remove it first")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write(tmp)
        os.rename(tmp, out_dir)  # atomic; also replaces an empty out_dir
    except OSError:
        if not complete(out_dir):  # another builder won the race: keep theirs
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
