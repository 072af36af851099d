"""One exception hierarchy for the whole product.

Every error says what was expected and what was found, so that a person at a cart or in CI can
act on the message alone. Validation raises these explicitly; it never uses ``assert``.
"""

from __future__ import annotations

import re

WARN_SAME_REASON = 3  # items skipped for one reason that are logged one by one; the rest are counted


class EdgeRuntimeError(Exception):
    """Base class of every error the runtime and the export toolchain raise on purpose."""


class ConfigError(EdgeRuntimeError):
    """A device config, a CLI option or a pipeline config is missing, malformed or out of range."""


class InputError(EdgeRuntimeError):
    """A source cannot be read, or a frame is not what a stage expects (dtype, shape, modality)."""


class UnsupportedFormatError(InputError):
    """A file is readable but uses an encoding this install cannot decode (e.g. a DICOM transfer syntax)."""


class BundleError(EdgeRuntimeError):
    """A model bundle is missing, malformed, or fails verification (hash mismatch, unknown field)."""


class BackendError(EdgeRuntimeError):
    """An inference backend cannot load a model or run it (missing provider, engine mismatch)."""


class ExportError(EdgeRuntimeError):
    """A step of the export toolchain refused its input or failed (calibration, lint, build)."""


class AccuracyGateError(ExportError):
    """A quantised or compiled model lost more task accuracy than the manifest tolerates."""


class ProtocolError(EdgeRuntimeError):
    """A wire message does not follow docs/PROTOCOL.md (version, dtype, dims, payload size)."""


def expected(what: str, found: object) -> str:
    """The house style for error messages: ``expected X, found Y``."""
    return f"expected {what}, found {found!r}"


def describe_error(exc: BaseException) -> str:
    """``exc`` as text for logs, events and records: an OSError without its file name (the name can
    be a patient identifier: OSError's own text carries it), anything else as it is (sources' own
    errors name no file)."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc)


def reason_key(message: str) -> str:
    """A refusal's reason whatever values it names (numbers -> N; digits inside names such as
    MONOCHROME1 kept): skips for the same reason are logged WARN_SAME_REASON times, then counted."""
    return re.sub(r"(?<![A-Za-z0-9])\d+(\.\d+)?", "N", message)
