#!/usr/bin/env bash
# The whole service on one GPU, then the full-size step bench with FP8 (bench/gpu_whole_loop.py), from anywhere:
#   bash bench/gpu_whole_loop.sh OUTPUT_DIR [WHEEL_DIR]
#   PARTS=bench FAMILY=qwen_image_edit bash bench/gpu_whole_loop.sh OUTPUT_DIR [WHEEL_DIR]   # the second family
# On a GPU machine without internet access, build WHEEL_DIR first on a machine that has it
# (`bash bench/fetch_offline_wheels.sh`, default .whl/) and copy it over with the repository: its wheels are
# installed here into a private prefix beside the machine's own torch. Writes checks.jsonl (one line per check),
# whole_loop.log, the run's outputs (run/), train_step.jsonl and train_step_FAMILY.log into OUTPUT_DIR.
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: bash bench/gpu_whole_loop.sh OUTPUT_DIR [WHEEL_DIR]" >&2
  exit 2
fi
DEST=$(mkdir -p "$1" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
WHEELS=${2:-.whl}
export PYTHONPATH="$PWD"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  PREFIX=$(mktemp -d "${TMPDIR:-/tmp}/motionnft-site.XXXXXX")
  trap 'rm -rf "$PREFIX"' EXIT
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$PREFIX" "$WHEELS"/*.whl
  export PYTHONPATH="$PWD:$PREFIX" PATH="$PREFIX/bin:$PATH"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu: the CPU mode (tiny model), to try the script and the wheel folder anywhere
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$DEST/gpu.txt"
fi
python3 -c "import torch, ray, diffusers, peft, transformers; print('torch', torch.__version__, 'ray', ray.__version__, \
'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)" | tee -a "$DEST/gpu.txt"
python3 bench/gpu_whole_loop.py "$DEST" --device "$DEVICE" --parts "${PARTS:-loop,bench}" --family "${FAMILY:-flux_kontext}" \
  --bench-budget "${BENCH_BUDGET_S:-240}" 2>&1 \
  | tee -a "$DEST/gpu_whole_loop.log"
