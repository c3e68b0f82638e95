"""Fault injection for the resilience and scaling tests: a real SIGKILL, or a stall, at an exact point, which a
timed external action cannot hit.

MOTIONNFT_KILL_AT lists points `<name>:<n>`, comma-separated; a process (driver or actor) that reaches one
SIGKILLs itself there. With MOTIONNFT_FAULT_DIR set, each point fires once (its marker file is made first), so a
restarted worker or a resumed run goes past it. MOTIONNFT_SLOW_AT lists `<name>:<first>-<last>=<seconds>`: a
process reaching point `<name>:<n>` with first <= n <= last sleeps that long there (a bottleneck that moves, for
the elastic rollout pool's test). MOTIONNFT_HOLD_AT lists points `<name>:<n>` where a process stops until the
test lets it go (the kill then comes from outside, at that exact point: a node, the judge server, a rank): it
makes `<MOTIONNFT_FAULT_DIR>/<point>.held` and waits for `<point>.go` there; each point holds once (the marker
is made first), so a restarted worker goes past it. Unset, nothing happens: three dictionary lookups per call.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

HOLD_POLL_S = 0.05
HOLD_MAX_S = 900.0  # a test that never lets go (it failed) must not leave a process waiting for ever


def fault_point(name: str, n: int) -> None:
    if slow := os.environ.get("MOTIONNFT_SLOW_AT"):
        time.sleep(stall_at(slow, name, n))
    point = f"{name}:{n}"
    if point in os.environ.get("MOTIONNFT_HOLD_AT", "").split(","):
        hold(point)
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


def hold(point: str, max_s: float = HOLD_MAX_S) -> bool:
    """Wait at `point` until `<point>.go` appears in MOTIONNFT_FAULT_DIR (at most `max_s`); False if another
    process (or an earlier life of this one) held there already."""
    marker_dir = os.environ.get("MOTIONNFT_FAULT_DIR")
    if not marker_dir:
        raise RuntimeError(f"MOTIONNFT_HOLD_AT={point}: set MOTIONNFT_FAULT_DIR, where the held and go markers go")
    held, go = Path(marker_dir, f"{point}.held"), Path(marker_dir, f"{point}.go")
    try:
        os.close(os.open(held, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    held.write_text(str(os.getpid()))
    print(f"fault injection: holding at {point} (pid {os.getpid()}) until {go} exists", flush=True)
    deadline = time.monotonic() + max_s
    while not go.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"fault injection: held at {point} for {max_s:.0f} s and nobody made {go}")
        time.sleep(HOLD_POLL_S)
    return True
