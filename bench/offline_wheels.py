"""The wheel folder an offline GPU machine needs to run the service (bench/gpu_whole_loop.sh), built on a machine
that reaches the package index: `bash bench/fetch_offline_wheels.sh [DIR]` runs this.

What to fetch is decided from the packages' metadata: pip resolves the service's roots (`ROOTS`: Ray, diffusers,
tensorboard for the driver's event files, httpx for the judge client the reward modules import) for CPython 3.12
on manylinux x86_64 without installing anything (`pip install --dry-run --report`), and every resolved distribution
the GPU machine already has (`PRESENT`: a CUDA torch image with transformers, peft and accelerate, and what those
require) or that the training path never imports (`NOT_IMPORTED`) is left out. boto3 stays behind too:
motionnft_core/s3.py imports it only at the first s3:// call. The rest is downloaded without dependencies, and
the large parts that the service never loads are cut out of their wheels (`TRIM`: Ray's Java jars, the
dashboard's web client, RLlib, Serve, Tune, Train and the LLM library; tensorboard's web files) with a RECORD that
lists what is left. The folder must stay under `--max-mib` (60 MiB) so that it copies easily.

    python bench/offline_wheels.py .whl            # what fetch_offline_wheels.sh runs
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOTS = ("ray==2.60.0", "diffusers==0.42.1", "tensorboard==2.21.0", "httpx==0.28.1")
# A CUDA torch image with transformers, peft and accelerate has what transformers requires (resolved from its
# metadata, `PRESENT_ROOTS`) and these: torch with its own requirements (CUDA libraries: every `nvidia-*`),
# accelerate and peft with theirs, and torchvision (RAFT), which the training-step benchmark found on such a machine.
PRESENT_ROOTS = ("transformers==5.19.0",)
PRESENT = frozenset({
    "torch", "torchvision", "triton", "filelock", "typing-extensions", "setuptools", "sympy", "mpmath", "networkx",
    "jinja2", "markupsafe", "fsspec", "accelerate", "peft", "psutil", "pillow", "numpy", "packaging", "pyyaml",
    "safetensors", "tqdm", "huggingface-hub",
})  # fmt: skip
# Required by a root's metadata but not imported by the training path (tensorboard's web server: the driver only
# writes event files through torch.utils.tensorboard).
NOT_IMPORTED = frozenset({"grpcio", "tensorboard-data-server", "werkzeug", "markdown"})
# Wheel members under these prefixes are cut out (the service never loads them).
TRIM = {
    "ray": ("ray/jars/", "ray/dashboard/client/", "ray/rllib/", "ray/serve/", "ray/tune/", "ray/train/", "ray/llm/"),
    "tensorboard": ("tensorboard/webfiles.zip",),
}
PYTHON = "3.12"  # the GPU machine's


def platform_args(python: str = PYTHON) -> list[str]:
    return ["--python-version", python, "--implementation", "cp", "--only-binary=:all:",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64"]  # fmt: skip


def canonical(name: str) -> str:
    """A distribution's name as the package index compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wanted(resolved: dict[str, str], present: set[str] | frozenset[str]) -> dict[str, str]:
    """The resolved distributions (name -> version) the GPU machine lacks (not in `present`, not a CUDA library)
    and the training path imports."""
    skip = {canonical(n) for n in present} | NOT_IMPORTED
    return {n: v for n, v in sorted(resolved.items()) if canonical(n) not in skip and not n.startswith("nvidia-")}


def resolve(roots: tuple[str, ...], python: str = PYTHON) -> dict[str, str]:
    """Every distribution `roots` need on CPython `python` / manylinux x86_64, from their metadata (nothing
    installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report",
                        str(report), *platform_args(python), "--target", str(Path(tmp) / "t"), *roots],
                       check=True)  # fmt: skip
        items = json.loads(report.read_text())["install"]
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in items}


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def trim_wheel(src: Path, dst: Path, prefixes: tuple[str, ...]) -> list[str]:
    """Copy the wheel `src` to `dst` without the members under `prefixes`; its RECORD then lists exactly the
    members kept (with their hashes and sizes, RECORD itself without), so pip installs it as any wheel. Returns
    the members cut out."""
    cut: list[str] = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for info in zin.infolist():
            if info.filename.startswith(prefixes):
                cut.append(info.filename)
                continue
            if info.filename == record_name:
                continue
            data = zin.read(info)
            zout.writestr(info, data)
            if not info.is_dir():
                lines.append(f"{info.filename},{_record_hash(data)},{len(data)}")
        lines.append(f"{record_name},,")
        zout.writestr(record_name, "\n".join(lines) + "\n")
    return cut


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.whl")) / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dest", type=Path, help="the wheel folder (emptied of wheels first)")
    p.add_argument("--max-mib", type=float, default=60.0)
    p.add_argument("--python", default=PYTHON, help="the target machine's Python version (another: for a check)")
    args = p.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.whl"):
        old.unlink()
    fetch = wanted(resolve(ROOTS, args.python), PRESENT | set(resolve(PRESENT_ROOTS, args.python)))
    print("fetching " + " ".join(f"{n}=={v}" for n, v in fetch.items()), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *platform_args(args.python),
                        "-d", tmp, *(f"{n}=={v}" for n, v in fetch.items())], check=True)  # fmt: skip
        for wheel in sorted(Path(tmp).glob("*.whl")):
            name = canonical(wheel.name.split("-")[0])
            if name in TRIM:
                cut = trim_wheel(wheel, args.dest / wheel.name, TRIM[name])
                after = (args.dest / wheel.name).stat().st_size / 2**20
                print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB -> {after:.1f} MiB ({len(cut)} cut)")
            else:
                shutil.copy2(wheel, args.dest / wheel.name)
    size = folder_mib(args.dest)
    print(f"{args.dest}: {len(list(args.dest.glob('*.whl')))} wheels, {size:.1f} MiB")
    if size > args.max_mib:
        print(f"the folder is over {args.max_mib:g} MiB: trim more (TRIM in {__file__})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
