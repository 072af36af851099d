"""ZeroMQ streaming pipeline: source -> workers -> sinks, latest frame wins.

Modules: protocol (wire format, docs/PROTOCOL.md), nodes (source, worker, hub), recorder, viewer,
client (Subscriber for integrators), supervisor (run_pipeline, restarts), security (CURVE, keys),
builtins (test processors and a synthetic source), cli (``edge-runtime run``).

The common entry points are importable from here; each is loaded on first use so that importing
``edge_runtime.pipeline.protocol`` alone stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "run_pipeline": "supervisor", "Supervisor": "supervisor", "PipelineConfig": "supervisor",
    "PipelineReport": "supervisor", "SourceSpec": "supervisor", "RuntimeProcessor": "supervisor",
    "Endpoints": "nodes", "NodeSettings": "nodes", "Subscriber": "client", "Reorderer": "client",
    "SecurityConfig": "security", "BuiltinProcessor": "builtins", "SyntheticSource": "builtins",
    "read_records": "recorder",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
