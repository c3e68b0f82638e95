"""Which Ray cluster a command joins: the one place training and evaluation decide it, so both run alike under
`ray job submit`, on a named cluster or on a laptop."""

from __future__ import annotations

import os

import ray

from learner.driver.local_cluster import start_local_ray
from motionnft_core.config import Config


def init_ray(cfg: Config) -> bool:
    """Join `cluster.address` / RAY_ADDRESS, or start an embedded one-machine cluster; True for the latter."""
    if ray.is_initialized():  # a caller (a test, a notebook) already chose the cluster
        return len(ray.nodes()) == 1
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
        return False
    # Loopback only; its processes end with this one.
    start_local_ray(cfg.cluster.num_cpus or None, metrics_export_port=cfg.cluster.metrics_export_port)
    return True
