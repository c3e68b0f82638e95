"""Network helpers shared by the learner rendezvous, the judge server and the tests."""

from __future__ import annotations

import os
import socket


def free_port(host: str = "") -> int:
    """A TCP port that is free on `host` right now ("" = all interfaces); the caller binds it soon after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def node_address() -> str:
    """The address this process's Ray node registered with: what other nodes reach it by (127.0.0.1 on the
    embedded cluster, learner/driver/local_cluster.py). `ray.util.get_node_ip_address()` is not it inside a worker:
    there it guesses from the default route, which on a multi-homed machine names some other interface."""
    import ray

    return ray._private.worker.global_worker.node_ip_address  # no public accessor in Ray 2.60


def whereabouts() -> str:
    """"pid P on ADDRESS": where an actor runs, for the start-up summary and for operators."""
    return f"pid {os.getpid()} on {node_address()}"
