"""Reading a Ray node's Prometheus endpoint in tests: the text format parsed, a scraper that polls while a run is
alive (an actor's series go with its process, so the last values seen are kept), and the queries of
cluster/grafana_dashboard.json."""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[1] / "cluster" / "grafana_dashboard.json"

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    def label(self, key: str) -> str:
        return dict(self.labels).get(key, "")


def parse(text: str, prefix: str = "") -> list[Sample]:
    """The samples of a Prometheus text exposition whose name starts with `prefix`."""
    out = []
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(prefix) or not (m := _SAMPLE.match(line)):
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        out.append(Sample(m.group(1), labels, float(m.group(3))))
    return out


def scrape(port: int, prefix: str = "", *, host: str = "127.0.0.1", timeout_s: float = 2.0) -> list[Sample]:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout_s) as reply:
        return parse(reply.read().decode(), prefix)


class Scraper:
    """Polls `http://<host>:<port>/metrics` in a thread until stopped, keeping the latest value of every series
    whose name starts with `prefix` (refused connections, before the cluster is up, are retried)."""

    def __init__(self, port: int, prefix: str, every_s: float = 0.5, host: str = "127.0.0.1") -> None:
        self.port, self.prefix, self.every_s, self.host = port, prefix, every_s, host
        self.latest: dict[tuple[str, tuple], Sample] = {}
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                samples = scrape(self.port, self.prefix, host=self.host)
            except (urllib.error.URLError, OSError):
                continue
            self.scrapes += 1
            self.latest.update({(s.name, s.labels): s for s in samples})

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def series(self, name: str, **labels: str) -> list[Sample]:
        """The samples named `name` whose labels include `labels`."""
        return [s for (n, _), s in self.latest.items() if n == name and labels.items() <= dict(s.labels).items()]


def dashboard_queries() -> list[str]:
    """The PromQL of every panel target of cluster/grafana_dashboard.json."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def series_named(query: str) -> set[str]:
    """The Ray series a PromQL query reads."""
    return set(re.findall(r"\bray_[a-zA-Z0-9_:]+", query))


def step_keys(query: str) -> list[tuple[str, str]]:
    """The `key` matchers (`=` or `=~`, value) of a query's motionnft_step selectors."""
    return re.findall(r'\bkey(=~?)"([^"]*)"', query) if "ray_motionnft_step" in query else []
