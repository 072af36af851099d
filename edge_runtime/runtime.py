"""In-process inference: a verified bundle and a Frame in, a Result out.

``Runtime(bundle, device).process(frame)`` runs the bundle's declared pre-processing, the chosen
backend and the declared post-processing, timing each stage and stamping provenance on the
result. On a GPU device with TensorRT, a missing engine is built in the background while ONNX
Runtime serves; the runtime swaps to the engine between two frames and says so in the log and in
``status()``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backends import Backend, TrtBackend, select_backend, tensorrt_available
from .bundle import Bundle, check_trusted
from .devices import DeviceConfig, cpu_int8, detect, load_config, spinning_mode
from .engine_cache import BackgroundBuilder, EngineCache, EngineKey, preference, untrusted
from .errors import BackendError, BundleError, ConfigError, InputError, expected
from .frames import Frame
from .postprocess import Postprocessor, enhance_tiled
from .preprocess import Preprocessor
from .results import Result

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

# Preference when the caller says precision="auto": the fastest artefact the device allows.
# ONNX Runtime's CPU provider has few FP16 kernels, so CPU configs do not list fp16 at all.
AUTO_ORDER = ("int8", "fp16", "fp32")
ENGINE_MAX_HW = (1024, 1024)
ENGINE_MIN_HW = 16  # smallest H and W of a dynamic-size engine's profile (or the model's size multiple)


def resolve_device(device: str | Path | DeviceConfig | None) -> DeviceConfig:
    if isinstance(device, DeviceConfig):
        return device
    if device is None or device == "auto":
        found = detect()
        log.info("device: %s (%s)", found.config, found.reason)
        return load_config(found.config)
    return load_config(str(device))


CPU_TARGET = "onnxruntime-cpu"  # artefacts made for ONNX Runtime's CPU provider (int8_cpu.onnx)


def onnx_target(device: DeviceConfig, backend: str | None = None) -> str | None:
    """The artefact target for ONNX Runtime on ``device``: ``"onnxruntime-cpu"`` on a CPU device (kind
    "cpu") running ONNX Runtime, so that a bundle's CPU-only INT8 form runs there; None elsewhere (GPU
    devices: TensorRT engines and ONNX Runtime's GPU providers take the artefact that runs everywhere)."""
    want = backend or device.backend
    return CPU_TARGET if device.kind == "cpu" and want in ("onnxruntime", "auto") else None


def choose_precision(bundle: Bundle, device: DeviceConfig, requested: str = "auto",
                     backend: str | None = None) -> str:
    """The artefact precision to run: requested, or the fastest one present, allowed, gated and runnable
    on ``device`` (an ONNX artefact for its target: a CPU-only INT8 form does not count on a GPU
    device, nor a TensorRT-only one on a CPU device)."""
    # A quantised artefact runs only when the bundle's accuracy gate passed (docs/BUNDLE.md).
    validation = bundle.manifest.get("validation")
    gated = isinstance(validation, dict) and validation.get("passed") is True
    target = onnx_target(device, backend)

    def runnable(p: str) -> bool:
        try:
            bundle.artifact(p, "onnx", target)
        except BundleError:
            return False
        return True

    present = dict.fromkeys(a.precision for a in bundle.artifacts if a.kind == "onnx")
    usable = [p for p in present if (p == "fp32" or gated) and runnable(p)]
    if requested != "auto":
        if requested not in device.precisions:
            raise ConfigError(f"device {device.name}: " + expected(f"a precision in {list(device.precisions)}",
                                                                    requested))
        if requested not in usable:
            raise BundleError(f"bundle {bundle.name}: " + expected(
                f"a gated ONNX artefact in {requested}" + (f" for {target}" if target else " for every backend"),
                usable))
        return requested
    for p in AUTO_ORDER:
        if p in usable and p in device.precisions:
            return p
    raise BundleError(f"bundle {bundle.name} on {device.name}: " + expected(
        f"an artefact in one of {list(device.precisions)}", usable))


@dataclass(frozen=True)
class EngineRequest:
    """What the runtime looks up (or builds) in the engine cache for one bundle, precision and device."""

    onnx_path: Path  # the artefact TensorRT builds from: the one that runs everywhere
    dla_core: int | None  # None: the GPU
    profiles: dict[str, dict[str, list[int]]] | None  # None: static input shapes


def engine_request(bundle: Bundle, device: DeviceConfig, precision: str) -> EngineRequest:
    """The runtime's engine for ``bundle`` in ``precision`` on ``device``; shared with ``export build
    --cache``, which pre-builds exactly the engine the runtime will look for.

    Image-to-image models have dynamic H/W: one profile from ENGINE_MIN_HW or the pre-processing's
    size multiple, whichever is larger (the smallest tensor a frame gives: a 32 px floor refused the
    shipped enhancers' 16 px tensors of thin frames, which ONNX Runtime serves; a floor keeps tiny
    shapes, which pooling layers may not build for, out of the profile) up to ENGINE_MAX_HW, tuned
    for 512 x 512 (larger frames are tiled by post-processing when the bundle says so). DLA runs static
    shapes only (NVIDIA's DLA restrictions: profile min = opt = max), so only a static-shape
    FP16/INT8 model gets DLA core 0 on a device with DLA; a dynamic one would build a "DLA" engine
    that runs wholly on the GPU, or fail.
    """
    onnx_path = bundle.file(bundle.artifact(precision, "onnx", None).file)
    spec = bundle.manifest["inputs"][0]
    profiles = None
    if not all(isinstance(d, int) for d in spec["shape"]):
        pre = Preprocessor.from_manifest(bundle.manifest)
        c, k = spec["shape"][1] if isinstance(spec["shape"][1], int) else pre.channels, max(ENGINE_MIN_HW, pre.multiple)
        profiles = {spec["name"]: {"min": [1, c, k, k], "opt": [1, c, 512, 512], "max": [1, c, *ENGINE_MAX_HW]}}
    dla = 0 if device.dla_cores > 0 and precision != "fp32" and profiles is None else None
    return EngineRequest(onnx_path, dla, profiles)


class Runtime:
    """One model on one device. Construction is cheap; ``load()`` verifies and loads."""

    def __init__(self, bundle: str | Path | Bundle, device: str | Path | DeviceConfig | None = None, *,
                 precision: str = "auto", backend: str | None = None, threads: int | None = None,
                 spinning: bool | str | None = None, engine_cache_dir: str | Path | None = None,
                 build_engines: bool = True, gpu: int = 0) -> None:
        self._bundle_arg = bundle
        self._device_arg = device
        self.requested_precision = precision
        self.requested_backend = backend
        self.threads = threads
        self.spinning = None if spinning is None else spinning_mode(spinning)  # None: the config's cpu_spinning
        self.engine_cache_dir = engine_cache_dir
        self.build_engines = build_engines
        if isinstance(gpu, bool) or not isinstance(gpu, int) or gpu < 0:
            raise ConfigError(f"runtime gpu: {expected('a CUDA device index >= 0', gpu)}")
        self.gpu = gpu  # the CUDA device engines are built for and run on (and the CUDA provider's)
        self.bundle: Bundle | None = None
        self.device: DeviceConfig | None = None
        self.precision = ""
        self.backend: Backend | None = None
        self.artifact = ""  # the file that runs: an ONNX artefact of the bundle, or an engine built from one
        self._pending_engine: Path | None = None
        self._engine_dla: int | None = None  # the DLA core of the engine looked up or built, None: the GPU
        self._engine_host_code = False  # that engine is version-compatible (see _cached_engine)
        self._builder: Any = None
        self._lock = threading.Lock()
        self.events: list[str] = []  # backend swaps and build outcomes, for telemetry

    # -- life cycle -----------------------------------------------------------------------
    def load(self) -> Self:
        b = self._bundle_arg
        self.bundle = b if isinstance(b, Bundle) else Bundle.load(resolve_bundle(b), verify=True)
        check_trusted(self.bundle)
        self.device = resolve_device(self._device_arg)
        self.precision = choose_precision(self.bundle, self.device, self.requested_precision,
                                          self.requested_backend)
        self.pre = Preprocessor.from_manifest(self.bundle.manifest, reuse_tensor=True)
        self.post = Postprocessor.from_manifest(self.bundle.manifest, preprocess=self.pre)
        self.input_name = self.pre.input_name
        self.backend = self._load_backend()
        if getattr(self.backend, "int8_emulated", False) and self.requested_precision == "auto" \
                and self._builder is None:
            # This CPU's int8 kernels would saturate the artefact's 8-bit weights (backends/onnxruntime.py):
            # emulated it is exact but slower than FP32, so FP32 serves. Not while an INT8 engine builds:
            # the emulated stopgap serves until TensorRT takes over.
            self.backend.close()
            note = (f"{self.artifact}: int8 weights beyond this CPU's exact range ({cpu_int8().describe()}); "
                    "serving fp32 (re-export the bundle for a CPU INT8 form with 7-bit weights)")
            log.warning("runtime: %s", note)
            self.events.append(note)
            self.precision = "fp32"
            self.backend = self._load_backend()
        log.info("runtime: %s %s on %s via %s", self.bundle.name, self.precision, self.device.name,
                 self.backend.provider)
        return self

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def __enter__(self) -> Self:
        return self.load()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _onnx_path(self, target: str | None = None) -> Path:
        """The bundle's ONNX artefact in this precision for ``target`` (None: the one that runs everywhere,
        which TensorRT builds from; "onnxruntime-cpu": the CPU form when the bundle has one)."""
        if self.bundle is None:
            raise BackendError("runtime: expected load() before use, found an unloaded runtime")
        return self.bundle.file(self.bundle.artifact(self.precision, "onnx", target).file)

    def _load_backend(self) -> Backend:
        """``_open_backend().load()``; an engine TensorRT refuses to deserialise (a compatible one from
        another TensorRT release or GPU, say) is an event and ONNX Runtime serves, unless the caller
        asked for TensorRT explicitly."""
        backend = self._open_backend()
        try:
            return backend.load()
        except BackendError as exc:
            if backend.name != "tensorrt" or self.requested_backend == "tensorrt":
                raise
            msg = f"engine {self.artifact} failed to load ({exc}); serving with onnxruntime"
            self.events.append(msg)
            log.error("runtime: %s", msg)
            return self._open_backend(engines=False).load()

    def _open_backend(self, engines: bool = True) -> Backend:
        """The device's (or the caller's) backend choice, through ``backends.select_backend``.

        With TensorRT usable, the engine comes from the cache; a missing one is built in the
        background while ONNX Runtime serves, even when TensorRT was asked for explicitly. Where
        TensorRT is not usable (absent, or older than the backend supports: TensorRT 8.2 on a
        Jetson Nano), a device config's ``backend: tensorrt`` means ONNX Runtime and no engine is
        built; only a caller's explicit ``backend="tensorrt"`` then fails.
        """
        dev = self.device
        if dev is None:
            raise BackendError("runtime: expected a device config, found none")
        want = self.requested_backend or dev.backend
        engine: Path | None = None
        if not engines:
            want = "onnxruntime"
        elif want in ("auto", "tensorrt"):
            if tensorrt_available()[0]:
                engine = self._cached_engine()
                if engine is None:
                    want = "auto"
            elif self.requested_backend is None:
                want = "auto"  # select_backend logs why TensorRT is not used
        onnx_path = self._onnx_path(onnx_target(dev, self.requested_backend))
        backend = select_backend(
            want, onnx_path=onnx_path, engine_path=engine, precision=self.precision,
            threads=self.threads if self.threads is not None else dev.cpu_threads,
            spinning=self.spinning if self.spinning is not None else dev.cpu_spinning, cuda_graphs=dev.trt_cuda_graphs,
            dla_core=self._engine_dla, allow_host_code=self._engine_host_code, device_index=self.gpu)
        self.artifact = engine.name if engine is not None and backend.name == "tensorrt" else onnx_path.name
        return backend

    def _cached_engine(self) -> Path | None:
        """The engine for this bundle, precision and device: the bundle's or the cache's under the exact
        key; else a compatible one, served while the exact one builds (when building is on); else None,
        after starting the build."""
        from export.trt_build import build_into_cache, engine_key_for

        dev = self.device
        if dev is None or self.bundle is None:
            raise BackendError("runtime: expected load() before use, found an unloaded runtime")
        cache = EngineCache(self.engine_cache_dir)
        req = engine_request(self.bundle, dev, self.precision)
        self._engine_dla = req.dla_core
        self._engine_host_code = False
        key = engine_key_for(req.onnx_path, self.precision, dla_core=req.dla_core, profiles=req.profiles,
                             device_index=self.gpu)
        found = self._find_engine(cache, key, hardware_compatible_ok=dev.kind != "jetson")
        if found is not None and found[1] == key:
            return found[0]
        if self.build_engines:  # a compatible engine may be slower (NVIDIA): the exact one replaces it
            workspace, gpu = dev.trt_workspace_mb, self.gpu
            self._builder = BackgroundBuilder(
                lambda: build_into_cache(cache, key, req.onnx_path, workspace_mb=workspace, progress=False,
                                         device_index=gpu),
                name=f"{self.bundle.name}-{self.precision}",
                on_ready=self._engine_ready).start()
            self.events.append("engine build started; serving with "
                               + ("a compatible engine" if found is not None else "onnxruntime") + " meanwhile")
        elif found is None:
            log.warning("runtime: no engine for %s in %s and building is off; serving with ONNX Runtime",
                        key.describe(), cache.directory)
        if found is None:
            return None
        path, built_for = found
        # A version-compatible engine carries TensorRT's lean runtime as host code (_find_engine took
        # it only from a place only its owner can write).
        self._engine_host_code = built_for.version_compatible
        note = f"engine {path.name} ({built_for.describe()}) serves {key.describe()}"
        log.info("runtime: %s", note)
        self.events.append(note)
        return path

    def _find_engine(self, cache: EngineCache, key: EngineKey, *, hardware_compatible_ok: bool
                     ) -> tuple[Path, EngineKey] | None:
        """Exact before compatible, the bundle's (verified with it) before the cache's; among compatible
        ones the same GPU first, then the newest TensorRT. A version-compatible engine runs host code,
        so it is taken only from a file and folder owned by this user (or root) that no one else can
        write."""
        carried = self.bundle.engines(self.precision) if self.bundle is not None else []
        exact = [(p, k) for p, k in carried if k == key]
        if exact:
            return exact[0]
        found = cache.find(key, hardware_compatible_ok=hardware_compatible_ok)  # the exact one, else compatible
        if found is not None and found[1] == key:
            return found
        candidates = [(p, k) for p, k in carried if k.serves(key, hardware_compatible_ok=hardware_compatible_ok)]
        candidates += [found] if found is not None else []
        trusted = []
        for path, built_for in candidates:
            if built_for.version_compatible and (why := untrusted(path)):
                log.warning("runtime: not running host code of %s: %s", path.name, why)
                continue
            trusted.append((path, built_for))
        rank = preference(key)
        trusted.sort(key=lambda pk: rank(pk[1]), reverse=True)
        return trusted[0] if trusted else None

    def _engine_ready(self, path: Path) -> None:
        with self._lock:
            self._pending_engine = path  # swapped in by the serving thread (its CUDA context)

    def _maybe_swap(self) -> None:
        with self._lock:
            path, self._pending_engine = self._pending_engine, None
        if path is None:
            return
        try:
            # built here for the exact key: never version-compatible, no host code
            new = TrtBackend(path, device_index=self.gpu, precision=self.precision, dla_core=self._engine_dla,
                             use_cuda_graph=self.device.trt_cuda_graphs if self.device else False).load()
        except Exception as exc:  # noqa: BLE001 - a bad engine must not cost a frame: ONNX Runtime keeps serving
            msg = f"engine {path.name} failed to load ({exc}); serving with {self.backend.name if self.backend else '?'}"
            self.events.append(msg)
            log.error("runtime: %s", msg)
            return
        old, self.backend = self.backend, new
        self.artifact = path.name
        self._engine_host_code = False
        if old is not None:
            old.close()
        msg = f"swapped to TensorRT engine {path.name}"
        self.events.append(msg)
        log.info("runtime: %s", msg)

    # -- per frame ------------------------------------------------------------------------
    @property
    def provenance(self) -> dict[str, str]:
        if self.bundle is None or self.backend is None:
            return {}
        return {"model": self.bundle.name, "bundle_sha256": self.bundle.sha256,
                "backend": self.backend.name, "precision": self.precision, "artifact": self.artifact}

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.provenance)
        if self._builder is not None:
            out["engine_build"] = self._builder.status()
        out["events"] = list(self.events)
        return out

    def process(self, frame: Frame) -> Result:
        if self.backend is None:
            raise BackendError("runtime: expected load() before process(), found an unloaded runtime")
        if self._pending_engine is not None:
            self._maybe_swap()
        backend = self.backend
        t0 = time.perf_counter()
        x, mapping = self.pre(frame)
        t1 = time.perf_counter()
        if self.post.tile is not None:
            tile, overlap = self.post.tile
            out_name = self.post.spec.get("output") or backend.outputs[0].name
            y = {out_name: enhance_tiled(lambda t: backend.infer({self.input_name: t})[out_name], x, tile, overlap)}
        else:
            y = backend.infer({self.input_name: x})
        t2 = time.perf_counter()
        decoded = self.post(y, mapping, frame)
        t3 = time.perf_counter()
        return Result(stream_id=frame.stream_id, seq=frame.seq, capture_ns=frame.capture_ns,
                      detections=decoded.detections, enhanced=decoded.enhanced, masks=decoded.masks,
                      contours=decoded.contours,
                      timings_ms={"preprocess": (t1 - t0) * 1e3, "infer": (t2 - t1) * 1e3,
                                  "postprocess": (t3 - t2) * 1e3},
                      provenance=self.provenance, stamps=dict(frame.stamps))


class RuntimeSet:
    """Several runtimes behind one ``process``: each frame goes to the models of its modality.

    Detections from every detector are merged; the enhanced pixels come from the enhancer. The
    timings and provenance of each model are kept under its name (``us-lesion-det.infer``).
    """

    def __init__(self, runtimes: Sequence[Runtime]) -> None:
        self.runtimes = list(runtimes)

    def load(self) -> Self:
        for r in self.runtimes:
            r.load()
        return self

    def close(self) -> None:
        for r in self.runtimes:
            r.close()

    def __enter__(self) -> Self:
        return self.load()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def modalities(self) -> list[str]:
        """Every modality some model of the set takes (from the bundles' manifests)."""
        return sorted({m for r in self.runtimes if r.bundle for m in r.bundle.manifest["modality"]})

    def for_frame(self, frame: Frame) -> list[Runtime]:
        chosen = [r for r in self.runtimes if r.bundle is not None and frame.modality in r.bundle.manifest["modality"]]
        if not chosen:
            raise InputError(expected(f"a frame of modality {self.modalities()}", frame.modality))
        return chosen

    def process(self, frame: Frame) -> Result:
        merged = Result(stream_id=frame.stream_id, seq=frame.seq, capture_ns=frame.capture_ns,
                        stamps=dict(frame.stamps))
        models = []
        for r in self.for_frame(frame):
            res = r.process(frame)
            merged.detections.extend(res.detections)
            if res.enhanced is not None:
                merged.enhanced = res.enhanced
            if res.masks is not None:
                merged.masks, merged.contours = res.masks, res.contours
            for stage, ms in res.timings_ms.items():
                merged.timings_ms[f"{r.bundle.name if r.bundle else '?'}.{stage}"] = ms
                merged.timings_ms[stage] = merged.timings_ms.get(stage, 0.0) + ms
            models.append(res.provenance)
        merged.provenance = {k: "+".join(p.get(k, "") for p in models)
                             for k in ("model", "bundle_sha256", "backend", "precision", "artifact")}
        return merged


def reference_bundles() -> dict[str, Path]:
    """The reference bundles shipped inside the package (demonstration models, synthetic data)."""
    root = Path(__file__).resolve().parent / "models"
    # dot-directories are an export's staging copies (export.bundle_write.staged), never shipped models
    return {p.parent.name: p.parent for p in sorted(root.glob("*/manifest.json")) if not p.parent.name.startswith(".")}


def resolve_bundle(spec: str | Path) -> Path:
    """A bundle path, or the name of a reference bundle shipped with the package. A local path wins
    only when it is a bundle (holds manifest.json) or a file (an archive): a folder of that name made
    for something else (an output folder, say) hid the shipped model."""
    shipped = reference_bundles()
    local = Path(spec)
    if str(spec) in shipped and not (local.is_file() or (local / "manifest.json").is_file()):
        return shipped[str(spec)]
    return local
