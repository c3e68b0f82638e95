"""A real multi-node Ray cluster on this one machine, for tests.

Every node runs in its own network namespace (its own IP on a private bridge, no route anywhere else) and its own
mount namespace, where a private tmpfs is mounted at `disk`: the node's temp dir, Ray temp dir and model cache
live there, so a file one node writes is not on another's disk, and a server bound to 127.0.0.1 is unreachable
from other nodes, as on a real cluster. An S3 server (moto) runs in a namespace of its own. Jobs are submitted
with `ray job submit` from inside the head's namespaces; the driver runs on the head.

Names carry a per-run tag (namespaces, bridge, veths, the mount point), so parallel runs cannot collide, and
`stop()` removes exactly what `start()` made: processes by PID (every process left in this run's namespaces),
then the namespaces and the bridge. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = str(Path(sys.executable).parent)
SUBNET = "10.77.0"  # exists only inside this run's namespaces, behind a bridge with no address of its own
HEAD_PORT, DASHBOARD_PORT, S3_PORT = 6379, 8265, 5000  # each namespace has its own ports: no clash possible


def can_run() -> str | None:
    """Why this machine cannot host the harness, or None."""
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces)"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs the `{tool}` command"
    return None


@dataclass
class Node:
    name: str  # head | a | b | s3
    index: int
    resources: dict[str, float] = field(default_factory=dict)
    num_cpus: int = 0
    process: subprocess.Popen | None = None

    def ip(self) -> str:
        return f"{SUBNET}.{self.index + 1}"


class NamespacedCluster:
    """A head (runs the driver; no CPUs unless `head_cpus`), worker nodes with custom resources, and an S3 server.

    `workers`: name -> (CPUs, custom resources). `disk` is the private mount point on every node; `env` is
    what every node (and so every Ray worker and job there) inherits on top of the caller's environment.

    `autoscale`: node types (name -> {resources, min_workers, max_workers}) for Ray's real autoscaler with its
    fake multi-node provider: the head runs the autoscaler, which starts and stops
    those nodes as local raylets in the head's namespaces (so they share its disk).
    """

    def __init__(self, workers: dict[str, tuple[int, dict[str, float]]], *, log_dir: Path, head_cpus: int = 0,
                 autoscale: dict[str, dict] | None = None, idle_timeout_s: float = 6.0) -> None:  # fmt: skip
        self.head_cpus, self.autoscale, self.idle_timeout_s = head_cpus, autoscale, idle_timeout_s
        self.tag = uuid.uuid4().hex[:6]
        self.disk = f"/tmp/mn-{self.tag}"
        self.log_dir = Path(log_dir)
        self.nodes = [Node("head", 0)]
        for i, (name, (cpus, resources)) in enumerate(workers.items(), start=1):
            self.nodes.append(Node(name, i, resources, cpus))
        self.s3_node = Node("s3", len(self.nodes))
        self.bridge = f"brmn{self.tag}"
        self._made_ns: list[str] = []
        self._made_bridge = False
        self.timings: dict[str, float] = {}

    # ---------------------------------------------------------------- names

    def ns(self, node: Node) -> str:
        return f"mn{self.tag}{node.index}"

    def node(self, name: str) -> Node:
        return next(n for n in [*self.nodes, self.s3_node] if n.name == name)

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.s3_node.ip()}:{S3_PORT}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.head.ip()}:{DASHBOARD_PORT}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key in [k for k in env if k.startswith(("AWS_", "RAY_"))]:
            env.pop(key)
        env.update(
            PATH=VENV_BIN + os.pathsep + env.get("PATH", ""),  # the job's `python` is this venv's
            HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
            TMPDIR=f"{self.disk}/tmp",  # node-local temp files land on the private disk
            AWS_ENDPOINT_URL=self.s3_endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
            AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
        )  # fmt: skip
        if self.autoscale is not None:  # the fake provider refuses to run without it; a decision every second
            env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        return env

    # ---------------------------------------------------------------- start / stop

    def start(self, timeout_s: float = 180.0) -> NamespacedCluster:
        t0 = time.monotonic()
        try:
            self._network()
            Path(self.disk).mkdir(parents=True, exist_ok=True)  # the mount point; each node mounts its own tmpfs
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._start_s3()
            head = ["--head", f"--port={HEAD_PORT}", f"--dashboard-host={self.head.ip()}",
                    f"--dashboard-port={DASHBOARD_PORT}", f"--num-cpus={self.head_cpus}"]  # fmt: skip
            if self.autoscale is not None:
                head.append(f"--autoscaling-config={self._autoscaler_config()}")
            self._start_ray(self.head, head)
            for node in self.nodes[1:]:
                args = [f"--address={self.head.ip()}:{HEAD_PORT}", f"--num-cpus={node.num_cpus}"]
                if node.resources:
                    args.append(f"--resources={json.dumps(node.resources)}")
                self._start_ray(node, args)
            self._wait_for_nodes(t0 + timeout_s)
        except BaseException:
            self.stop()
            raise
        self.timings["start_s"] = time.monotonic() - t0
        return self

    def _autoscaler_config(self) -> Path:
        """The cluster config the head's autoscaler reads: the fake provider, this run's node types (the wheel
        lacks the example file `AutoscalingCluster` reads, so it is written here in full)."""
        types = {"ray.head.default": {"resources": {"CPU": self.head_cpus}, "node_config": {}, "max_workers": 0}}
        for name, t in self.autoscale.items():
            types[name] = {"node_config": {}, "min_workers": 0, **t}
        config = {
            "cluster_name": f"fake-{self.tag}",
            "max_workers": sum(t["max_workers"] for t in self.autoscale.values()),
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": self.idle_timeout_s / 60,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": f"{self.head.ip()}:{HEAD_PORT}"},
            "auth": {"ssh_user": "nobody"},
            "available_node_types": types,
            "head_node_type": "ray.head.default",
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }  # fmt: skip
        path = self.log_dir / "autoscaler.json"
        path.write_text(json.dumps(config))
        return path

    def _run(self, *cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True, timeout=30)

    def _network(self) -> None:
        self._run("ip", "link", "add", self.bridge, "type", "bridge")
        self._made_bridge = True
        self._run("ip", "link", "set", self.bridge, "up")
        for node in [*self.nodes, self.s3_node]:
            ns, veth = self.ns(node), f"vmn{self.tag}{node.index}"
            self._run("ip", "netns", "add", ns)
            self._made_ns.append(ns)
            self._run("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
            self._run("ip", "link", "set", f"{veth}p", "netns", ns)
            self._run("ip", "link", "set", veth, "master", self.bridge, "up")
            self._run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{node.ip()}/24", "dev", f"{veth}p")
            self._run("ip", "netns", "exec", ns, "ip", "link", "set", f"{veth}p", "up")
            self._run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def _spawn(self, node: Node, command: str, log_name: str) -> subprocess.Popen:
        """`command` (a shell line) in the node's network namespace and a fresh mount namespace with its private
        disk mounted; its own process group, blocking, so the mount namespace lives as long as it does."""
        script = (f"mount -t tmpfs -o size=6g tmpfs {self.disk} && mkdir -p {self.disk}/tmp {self.disk}/cache "
                  f"&& exec {command}")  # fmt: skip
        with open(self.log_dir / log_name, "ab") as log:
            cmd = ["ip", "netns", "exec", self.ns(node), "unshare", "-m", "--propagation=private", "bash", "-c", script]
            return subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    def _start_s3(self) -> None:
        node = self.s3_node
        node.process = self._spawn(node, f"{sys.executable} -m moto.server -H {node.ip()} -p {S3_PORT}", "s3.log")
        deadline = time.monotonic() + 60
        while self.in_node(node, ["curl", "-s", "-o", "/dev/null", f"{self.s3_endpoint}/moto-api/"],
                           check=False).returncode != 0:  # fmt: skip
            if node.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto did not start; log:\n{(self.log_dir / 's3.log').read_text()[-2000:]}")
            time.sleep(0.3)

    def _start_ray(self, node: Node, args: list[str]) -> None:
        ray = os.path.join(VENV_BIN, "ray")
        cmd = [ray, "start", "--block", f"--node-ip-address={node.ip()}", f"--temp-dir={self.disk}/ray",
               "--object-store-memory=300000000", "--disable-usage-stats", *args]  # fmt: skip
        node.process = self._spawn(node, " ".join(f"'{a}'" for a in cmd), f"ray-{node.name}.log")

    def _wait_for_nodes(self, deadline: float) -> None:
        want = len(self.nodes)
        probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")  # fmt: skip
        while True:
            for node in self.nodes:
                if node.process.poll() is not None:
                    log = (self.log_dir / f"ray-{node.name}.log").read_text()[-3000:]
                    raise RuntimeError(f"ray node {node.name} exited with {node.process.returncode}:\n{log}")
            out = self.in_node(self.head, [sys.executable, "-c", probe, f"{self.head.ip()}:{HEAD_PORT}"], check=False)
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(want)]:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{want} Ray nodes not alive in time; last probe: {out.stdout[-500:]}"
                                   f"{out.stderr[-1500:]}")  # fmt: skip
            time.sleep(2)

    def in_node(self, node: Node, cmd: list[str], *, check: bool = True, timeout: float = 120,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:  # fmt: skip
        """Run `cmd` in the node's network and mount namespaces (it sees the node's private disk)."""
        ns_cmd = ["ip", "netns", "exec", self.ns(node), "nsenter", f"--mount=/proc/{node.process.pid}/ns/mnt", *cmd]
        if node.process.poll() is not None:  # the node is gone: its mount namespace with it
            ns_cmd = ["ip", "netns", "exec", self.ns(node), *cmd]
        out = subprocess.run(ns_cmd, env={**self.env(), **(env or {})}, capture_output=True, text=True,
                             timeout=timeout)  # fmt: skip
        if check and out.returncode != 0:
            raise RuntimeError(f"{cmd[:4]} failed in node {node.name} ({out.returncode}):\n{out.stdout[-3000:]}\n"
                               f"{out.stderr[-3000:]}")  # fmt: skip
        return out

    def kill_node(self, name: str) -> int:
        """A whole worker node dies at once: every process in its namespaces is SIGKILLed (its private disk goes
        with its mount namespace). Returns how many processes were killed."""
        node = self.node(name)
        pids = subprocess.run(["ip", "netns", "pids", self.ns(node)], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.process.wait(timeout=30)
        return len(pids)

    def replace_node(self, name: str) -> None:
        """Start a replacement for a dead worker node, as an autoscaler would: a new Ray node (fresh disk) with the
        same IP and resources. It joins once its raylet registers; work that needs it waits for it meanwhile."""
        node = self.node(name)
        args = [f"--address={self.head.ip()}:{HEAD_PORT}", f"--num-cpus={node.num_cpus}"]
        if node.resources:
            args.append(f"--resources={json.dumps(node.resources)}")
        self._start_ray(node, args)

    def submit(self, entrypoint: list[str], *, working_dir: Path | None = None, runtime_env: dict | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:  # fmt: skip
        """`ray job submit` of `entrypoint` from the head's namespaces; waits for the job to end."""
        ray = os.path.join(VENV_BIN, "ray")
        cmd = [ray, "job", "submit", f"--address={self.dashboard}"]
        if working_dir is not None:
            cmd.append(f"--working-dir={working_dir}")
        if runtime_env:
            cmd.append(f"--runtime-env-json={json.dumps(runtime_env)}")
        cmd += ["--", *entrypoint]
        for _ in range(30):  # the dashboard answers before the head's job agent registers: wait for the agent
            out = self.in_node(self.head, cmd, check=False, timeout=timeout)
            if "No available agent to submit job" not in out.stdout + out.stderr:
                return out
            time.sleep(2)
        return out

    def s3(self, code: str) -> str:
        """Run python `code` (boto3 as `s3`) next to the S3 server; returns its stdout."""
        prog = "import boto3, json, sys\ns3 = boto3.client('s3')\n" + code
        return self.in_node(self.s3_node, [sys.executable, "-c", prog]).stdout

    def stop(self) -> None:
        for node in [*reversed(self.nodes), self.s3_node]:  # one by one: a worker drains through the head's GCS
            if node.process is not None:
                if node.process.poll() is None:
                    _signal_group(node.process.pid, signal.SIGTERM)
                try:
                    node.process.wait(timeout=10)  # a node that outlives SIGTERM this long is killed
                except subprocess.TimeoutExpired:
                    _signal_group(node.process.pid, signal.SIGKILL)
                    node.process.wait(timeout=10)
        for ns in self._made_ns:  # anything still running in this run's namespaces, by PID
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.5 if self._made_ns else 0)
        for ns in self._made_ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made_ns = []
        if self._made_bridge:
            for node in [*self.nodes, self.s3_node]:
                subprocess.run(["ip", "link", "del", f"vmn{self.tag}{node.index}"], capture_output=True)
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
            self._made_bridge = False
        shutil.rmtree(self.disk, ignore_errors=True)  # only the empty mount point is left on the real /tmp


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
