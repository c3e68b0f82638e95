#!/usr/bin/env bash
# For a GPU machine without internet access that has Python 3.12 and a CUDA torch with transformers, peft and
# accelerate: on a machine that reaches the package index, builds the wheel folder the service needs there
# (Ray trimmed of its Java jars and other parts never loaded, diffusers, tensorboard, and the pure-Python
# dependencies they import that such a machine lacks; bench/offline_wheels.py decides from their metadata) into
# DIR (default .whl/, git-ignored; at most 60 MiB). Copy the repository with that folder to the GPU machine;
# bench/gpu_whole_loop.sh and bench/gpu_train_step.sh install it there into a private prefix.
#   bash bench/fetch_offline_wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" bench/offline_wheels.py "${1:-.whl}"
