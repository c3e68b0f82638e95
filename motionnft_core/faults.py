"""Fault injection for the resilience and scaling tests: a real SIGKILL, or a stall, at an exact point, which a
timed external action cannot hit.

MOTIONNFT_KILL_AT lists points `<name>:<n>`, comma-separated; a process (driver or actor) that reaches one
SIGKILLs itself there. With MOTIONNFT_FAULT_DIR set, each point fires once (its marker file is made first), so a
restarted worker or a resumed run goes past it. MOTIONNFT_SLOW_AT lists `<name>:<first>-<last>=<seconds>`: a
process reaching point `<name>:<n>` with first <= n <= last sleeps that long there (a bottleneck that moves, for
the elastic rollout pool's test). Unset, nothing happens: two dictionary lookups per call.
"""

from __future__ import annotations

import os
import signal
import time


def fault_point(name: str, n: int) -> None:
    if slow := os.environ.get("MOTIONNFT_SLOW_AT"):
        time.sleep(stall_at(slow, name, n))
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


def stall_at(spec: str, name: str, n: int) -> float:
    """Seconds to sleep at point `name:n` under a MOTIONNFT_SLOW_AT `spec` (the sum of the entries that match)."""
    total = 0.0
    for entry in filter(None, (x.strip() for x in spec.split(","))):
        try:
            point, seconds = entry.split("=")
            where, span = point.rsplit(":", 1)
            first, _, last = span.partition("-")
            if where == name and int(first) <= n <= int(last or first):
                total += float(seconds)
        except ValueError:
            raise ValueError(f"MOTIONNFT_SLOW_AT: {entry!r} is not <name>:<first>-<last>=<seconds>") from None
    return total
