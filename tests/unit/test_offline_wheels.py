"""bench/offline_wheels.py: what the offline GPU machine's wheel folder holds, and the trimmed wheels' validity."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile

from bench.offline_wheels import NOT_IMPORTED, PRESENT, TRIM, trim_wheel, wanted


def _wheel(path, members: dict[str, bytes]) -> None:
    info = "demo-1.0.dist-info"
    members = {**members, f"{info}/METADATA": b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
               f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in [*members, f"{info}/RECORD"]))


def test_trimmed_wheel_keeps_the_rest_with_a_matching_record_and_installs(tmp_path):
    src, dst = tmp_path / "src" / "demo-1.0-py3-none-any.whl", tmp_path / "demo-1.0-py3-none-any.whl"
    src.parent.mkdir()
    _wheel(src, {"demo/__init__.py": b"X = 1\n", "demo/jars/big.jar": b"j" * 1000, "demo/core.py": b"Y = 2\n"})
    cut = trim_wheel(src, dst, ("demo/jars/",))
    assert cut == ["demo/jars/big.jar"]
    with zipfile.ZipFile(dst) as z:
        names = set(z.namelist())
        assert "demo/jars/big.jar" not in names and {"demo/__init__.py", "demo/core.py"} <= names
        record = dict(line.split(",", 1) for line in z.read("demo-1.0.dist-info/RECORD").decode().splitlines())
        assert set(record) == names  # every member listed, the cut one not
        for name in names - {"demo-1.0.dist-info/RECORD"}:
            data = z.read(name)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert record[name] == f"sha256={digest},{len(data)}"
    target = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                          str(target), str(dst)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (target / "demo" / "core.py").is_file() and not (target / "demo" / "jars").exists()


def test_the_folder_leaves_out_what_the_gpu_machine_has_and_what_the_service_never_imports():
    resolved = {"ray": "2.60.0", "diffusers": "0.42.1", "torch": "2.11.0", "nvidia-nccl-cu13": "2.28",
                "grpcio": "1.8", "jsonschema": "4.26.0", "Typing_Extensions": "4.16", "tensorboard": "2.21.0"}
    assert wanted(resolved, PRESENT | {"huggingface-hub"}) == {
        "diffusers": "0.42.1", "jsonschema": "4.26.0", "ray": "2.60.0", "tensorboard": "2.21.0"}  # fmt: skip
    assert "grpcio" in NOT_IMPORTED and "ray/jars/" in TRIM["ray"]
