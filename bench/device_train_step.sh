#!/usr/bin/env bash
# The prepared GPU command of issue 16, run on a lent device machine from the repository root:
#   here:   bash bench/fetch_device_wheels.sh
#   device: run(command="bash bench/device_train_step.sh", carry=[".whl"], timeout_s=600)
# It installs the carried wheels beside the machine's own torch, checks the GPU, runs the full-size FLUX.1 Kontext
# training-step benchmark (bench/train_step.py: eager reference layout, ours, ours compiled, compiled + FP8
# rollout; then a solver step against a forward, and FP8's effect on rewards) and leaves the JSON
# line and the log in $OUT (copy the line into bench/results/train_step.jsonl and commit it, device named).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT="${OUT:-$PWD/bench/results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, peft, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)"
python3 bench/train_step.py --size full --device cuda --family "${FAMILY:-flux_kontext}" --compile --fp8 \
  --results "$OUT/train_step.jsonl" 2>&1 | tee "$OUT/train_step.log"
