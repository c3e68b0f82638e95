"""The whole service on one GPU, checked: `python -m learner.main` with every pool on one card (configs/gpu_check.yaml),
then the full-size step bench with FP8. Run through `bash bench/gpu_whole_loop.sh OUTPUT_DIR [WHEEL_DIR]`.

Parts (`--parts`):

- `loop`: a CUDA tensor sent from one fractional-GPU actor to another the way rollout images reach the reward
  workers (Ray's object store): where it lands and the device-to-host copies per transfer; then a run of
  `learner.steps` steps with a checkpoint and LoRA export after each, and a resume for one more step. Checked from
  what the run leaves (its log, metrics.jsonl, checkpoints): the learner's process group (NCCL on a GPU, one
  rank), the driver never initialising CUDA (`driver/cuda_initialized`), the parity probe within the bf16
  tolerance, the memory probe choosing the micro-batch, the checkpoint, the export and the resume.
- `bench`: `bench/train_step.py --size full --compile --fp8` for `--family` (eager reference layout, ours, ours
  compiled, compiled with FP8 rollouts; FP8's effect on the rollout latents and reference velocities).

Each check prints one line (`check NAME: pass ...`, `FAIL` with the first error, or `skipped: ...`) and is appended to
OUTPUT_DIR/checks.jsonl; the logs go to OUTPUT_DIR. `--device cpu` (tiny model, gloo, no GPU) runs the same checks
that make sense without a GPU, in CI (tests/system/test_bench.py); its timings mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "gpu_check.yaml"
# The CPU smoke run: the tiny model, float32, no GPU asks, a fixed learner micro-batch (the probe needs CUDA).
CPU_OVERRIDES = [
    "model.random_layers=0", "model.tiny=true", "model.dtype=float32", "data.synthetic_size=32",
    "rollout.height=32", "rollout.width=32", "rollout.group_size=2", "rollout.num_steps=2", "rollout.micro_batch=2",
    "reward.flow.estimator=dis", "learner.micro_batch=2", "nft.lora_rank=4", "nft.lora_alpha=8",
    "cluster.num_cpus=4", "cluster.rollout_gpus=0", "cluster.reward_gpus=0", "cluster.learner_gpus=0",
    "cluster.cpus_per_actor=0.5",
]  # fmt: skip
NO_GPU = "skipped: no GPU"
BUDGET_S = {"loop": 180, "bench": 240}  # per part, on the GPU (bench/README.md)


# ------------------------------------------------------------------------------------------------ reporting


def summary_line(row: dict) -> str:
    """One line per check: `check NAME: pass DETAIL`, `check NAME: FAIL ERROR` or `check NAME: skipped: WHY`."""
    status = row["status"]
    word = {"pass": "pass", "fail": "FAIL", "skipped": "skipped:"}[status]
    return f"check {row['check']}: {word}" + (f" {row['detail']}" if row.get("detail") else "")


class Report:
    """The checks of one invocation: printed as they come and appended to OUTPUT_DIR/checks.jsonl."""

    def __init__(self, out: Path, device: str) -> None:
        self.path, self.device, self.rows = out / "checks.jsonl", device, []

    def add(self, check: str, status: str, detail: str = "", **values) -> dict:
        row = {"check": check, "status": status, "detail": detail, **values, "device": self.device,
               "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}  # fmt: skip
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(summary_line(row), flush=True)
        return row

    def run(self, check: str, fn: Callable[[], tuple[bool, str, dict] | str]) -> dict:
        """`fn` returns (passed, detail, values) or a 'skipped: ...' string; an exception is the check's failure."""
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - the first error is what the line reports
            return self.add(check, "fail", f"{type(e).__name__}: {e}"[:500])
        if isinstance(out, str):
            return self.add(check, "skipped", out.removeprefix("skipped: "))
        passed, detail, values = out
        return self.add(check, "pass" if passed else "fail", detail, **values)

    @property
    def failed(self) -> list[str]:
        return [r["check"] for r in self.rows if r["status"] == "fail"]


# ------------------------------------------------------------------------------------------------ the run's outputs


def metrics_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def check_backend(log: str, gpu: bool) -> tuple[bool, str, dict]:
    """The learner's process group, from rank 0's line in the run's log: NCCL on a GPU, gloo on a CPU."""
    m = re.search(r"learner process group: (\w+) backend, (\d+) ranks", log)
    if not m:
        return False, "no 'learner process group' line in the run's log", {}
    want = "nccl" if gpu else "gloo"
    return m.group(1) == want, f"{m.group(1)} backend, {m.group(2)} rank(s) (want {want})", {"backend": m.group(1)}


def check_driver_cuda(rows: list[dict]) -> tuple[bool, str, dict]:
    """`driver/cuda_initialized` is 0 on every step: the driver process never started CUDA."""
    flags = [r.get("driver/cuda_initialized") for r in rows]
    if not flags or None in flags:
        return False, "driver/cuda_initialized missing from metrics.jsonl", {}
    return not any(flags), f"torch.cuda.is_initialized() in the driver after each of {len(flags)} steps: " + (
        "never" if not any(flags) else "yes"), {}  # fmt: skip


def check_parity(rows: list[dict], tolerance: float) -> tuple[bool, str, dict]:
    errors = [r["parity/max_error"] for r in rows if "parity/max_error" in r]
    if not errors:
        return False, "no parity/max_error in metrics.jsonl (the probe never ran)", {}
    worst = max(errors)
    return worst <= tolerance, f"max error {worst:.3g} over {len(errors)} steps (tolerance {tolerance:g})", {
        "parity_max_error": worst}  # fmt: skip


def check_memory_probe(log: str) -> tuple[bool, str, dict]:
    m = re.search(r"learner micro-batch (\d+) of (\d+) samples per rank, from free memory \(peaks ([\d.]+) / "
                  r"([\d.]+) GiB", log)  # fmt: skip
    if not m:
        return False, "no 'learner micro-batch ... from free memory' line in the run's log", {}
    chosen, per_rank, p1, p2 = int(m.group(1)), int(m.group(2)), float(m.group(3)), float(m.group(4))
    return 1 <= chosen <= per_rank, f"micro-batch {chosen} of {per_rank} (peaks {p1} / {p2} GiB at 1 / 2)", {
        "micro_batch": chosen, "peak_1_gib": p1, "peak_2_gib": p2}  # fmt: skip


def check_checkpoints(ckpt: Path, steps: list[int]) -> tuple[bool, str, dict]:
    missing = [s for s in steps if not (ckpt / f"step_{s:08d}" / "driver.json").is_file()]
    found = sorted(p.name for p in ckpt.glob("step_*"))
    return not missing, f"complete checkpoints {found}" + (f"; missing steps {missing}" if missing else ""), {}


def check_export(ckpt: Path, step: int, rank: int, alpha: int) -> tuple[bool, str, dict]:
    from motionnft_core.models.weights import check_lora_export

    path = check_lora_export(ckpt / f"step_{step:08d}" / "lora", rank=rank, alpha=alpha)
    return True, f"{path.relative_to(ckpt)} ({path.stat().st_size / 2**20:.1f} MiB, rank {rank})", {}


def check_resume(rows: list[dict], returncode: int, first_steps: int) -> tuple[bool, str, dict]:
    steps = [r["step"] for r in rows]
    want = list(range(first_steps + 1))
    ok = returncode == 0 and steps == want
    return ok, f"exit {returncode}, steps logged {steps} (want {want})", {}


# ------------------------------------------------------------------------------------------------ the parts


class Producer:
    """Makes a group's decoded images on its GPU, as a rollout worker does, and puts them in the object store."""

    def put(self, n: int, size: int) -> dict:
        import ray
        import torch
        from torch.profiler import ProfilerActivity, profile

        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            ref = ray.put(images)
            torch.cuda.synchronize()
        copies = sum(e.count for e in prof.key_averages() if "DtoH" in e.key or "Device -> Pageable" in e.key)
        return {"ref": [ref], "d2h_copies": copies, "bytes": images.nbytes, "sum": int(images.sum().item())}


class Consumer:
    """Fetches them, as a reward worker does: where do they land?"""

    def get(self, refs: list) -> dict:
        import ray
        import torch

        images = ray.get(refs[0])
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        return {"device": str(images.device), "sum": int(images.sum().item()), "visible": visible,
                "cuda_init": torch.cuda.is_initialized()}  # fmt: skip


def cuda_transfer(gpu: bool) -> tuple[bool, str, dict] | str:
    if not gpu:
        return NO_GPU
    import ray
    import torch

    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        producer = ray.remote(num_gpus=0.25, num_cpus=1)(Producer).remote()
        consumer = ray.remote(num_gpus=0.25, num_cpus=1)(Consumer).remote()
        sent = ray.get(producer.put.remote(8, 256), timeout=120)
        got = ray.get(consumer.get.remote(sent["ref"]), timeout=120)
    finally:
        ray.shutdown()
    here = torch.cuda.is_initialized()
    ok = got["device"].startswith("cuda") and got["sum"] == sent["sum"] and not here
    return ok, (f"8 images 256² ({sent['bytes'] / 2**20:.1f} MiB) landed on {got['device']} of the receiver "
                f"(CUDA_VISIBLE_DEVICES={got['visible']}), equal: {got['sum'] == sent['sum']}; device-to-host "
                f"copies per transfer: {sent['d2h_copies']}; this process initialised CUDA: {here}"), {
        "landed_on": got["device"], "d2h_copies_per_transfer": sent["d2h_copies"]}  # fmt: skip


def run_main(args: list[str], log: Path, timeout_s: float) -> int:
    """`python -m learner.main ARGS`, its output into `log`; the exit status (124 when it ran out of time)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("a") as f:
        f.write(f"$ python -m learner.main {' '.join(args)}\n")
        f.flush()
        try:
            return subprocess.run([sys.executable, "-m", "learner.main", *args], stdout=f, stderr=subprocess.STDOUT,
                                  cwd=ROOT, env=env, timeout=timeout_s).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            return 124


TRAINING_MODULES = ("learner.driver.loop", "learner.trainer.fsdp_worker", "actors.rollout", "rewards.worker")


def imports() -> tuple[bool, str, dict]:
    """The training path's modules import here (a wheel missing from WHEEL_DIR shows up now, by name)."""
    import importlib

    import torch

    for name in TRAINING_MODULES:
        importlib.import_module(name)
    return not torch.cuda.is_initialized(), f"{', '.join(TRAINING_MODULES)} (CUDA not initialised)", {}


def build_model(model) -> tuple[bool, str, dict]:
    """The run's pipeline built here once, on the CPU (`model.random_layers` / `model.tiny`), before the rollout and
    the learner resolve it: they then load it instead of each building it."""
    from motionnft_core.models.tiny import pipeline_source

    began = time.perf_counter()
    path = Path(pipeline_source(model))
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    seconds = time.perf_counter() - began
    return True, f"{path.name}: {size / 2**30:.2f} GiB on disk, ready in {seconds:.0f} s", {"seconds": seconds}


def whole_loop(report: Report, out: Path, gpu: bool, steps: int, budget_s: float) -> None:
    from motionnft_core.config_loader import load_config

    if report.run("imports", imports)["status"] != "pass":
        return
    report.run("cuda_transfer", lambda: cuda_transfer(gpu))
    run_dir, ckpt = out / "run", out / "run" / "checkpoints"
    overrides = [f"learner.steps={steps}", f"logging.dir={run_dir}", f"checkpoint.dir={ckpt}", "checkpoint.every=1",
                 *([] if gpu else CPU_OVERRIDES)]  # fmt: skip
    cfg = load_config(str(CONFIG), overrides)
    report.run("model", lambda: build_model(cfg.model))
    log = out / "whole_loop.log"
    began = time.perf_counter()
    code = run_main(["--config", str(CONFIG), "--overwrite", *overrides], log, budget_s)
    first_s = time.perf_counter() - began
    text, rows = log.read_text(), metrics_rows(run_dir)
    report.run("run", lambda: (code == 0 and len(rows) == steps,
                               f"exit {code}, {len(rows)} of {steps} steps in {first_s:.0f} s", {"seconds": first_s}))
    report.run("learner_process_group", lambda: check_backend(text, gpu))
    report.run("driver_never_initialises_cuda", lambda: check_driver_cuda(rows))
    tolerance = cfg.rollout.parity_tolerance[cfg.model.dtype]
    report.run("parity_probe", lambda: check_parity(rows, tolerance))
    report.run("memory_probe", lambda: check_memory_probe(text) if gpu else NO_GPU)
    report.run("checkpoint", lambda: check_checkpoints(ckpt, list(range(1, steps + 1))))
    report.run("export", lambda: check_export(ckpt, steps, cfg.nft.lora_rank, cfg.nft.lora_alpha))
    left = max(90.0, budget_s - first_s)
    resume_overrides = [o if not o.startswith("learner.steps=") else f"learner.steps={steps + 1}" for o in overrides]
    code = run_main(["--config", str(CONFIG), "--resume", *resume_overrides], log, left)
    report.run("resume", lambda: check_resume(metrics_rows(run_dir), code, steps))


FP8_ERRORS = ("x0_rel_err", "v_old_rel_err", "v_ref_rel_err")
FP8_TOLERANCE = 0.03  # relative L2 error of sampled latents and velocities the CPU tests state (tests/unit/test_fp8.py)
TARGET_RATIO = 1.4


def fp8_verdict(record: dict) -> tuple[bool, str, dict]:
    """A step bench record passes when its FP8 layout ran and FP8 moved the rollout latents and the reference
    velocities by at most FP8_TOLERANCE against bf16; the ratio is reported against TARGET_RATIO."""
    layouts = {n: r.get("samples_per_s") for n, r in record["layouts"].items()}
    fp8 = record.get("fp8_effect", {})
    errors = {k: fp8[k] for k in FP8_ERRORS if k in fp8}
    fp8_ran = any(n.endswith("+fp8") and v for n, v in layouts.items())
    ok = fp8_ran and len(errors) == len(FP8_ERRORS) and all(v <= FP8_TOLERANCE for v in errors.values())
    measured = ", ".join(f"{k} {v:.3g}" for k, v in errors.items()) or f"not measured ({fp8.get('error', '')})"
    detail = (f"ratio {record['ratio']:.2f} (target {TARGET_RATIO}); samples/s "
              + ", ".join(f"{n} {v:.3f}" if v else f"{n} failed" for n, v in layouts.items())
              + f"; FP8 against bf16 (tolerance {FP8_TOLERANCE}): {measured}")  # fmt: skip
    return ok, detail, {"ratio": record["ratio"], "fp8_effect": fp8}


def step_bench(report: Report, out: Path, gpu: bool, family: str, budget_s: float) -> None:
    """bench/train_step.py at full size, compiled, with the FP8 layout; its JSON line to OUTPUT_DIR/train_step.jsonl
    (the partial record where it ran out of time)."""
    if not gpu:
        report.add(f"step_bench_{family}", "skipped", "no GPU (tests/system/test_bench.py runs its CPU mode)")
        return
    results, log = out / "train_step.jsonl", out / f"train_step_{family}.log"
    cmd = [sys.executable, str(ROOT / "bench" / "train_step.py"), "--size", "full", "--device", "cuda",
           "--family", family, "--compile", "--fp8", "--results", str(results)]  # fmt: skip
    with log.open("w") as f:
        try:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=budget_s).returncode
        except subprocess.TimeoutExpired:
            code = 124

    def summary() -> tuple[bool, str, dict]:
        partial = results.with_suffix(".partial.json")
        if code != 0:
            where = f"; partial record in {partial.name}" if partial.is_file() else ""
            tail = log.read_text().strip().splitlines()[-1:] or [""]
            raise RuntimeError(f"train_step.py exit {code} ({'out of time' if code == 124 else tail[0]}){where}")
        return fp8_verdict(json.loads(results.read_text().splitlines()[-1]))

    report.run(f"step_bench_{family}", summary)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output directory (checks.jsonl, logs, the run, train_step.jsonl)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--parts", default="loop,bench", help="comma-separated: loop, bench")
    p.add_argument("--family", default="flux_kontext", help="the step bench's policy family")
    p.add_argument("--steps", type=int, default=2, help="steps of the first run (the resume adds one)")
    p.add_argument("--loop-budget", type=float, default=BUDGET_S["loop"], help="seconds for the whole loop's runs")
    p.add_argument("--bench-budget", type=float, default=BUDGET_S["bench"], help="seconds for the step bench")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = args.device == "cuda"
    if gpu:  # the driver side stays off CUDA: ask the GPU's name from a child process
        name = subprocess.run([sys.executable, "-c", "import torch; p = torch.cuda.get_device_properties(0); "
                               "print(f'{p.name} ({p.total_memory / 2**30:.0f} GiB)')"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
    else:
        import platform

        name = f"CPU {platform.machine()} x{os.cpu_count()}"
    report = Report(args.out, name)
    print(f"device: {name}", flush=True)
    parts = set(args.parts.split(","))
    if "loop" in parts:
        whole_loop(report, args.out, gpu, args.steps, args.loop_budget if gpu else 600)
    if "bench" in parts:
        step_bench(report, args.out, gpu, args.family, args.bench_budget)
    print(f"{len(report.rows)} checks, {len(report.failed)} failed" + (f": {report.failed}" if report.failed else ""))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
