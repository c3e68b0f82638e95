#!/usr/bin/env bash
# Downloads, on this machine (which reaches the package registries), the wheels the GPU device machine lacks into
# .whl/ (git-ignored), for bench/device_train_step.sh. The device machine has Python 3.12, torch 2.11, transformers,
# accelerate, opencv, pyarrow, msgpack, httpx, but no diffusers, boto3 (imported by motionnft_core/s3.py) or
# importlib_metadata (needed by diffusers); peft is carried at the version this project pins.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 importlib_metadata==10.2.0 peft==0.21.2 \
  boto3==1.44.5 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0
du -sh .whl
