"""Engine cache: TensorRT engines are tied to a TensorRT version and a GPU, so they are built on the
target and kept here under a key of everything that makes one engine differ from another.

Layout of the cache directory (``$EDGE_RUNTIME_CACHE``, else ``~/.cache/edge-runtime/engines``; carts
with a read-only root filesystem point it at a writable partition):

    <name>.engine        exactly the bytes TensorRT serialised (nothing prepended, ever)
    <name>.engine.json   sidecar: the full key, sizes, sha256, creation info
    timing-<trt>-<gpu>.timing-cache   persistent builder timing cache per (TensorRT, GPU)

Every write is atomic (temporary file in the same directory, then ``os.replace``), so a power cut
mid-build leaves either the old state or the new one, never half an engine under a real name.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Generic, TypeVar

from .errors import BackendError, ConfigError, expected

log = logging.getLogger(__name__)

ENV_VAR = "EDGE_RUNTIME_CACHE"
SIDECAR_SUFFIX = ".json"
SIDECAR_FORMAT = "edge-runtime-engine"
SIDECAR_VERSION = 1
PARTIAL_SUFFIX = ".partial"

Shape = tuple[int, ...]
# input name -> (min, opt, max) shapes of the optimisation profile the engine was built with
Profile = dict[str, tuple[Shape, Shape, Shape]]


def normalize_profile(profile: Mapping[str, object] | None) -> Profile:
    """Accept ``{name: (min, opt, max)}`` or ``{name: {"min":..., "opt":..., "max":...}}``."""
    out: Profile = {}
    for name, value in (profile or {}).items():
        if isinstance(value, Mapping):
            triple = [value.get(k) for k in ("min", "opt", "max")]
        elif isinstance(value, Sequence) and not isinstance(value, str):
            triple = list(value)
        else:
            raise ConfigError(f"profile for {name!r}: {expected('(min, opt, max) shapes', value)}")
        if len(triple) != 3 or not all(isinstance(s, Sequence) and not isinstance(s, str) for s in triple):
            raise ConfigError(f"profile for {name!r}: {expected('three shapes (min, opt, max)', value)}")
        shapes = tuple(tuple(int(d) for d in s) for s in triple)  # type: ignore[union-attr]
        mn, opt, mx = shapes
        if not (len(mn) == len(opt) == len(mx)) or any(
            not (a <= b <= c) or a < 1 for a, b, c in zip(mn, opt, mx)
        ):
            raise ConfigError(f"profile for {name!r}: {expected('1 <= min <= opt <= max per axis', shapes)}")
        out[str(name)] = (mn, opt, mx)
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class EngineKey:
    """Everything that makes a TensorRT engine valid for one model on one machine."""

    model_sha256: str
    trt_version: str
    gpu_name: str
    compute_capability: str  # "8.7"
    sm_count: int
    precision: str  # fp32 / fp16 / int8
    dla_core: int | None = None
    profile: Profile = field(default_factory=dict)
    # Built with BuilderFlag.VERSION_COMPATIBLE (runs on later TensorRT of the same major version, with
    # host code allowed) / HardwareCompatibilityLevel.AMPERE_PLUS (runs on any Ampere+ discrete GPU).
    # Recorded only when set, so the digests of ordinary keys stay what they were.
    version_compatible: bool = False
    hardware_compatible: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{64}", self.model_sha256):
            raise ConfigError(f"model_sha256: {expected('64 lower-case hex digits', self.model_sha256)}")
        object.__setattr__(self, "profile", normalize_profile(self.profile))

    def __hash__(self) -> int:  # the profile dict is not hashable; the digest covers every field
        return hash(self.digest())

    def to_dict(self) -> dict[str, object]:
        return {
            "model_sha256": self.model_sha256,
            "trt_version": self.trt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "sm_count": self.sm_count,
            "precision": self.precision,
            "dla_core": self.dla_core,
            "profile": {k: {"min": list(a), "opt": list(b), "max": list(c)} for k, (a, b, c) in self.profile.items()},
            **({"version_compatible": True} if self.version_compatible else {}),
            **({"hardware_compatible": True} if self.hardware_compatible else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineKey:
        try:
            dla = data.get("dla_core")
            return cls(
                model_sha256=str(data["model_sha256"]),
                trt_version=str(data["trt_version"]),
                gpu_name=str(data["gpu_name"]),
                compute_capability=str(data["compute_capability"]),
                sm_count=int(data["sm_count"]),
                precision=str(data["precision"]),
                dla_core=None if dla is None else int(dla),
                profile=normalize_profile(data.get("profile")),
                version_compatible=_flag(data, "version_compatible"),
                hardware_compatible=_flag(data, "hardware_compatible"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"engine key: {expected('all EngineKey fields', dict(data))} ({exc})") from exc

    def digest(self) -> str:
        """Stable short hex id: sha256 of the canonical JSON of every field, first 16 hex digits."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def file_name(self) -> str:
        """Readable and unique: ``<model12>-<precision>-trt<ver>-<gpu>-sm<cc>[-dla<n>]-<digest>.engine``."""
        parts = [
            self.model_sha256[:12], self.precision, f"trt{self.trt_version}", _slug(self.gpu_name),
            f"sm{self.compute_capability.replace('.', '')}",
        ]
        if self.dla_core is not None:
            parts.append(f"dla{self.dla_core}")
        parts += ["vc"] if self.version_compatible else []
        parts += ["hc"] if self.hardware_compatible else []
        return "-".join(parts + [self.digest()]) + ".engine"

    def describe(self) -> str:
        dla = f", DLA core {self.dla_core}" if self.dla_core is not None else ""
        compat = (", version-compatible" if self.version_compatible else "") + \
            (", hardware-compatible (Ampere+)" if self.hardware_compatible else "")
        return (
            f"TensorRT {self.trt_version} on {self.gpu_name} (sm {self.compute_capability}, {self.sm_count} SMs), "
            f"{self.precision}{dla}{compat}"
        )

    def mismatches(self, other: EngineKey) -> list[tuple[str, object, object]]:
        """Fields where ``other`` (found) differs from ``self`` (expected): (field, expected, found)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [(k, mine.get(k, False), theirs.get(k, False)) for k in dict.fromkeys([*mine, *theirs])
                if mine.get(k, False) != theirs.get(k, False)]

    def serves(self, wanted: EngineKey, *, hardware_compatible_ok: bool = True) -> bool:
        """Whether an engine built under this key runs where ``wanted`` is asked for: the same key, or
        one that differs only where its compatibility flags allow. Version-compatible: built with the
        same TensorRT major version, no later than the one here (NVIDIA: "compatible with later
        TensorRT versions"; across a major version the runtime rebuilds). Hardware-compatible: both
        GPUs Ampere or later (compute capability >= 8.0), not a DLA engine, and ``hardware_compatible_ok``
        (False on Jetson, which TensorRT's hardware compatibility does not cover)."""
        if self == wanted:
            return True
        if (self.model_sha256, self.precision, self.dla_core, self.profile) != \
                (wanted.model_sha256, wanted.precision, wanted.dla_core, wanted.profile):
            return False
        if self.trt_version != wanted.trt_version:
            built, here = version_tuple(self.trt_version), version_tuple(wanted.trt_version)
            if not (self.version_compatible and built[:1] == here[:1] and built <= here):
                return False
        if (self.gpu_name, self.compute_capability, self.sm_count) != \
                (wanted.gpu_name, wanted.compute_capability, wanted.sm_count):
            ampere = all(version_tuple(cc) >= (8, 0) for cc in (self.compute_capability, wanted.compute_capability))
            if not (self.hardware_compatible and hardware_compatible_ok and ampere and self.dla_core is None):
                return False
        return True


def preference(wanted: EngineKey) -> Callable[[EngineKey], tuple[Any, ...]]:
    """Sort key (highest first) among engines that serve ``wanted``: the same GPU, then the newest TensorRT."""
    return lambda k: (k.gpu_name == wanted.gpu_name, version_tuple(k.trt_version))


def version_tuple(text: str) -> tuple[int, ...]:
    """"10.3.0.30" -> (10, 3, 0, 30); unparsable parts read as 0 (never compatible by accident: the
    major version must still agree)."""
    return tuple(int(p) if p.isdigit() else 0 for p in text.split("."))


def untrusted(path: Path) -> str | None:
    """Why the file at ``path`` may not be trusted to run host code (a version-compatible engine
    carries TensorRT's lean runtime as code), or None: it and its folder must belong to this user or
    root and be writable by no one else, since whoever can replace the file can run code here."""
    for p in (path, path.parent):
        try:
            st = p.stat()
        except OSError as exc:
            return f"{p.name or p}: {exc.strerror or type(exc).__name__}"
        if st.st_uid not in (os.getuid(), 0):
            return f"{p} belongs to user {st.st_uid}, not this one ({os.getuid()}) or root"
        if st.st_mode & 0o022:
            return f"{p} is writable by its group or by everyone (mode {st.st_mode & 0o777:o})"
    return None


def _flag(data: Mapping[str, Any], name: str) -> bool:
    value = data.get(name, False)
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected true or false, found {value!r}")
    return value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")[:40] or "gpu"


def mismatch_message(wanted: EngineKey, found: EngineKey, where: Path | str) -> str:
    fields = "; ".join(f"{name}: expected {exp!r}, found {got!r}" for name, exp, got in wanted.mismatches(found))
    return (
        f"engine {where} was built for {found.describe()}, this is {wanted.describe()}: "
        f"refusing it ({fields}); rebuild the engine on this device"
    )


def default_cache_dir() -> Path:
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edge-runtime" / "engines"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EngineCache:
    """Engines on disk by EngineKey. Reading works on a read-only directory; writing says where to point."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()

    # -- paths ---------------------------------------------------------------------------------
    def engine_path(self, key: EngineKey) -> Path:
        return self.directory / key.file_name()

    @staticmethod
    def sidecar_path(engine_path: Path) -> Path:
        return engine_path.with_name(engine_path.name + SIDECAR_SUFFIX)

    def timing_cache_path(self, trt_version: str, gpu_name: str, compute_capability: str) -> Path:
        """One persistent timing cache per (TensorRT version, GPU): tactics timed once are reused."""
        cc = compute_capability.replace(".", "")
        return self.directory / f"timing-trt{trt_version}-{_slug(gpu_name)}-sm{cc}.timing-cache"

    def ensure_writable(self) -> Path:
        """Create the directory and prove it takes a file, or raise ConfigError saying what to do."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".probe.", suffix=PARTIAL_SUFFIX):
                pass
        except OSError as exc:
            raise ConfigError(
                f"engine cache directory {self.directory}: expected a writable directory, found {exc.strerror or exc}"
                f" (read-only root filesystem?); set ${ENV_VAR} or the device config's engine_cache to a "
                "writable path, e.g. a data partition"
            ) from exc
        return self.directory

    def staging_path(self, key: EngineKey) -> Path:
        """Where a build writes before ``commit``: same directory, so the final rename is atomic."""
        self.ensure_writable()
        return self.directory / f".{key.file_name()}.{os.getpid()}.{threading.get_ident()}{PARTIAL_SUFFIX}"

    # -- read ----------------------------------------------------------------------------------
    def read_key(self, engine_path: Path) -> EngineKey:
        return EngineKey.from_dict(self._read_sidecar(engine_path).get("key", {}))

    def _read_sidecar(self, engine_path: Path) -> dict[str, Any]:
        sidecar = self.sidecar_path(engine_path)
        try:
            data = json.loads(sidecar.read_text())
        except FileNotFoundError as exc:
            raise BackendError(
                f"engine {engine_path}: expected a sidecar {sidecar.name} naming what it was built for, found none; "
                "refusing an engine that cannot be verified: rebuild it"
            ) from exc
        except (OSError, ValueError) as exc:
            raise BackendError(f"engine sidecar {sidecar}: expected JSON, found unreadable content ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
            raise BackendError(
                f"engine sidecar {sidecar}: expected format {SIDECAR_FORMAT!r}, found {str(data)[:80]!r}"
            )
        return data

    def verify(self, engine_path: Path, key: EngineKey, *, check_hash: bool = True) -> Path:
        """Refuse ``engine_path`` unless its sidecar names exactly ``key`` and its bytes are intact.

        Also the check for an engine given explicitly (``--engine``) or carried by a bundle.
        """
        if not engine_path.is_file():
            raise BackendError(f"engine {engine_path}: expected the engine file its sidecar describes, found none")
        meta = self._read_sidecar(engine_path)
        found = EngineKey.from_dict(meta.get("key", {}))
        if found != key:
            raise BackendError(mismatch_message(key, found, engine_path))
        size = engine_path.stat().st_size
        if meta.get("engine_bytes") != size:
            raise BackendError(f"engine {engine_path}: expected {meta.get('engine_bytes')} bytes, found {size}: rebuild it")
        if check_hash and meta.get("engine_sha256") != _sha256_file(engine_path):
            raise BackendError(f"engine {engine_path}: sha256 differs from its sidecar (corrupt?): rebuild it")
        return engine_path

    def lookup(self, key: EngineKey) -> Path | None:
        """The verified engine for ``key``, or None when there is none (yet).

        Raises BackendError when a file under this key's name exists but its sidecar disagrees
        (edited or corrupt). Engines of the same model for another TensorRT/GPU are logged, so the
        log says why a rebuild happens.
        """
        path = self._exact(key)
        if path is None:
            self._log_others(key)
        return path

    def _exact(self, key: EngineKey) -> Path | None:
        path = self.engine_path(key)
        if path.is_file() and self.sidecar_path(path).is_file():
            return self.verify(path, key)
        if path.is_file():
            log.warning("engine cache: %s has no sidecar (interrupted build?): will rebuild", path.name)
        return None

    def _log_others(self, key: EngineKey) -> None:
        for other in self.entries():
            if other.model_sha256 == key.model_sha256 and other.precision == key.precision:
                log.info("engine cache: %s", mismatch_message(key, other, self.engine_path(other).name))

    def find(self, key: EngineKey, *, hardware_compatible_ok: bool = True) -> tuple[Path, EngineKey] | None:
        """The engine for ``key`` (``lookup``), else a verified version- or hardware-compatible one that
        ``serves`` it (same GPU first, then the newest TensorRT), with the key it was built under; None
        when neither is there. A compatible engine needs ``engine_host_code_allowed`` when it is
        version-compatible: the caller reads that from the key returned."""
        path = self._exact(key)
        if path is not None:
            return path, key
        found = [k for k in self.entries() if k.serves(key, hardware_compatible_ok=hardware_compatible_ok)]
        found.sort(key=preference(key), reverse=True)
        for other in found:
            try:
                return self.verify(self.engine_path(other), other), other
            except BackendError as exc:
                log.warning("engine cache: not using %s (%s)", self.engine_path(other).name, exc)
        self._log_others(key)
        return None

    def entries(self) -> list[EngineKey]:
        """Keys of every engine in the directory with a readable sidecar."""
        keys: list[EngineKey] = []
        if not self.directory.is_dir():
            return keys
        for sidecar in sorted(self.directory.glob("*.engine" + SIDECAR_SUFFIX)):
            try:
                keys.append(self.read_key(sidecar.with_name(sidecar.name[: -len(SIDECAR_SUFFIX)])))
            except BackendError as exc:
                log.debug("engine cache: skipping %s (%s)", sidecar.name, exc)
        return keys

    # -- write ---------------------------------------------------------------------------------
    def commit(self, key: EngineKey, built: Path, info: Mapping[str, object] | None = None) -> Path:
        """Move a freshly built engine into place (atomic rename) and write its sidecar."""
        self.ensure_writable()
        final = self.engine_path(key)
        if built.parent.resolve() != self.directory.resolve():
            # A build elsewhere: copy into a temp file here first so the rename stays atomic.
            atomic_write_bytes(final, built.read_bytes())
            built.unlink(missing_ok=True)
        else:
            os.replace(built, final)
        sidecar = {
            "format": SIDECAR_FORMAT,
            "format_version": SIDECAR_VERSION,
            "key": key.to_dict(),
            "key_digest": key.digest(),
            "engine_file": final.name,
            "engine_bytes": final.stat().st_size,
            "engine_sha256": _sha256_file(final),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "info": dict(info or {}),
        }
        atomic_write_bytes(self.sidecar_path(final), (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode())
        log.info("engine cache: stored %s (%s)", final.name, key.describe())
        return final

    def store(self, key: EngineKey, engine_bytes: bytes, info: Mapping[str, object] | None = None) -> Path:
        """Write serialised engine bytes unmodified under ``key`` (atomically) with a sidecar."""
        staging = self.staging_path(key)
        atomic_write_bytes(staging, engine_bytes)
        return self.commit(key, staging, info)

    def clean_partial(self, older_than_s: float = 3600.0) -> int:
        """Remove temporary files left by builds that died (power cut, kill). Returns the count."""
        removed = 0
        now = time.time()
        for tmp in self.directory.glob(f".*{PARTIAL_SUFFIX}") if self.directory.is_dir() else []:
            try:
                if now - tmp.stat().st_mtime > older_than_s:
                    tmp.unlink()
                    removed += 1
            except OSError:
                pass
        return removed


T = TypeVar("T")


class BuildState(str, enum.Enum):
    IDLE = "idle"
    BUILDING = "building"
    READY = "ready"
    FAILED = "failed"


class BackgroundBuilder(Generic[T]):
    """Run a long build (a TensorRT engine) in a thread while the caller keeps serving.

    The runtime serves with ONNX Runtime while ``state`` is BUILDING, then swaps when it is READY
    (``result`` holds what the build returned; ``on_ready`` is called from the build thread). A
    failure is kept in ``error`` and logged; it never propagates into the serving thread.
    """

    def __init__(self, build: Callable[[], T], *, name: str, on_ready: Callable[[T], None] | None = None) -> None:
        self.name = name
        self._build = build
        self._on_ready = on_ready
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._state = BuildState.IDLE
        self._result: T | None = None
        self.error: BaseException | None = None
        self.started_at: float | None = None
        self.seconds: float | None = None
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> BuildState:
        with self._lock:
            return self._state

    @property
    def result(self) -> T | None:
        with self._lock:
            return self._result

    def start(self) -> BackgroundBuilder[T]:
        with self._lock:
            if self._state is not BuildState.IDLE:
                return self
            self._state = BuildState.BUILDING
            self.started_at = time.monotonic()
        log.info("background build %s: started (serving continues on the fallback backend meanwhile)", self.name)
        # daemon: a cart shutting down must not wait minutes for a build; the partial file is cleaned later.
        self._thread = threading.Thread(target=self._work, name=f"build-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _work(self) -> None:
        started = time.monotonic()
        try:
            value = self._build()
        except BaseException as exc:  # noqa: BLE001 - recorded and logged, never raised into the server
            with self._lock:
                self.error = exc
                self.seconds = time.monotonic() - started
                self._state = BuildState.FAILED
            log.error("background build %s: failed after %.1f s: %s: %s", self.name, self.seconds,
                      type(exc).__name__, exc)
            self._done.set()
            return
        seconds = time.monotonic() - started
        # The swap is requested before anyone is told "ready": a caller woken by wait() must find the
        # new engine pending, not the old backend still in place.
        if self._on_ready is not None:
            try:
                self._on_ready(value)
            except Exception as exc:  # noqa: BLE001 - the swap callback failing must not kill the thread silently
                log.error("background build %s: on_ready callback failed: %s", self.name, exc)
        with self._lock:
            self._result = value
            self.seconds = seconds
            self._state = BuildState.READY
        log.info("background build %s: ready after %.1f s", self.name, self.seconds)
        self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the build finished (ready or failed); False on timeout."""
        return self._done.wait(timeout)

    def status(self) -> dict[str, object]:
        """For telemetry: state, seconds so far or taken, error text."""
        with self._lock:
            elapsed = self.seconds
            if elapsed is None and self.started_at is not None:
                elapsed = time.monotonic() - self.started_at
            return {"name": self.name, "state": self._state.value, "seconds": elapsed,
                    "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}"}
