"""Fault injection for the resilience tests: a real SIGKILL at an exact point, which a timed external kill
cannot hit.

MOTIONNFT_KILL_AT lists points `<name>:<n>`, comma-separated; a process (driver or actor) that reaches one
SIGKILLs itself there. With MOTIONNFT_FAULT_DIR set, each point fires once (its marker file is made first), so a
restarted worker or a resumed run goes past it. Unset, nothing happens: one dictionary lookup per call.
"""

from __future__ import annotations

import os
import signal


def fault_point(name: str, n: int) -> None:
    point = f"{name}:{n}"
    if point not in os.environ.get("MOTIONNFT_KILL_AT", "").split(","):
        return
    if marker_dir := os.environ.get("MOTIONNFT_FAULT_DIR"):
        try:
            os.close(os.open(os.path.join(marker_dir, point), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
    print(f"fault injection: SIGKILL at {point} (pid {os.getpid()})", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
