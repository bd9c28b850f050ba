#!/usr/bin/env bash
# Fetch the wheels bench/gpu_full_size.py and bench/gpu_football.py need on a GPU machine that has PyTorch,
# transformers, peft and accelerate but no bitsandbytes (the `device` tool's H100/H200
# image), into .whl/ at the repository root (ignored by git: .gitignore):
#
#   bash bench/fetch_wheels.sh
#
# Then, on the GPU machine (device tool: carry [".whl"]):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD && python3 bench/gpu_full_size.py
set -euo pipefail
cd "$(dirname "$0")/.."
# The GPU image runs Python 3.12 on x86-64; bitsandbytes' needs (torch, numpy, packaging) are there.
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "bitsandbytes==${BITSANDBYTES_VERSION:-0.50.2}"
# bench/gpu_football.py also decodes images: pillow, in case the image lacks it (4.5 MB; the carry limit is 64 MiB).
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "pillow>=10"
ls -l .whl
