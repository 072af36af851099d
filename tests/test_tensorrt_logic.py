"""TensorRT backend, engine build and engine cache: the logic around TensorRT, without TensorRT.

Tests that use ``fake_trt`` exercise the logic around the TensorRT API with a fake module; the real
API is checked by mypy against tensorrt-stubs (tests/test_typecheck.py), not run. The one test that
really builds and runs an engine is marked gpu + tensorrt and skips without them.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.backends import tensorrt as trt_backend
from edge_runtime.backends.tensorrt import (
    IOTensor,
    TrtBackend,
    buffers_to_grow,
    check_profile,
    initial_shapes,
    numpy_dtype,
    parse_version,
    plan_buffers,
    python_log_level,
    require_tensorrt,
)
from edge_runtime.engine_cache import (
    BackgroundBuilder,
    BuildState,
    EngineCache,
    EngineKey,
    atomic_write_bytes,
    default_cache_dir,
)
from edge_runtime.errors import BackendError, ConfigError, ExportError, InputError
from export import trt_build
from export.trt_build import (
    OnnxTraits,
    ProgressSink,
    build_engine,
    build_into_cache,
    parse_compute_capability,
    plan_build,
    plan_profile,
)

SHA = "ab" * 32


# =================================================================================================
# Fake tensorrt + pycuda modules
# =================================================================================================
class FakeDataType:
    def __init__(self, name: str) -> None:
        self.name = name


def _fake_trt(version: str) -> types.ModuleType:
    """A module with the TensorRT names our code uses, shaped after the given version."""
    major = int(version.split(".")[0])
    minor = int(version.split(".")[1])
    trt: Any = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.engines = {}  # serialized bytes -> engine description (for Runtime)
    trt.build_result = b"\x00\x01FAKE-ENGINE\xff" * 7  # what build_serialized_network returns
    trt.parse_ok = True
    trt.parse_errors = []
    trt.fast_int8 = True
    trt.dla_cores = 2
    trt.network_inputs = [("image", [1, 1, -1, -1])]
    trt.created = {}

    class ILogger:
        def __init__(self) -> None:
            pass

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    trt.ILogger = ILogger
    if major >= 10:
        trt.IProgressMonitor = IProgressMonitor
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT", NONE="NONE")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
    trt.OnnxParserFlag = types.SimpleNamespace(NATIVE_INSTANCENORM="NATIVE_INSTANCENORM")
    flags = {"GPU_FALLBACK": "GPU_FALLBACK"}
    if major < 11:  # TensorRT 11 removed the precision flags
        flags |= {"FP16": "FP16", "INT8": "INT8"}
    if (major, minor) >= (8, 6):
        flags |= {"VERSION_COMPATIBLE": "VERSION_COMPATIBLE"}
    trt.BuilderFlag = types.SimpleNamespace(**flags)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.DeviceType = types.SimpleNamespace(GPU="GPU", DLA="DLA")
    trt.HardwareCompatibilityLevel = types.SimpleNamespace(NONE="NONE", AMPERE_PLUS="AMPERE_PLUS")
    trt.Dims = lambda values: tuple(values)

    # ---- runtime side -------------------------------------------------------------------------
    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger
            self.engine_host_code_allowed = False  # TensorRT's default
            self.DLA_core = -1  # TensorRT's default

        def deserialize_cuda_engine(self, data: bytes) -> Any:
            trt.deserialized_on_dla = self.DLA_core
            desc = trt.engines.get(bytes(data))
            if desc is not None and desc.get("host_code") and not self.engine_host_code_allowed:
                self.logger.log(1, "engine has host code: set engine_host_code_allowed")  # ERROR
                return None
            return None if desc is None else FakeEngine(desc)

    trt.Runtime = Runtime

    # ---- builder side -------------------------------------------------------------------------
    class FakeTensor:
        def __init__(self, name: str, shape: list[int]) -> None:
            self.name, self.shape, self.dtype = name, shape, FakeDataType("FLOAT")

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.inputs = [FakeTensor(n, s) for n, s in trt.network_inputs]
            self.num_inputs, self.num_outputs = len(self.inputs), 1

        def get_input(self, i: int) -> FakeTensor:
            return self.inputs[i]

        def get_output(self, i: int) -> FakeTensor:
            return FakeTensor("out", [1, 4, -1, -1])

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[Any, Any, Any]] = {}

        def set_shape(self, name: str, mn: Any, opt: Any, mx: Any) -> None:
            self.shapes[name] = (mn, opt, mx)

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data)

        def serialize(self) -> bytes:
            return self.data + b"|timed"

    class Config:
        def __init__(self) -> None:
            self.flags: list[str] = []
            self.profiles: list[Profile] = []
            self.timing: TimingCache | None = None
            self.cache_inputs: list[bytes] = []
            self.progress_monitor: Any = None
            self.pool: dict[str, int] = {}

        def set_flag(self, flag: str) -> None:
            self.flags.append(flag)

        def add_optimization_profile(self, profile: Profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> TimingCache:
            self.cache_inputs.append(bytes(data))
            return TimingCache(data)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            if cache.data.startswith(b"foreign") and not ignore_mismatch:
                return False  # recorded on a device with other properties
            self.timing = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.timing

        if (major, minor) >= (8, 4):
            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                self.pool[pool] = size

    class Builder:
        def __init__(self, logger: Any) -> None:
            trt.created["builder"] = self
            current = FAKE_CUDA.current()
            trt.created["builder_gpu"] = None if current is None else current.index  # the GPU it builds for
            self.num_DLA_cores = trt.dla_cores

        if major < 11:  # removed in TensorRT 11: calling them there would be a bug
            @property
            def platform_has_fast_fp16(self) -> bool:
                return True

            @property
            def platform_has_fast_int8(self) -> bool:
                return trt.fast_int8

        def create_network(self, flags: int = 0) -> Network:
            trt.created["network"] = Network(flags)
            return trt.created["network"]

        def create_builder_config(self) -> Config:
            trt.created["config"] = Config()
            return trt.created["config"]

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> Any:
            monitor = config.progress_monitor
            if monitor is not None:
                monitor.phase_start("Building engine", None, 3)
                monitor.phase_start("Tactic timing", "Building engine", 2)
                for step in range(2):
                    if not monitor.step_complete("Tactic timing", step):
                        monitor.phase_finish("Tactic timing")
                        monitor.phase_finish("Building engine")
                        return None
                monitor.phase_finish("Tactic timing")
                monitor.phase_finish("Building engine")
            return trt.build_result

    class OnnxParser:
        def __init__(self, network: Network, logger: Any) -> None:
            self.num_errors = 0
            trt.created["parser_flags"] = self.flags = []

        def set_flag(self, flag: str) -> None:
            self.flags.append(flag)

        def parse_from_file(self, path: str) -> bool:
            trt.created["parsed"] = path
            self.num_errors = len(trt.parse_errors)
            return bool(trt.parse_ok)

        def get_error(self, i: int) -> str:
            return trt.parse_errors[i]

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    return trt


class FakeEngine:
    """x -> y = 2x + 1 (same shape), total = sum(x) (shape (1,)), by name, like a TensorRT engine."""

    def __init__(self, desc: dict[str, Any]) -> None:
        self.desc = desc
        self.names = [t["name"] for t in desc["tensors"]]

    def _t(self, name: str) -> dict[str, Any]:
        return next(t for t in self.desc["tensors"] if t["name"] == name)

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return self._t(name)["mode"]

    def is_shape_inference_io(self, name: str) -> bool:
        return False

    def get_tensor_shape(self, name: str) -> list[int]:
        return list(self._t(name)["shape"])

    def get_tensor_profile_shape(self, name: str, index: int) -> list[list[int]]:
        return [list(s) for s in self._t(name)["profile"]]

    def get_tensor_dtype(self, name: str) -> FakeDataType:
        return FakeDataType(self._t(name)["dtype"])

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.set_shape_calls = 0
        self.executions = 0

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.set_shape_calls += 1
        low, _, high = self.engine._t(name)["profile"]
        if not all(a <= s <= b for a, s, b in zip(low, shape, high)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> list[int]:
        if name == "y":
            return list(self.shapes.get("x", self.engine._t("x")["shape"]))
        return list(self.engine._t(name)["shape"])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        cuda = FAKE_CUDA
        assert cuda.current() is not None, "no CUDA context current on this thread"
        assert stream_handle == cuda.last_stream.handle
        shape = tuple(self.shapes.get("x", self.engine._t("x")["shape"]))  # fixed at capture, as on a GPU
        addresses = dict(self.addresses)

        def run() -> None:
            n = int(np.prod(shape))
            x = np.frombuffer(bytes(cuda.memory[addresses["x"]][: n * 4]), np.float32)
            y = (2 * x + 1 + cuda.replay_error * cuda.replaying).astype(np.float32)
            cuda.memory[addresses["y"]][: n * 4] = y.tobytes()
            cuda.memory[addresses["total"]][:4] = np.float32(x.sum()).tobytes()
            self.executions += 1

        cuda.last_stream.submit(run)
        return True


class FakeCuda(types.ModuleType):
    """pycuda.driver stand-in: device memory is a dict of bytearrays keyed by fake pointers."""

    def __init__(self) -> None:
        super().__init__("pycuda.driver")
        self.memory: dict[int, bytearray] = {}
        self.next_ptr = 0x1000
        self.allocations = 0
        self.frees = 0
        self.detached = 0
        self.retains = 0
        self.pushes = 0
        self.pops = 0
        self.last_stream: Any = None
        self.streams: dict[int, Any] = {}  # by handle, for the fake cudart
        self.captures = 0  # graphs instantiated (by the fake cudart)
        self.launches = 0  # graph replays
        self.replaying = False
        self.replay_error = 0.0  # added to y during replays: a graph that computes something else
        self.capture_values = False  # True: captured copies keep the bytes of capture time (stale inputs)
        self._local = threading.local()
        self.device_attribute = types.SimpleNamespace(MULTIPROCESSOR_COUNT="SM")
        self.gpu_names = ["Orin (nvgpu)"]  # one per fake GPU
        cuda = self

        class Allocation:
            def __init__(self, nbytes: int) -> None:
                self.ptr = cuda.next_ptr
                cuda.next_ptr += nbytes + 256
                cuda.memory[self.ptr] = bytearray(nbytes)
                cuda.allocations += 1

            def __int__(self) -> int:
                return self.ptr

            def free(self) -> None:
                del cuda.memory[self.ptr]
                cuda.frees += 1

        class Ctx:
            def __init__(self, index: int) -> None:
                self.index = index

            def push(self) -> None:
                cuda._stack().append(self)
                cuda.pushes += 1

            def detach(self) -> None:
                cuda.detached += 1

        class Context:
            @staticmethod
            def pop() -> None:
                cuda._stack().pop()
                cuda.pops += 1

        class Device:
            def __init__(self, index: int) -> None:
                self.index = index

            @staticmethod
            def count() -> int:
                return len(cuda.gpu_names)

            def retain_primary_context(self) -> Ctx:
                cuda.retains += 1
                return Ctx(self.index)

            def name(self) -> str:
                return cuda.gpu_names[self.index]

            def compute_capability(self) -> tuple[int, int]:
                return (8, 7)

            def get_attribute(self, attr: str) -> int:
                return 16

        class Stream:
            """Runs submitted work at once, or records it while the fake cudart captures this stream
            (real pycuda streams have no capture API: only synchronize, is_done, wait_for_event, handle)."""

            def __init__(self, flags: int = 0) -> None:  # pycuda: Stream(flags=0), flags to cuStreamCreate
                self.flags = flags
                self.handle = 0xBEEF + len(cuda.streams)
                cuda.streams[self.handle] = self
                self.syncs = 0
                self.recording: list[Any] | None = None
                cuda.last_stream = self

            def submit(self, op: Any) -> None:
                if self.recording is not None:
                    self.recording.append(op)
                else:
                    op()

            def synchronize(self) -> None:
                assert self.recording is None, "synchronize during capture is illegal"
                self.syncs += 1

        self.Allocation, self.Context, self.Device, self.Stream = Allocation, Context, Device, Stream

    def _stack(self) -> list[Any]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def current(self) -> Any:
        stack = self._stack()
        return stack[-1] if stack else None

    def init(self) -> None:
        pass

    def mem_alloc(self, nbytes: int) -> Any:
        return self.Allocation(nbytes)

    def pagelocked_empty(self, count: int, dtype: Any) -> np.ndarray:
        return np.empty(count, dtype)

    def memcpy_htod_async(self, dev: Any, host: np.ndarray, stream: Any) -> None:
        assert self.current() is not None and host.flags["C_CONTIGUOUS"]
        buf = self.memory[int(dev)]
        assert host.nbytes <= len(buf), "copy larger than the device allocation"
        if self.capture_values and stream.recording is not None:  # a graph that froze this call's inputs
            data = host.tobytes()
            stream.submit(lambda: buf.__setitem__(slice(0, len(data)), data))
        else:
            stream.submit(lambda: buf.__setitem__(slice(0, host.nbytes), host.tobytes()))  # reads host at run time

    def memcpy_dtoh_async(self, host: np.ndarray, dev: Any, stream: Any) -> None:
        buf = self.memory[int(dev)]

        def copy() -> None:
            host[...] = np.frombuffer(bytes(buf[: host.nbytes]), host.dtype).reshape(host.shape)

        stream.submit(copy)


class FakeCudart:
    """cuda-python's runtime bindings stand-in (cuda.bindings.runtime), for CUDA graphs: calls return
    (error, *values) as cuda-python's do; capture records what is submitted to the pycuda stream whose
    handle it is given. ``launch_error`` makes cudaGraphLaunch fail with that error."""

    class cudaError_t(enum.IntEnum):  # cuda-python's names
        cudaSuccess = 0
        cudaErrorInvalidValue = 1
        cudaErrorStreamCaptureInvalidated = 901

    class cudaStreamCaptureMode(enum.IntEnum):
        cudaStreamCaptureModeGlobal = 0
        cudaStreamCaptureModeThreadLocal = 1
        cudaStreamCaptureModeRelaxed = 2

    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda = cuda
        self.launch_error: Any = None
        self.graphs_alive = 0  # cudaGraph_t not destroyed
        self.execs_alive = 0  # cudaGraphExec_t not destroyed

    def cudaGetErrorName(self, err: Any) -> tuple[Any, bytes]:
        return self.cudaError_t.cudaSuccess, self.cudaError_t(err).name.encode()

    def cudaStreamBeginCapture(self, stream: int, mode: Any) -> tuple[Any]:
        assert mode == self.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal, mode
        s = self.cuda.streams[stream]
        assert s.recording is None, "already capturing"
        s.recording = []
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamEndCapture(self, stream: int) -> tuple[Any, Any]:
        s = self.cuda.streams[stream]
        ops, s.recording = s.recording, None
        self.graphs_alive += 1
        return self.cudaError_t.cudaSuccess, types.SimpleNamespace(ops=ops or [])

    def cudaGraphInstantiateWithFlags(self, graph: Any, flags: int) -> tuple[Any, Any]:
        assert flags == 0
        self.cuda.captures += 1
        self.execs_alive += 1
        return self.cudaError_t.cudaSuccess, types.SimpleNamespace(ops=list(graph.ops))

    def cudaGraphLaunch(self, graph_exec: Any, stream: int) -> tuple[Any]:
        assert stream in self.cuda.streams and self.cuda.current() is not None
        if self.launch_error is not None:
            return (self.launch_error,)
        self.cuda.launches += 1
        self.cuda.replaying = True
        try:
            for op in graph_exec.ops:
                op()
        finally:
            self.cuda.replaying = False
        return (self.cudaError_t.cudaSuccess,)

    def cudaGraphDestroy(self, graph: Any) -> tuple[Any]:
        self.graphs_alive -= 1
        return (self.cudaError_t.cudaSuccess,)

    def cudaGraphExecDestroy(self, graph_exec: Any) -> tuple[Any]:
        self.execs_alive -= 1
        return (self.cudaError_t.cudaSuccess,)


FAKE_CUDA: FakeCuda = FakeCuda()
FAKE_CUDART: FakeCudart = FakeCudart(FAKE_CUDA)


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Install fake ``tensorrt`` 10.3 and ``pycuda.driver`` in sys.modules, and a fake cuda-python
    runtime for CUDA graphs, for one test."""
    global FAKE_CUDA, FAKE_CUDART
    trt = _fake_trt("10.3.0.30")
    FAKE_CUDA = FakeCuda()
    FAKE_CUDART = FakeCudart(FAKE_CUDA)
    monkeypatch.setattr(trt_backend, "_cudart", lambda: FAKE_CUDART)
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = FAKE_CUDA  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", FAKE_CUDA)
    monkeypatch.setattr(trt_backend, "_primary_contexts", {})  # contexts of this test's fake only
    yield trt


def use_trt_version(monkeypatch: pytest.MonkeyPatch, version: str) -> Any:
    trt = _fake_trt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def engine_file(trt: Any, path: Path, *, dynamic: bool, out_dtype: str = "FLOAT") -> Path:
    x_shape = [1, 1, -1, -1] if dynamic else [1, 1, 8, 8]
    profile = [[1, 1, 4, 4], [1, 1, 8, 8], [1, 1, 32, 32]] if dynamic else None
    desc = {"tensors": [
        {"name": "x", "mode": "INPUT", "dtype": "FLOAT", "shape": x_shape, "profile": profile},
        {"name": "y", "mode": "OUTPUT", "dtype": out_dtype, "shape": x_shape},
        {"name": "total", "mode": "OUTPUT", "dtype": "FLOAT", "shape": [1]},
    ]}
    data = b"engine:" + path.name.encode()
    trt.engines[data] = desc
    path.write_bytes(data)
    return path


# =================================================================================================
# Pure logic of the TensorRT backend
# =================================================================================================
def test_parse_version() -> None:
    assert parse_version("10.3.0.30") == (10, 3, 0)
    assert parse_version("8.2.1") == (8, 2, 1)
    assert parse_version("11.0") == (11, 0, 0)
    assert parse_version("10.13.0.35.1") == (10, 13, 0)
    with pytest.raises(BackendError, match="MAJOR.MINOR"):
        parse_version("ten")


def test_numpy_dtype_mapping() -> None:
    assert numpy_dtype("FLOAT") == np.float32 and numpy_dtype("HALF") == np.float16
    assert numpy_dtype("DataType.INT8") == np.int8 and numpy_dtype("BOOL") == np.bool_
    with pytest.raises(BackendError, match="'logits'.*found BF16"):
        numpy_dtype("BF16", "logits")


def test_buffer_planning_and_growth() -> None:
    x = IOTensor("x", True, np.dtype(np.float16), (1, 3, None, None), ((1, 3, 8, 8), (1, 3, 64, 64), (1, 3, 128, 128)))
    y = IOTensor("y", False, np.dtype(np.float32), (1, 2))
    plan = plan_buffers([x, y], {"x": (1, 3, 64, 64), "y": (1, 2)})
    assert plan == {"x": 3 * 64 * 64 * 2, "y": 8}
    assert buffers_to_grow({}, plan) == ["x", "y"]  # nothing allocated yet
    assert buffers_to_grow({"x": plan["x"], "y": 8}, plan) == []  # same shapes: no reallocation
    bigger = plan_buffers([x, y], {"x": (1, 3, 128, 128), "y": (1, 2)})
    assert buffers_to_grow(plan, bigger) == ["x"]  # only the tensor that grew
    smaller = plan_buffers([x, y], {"x": (1, 3, 8, 8), "y": (1, 2)})
    assert buffers_to_grow(bigger, smaller) == []  # never shrink
    with pytest.raises(BackendError, match="data-dependent"):
        plan_buffers([y], {"y": (1, -1)})
    assert initial_shapes([x, y]) == {"x": (1, 3, 64, 64)}  # dynamic inputs start at profile opt


def test_check_profile_names_bounds() -> None:
    x = IOTensor("x", True, np.dtype(np.float32), (1, None), ((1, 4), (1, 8), (1, 16)))
    check_profile(x, (1, 16))
    with pytest.raises(InputError, match=r"'x'.*min \(1, 4\) max \(1, 16\).*found \(1, 17\)"):
        check_profile(x, (1, 17))


def test_python_log_level() -> None:
    assert python_log_level(1) == 40 and python_log_level(2) == 30 and python_log_level(3) == 10
    assert python_log_level(4) is None  # VERBOSE dropped


def test_stub_only_tensorrt_is_not_mistaken_for_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """tensorrt-stubs leaves an empty namespace package named tensorrt: it must read as absent."""
    stub = types.ModuleType("tensorrt")
    stub.__path__ = ["/site-packages/tensorrt"]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", stub)
    with pytest.raises(BackendError, match="only type stubs"):
        require_tensorrt()
    ok, why = trt_backend.tensorrt_available()
    assert not ok and "type stubs" in why


# =================================================================================================
# TrtBackend driven through fake tensorrt / pycuda
# =================================================================================================
def test_trt_backend_static_engine_runs_and_releases(fake_trt: Any, tmp_path: Path) -> None:
    """Exercises the logic around the TensorRT API with a fake module; the real API is checked by mypy
    against tensorrt-stubs, not run."""
    path = engine_file(fake_trt, tmp_path / "static.engine", dynamic=False)
    backend = TrtBackend(path, precision="fp16")
    assert FAKE_CUDA.allocations == 0  # construction is cheap
    with backend:
        assert [s.name for s in backend.inputs] == ["x"] and backend.inputs[0].shape == (1, 1, 8, 8)
        assert [s.name for s in backend.outputs] == ["y", "total"]
        assert backend.provider == "TensorRT 10.3.0.30 on GPU 0" and backend.trt_version == "10.3.0.30"
        assert FAKE_CUDA.allocations == 3  # one device buffer per I/O tensor, at load
        x = np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8)
        for _ in range(3):
            out = backend.infer({"x": x})
            np.testing.assert_array_equal(out["y"], 2 * x + 1)
            np.testing.assert_allclose(out["total"], [x.sum()])
        out["y"][...] = 0  # outputs are copies the caller owns
        assert FAKE_CUDA.allocations == 3  # nothing re-allocated across calls
        assert FAKE_CUDA.last_stream.syncs == 3  # one synchronize per call
        with pytest.raises(InputError, match="expected dtype float32"):
            backend.infer({"x": x.astype(np.float64)})
    assert FAKE_CUDA.frees == 3 and FAKE_CUDA.memory == {}
    # Balanced pushes and pops; never detach(): pycuda's releases a retained primary context without
    # popping it (it stayed current on the closing thread) and is a no-op on other threads.
    assert FAKE_CUDA.pushes == FAKE_CUDA.pops and FAKE_CUDA.detached == 0 and FAKE_CUDA.retains == 1
    assert FAKE_CUDA.current() is None
    with TrtBackend(path) as again:  # the process's one retained primary context, used again
        again.infer({"x": x})
    assert FAKE_CUDA.retains == 1 and FAKE_CUDA.current() is None


def test_version_compatible_engine_loads_only_with_host_code_allowed(fake_trt: Any, tmp_path: Path) -> None:
    """Exercises the logic around the TensorRT API with a fake module; the real API is checked by mypy
    against tensorrt-stubs, not run. A version-compatible engine embeds its lean runtime: TensorRT
    refuses it unless the runtime's engine_host_code_allowed is set, which TrtBackend does only when asked."""
    path = engine_file(fake_trt, tmp_path / "vc.engine", dynamic=False)
    fake_trt.engines[path.read_bytes()]["host_code"] = True
    with pytest.raises(BackendError, match="could not deserialise vc.engine .*host code.*allow_host_code=True"):
        TrtBackend(path).load()
    with TrtBackend(path, allow_host_code=True) as b:
        assert b.infer({"x": np.ones((1, 1, 8, 8), np.float32)})["y"].shape == (1, 1, 8, 8)
    # TensorRT 8.5's Runtime has no engine_host_code_allowed (8.6 added version compatibility): a
    # message, not an AttributeError
    real = fake_trt.Runtime

    class OldRuntime(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            del self.engine_host_code_allowed

    fake_trt.Runtime = OldRuntime
    try:
        with pytest.raises(BackendError, match="TensorRT >= 8.6 for a version-compatible engine"):
            TrtBackend(path, allow_host_code=True).load()
    finally:
        fake_trt.Runtime = real


def test_the_backend_stream_is_non_blocking(fake_trt: Any, tmp_path: Path) -> None:
    """Exercises the logic around the pycuda API with a fake module. A blocking stream that captures a
    CUDA graph leaves the legacy stream unusable for other threads (a background build): the backend's
    streams, the first and the fresh one after graphs are turned off, are created non-blocking."""
    path = engine_file(fake_trt, tmp_path / "s.engine", dynamic=False)
    with TrtBackend(path, use_cuda_graph=True) as b:
        assert b._stream.flags == 1
        b._disable_graphs("test")
        assert b._stream.flags == 1


def test_a_dla_engine_is_deserialised_on_its_dla_core(fake_trt: Any, tmp_path: Path) -> None:
    """Exercises the logic around the TensorRT API with a fake module. IRuntime.DLA_core defaults to -1;
    trtexec sets it before deserialising a DLA engine, and so does TrtBackend when given the core."""
    path = engine_file(fake_trt, tmp_path / "d.engine", dynamic=False)
    with TrtBackend(path, dla_core=1):
        assert fake_trt.deserialized_on_dla == 1
    with TrtBackend(path):
        assert fake_trt.deserialized_on_dla == -1  # a GPU engine: left at TensorRT's default
    with pytest.raises(ConfigError, match="dla_core"):
        TrtBackend(path, dla_core=-1)


def test_trt_logger_is_one_per_process_and_quotes_only_new_errors(fake_trt: Any) -> None:
    """TensorRT keeps one logger pointer per process: every builder and runtime gets the same logger,
    and a failed call quotes only the errors logged after its mark."""
    from edge_runtime.backends.tensorrt import error_mark, logged_errors, make_trt_logger

    logger = make_trt_logger()
    assert make_trt_logger() is logger
    logger.log(1, "old failure")  # ERROR
    mark = error_mark(logger)
    logger.log(2, "a warning")
    logger.log(0, "new failure")  # INTERNAL_ERROR
    assert logged_errors(logger, mark) == ["new failure"] and "old failure" in logged_errors(logger)


def test_trt_backend_dynamic_shapes_grow_buffers_only_when_needed(fake_trt: Any, tmp_path: Path) -> None:
    """Exercises the logic around the TensorRT API with a fake module; the real API is checked by mypy
    against tensorrt-stubs, not run."""
    path = engine_file(fake_trt, tmp_path / "dyn.engine", dynamic=True)
    with TrtBackend(path) as backend:
        assert backend.inputs[0].shape == (1, 1, None, None)
        context = backend._context
        assert FAKE_CUDA.allocations == 3  # allocated at the profile's opt shape (8x8)
        for shape, allocs in [((1, 1, 8, 8), 3), ((1, 1, 4, 6), 3), ((1, 1, 32, 20), 5), ((1, 1, 16, 16), 5)]:
            x = np.random.default_rng(0).random(shape, dtype=np.float32)
            out = backend.infer({"x": x})
            assert out["y"].shape == shape
            np.testing.assert_allclose(out["y"], 2 * x + 1, rtol=1e-6)
            assert FAKE_CUDA.allocations == allocs  # x and y re-allocated once, for the 32x20 frame
        calls = context.set_shape_calls  # type: ignore[union-attr]
        backend.infer({"x": np.zeros((1, 1, 16, 16), np.float32)})
        assert context.set_shape_calls == calls  # type: ignore[union-attr]  # same shape: not set again
        with pytest.raises(InputError, match=r"profile min \(1, 1, 4, 4\) max \(1, 1, 32, 32\)"):
            backend.infer({"x": np.zeros((1, 1, 64, 64), np.float32)})
    assert FAKE_CUDA.memory == {} and FAKE_CUDA.frees == FAKE_CUDA.allocations


def test_cuda_graph_is_captured_checked_replayed_and_recaptured_on_new_shapes(fake_trt: Any, tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Exercises the logic around the TensorRT/pycuda API with fake modules (CUDA graphs have never run
    on a GPU here). The first call per shape runs normally (TensorRT's warm-up before capture), then the
    copies and execute_async_v3 are captured; the next call replays the graph on its new inputs and also
    runs normally to check it; later calls launch the graph alone, reading their inputs from the
    page-locked buffers; a new shape or a re-allocated buffer captures again."""
    caplog.set_level("INFO")
    path = engine_file(fake_trt, tmp_path / "g.engine", dynamic=True)
    rng = np.random.default_rng(1)
    with TrtBackend(path, use_cuda_graph=True) as b:
        context = b._context
        for i, shape in enumerate([(1, 1, 8, 8)] * 3 + [(1, 1, 6, 6)] * 2 + [(1, 1, 32, 32)] + [(1, 1, 8, 8)]):
            x = rng.random(shape, dtype=np.float32)
            out = b.infer({"x": x})
            np.testing.assert_allclose(out["y"], 2 * x + 1, rtol=1e-6)
            np.testing.assert_allclose(out["total"], [x.sum()], rtol=1e-5)
        # captures: 8x8, 6x6, 32x32 (re-allocates x and y), 8x8 again (new addresses): 4. Replays: calls 2
        # and 5 (checked against a normal run), call 3 (trusted, alone). Normal runs: 1, 2, 4, 5, 6, 7.
        assert FAKE_CUDA.captures == 4 and b.graph_captures == 4 and FAKE_CUDA.launches == 3
        assert context.executions == 6 + 3  # type: ignore[union-attr]
        assert b.graph_disabled is None and "captured a CUDA graph for g.engine (x [1, 1, 8, 8]" in caplog.text
        assert FAKE_CUDART.graphs_alive == 0 and FAKE_CUDART.execs_alive == 1  # graphs freed once instantiated
    assert b._graph is None and FAKE_CUDA.memory == {} and FAKE_CUDART.execs_alive == 0


def test_a_trusted_graph_that_fails_to_launch_gives_a_normal_run(fake_trt: Any, tmp_path: Path) -> None:
    """Exercises the logic around the TensorRT/pycuda API with fake modules. Once a graph is trusted it is
    launched alone; a launch CUDA refuses then turns graphs off and that call runs normally (it raised
    before: a graph must never cost a result)."""
    path = engine_file(fake_trt, tmp_path / "g.engine", dynamic=True)
    with TrtBackend(path, use_cuda_graph=True) as b:
        for i in range(3):  # capture, checked replay, trusted launch
            b.infer({"x": np.full((1, 1, 8, 8), float(i), np.float32)})
        assert FAKE_CUDA.launches == 2 and b.graph_disabled is None
        FAKE_CUDART.launch_error = FAKE_CUDART.cudaError_t.cudaErrorInvalidValue
        x = np.full((1, 1, 8, 8), 7.0, np.float32)
        np.testing.assert_array_equal(b.infer({"x": x})["y"], 2 * x + 1)
        assert b.graph_disabled == "launch: BackendError: cudaGraphLaunch: cudaErrorInvalidValue"
        assert FAKE_CUDART.execs_alive == 0


def test_real_pycuda_has_no_graph_api_so_the_fake_has_none() -> None:
    """The first version captured with pycuda's Stream.begin_capture / Graph.instantiate, which no pycuda
    has (2026.1 read: Stream has synchronize, is_done, wait_for_event, handle); its fake invented them,
    so the tests passed while a GPU would always have run without graphs. Capture goes through
    cuda-python now, and the pycuda fake keeps to what pycuda has."""
    stream = FakeCuda().Stream()
    assert not {"begin_capture", "end_capture"} & set(dir(stream))
    assert not hasattr(FakeCuda(), "capture_mode") and not hasattr(FakeCuda(), "Graph")


def test_no_graph_without_cuda_python(fake_trt: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exercises the logic around the TensorRT/pycuda API with fake modules. Without cuda-python (pycuda
    has no stream capture) graphs stay off, saying why, and every run is a normal one."""
    monkeypatch.setattr(trt_backend, "_cudart", lambda: None)
    path = engine_file(fake_trt, tmp_path / "g.engine", dynamic=True)
    with TrtBackend(path, use_cuda_graph=True) as b:
        for i in range(3):
            x = np.full((1, 1, 8, 8), float(i), np.float32)
            np.testing.assert_array_equal(b.infer({"x": x})["y"], 2 * x + 1)
        assert b.graph_disabled is not None and "cuda-python" in b.graph_disabled and b.graph_captures == 0


def test_cuda_graph_failures_fall_back_to_normal_runs(fake_trt: Any, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Exercises the logic around the TensorRT/pycuda API with fake modules. A launch that CUDA refuses, a
    replay that computes something else, or a graph that froze the inputs it was captured with turns
    graphs off with a warning; every result still comes from a normal run. Shapes that keep changing
    stop capturing after MAX_GRAPH_CAPTURES."""
    from edge_runtime.backends.tensorrt import MAX_GRAPH_CAPTURES

    path = engine_file(fake_trt, tmp_path / "g.engine", dynamic=True)
    for setup, why in ((lambda: setattr(FAKE_CUDART, "launch_error", FAKE_CUDART.cudaError_t.cudaErrorInvalidValue),
                        "replay: BackendError: cudaGraphLaunch: cudaErrorInvalidValue"),
                       (lambda: setattr(FAKE_CUDA, "replay_error", 0.5), "other values than a normal run for ['y']"),
                       (lambda: setattr(FAKE_CUDA, "capture_values", True), "for ['y', 'total']")):
        setup()
        with TrtBackend(path, use_cuda_graph=True) as b:
            for i in range(3):
                x = np.full((1, 1, 8, 8), float(i), np.float32)  # new inputs each call
                np.testing.assert_array_equal(b.infer({"x": x})["y"], 2 * x + 1)
            assert b.graph_disabled is not None and why in b.graph_disabled and b._graph is None
        assert f"CUDA graphs off for g.engine ({b.graph_disabled}" in caplog.text
        FAKE_CUDART.launch_error, FAKE_CUDA.replay_error, FAKE_CUDA.capture_values = None, 0.0, False
    with TrtBackend(path, use_cuda_graph=True) as b:
        for i in range(MAX_GRAPH_CAPTURES + 2):
            b.infer({"x": np.ones((1, 1, 4 + i, 8), np.float32)})
        assert b.graph_captures == MAX_GRAPH_CAPTURES and "changed more than" in (b.graph_disabled or "")
    with TrtBackend(path) as b:  # off by default: no capture at all
        b.infer({"x": np.ones((1, 1, 8, 8), np.float32)})
        b.infer({"x": np.ones((1, 1, 8, 8), np.float32)})
    assert FAKE_CUDA.captures == 3 + MAX_GRAPH_CAPTURES  # the three failed checks and the limited run


def test_trt_backend_runs_from_a_worker_thread(fake_trt: Any, tmp_path: Path) -> None:
    """Exercises the logic around the TensorRT API with a fake module; the real API is checked by mypy
    against tensorrt-stubs, not run. The fake execute asserts a CUDA context is current on the
    calling thread: the backend must push its context there, not rely on the loading thread."""
    path = engine_file(fake_trt, tmp_path / "t.engine", dynamic=False)
    results: list[Any] = []
    with TrtBackend(path) as backend:
        def worker() -> None:
            try:
                results.append(backend.infer({"x": np.ones((1, 1, 8, 8), np.float32)})["total"])
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                results.append(exc)

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join(10)
        assert FAKE_CUDA.current() is None  # the load thread left nothing pushed
    assert len(results) == 1 and not isinstance(results[0], BaseException), results
    np.testing.assert_allclose(results[0], [64.0])


def test_trt_backend_refusals(fake_trt: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exercises the logic around the TensorRT API with a fake module; the real API is checked by mypy
    against tensorrt-stubs, not run."""
    with pytest.raises(ConfigError, match="device_index"):
        TrtBackend(tmp_path / "x.engine", device_index=-1)
    with pytest.raises(BackendError, match="expected a file"):
        TrtBackend(tmp_path / "absent.engine").load()
    foreign = tmp_path / "foreign.engine"
    foreign.write_bytes(b"built elsewhere")  # the fake runtime cannot deserialise it
    with pytest.raises(BackendError, match="rebuild it on this device"):
        TrtBackend(foreign).load()
    assert FAKE_CUDA.detached == 0 and FAKE_CUDA.pushes == FAKE_CUDA.pops  # popped on failure, not detached
    bf16 = engine_file(fake_trt, tmp_path / "bf16.engine", dynamic=False, out_dtype="BF16")
    with pytest.raises(BackendError, match="'y'.*found BF16"):
        TrtBackend(bf16).load()
    with pytest.raises(BackendError, match="call load"):
        TrtBackend(bf16).infer({"x": np.zeros((1, 1, 8, 8), np.float32)})
    old = use_trt_version(monkeypatch, "8.2.1")
    with pytest.raises(BackendError, match=r"TensorRT >= 8.5.0 \(name-based I/O\), found 8.2.1"):
        TrtBackend(engine_file(old, tmp_path / "old.engine", dynamic=False)).load()


def test_probe_device_gives_cache_key_fields(fake_trt: Any) -> None:
    """Exercises the logic around the TensorRT API with a fake module; the real API is checked by mypy
    against tensorrt-stubs, not run."""
    ident = trt_backend.probe_device(0)
    assert (ident.trt_version, ident.gpu_name, ident.compute_capability, ident.sm_count) == (
        "10.3.0.30", "Orin (nvgpu)", "8.7", 16)
    assert trt_backend.tensorrt_available() == (True, "10.3.0.30")


def test_tensorrt_older_than_the_backend_reads_as_unavailable(fake_trt: Any, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """JetPack 4.6's TensorRT 8.2 (Jetson Nano) imports, but TrtBackend refuses < 8.5: tensorrt_available()
    must say no, with the reason (logged once), so that the runtime neither builds nor loads an engine."""
    monkeypatch.setattr(trt_backend, "_logged_too_old", set(), raising=False)
    use_trt_version(monkeypatch, "8.2.1.8")
    caplog.set_level(logging.WARNING, logger=trt_backend.__name__)
    for _ in range(3):
        ok, why = trt_backend.tensorrt_available()
        assert not ok and why == "TensorRT: expected >= 8.5.0 (name-based I/O), found 8.2.1.8"
    assert [r.getMessage() for r in caplog.records] == [f"{why}: using ONNX Runtime, no TensorRT engine is built"]
    use_trt_version(monkeypatch, "8.5.0")
    assert trt_backend.tensorrt_available() == (True, "8.5.0")


# =================================================================================================
# export/trt_build.py: version branches, flags, DLA, profiles, bytes on disk
# =================================================================================================
def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def fp32_onnx(path: Path) -> Path:
    """1x1xHxW -> conv 3x3 x4, H and W dynamic."""
    w = numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["out"], pads=[1, 1, 1, 1])], "fp32",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, "H", "W"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, "H", "W"])], [w])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)


def fp16_onnx(path: Path) -> Path:
    """FP32 in/out, FP16 inside (what `export quantize` fp16 writes): Cast -> Add fp16 -> Cast."""
    bias = numpy_helper.from_array(np.ones((1,), np.float16), "bias")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["image"], ["h"], to=TensorProto.FLOAT16),
         helper.make_node("Add", ["h", "bias"], ["h2"]),
         helper.make_node("Cast", ["h2"], ["out"], to=TensorProto.FLOAT)], "fp16",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 64, 64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, 64, 64])], [bias])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)


def qdq_onnx(path: Path) -> Path:
    """Symmetric Q/DQ pair around the input (an int8 graph)."""
    scale = numpy_helper.from_array(np.array(0.02, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(0, np.int8), "zero")
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["image", "scale", "zero"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["out"])], "qdq",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 64, 64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, 64, 64])], [scale, zero])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)


FP32 = OnnxTraits(has_qdq=False, has_fp16=False, inputs={"x": (1, 1, None, None)})
FP16 = OnnxTraits(has_qdq=False, has_fp16=True, inputs={"x": (1, 1, 64, 64)})
QDQ = OnnxTraits(has_qdq=True, has_fp16=False, inputs={"x": (1, 1, 64, 64)})


def test_onnx_traits(tmp_path: Path) -> None:
    t32 = trt_build.onnx_traits(fp32_onnx(tmp_path / "a.onnx"))
    t16 = trt_build.onnx_traits(fp16_onnx(tmp_path / "b.onnx"))
    t8 = trt_build.onnx_traits(qdq_onnx(tmp_path / "c.onnx"))
    assert (t32.has_qdq, t32.has_fp16, t32.inputs) == (False, False, {"image": (1, 1, None, None)})
    assert (t16.has_qdq, t16.has_fp16) == (False, True)
    assert (t8.has_qdq, t8.has_fp16) == (True, False)
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(ExportError, match="readable ONNX"):
        trt_build.onnx_traits(tmp_path / "bad.onnx")


@pytest.mark.parametrize(
    ("version", "precision", "traits", "typed_arg", "typed", "flags", "explicit_batch"),
    [
        ((10, 3, 0), "fp32", FP32, None, False, (), False),
        ((10, 3, 0), "fp16", FP32, None, False, ("FP16",), False),  # classic FP16 flag on 10
        ((10, 3, 0), "fp16", FP16, None, True, (), False),  # FP16 ONNX: strongly typed
        ((10, 3, 0), "int8", QDQ, None, True, (), False),  # Q/DQ ONNX: strongly typed
        ((10, 3, 0), "int8", QDQ, False, False, ("INT8", "FP16"), False),  # weakly typed Q/DQ on request
        ((11, 0, 0), "fp16", FP16, None, True, (), False),
        ((11, 0, 0), "int8", QDQ, None, True, (), False),
        ((11, 0, 0), "fp32", FP32, None, True, (), False),  # always strongly typed on 11
        ((8, 2, 1), "fp16", FP32, None, False, ("FP16",), True),  # legacy Nano
        ((8, 6, 1), "int8", QDQ, None, False, ("INT8", "FP16"), True),
    ],
)
def test_plan_build_version_branches(version: tuple[int, int, int], precision: str, traits: OnnxTraits,
                                     typed_arg: bool | None, typed: bool, flags: tuple[str, ...],
                                     explicit_batch: bool) -> None:
    plan = plan_build(version, precision, traits, strongly_typed=typed_arg)
    assert plan.strongly_typed is typed
    assert plan.builder_flags == flags
    assert plan.explicit_batch_flag is explicit_batch
    assert plan.legacy_workspace is (version < (8, 4, 0))
    assert plan.progress_monitor is (version[0] >= 10)


@pytest.mark.parametrize(
    ("version", "precision", "traits", "kwargs", "message"),
    [
        ((10, 3, 0), "int8", FP32, {}, "explicit Q/DQ"),
        ((11, 0, 0), "int8", FP32, {}, "explicit Q/DQ"),
        ((11, 0, 0), "fp16", FP32, {}, "expected an FP16 ONNX"),
        ((11, 0, 0), "fp16", FP16, {"strongly_typed": False}, "strongly typed networks only"),
        ((8, 2, 1), "fp16", FP32, {"strongly_typed": True}, "need TensorRT >= 10"),
        ((10, 3, 0), "fp16", FP32, {"strongly_typed": True}, "builds an FP32 engine"),
        ((10, 3, 0), "fp32", QDQ, {}, "found one with Q/DQ"),
        ((10, 3, 0), "bf16", FP32, {}, "one of"),
        ((7, 1, 0), "fp32", FP32, {}, "TensorRT >= 8"),
        ((10, 3, 0), "fp32", FP32, {"dla_core": 0}, "DLA runs FP16 and INT8 only"),
        ((10, 3, 0), "fp16", FP16, {"dla_core": 0, "hardware_compatible": True}, "GPU only"),
        ((8, 5, 2), "fp16", FP32, {"version_compatible": True}, "need TensorRT >= 8.6"),
        ((10, 3, 0), "fp16", FP16, {"hardware_compatible": True, "jetson": True}, "not supported on JetPack"),
        ((10, 8, 0), "fp16", FP16, {"hardware_compatible": True, "compute_capability": (7, 5)},
         r"Ampere or later GPU \(compute capability >= 8.0\), found 7.5"),
    ],
)
def test_plan_build_refusals(version: tuple[int, int, int], precision: str, traits: OnnxTraits,
                             kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ExportError, match=message):
        plan_build(version, precision, traits, **kwargs)


def test_plan_build_dla_flags(caplog: pytest.LogCaptureFixture) -> None:
    # TensorRT 10 on a DLA core: weakly typed with precision flags, so float layers can run FP16 on the DLA
    dla16 = plan_build((10, 3, 0), "fp16", FP16, dla_core=1)
    assert not dla16.strongly_typed and dla16.builder_flags == ("FP16", "GPU_FALLBACK")
    assert plan_build((10, 3, 0), "fp16", FP16, dla_core=1, gpu_fallback=False).builder_flags == ("FP16",)
    dla8 = plan_build((10, 3, 0), "int8", QDQ, dla_core=0)
    assert not dla8.strongly_typed and dla8.builder_flags == ("INT8", "FP16", "GPU_FALLBACK")
    with caplog.at_level(logging.WARNING, logger="export.trt_build"):  # on request, with a warning
        assert plan_build((10, 3, 0), "int8", QDQ, dla_core=0, strongly_typed=True).strongly_typed
    assert "fall back to the GPU" in caplog.text
    # an FP32 ONNX asked for fp16 on a DLA core: the FP16 flag, weakly typed
    assert plan_build((10, 3, 0), "fp16", FP32, dla_core=0).builder_flags == ("FP16", "GPU_FALLBACK")
    # TensorRT 11 has no precision flags: strongly typed on the DLA too
    dla11 = plan_build((11, 4, 1), "int8", QDQ, dla_core=0)
    assert dla11.strongly_typed and dla11.builder_flags == ("GPU_FALLBACK",)
    assert plan_build((10, 3, 0), "fp16", FP16, version_compatible=True).builder_flags == ("VERSION_COMPATIBLE",)
    # TensorRT 8.6's parser has NATIVE_INSTANCENORM off, and compatible builds require it (10: on by default)
    assert plan_build((8, 6, 1), "fp16", FP16, version_compatible=True).native_instancenorm
    assert plan_build((8, 6, 1), "fp16", FP16, hardware_compatible=True).native_instancenorm
    assert not plan_build((8, 6, 1), "fp16", FP16).native_instancenorm
    assert not plan_build((10, 3, 0), "fp16", FP16, version_compatible=True).native_instancenorm


def test_plan_profile() -> None:
    inputs = {"image": (1, 1, None, None), "meta": (1, 4)}
    assert plan_profile(inputs, target_hw=(512, 384)) == {"image": ((1, 1, 512, 384),) * 3}
    given = {"image": ((1, 1, 256, 256), (1, 1, 512, 512), (1, 1, 1024, 1024))}
    assert plan_profile(inputs, given) == given
    assert plan_profile({"batch": (None, 3, 64, 64)}) == {"batch": ((1, 3, 64, 64),) * 3}
    with pytest.raises(ExportError, match=r"'image' axis 2 .* dynamic"):
        plan_profile(inputs)
    with pytest.raises(ExportError, match="matching static dims"):
        plan_profile(inputs, {"image": ((1, 3, 8, 8), (1, 3, 8, 8), (1, 3, 8, 8))})
    with pytest.raises(ExportError, match="found \\['nope'\\]"):
        plan_profile(inputs, {"nope": ((1,), (1,), (1,))})
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        plan_profile(inputs, {"image": ((1, 1, 64, 64), (1, 1, 32, 32), (1, 1, 128, 128))})


def test_build_engine_writes_exact_bytes_and_timing_cache(fake_trt: Any, tmp_path: Path) -> None:
    """Exercises the logic around the TensorRT API with a fake module; the real API is checked by mypy
    against tensorrt-stubs, not run."""
    onnx_path = fp32_onnx(tmp_path / "m.onnx")
    timing = tmp_path / "tc" / "t.timing-cache"
    timing.parent.mkdir()
    timing.write_bytes(b"previous-tactics")
    report = build_engine(onnx_path, tmp_path / "out" / "m.engine", precision="fp16", workspace_mb=256,
                          target_hw=(128, 96), timing_cache=timing, progress=False)
    engine = tmp_path / "out" / "m.engine"
    assert engine.read_bytes() == fake_trt.build_result  # byte for byte: nothing prepended
    config, network = fake_trt.created["config"], fake_trt.created["network"]
    assert config.cache_inputs == [b"previous-tactics"]  # the persistent cache was loaded ...
    assert timing.read_bytes() == b"previous-tactics|timed"  # ... and saved after the build
    assert config.pool == {"WORKSPACE": 256 << 20}
    assert config.flags == ["FP16"] and network.flags == 0  # TensorRT 10, FP32 ONNX, fp16: weakly typed
    assert config.profiles[0].shapes == {"image": ((1, 1, 128, 96),) * 3}
    assert fake_trt.created["parsed"] == str(onnx_path)
    assert report.engine_bytes == len(fake_trt.build_result) and report.timing_cache_loaded
    assert report.profile == {"image": {"min": [1, 1, 128, 96], "opt": [1, 1, 128, 96], "max": [1, 1, 128, 96]}}
    assert not list(tmp_path.rglob("*.partial"))


def test_build_engine_survives_a_foreign_or_unsaveable_timing_cache(fake_trt: Any, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Exercises the logic around the TensorRT API with a fake module; the real API is checked by mypy
    against tensorrt-stubs, not run. A cache TensorRT refuses (set_timing_cache -> False: another GPU)
    is replaced by an empty one, and a cache that cannot be read back or saved costs a warning, not
    the engine."""
    onnx_path = fp32_onnx(tmp_path / "m.onnx")
    timing = tmp_path / "t.timing-cache"
    timing.write_bytes(b"foreign-device-tactics")
    report = build_engine(onnx_path, tmp_path / "a.engine", precision="fp32", workspace_mb=64, target_hw=(8, 8),
                          timing_cache=timing, progress=False)
    assert not report.timing_cache_loaded and "recorded on another device" in caplog.text
    assert fake_trt.created["config"].cache_inputs == [b"foreign-device-tactics", b""]
    assert timing.read_bytes() == b"|timed"  # the fresh cache replaced the foreign one
    config_cls = type(fake_trt.created["config"])
    original = config_cls.get_timing_cache
    config_cls.get_timing_cache = lambda self: None  # what TensorRT returns when no cache is set
    try:
        build_engine(onnx_path, tmp_path / "b.engine", precision="fp32", workspace_mb=64, target_hw=(8, 8),
                     timing_cache=timing, progress=False)
    finally:
        config_cls.get_timing_cache = original
    assert (tmp_path / "b.engine").read_bytes() == fake_trt.build_result
    assert "timing cache not saved" in caplog.text and timing.read_bytes() == b"|timed"


def test_build_engine_strongly_typed_on_10_and_11(fake_trt: Any, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Exercises the logic around the TensorRT API with a fake module; the real API is checked by mypy
    against tensorrt-stubs, not run. The fake TensorRT 11 has no FP16/INT8 flags and no
    platform_has_fast_*: touching any of them would raise."""
    fake_trt.network_inputs = [("image", [1, 1, 64, 64])]
    onnx16 = fp16_onnx(tmp_path / "m16.onnx")
    build_engine(onnx16, tmp_path / "a.engine", precision="fp16", workspace_mb=64, progress=False)
    assert fake_trt.created["network"].flags == 1 << 1  # STRONGLY_TYPED on 10
    assert fake_trt.created["config"].flags == []
    trt11 = use_trt_version(monkeypatch, "11.0.0.1")
    trt11.network_inputs = [("image", [1, 1, 64, 64])]
    report = build_engine(qdq_onnx(tmp_path / "m8.onnx"), tmp_path / "b.engine", precision="int8",
                          workspace_mb=64, progress=False)
    assert trt11.created["network"].flags == 0  # always strongly typed on 11, no flag needed
    assert trt11.created["config"].flags == [] and report.strongly_typed
    with pytest.raises(ExportError, match="expected an FP16 ONNX"):
        build_engine(fp32_onnx(tmp_path / "m32.onnx"), tmp_path / "c.engine", precision="fp16",
                     workspace_mb=64, target_hw=(64, 64), progress=False)


def test_build_engine_legacy_nano_branch(fake_trt: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exercises the logic around the TensorRT API with a fake module; the real API is checked by mypy
    against tensorrt-stubs, not run. The fake 8.2 config has no set_memory_pool_limit."""
    trt8 = use_trt_version(monkeypatch, "8.2.1.8")
    build_engine(fp32_onnx(tmp_path / "m.onnx"), tmp_path / "n.engine", precision="fp16", workspace_mb=128,
                 target_hw=(64, 64), progress=True)
    config = trt8.created["config"]
    assert config.max_workspace_size == 128 << 20 and config.flags == ["FP16"]
    assert trt8.created["network"].flags == 1 << 0  # EXPLICIT_BATCH
    assert config.progress_monitor is None  # no IProgressMonitor before TensorRT 10
    trt8.fast_int8 = False
    trt8.network_inputs = [("image", [1, 1, 64, 64])]
    with pytest.raises(ExportError, match="no fast INT8"):
        build_engine(qdq_onnx(tmp_path / "q.onnx"), tmp_path / "q.engine", precision="int8", workspace_mb=128,
                     progress=False)


def test_engine_key_digest_covers_external_weights(tmp_path: Path) -> None:
    """TensorRT builds from an ONNX's external data files too; the key hashed only the .onnx, which
    for a model saved with external data holds names and offsets: retrained weights kept the key, and
    the cache would serve the old engine. Inline models keep the file's sha256 (what bundles record)."""
    import hashlib

    from export.trt_build import model_digest, onnx_traits

    inline = fp32_onnx(tmp_path / "inline.onnx")
    assert onnx_traits(inline).external_data == ()
    assert model_digest(inline) == hashlib.sha256(inline.read_bytes()).hexdigest()
    model = onnx.load(str(inline))
    ext = tmp_path / "ext" / "m.onnx"
    ext.parent.mkdir()
    onnx.save_model(model, str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.weights", size_threshold=0)
    traits = onnx_traits(ext)
    assert traits.external_data == ("m.weights",)
    before = model_digest(ext, traits.external_data)
    weights = ext.parent / "m.weights"
    data = bytearray(weights.read_bytes())
    data[0] ^= 0xFF  # retrained: other weights, the same .onnx bytes
    weights.write_bytes(bytes(data))
    assert model_digest(ext, traits.external_data) != before
    weights.unlink()
    with pytest.raises(ExportError, match="external data file 'm.weights'"):
        model_digest(ext, traits.external_data)


def test_version_compatible_build_on_86_sets_native_instancenorm(fake_trt: Any, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Exercises the logic around the TensorRT API with a fake module; the real API is checked by mypy
    against tensorrt-stubs, not run. TensorRT 8.6's NvOnnxParser.h: NATIVE_INSTANCENORM "is required when
    building version-compatible or hardware-compatible engines" and parser flags default to 0 there, so
    a compatible 8.6 build of a model with InstanceNormalization failed; plain builds leave it alone."""
    trt86 = use_trt_version(monkeypatch, "8.6.1.6")
    onnx_path = fp32_onnx(tmp_path / "m.onnx")
    build_engine(onnx_path, tmp_path / "v.engine", precision="fp32", workspace_mb=64, target_hw=(64, 64),
                 version_compatible=True, progress=False)
    assert trt86.created["parser_flags"] == ["NATIVE_INSTANCENORM"]
    build_engine(onnx_path, tmp_path / "p.engine", precision="fp32", workspace_mb=64, target_hw=(64, 64),
                 progress=False)
    assert trt86.created["parser_flags"] == []


def test_build_engine_dla_mapping(fake_trt: Any, tmp_path: Path) -> None:
    """Exercises the logic around the TensorRT API with a fake module; the real API is checked by mypy
    against tensorrt-stubs, not run."""
    fake_trt.network_inputs = [("image", [1, 1, 64, 64])]
    onnx16 = fp16_onnx(tmp_path / "m.onnx")
    report = build_engine(onnx16, tmp_path / "d.engine", precision="fp16", workspace_mb=64, dla_core=1,
                          progress=False)
    config = fake_trt.created["config"]
    assert config.default_device_type == "DLA" and config.DLA_core == 1
    assert config.flags == ["FP16", "GPU_FALLBACK"] and report.dla_core == 1 and report.gpu_fallback
    assert not report.strongly_typed
    build_engine(onnx16, tmp_path / "e.engine", precision="fp16", workspace_mb=64, dla_core=0,
                 gpu_fallback=False, progress=False)
    assert fake_trt.created["config"].flags == ["FP16"]
    with pytest.raises(ExportError, match=r"expected < 2 \(DLA cores here\), found 2"):
        build_engine(onnx16, tmp_path / "f.engine", precision="fp16", workspace_mb=64, dla_core=2, progress=False)
    fake_trt.dla_cores = 0  # e.g. TensorRT 11.0-11.4.0 on an Orin: DLA gone from that TensorRT
    with pytest.raises(ExportError, match="reporting no DLA core .*10.7 was the last 10.x .*build for the GPU"):
        build_engine(onnx16, tmp_path / "f.engine", precision="fp16", workspace_mb=64, dla_core=0, progress=False)
    fake_trt.dla_cores = 2
    build_engine(onnx16, tmp_path / "g.engine", precision="fp16", workspace_mb=64, hardware_compatible=True,
                 version_compatible=True, progress=False)
    config = fake_trt.created["config"]
    assert config.hardware_compatibility_level == "AMPERE_PLUS" and config.flags == ["VERSION_COMPATIBLE"]
    assert fake_trt.created["parser_flags"] == []  # 10.x: NATIVE_INSTANCENORM is on by default
    # What the device config says of the target: a Jetson (JetPack) or a pre-Ampere GPU is refused.
    with pytest.raises(ExportError, match="not supported on JetPack"):
        build_engine(onnx16, tmp_path / "h.engine", precision="fp16", workspace_mb=64, hardware_compatible=True,
                     device_kind="jetson", compute_capability="8.7", progress=False)
    with pytest.raises(ExportError, match="found 7.5"):
        build_engine(onnx16, tmp_path / "h.engine", precision="fp16", workspace_mb=64, hardware_compatible=True,
                     device_kind="dgpu", compute_capability="7.5", progress=False)
    build_engine(onnx16, tmp_path / "h.engine", precision="fp16", workspace_mb=64, hardware_compatible=True,
                 device_kind="dgpu", compute_capability="8.9", progress=False)
    assert fake_trt.created["config"].hardware_compatibility_level == "AMPERE_PLUS"


def test_parse_compute_capability() -> None:
    assert parse_compute_capability("8.7") == (8, 7) and parse_compute_capability("9") == (9, 0)
    assert parse_compute_capability(None) is None
    with pytest.raises(ExportError, match="MAJOR.MINOR"):
        parse_compute_capability("ampere")


def test_build_engine_failures_leave_no_engine(fake_trt: Any, tmp_path: Path) -> None:
    """Exercises the logic around the TensorRT API with a fake module; the real API is checked by mypy
    against tensorrt-stubs, not run."""
    onnx_path = fp32_onnx(tmp_path / "m.onnx")
    engine = tmp_path / "m.engine"
    fake_trt.parse_ok = False
    fake_trt.parse_errors = ["node Conv_0: unsupported pads", "node Relu_1: bad input"]
    with pytest.raises(ExportError, match="rejected m.onnx \\(2 errors\\): node Conv_0: unsupported pads \\| node Relu_1"):
        build_engine(onnx_path, engine, precision="fp32", workspace_mb=64, target_hw=(8, 8), progress=False)
    fake_trt.parse_ok, fake_trt.build_result = True, None
    with pytest.raises(ExportError, match="failed for m.onnx"):
        build_engine(onnx_path, engine, precision="fp32", workspace_mb=64, target_hw=(8, 8), progress=False)
    assert not engine.exists()
    with pytest.raises(ExportError, match="expected an ONNX file"):
        build_engine(tmp_path / "none.onnx", engine, precision="fp32", workspace_mb=64)
    with pytest.raises(ExportError, match="workspace_mb"):
        build_engine(onnx_path, engine, precision="fp32", workspace_mb=0)
    fake_trt.build_result = b"engine"
    build_engine(onnx_path, engine, precision="fp32", workspace_mb=None, target_hw=(8, 8), progress=False)
    assert fake_trt.created["config"].pool == {} and engine.read_bytes() == b"engine"  # TensorRT's default


def test_build_progress_log_and_cancel(fake_trt: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Exercises the logic around the TensorRT API with a fake module; the real API is checked by mypy
    against tensorrt-stubs, not run. The fake builder drives the IProgressMonitor like TensorRT does."""
    caplog.set_level("INFO")
    onnx_path = fp32_onnx(tmp_path / "m.onnx")
    build_engine(onnx_path, tmp_path / "a.engine", precision="fp32", workspace_mb=64, target_hw=(8, 8), progress="log")
    assert "TensorRT build: Building engine (3 steps)" in caplog.text
    assert "TensorRT build:   Tactic timing done" in caplog.text
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(ExportError, match="build cancelled"):
        build_engine(onnx_path, tmp_path / "b.engine", precision="fp32", workspace_mb=64, target_hw=(8, 8),
                     progress="log", cancel=cancel)
    assert not (tmp_path / "b.engine").exists()


def test_progress_sink_bars_nest_and_close() -> None:
    sink = ProgressSink("bar")
    sink.phase_start("Building", None, 2)
    sink.phase_start("Timing", "Building", 4)
    assert sink._depth == {"Building": 0, "Timing": 1}
    assert sink.step_complete("Timing", 3) is True
    assert sink._bars["Timing"].n == 4
    sink.phase_finish("Timing")
    sink.phase_finish("Building")
    assert sink.finished == ["Timing", "Building"] and sink._bars == {}


def test_build_into_cache_commits_engine_with_sidecar(fake_trt: Any, tmp_path: Path) -> None:
    """Exercises the logic around the TensorRT API with a fake module; the real API is checked by mypy
    against tensorrt-stubs, not run."""
    cache = EngineCache(tmp_path / "cache")
    key = EngineKey(SHA, "10.3.0.30", "Orin", "8.7", 16, "fp32",
                    profile={"image": ((1, 1, 64, 64),) * 3})
    path = build_into_cache(cache, key, fp32_onnx(tmp_path / "m.onnx"), workspace_mb=64, progress=False)
    assert path == cache.engine_path(key) and path.read_bytes() == fake_trt.build_result
    assert cache.lookup(key) == path
    sidecar = json.loads(cache.sidecar_path(path).read_text())
    assert sidecar["info"]["precision"] == "fp32" and sidecar["key_digest"] == key.digest()
    assert cache.timing_cache_path("10.3.0.30", "Orin", "8.7").is_file()
    assert fake_trt.created["config"].profiles[0].shapes == {"image": ((1, 1, 64, 64),) * 3}
    assert not list((tmp_path / "cache").glob("*.partial"))


def test_engine_key_for_probes_device_and_matches_build_profile(fake_trt: Any, tmp_path: Path) -> None:
    """Exercises the logic around the TensorRT API with a fake module; the real API is checked by mypy
    against tensorrt-stubs, not run."""
    import hashlib

    onnx_path = fp32_onnx(tmp_path / "m.onnx")
    key = trt_build.engine_key_for(onnx_path, "fp16", dla_core=0, target_hw=(256, 320))
    assert key.model_sha256 == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert (key.trt_version, key.gpu_name, key.compute_capability, key.sm_count) == ("10.3.0.30", "Orin (nvgpu)", "8.7", 16)
    assert key.profile == {"image": ((1, 1, 256, 320),) * 3} and key.dla_core == 0


# =================================================================================================
# Engine cache
# =================================================================================================
def make_key(**changes: Any) -> EngineKey:
    fields: dict[str, Any] = {
        "model_sha256": SHA, "trt_version": "10.3.0.30", "gpu_name": "Orin", "compute_capability": "8.7",
        "sm_count": 16, "precision": "fp16", "dla_core": None,
        "profile": {"image": ((1, 1, 512, 512),) * 3},
    }
    fields.update(changes)
    return EngineKey(**fields)


def test_engine_key_is_stable_and_readable() -> None:
    a, b = make_key(), make_key(profile={"image": {"min": [1, 1, 512, 512], "opt": [1, 1, 512, 512],
                                                   "max": [1, 1, 512, 512]}})
    assert a == b and a.digest() == b.digest() and len(a.digest()) == 16
    assert a.digest() == make_key().digest() == EngineKey.from_dict(a.to_dict()).digest()
    assert a.file_name().startswith("abababababab-fp16-trt10.3.0.30-Orin-sm87-") and a.file_name().endswith(".engine")
    assert EngineKey.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    assert hash(a) == hash(b)


@pytest.mark.parametrize(
    "change",
    [
        {"model_sha256": "cd" * 32}, {"trt_version": "10.7.0.23"}, {"gpu_name": "Xavier"},
        {"compute_capability": "7.2"}, {"sm_count": 8}, {"precision": "int8"}, {"dla_core": 0},
        {"profile": {"image": ((1, 1, 256, 256), (1, 1, 512, 512), (1, 1, 512, 512))}},
        {"profile": {}},
    ],
)
def test_every_key_field_changes_the_digest(change: dict[str, Any]) -> None:
    assert make_key(**change).digest() != make_key().digest()
    assert make_key(**change).file_name() != make_key().file_name()


def test_compatibility_flags_are_recorded_only_when_set() -> None:
    plain = make_key()
    assert "version_compatible" not in plain.to_dict() and "hardware_compatible" not in plain.to_dict()
    vc, hc = make_key(version_compatible=True), make_key(hardware_compatible=True)
    assert len({plain.digest(), vc.digest(), hc.digest()}) == 3
    assert "-vc-" in vc.file_name() and "-hc-" in hc.file_name() and "-vc-" not in plain.file_name()
    assert EngineKey.from_dict(json.loads(json.dumps(vc.to_dict()))) == vc
    assert "version-compatible" in vc.describe() and "hardware-compatible" in hc.describe()
    assert ("version_compatible", False, True) in plain.mismatches(vc)
    with pytest.raises(BackendError, match="version_compatible: expected true or false, found 'yes'"):
        EngineKey.from_dict({**plain.to_dict(), "version_compatible": "yes"})


AMPERE = {"gpu_name": "NVIDIA A10", "compute_capability": "8.6", "sm_count": 72}
ADA = {"gpu_name": "NVIDIA L4", "compute_capability": "8.9", "sm_count": 58}
TURING = {"gpu_name": "Tesla T4", "compute_capability": "7.5", "sm_count": 40}


@pytest.mark.parametrize(
    ("built", "wanted", "ok", "serves"),
    [
        ({"version_compatible": True}, {"trt_version": "10.7.0.23"}, True, True),  # later minor: runs
        ({"version_compatible": True, "trt_version": "10.7.0.23"}, {}, True, False),  # earlier runtime: no
        ({"version_compatible": True}, {"trt_version": "11.0.0.1"}, True, False),  # next major: rebuild
        ({}, {"trt_version": "10.7.0.23"}, True, False),  # not version-compatible
        ({"version_compatible": True}, {"trt_version": "10.7.0.23", "precision": "int8"}, True, False),
        ({"version_compatible": True}, {"trt_version": "10.7.0.23", "model_sha256": "cd" * 32}, True, False),
        ({"version_compatible": True}, {"trt_version": "10.7.0.23", "gpu_name": "Xavier"}, True, False),
        ({"hardware_compatible": True, **AMPERE}, ADA, True, True),  # any Ampere+ GPU
        ({"hardware_compatible": True, **AMPERE}, ADA, False, False),  # not where the caller says no (Jetson)
        ({"hardware_compatible": True, **AMPERE}, TURING, True, False),  # before Ampere
        ({"hardware_compatible": True, **AMPERE}, {**ADA, "trt_version": "10.7.0.23"}, True, False),
        ({"hardware_compatible": True, "version_compatible": True, **AMPERE},
         {**ADA, "trt_version": "10.7.0.23"}, True, True),
        ({}, ADA, True, False),
    ],
)
def test_which_cached_engine_serves_which_device(built: dict[str, Any], wanted: dict[str, Any], ok: bool,
                                                 serves: bool) -> None:
    assert make_key(**built).serves(make_key(**wanted), hardware_compatible_ok=ok) is serves


def test_cache_find_takes_the_exact_engine_else_a_compatible_one(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    cache = EngineCache(tmp_path)
    here = make_key(trt_version="10.7.0.23")
    assert cache.find(here) is None
    vc = make_key(version_compatible=True)  # built with 10.3
    vc_path = cache.store(vc, b"lean-runtime-engine")
    cache.store(make_key(trt_version="10.3.0.30"), b"plain-10.3")  # not compatible: never taken
    assert cache.find(here) == (vc_path, vc)
    exact = cache.store(here, b"plain-10.7")
    assert cache.find(here) == (exact, here)
    exact.unlink()
    vc_path.write_bytes(b"lean-runtime-engin3")  # corrupt: skipped, said why
    caplog.set_level("INFO")
    assert cache.find(here) is None
    assert "not using" in caplog.text and "sha256 differs" in caplog.text


def test_build_into_cache_builds_what_the_key_names(fake_trt: Any, tmp_path: Path) -> None:
    """Exercises the logic around the TensorRT API with a fake module; the real API is checked by mypy
    against tensorrt-stubs, not run."""
    cache = EngineCache(tmp_path / "cache")
    key = EngineKey(SHA, "10.3.0.30", "Orin", "8.7", 16, "fp32", version_compatible=True,
                    profile={"image": ((1, 1, 64, 64),) * 3})
    path = build_into_cache(cache, key, fp32_onnx(tmp_path / "m.onnx"), workspace_mb=64, progress=False)
    assert "VERSION_COMPATIBLE" in fake_trt.created["config"].flags and cache.find(key) == (path, key)
    with pytest.raises(ExportError, match="the key sets them"):
        build_into_cache(cache, key, tmp_path / "m.onnx", version_compatible=False)


def test_export_build_cache_prebuilds_the_engine_the_runtime_looks_up(fake_trt: Any, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Exercises the logic around the TensorRT API with a fake module (no TensorRT or GPU here):
    `export build BUNDLE --cache DIR` builds under exactly the key a Runtime on that device computes,
    so the runtime serves it from the first frame and starts no build; options that would build an
    engine the runtime never looks for are refused."""
    import argparse

    from edge_runtime import backends
    from edge_runtime import runtime as rt_mod
    from edge_runtime.backends import OrtBackend
    from edge_runtime.runtime import Runtime
    from export import cli

    bundle = Path(__file__).resolve().parents[1] / "edge_runtime" / "models" / "us-lesion-det"
    cache_dir = tmp_path / "engines"

    def export(*argv: str) -> int:
        parser = argparse.ArgumentParser()
        cli.configure(parser)
        return cli.run(parser.parse_args(["build", str(bundle), *argv]))

    with pytest.raises(ConfigError, match="one of --out FILE or --cache"):
        export("--precision", "fp16", "--device", "x86-dgpu")
    with pytest.raises(ConfigError, match="no --dla-core"):
        export("--cache", str(cache_dir), "--precision", "fp16", "--device", "x86-dgpu", "--dla-core", "0")
    assert export("--cache", str(cache_dir), "--precision", "fp16", "--device", "x86-dgpu") == 0
    (built,) = cache_dir.glob("*.engine")
    assert built.read_bytes() == fake_trt.build_result

    opened: list[str] = []

    class FakeTrt(OrtBackend):  # runs the ONNX model but reports itself as TensorRT
        name = "tensorrt"

        def __init__(self, engine_path: Path, *, precision: str = "fp32", **_: object) -> None:
            super().__init__(bundle / "fp16.onnx", precision=precision)
            opened.append(Path(engine_path).name)

    for module in (rt_mod, backends):
        monkeypatch.setattr(module, "tensorrt_available", lambda: (True, "fake TensorRT"))
    monkeypatch.setattr(backends, "TrtBackend", FakeTrt)
    with Runtime(bundle, "x86-dgpu", precision="fp16", engine_cache_dir=cache_dir, build_engines=False) as rt:
        assert rt.backend is not None and rt.backend.name == "tensorrt" and rt._builder is None
    assert opened == [built.name]


def test_builds_and_runs_on_the_gpu_asked_for(fake_trt: Any, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Exercises the logic around the TensorRT API with fake modules (no TensorRT or GPU here): on a
    two-GPU host, `export build --gpu 1` builds with GPU 1's context current (TensorRT builds for the
    current device) and keys the engine with GPU 1's name; a Runtime(gpu=1) looks up that key and
    opens the engine on GPU 1; an index beyond the GPUs is an error naming how many there are."""
    import argparse

    from edge_runtime import backends
    from edge_runtime import runtime as rt_mod
    from edge_runtime.backends import OrtBackend
    from edge_runtime.runtime import Runtime
    from export import cli

    FAKE_CUDA.gpu_names = ["NVIDIA A10", "NVIDIA L4"]
    onnx_path = fp32_onnx(tmp_path / "m.onnx")
    build_engine(onnx_path, tmp_path / "a.engine", precision="fp32", workspace_mb=64, target_hw=(8, 8),
                 progress=False, device_index=1)
    assert fake_trt.created["builder_gpu"] == 1 and FAKE_CUDA.current() is None  # popped after the build
    build_engine(onnx_path, tmp_path / "b.engine", precision="fp32", workspace_mb=64, target_hw=(8, 8),
                 progress=False)
    assert fake_trt.created["builder_gpu"] == 0
    with pytest.raises(BackendError, match="expected an index from 0 to 1 .2 GPUs here., found 2"):
        build_engine(onnx_path, tmp_path / "c.engine", precision="fp32", workspace_mb=64, target_hw=(8, 8),
                     progress=False, device_index=2)

    bundle = Path(__file__).resolve().parents[1] / "edge_runtime" / "models" / "us-lesion-det"
    cache_dir = tmp_path / "engines"
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    assert cli.run(parser.parse_args(["build", str(bundle), "--cache", str(cache_dir), "--precision", "fp16",
                                      "--device", "x86-dgpu", "--gpu", "1"])) == 0
    (built,) = cache_dir.glob("*.engine")
    assert json.loads(EngineCache(cache_dir).sidecar_path(built).read_text())["key"]["gpu_name"] == "NVIDIA L4"
    assert fake_trt.created["builder_gpu"] == 1

    opened: list[tuple[str, int]] = []

    class FakeTrt(OrtBackend):  # runs the ONNX model but reports itself as TensorRT
        name = "tensorrt"

        def __init__(self, engine_path: Path, *, precision: str = "fp32", device_index: int = 0,
                     **_: object) -> None:
            super().__init__(bundle / "fp16.onnx", precision=precision)
            opened.append((Path(engine_path).name, device_index))

    for module in (rt_mod, backends):
        monkeypatch.setattr(module, "tensorrt_available", lambda: (True, "fake TensorRT"))
    monkeypatch.setattr(backends, "TrtBackend", FakeTrt)
    with Runtime(bundle, "x86-dgpu", precision="fp16", engine_cache_dir=cache_dir, build_engines=False,
                 gpu=1) as rt:
        assert rt.backend is not None and rt.backend.name == "tensorrt"
    assert opened == [(built.name, 1)]
    with Runtime(bundle, "x86-dgpu", precision="fp16", engine_cache_dir=cache_dir, build_engines=False) as rt:
        assert rt.backend is not None and rt.backend.name == "onnxruntime"  # GPU 0 is an A10: no engine yet
    with pytest.raises(ConfigError, match="a CUDA device index >= 0"):
        Runtime(bundle, "x86-dgpu", gpu=-1)


def test_engine_key_validation() -> None:
    with pytest.raises(ConfigError, match="64 lower-case hex"):
        make_key(model_sha256="xyz")
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        make_key(profile={"image": ((1, 1, 8, 8), (1, 1, 4, 4), (1, 1, 8, 8))})


def test_cache_store_lookup_and_exact_bytes(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    key = make_key()
    assert cache.lookup(key) is None
    data = bytes(range(256)) * 10
    path = cache.store(key, data, info={"seconds": 1.5})
    assert path.read_bytes() == data  # exactly the serialised bytes
    assert cache.lookup(key) == path
    sidecar = json.loads(cache.sidecar_path(path).read_text())
    assert sidecar["key"] == key.to_dict() and sidecar["engine_bytes"] == len(data)
    assert sidecar["info"] == {"seconds": 1.5} and sidecar["created"].endswith("+00:00")
    assert cache.entries() == [key]


def test_cache_refuses_mismatched_engine_naming_each_field(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    built_for = make_key()
    path = cache.store(built_for, b"engine")
    here = make_key(trt_version="10.7.0.23", gpu_name="NVIDIA Jetson AGX Orin", sm_count=14)
    with pytest.raises(BackendError) as info:
        cache.verify(path, here)
    text = str(info.value)
    assert "was built for TensorRT 10.3.0.30 on Orin (sm 8.7, 16 SMs)" in text
    assert "this is TensorRT 10.7.0.23 on NVIDIA Jetson AGX Orin" in text
    assert "trt_version: expected '10.7.0.23', found '10.3.0.30'" in text
    assert "gpu_name: expected 'NVIDIA Jetson AGX Orin', found 'Orin'" in text
    assert "sm_count: expected 14, found 16" in text and "rebuild" in text
    assert "precision" not in text.split("refusing it")[1]  # only the fields that differ


def test_lookup_refuses_tampered_sidecar_and_corrupt_engine(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = EngineCache(tmp_path)
    key = make_key()
    path = cache.store(key, b"engine-bytes")
    sidecar = cache.sidecar_path(path)
    meta = json.loads(sidecar.read_text())
    meta["key"]["precision"] = "int8"
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(BackendError, match="precision: expected 'fp16', found 'int8'"):
        cache.lookup(key)
    path = cache.store(key, b"engine-bytes")
    path.write_bytes(b"engine-bytez")  # same size, other bytes
    with pytest.raises(BackendError, match="sha256 differs"):
        cache.lookup(key)
    sidecar.unlink()
    caplog.set_level("INFO")
    assert cache.lookup(key) is None and "has no sidecar" in caplog.text
    with pytest.raises(BackendError, match="expected a sidecar"):
        cache.verify(path, key)


def test_lookup_logs_engines_built_for_another_device(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = EngineCache(tmp_path)
    cache.store(make_key(trt_version="10.3.0.30"), b"old")
    caplog.set_level("INFO")
    assert cache.lookup(make_key(trt_version="10.7.0.23")) is None
    assert "trt_version: expected '10.7.0.23', found '10.3.0.30'" in caplog.text


def test_atomic_write_leaves_no_partial_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.engine"
    atomic_write_bytes(target, b"old")

    def boom(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new-engine-bytes")
    assert target.read_bytes() == b"old"  # the previous state survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.engine"]  # no temp file left behind
    cache = EngineCache(tmp_path / "c")
    with pytest.raises(OSError):
        cache.store(make_key(), b"engine")
    assert [p for p in (tmp_path / "c").iterdir()] == []


def test_read_only_cache_dir_message(tmp_path: Path) -> None:
    # A regular file where the directory should be fails like a read-only filesystem does (and unlike
    # chmod, it also fails for root, which runs these tests in CI containers).
    blocker = tmp_path / "ro"
    blocker.write_text("")
    cache = EngineCache(blocker / "engines")
    assert cache.lookup(make_key()) is None  # reading a missing/unwritable cache is fine
    with pytest.raises(ConfigError) as info:
        cache.store(make_key(), b"engine")
    text = str(info.value)
    assert "expected a writable directory" in text and "EDGE_RUNTIME_CACHE" in text and str(blocker) in text


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGE_RUNTIME_CACHE", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" and EngineCache().directory == tmp_path / "x"
    monkeypatch.delenv("EDGE_RUNTIME_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "edge-runtime" / "engines"


def test_clean_partial(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    stale = tmp_path / ".x.engine.1.2.partial"
    stale.write_bytes(b"half")
    os.utime(stale, (0, 0))
    fresh = tmp_path / ".y.engine.1.2.partial"
    fresh.write_bytes(b"building now")
    assert cache.clean_partial() == 1 and not stale.exists() and fresh.exists()


def test_background_builder_ready_and_failed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    release = threading.Event()
    swapped: list[str] = []
    builder = BackgroundBuilder(lambda: (release.wait(10), "engine.path")[1], name="det-fp16",
                                on_ready=swapped.append)
    assert builder.state is BuildState.IDLE
    builder.start()
    assert builder.state is BuildState.BUILDING and builder.status()["state"] == "building"
    assert not builder.wait(0.05)  # the caller is not blocked: it keeps serving meanwhile
    release.set()
    assert builder.wait(10)
    assert builder.state is BuildState.READY and builder.result == "engine.path" and swapped == ["engine.path"]
    assert "background build det-fp16: started" in caplog.text and "ready after" in caplog.text

    def fail() -> str:
        raise ExportError("parser rejected model.onnx")

    failing = BackgroundBuilder(fail, name="seg-int8").start()
    assert failing.wait(10)
    assert failing.state is BuildState.FAILED and isinstance(failing.error, ExportError)
    assert failing.status()["error"] == "ExportError: parser rejected model.onnx"
    assert "background build seg-int8: failed" in caplog.text


def test_dla_builds_refuse_dynamic_profiles(fake_trt: Any, tmp_path: Path) -> None:
    """Exercises the logic around the TensorRT API with a fake module. NVIDIA's DLA restrictions: no
    dynamic dimensions (profile min = opt = max); with GPU fallback such an engine would run wholly on
    the GPU while named a DLA engine. One shape as min, opt and max builds."""
    fake_trt.network_inputs = [("image", [1, 1, -1, -1])]
    onnx_path = fp32_onnx(tmp_path / "m.onnx")
    dynamic = {"image": ([1, 1, 32, 32], [1, 1, 64, 64], [1, 1, 128, 128])}
    with pytest.raises(ExportError, match=r"DLA runs static shapes only; found dynamic profiles for \['image'\]"):
        build_engine(onnx_path, tmp_path / "a.engine", precision="fp16", workspace_mb=64, dla_core=0,
                     profiles=dynamic, progress=False)
    static = {"image": ([1, 1, 64, 64],) * 3}
    report = build_engine(onnx_path, tmp_path / "b.engine", precision="fp16", workspace_mb=64, dla_core=0,
                          profiles=static, progress=False)
    assert report.dla_core == 0
    build_engine(onnx_path, tmp_path / "c.engine", precision="fp16", workspace_mb=64, profiles=dynamic,
                 progress=False)  # the GPU takes the dynamic profile


def test_background_builder_requests_the_swap_before_it_says_ready() -> None:
    """A caller woken by wait() (or reading status "ready") must find the new engine already handed over:
    the on_ready callback runs to completion first (it is slow here on purpose)."""
    handed: list[str] = []

    def slow_hand_over(path: str) -> None:
        time.sleep(0.2)
        handed.append(path)

    builder = BackgroundBuilder(lambda: "engine.path", name="det-fp16", on_ready=slow_hand_over).start()
    assert builder.wait(10)
    assert handed == ["engine.path"] and builder.state is BuildState.READY


# =================================================================================================
# Real TensorRT (skipped unless tensorrt, pycuda and a GPU are all here)
# =================================================================================================
@pytest.mark.gpu
@pytest.mark.tensorrt
def test_real_engine_build_and_run(tmp_path: Path) -> None:
    ok, why = trt_backend.tensorrt_available()
    if not ok:
        pytest.skip(f"needs TensorRT, pycuda and a CUDA GPU: {why}")
    import onnxruntime as ort

    onnx_path = fp32_onnx(tmp_path / "m.onnx")
    engine = tmp_path / "m.engine"
    report = build_engine(onnx_path, engine, precision="fp32", workspace_mb=256, target_hw=(32, 48),
                          timing_cache=tmp_path / "t.timing-cache", progress="log")
    assert engine.stat().st_size == report.engine_bytes > 0
    x = np.random.default_rng(0).random((1, 1, 32, 48), dtype=np.float32)
    reference = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    with TrtBackend(engine) as backend:
        out = backend.infer({"image": x})["out"]
    np.testing.assert_allclose(out, reference, rtol=1e-3, atol=1e-3)
    # CUDA graphs for real: the capture must be kept (not fall back) and replay new inputs correctly.
    if trt_backend._cudart() is None:
        pytest.skip("the engine built and ran; CUDA graphs need cuda-python, not installed: not exercised")
    with TrtBackend(engine, use_cuda_graph=True) as backend:
        for seed in range(3):
            x = np.random.default_rng(seed).random((1, 1, 32, 48), dtype=np.float32)
            want = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
            np.testing.assert_allclose(backend.infer({"image": x})["out"], want, rtol=1e-3, atol=1e-3)
        assert backend.graph_disabled is None and backend.graph_captures == 1, backend.graph_disabled


def test_the_runtimes_engine_profile_covers_the_smallest_tensor_a_frame_can_give() -> None:
    """The profile started at 32 x 32 while the shipped enhancers pad to a multiple of 16: a frame of
    16 px or less in height or width (a thin strip, a 1-pixel frame) was refused by the TensorRT backend
    and served by ONNX Runtime. No TensorRT here: the shapes and the check are the runtime's own."""
    from edge_runtime.backends.tensorrt import IOTensor, check_profile
    from edge_runtime.bundle import Bundle
    from edge_runtime.devices import load_config
    from edge_runtime.frames import Frame
    from edge_runtime.preprocess import Preprocessor
    from edge_runtime.runtime import engine_request, reference_bundles

    for name, modality, dtype in (("us-despeckle", "US", np.uint8), ("xr-denoise", "DX", np.uint16)):
        bundle = Bundle.load(reference_bundles()[name])
        profile = engine_request(bundle, load_config("jetson-agx-orin-64gb"), "fp16").profiles["image"]  # type: ignore[index]
        assert profile["min"] == [1, 1, 16, 16], (name, profile)
        tensor = IOTensor("image", True, np.dtype(np.float32), (1, 1, None, None),
                          (tuple(profile["min"]), tuple(profile["opt"]), tuple(profile["max"])))
        pre = Preprocessor.from_manifest(bundle.manifest)
        for h, w in ((1, 1), (12, 640), (16, 480), (480, 640)):
            x, _ = pre(Frame(np.zeros((h, w), dtype), modality=modality, bits_stored=8 if modality == "US" else 12))
            check_profile(tensor, x.shape)
