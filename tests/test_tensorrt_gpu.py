"""The pycuda / cuda-python side of the TensorRT backend on a real GPU, around a stand-in TensorRT.

TensorRT itself cannot be installed where this project is developed, but pycuda (built from its
sdist) and cuda-python can run on a GPU machine. These tests run the backend's real CUDA code: the
retained primary context, page-locked host and device buffers, asynchronous copies on its
non-blocking stream, calls from another thread, and CUDA graph capture / replay through
cuda-python, around tests/test_tensorrt_logic.py's fake TensorRT engine (x -> y = 2x + 1,
total = sum(x)), whose execute_async_v3 here launches real kernels through CuPy on the stream it is
given. What they cannot show: TensorRT's own execution. Skipped unless pycuda, cupy and a CUDA GPU
are present (tests/gpu/device_check.sh runs them on the device machine).
WRITTEN WITHOUT A GPU (2026-12-04): not run yet; the first session with a GPU runs and fixes them.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.backends import tensorrt as trt_backend
from edge_runtime.backends.tensorrt import TrtBackend

pytestmark = pytest.mark.gpu


def _gpu_modules() -> tuple[Any, Any]:
    try:
        import cupy as cp
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() < 1:
            raise RuntimeError("no CUDA device")
    except Exception as exc:  # noqa: BLE001 - ImportError, pycuda's LogicError, cupy's errors: all mean skip
        pytest.skip(f"needs pycuda, cupy and a CUDA GPU: {type(exc).__name__}: {exc}")
    return cuda, cp


def _gpu_execute(self: Any, stream_handle: int) -> bool:
    """FakeContext.execute_async_v3 on real device memory: kernels queued on the backend's stream
    (so CUDA graph capture records them), reading and writing the addresses the backend set."""
    import cupy as cp

    shape = tuple(self.shapes.get("x", self.engine._t("x")["shape"]))
    n = int(np.prod(shape))

    def view(name: str, count: int) -> Any:
        mem = cp.cuda.UnownedMemory(self.addresses[name], count * 4, owner=self)
        return cp.ndarray((count,), cp.float32, cp.cuda.MemoryPointer(mem, 0))

    x, y, total = view("x", n), view("y", n), view("total", 1)
    affine = cp.ElementwiseKernel("float32 x", "float32 y", "y = 2 * x + 1", "edge_affine")
    # a plain reduction kernel: no temporary allocation (not allowed while a stream is captured)
    summed = cp.ReductionKernel("float32 x", "float32 y", "x", "a + b", "y = a", "0", "edge_sum")
    with cp.cuda.ExternalStream(stream_handle):
        affine(x, y)
        summed(x, out=total, keepdims=True)
    self.executions += 1
    return True


@pytest.fixture
def gpu_trt(monkeypatch: pytest.MonkeyPatch) -> Any:
    _gpu_modules()
    from test_tensorrt_logic import FakeContext, _fake_trt

    trt = _fake_trt("10.3.0.30")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)  # real pycuda and cuda-python stay
    monkeypatch.setattr(FakeContext, "execute_async_v3", _gpu_execute)
    return trt


def _engine(trt: Any, path: Path) -> Path:
    from test_tensorrt_logic import engine_file

    return engine_file(trt, path, dynamic=True)


def _check(out: dict[str, np.ndarray], x: np.ndarray) -> None:
    np.testing.assert_allclose(out["y"], 2 * x + 1, rtol=1e-6)
    np.testing.assert_allclose(out["total"], [x.sum()], rtol=1e-4)


def test_real_buffers_copies_and_a_non_blocking_stream(gpu_trt: Any, tmp_path: Path) -> None:
    cudart = trt_backend._cudart()  # cuda-python's runtime module, as the backend finds it
    if cudart is None:
        pytest.skip("needs cuda-python")
    rng = np.random.default_rng(0)
    with TrtBackend(_engine(gpu_trt, tmp_path / "g.engine")) as b:
        err, flags = cudart.cudaStreamGetFlags(b._stream.handle)
        assert int(err) == 0 and int(flags) == trt_backend.STREAM_NON_BLOCKING
        for shape in [(1, 1, 8, 8), (1, 1, 6, 6), (1, 1, 32, 32), (1, 1, 8, 8)]:  # 32x32 re-allocates
            x = rng.random(shape, dtype=np.float32)
            _check(b.infer({"x": x}), x)


def test_real_calls_from_another_thread(gpu_trt: Any, tmp_path: Path) -> None:
    """The runtime serves from its own thread: the backend pushes its retained primary context there."""
    x = np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8)
    seen: list[Any] = []
    with TrtBackend(_engine(gpu_trt, tmp_path / "t.engine")) as b:
        t = threading.Thread(target=lambda: seen.append(b.infer({"x": x})))
        t.start()
        t.join(30)
        assert seen, "no result from the other thread"
        _check(seen[0], x)
        _check(b.infer({"x": x}), x)  # and again on this one


def test_real_cuda_graph_capture_replay_and_recapture(gpu_trt: Any, tmp_path: Path) -> None:
    """cuda-python's stream capture on the backend's stream: the first call per shape runs normally,
    the second captures, checks the replay against a normal run and trusts it; a new shape captures
    again. Outputs stay right throughout (a graph may cost speed, never a result)."""
    rng = np.random.default_rng(1)
    with TrtBackend(_engine(gpu_trt, tmp_path / "c.engine"), use_cuda_graph=True) as b:
        for shape in [(1, 1, 8, 8)] * 4 + [(1, 1, 16, 16)] * 3:
            x = rng.random(shape, dtype=np.float32)
            _check(b.infer({"x": x}), x)
        assert b.graph_disabled is None, b.graph_disabled
        assert b.graph_captures >= 2  # one per shape at least
