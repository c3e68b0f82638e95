#!/usr/bin/env bash
# The full-size training-step benchmark on one GPU, from the repository root:
#   bash bench/gpu_train_step.sh OUTPUT_DIR            # FAMILY=qwen_image_edit for the other policy family
# On a GPU machine without internet access, first run `bash bench/fetch_offline_wheels.sh` on a machine that has
# it and copy the repository (with its .whl/ folder) over: the wheels there are installed beside the machine's
# own torch. It checks the GPU, runs bench/train_step.py at full size (eager reference layout, ours, ours
# compiled, compiled + FP8 rollout; then a solver step against a forward, and FP8's effect on rewards) and
# writes train_step.jsonl and train_step.log into OUTPUT_DIR. Copy the JSON line into
# bench/results/train_step.jsonl with the GPU named (bench/README.md).
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: bash bench/gpu_train_step.sh OUTPUT_DIR" >&2
  exit 2
fi
DEST=$(mkdir -p "$1" && cd "$1" && pwd)  # absolute: the script runs from the repository root
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, peft, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)"
python3 bench/train_step.py --size full --device cuda --family "${FAMILY:-flux_kontext}" --compile --fp8 \
  --results "$DEST/train_step.jsonl" 2>&1 | tee "$DEST/train_step.log"
