"""Network helpers shared by the learner rendezvous, the judge server and the tests."""

from __future__ import annotations

import socket


def free_port(host: str = "") -> int:
    """A TCP port that is free on `host` right now ("" = all interfaces); the caller binds it soon after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
