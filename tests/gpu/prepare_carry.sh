#!/usr/bin/env bash
# Run HERE, on a machine with PyPI, before using the GPU device machine (device tool): puts what
# that machine lacks into .carry/ (ignored by git; about 11 MB), for `run` with carry [".carry"].
# The device image has Python 3.12 with numpy, onnx, onnxruntime, opencv-python-headless, pytest,
# PyYAML, tqdm, pillow, cupy and cuda-bindings (see /work/.library/device/KINDS.md), and cannot
# reach PyPI: pycuda goes as its sdist (built there against its CUDA), the rest as cp312 wheels.
set -euo pipefail
cd "$(dirname "$0")/../.."
pip=${PIP:-.venv/bin/pip}
out=.carry/wheels
mkdir -p "$out"
grep -qx "/.carry/" .git/info/exclude 2>/dev/null || echo "/.carry/" >> .git/info/exclude
"$pip" download -q -d "$out" --no-deps --no-binary pycuda pycuda
"$pip" download -q -d "$out" --no-deps --only-binary :all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform any pytools platformdirs mako siphash24 pyzmq orjson pydicom pylibjpeg pylibjpeg-libjpeg \
    pylibjpeg-openjpeg
ls "$out"
du -sh .carry
