"""Which Ray cluster a command joins: the one place training, evaluation and the curation decide it, so all of them
run alike under `ray job submit`, on a named cluster or on a laptop."""

from __future__ import annotations

import os
from typing import Any

import ray

from learner.driver.local_cluster import start_local_ray
from motionnft_core.config import Config


def join_or_start(address: str, num_cpus: int, **local: Any) -> bool:
    """Join `address` (a `cluster.address`; empty: RAY_ADDRESS, as under `ray job submit`), or else start the
    embedded one-machine cluster (`num_cpus` 0: the machine's; `local` goes to `start_local_ray`). True when this
    call started the cluster, so that the caller's process owns it."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
        return False
    # Loopback only; its processes end with this one.
    start_local_ray(num_cpus or None, **local)
    return True


def init_ray(cfg: Config) -> bool:
    """Join `cluster.address` / RAY_ADDRESS, or start an embedded one-machine cluster; True for a one-machine
    cluster (the embedded one, or one a caller had already initialised with a single node)."""
    if ray.is_initialized():  # a caller (a test, a notebook) already chose the cluster
        return len(ray.nodes()) == 1
    return join_or_start(cfg.cluster.address, cfg.cluster.num_cpus, metrics_export_port=cfg.cluster.metrics_export_port)
