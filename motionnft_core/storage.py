"""Start-up probes of the places a run writes (`checkpoint.dir`, `logging.dir`), local dirs or s3:// prefixes.

A checkpoint dir that cannot be written should stop a run before any pool starts, not at the first save hours
later: `check_writable(where)` writes a small probe there and removes it, raising an error that names the path
(or URI) and the cause. The S3 side is `motionnft_core.s3.check_writable`; this module adds the local one and picks.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

PROBE_PREFIX = ".motionnft-probe-"


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Create the local directory `path` (and parents) if needed, write a probe file in it and delete it;
    returns the resolved directory. Raises an OSError of the failing errno (PermissionError, NotADirectoryError,
    FileExistsError, read-only filesystem, disk full ...) whose message names the directory and the step."""
    if not str(path).strip():
        raise ValueError("check_writable_dir: empty path")
    where = Path(path).expanduser()
    probe = where / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    step = "create the directory"
    try:
        where.mkdir(parents=True, exist_ok=True)
        step = "write a file in it"
        probe.write_bytes(b"motionnft probe\n")
        step = "delete a file in it"
        probe.unlink()
    except OSError as err:
        message = f"local dir {str(where)!r} is not writable: cannot {step} ({err.strerror or err})"
        raise (OSError(err.errno, message) if err.errno is not None else OSError(message)) from err
    return where.resolve()


def check_writable(where: str) -> None:
    """`motionnft_core.s3.check_writable` for an s3:// URI, else `check_writable_dir`: raises FileNotFoundError (missing
    bucket), `motionnft_core.s3.S3Error` (credentials, endpoint, access) or OSError (local), each naming `where`."""
    from motionnft_core import s3  # boto3 is imported only when needed

    if s3.is_s3_uri(where):
        s3.check_writable(where, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
    else:
        check_writable_dir(where)
