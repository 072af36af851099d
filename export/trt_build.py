"""Export step ``build``: a TensorRT engine from an ONNX model, on the machine that will run it.

Version branches (by the parsed ``tensorrt.__version__``, never by try/except):
- TensorRT 11: strongly typed networks only; no FP16/INT8 builder flags and no calibrators.
  Precision comes from the ONNX itself: an FP16 ONNX for fp16, a Q/DQ ONNX for int8.
- TensorRT 10 (JetPack 6 / Orin ships 10.3): strongly typed when the ONNX carries its precision
  (Q/DQ nodes or FP16 tensors; ``strongly_typed=None`` decides that) and no DLA core is asked for,
  else weakly typed with the FP16 (+ INT8) builder flags (an FP32 ONNX; any ONNX on a DLA core).
  INT8 only from explicit Q/DQ (implicit calibration is deprecated in 10, gone in 11).
- TensorRT 8.x (legacy Jetson Nano, 8.2, compute 5.3): explicit-batch network, precision through
  builder flags, ``max_workspace_size`` before 8.4; no INT8 on GPUs without fast INT8 (the Nano).

The engine file is exactly what ``build_serialized_network`` returned: nothing is prepended
(metadata lives in the engine cache's sidecar). A persistent timing cache is loaded before and
saved after each build. Progress comes from an IProgressMonitor (TensorRT >= 10) as tqdm bars or
log lines.

Only the logic around the API is tested here (with a fake tensorrt module); the TensorRT calls are
type-checked by mypy against tensorrt-stubs. Engine builds have not run on real hardware yet.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edge_runtime.backends.tensorrt import (
    error_mark,
    logged_errors,
    make_trt_logger,
    on_device,
    parse_version,
    require_tensorrt,
)
from edge_runtime.engine_cache import EngineCache, EngineKey, Profile, atomic_write_bytes, normalize_profile
from edge_runtime.errors import BackendError, ExportError, expected

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
Version = tuple[int, int, int]


# ---------------------------------------------------------------------------------------------
# What the ONNX says about itself (no TensorRT needed)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OnnxTraits:
    has_qdq: bool  # explicit QuantizeLinear/DequantizeLinear nodes: an INT8 graph
    has_fp16: bool  # FP16 initialisers, tensors or casts: an FP16 graph
    inputs: dict[str, tuple[int | None, ...]]  # graph inputs, None for dynamic dims
    external_data: tuple[str, ...] = ()  # files next to the model holding its weights (ONNX external data)


def onnx_traits(onnx_path: Path) -> OnnxTraits:
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises protobuf DecodeError, OSError, ValueError...
        raise ExportError(f"build: expected a readable ONNX model at {onnx_path}, found {exc}") from exc
    graph = model.graph
    fp16 = onnx.TensorProto.FLOAT16
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)
    typed = list(graph.input) + list(graph.output) + list(graph.value_info)
    has_fp16 = (
        any(t.type.tensor_type.elem_type == fp16 for t in typed)
        or any(i.data_type == fp16 for i in graph.initializer)
        or any(n.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in n.attribute) for n in graph.node)
    )
    initializers = {i.name for i in graph.initializer}
    inputs: dict[str, tuple[int | None, ...]] = {}
    for value in graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        inputs[value.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims)
    external = sorted({entry.value for tensor in graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL
                       for entry in tensor.external_data if entry.key == "location"})
    return OnnxTraits(has_qdq, has_fp16, inputs, tuple(external))


def model_digest(onnx_path: Path, external_data: Sequence[str] = ()) -> str:
    """The engine key's model sha256: of the ONNX file, and with external data of the file and each
    data file it names (TensorRT builds from those weights: a retrained model saved with external
    data has the same .onnx bytes and must not be served the old engine)."""
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    if not external_data:
        return digest
    combined = hashlib.sha256(digest.encode())
    for name in sorted(set(external_data)):
        try:
            data = (onnx_path.parent / name).read_bytes()
        except OSError as exc:
            raise ExportError(f"build: {onnx_path.name}'s external data file {name!r}: "
                              f"{expected('a readable file next to the model', type(exc).__name__)}") from None
        combined.update(b"\0" + name.encode() + b"\0" + hashlib.sha256(data).hexdigest().encode())
    return combined.hexdigest()


# ---------------------------------------------------------------------------------------------
# Decisions (pure): network flags, builder flags, profiles, DLA
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildPlan:
    strongly_typed: bool
    explicit_batch_flag: bool  # TensorRT 8.x needs NetworkDefinitionCreationFlag.EXPLICIT_BATCH
    builder_flags: tuple[str, ...]  # BuilderFlag member names to set
    legacy_workspace: bool  # TensorRT < 8.4: config.max_workspace_size instead of memory pools
    progress_monitor: bool  # IProgressMonitor exists from TensorRT 10
    # OnnxParserFlag.NATIVE_INSTANCENORM, which version/hardware-compatible builds require: off by default
    # in TensorRT 8.6's parser (InstanceNormalization then goes to a plugin, and such a build fails), on
    # by default from 10.
    native_instancenorm: bool = False


def parse_compute_capability(text: str | None) -> tuple[int, int] | None:
    """A device config's compute capability as numbers: "8.7" -> (8, 7), "9" -> (9, 0), None -> None."""
    if text is None:
        return None
    major, _, minor = str(text).partition(".")
    if not (major.isdigit() and (minor or "0").isdigit()):
        raise ExportError(f"build compute_capability: {expected('MAJOR.MINOR, e.g. 8.7', text)}")
    return int(major), int(minor or "0")


def plan_build(
    version: Version,
    precision: str,
    traits: OnnxTraits,
    *,
    strongly_typed: bool | None = None,
    dla_core: int | None = None,
    gpu_fallback: bool = True,
    version_compatible: bool = False,
    hardware_compatible: bool = False,
    jetson: bool = False,
    compute_capability: tuple[int, int] | None = None,
) -> BuildPlan:
    """Decide how to build for this TensorRT version. Raises ExportError for impossible requests.

    ``jetson`` / ``compute_capability`` describe the build machine where known (device config, probe).
    """
    major = version[0]
    if precision not in PRECISIONS:
        raise ExportError(f"build precision: {expected(f'one of {PRECISIONS}', precision)}")
    if major < 8:
        raise ExportError(f"build: expected TensorRT >= 8, found {'.'.join(map(str, version))}")
    if precision == "int8" and not traits.has_qdq:
        raise ExportError(
            "build int8: expected an ONNX with explicit Q/DQ nodes (run `export quantize` first), found none; "
            "implicit INT8 calibration is deprecated in TensorRT 10 and removed in 11"
        )
    if precision == "fp32" and (traits.has_qdq or traits.has_fp16):
        raise ExportError(
            "build fp32: expected an FP32 ONNX, found one with "
            + ("Q/DQ nodes (an int8 model)" if traits.has_qdq else "FP16 tensors (an fp16 model)")
        )
    if precision == "fp16" and traits.has_qdq:
        raise ExportError("build fp16: expected an ONNX without Q/DQ nodes, found Q/DQ (an int8 model)")

    flags: list[str] = []
    if major >= 11:
        if strongly_typed is False:
            raise ExportError("build: TensorRT 11 builds strongly typed networks only; found strongly_typed=False")
        if precision == "fp16" and not traits.has_fp16:
            raise ExportError(
                "build fp16 on TensorRT 11: expected an FP16 ONNX (TensorRT 11 has no FP16 builder flag; "
                "use the fp16 variant from `export quantize`), found an FP32 graph"
            )
        typed = True
    elif major == 10:
        if strongly_typed is None:
            # DLA computes in FP16 and INT8 only. Strongly typed, every FP32 tensor of the ONNX (the
            # layers a Q/DQ graph keeps in float, the FP32 I/O of an FP16 export) is an FP32 layer the
            # DLA cannot run: GPU fallback, or a failed build without it. Weakly typed with the FP16
            # (+ INT8) flags, TensorRT may run them in FP16 on the DLA: the route of TensorRT 10's DLA
            # docs (trtexec --useDLACore=0 --int8 --fp16 --allowGPUFallback), which say nothing of
            # strongly typed networks on DLA before 11.x.
            typed = (traits.has_qdq or traits.has_fp16) and dla_core is None
        else:
            typed = strongly_typed
            if typed and precision == "fp16" and not traits.has_fp16:
                raise ExportError("build fp16 strongly typed on TensorRT 10: expected an FP16 ONNX (a "
                                  "strongly typed FP32 graph builds an FP32 engine), found an FP32 graph; "
                                  "use the fp16 variant from `export quantize`, or leave strongly_typed unset")
            if typed and dla_core is not None:
                log.warning("build: strongly typed network on DLA core %d with TensorRT 10 (asked for): "
                            "its FP32 layers cannot run on the DLA and fall back to the GPU; TensorRT 10's "
                            "DLA docs describe the weakly typed FP16/INT8-flag route", dla_core)
        if not typed:
            if precision == "fp16":
                flags.append("FP16")
            elif precision == "int8":
                flags += ["INT8", "FP16"]  # weakly typed Q/DQ graph: INT8 where quantised, FP16 elsewhere
    else:  # 8.x / 9.x: no strong typing
        if strongly_typed:
            raise ExportError(
                f"build: strongly typed networks need TensorRT >= 10, found {'.'.join(map(str, version))}"
            )
        typed = False
        if precision == "fp16":
            flags.append("FP16")
        elif precision == "int8":
            flags += ["INT8", "FP16"]

    if dla_core is not None:
        if dla_core < 0:
            raise ExportError(f"build dla_core: {expected('>= 0 or None', dla_core)}")
        if precision == "int8" and major < 10:
            # TensorRT 8.x developer guide (DLA): explicit quantization (Q/DQ) is not supported on the DLA
            log.warning("build: an INT8 Q/DQ graph on DLA core %d with TensorRT %s: its DLA did not take "
                        "explicit quantization; expect its layers on the GPU (with GPU fallback) or a failed "
                        "build (without); fp16 is the DLA route there", dla_core, ".".join(map(str, version)))
        if precision == "fp32":
            raise ExportError("build: DLA runs FP16 and INT8 only; found precision fp32 (build fp16 or int8 for DLA)")
        if hardware_compatible:
            raise ExportError("build: hardware-compatible engines run on the GPU only; found a DLA core requested")

        if gpu_fallback:
            flags.append("GPU_FALLBACK")
    if hardware_compatible:
        # TensorRT developer guide, "Hardware Compatibility": Ampere and later only, and not supported
        # on JetPack or DRIVE OS; a Jetson builds its own engine anyway (nothing to carry it to).
        if jetson:
            raise ExportError("build: hardware-compatible engines are not supported on JetPack (TensorRT: "
                              "discrete Ampere+ GPUs only); found a Jetson: build a plain engine on it")
        if compute_capability is not None and compute_capability < (8, 0):
            raise ExportError("build: hardware-compatible engines need an Ampere or later GPU (compute "
                              f"capability >= 8.0), found {compute_capability[0]}.{compute_capability[1]}")
    if version_compatible or hardware_compatible:
        if version < (8, 6, 0):
            raise ExportError(
                f"build: version/hardware-compatible engines need TensorRT >= 8.6, found {'.'.join(map(str, version))}"
            )
        if version_compatible:
            flags.append("VERSION_COMPATIBLE")
    return BuildPlan(
        strongly_typed=typed,
        explicit_batch_flag=major < 10,
        builder_flags=tuple(flags),
        legacy_workspace=version < (8, 4, 0),
        progress_monitor=major >= 10,
        native_instancenorm=(version_compatible or hardware_compatible) and major < 10,
    )


def plan_profile(
    inputs: Mapping[str, tuple[int | None, ...]],
    profiles: Mapping[str, object] | None = None,
    target_hw: tuple[int, int] | None = None,
) -> Profile:
    """min/opt/max for every input with dynamic dims: the caller's, else from the target size.

    From ``target_hw`` (the device config's target frame size): batch axis 1/1/1 and the last two
    axes min = opt = max = (H, W): the runtime letterboxes every frame to that size, and a fixed
    profile gives TensorRT the most room. Any other dynamic axis needs an explicit profile.
    """
    given = normalize_profile(profiles)
    unknown = sorted(set(given) - set(inputs))
    if unknown:
        raise ExportError(f"build profiles: expected inputs among {sorted(inputs)}, found {unknown}")
    out: Profile = {}
    for name, shape in inputs.items():
        if name in given:
            mn, opt, mx = given[name]
            if len(mn) != len(shape) or any(s is not None and not (a == b == c == s)
                                             for s, a, b, c in zip(shape, mn, opt, mx)):
                raise ExportError(
                    f"build profile for {name!r}: expected rank {len(shape)} matching static dims {shape}, "
                    f"found min {mn} opt {opt} max {mx}"
                )
            out[name] = (mn, opt, mx)
            continue
        if all(d is not None for d in shape):
            continue
        fixed: list[int] = []
        for axis, dim in enumerate(shape):
            if dim is not None:
                fixed.append(dim)
            elif axis == 0:
                fixed.append(1)
            elif target_hw is not None and len(shape) >= 3 and axis >= len(shape) - 2:
                fixed.append(int(target_hw[axis - (len(shape) - 2)]))
            else:
                raise ExportError(
                    f"build: input {name!r} axis {axis} of {shape} is dynamic: expected a profile "
                    "(profiles={name: (min, opt, max)}) or the device config's target size, found neither"
                )
        triple = tuple(fixed)
        out[name] = (triple, triple, triple)
    return out


# ---------------------------------------------------------------------------------------------
# Progress (pure part; the TensorRT IProgressMonitor subclass delegates here)
# ---------------------------------------------------------------------------------------------
class ProgressSink:
    """Turns TensorRT's phase/step callbacks into tqdm bars (``"bar"``) or log lines (``"log"``).

    Thread-safe (TensorRT may call from its own threads). ``cancel`` set -> the build is asked to stop.
    """

    def __init__(self, mode: Literal["bar", "log", "off"] = "bar", cancel: threading.Event | None = None) -> None:
        self.mode = mode
        self.cancel = cancel
        self._lock = threading.Lock()
        self._depth: dict[str, int] = {}
        self._bars: dict[str, Any] = {}
        self.finished: list[str] = []

    def phase_start(self, phase: str, parent: str | None, num_steps: int) -> None:
        with self._lock:
            depth = self._depth.get(parent, -1) + 1 if parent is not None else 0
            self._depth[phase] = depth
            if self.mode == "bar":
                from tqdm import tqdm

                self._bars[phase] = tqdm(total=num_steps, desc=("  " * depth) + phase, position=depth,
                                         leave=depth == 0, unit="step", file=sys.stderr)
            elif self.mode == "log" and depth <= 1:
                log.info("TensorRT build: %s%s (%d steps)", "  " * depth, phase, num_steps)

    def step_complete(self, phase: str, step: int) -> bool:
        with self._lock:
            bar = self._bars.get(phase)
            if bar is not None:
                bar.n = step + 1
                bar.refresh()
        return not (self.cancel is not None and self.cancel.is_set())

    def phase_finish(self, phase: str) -> None:
        with self._lock:
            bar = self._bars.pop(phase, None)
            if bar is not None:
                bar.close()
            depth = self._depth.pop(phase, 0)
            self.finished.append(phase)
            if self.mode == "log" and depth <= 1:
                log.info("TensorRT build: %s%s done", "  " * depth, phase)

    def close(self) -> None:
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()


def _make_progress_monitor(sink: ProgressSink) -> trt.IProgressMonitor:
    import tensorrt as trt

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            sink.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return sink.step_complete(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            sink.phase_finish(phase_name)

    return _Monitor()


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------
@dataclass
class BuildReport:
    onnx_path: str
    engine_path: str
    trt_version: str
    precision: str
    strongly_typed: bool
    builder_flags: list[str]
    dla_core: int | None
    gpu_fallback: bool
    version_compatible: bool
    hardware_compatible: bool
    workspace_mb: int | None
    profile: dict[str, dict[str, list[int]]]
    timing_cache: str | None
    timing_cache_loaded: bool
    seconds: float
    engine_bytes: int
    engine_sha256: str
    network_inputs: list[dict[str, object]] = field(default_factory=list)
    network_outputs: list[dict[str, object]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _tensor_info(tensor: trt.ITensor) -> dict[str, object]:
    dims = tensor.shape
    return {"name": tensor.name, "dtype": tensor.dtype.name, "shape": [int(dims[i]) for i in range(len(dims))]}


def _set_flag(config: trt.IBuilderConfig, name: str) -> None:
    """Set one BuilderFlag by the name plan_build chose (each spelled out so mypy checks it, and
    each looked up only when chosen: FP16 and INT8 no longer exist in TensorRT 11)."""
    import tensorrt as trt

    if name == "FP16":
        flag = trt.BuilderFlag.FP16
    elif name == "INT8":
        flag = trt.BuilderFlag.INT8
    elif name == "GPU_FALLBACK":
        flag = trt.BuilderFlag.GPU_FALLBACK
    elif name == "VERSION_COMPATIBLE":
        flag = trt.BuilderFlag.VERSION_COMPATIBLE
    else:
        raise ExportError(f"build: unknown builder flag {name!r}")
    config.set_flag(flag)


def _save_timing_cache(config: trt.IBuilderConfig, path: Path) -> None:
    """Write the build's timing cache; a failure costs only the next build's time, never the engine."""
    try:
        # None when no cache is set, although the stubs do not say so
        cache: trt.ITimingCache | None = config.get_timing_cache()
        if cache is None:
            raise RuntimeError("TensorRT returned no timing cache")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, bytes(cache.serialize()))
    except (OSError, RuntimeError) as exc:
        log.warning("build: timing cache not saved to %s (%s); the engine is unaffected", path, exc)


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    precision: str,
    workspace_mb: int | None,
    dla_core: int | None = None,
    gpu_fallback: bool = True,
    profiles: Mapping[str, object] | None = None,
    target_hw: tuple[int, int] | None = None,
    timing_cache: str | Path | None = None,
    version_compatible: bool = False,
    hardware_compatible: bool = False,
    strongly_typed: bool | None = None,
    progress: bool | Literal["bar", "log"] = True,
    cancel: threading.Event | None = None,
    device_kind: str | None = None,
    compute_capability: str | None = None,
    device_index: int = 0,
) -> BuildReport:
    """Build a TensorRT engine from ``onnx_path`` and write exactly its serialised bytes to ``engine_path``.

    Args:
        precision: ``fp32``/``fp16``/``int8`` (must agree with the ONNX: FP16 graph, Q/DQ graph).
        workspace_mb: builder workspace cap (device config); None leaves TensorRT's default (all of
            the GPU's memory: on a Jetson, whose GPU shares RAM with the CPU, give a cap).
        dla_core: DLA core to run on (Xavier/Orin), with GPU fallback unless ``gpu_fallback=False``.
        profiles: ``{input: (min, opt, max)}`` for dynamic inputs; else derived from ``target_hw``.
        timing_cache: file loaded before and saved after the build (created when missing).
        version_compatible / hardware_compatible: lean-runtime / Ampere+ portable engines.
        strongly_typed: None = auto (TensorRT 10: when the ONNX carries its precision and no DLA core is
            asked for; always on 11).
        device_kind / compute_capability: the device config's ``kind`` and ``compute_capability``
            ("8.7"), to refuse what the target cannot do; a Jetson is also seen by /etc/nv_tegra_release.
        progress: True/"bar" tqdm bars, "log" log lines, False nothing.
        cancel: set it to ask TensorRT to abandon the build (checked at every progress step).
        device_index: the CUDA device to build on (and for): engines are tied to their GPU.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if workspace_mb is not None and workspace_mb <= 0:
        raise ExportError(f"build workspace_mb: {expected('> 0 or None', workspace_mb)}")
    if not onnx_path.is_file():
        raise ExportError(f"build: expected an ONNX file at {onnx_path}, found none")
    try:
        version_text = require_tensorrt()
    except BackendError as exc:
        raise ExportError(f"build: {exc}") from exc
    import tensorrt as trt

    version = parse_version(version_text)
    traits = onnx_traits(onnx_path)
    plan = plan_build(
        version, precision, traits, strongly_typed=strongly_typed, dla_core=dla_core, gpu_fallback=gpu_fallback,
        version_compatible=version_compatible, hardware_compatible=hardware_compatible,
        jetson=device_kind == "jetson" or (device_kind is None and Path("/etc/nv_tegra_release").exists()),
        compute_capability=parse_compute_capability(compute_capability),
    )
    profile = plan_profile(traits.inputs, profiles, target_hw)
    dynamic = sorted(name for name, (mn, _, mx) in (profile or {}).items() if tuple(mn) != tuple(mx))
    if dla_core is not None and dynamic:  # NVIDIA's DLA restrictions: static shapes only (min = opt = max)
        raise ExportError(f"build: DLA runs static shapes only; found dynamic profiles for {dynamic} (build for "
                          "the GPU, or give one shape as min, opt and max)")

    def build() -> BuildReport:  # its locals, the TensorRT objects, are freed on return: GPU N still current
        logger = make_trt_logger()
        mark = error_mark(logger)
        builder = trt.Builder(logger)
        network_flags = 0
        if plan.explicit_batch_flag:
            network_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        if plan.strongly_typed and version[0] == 10:
            # TensorRT 11 networks are always strongly typed; the flag is only needed (and set) on 10.
            network_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(network_flags)
        parser = trt.OnnxParser(network, logger)
        if plan.native_instancenorm:
            parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)
        if not parser.parse_from_file(str(onnx_path)):  # from file: external weights resolve next to it
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise ExportError(
                f"build: TensorRT {version_text} ONNX parser rejected {onnx_path.name} ({len(errors)} errors): "
                + " | ".join(errors or logged_errors(logger, mark) or ["no detail"])
            )

        config = builder.create_builder_config()
        if workspace_mb is not None:
            workspace = int(workspace_mb) << 20
            if plan.legacy_workspace:
                config.max_workspace_size = workspace  # type: ignore[attr-defined]  # TensorRT 8.2 API, gone in 10
            else:
                config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
        for flag in plan.builder_flags:
            _set_flag(config, flag)
        if "INT8" in plan.builder_flags and not builder.platform_has_fast_int8:
            raise ExportError(
                "build int8: this GPU has no fast INT8 (e.g. the legacy Jetson Nano, compute 5.3): build fp16 instead"
            )
        if "FP16" in plan.builder_flags and not builder.platform_has_fast_fp16:
            log.warning("build: this GPU has no fast FP16; the fp16 engine may be no faster than fp32")
        if dla_core is not None:
            if builder.num_DLA_cores == 0:
                raise ExportError(
                    f"build dla_core: expected a TensorRT with DLA, found TensorRT {version_text} reporting no DLA "
                    "core (this GPU has none, or a TensorRT without DLA: 10.7 was the last 10.x with it, and 11.x has "
                    "it again from 11.4.1 on JetPack 7.2.2+); build for the GPU (no dla_core)")
            if dla_core >= builder.num_DLA_cores:
                raise ExportError(f"build dla_core: expected < {builder.num_DLA_cores} (DLA cores here), found {dla_core}")
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = dla_core
        if hardware_compatible:
            config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS

        if profile:
            opt_profile = builder.create_optimization_profile()
            for name, (mn, opt, mx) in profile.items():
                opt_profile.set_shape(name, trt.Dims(list(mn)), trt.Dims(list(opt)), trt.Dims(list(mx)))
            if config.add_optimization_profile(opt_profile) < 0:
                raise ExportError(f"build: TensorRT rejected the optimisation profile {profile}")

        cache_path = Path(timing_cache) if timing_cache is not None else None
        cache_loaded = False
        if cache_path is not None:
            data = cache_path.read_bytes() if cache_path.is_file() else b""
            try:
                cache = config.create_timing_cache(data)
                # False: recorded on a GPU with other properties (ignore_mismatch=False keeps timings honest)
                cache_loaded = config.set_timing_cache(cache, ignore_mismatch=False) and bool(data)
                problem = None if cache_loaded or not data else "recorded on another device"
            except (RuntimeError, TypeError, ValueError) as exc:  # a corrupt cache file
                problem = str(exc)
            if problem is not None:
                log.warning("build: timing cache %s unusable (%s); starting an empty one", cache_path, problem)
                config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

        sink: ProgressSink | None = None
        if progress and plan.progress_monitor:
            mode: Literal["bar", "log"] = "log" if progress == "log" or not sys.stderr.isatty() else "bar"
            sink = ProgressSink(mode, cancel)
            config.progress_monitor = _make_progress_monitor(sink)

        log.info(
            "build: %s -> %s with TensorRT %s (%s, strongly typed %s, flags %s, DLA %s, workspace %s MB)",
            onnx_path.name, engine_path.name, version_text, precision, plan.strongly_typed,
            list(plan.builder_flags) or "none", dla_core, workspace_mb if workspace_mb is not None else "default",
        )
        started = time.monotonic()
        try:
            # None on failure, although the stubs do not say so
            serialized: trt.IHostMemory | None = builder.build_serialized_network(network, config)
        finally:
            if sink is not None:
                sink.close()
        seconds = time.monotonic() - started
        if serialized is None:
            cancelled = cancel is not None and cancel.is_set()
            raise ExportError(
                f"build: TensorRT {version_text} {'build cancelled' if cancelled else 'failed'} for {onnx_path.name}: "
                + ("; ".join(logged_errors(logger, mark)) or "see the TensorRT log above")
            )
        engine_bytes = bytes(serialized)  # exactly TensorRT's bytes: never prepend anything
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(engine_path, engine_bytes)
        if cache_path is not None:
            _save_timing_cache(config, cache_path)
        log.info("build: wrote %s (%d bytes) in %.1f s", engine_path, len(engine_bytes), seconds)
        return BuildReport(
            onnx_path=str(onnx_path), engine_path=str(engine_path), trt_version=version_text, precision=precision,
            strongly_typed=plan.strongly_typed, builder_flags=list(plan.builder_flags), dla_core=dla_core,
            gpu_fallback=gpu_fallback, version_compatible=version_compatible, hardware_compatible=hardware_compatible,
            workspace_mb=workspace_mb,
            profile={k: {"min": list(a), "opt": list(b), "max": list(c)} for k, (a, b, c) in profile.items()},
            timing_cache=str(cache_path) if cache_path is not None else None, timing_cache_loaded=cache_loaded,
            seconds=round(seconds, 3), engine_bytes=len(engine_bytes),
            engine_sha256=hashlib.sha256(engine_bytes).hexdigest(),
            network_inputs=[_tensor_info(network.get_input(i)) for i in range(network.num_inputs)],
            network_outputs=[_tensor_info(network.get_output(i)) for i in range(network.num_outputs)],
        )

    with on_device(device_index):  # TensorRT builds for the GPU current in this thread
        try:
            return build()
        except BaseException as exc:
            traceback.clear_frames(exc.__traceback__)  # a failed build's TensorRT objects, freed here too
            raise


def engine_key_for(
    onnx_path: str | Path,
    precision: str,
    *,
    dla_core: int | None = None,
    profiles: Mapping[str, object] | None = None,
    target_hw: tuple[int, int] | None = None,
    device_index: int = 0,
    version_compatible: bool = False,
    hardware_compatible: bool = False,
) -> EngineKey:
    """The engine cache key for building ``onnx_path`` on this machine (TensorRT + GPU probed here).

    The profile is the one ``build_engine`` would use with the same ``profiles`` / ``target_hw``.
    """
    from edge_runtime.backends.tensorrt import probe_device

    onnx_path = Path(onnx_path)
    ident = probe_device(device_index)
    traits = onnx_traits(onnx_path)
    profile = plan_profile(traits.inputs, profiles, target_hw)
    digest = model_digest(onnx_path, traits.external_data)
    return EngineKey(digest, ident.trt_version, ident.gpu_name, ident.compute_capability, ident.sm_count,
                     precision, dla_core, dict(profile), version_compatible, hardware_compatible)


def build_into_cache(
    cache: EngineCache,
    key: EngineKey,
    onnx_path: str | Path,
    **options: Any,
) -> Path:
    """Build ``onnx_path`` for ``key`` into ``cache`` (timing cache shared per TensorRT + GPU); return the path.

    The function a BackgroundBuilder runs: the build writes a staging file in the cache directory,
    then ``commit`` renames it into place and writes the sidecar, so readers never see half an engine.
    Precision, DLA core, profile and compatibility come from ``key``, so the engine is what it names.
    """
    fixed = {"precision", "dla_core", "profiles", "target_hw", "version_compatible", "hardware_compatible"}
    if fixed & options.keys():
        raise ExportError("build_into_cache: " + expected(
            f"options other than {sorted(fixed)} (the key sets them)", sorted(fixed & options.keys())))
    staging = cache.staging_path(key)
    timing = cache.timing_cache_path(key.trt_version, key.gpu_name, key.compute_capability)
    profile = {k: {"min": list(a), "opt": list(b), "max": list(c)} for k, (a, b, c) in key.profile.items()}
    try:
        report = build_engine(
            onnx_path, staging, precision=key.precision, dla_core=key.dla_core, timing_cache=timing,
            profiles=profile or None, version_compatible=key.version_compatible,
            hardware_compatible=key.hardware_compatible, **options,
        )
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return cache.commit(key, staging, info=report.to_dict())
