"""The one base class every inference backend shares.

Construction is cheap (it only records arguments); ``load()`` opens the model, ``close()`` releases
it, and a backend is also a context manager. ``infer()`` checks the feeds once here (names, dtype,
rank, static dims) so subclasses' ``_run`` can trust them, then records how long the call took.
"""

from __future__ import annotations

import abc
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BackendError, InputError, expected

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

# How many recent call times a backend keeps: enough for a p99 over a few seconds of a 30 fps
# stream, small enough to cost nothing. Long runs belong to telemetry, not here.
TIMING_HISTORY = 512


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, numpy dtype, shape with ``None`` for dynamic dims."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]

    @property
    def is_dynamic(self) -> bool:
        return any(d is None for d in self.shape)

    def describe(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype.name}[{dims}]"

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "dtype": self.dtype.name, "shape": list(self.shape)}


def check_feeds(specs: list[TensorSpec], feeds: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Validate ``feeds`` against ``specs``; return C-contiguous arrays keyed by input name.

    Raises InputError naming the tensor, what was expected and what was found. No dtype casts:
    a float64 frame where the model wants float32 is a pre-processing bug to fix, not to hide.
    """
    if not isinstance(feeds, Mapping):
        raise InputError(f"feeds: {expected('a dict of input name -> numpy array', type(feeds).__name__)}")
    names = [s.name for s in specs]
    missing = [n for n in names if n not in feeds]
    unknown = [n for n in feeds if n not in names]
    if missing or unknown:
        raise InputError(
            f"feeds: expected inputs {names}, found {sorted(map(str, feeds))}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unknown {unknown})" if unknown else "")
        )
    checked: dict[str, np.ndarray] = {}
    for spec in specs:
        value = feeds[spec.name]
        if not isinstance(value, np.ndarray):
            raise InputError(f"input {spec.name!r}: {expected('a numpy array', type(value).__name__)}")
        if value.dtype != spec.dtype:
            raise InputError(f"input {spec.name!r}: expected dtype {spec.dtype.name}, found {value.dtype.name}")
        if value.ndim != len(spec.shape):
            raise InputError(
                f"input {spec.name!r}: expected rank {len(spec.shape)} {spec.describe()}, "
                f"found rank {value.ndim} shape {tuple(value.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, value.shape)):
            if want is not None and want != got:
                raise InputError(
                    f"input {spec.name!r}: expected shape {spec.describe()}, found {tuple(value.shape)} "
                    f"(axis {axis}: expected {want}, found {got})"
                )
        if any(d == 0 for d in value.shape):
            raise InputError(f"input {spec.name!r}: expected no empty axis, found shape {tuple(value.shape)}")
        # No copy when already contiguous (the usual case after pre-processing).
        checked[spec.name] = np.ascontiguousarray(value)
    return checked


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation), NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class Backend(abc.ABC):
    """Base class: explicit load/close, inputs checked once, per-call timing.

    Subclasses implement ``_load`` (open the model, set ``self._inputs``/``self._outputs`` and
    ``self.provider``), ``_run`` (feeds already checked) and ``_close``.

    Attributes:
        name: short backend name (``onnxruntime``, ``tensorrt``), stable for logs and provenance.
        precision: what the caller says the model is (``fp32``, ``fp16``, ``int8``).
        provider: what actually runs it once loaded (e.g. ``CPUExecutionProvider``, ``TensorRT 10.3.0``).
        last_infer_ms: wall time of the last ``infer`` call, NaN before the first.
    """

    name: str = "backend"

    def __init__(self, *, precision: str = "fp32") -> None:
        self.precision = precision
        self.provider = ""
        self.last_infer_ms = math.nan
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        self._loaded = False
        self._times: deque[float] = deque(maxlen=TIMING_HISTORY)
        self._calls = 0
        self._state_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> Self:
        """Open the model. Idempotent; returns self so ``b = X(path).load()`` reads well."""
        with self._state_lock:
            if self._loaded:
                return self
            started = time.perf_counter()
            self._load()
            self._loaded = True
        log.info(
            "%s backend loaded %s in %.0f ms (provider %s, precision %s)",
            self.name, self.describe_model(), (time.perf_counter() - started) * 1e3, self.provider,
            self.precision,
        )
        return self

    def close(self) -> None:
        """Release everything ``load`` acquired. Safe to call twice or before ``load``."""
        with self._state_lock:
            if not self._loaded:
                return
            self._loaded = False
            self._close()

    def __enter__(self) -> Self:
        return self.load()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- I/O description -----------------------------------------------------------------------
    def _require_loaded(self, what: str) -> None:
        if not self._loaded:
            raise BackendError(
                f"{self.name} backend for {self.describe_model()}: {what} needs a loaded model; "
                "call load() first or use the backend as a context manager"
            )

    @property
    def inputs(self) -> list[TensorSpec]:
        self._require_loaded("inputs")
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        self._require_loaded("outputs")
        return list(self._outputs)

    def describe_model(self) -> str:
        """What the backend runs (a file name), for messages. Subclasses override."""
        return "<model>"

    # -- inference -----------------------------------------------------------------------------
    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check ``feeds`` once, run the model, return outputs by name (arrays the caller owns)."""
        self._require_loaded("infer()")
        started = time.perf_counter()
        outputs = self._run(check_feeds(self._inputs, feeds))
        elapsed_ms = (time.perf_counter() - started) * 1e3
        self.last_infer_ms = elapsed_ms
        self._times.append(elapsed_ms)
        self._calls += 1
        return outputs

    def timing_summary(self) -> dict[str, float]:
        """Recent ``infer`` wall times: count (all calls), p50/p99/max/mean over the recent window."""
        recent = list(self._times)
        return {
            "calls": float(self._calls),
            "window": float(len(recent)),
            "last_ms": self.last_infer_ms,
            "p50_ms": percentile(recent, 50),
            "p99_ms": percentile(recent, 99),
            "max_ms": max(recent) if recent else math.nan,
            "mean_ms": sum(recent) / len(recent) if recent else math.nan,
        }

    # -- subclass hooks ------------------------------------------------------------------------
    @abc.abstractmethod
    def _load(self) -> None: ...

    @abc.abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

    def __repr__(self) -> str:
        state = "loaded" if self._loaded else "not loaded"
        return f"<{type(self).__name__} {self.describe_model()} {self.precision} {state}>"
