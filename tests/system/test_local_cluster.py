"""The embedded cluster (learner/driver/local_cluster.py) listens on loopback only, and none of its processes outlives a
SIGKILLed driver: a real driver process runs a task and an actor, every TCP socket its process tree listens on is
read from /proc, then the driver is SIGKILLed and its whole tree and those sockets must be gone within a bound."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow  # 6-11 s measured on the 2-core dev box

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90.0
GONE_TIMEOUT_S = 15.0  # measured: 0.2-0.5 s with the watchdog; 60 s for the agents without it

DRIVER = """
import os, time
import ray
from learner.driver.local_cluster import start_local_ray

start_local_ray(2)

@ray.remote
def task():
    return os.getpid()

@ray.remote
class Actor:
    def pid(self):
        return os.getpid()

actor = Actor.remote()
print("task", ray.get(task.remote()), "actor", ray.get(actor.pid.remote()))
print("node", ray.nodes()[0]["NodeManagerAddress"])
print("READY", flush=True)
time.sleep(600)
"""


def _listening_tcp() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket in this network namespace."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)  # 32-bit words in host (little-endian) order
            ip = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
            found[int(fields[9])] = (str(ip), int(hex_port, 16))
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 on a dual-stack socket


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (an orphaned zombie holds no port; whether PID 1 reaps it is not ours to test)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {proc.name()}"
    except psutil.Error:
        return str(proc.pid)


def test_embedded_cluster_listens_on_loopback_and_dies_with_its_driver(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, env=env, stdout=out, stderr=out,
                                  start_new_session=True)  # fmt: skip
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "READY" not in log.read_text():
            assert driver.poll() is None and time.monotonic() < deadline, f"driver not ready:\n{log.read_text()}"
            time.sleep(0.2)
        assert "\nnode 127.0.0.1\n" in log.read_text(), log.read_text()
        driver_proc = psutil.Process(driver.pid)
        tree = [driver_proc, *driver_proc.children(recursive=True)]
        names = {p.name() for p in tree}
        assert {"gcs_server", "raylet", "ray::Actor"} <= names, names

        listening = _listening_tcp()
        sockets = {inode: (_describe(p), *listening[inode]) for p in tree for inode in _socket_inodes(p.pid)
                   if inode in listening}  # fmt: skip
        # GCS, raylet (node manager + object manager), the core workers of the driver, task and actor at least.
        assert len(sockets) >= 5, sockets
        exposed = [s for s in sockets.values() if not _is_loopback(s[1])]
        assert not exposed, f"listening beyond loopback (process, address, port): {exposed}"

        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        killed_at = time.monotonic()
        while True:
            survivors = [_describe(p) for p in tree if _alive(p)]
            still_listening = [s for inode, s in sockets.items() if inode in _listening_tcp()]
            if not survivors and not still_listening:
                break
            assert time.monotonic() - killed_at < GONE_TIMEOUT_S, (
                f"{GONE_TIMEOUT_S} s after the driver's SIGKILL: alive {survivors}, listening {still_listening}"
            )
            time.sleep(0.1)
        print(f"{len(tree)} processes, {len(sockets)} listening sockets, all gone "
              f"{time.monotonic() - killed_at:.1f} s after the driver's SIGKILL")  # fmt: skip
    finally:  # whatever is left, by PID (psutil checks a PID still names the same process)
        if driver.poll() is None:
            tree += psutil.Process(driver.pid).children(recursive=True)
            driver.kill()
            driver.wait()
        for proc in tree:
            try:
                proc.kill()
            except psutil.Error:
                pass
