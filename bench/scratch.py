"""Scratch folders of a benchmark run (tiny models, synthetic data, run and checkpoint dirs): made in the system's
temp dir and removed when the process exits, so repeated runs leave nothing behind."""

from __future__ import annotations

import tempfile
from pathlib import Path

_HELD: list[tempfile.TemporaryDirectory] = []  # each removes its folder when collected, at the latest at exit


def scratch_dir(prefix: str) -> Path:
    """A new empty folder, removed at exit (errors ignored: a Ray worker may still be closing a file in it)."""
    folder = tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True)
    _HELD.append(folder)
    return Path(folder.name)
