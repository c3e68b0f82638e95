"""How the entries (`learner.main`, `evaluation.main`, `curation.main`) end: one line on stderr and an exit status
for the failures a user can act on, never a traceback, and the same `config error: ...` line and status 2 whether
the config is refused at load (`config_loader.exit_on_config_error`) or once the run knows its checkpoints or
cluster."""

from __future__ import annotations

import sys
from collections.abc import Callable

from motionnft_core.config import ConfigError

Failure = tuple[type[BaseException] | tuple[type[BaseException], ...], str, int]  # (exceptions, label, exit status)


def run_command(body: Callable[[], object], *failures: Failure) -> int:
    """`body()`'s exit status: 0 once it returns; a ConfigError prints `config error: <message>` and is 2; an
    exception of one of `failures` (exceptions, label, status), the first that matches, prints `<label>: <message>`
    and is its status. Any other exception propagates (a bug: its traceback is wanted)."""
    try:
        body()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        for kinds, label, status in failures:
            if isinstance(e, kinds):
                print(f"{label}: {e}", file=sys.stderr, flush=True)
                return status
        raise
    return 0
