"""The embedded one-machine Ray cluster: bound to loopback, and gone within a second of its driver.

Loopback. `ray.init(address="local")` registers the node on the machine's routable address, and Ray 2.60 binds
by the node address: measured, the C++ gRPC servers (GCS, raylet node manager and object manager, every core
worker) listen on all interfaces ("::") and the Python ones (dashboard agent gRPC, HTTP and metrics export,
runtime env agent, autoscaler and dashboard-head metrics) on 0.0.0.0 or the routable address, but all of them on
127.0.0.1 when the node address is 127.0.0.1 (the Python ones check `is_localhost(node ip)` in their sources).
`_node_ip_address="127.0.0.1"` alone does not help: ray.init rewrites a loopback node address to the
routable one (`services.resolve_ip_for_localhost`) unless `ray_constants.ENABLE_RAY_CLUSTER` is off (Ray's
single-machine mode of Windows and macOS; env `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`, read when ray is imported,
which in the driver has happened long before). So the flag is turned off in this process during ray.init only
(left off, this process would take itself for 127.0.0.1 when it later joins another cluster; set in the
environment, it would make a `ray start --address` child refuse to join one; Ray's own children need neither:
they get the node address on their command lines). The node then
registers on 127.0.0.1 and, measured with Ray 2.60 on Linux, every TCP socket of the cluster listens on 127.0.0.1
(IPv4, or IPv4-mapped on a dual-stack IPv6 socket): GCS, raylet (node manager, object manager), the core workers
of the driver, tasks and actors, dashboard agent (gRPC, HTTP, metrics export), runtime env agent, autoscaler
monitor and dashboard-head metrics. There is no exception, and start_local_ray raises if Ray registered the node
anywhere else. (The raylet and plasma store sockets are Unix sockets in the session dir, as always.)

Lifetime. When the driver is SIGKILLed, its direct children (GCS, raylet, monitor, log monitor, dashboard head)
die at once (Ray sets PR_SET_PDEATHSIG on them) and the workers within about 2 s, but the dashboard agent and the
runtime env agent, having noticed the raylet's death, spend 60 s trying to report it to the dead GCS, holding
their ports. So a watchdog (this file run as a script: own session, standard library only) waits on a pipe whose
write end only the driver holds. Once the driver is gone, however it ended, the watchdog SIGKILLs every process
that holds a file in the cluster's session dir (each of them keeps its logs and stdout/stderr there; the
agents' environment cannot mark them, setproctitle overwrites it), together with their descendants, rescanning
until none is left. Not covered: a driver killed during ray.init itself (before the session dir is known); a
forked (not exec'd) child of the driver inherits the write end, so the watchdog acts once that child ends too.
Linux only (/proc).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_LOOPBACK = "127.0.0.1"
_REAP_TIMEOUT_S = 10.0  # the watchdog stops rescanning after this long
_watchdogs: list[subprocess.Popen] = []  # referenced, so that no "still running" ResourceWarning is raised


def start_local_ray(num_cpus: int | None, *, metrics_export_port: int = 0, **init: Any) -> None:
    """Start the embedded cluster on loopback (`ray.init(address="local")`); its processes die with this one.
    Its Prometheus endpoint (Ray's metrics and ours, motionnft_core/telemetry.py) listens on 127.0.0.1 at
    `metrics_export_port` (0: a free port Ray picks), printed. `init` goes to `ray.init` as it is (custom
    `resources`, a `runtime_env`: the scale simulation's)."""
    import ray
    import ray._private.ray_constants as ray_constants  # no public switch for a loopback node (module docstring)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # one machine, a private cluster: no token auth
    watchdog = _start_watchdog()
    enabled, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address=_LOOPBACK,
                           _metrics_export_port=metrics_export_port or None, **init)  # fmt: skip
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = enabled
    try:
        os.write(watchdog, context.address_info["session_dir"].encode())  # the write end stays open until we end
    except BrokenPipeError:
        ray.shutdown()
        raise RuntimeError("the embedded Ray cluster's watchdog died: nothing would end the cluster with us") from None
    if (address := ray.util.get_node_ip_address()) != _LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"Ray {ray.__version__} registered the embedded node on {address}, not on loopback")
    if (port := context.address_info["metrics_export_port"]) and port > 0:  # -1: RAY_enable_metrics_collection=0
        print(f"metrics: http://{_LOOPBACK}:{port}/metrics (Prometheus; cluster/grafana_dashboard.json)", flush=True)


def _start_watchdog() -> int:
    """Start this file as a watchdog; returns the write end of its pipe (close-on-exec: Ray's processes lack it)."""
    read_end, write_end = os.pipe()
    watchdog = subprocess.Popen(
        [sys.executable, "-I", str(Path(__file__).resolve()), str(read_end)],
        pass_fds=(read_end,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # holds no pipe of the driver's: a reader of its output sees EOF when it dies
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a signal to the driver's process group does not reach it
    )
    os.close(read_end)
    _watchdogs.append(watchdog)
    return write_end


def _cluster_processes(session_dir: str) -> set[int]:
    """Live processes holding a file under `session_dir`, and all their descendants."""
    inside, children = set(), {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(proc.name))
            if any(os.readlink(fd).startswith(session_dir + "/") for fd in (proc / "fd").iterdir()):
                inside.add(int(proc.name))
        except (OSError, IndexError, ValueError):  # gone meanwhile, a zombie, or not ours
            pass
    found, todo = set(), list(inside)
    while todo:
        if (pid := todo.pop()) not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def _watch(read_end: int) -> None:
    """Wait until the driver is gone (EOF: it held the only write end), then kill what is left of its cluster."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    received = b""
    while chunk := os.read(read_end, 4096):
        received += chunk
    if not (session_dir := received.decode()):
        return  # the driver died before its cluster was up
    deadline, quiet_scans = time.monotonic() + _REAP_TIMEOUT_S, 0
    while quiet_scans < 3 and time.monotonic() < deadline:  # a dying raylet may still start a worker
        pids = _cluster_processes(session_dir)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        quiet_scans = 0 if pids else quiet_scans + 1
        time.sleep(0.05)


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
