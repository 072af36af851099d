"""ONNX Runtime backend: the embedded default, CPU first, GPU providers when present and allowed.

Session options are chosen for the latency of one frame at a time on a small CPU (see
``benchmarks/bench_ort_options.py`` for the measurement behind them):
- ``intra_op_num_threads`` from the device config's ``cpu_threads`` (0 lets ONNX Runtime use one
  thread per physical core), ``inter_op_num_threads`` 1 and ``ORT_SEQUENTIAL``: our graphs are
  chains of convolutions, so running branches in parallel buys nothing and costs a second pool;
- ``ORT_ENABLE_ALL`` graph optimisation (fusions + NCHWc layouts on x86);
- memory arena and memory pattern on: same shapes every frame, so buffers are planned once;
- spinning of intra-op threads (``spinning``, device config ``cpu_spinning``), one of
  ``off``: threads sleep whenever they wait (ONNX Runtime's allow_spinning 0);
  ``run``: they spin while a run is in progress and stop when it returns (allow_spinning 1 +
  session.force_spinning_stop 1): the single-frame latency of spinning without burning a core
  between frames;
  ``always``: ONNX Runtime's default, threads keep spinning after a run too.
  On the 2-core development box (a bare session timed in a loop, as bench_ort_options.py does):
  us-lesion-det 2.57 / 2.14 / 2.08 ms p50 (off / run / always), CPU used in the 20 ms after a run
  0.1 / 0.1 / 20 ms; the 30 fps detection + despeckle stream (``python -m benchmarks.bench_stream
  --seconds 60 --spinning MODE``, in the order off, run, always, run, off) p50 15.0 and 14.9 / 13.5
  and 13.6 / 16.3 ms, p99 20.8 and 20.1 / 29.1 and 27.9 / 23.4 ms. ``off`` has the best tails when the
  source, sinks and other models share the cores, which is why the shipped configs use it; ``run``
  suits one model called in-process; ``always`` a machine dedicated to inference.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..devices import cpu_identity, cpu_int8, spinning_mode
from ..errors import BackendError, ConfigError, expected
from .base import Backend, TensorSpec

log = logging.getLogger(__name__)

# Short names accepted in device configs and CLI options, in preference order for "auto".
PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
# "auto" leaves the TensorRT execution provider out on purpose: it builds engines while the
# session is created, which can take minutes on a Jetson and would block the stream. Engines are
# built by export/trt_build.py in the background instead; list "tensorrt" explicitly to opt in.
AUTO_PROVIDERS = ("cuda", "cpu")

GRAPH_OPTIMIZATION = ("disable", "basic", "extended", "all")
# ONNX Runtime fuses "DequantizeLinear -> op -> QuantizeLinear" into its int8 kernels from the
# "extended" level on; at "basic" and below a QDQ graph runs as written: DequantizeLinear, the op in
# float, QuantizeLinear, i.e. the quantised arithmetic emulated exactly on any CPU (slower than FP32).
INT8_FUSING_LEVELS = ("extended", "all")
# The largest |int8 weight| whose u8 x s8 pair sums fit the 16-bit lanes of x86 int8 kernels without
# VNNI (edge_runtime.devices.INT8_DOT_FLAGS): 2 x 255 x 64 = 32640 <= 32767.
INT8_EXACT_PEAK = 64

# ONNX Runtime's type strings for the tensor element types our models use.
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(uint16)": np.uint16,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


def resolve_providers(requested: str | Sequence[str], available: Sequence[str]) -> list[str]:
    """Map ``"auto"`` or a list of short/full provider names to the available ones, in order.

    Unknown names are a ConfigError; known but unavailable ones are skipped with a warning; if none
    is left, BackendError names what this onnxruntime build offers.
    """
    auto = requested == "auto"
    if isinstance(requested, str):
        requested = list(AUTO_PROVIDERS) if auto else [requested]
    full: list[str] = []
    for item in requested:
        name = PROVIDER_NAMES.get(item.lower(), item) if isinstance(item, str) else item
        if name not in PROVIDER_NAMES.values():
            raise ConfigError(
                f"onnxruntime provider {item!r}: "
                + expected(f"'auto' or some of {sorted(PROVIDER_NAMES)} (or their full names)", item)
            )
        if name not in full:
            full.append(name)
    chosen = [p for p in full if p in available]
    skipped = [p for p in full if p not in available]
    if skipped and not auto:  # "auto" lists what it would like; only an explicit request warns
        log.warning("onnxruntime: providers %s not in this build (available: %s), skipped", skipped,
                    list(available))
    if not chosen:
        raise BackendError(f"onnxruntime providers: expected one of {full} available, found only {list(available)}")
    return chosen


def session_options(
    *,
    threads: int = 0,
    inter_op_threads: int = 1,
    execution_mode: Literal["sequential", "parallel"] = "sequential",
    graph_optimization: str = "all",
    spinning: bool | str = "off",
    optimized_model_path: Path | None = None,
) -> Any:
    """Build ``onnxruntime.SessionOptions`` for low per-frame latency (see the module docstring)."""
    import onnxruntime as ort

    if threads < 0:
        raise ConfigError(f"onnxruntime threads: {expected('>= 0 (0 = one per physical core)', threads)}")
    if graph_optimization not in GRAPH_OPTIMIZATION:
        raise ConfigError(f"graph_optimization: {expected(f'one of {GRAPH_OPTIMIZATION}', graph_optimization)}")
    if execution_mode not in ("sequential", "parallel"):
        raise ConfigError(f"execution_mode: {expected('sequential or parallel', execution_mode)}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = inter_op_threads
    opts.execution_mode = (
        ort.ExecutionMode.ORT_SEQUENTIAL if execution_mode == "sequential" else ort.ExecutionMode.ORT_PARALLEL
    )
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[graph_optimization]
    opts.enable_cpu_mem_arena = True
    opts.enable_mem_pattern = True
    mode = spinning_mode(spinning)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0" if mode == "off" else "1")
    if mode == "run":
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    if optimized_model_path is not None:
        opts.optimized_model_filepath = str(optimized_model_path)
    opts.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here
    return opts


def int8_weight_peak(path: str | os.PathLike[str]) -> int:
    """Largest |q| over the int8 weights (initialisers read by a DequantizeLinear) of an ONNX file; 0 if none."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)  # int8 weights of our files are inline
    inits = {i.name: i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    peak = 0
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            q = numpy_helper.to_array(inits[node.input[0]])
            if q.size:
                peak = max(peak, int(np.abs(q.astype(np.int16)).max()))
    return peak


def int8_needs_emulation(path: str | os.PathLike[str], providers: Sequence[str], graph_optimization: str) -> bool:
    """True when ONNX Runtime would run ``path``'s int8 weights through kernels that can saturate here:
    CPU provider first, a fusing optimisation level, an x86 CPU without VNNI, weights beyond +-64."""
    if not providers or providers[0] != PROVIDER_NAMES["cpu"] or graph_optimization not in INT8_FUSING_LEVELS:
        return False
    if cpu_int8().exact:
        return False
    try:
        return int8_weight_peak(path) > INT8_EXACT_PEAK
    except Exception:  # noqa: BLE001 - not a readable ONNX file: ONNX Runtime's load says what is wrong
        return False


def _spec(node: Any) -> TensorSpec:
    dtype = _ORT_DTYPES.get(node.type)
    if dtype is None:
        raise BackendError(
            f"tensor {node.name!r}: expected one of {sorted(_ORT_DTYPES)}, found {node.type!r}"
        )
    # ONNX Runtime reports dynamic dims as strings ("batch") or None.
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in node.shape)
    return TensorSpec(node.name, np.dtype(dtype), shape)


class OrtBackend(Backend):
    """Run an ONNX model with ONNX Runtime.

    Args:
        model_path: the ``.onnx`` file.
        threads: intra-op threads (device config ``cpu_threads``; 0 = one per physical core).
        providers: ``"auto"`` (CUDA when this onnxruntime has it, then CPU) or a list of
            ``cpu``/``cuda``/``tensorrt`` (or full provider names) in preference order.
        precision: what the model is (``fp32``/``fp16``/``int8``), recorded for provenance.
        graph_optimization: ``disable``/``basic``/``extended``/``all``.
        inter_op_threads, execution_mode, spinning: see the module docstring.
        optimized_cache_dir: when set, the optimised graph is saved there on first load, keyed by
            the model's sha256, the optimisation level, the providers, the onnxruntime version and
            the CPU (``devices.cpu_identity``: the graph is laid out for this CPU's vector width), and
            later loads read it with optimisation off (faster start on slow devices).
        device_id: GPU index for the CUDA / TensorRT providers.

    An int8 model whose weights would saturate this CPU's int8 kernels (``int8_needs_emulation``)
    is run at graph optimisation "basic" instead: the Q/DQ arithmetic emulated exactly, slower than
    FP32, with a warning; ``int8_emulated`` says so (the runtime then prefers FP32).
    """

    name = "onnxruntime"

    def __init__(
        self,
        model_path: str | Path,
        *,
        threads: int = 0,
        providers: str | Sequence[str] = "auto",
        precision: str = "fp32",
        graph_optimization: str = "all",
        inter_op_threads: int = 1,
        execution_mode: Literal["sequential", "parallel"] = "sequential",
        spinning: bool | str = "off",
        optimized_cache_dir: str | Path | None = None,
        device_id: int = 0,
    ) -> None:
        super().__init__(precision=precision)
        self.model_path = Path(model_path)
        self.threads = threads
        self.providers = providers
        self.graph_optimization = graph_optimization
        self.inter_op_threads = inter_op_threads
        self.execution_mode = execution_mode
        self.spinning = spinning_mode(spinning)
        self.optimized_cache_dir = Path(optimized_cache_dir) if optimized_cache_dir is not None else None
        self.device_id = device_id
        self._session: Any = None
        self._output_names: list[str] = []
        self.int8_emulated = False

    def describe_model(self) -> str:
        return self.model_path.name

    def _provider_list(self, chosen: list[str]) -> list[Any]:
        out: list[Any] = []
        for name in chosen:
            if name == "CUDAExecutionProvider":
                out.append((name, {"device_id": self.device_id}))
            elif name == "TensorrtExecutionProvider":
                opts: dict[str, object] = {"device_id": self.device_id}
                if self.optimized_cache_dir is not None:
                    opts |= {"trt_engine_cache_enable": True,
                             "trt_engine_cache_path": str(self.optimized_cache_dir / "ort-trt")}
                out.append((name, opts))
            else:
                out.append(name)
        return out

    def _optimized_path(self, chosen: list[str], level: str) -> Path | None:
        if self.optimized_cache_dir is None or level == "disable":
            return None
        import onnxruntime as ort

        digest = hashlib.sha256(self.model_path.read_bytes())
        digest.update(f"|{level}|{','.join(chosen)}|{ort.__version__}|{cpu_identity()}".encode())
        return self.optimized_cache_dir / f"{self.model_path.stem}.{digest.hexdigest()[:16]}.ort.onnx"

    def _load(self) -> None:
        import onnxruntime as ort

        if not self.model_path.is_file():
            raise BackendError(f"onnx model: expected a file at {self.model_path}, found none")
        chosen = resolve_providers(self.providers, ort.get_available_providers())
        model = self.model_path
        level = self.graph_optimization
        self.int8_emulated = int8_needs_emulation(model, chosen, level)
        if self.int8_emulated:
            level = "basic"
            self._warn_emulated()
        save_to: Path | None = None
        cached = self._optimized_path(chosen, level)
        if cached is not None and cached.is_file():
            model, level = cached, "disable"  # already optimised for these providers
            log.info("onnxruntime: using optimised graph cache %s", cached)
        elif cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                save_to = cached
            except OSError as exc:  # read-only cache location: run without the cache
                log.warning("onnxruntime: cannot write optimised graph cache %s (%s)", cached.parent, exc)
        session = self._session_for(ort, model, chosen, level, save_to)
        got = session.get_providers()
        if got[:1] != chosen[:1] and int8_needs_emulation(self.model_path, got, self.graph_optimization):
            # ONNX Runtime fell back to its CPU provider (e.g. CUDA listed but unusable): emulate after all.
            self.int8_emulated = True
            self._warn_emulated()
            session = self._session_for(ort, self.model_path, chosen, "basic", None)
        self._session = session
        self._inputs = [_spec(n) for n in session.get_inputs()]
        self._outputs = [_spec(n) for n in session.get_outputs()]
        self._output_names = [s.name for s in self._outputs]
        self.provider = session.get_providers()[0]

    def _session_for(self, ort: Any, model: Path, chosen: list[str], level: str, save_to: Path | None) -> Any:
        opts = session_options(
            threads=self.threads, inter_op_threads=self.inter_op_threads, execution_mode=self.execution_mode,
            graph_optimization=level, spinning=self.spinning, optimized_model_path=save_to,
        )
        try:
            return ort.InferenceSession(str(model), sess_options=opts, providers=self._provider_list(chosen))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise BackendError(f"onnxruntime could not load {model}: {exc}") from exc

    def _warn_emulated(self) -> None:
        log.warning("onnxruntime: %s has int8 weights beyond +-%d, which this CPU's int8 kernels (%s) would sum "
                    "wrongly; running its Q/DQ arithmetic emulated in float (exact, slower than FP32)",
                    self.model_path.name, INT8_EXACT_PEAK, cpu_int8().describe())

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(self._output_names, feeds)
        except Exception as exc:
            raise BackendError(f"onnxruntime run of {self.model_path.name} failed: {exc}") from exc
        return dict(zip(self._output_names, values))

    def _close(self) -> None:
        self._session = None
