#!/usr/bin/env bash
# For a GPU machine without internet access that has Python 3.12 and a CUDA torch (with transformers, accelerate,
# opencv, pyarrow, msgpack, httpx) but lacks diffusers, peft at this project's version, boto3 (imported by
# motionnft_core/s3.py) and importlib_metadata (needed by diffusers): downloads their wheels, on a machine that
# reaches PyPI, into .whl/ (git-ignored). Copy the repository with .whl/ to the GPU machine;
# bench/gpu_train_step.sh installs them there beside its own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 importlib_metadata==10.2.0 peft==0.21.2 \
  boto3==1.44.5 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0
du -sh .whl
