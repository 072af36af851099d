"""The wire format (docs/PROTOCOL.md is the normative text; this module implements it).

A message is a ZeroMQ multipart message ``[header, payload...]``:

- ``header``: one UTF-8 JSON object. JSON, not a binary struct, because any language reads it and it
  costs ~8 us to encode and ~14 us to decode and fully validate, against ~760 us for one 2 MiB
  frame hop between processes over ipc (benchmarks/bench_transport.py; PROTOCOL.md section 9).
- ``payload``: raw C-contiguous little-endian pixels, one part per array, described by the header.
  Arrays are sent with ``copy=False`` (pyzmq copies below its 64 KiB ``copy_threshold`` and shares
  the buffer above it) and received as views into the ZeroMQ message, so a frame is never copied by
  Python on either side.
- optionally (process mode, one host) the pixels of a frame go through a shared-memory slot
  (``ShmRing`` at the source, ``ShmMap`` at the worker) and the message is the header alone.

Every receive path validates the whole message before building anything from it and raises
``BadMessage`` (a ``ProtocolError`` with a short ``reason`` code that nodes count). Nothing is ever
pickled.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import zmq

from ..errors import InputError, ProtocolError, expected
from ..frames import PHOTOMETRICS, STREAM_ID_RE, Frame, GroundTruth
from ..results import Detection, Result

PROTOCOL_VERSION = 1
MSG_TYPES = ("frame", "result", "stats", "error", "event", "credit", "heartbeat")
# Explicit little-endian dtypes: the wire is little-endian whatever the host is.
WIRE_DTYPES: dict[str, np.dtype] = {
    "uint8": np.dtype("<u1"),
    "uint16": np.dtype("<u2"),
    "float32": np.dtype("<f4"),
}
LITTLE_ENDIAN_HOST = sys.byteorder == "little"
RESULT_PARTS = ("enhanced", "masks", "input")
STREAM_RE = STREAM_ID_RE  # fullmatch: see edge_runtime.frames
STREAM_RULE = "a stream id of 1-64 characters from [A-Za-z0-9_.:-]"
SHORT_TEXT = 256  # longest label / reason / id accepted
MAP_TEXT = 1024  # longest string value in a map (provenance of several models joined by '+')


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts. ``max_message_bytes`` is also set as ZMQ_MAXMSGSIZE (per part)."""

    max_dim: int = 8192
    max_channels: int = 4
    max_message_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_detections: int = 1024
    max_masks: int = 256
    max_map_entries: int = 64  # stamps, timings_ms, provenance, counters


DEFAULT_LIMITS = Limits()


class BadMessage(ProtocolError):
    """A message that breaks docs/PROTOCOL.md. ``reason`` is a short code nodes count by."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass
class Message:
    """A decoded, validated message. ``frame``/``result`` are set for those types."""

    type: str
    header: dict[str, Any]
    frame: Frame | None = None
    result: Result | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # result parts by name
    shm: dict[str, Any] | None = None  # a frame whose pixels are in shared memory: its validated reference


# --------------------------------------------------------------------------- encoding


# The reference encoder, built once. ensure_ascii=False: text goes out as UTF-8, as orjson writes it.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def _dumps(header: Mapping[str, Any], *, finite: bool = False) -> bytes:
    """Compact UTF-8 JSON. orjson encodes a result header ~10x faster than the standard library (JSON
    was a quarter of the per-frame interpreter time of a thread-mode pipeline), but writes NaN and
    infinities as ``null`` instead of refusing them, and refuses numpy scalars, integers beyond 64
    bits and text that is not valid Unicode. So a header that came out with a ``null`` in it (unless
    the caller says every float in it was checked: ``finite``), or that orjson refused, is encoded
    again by the standard library with allow_nan=False: NaN is still refused at the sender. Lone
    surrogates (undecodable file names in an error text) are sent as "?": receivers refuse them.
    """
    try:
        out = orjson.dumps(header)
        if finite or b"null" not in out:
            return out
    except (orjson.JSONEncodeError, TypeError):
        pass
    try:
        return _ENCODER.encode(header).encode("utf-8", "replace")
    except ValueError as exc:  # NaN/inf in a score or a timing: a bug upstream, refuse to send it
        raise ProtocolError(expected("finite numbers in the header", str(exc))) from exc


def wire_desc(array: np.ndarray) -> dict[str, Any]:
    """The part descriptor of ``array`` on the wire (its dtype checked against the whitelist)."""
    name = array.dtype.name
    if name not in WIRE_DTYPES:
        raise ProtocolError(expected(f"dtype in {sorted(WIRE_DTYPES)}", name))
    return {"dtype": name, "shape": list(array.shape)}


def wire_array(array: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """A C-contiguous little-endian view (copied only when needed) and its part descriptor."""
    desc = wire_desc(array)
    if array.flags.c_contiguous and (array.dtype.byteorder in "<|" or (array.dtype.isnative and LITTLE_ENDIAN_HOST)):
        return array, desc  # the common case: already what the wire wants, send it as it is
    return np.ascontiguousarray(array, dtype=WIRE_DTYPES[desc["dtype"]]), desc


def header(msg_type: str, **fields: Any) -> dict[str, Any]:
    if msg_type not in MSG_TYPES:
        raise ProtocolError(expected(f"message type in {MSG_TYPES}", msg_type))
    return {"v": PROTOCOL_VERSION, "type": msg_type, **fields}


def encode_control(msg_type: str, **fields: Any) -> list[bytes]:
    """credit / heartbeat / stats / error / event: a header with no payload."""
    return [_dumps(header(msg_type, **fields))]


def _truth_dict(truth: GroundTruth | None) -> dict[str, Any] | None:
    if truth is None:
        return None
    return {"boxes": [[round(float(v), 2) for v in b] for b in truth.boxes], "labels": list(truth.labels)}


def check_stream_id(stream: str) -> str:
    """``stream`` if receivers accept it as a stream id, else ProtocolError: a frame with any other id
    would be rejected by every worker (``bad_header``), so it is refused before it is sent. The
    message shows at most 64 characters of the value (ids often come from file names)."""
    if STREAM_RE.fullmatch(stream):
        return stream
    shown = stream[:64] + ("..." if len(stream) > 64 else "")
    raise ProtocolError(f"{expected(STREAM_RULE, shown)} ({len(stream)} characters)")


def encode_frame(frame: Frame, shm: Mapping[str, Any] | None = None) -> list[Any]:
    """``[header, pixels]`` for a Frame (ground-truth boxes travel, masks and clean images do not).

    ``shm``: the pixels were written to a shared-memory slot (``ShmRing.write``): the header carries
    that reference instead and the message is ``[header]`` alone (docs/PROTOCOL.md 3.1), and the
    pixels are not converted again (the caller gave the slot their wire form).
    """
    pixels, desc = (None, wire_desc(frame.pixels)) if shm is not None else wire_array(frame.pixels)
    spacing = None if frame.pixel_spacing is None else [float(v) for v in frame.pixel_spacing]
    truth = _truth_dict(frame.truth)
    # The only floats of a frame header: checked here, so _dumps may keep orjson's bytes although
    # "spacing" is null whenever the spacing is unknown (the common case).
    floats = (spacing or []) + [v for b in (truth or {}).get("boxes", []) for v in b]
    if not all(math.isfinite(v) for v in floats):
        raise ProtocolError(expected("finite spacing and ground-truth boxes", floats[:8]))
    h = header(
        "frame", stream=check_stream_id(str(frame.stream_id)), seq=int(frame.seq), capture_ns=int(frame.capture_ns),
        modality=frame.modality, dtype=desc["dtype"], bits_stored=int(frame.bits_stored or 0),
        shape=desc["shape"], photometric=frame.photometric, spacing=spacing,
        stamps={k: int(v) for k, v in frame.stamps.items()},
    )
    if truth is not None:
        h["truth"] = truth
    if shm is not None:
        h["shm"] = dict(shm)
        return [_dumps(h, finite=True)]
    return [_dumps(h, finite=True), pixels]


def encode_result(result: Result, *, worker: str = "", frame: Frame | None = None,
                  attach_input: bool = False) -> list[Any]:
    """``[header, part...]`` for a Result; ``frame`` supplies display metadata and optionally pixels."""
    parts: list[Any] = []
    descs: list[dict[str, Any]] = []
    arrays = [("enhanced", result.enhanced), ("masks", result.masks)]
    if attach_input and frame is not None:
        arrays.append(("input", frame.pixels))
    for name, array in arrays:
        if array is None:
            continue
        if name == "masks":
            array = np.asarray(array).astype(np.uint8, copy=False)
        wire, desc = wire_array(array)
        descs.append({"name": name, **desc})
        parts.append(wire)
    h = header(
        "result", stream=str(result.stream_id), seq=int(result.seq), capture_ns=int(result.capture_ns),
        worker=worker, detections=[d.to_dict() for d in result.detections], parts=descs,
        provenance={str(k): str(v) for k, v in result.provenance.items()},
        timings_ms={str(k): round(float(v), 4) for k, v in result.timings_ms.items()},
        stamps={str(k): int(v) for k, v in result.stamps.items()},
    )
    if frame is not None:
        h.update(modality=frame.modality, bits_stored=int(frame.bits_stored or 0),
                 photometric=frame.photometric)
        truth = _truth_dict(frame.truth)
        if truth is not None:
            h["truth"] = truth
    return [_dumps(h), *parts]


def send(sock: zmq.Socket, parts: Sequence[Any], flags: int = 0) -> None:
    """Send a multipart message; arrays go zero-copy (pyzmq copies small parts itself)."""
    sock.send_multipart(list(parts), flags=flags, copy=False)


def encode_header(h: Mapping[str, Any]) -> bytes:
    """Re-encode a (validated, possibly re-stamped) header; forwarders keep the payload parts as-is."""
    return _dumps(h)


# --------------------------------------------------------------------------- validation helpers


def _bytes(part: Any) -> memoryview:
    if isinstance(part, zmq.Frame):
        return part.buffer
    return memoryview(part)


def _field(h: Mapping[str, Any], name: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    if name not in h or h[name] is None:
        if optional:
            if isinstance(h, dict):
                # JSON null reads as absent, in the header the receiver goes on to use too: a hub or
                # recorder doing h.setdefault("stamps", {}) must not find None there and crash.
                h.pop(name, None)
            return None
        raise BadMessage("bad_header", expected(f"field {name!r}", "nothing"))
    value = h[name]
    # bool is an int subclass in Python but not in JSON: refuse true/false where numbers belong.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise BadMessage("bad_header", expected(f"{name!r} of type {kind}", value))
    if not isinstance(value, kind):
        raise BadMessage("bad_header", expected(f"{name!r} of type {kind}", type(value).__name__))
    return value


def _int(h: Mapping[str, Any], name: str, lo: int = 0, hi: int = 2**63 - 1, optional: bool = False) -> Any:
    value = _field(h, name, int, optional=optional)
    if value is not None and not lo <= value <= hi:
        raise BadMessage("bad_header", expected(f"{name!r} in {lo}..{hi}", value))
    return value


def _text(h: Mapping[str, Any], name: str, optional: bool = False, limit: int = SHORT_TEXT) -> Any:
    value = _field(h, name, str, optional=optional)
    if value is not None and len(value) > limit:
        raise BadMessage("bad_header", expected(f"{name!r} of at most {limit} characters", len(value)))
    return value


def _map(h: Mapping[str, Any], name: str, kind: type | tuple[type, ...], limits: Limits) -> dict[str, Any]:
    value = _field(h, name, dict, optional=True) or {}
    if len(value) > limits.max_map_entries:
        raise BadMessage("bad_header", expected(f"{name!r} with <= {limits.max_map_entries} entries",
                                                len(value)))
    for k, v in value.items():
        if len(k) > 64 or isinstance(v, bool) or not isinstance(v, kind):
            raise BadMessage("bad_header", expected(f"{name!r} entries str -> {kind}", (k[:64], type(v).__name__)))
        if isinstance(v, float) and not math.isfinite(v):
            raise BadMessage("bad_header", expected(f"finite {name!r} values", v))
        if isinstance(v, str) and len(v) > MAP_TEXT:
            raise BadMessage("bad_header", expected(f"{name!r} values of <= {MAP_TEXT} chars", len(v)))
    return dict(value)


def _array_desc(desc: Mapping[str, Any], limits: Limits, *, masks: bool = False) -> tuple[np.dtype, tuple[int, ...]]:
    """Check dtype and shape of a part; returns the wire dtype and the shape."""
    dtype_name = desc.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in WIRE_DTYPES:
        raise BadMessage("bad_dtype", expected(f"dtype in {sorted(WIRE_DTYPES)}", dtype_name))
    if masks and dtype_name != "uint8":
        raise BadMessage("bad_dtype", expected("masks of dtype uint8", dtype_name))
    shape = desc.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
        raise BadMessage("bad_shape", expected("shape as a list of integers", shape))
    if masks:
        if len(shape) != 3 or not 0 <= shape[0] <= limits.max_masks:
            raise BadMessage("bad_shape", expected(f"masks shape [N<={limits.max_masks}, H, W]", shape))
        dims = shape[1:]
    else:
        if len(shape) not in (2, 3) or (len(shape) == 3 and not 1 <= shape[2] <= limits.max_channels):
            raise BadMessage("bad_shape", expected(f"shape [H, W] or [H, W, C<={limits.max_channels}]", shape))
        dims = shape[:2]
    if not all(1 <= n <= limits.max_dim for n in dims):
        raise BadMessage("dims_too_large", expected(f"every dimension in 1..{limits.max_dim}", shape))
    dtype = WIRE_DTYPES[dtype_name]
    if math.prod(shape) * dtype.itemsize > limits.max_message_bytes:
        raise BadMessage("message_too_large", expected(f"a part of <= {limits.max_message_bytes} bytes",
                                                       math.prod(shape) * dtype.itemsize))
    return dtype, tuple(shape)


def _array(part: Any, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    buf = _bytes(part)
    size = math.prod(shape) * dtype.itemsize
    if buf.nbytes != size:
        raise BadMessage("payload_size", expected(f"{size} payload bytes (shape x itemsize)", buf.nbytes))
    # A view into the ZeroMQ message (no copy; over inproc it is the sender's own memory), so it is
    # read-only: processors must not modify their input in place.
    array = np.frombuffer(buf, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)
    array.flags.writeable = False
    return array


def _stamps(h: Mapping[str, Any], limits: Limits) -> dict[str, int]:
    stamps = _map(h, "stamps", int, limits)
    if any(v < 0 for v in stamps.values()):
        raise BadMessage("bad_header", expected("non-negative stamps", stamps))
    return stamps


def _truth(h: Mapping[str, Any], limits: Limits) -> GroundTruth | None:
    t = _field(h, "truth", dict, optional=True)
    if t is None:
        return None
    boxes, labels = t.get("boxes"), t.get("labels")
    if not isinstance(boxes, list) or not isinstance(labels, list) or len(boxes) > limits.max_detections:
        raise BadMessage("bad_header", expected("truth {boxes: [[x0,y0,x1,y1]...], labels: [...]}", type(t)))
    for box in boxes:  # each one, before any reshape: 16000 numbers are not 4000 boxes of a 1024 limit
        _check_box(box, limits, "truth box")
    try:
        return GroundTruth(boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                           labels=[str(v)[:SHORT_TEXT] for v in labels])
    except (ValueError, TypeError, InputError) as exc:
        raise BadMessage("bad_header", expected("truth boxes of 4 numbers with one label each", str(exc))) from exc


# --------------------------------------------------------------------------- decoding


def decode_header(part: Any, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Parse and check the fields every message has: size, JSON object, version, type."""
    buf = _bytes(part)
    if buf.nbytes > limits.max_header_bytes:
        raise BadMessage("header_too_large", expected(f"a header of <= {limits.max_header_bytes} bytes", buf.nbytes))
    try:
        h = orjson.loads(buf)  # strict RFC 8259: no NaN/Infinity literals, invalid UTF-8 refused
    except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
        raise BadMessage("bad_header", expected("a UTF-8 JSON object", type(exc).__name__)) from exc
    if not isinstance(h, dict):
        raise BadMessage("bad_header", expected("a JSON object", type(h).__name__))
    version = h.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise BadMessage("bad_version", expected(f"protocol version {PROTOCOL_VERSION}", version))
    if h.get("type") not in MSG_TYPES:
        raise BadMessage("bad_type", expected(f"type in {MSG_TYPES}", h.get("type")))
    return h


def _check_parts(parts: Sequence[Any], n: int, limits: Limits) -> None:
    if len(parts) != n:
        raise BadMessage("bad_parts", expected(f"{n} message parts", len(parts)))
    total = sum(_bytes(p).nbytes for p in parts)
    if total > limits.max_message_bytes + limits.max_header_bytes:
        raise BadMessage("message_too_large", expected(f"a message of <= {limits.max_message_bytes} bytes", total))


def _stream_seq(h: Mapping[str, Any]) -> tuple[str, int, int]:
    stream = _text(h, "stream", limit=64)
    if not STREAM_RE.fullmatch(stream):
        raise BadMessage("bad_header", expected(STREAM_RULE, stream[:64]))
    return stream, _int(h, "seq"), _int(h, "capture_ns")


def decode_frame(h: dict[str, Any], parts: Sequence[Any], limits: Limits = DEFAULT_LIMITS,
                 shm: ShmMap | None = None) -> Frame:
    ref = h.get("shm")
    _check_parts(parts, 1 if ref is not None else 2, limits)
    stream, seq, capture_ns = _stream_seq(h)
    dtype, shape = _array_desc(h, limits)
    photometric = _text(h, "photometric")
    if photometric not in PHOTOMETRICS:
        raise BadMessage("bad_header", expected(f"photometric in {PHOTOMETRICS}", photometric))
    spacing = _field(h, "spacing", list, optional=True)
    if spacing is not None and (len(spacing) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in spacing)):
        raise BadMessage("bad_header", expected("spacing [row_mm, col_mm] of positive numbers", spacing))
    bits = _int(h, "bits_stored", 0, 32)
    if ref is not None:
        if shm is None:
            raise BadMessage("shm_unavailable", expected("inline pixels (this receiver maps no shared memory)", "shm"))
        pixels = _array(shm.view(ref, math.prod(shape) * dtype.itemsize), dtype, shape)
    else:
        pixels = _array(parts[1], dtype, shape)
    try:
        return Frame(pixels=pixels, modality=_text(h, "modality", limit=16), bits_stored=bits or None,
                     photometric=photometric, pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
                     stream_id=stream, seq=seq, capture_ns=capture_ns, truth=_truth(h, limits),
                     stamps=_stamps(h, limits))
    except InputError as exc:  # e.g. 4 channels, or RGB with 2-D pixels: the Frame refuses it
        raise BadMessage("bad_frame", str(exc)) from exc


def _check_box(box: Any, limits: Limits, what: str = "detection box") -> tuple[float, float, float, float]:
    """[x0, y0, x1, y1] of finite numbers within 4 x max_dim of the image: a sink draws it (OpenCV
    refuses coordinates beyond int32, which used to crash the recorder and the viewer)."""
    bound = 4 * limits.max_dim
    if (not isinstance(box, list) or len(box) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= bound
            for v in box)):
        raise BadMessage("bad_header", expected(f"{what} [x0, y0, x1, y1] of finite numbers within +-{bound}", box))
    return float(box[0]), float(box[1]), float(box[2]), float(box[3])


def _detections(h: Mapping[str, Any], limits: Limits) -> list[Detection]:
    raw = _field(h, "detections", list, optional=True) or []
    if len(raw) > limits.max_detections:
        raise BadMessage("bad_header", expected(f"<= {limits.max_detections} detections", len(raw)))
    out = []
    for d in raw:
        box = _check_box(d.get("box") if isinstance(d, dict) else None, limits)
        score = d.get("score")
        if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
            raise BadMessage("bad_header", expected("a finite detection score", score))
        out.append(Detection(box=box, score=float(score), label=_text(d, "label")))
    return out


def decode_result(h: dict[str, Any], parts: Sequence[Any], limits: Limits = DEFAULT_LIMITS
                  ) -> tuple[Result, dict[str, np.ndarray]]:
    stream, seq, capture_ns = _stream_seq(h)
    descs = _field(h, "parts", list, optional=True) or []
    _check_parts(parts, 1 + len(descs), limits)
    arrays: dict[str, np.ndarray] = {}
    for desc, part in zip(descs, parts[1:]):
        name = desc.get("name") if isinstance(desc, dict) else None
        if name not in RESULT_PARTS or name in arrays:
            raise BadMessage("bad_parts", expected(f"distinct part names in {RESULT_PARTS}", name))
        dtype, shape = _array_desc(desc, limits, masks=name == "masks")
        arrays[name] = _array(part, dtype, shape)
    _text(h, "worker", optional=True)
    # What the worker copied from the frame, for sinks to display it (viewer, recorder): checked as
    # the frame's own fields are, since a sink computes with them (2 ** bits_stored).
    _int(h, "bits_stored", 0, 32, optional=True)
    photometric = _text(h, "photometric", optional=True)
    if photometric is not None and photometric not in PHOTOMETRICS:
        raise BadMessage("bad_header", expected(f"photometric in {PHOTOMETRICS}", photometric))
    _text(h, "modality", optional=True, limit=16)
    _truth(h, limits)
    result = Result(stream_id=stream, seq=seq, capture_ns=capture_ns, detections=_detections(h, limits),
                    enhanced=arrays.get("enhanced"), masks=arrays.get("masks"),
                    timings_ms=_map(h, "timings_ms", (int, float), limits),
                    provenance=_map(h, "provenance", str, limits), stamps=_stamps(h, limits))
    return result, arrays


def decode(parts: Sequence[Any], limits: Limits = DEFAULT_LIMITS, shm: ShmMap | None = None) -> Message:
    """Validate and decode any message; raises BadMessage with a reason code.

    ``shm``: where a worker maps shared-memory frames; without it such a frame is rejected (``shm_unavailable``).
    """
    if not parts:
        raise BadMessage("bad_parts", expected("at least a header part", 0))
    h = decode_header(parts[0], limits)
    kind = h["type"]
    if kind == "frame":
        return Message(kind, h, frame=decode_frame(h, parts, limits, shm), shm=h.get("shm"))
    if kind == "result":
        result, arrays = decode_result(h, parts, limits)
        return Message(kind, h, result=result, arrays=arrays)
    _check_parts(parts, 1, limits)
    if kind == "heartbeat":
        _text(h, "node", limit=128)
        if h.get("state") not in ("idle", "busy", "serving"):
            raise BadMessage("bad_header", expected("heartbeat state idle, busy or serving", h.get("state")))
    if kind == "credit" or (kind == "heartbeat" and h["state"] != "serving"):  # from a worker
        _text(h, "worker", limit=128)
        _int(h, "done")
        _int(h, "window", 0, 64)  # 0: a worker about to leave (takes no more frames)
    elif kind in ("stats", "event", "error"):
        _text(h, "node", limit=128)
        if kind == "event":
            _text(h, "event", limit=64)
        if kind == "error":
            _text(h, "reason", limit=64)
    return Message(kind, h)


# --------------------------------------------------------------------------- shared-memory payloads (3.1)

SHM_DIR = "/dev/shm"  # where POSIX shm_open() names live on Linux
SHM_PREFIX = "edge-"
# Only segments a ShmRing made ("edge-<source pid>-<12 hex>"): a header cannot make a worker map
# another program's (or another pipeline's differently named) shared memory.
SHM_NAME_RE = re.compile(r"^edge-\d{1,10}-[0-9a-f]{12}$")
SHM_ALIGN = 4096  # slots start on page boundaries


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class ShmRing:
    """The source's side of the optional same-host payload path: ``slots`` fixed-size slots in one
    POSIX shared-memory segment, plus one little-endian uint64 generation per slot.

    Layout: generations at byte ``8 * i`` (the first page(s)), slot ``i``'s pixels at
    ``data_offset + i * slot_bytes``. A slot is handed out by ``alloc``, filled by ``write`` and given
    back by ``release`` only when the worker that received it reported that frame done (its credit),
    so a slot is never rewritten while a worker may read it. ``write`` zeroes the generation before
    copying and sets a new, never reused, one after: a reader that sees the generation of its header
    before and after using the pixels knows they were not overwritten meanwhile (docs/PROTOCOL.md 3.1).
    """

    def __init__(self, slot_bytes: int, slots: int) -> None:
        from multiprocessing import shared_memory

        if slots < 1 or slot_bytes < 1:
            raise ProtocolError(expected("at least one slot of at least one byte", (slots, slot_bytes)))
        self.slots = slots
        self.slot_bytes = _round_up(slot_bytes, SHM_ALIGN)
        self.data_offset = _round_up(8 * slots, SHM_ALIGN)
        name = f"{SHM_PREFIX}{os.getpid()}-{os.urandom(6).hex()}"
        # Mode 0600 (Python's default for shm_open): only processes of the same user map it. If this
        # process dies without close(), the supervisor unlinks it (unlink_orphans), since the
        # resource tracker of a spawned node is the supervisor's and lives on.
        size = self.data_offset + slots * self.slot_bytes
        self.segment = shared_memory.SharedMemory(name=name, create=True, size=size)
        self.name = self.segment.name.lstrip("/")
        try:
            # tmpfs allocates pages lazily: without this, a full /dev/shm would surface as SIGBUS on
            # the first write instead of an error the source can answer by sending inline.
            fd = os.open(os.path.join(SHM_DIR, self.name), os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError:
            self.segment.close()
            self.segment.unlink()
            raise
        self._gens = np.ndarray((slots,), dtype="<u8", buffer=self.segment.buf)
        self._gens[:] = 0
        self._data = np.ndarray((slots * self.slot_bytes,), dtype=np.uint8, buffer=self.segment.buf,
                                offset=self.data_offset)
        self._free: list[int] = list(range(slots - 1, -1, -1))
        self._gen = 0

    @property
    def free(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        """A free slot, or None when every slot is still held by a worker (send inline then)."""
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.slots or slot in self._free:
            raise ProtocolError(expected("a held slot to release", slot))
        self._free.append(slot)

    def write(self, slot: int, array: np.ndarray) -> dict[str, int | str]:
        """Copy a wire array (C-contiguous, little-endian: ``wire_array``) into ``slot``; its reference."""
        if array.nbytes > self.slot_bytes:
            raise ProtocolError(expected(f"a frame of <= {self.slot_bytes} bytes for this ring", array.nbytes))
        start = slot * self.slot_bytes
        self._gens[slot] = 0  # "being written": a reader still holding an older generation sees it change
        np.copyto(self._data[start:start + array.nbytes], array.reshape(-1).view(np.uint8))
        self._gen += 1
        self._gens[slot] = self._gen
        return {"name": self.name, "offset": self.data_offset + start, "gen_offset": 8 * slot, "gen": self._gen}

    def generation(self, slot: int) -> int:
        return int(self._gens[slot])

    def close(self) -> None:
        """Unlink the segment. Workers that still map it keep their mapping until they drop it."""
        del self._gens, self._data
        self.segment.close()
        try:
            self.segment.unlink()
        except FileNotFoundError:
            pass


def unlink_orphans(pid: int) -> list[str]:
    """Unlink the segments a source process ``pid`` left behind (it was killed or crashed); returns
    their names. Workers that still map one keep their mapping; the memory goes with the last one."""
    gone: list[str] = []
    for name, owner in _segments():
        if owner == pid:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                gone.append(name)
            except OSError:
                continue
            _untrack(name)
    return gone


def _segments() -> list[tuple[str, int]]:
    """Our segments in SHM_DIR (names as ShmRing makes them) with the pid of the source that made each."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    return [(name, int(m.group(1))) for name in names
            if (m := re.match(rf"{re.escape(SHM_PREFIX)}(\d+)-", name)) and SHM_NAME_RE.match(name)]


def _untrack(name: str) -> None:
    """Tell the resource tracker (the supervisor's, which its spawned sources share) that a segment
    unlinked here is gone: else it warns of "leaked shared_memory objects" at exit and fails to unlink
    them again."""
    try:
        from multiprocessing import resource_tracker

        resource_tracker.unregister(f"/{name}", "shared_memory")
    except Exception:  # noqa: BLE001, S110 - bookkeeping only: the segment is gone either way
        pass


def sweep_dead_owners() -> list[str]:
    """Unlink this user's segments whose source process no longer exists (a whole pipeline SIGKILLed
    leaves them: no supervisor was left to unlink them); the pid is in the name. Run at a start."""
    gone: list[str] = []
    for name, owner in _segments():
        path = os.path.join(SHM_DIR, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            os.kill(owner, 0)
            continue  # its owner lives (a pipeline running now)
        except ProcessLookupError:
            pass
        except OSError:  # PermissionError: a process of another user has that pid: not ours to judge
            continue
        try:
            os.unlink(path)
            gone.append(name)
        except OSError:
            pass
    return gone


class ShmMap:
    """The worker's side: read-only mappings of the segments that frame headers name.

    ``view`` validates a reference (name, bounds, current generation) and returns the pixels in
    place; ``intact`` tells whether the slot still holds that generation (checked after processing).
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep  # segments kept mapped (a restarted source makes a new one)
        self._maps: dict[str, mmap.mmap] = {}

    def _open(self, name: str) -> mmap.mmap:
        m = self._maps.get(name)
        if m is not None:
            return m
        import stat

        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise BadMessage("shm_unavailable", expected("a shared-memory segment this process can open", name)) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size == 0:
                raise BadMessage("shm_unavailable", expected("a non-empty segment owned by this user", name))
            m = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
        except (OSError, ValueError) as exc:
            raise BadMessage("shm_unavailable", expected("a mappable shared-memory segment", name)) from exc
        finally:
            os.close(fd)
        for old in list(self._maps)[:max(0, len(self._maps) - self.keep + 1)]:
            try:
                self._maps[old].close()
                del self._maps[old]
            except BufferError:  # a frame of that segment is still in use: close it later
                pass
        self._maps[name] = m
        return m

    @staticmethod
    def _ref(ref: Any) -> tuple[str, int, int, int]:
        if not isinstance(ref, dict):
            raise BadMessage("bad_shm", expected("shm {name, offset, gen_offset, gen}", type(ref).__name__))
        name = ref.get("name")
        if not isinstance(name, str) or not SHM_NAME_RE.match(name):
            raise BadMessage("bad_shm", expected("a segment name edge-<pid>-<12 hex digits>", str(name)[:64]))
        values: list[int] = []
        for key in ("offset", "gen_offset", "gen"):
            v = ref.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**63:
                raise BadMessage("bad_shm", expected(f"an integer {key} in 0..2^63-1", v))
            values.append(v)
        offset, gen_offset, gen = values
        if gen == 0 or gen_offset % 8:
            raise BadMessage("bad_shm", expected("gen >= 1 and an 8-aligned gen_offset", (gen, gen_offset)))
        return name, offset, gen_offset, gen

    def view(self, ref: Any, nbytes: int) -> memoryview:
        name, offset, gen_offset, gen = self._ref(ref)
        m = self._open(name)
        if offset + nbytes > len(m) or gen_offset + 8 > len(m):
            raise BadMessage("bad_shm", expected(f"a slot inside the {len(m)}-byte segment", (offset, nbytes)))
        if int.from_bytes(m[gen_offset:gen_offset + 8], "little") != gen:
            raise BadMessage("bad_shm", expected(f"slot generation {gen}", "a rewritten slot"))
        return memoryview(m)[offset:offset + nbytes]

    def intact(self, ref: Mapping[str, Any]) -> bool:
        """The slot still holds the generation the header named (nothing overwrote it meanwhile)."""
        m = self._maps.get(ref["name"])
        g = int(ref["gen_offset"])
        return m is not None and not m.closed and int.from_bytes(m[g:g + 8], "little") == ref["gen"]

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:
                pass
        self._maps.clear()
