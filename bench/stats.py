"""How the benchmarks report: a ratio as the median over repeated rounds, with its range (one round on a
busy 2-core machine is noise, and bench/README.md quotes the median and range with the date and the machine), and a
run's record as one JSON line appended to a results file."""

from __future__ import annotations

import json
import os
import platform
import statistics
from datetime import date
from pathlib import Path


def ratio_line(ratios: list[float]) -> str:
    """`ratio 1.23 (range 1.10-1.40 over 3 rounds)`: the word `ratio`, then the median."""
    if not ratios:
        raise ValueError("no rounds to report")
    median, low, high = statistics.median(ratios), min(ratios), max(ratios)
    return f"ratio {median:.2f} (range {low:.2f}-{high:.2f} over {len(ratios)} rounds)"


def machine() -> str:
    """Date and machine, for the line a README quotes."""
    return f"{date.today().isoformat()}, {platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"


def append_record(results: str | Path, record: dict) -> None:
    """Append `record` as one JSON line to `results` (its folder made if missing)."""
    path = Path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
