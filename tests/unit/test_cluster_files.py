"""The deployment files stay in step with the code: they parse, and what they launch exists. And they are
secure: Ray token auth on every node (token from a secret or a synced file, never a literal), dashboard and job
server not on public addresses, no credential written in them."""

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from learner.driver.placement import placement_problems, pool_asks
from motionnft_core import telemetry
from motionnft_core.config_loader import load_config
from tests.prometheus import DASHBOARD, dashboard_queries, series_named

ROOT = Path(__file__).resolve().parents[2]
RAYJOB = ROOT / "cluster" / "rayjob.yaml"
AUTOSCALER = ROOT / "cluster" / "autoscaler.yaml"
JUDGE_ENV = "MOTIONNFT_JUDGE_API_KEY"
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
# what a literal credential looks like: an AWS key id, or a long run of token characters (UUID hex, base64, ...)
LITERAL_SECRET = re.compile(r"AKIA[0-9A-Z]{16}|[A-Za-z0-9+/_=-]{32,}")


def _rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def _autoscaler() -> dict:
    return yaml.safe_load(AUTOSCALER.read_text())


def _strings(node):
    """Every key and scalar string in a parsed YAML tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def _ray_containers(job: dict) -> dict[str, dict]:
    """The Ray container of the head and of each worker group, by group."""
    spec = job["spec"]["rayClusterSpec"]
    groups = {"head": spec["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in spec["workerGroupSpecs"]})
    return {name: group["template"]["spec"]["containers"][0] for name, group in groups.items()}


def _all_containers(job: dict) -> list[dict]:
    spec = job["spec"]["rayClusterSpec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    if "submitterPodTemplate" in job["spec"]:
        templates.append(job["spec"]["submitterPodTemplate"])
    return [c for t in templates for key in ("containers", "initContainers") for c in t["spec"].get(key, [])]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _start_commands(cfg: dict) -> dict[str, tuple[dict[str, str], list[str]]]:
    """The `ray start` command of head and workers: (the env assignments before it, its argv)."""
    found = {}
    for role in ("head", "worker"):
        starts = [c for c in cfg[f"{role}_start_ray_commands"] if "ray start" in c]
        assert len(starts) == 1, f"{role}: one `ray start` command expected, got {starts}"
        words = shlex.split(starts[0])
        i = words.index("ray")
        env = dict(w.split("=", 1) for w in words[:i])
        found[role] = (env, words[i:])
    return found


# ---- checks: each returns the problems it finds, so a planted violation can show that it is caught ----


def rayjob_problems(job: dict) -> list[str]:
    problems = []
    spec = job["spec"]["rayClusterSpec"]
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append(f"authOptions.mode is not token: {spec.get('authOptions')}")
    if job["spec"].get("submissionMode") not in ("K8sJobMode", "SidecarMode"):
        problems.append(
            f"submissionMode {job['spec'].get('submissionMode')}: KubeRay gives the token only to its own submitter"
        )
    for c in _all_containers(job):
        env = _env(c)
        if "RAY_AUTH_MODE" in env and env["RAY_AUTH_MODE"].get("value") != "token":
            problems.append(f"{c['name']}: RAY_AUTH_MODE overridden to {env['RAY_AUTH_MODE']}")
        for name, entry in env.items():
            if SECRET_NAME.search(name) and "value" in entry:
                problems.append(f"{c['name']}: {name} is a literal, not a secretKeyRef")
        for port in c.get("ports", []):
            if "hostPort" in port:
                problems.append(f"{c['name']}: hostPort {port['hostPort']} exposes the node")
    head = spec["headGroupSpec"]
    if head.get("serviceType") != "ClusterIP":
        problems.append(f"head serviceType {head.get('serviceType')!r}, not ClusterIP")
    if head.get("enableIngress"):
        problems.append("head ingress enabled")
    if "headService" in head:
        problems.append("headService overrides the head Service (its type is not checked)")
    for template in [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        if template["spec"].get("hostNetwork"):
            problems.append("a Ray pod runs on the host network")
    for s in _strings(job):
        if s in ("NodePort", "LoadBalancer"):
            problems.append(f"{s} service in the RayJob")
    if "RAY_AUTH_MODE" in job["spec"].get("runtimeEnvYAML", ""):
        problems.append("runtimeEnvYAML touches RAY_AUTH_MODE")
    for group, c in _ray_containers(job).items():
        entry = _env(c).get(JUDGE_ENV)
        ref = (entry or {}).get("valueFrom", {}).get("secretKeyRef", {})
        if (ref.get("name"), ref.get("key")) != ("motionnft-judge", "api-key") or "value" in (entry or {}):
            problems.append(f"{group}: {JUDGE_ENV} does not come from secret motionnft-judge/api-key: {entry}")
    return problems


def autoscaler_problems(cfg: dict) -> list[str]:
    problems = []
    mounts = cfg.get("file_mounts", {})
    for role, (env, argv) in _start_commands(cfg).items():
        if env.get("RAY_AUTH_MODE") != "token":
            problems.append(f"{role}: ray start without RAY_AUTH_MODE=token")
        if "RAY_AUTH_TOKEN" in env:
            problems.append(f"{role}: RAY_AUTH_TOKEN is written in the command")
        path = env.get("RAY_AUTH_TOKEN_PATH")
        if path not in mounts:
            problems.append(f"{role}: token path {path!r} is not a file synced with file_mounts {mounts}")
        judge = env.get(JUDGE_ENV)
        if judge is not None and not re.fullmatch(r"\$\(cat [^()]+\)", judge):
            problems.append(f"{role}: {JUDGE_ENV} is not read from a file: {judge!r}")
        if role == "head" and "--dashboard-host=127.0.0.1" not in argv:
            problems.append(f"head: dashboard not bound to 127.0.0.1: {argv}")
    for command in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] + cfg.get("setup_commands", []):
        if "0.0.0.0" in command:
            problems.append(f"a command binds 0.0.0.0: {command}")
    for name, node_type in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            continue
        resources = node_type.get("resources", {})
        if not (resources.get("GPU", 0) > 0 and resources.get("CPU", 0) > 0):
            problems.append(f"node type {name} does not declare its CPUs and GPUs: {resources}")
    return problems


def literal_secret_problems(tree) -> list[str]:
    return [f"looks like a credential: {s!r}" for s in _strings(tree) if LITERAL_SECRET.search(s)]


# ---- tests ----


def test_rayjob_entrypoint_runs_a_shipped_config():
    job = _rayjob()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "learner.main"]
    config = argv[argv.index("--config") + 1]
    load_config(ROOT / config)  # a valid config, not just an existing file
    assert job["spec"]["rayClusterSpec"]["rayVersion"] in (ROOT / "constraints" / "cpu.txt").read_text()


def test_autoscaler_config_parses_and_uses_the_project_image():
    cfg = _autoscaler()
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert cfg["docker"]["image"].startswith("motionnft")
    assert "rayproject/ray:2.60.0" in (ROOT / "Dockerfile").read_text()


def test_the_image_installs_the_dependencies_before_the_code_and_copies_every_package():
    """A code edit must not reinstall torch and vLLM: the dependency layer comes from pyproject.toml alone, the
    code after it, and the project last with --no-deps."""
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    deps = next(i for i, line in enumerate(lines) if "pip install" in line and "-r " in line)
    copies = [line.split()[-1] for line in lines if line.startswith("COPY")]
    packages = {"motionnft_core", "actors", "rewards", "learner", "evaluation"}  # the installed top-level names
    assert packages <= set(copies), f"the image lacks {sorted(packages - set(copies))}"
    first_code = min(i for i, line in enumerate(lines) if line.startswith("COPY") and line.split()[-1] in packages)
    before = [line for line in lines[:deps] if line.startswith("COPY")]
    assert deps < first_code and all(line.split()[-1] == "./" for line in before), before
    assert any("pip install" in line and "--no-deps" in line for line in lines[first_code:])


def test_rayjob_turns_token_auth_on_for_head_workers_and_submitter():
    job = _rayjob()
    spec = job["spec"]["rayClusterSpec"]
    # KubeRay (>= v1.5.1) makes the token Secret and sets RAY_AUTH_MODE=token + RAY_AUTH_TOKEN (secretKeyRef) on the
    # head, workers, autoscaler and the K8sJobMode submitter, and sends the token itself when it polls the job
    assert spec["authOptions"] == {"mode": "token"}
    assert job["spec"]["submissionMode"] == "K8sJobMode"
    major, minor, _ = (int(x) for x in spec["rayVersion"].split("."))
    assert (major, minor) >= (2, 52)  # KubeRay rejects authOptions for older Ray
    for c in _all_containers(job):
        assert "RAY_AUTH_MODE" not in _env(c) or _env(c)["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}
        assert "value" not in _env(c).get("RAY_AUTH_TOKEN", {})
    assert rayjob_problems(job) == []


def test_rayjob_head_service_stays_cluster_internal():
    job = _rayjob()
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert head.get("enableIngress") is False
    values = set(_strings(job))  # parsed keys and values; the comments may name what is not used
    assert not values & {"NodePort", "LoadBalancer", "headService", "hostNetwork", "hostPort"}
    assert "kubectl port-forward svc/$RC-head-svc 8265:8265" in RAYJOB.read_text()
    ports = {p["name"]: p for p in _ray_containers(job)["head"]["ports"]}
    assert ports["dashboard"] == {"containerPort": 8265, "name": "dashboard"}  # no hostPort


def test_rayjob_judge_key_and_s3_credentials_come_from_secrets():
    for group, c in _ray_containers(_rayjob()).items():
        assert _env(c)[JUDGE_ENV]["valueFrom"]["secretKeyRef"] == {
            "name": "motionnft-judge",
            "key": "api-key",
            "optional": True,  # unset: the driver makes a random per-run key for the replicas it starts
        }, group
        assert "value" not in _env(c)[JUDGE_ENV], group
        assert c["envFrom"] == [{"secretRef": {"name": "motionnft-s3"}}], group


def test_rayjob_workers_keep_their_gpus_and_volumes():
    job = _rayjob()
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert sorted(groups) == ["gpu", "judge"]
    for name, (gpus, cpus) in {"gpu": ("1", "24"), "judge": ("2", "48")}.items():
        container = groups[name]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert container["resources"]["limits"]["cpu"] == cpus
        assert {v["name"] for v in groups[name]["template"]["spec"]["volumes"]} == {"dshm", "models"}
    assert '{"CPU": 24, "GPU": 1}' in RAYJOB.read_text()


def test_autoscaler_turns_token_auth_on_from_a_synced_file():
    cfg = _autoscaler()
    starts = _start_commands(cfg)
    for role, (env, _argv) in starts.items():
        assert env["RAY_AUTH_MODE"] == "token", role
        assert env["RAY_AUTH_TOKEN_PATH"] == "~/.ray/auth_token", role
        assert "RAY_AUTH_TOKEN" not in env, role
        assert env[JUDGE_ENV] == "$(cat ~/.motionnft/judge_api_key 2>/dev/null)", role
    # the token file travels from the user's machine to every node; it is never in the YAML
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert autoscaler_problems(cfg) == []


def test_autoscaler_dashboard_listens_on_loopback_only():
    cfg = _autoscaler()
    _env, argv = _start_commands(cfg)["head"]
    assert "--dashboard-host=127.0.0.1" in argv
    for command in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert "0.0.0.0" not in command
    header = AUTOSCALER.read_text()
    assert "ray dashboard cluster/autoscaler.yaml" in header
    assert "ray job submit --address http://127.0.0.1:8265" in header


def test_autoscaler_gpu_node_type_declares_its_resources():
    gpu8 = _autoscaler()["available_node_types"]["gpu8"]
    assert gpu8["node_config"]["InstanceType"] == "p5.48xlarge"
    assert gpu8["resources"] == {"CPU": 192, "GPU": 8}


@pytest.mark.parametrize("path", [RAYJOB, AUTOSCALER], ids=lambda p: p.name)
def test_no_literal_credentials(path):
    tree = yaml.safe_load(path.read_text())
    assert literal_secret_problems(tree) == []
    text = path.read_text()
    assert not re.search(r"RAY_AUTH_TOKEN=(?!\$)", text)  # never `RAY_AUTH_TOKEN=<token>` in a command or comment
    assert not re.search(r"(?m)^\s*value:\s*\S{16,}", text)  # no long literal env value


def test_the_checks_catch_planted_violations():
    job = _rayjob()
    bad_job = copy.deepcopy(job)
    spec = bad_job["spec"]["rayClusterSpec"]
    del spec["authOptions"]
    spec["headGroupSpec"]["serviceType"] = "LoadBalancer"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"] = [{"name": JUDGE_ENV, "value": "sk-live-0123456789abcdef0123456789abcdef"}]
    worker = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["env"].append({"name": "RAY_AUTH_MODE", "value": "disabled"})
    found = "\n".join(rayjob_problems(bad_job))
    for expected in ("authOptions", "LoadBalancer", f"{JUDGE_ENV} is a literal", "RAY_AUTH_MODE overridden"):
        assert expected in found, expected
    assert literal_secret_problems(bad_job)

    cfg = _autoscaler()
    bad_cfg = copy.deepcopy(cfg)
    bad_cfg["head_start_ray_commands"][-1] = (
        "RAY_AUTH_TOKEN=0123456789abcdef0123456789abcdef ray start --head --dashboard-host=0.0.0.0"
    )
    bad_cfg["available_node_types"]["gpu8"]["resources"] = {}
    found = "\n".join(autoscaler_problems(bad_cfg))
    for expected in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN is written", "not bound to 127.0.0.1", "0.0.0.0", "gpu8"):
        assert expected in found, expected
    assert literal_secret_problems(bad_cfg)


# ---- the shipped configs fit the shipped clusters (learner/driver/placement.py) ----


def _rayjob_config_and_types():
    job = _rayjob()
    argv = shlex.split(job["spec"]["entrypoint"])
    config = argv[argv.index("--config") + 1]
    cfg = load_config(ROOT / config, [a for a in argv[argv.index("--config") + 2 :] if "=" in a])
    types = {}
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        types[group["groupName"]] = {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}
    return cfg, types


def test_rayjob_resumes_its_run_when_retried_or_resubmitted():
    job = _rayjob()
    assert "--resume" in shlex.split(job["spec"]["entrypoint"])
    assert job["spec"]["backoffLimit"] >= 1


def test_rayjob_declares_its_worker_groups_and_every_pool_fits_them():
    cfg, types = _rayjob_config_and_types()
    assert cfg.cluster.node_types == types
    assert placement_problems(pool_asks(cfg), [], types) == []
    # The shipped mistake this guards against: the TP=2 judge where every pod has one GPU.
    one_gpu = {k: v for k, v in types.items() if v["GPU"] == 1}
    assert [p.split(" per actor")[0] for p in placement_problems(pool_asks(cfg), [], one_gpu)] == [
        "the judge pool asks {CPU: 4, GPU: 2}"
    ]


@pytest.mark.parametrize("config", ["configs/flux_kontext.yaml", "configs/qwen_image_edit.yaml",
                                    "configs/qwen_image_edit_plus.yaml", "configs/flux2_klein.yaml",
                                    "configs/flux2_dev.yaml"])
def test_gpu_configs_declare_the_autoscaler_node_types_and_fit_them(config):
    auto = _autoscaler()
    types = {name: {k: float(v) for k, v in t["resources"].items()} for name, t in auto["available_node_types"].items()
             if name != auto["head_node_type"]}  # fmt: skip
    cfg = load_config(ROOT / config)
    assert cfg.cluster.node_types == types
    assert placement_problems(pool_asks(cfg), [], types) == []


def test_grafana_dashboard_reads_only_series_the_code_defines_and_all_of_them():
    """cluster/grafana_dashboard.json against motionnft_core/telemetry.py's schema: a renamed or dropped series fails
    here, not as an empty panel. (That the `key`s it selects of motionnft_step really occur is checked against a
    live scrape in tests/system/test_e2e.py.)"""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries()
    used = set().union(*map(series_named, queries))
    assert used <= telemetry.prometheus_names(), used - telemetry.prometheus_names()
    assert {s for s in telemetry.SERIES if not any(f"ray_{s}" in q for q in queries)} == set()
    assert all('SessionName=~"$SessionName"' in q and 'job=~"$job"' in q for q in queries)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert all(p["datasource"]["uid"] == "${datasource}" and p["targets"] for p in panels)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "SessionName", "job"}
