#!/usr/bin/env bash
# Run ON THE GPU DEVICE MACHINE, from the repository root, after tests/gpu/prepare_carry.sh here:
#   device tool `run`: command "bash tests/gpu/device_check.sh", carry [".carry"], timeout_s 500
# Builds pycuda from its sdist against that machine's CUDA, installs the carried wheels, then runs
# the GPU tests (tests/test_tensorrt_gpu.py: the backend's real pycuda / cuda-python code around a
# stand-in TensorRT; TensorRT itself is not there) and the fake-module TensorRT tests with the real
# cuda-python present. The log comes back as $OUT/device_check.log. Written without a GPU
# (2026-12-04): the first session with one runs it and fixes what fails.
set -uo pipefail
cd "$(dirname "$0")/../.."
log=${OUT:-/tmp}/device_check.log
{
    set -x
    nvidia-smi -L
    python3 --version
    command -v nvcc && nvcc --version | tail -1
    python3 -m pip install -q --no-index --find-links .carry/wheels --no-build-isolation \
        pycuda pyzmq orjson pydicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg
    python3 -c "import pycuda.driver as d; d.init(); print('pycuda', d.get_version(), d.Device(0).name())"
    PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/tests" python3 -m pytest -q -p no:cacheprovider -rs \
        tests/test_tensorrt_gpu.py tests/test_tensorrt_logic.py
} > "$log" 2>&1
status=$?
tail -40 "$log"
exit $status
