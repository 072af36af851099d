"""Inference backends behind one base class, and the choice between them.

Importing this package imports neither onnxruntime nor tensorrt/pycuda: each backend imports its
library in ``load()``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ..errors import BackendError, ConfigError, expected
from .base import Backend, TensorSpec, check_feeds
from .onnxruntime import OrtBackend
from .tensorrt import TrtBackend, tensorrt_available

__all__ = ["BACKENDS", "Backend", "OrtBackend", "TensorSpec", "TrtBackend", "check_feeds", "select_backend"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt")


def select_backend(
    preference: str = "auto",
    *,
    onnx_path: str | Path | None = None,
    engine_path: str | Path | None = None,
    precision: str = "fp32",
    threads: int = 0,
    providers: str | Sequence[str] = "auto",
    device_index: int = 0,
    spinning: bool | str = "off",
    cuda_graphs: bool = False,
    dla_core: int | None = None,
    allow_host_code: bool = False,
) -> Backend:
    """Pick a backend (not loaded yet) and log why.

    ``auto``: TensorRT when an engine file exists and TensorRT, pycuda and a CUDA device are there;
    otherwise ONNX Runtime on ``onnx_path``. ``tensorrt`` / ``onnxruntime`` force one (and fail
    with a clear message when it cannot run). ``allow_host_code``: the engine is version-compatible
    and trusted (it carries TensorRT's lean runtime as host code; see TrtBackend).
    """
    if preference not in BACKENDS:
        raise ConfigError(f"backend: {expected(f'one of {BACKENDS}', preference)}")
    engine = Path(engine_path) if engine_path is not None else None
    if preference in ("auto", "tensorrt"):
        ok, why = tensorrt_available()
        if ok and engine is not None and engine.is_file():
            log.info("backend: tensorrt (%s, engine %s)", why, engine.name)
            return TrtBackend(engine, device_index=device_index, precision=precision, use_cuda_graph=cuda_graphs,
                              dla_core=dla_core, allow_host_code=allow_host_code)
        reason = why if not ok else ("no engine given" if engine is None else f"no engine at {engine}")
        if preference == "tensorrt":
            raise BackendError(f"backend tensorrt: expected TensorRT, a GPU and an engine, found {reason}")
        log.info("backend: onnxruntime (TensorRT not used: %s)", reason)
    if onnx_path is None:
        raise BackendError("backend onnxruntime: expected an ONNX model path, found none")
    return OrtBackend(onnx_path, threads=threads, providers=providers, precision=precision, device_id=device_index,
                      spinning=spinning)
