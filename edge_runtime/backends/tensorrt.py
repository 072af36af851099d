"""TensorRT backend (with export/trt_build.py, the only modules that import tensorrt or pycuda).

Written against the name-based I/O API of TensorRT 10 (JetPack 6 ships 10.3 on Orin), which also
exists from TensorRT 8.5 and is kept in TensorRT 11:
``num_io_tensors`` / ``get_tensor_name`` / ``get_tensor_mode`` / ``get_tensor_dtype`` /
``get_tensor_shape`` on the engine, ``set_input_shape`` / ``set_tensor_address`` /
``execute_async_v3`` on the execution context. Memory and the stream come from pycuda.

``tensorrt`` and ``pycuda`` are imported inside functions only, so this module imports (and its
pure logic is tested) on machines without them. The TensorRT calls are type-checked with mypy
against ``tensorrt-stubs`` (tests/test_typecheck.py); they have not run on real hardware here.

CUDA context: the device's *primary* context is retained once for the process (``primary_context``;
never detached) and pushed/popped around every call, so the backend works from whichever thread calls it (a pipeline worker thread, not
only the thread that loaded it). ``pycuda.autoinit`` is deliberately not used: it makes a context
current on the importing thread only, and other threads then fail with "invalid device context".
The primary context is the one TensorRT and the CUDA runtime API use, so nothing is duplicated.

CUDA graphs (``use_cuda_graph=True``, off by default; never run on a GPU here): after a normal call,
which is also the warm-up TensorRT needs before capture (it flushes deferred updates), the same
copies + ``execute_async_v3`` are captured on the backend's (pycuda) stream. pycuda has no stream
capture or graph API (none up to 2026.1), so capture, instantiation and launch go through NVIDIA's
cuda-python runtime bindings (``cuda.bindings.runtime``, ``cuda.cudart`` before 12.6; ``pip install
cuda-python`` matching the CUDA version): ``cudaStreamBeginCapture`` in thread-local mode on the
stream's handle, ``cudaStreamEndCapture``, ``cudaGraphInstantiateWithFlags`` (the same signature in
cuda-python 11.4+ and 12), ``cudaGraphLaunch``; without cuda-python graphs stay off, with a warning.
The next call with the same shapes replays it on its own
(new) inputs and also runs normally; only a replay that matches (within 1e-3 of the output's scale,
exactly for integer outputs) makes the graph trusted. Later calls copy their inputs into the same
page-locked buffers and launch the graph alone. A graph holds tensor addresses and shapes,
so a new input shape or a re-allocated buffer means a fresh capture (at most MAX_GRAPH_CAPTURES per
backend; beyond that shapes vary too much for graphs to pay). Any failure (an engine that cannot be
captured, no cuda-python, a replay that differs) logs a warning once and the backend runs
without graphs from then on: a graph can cost speed, never a result.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from ..errors import BackendError, ConfigError, InputError, expected
from .base import Backend, TensorSpec

Array = NDArray[Any]  # numpy < 2.3 (the last for Python 3.10) wants ndarray's type arguments spelled out

if TYPE_CHECKING:  # types only: never imported at runtime at module level
    import tensorrt as trt

log = logging.getLogger(__name__)

# Name-based I/O (set_tensor_address / execute_async_v3) exists from TensorRT 8.5.
MIN_RUNTIME_VERSION = (8, 5, 0)
# CUDA driver API CU_STREAM_NON_BLOCKING (pycuda's Stream(flags=...) passes it to cuStreamCreate): a
# blocking stream that captures a CUDA graph leaves the legacy default stream unusable for every
# other thread meanwhile (cuda-python cudaStreamIsCapturing docs), e.g. a background engine build.
STREAM_NON_BLOCKING = 1
MAX_GRAPH_CAPTURES = 8  # per backend: beyond this the input shapes vary too much for CUDA graphs

# TensorRT DataType names -> numpy. Mirrors tensorrt.nptype for the types numpy has; BF16, FP8,
# INT4, FP4 and E8M0 have no numpy dtype, so an engine with such I/O is refused with a message
# (keep those types inside the network and give it FP32/FP16 inputs and outputs).
TRT_TO_NUMPY: dict[str, type[np.generic]] = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}


# ---------------------------------------------------------------------------------------------
# Pure logic (no tensorrt, no pycuda): version parsing, dtype mapping, shape checks, buffer plans
# ---------------------------------------------------------------------------------------------
def parse_version(text: str) -> tuple[int, int, int]:
    """``"10.3.0.30"`` -> ``(10, 3, 0)``; ``"8.2.1"`` -> ``(8, 2, 1)``; ``"11.0"`` -> ``(11, 0, 0)``."""
    match = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if match is None:
        raise BackendError(f"TensorRT version: {expected('MAJOR.MINOR[.PATCH...]', text)}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def numpy_dtype(trt_dtype_name: str, tensor: str = "?") -> np.dtype[Any]:
    """TensorRT DataType name (``DataType.name``) -> numpy dtype, or BackendError naming the tensor."""
    name = trt_dtype_name.upper().removeprefix("DATATYPE.")
    if name not in TRT_TO_NUMPY:
        raise BackendError(
            f"engine tensor {tensor!r}: expected an I/O dtype numpy can hold ({', '.join(TRT_TO_NUMPY)}), "
            f"found {name}"
        )
    return np.dtype(TRT_TO_NUMPY[name])


@dataclass(frozen=True)
class IOTensor:
    """One engine I/O tensor as the engine describes it (shape: None for dynamic dims)."""

    name: str
    is_input: bool
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]
    # (min, opt, max) of optimisation profile 0, for dynamic inputs only
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None

    @property
    def is_dynamic(self) -> bool:
        return any(d is None for d in self.shape)

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape)


def dims_to_shape(dims: Sequence[int]) -> tuple[int | None, ...]:
    """TensorRT dims (``-1`` for dynamic) -> our shape (``None`` for dynamic)."""
    return tuple(None if int(d) < 0 else int(d) for d in dims)


def check_profile(tensor: IOTensor, shape: tuple[int, ...]) -> None:
    """InputError when ``shape`` lies outside the engine's optimisation profile for ``tensor``."""
    if tensor.profile is None:
        return
    low, _, high = tensor.profile
    if len(low) != len(shape) or any(not (lo <= s <= hi) for lo, s, hi in zip(low, shape, high)):
        raise InputError(
            f"input {tensor.name!r}: expected a shape within the engine's profile min {low} max {high}, "
            f"found {shape}; rebuild the engine with a profile that covers it"
        )


def nbytes_for(shape: Sequence[int], dtype: np.dtype[Any]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if len(shape) else dtype.itemsize


def plan_buffers(tensors: Sequence[IOTensor], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Bytes each I/O tensor needs for concrete ``shapes`` (every tensor must have one)."""
    plan: dict[str, int] = {}
    for tensor in tensors:
        shape = shapes.get(tensor.name)
        if shape is None or any(d < 0 for d in shape):
            raise BackendError(
                f"engine tensor {tensor.name!r}: expected a concrete shape before allocation, found {shape}"
                " (data-dependent output shapes need an output allocator, which this backend does not implement)"
            )
        plan[tensor.name] = nbytes_for(shape, tensor.dtype)
    return plan


def buffers_to_grow(capacity: Mapping[str, int], plan: Mapping[str, int]) -> list[str]:
    """Tensors whose buffer must be (re)allocated: missing, or smaller than the plan needs.

    Buffers never shrink: a smaller frame after a larger one reuses the large buffer.
    """
    return [name for name, need in plan.items() if capacity.get(name, -1) < need]


def initial_shapes(tensors: Sequence[IOTensor]) -> dict[str, tuple[int, ...]]:
    """Input shapes to allocate for at load: static shapes as they are, dynamic ones at profile opt."""
    shapes: dict[str, tuple[int, ...]] = {}
    for tensor in tensors:
        if not tensor.is_input:
            continue
        if tensor.is_dynamic:
            if tensor.profile is None:
                raise BackendError(f"engine input {tensor.name!r}: dynamic shape {tensor.shape} without a profile")
            shapes[tensor.name] = tensor.profile[1]
        else:
            shapes[tensor.name] = tuple(int(d) for d in tensor.shape if d is not None)
    return shapes


def python_log_level(severity: int) -> int | None:
    """TensorRT logger severity (0 INTERNAL_ERROR .. 4 VERBOSE) -> logging level; None = drop.

    TensorRT's INFO is chatty (one line per tactic phase), so it goes to DEBUG.
    """
    return {0: logging.CRITICAL, 1: logging.ERROR, 2: logging.WARNING, 3: logging.DEBUG}.get(severity)


# ---------------------------------------------------------------------------------------------
# Imports of the real packages
# ---------------------------------------------------------------------------------------------
def require_tensorrt() -> str:
    """Import the real TensorRT or raise BackendError; return its version string.

    ``tensorrt-stubs`` installs a ``tensorrt`` directory of ``.pyi`` files only, which Python
    imports as an empty namespace package: that is treated as "not installed".
    """
    try:
        import tensorrt as trt_mod
    except ImportError as exc:
        raise BackendError(f"TensorRT: expected the tensorrt package (JetPack / pip), found none ({exc})") from exc
    version = getattr(trt_mod, "__version__", None)
    if not isinstance(version, str) or not hasattr(trt_mod, "Builder"):
        raise BackendError(
            "TensorRT: expected the tensorrt package, found only type stubs (tensorrt-stubs) "
            f"at {list(getattr(trt_mod, '__path__', []))}"
        )
    return version


def require_pycuda() -> Any:
    """Import ``pycuda.driver`` (typed Any: pycuda has no stubs) or raise BackendError."""
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise BackendError(f"TensorRT backend: expected pycuda (pip install pycuda on the device), found none ({exc})") from exc
    return cuda


_logged_too_old: set[str] = set()  # TensorRT versions already reported as too old (log once)


def tensorrt_available() -> tuple[bool, str]:
    """(True, version) when TensorRT >= MIN_RUNTIME_VERSION and pycuda import and a CUDA device
    answers; else (False, why). An older TensorRT (8.2 on a JetPack 4 Jetson Nano) reads as absent, so
    the runtime stays on ONNX Runtime and builds no engine it could not load; that is logged once."""
    try:
        version = require_tensorrt()
        if parse_version(version) < MIN_RUNTIME_VERSION:
            why = f"TensorRT: expected >= {'.'.join(map(str, MIN_RUNTIME_VERSION))} (name-based I/O), found {version}"
            if version not in _logged_too_old:
                _logged_too_old.add(version)
                log.warning("%s: using ONNX Runtime, no TensorRT engine is built", why)
            return False, why
        cuda = require_pycuda()
        cuda.init()
        if cuda.Device.count() < 1:
            return False, "no CUDA device"
    except BackendError as exc:
        return False, str(exc)
    except Exception as exc:  # noqa: BLE001 - pycuda raises its own error types when no driver is present
        return False, f"CUDA driver: {exc}"
    return True, version


@dataclass(frozen=True)
class DeviceIdentity:
    """What an engine is tied to, besides the model: TensorRT version and GPU."""

    trt_version: str
    gpu_name: str
    compute_capability: str
    sm_count: int


def _cuda_device(device_index: int) -> Any:
    """pycuda's Device ``device_index`` (CUDA initialised), or BackendError naming the GPUs there are."""
    cuda = require_pycuda()
    cuda.init()
    count = cuda.Device.count()
    if not 0 <= device_index < count:
        raise BackendError(f"CUDA device: expected an index from 0 to {count - 1} ({count} GPUs here), "
                           f"found {device_index}")
    return cuda.Device(device_index)


def probe_device(device_index: int = 0) -> DeviceIdentity:
    """TensorRT version and GPU name / compute capability / SM count, for the engine cache key."""
    version = require_tensorrt()
    cuda = require_pycuda()
    device = _cuda_device(device_index)
    major, minor = device.compute_capability()
    sm_count = int(device.get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT))
    return DeviceIdentity(version, str(device.name()), f"{major}.{minor}", sm_count)


_primary_contexts: dict[int, Any] = {}  # device index -> its retained primary context, kept for the process
_primary_lock = threading.Lock()


@contextlib.contextmanager
def on_device(device_index: int) -> Iterator[None]:
    """GPU ``device_index``'s primary context current in this thread for the block.

    TensorRT binds a builder, and the engine it builds, to the CUDA device current in the calling
    thread (NVIDIA's FAQ on multiple GPUs: select the device before calling the builder); the CUDA
    runtime that TensorRT calls uses the context pycuda makes current. The context stays retained
    (as the CUDA runtime's own would), so TensorRT objects freed after the block still have it.
    """
    primary_context(device_index).push()
    try:
        yield
    finally:
        require_pycuda().Context.pop()


def primary_context(device_index: int) -> Any:
    """GPU ``device_index``'s primary context, retained once for the process and never released: pycuda's
    Context.detach() on a retained primary context releases it without popping it (it stays current
    under pycuda's feet) and does nothing on a thread other than the one that retained it; the CUDA
    runtime keeps its primary context for the process too."""
    device = _cuda_device(device_index)
    with _primary_lock:
        ctx = _primary_contexts.get(device_index)
        if ctx is None:
            ctx = _primary_contexts[device_index] = device.retain_primary_context()
    return ctx


_trt_logger: tuple[Any, Any] | None = None  # (the tensorrt module, its one logger)
_trt_logger_lock = threading.Lock()


def make_trt_logger() -> trt.ILogger:
    """The process's TensorRT logger, forwarding to Python logging (TensorRT INFO -> DEBUG, VERBOSE dropped).

    One per process, kept for good: TensorRT holds a single logger pointer and ignores any other
    logger passed while a builder or runtime is alive, so a logger per build or backend would collect
    another call's messages (and could be freed while TensorRT still points at it). It numbers the
    errors it sees, so a failed call quotes only its own: ``logged_errors(logger, since=error_mark(logger))``.
    """
    global _trt_logger
    import tensorrt as trt

    with _trt_logger_lock:
        if _trt_logger is not None and _trt_logger[0] is trt:
            return _trt_logger[1]  # type: ignore[no-any-return]

        class _ForwardingLogger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[tuple[int, str]] = []  # (number, message), the last 50
                self.count = 0
                self._lock = threading.Lock()

            def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
                level = python_log_level(int(severity))
                if level is None:
                    return
                if level >= logging.ERROR:
                    with self._lock:
                        self.count += 1
                        self.errors = (self.errors + [(self.count, msg)])[-50:]
                logging.getLogger("tensorrt").log(level, "%s", msg)

        logger = _ForwardingLogger()
        _trt_logger = (trt, logger)
        return logger


def error_mark(logger: trt.ILogger) -> int:
    """How many errors ``logger`` has seen so far (pass it to ``logged_errors`` after a call)."""
    return int(getattr(logger, "count", 0))


def logged_errors(logger: trt.ILogger, since: int = 0) -> list[str]:
    """The errors ``logger`` saw after ``since`` (an ``error_mark``); other threads' errors may be among them."""
    return [msg for n, msg in getattr(logger, "errors", []) if n > since]


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


def read_io_tensors(engine: trt.ICudaEngine) -> list[IOTensor]:
    """Describe every I/O tensor of ``engine`` by name (TensorRT 10 name-based API)."""
    import tensorrt as trt

    tensors: list[IOTensor] = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        if is_input and engine.is_shape_inference_io(name):
            raise BackendError(f"engine input {name!r}: shape tensors (host-side shape inputs) are not supported")
        shape = dims_to_shape(_dims(engine.get_tensor_shape(name)))
        profile = None
        if is_input and any(d is None for d in shape):
            low, opt, high = engine.get_tensor_profile_shape(name, 0)  # profile 0: min, opt, max
            profile = (_dims(low), _dims(opt), _dims(high))
        dtype = numpy_dtype(engine.get_tensor_dtype(name).name, name)
        tensors.append(IOTensor(name, is_input, dtype, shape, profile))
    return tensors


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------
def _cudart() -> Any:
    """NVIDIA's cuda-python runtime bindings, for CUDA graphs only; None where they are not installed."""
    try:
        from cuda.bindings import runtime  # cuda-python 12.6+

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart  # older cuda-python

        return cudart
    except ImportError:
        return None


def _cuda_call(cudart: Any, name: str, *args: Any) -> Any:
    """Call ``cudart.<name>``: cuda-python returns (error, *values) instead of raising. The value, or a
    tuple of them, or None; a BackendError naming the call and CUDA's error name otherwise."""
    err, *values = getattr(cudart, name)(*args)
    if err != cudart.cudaError_t.cudaSuccess:
        try:
            label = cudart.cudaGetErrorName(err)[1].decode()
        except Exception:  # noqa: BLE001 - the name is only for the message
            label = str(err)
        raise BackendError(f"{name}: {label}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class _CudaGraph:
    """An instantiated CUDA graph (cudaGraphExec_t), launched on a pycuda stream's handle."""

    def __init__(self, cudart: Any, graph_exec: Any) -> None:
        self._cudart = cudart
        self._exec = graph_exec

    def launch(self, stream: Any) -> None:
        _cuda_call(self._cudart, "cudaGraphLaunch", self._exec, stream.handle)

    def close(self) -> None:
        if self._exec is not None:
            graph_exec, self._exec = self._exec, None
            _cuda_call(self._cudart, "cudaGraphExecDestroy", graph_exec)


@dataclass
class _Buffer:
    device: Any  # pycuda DeviceAllocation
    host: Array  # flat page-locked array of `capacity` bytes worth of elements
    capacity: int


class TrtBackend(Backend):
    """Run a serialised TensorRT engine (built on this device: see engine_cache / trt_build).

    Device and page-locked host buffers are allocated once at load (dynamic inputs at the profile's
    opt shape) and re-allocated only when a larger dynamic shape arrives. One CUDA stream; copies
    are asynchronous; one ``stream.synchronize`` per call. Calls are serialised by a lock (one
    execution context, one set of buffers).
    """

    name = "tensorrt"

    def __init__(
        self,
        engine_path: str | Path,
        *,
        device_index: int = 0,
        use_cuda_graph: bool = False,
        precision: str = "fp32",
        allow_host_code: bool = False,
        dla_core: int | None = None,
    ) -> None:
        super().__init__(precision=precision)
        if device_index < 0:
            raise ConfigError(f"device_index: {expected('>= 0', device_index)}")
        if dla_core is not None and dla_core < 0:
            raise ConfigError(f"dla_core: {expected('>= 0 or None', dla_core)}")
        # The DLA core a DLA engine was built for, set on the runtime before deserialising it (as
        # trtexec does; IRuntime's default is -1); None for GPU engines.
        self.dla_core = dla_core
        self.engine_path = Path(engine_path)
        self.device_index = device_index
        # A version-compatible engine carries its own lean runtime (host code) and loads only with this
        # set; TensorRT's default is False, and so is ours: allow it only for engines you built yourself.
        self.allow_host_code = allow_host_code
        self.use_cuda_graph = use_cuda_graph
        self.graph_captures = 0  # CUDA graphs captured and kept (see the module docstring)
        self.graph_disabled: str | None = None  # why graphs are off for this backend, once they failed
        self._graph: _CudaGraph | None = None  # for the shapes and addresses in _graph_key
        self._graph_key: tuple[Any, ...] | None = None
        self._graph_verified = False  # its first replay matched a normal run
        self.trt_version = ""
        self._lock = threading.Lock()
        self._cuda: Any = None
        self._cuda_ctx: Any = None
        self._logger: trt.ILogger | None = None
        self._runtime: trt.Runtime | None = None
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._stream: Any = None
        self._tensors: list[IOTensor] = []
        self._buffers: dict[str, _Buffer] = {}
        self._bound_shapes: dict[str, tuple[int, ...]] = {}

    def describe_model(self) -> str:
        return self.engine_path.name

    # -- load / close --------------------------------------------------------------------------
    def _load(self) -> None:
        version_text = require_tensorrt()
        import tensorrt as trt

        version = parse_version(version_text)
        if version < MIN_RUNTIME_VERSION:
            raise BackendError(
                f"TensorRT backend: expected TensorRT >= {'.'.join(map(str, MIN_RUNTIME_VERSION))} "
                f"(name-based I/O), found {version_text}; use the ONNX Runtime backend on this device"
            )
        if not self.engine_path.is_file():
            raise BackendError(f"TensorRT engine: expected a file at {self.engine_path}, found none")
        cuda = require_pycuda()
        self._cuda = cuda
        self._cuda_ctx = primary_context(self.device_index)
        self._cuda_ctx.push()
        ok = False
        try:
            self._logger = make_trt_logger()
            mark = error_mark(self._logger)
            self._runtime = trt.Runtime(self._logger)
            if self.allow_host_code:
                if not hasattr(self._runtime, "engine_host_code_allowed"):  # TensorRT 8.5 and older
                    raise BackendError(expected("TensorRT >= 8.6 for a version-compatible engine (host code "
                                                "allowed)", version_text))
                self._runtime.engine_host_code_allowed = True
            if self.dla_core is not None:
                self._runtime.DLA_core = self.dla_core
            # None on failure (wrong TensorRT version / GPU), although the stubs do not say so
            engine: trt.ICudaEngine | None = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            if engine is None:
                vc = "" if self.allow_host_code else (
                    "; a version-compatible engine (export build --version-compatible) also needs "
                    "allow_host_code=True: it carries its own lean runtime")
                raise BackendError(
                    f"TensorRT {version_text} could not deserialise {self.engine_path.name} "
                    f"({'; '.join(logged_errors(self._logger, mark)) or 'see the TensorRT log'}): engines are tied "
                    f"to the TensorRT version and GPU they were built with; rebuild it on this device{vc}"
                )
            self._engine = engine
            context: trt.IExecutionContext | None = engine.create_execution_context()
            if context is None:
                raise BackendError(f"TensorRT could not create an execution context for {self.engine_path.name}")
            self._context = context
            self._tensors = read_io_tensors(engine)
            self._inputs = [t.spec() for t in self._tensors if t.is_input]
            self._outputs = [t.spec() for t in self._tensors if not t.is_input]
            self._stream = cuda.Stream(flags=STREAM_NON_BLOCKING)
            self._prepare(initial_shapes(self._tensors))
            self.trt_version = version_text
            self.provider = f"TensorRT {version_text} on GPU {self.device_index}"
            ok = True
        finally:
            if not ok:
                self._release()
            cuda.Context.pop()
            if not ok:
                self._cuda_ctx = None

    def _release(self) -> None:
        """Free buffers and TensorRT objects (the CUDA context must be current)."""
        for buf in self._buffers.values():
            self._free(buf)
        self._buffers = {}
        self._bound_shapes = {}
        # Order matters: graph before buffers' users, context before engine before runtime.
        self._drop_graph()
        self._context = None
        self._engine = None
        self._runtime = None
        self._stream = None

    @staticmethod
    def _free(buf: _Buffer) -> None:
        buf.device.free()
        host_alloc = getattr(buf.host, "base", None)  # pycuda's PagelockedHostAllocation
        if host_alloc is not None and hasattr(host_alloc, "free"):
            host_alloc.free()

    def _close(self) -> None:
        with self._lock:
            if self._cuda_ctx is None:
                return
            self._cuda_ctx.push()
            try:
                self._release()
            finally:
                self._cuda.Context.pop()
                self._cuda_ctx = None  # the primary context stays retained (primary_context)

    # -- buffers -------------------------------------------------------------------------------
    def _prepare(self, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Set dynamic input shapes, resolve output shapes, grow buffers; return every tensor's shape."""
        context = self._context
        if context is None:
            raise BackendError("TensorRT backend: no execution context (not loaded)")
        shapes: dict[str, tuple[int, ...]] = {}
        for tensor in self._tensors:
            if not tensor.is_input:
                continue
            shape = tuple(input_shapes[tensor.name])
            if tensor.is_dynamic and self._bound_shapes.get(tensor.name) != shape:
                check_profile(tensor, shape)
                if not context.set_input_shape(tensor.name, shape):
                    raise InputError(f"input {tensor.name!r}: TensorRT refused shape {shape} (profile {tensor.profile})")
                self._bound_shapes[tensor.name] = shape
            shapes[tensor.name] = shape
        for tensor in self._tensors:
            if not tensor.is_input:
                shapes[tensor.name] = _dims(context.get_tensor_shape(tensor.name))
        plan = plan_buffers(self._tensors, shapes)
        for name in buffers_to_grow({k: b.capacity for k, b in self._buffers.items()}, plan):
            self._allocate(name, plan[name])
        return shapes

    def _allocate(self, name: str, nbytes: int) -> None:
        cuda = self._cuda
        tensor = next(t for t in self._tensors if t.name == name)
        old = self._buffers.pop(name, None)
        if old is not None:
            self._free(old)
        count = max(1, -(-nbytes // tensor.dtype.itemsize))
        host = cuda.pagelocked_empty(count, tensor.dtype)
        device = cuda.mem_alloc(max(1, nbytes))
        self._buffers[name] = _Buffer(device, host, nbytes)
        if self._context is None or not self._context.set_tensor_address(name, int(device)):
            raise BackendError(f"TensorRT refused the device address for tensor {name!r}")
        log.debug("tensorrt: allocated %d bytes for %r", nbytes, name)

    # -- inference -----------------------------------------------------------------------------
    def _run(self, feeds: dict[str, Array]) -> dict[str, Array]:
        with self._lock:
            if self._cuda_ctx is None:
                raise BackendError(f"TensorRT backend for {self.engine_path.name}: closed")
            self._cuda_ctx.push()
            try:
                return self._execute(feeds)
            finally:
                self._cuda.Context.pop()

    def _execute(self, feeds: dict[str, Array]) -> dict[str, Array]:
        shapes = self._prepare({name: tuple(array.shape) for name, array in feeds.items()})
        views: dict[str, Array] = {}
        for tensor in self._tensors:
            shape = shapes[tensor.name]
            count = int(np.prod(shape, dtype=np.int64))
            views[tensor.name] = self._buffers[tensor.name].host[:count].reshape(shape)
        for tensor in self._tensors:
            if tensor.is_input:
                np.copyto(views[tensor.name], feeds[tensor.name])
        # A graph replays fixed addresses and shapes: key it on both.
        key = tuple((t.name, shapes[t.name], int(self._buffers[t.name].device)) for t in self._tensors)
        graphs = self.use_cuda_graph and self.graph_disabled is None
        graph = self._graph if graphs and key == self._graph_key else None
        if graph is not None and self._graph_verified:
            try:
                graph.launch(self._stream)
                self._stream.synchronize()
                return self._outputs_copy(views)
            except Exception as exc:  # noqa: BLE001 - as in _capture: this call then runs normally
                self._disable_graphs(f"launch: {type(exc).__name__}: {exc}")
                graphs, graph = False, None
        # A new graph's first replay, on this call's (new) inputs, is checked against a normal run.
        replay = self._try_replay(graph, views) if graph is not None else None
        self._enqueue(views)
        self._stream.synchronize()
        out = self._outputs_copy(views)
        if replay is not None:
            self._check_replay(replay, out)
        elif graphs and self.graph_disabled is None and key != self._graph_key:
            self._capture(views, key)
        return out

    def _outputs_copy(self, views: Mapping[str, Array]) -> dict[str, Array]:
        # Copies: the page-locked buffers are reused by the next call.
        return {t.name: views[t.name].copy() for t in self._tensors if not t.is_input}

    def _enqueue(self, views: Mapping[str, Array]) -> None:
        """Copies in, execute_async_v3, copies out, on the stream; no host synchronisation (capturable)."""
        cuda, stream, context = self._cuda, self._stream, self._context
        if context is None:
            raise BackendError("TensorRT backend: no execution context (not loaded)")
        for tensor in self._tensors:
            if tensor.is_input:
                cuda.memcpy_htod_async(self._buffers[tensor.name].device, views[tensor.name], stream)
        if not context.execute_async_v3(stream.handle):
            raise BackendError(f"TensorRT execute_async_v3 failed for {self.engine_path.name}")
        for tensor in self._tensors:
            if not tensor.is_input:
                cuda.memcpy_dtoh_async(views[tensor.name], self._buffers[tensor.name].device, stream)

    def _capture(self, views: Mapping[str, Array], key: tuple[Any, ...]) -> None:
        """Capture _enqueue as a CUDA graph, right after a normal call (TensorRT's warm-up before capture).
        It is trusted only once its first replay, on the next call's inputs, matches a normal run."""
        self._drop_graph()
        if self.graph_captures >= MAX_GRAPH_CAPTURES:
            self._disable_graphs(f"input shapes changed more than {MAX_GRAPH_CAPTURES} times")
            return
        cudart = _cudart()
        if cudart is None:
            self._disable_graphs("CUDA graphs need NVIDIA's cuda-python (pip install cuda-python): pycuda has "
                                 "no stream capture")
            return
        handle = self._stream.handle
        try:
            # Thread-local: a background engine build on another thread may allocate meanwhile (global
            # mode, CUDA's default, would fail its calls); never fall back to global mode. The stream is
            # non-blocking (STREAM_NON_BLOCKING), so the capture leaves the legacy stream usable.
            _cuda_call(cudart, "cudaStreamBeginCapture", handle,
                       cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
            graph = None
            try:
                try:
                    self._enqueue(views)
                finally:
                    graph = _cuda_call(cudart, "cudaStreamEndCapture", handle)  # also ends an invalidated capture
                self._graph = _CudaGraph(cudart, _cuda_call(cudart, "cudaGraphInstantiateWithFlags", graph, 0))
            finally:
                if graph is not None:  # the executable graph stands alone; a failed capture's graph goes too
                    with contextlib.suppress(Exception):
                        _cuda_call(cudart, "cudaGraphDestroy", graph)
            self._graph_key = key
        except Exception as exc:  # noqa: BLE001 - CUDA errors and pycuda's own; any failure means no graph
            self._disable_graphs(f"capture: {type(exc).__name__}: {exc}")
            return
        self.graph_captures += 1
        log.info("tensorrt: captured a CUDA graph for %s (%s)", self.engine_path.name,
                 ", ".join(f"{n} {list(shape)}" for n, shape, _ in key))

    def _drop_graph(self) -> None:
        graph, self._graph, self._graph_key, self._graph_verified = self._graph, None, None, False
        if graph is not None:
            with contextlib.suppress(Exception):  # freeing it must not cost the run
                graph.close()

    def _try_replay(self, graph: Any, views: Mapping[str, Array]) -> dict[str, Array] | None:
        try:
            graph.launch(self._stream)
            self._stream.synchronize()
        except Exception as exc:  # noqa: BLE001 - as in _capture
            self._disable_graphs(f"replay: {type(exc).__name__}: {exc}")
            return None
        return self._outputs_copy(views)

    def _check_replay(self, replay: Mapping[str, Array], normal: Mapping[str, Array]) -> None:
        """Float outputs may differ in the last bits (kernels that reduce with atomics); a graph that read
        stale inputs or wrote elsewhere differs by far more than 1e-3 of the output's scale."""
        differs = []
        for name, want in normal.items():
            got = replay[name]
            if want.dtype.kind == "f":
                scale = float(np.max(np.abs(want), initial=0.0)) if want.size else 0.0
                ok = want.shape == got.shape and bool(np.allclose(got, want, rtol=0, atol=1e-3 * scale + 1e-6,
                                                                  equal_nan=True))
            else:
                ok = np.array_equal(got, want)
            if not ok:
                differs.append(name)
        if differs:
            self._disable_graphs(f"its first replay gave other values than a normal run for {differs}")
        else:
            self._graph_verified = True

    def _disable_graphs(self, why: str) -> None:
        self.graph_disabled = why
        self._drop_graph()
        self._stream = self._cuda.Stream(flags=STREAM_NON_BLOCKING)  # a fresh stream: never one left capturing
        log.warning("tensorrt: CUDA graphs off for %s (%s); running without them", self.engine_path.name, why)
