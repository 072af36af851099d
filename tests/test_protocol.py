"""Wire protocol: round trips, byte order, zero-copy views, and every rejection reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.errors import ProtocolError
from edge_runtime.frames import Frame, GroundTruth
from edge_runtime.pipeline import protocol
from edge_runtime.pipeline.protocol import BadMessage, Limits
from edge_runtime.results import Detection, Result


def _frame(pixels: np.ndarray, **kw: object) -> Frame:
    return Frame(pixels=pixels, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("pixels, photometric, bits", [
    (np.arange(12 * 10, dtype=np.uint8).reshape(12, 10), "MONOCHROME2", 8),
    (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 30, "MONOCHROME1", 12),
    (np.linspace(0, 1, 12 * 10 * 3, dtype=np.float32).reshape(12, 10, 3), "RGB", 32),
])
def test_frame_round_trip_keeps_pixels_and_metadata(pixels: np.ndarray, photometric: str, bits: int) -> None:
    frame = _frame(pixels, modality="XR", bits_stored=bits, photometric=photometric, pixel_spacing=(0.2, 0.25),
                   stream_id="cart-1.probe", seq=41, capture_ns=123456789,
                   truth=GroundTruth(boxes=[[1, 2, 5, 6]], labels=["nodule"]), stamps={"capture": 123456789})
    parts = protocol.encode_frame(frame)
    header = json.loads(parts[0])
    assert header["v"] == 1 and header["type"] == "frame" and header["shape"] == list(pixels.shape)
    m = protocol.decode([bytes(parts[0]), np.asarray(parts[1]).tobytes()])
    out = m.frame
    assert out is not None
    np.testing.assert_array_equal(out.pixels, pixels)
    assert out.pixels.dtype == pixels.dtype
    assert (out.modality, out.bits_stored, out.photometric) == ("XR", bits, photometric)
    assert out.pixel_spacing == (0.2, 0.25)
    assert (out.stream_id, out.seq, out.capture_ns) == ("cart-1.probe", 41, 123456789)
    assert out.stamps == {"capture": 123456789}
    assert out.truth is not None and out.truth.labels == ["nodule"]
    np.testing.assert_allclose(out.truth.boxes, [[1, 2, 5, 6]])


def test_big_endian_and_strided_arrays_go_out_little_endian_and_contiguous() -> None:
    native = (np.arange(64 * 64, dtype=np.uint16) * 7).reshape(64, 64)
    wire, desc = protocol.wire_array(native.astype(">u2"))  # e.g. an enhanced image from a big-endian model
    assert desc == {"dtype": "uint16", "shape": [64, 64]}
    assert wire.tobytes() == native.astype("<u2").tobytes()
    strided = native[::2, ::2]
    parts = protocol.encode_frame(_frame(strided, bits_stored=16))
    assert parts[1].flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(protocol.decode([parts[0], parts[1].tobytes()]).frame.pixels, strided)


def test_received_pixels_are_a_read_only_view_of_the_message() -> None:
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://proto-zero-copy")
        b.connect("inproc://proto-zero-copy")
        pixels = np.random.default_rng(1).integers(0, 4096, (256, 256), dtype=np.uint16)  # 128 KiB: zero-copy
        protocol.send(a, protocol.encode_frame(_frame(pixels, bits_stored=12)))
        assert b.poll(2000)
        msg = b.recv_multipart(copy=False)
        frame = protocol.decode(msg).frame
        assert frame is not None
        assert np.shares_memory(frame.pixels, np.frombuffer(msg[1].buffer, np.uint16))
        assert not frame.pixels.flags.writeable
        np.testing.assert_array_equal(frame.pixels, pixels)
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


def test_result_round_trip_with_all_parts() -> None:
    frame = _frame(np.full((8, 6), 100, np.uint16), bits_stored=10, stream_id="s", seq=3, capture_ns=7)
    result = Result(stream_id="s", seq=3, capture_ns=7,
                    detections=[Detection(box=(1.0, 2.0, 4.0, 5.0), score=0.875, label="cyst")],
                    enhanced=np.full((8, 6), 200, np.uint16), masks=np.ones((2, 8, 6), np.uint8),
                    timings_ms={"infer": 1.5}, provenance={"model": "m", "bundle_sha256": "ab" * 32,
                                                           "backend": "onnxruntime", "precision": "int8"},
                    stamps={"capture": 7, "worker_recv": 9})
    parts = protocol.encode_result(result, worker="w0.0", frame=frame, attach_input=True)
    m = protocol.decode([bytes(parts[0]), *(np.asarray(p).tobytes() for p in parts[1:])])
    assert m.type == "result" and m.result is not None
    r = m.result
    assert (r.stream_id, r.seq, r.capture_ns) == ("s", 3, 7)
    assert r.detections == [Detection(box=(1.0, 2.0, 4.0, 5.0), score=0.875, label="cyst")]
    np.testing.assert_array_equal(r.enhanced, result.enhanced)
    np.testing.assert_array_equal(r.masks, result.masks)
    np.testing.assert_array_equal(m.arrays["input"], frame.pixels)
    assert r.provenance["precision"] == "int8" and r.timings_ms == {"infer": 1.5}
    assert m.header["worker"] == "w0.0" and m.header["bits_stored"] == 10


def test_control_messages_round_trip() -> None:
    for kind, fields in (("credit", {"worker": "w", "done": 0, "window": 1}),
                         ("heartbeat", {"node": "w", "worker": "w", "done": 5, "window": 2, "state": "busy"}),
                         ("heartbeat", {"node": "source", "state": "serving"}),
                         ("event", {"node": "supervisor", "event": "node_exit", "exitcode": -9}),
                         ("error", {"node": "w", "reason": "processor_error", "seq": 4}),
                         ("stats", {"node": "source", "drops": {"superseded": 3}})):
        m = protocol.decode(protocol.encode_control(kind, **fields))
        assert m.type == kind and all(m.header[k] == v for k, v in fields.items())


def _valid_frame_parts() -> tuple[dict, bytes]:
    parts = protocol.encode_frame(_frame(np.zeros((4, 5), np.uint16), bits_stored=12))
    return json.loads(parts[0]), np.asarray(parts[1]).tobytes()


@pytest.mark.parametrize("mutate, reason", [
    (lambda h, p: ({**h, "v": 2}, p), "bad_version"),
    (lambda h, p: ({**h, "v": True}, p), "bad_version"),
    (lambda h, p: ({**h, "type": "frames"}, p), "bad_type"),
    (lambda h, p: ({**h, "dtype": "int32"}, p), "bad_dtype"),
    (lambda h, p: ({**h, "dtype": "float64"}, p), "bad_dtype"),
    (lambda h, p: ({**h, "shape": [4, 5, 1, 1]}, p), "bad_shape"),
    (lambda h, p: ({**h, "shape": [4, 5, 1]}, p), "bad_frame"),  # 1 channel, not HxWx3: Frame refuses
    (lambda h, p: ({**h, "shape": [4, 5, 6]}, p), "bad_shape"),  # more than 4 channels
    (lambda h, p: ({**h, "shape": [100000, 10]}, p), "dims_too_large"),
    (lambda h, p: ({**h, "shape": [0, 10]}, p), "dims_too_large"),
    (lambda h, p: ({**h, "dtype": "float32", "shape": [8192, 8192, 4]}, p), "message_too_large"),
    (lambda h, p: (h, p[:-2]), "payload_size"),
    (lambda h, p: ({**h, "seq": -1}, p), "bad_header"),
    (lambda h, p: ({**h, "seq": "7"}, p), "bad_header"),
    (lambda h, p: ({k: v for k, v in h.items() if k != "capture_ns"}, p), "bad_header"),
    (lambda h, p: ({**h, "stream": "a/b"}, p), "bad_header"),
    (lambda h, p: ({**h, "photometric": "YBR_FULL"}, p), "bad_header"),
    (lambda h, p: ({**h, "spacing": [0.1, -1]}, p), "bad_header"),
    (lambda h, p: ({**h, "stamps": {"capture": "now"}}, p), "bad_header"),
    (lambda h, p: ({**h, "bits_stored": 16, "dtype": "uint8", "shape": [4, 10]}, p), "bad_frame"),
])
def test_malformed_frames_are_rejected_with_a_reason(mutate, reason: str) -> None:
    header, payload = _valid_frame_parts()
    h, p = mutate(header, payload)
    with pytest.raises(BadMessage) as info:
        protocol.decode([json.dumps(h).encode(), p])
    assert info.value.reason == reason
    assert isinstance(info.value, ProtocolError)


@pytest.mark.parametrize("parts, reason", [
    ([], "bad_parts"),
    ([b"\xff\xfe not json"], "bad_header"),
    ([b"[1, 2, 3]"], "bad_header"),
    ([b"{" + b" " * (70 * 1024) + b"}"], "header_too_large"),
    ([protocol.encode_control("credit", worker="w", done=0, window=1)[0], b"extra"], "bad_parts"),
    ([protocol.encode_control("credit", worker="w", done=0, window=65)[0]], "bad_header"),
    ([protocol.encode_control("heartbeat", node="w", worker="w", done=0, window=1, state="asleep")[0]], "bad_header"),
])
def test_malformed_messages_are_rejected(parts: list, reason: str) -> None:
    with pytest.raises(BadMessage) as info:
        protocol.decode(parts)
    assert info.value.reason == reason


def test_frame_without_its_payload_part_is_rejected() -> None:
    header, _ = _valid_frame_parts()
    with pytest.raises(BadMessage) as info:
        protocol.decode([json.dumps(header).encode()])
    assert info.value.reason == "bad_parts"


def test_result_part_descriptors_are_checked() -> None:
    result = Result(stream_id="s", seq=1, capture_ns=1, enhanced=np.zeros((4, 4), np.uint8))
    header, payload = protocol.encode_result(result)
    h = json.loads(header)
    for parts_desc, reason in (([{**h["parts"][0], "name": "secret"}], "bad_parts"),
                               ([{**h["parts"][0], "shape": [4, 5]}], "payload_size"),
                               ([h["parts"][0], h["parts"][0]], "bad_parts")):
        with pytest.raises(BadMessage) as info:
            protocol.decode([json.dumps({**h, "parts": parts_desc}).encode(), payload.tobytes()])
        assert info.value.reason == reason
    masks = Result(stream_id="s", seq=1, capture_ns=1, masks=np.zeros((300, 2, 2), np.uint8))
    header, payload = protocol.encode_result(masks)
    with pytest.raises(BadMessage) as info:
        protocol.decode([header, payload.tobytes()])
    assert info.value.reason == "bad_shape"  # more masks than Limits.max_masks


def test_limits_are_configurable() -> None:
    header, payload = _valid_frame_parts()
    with pytest.raises(BadMessage) as info:
        protocol.decode([json.dumps(header).encode(), payload], Limits(max_dim=4))
    assert info.value.reason == "dims_too_large"


def test_encoding_refuses_what_the_protocol_cannot_carry() -> None:
    bad = Result(stream_id="s", seq=1, capture_ns=1, detections=[Detection((0, 0, 1, 1), float("nan"), "x")])
    with pytest.raises(ProtocolError):
        protocol.encode_result(bad)
    with pytest.raises(ProtocolError):
        protocol.wire_array(np.zeros((2, 2), np.int32))


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                     | st.text(max_size=8), lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


_in_range = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False)
                         | st.text(max_size=8), lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(value=_in_range)
def test_what_senders_write_receivers_read_back(value: object) -> None:
    """The fast encoder (orjson, with the standard library behind it) writes what the receivers' parser
    reads back to the value json.loads gives: nulls and non-ASCII text included; infinities refused."""
    h = protocol.header("event", node="n", event="e", value=value)
    try:
        reference = json.dumps(h, allow_nan=False)
    except ValueError:
        with pytest.raises(ProtocolError):
            protocol._dumps(h)
        return
    assert protocol.decode_header(protocol._dumps(h)) == json.loads(reference)


def test_big_integers_and_undecodable_text_still_encode() -> None:
    """orjson refuses both; the fallback writes them (lone surrogates, e.g. from a file name that is
    not UTF-8, as '?', since receivers refuse unpaired surrogates)."""
    h = protocol.header("event", node="n", event="e", big=2**70, error="caf\udce9.png")
    out = protocol._dumps(h)
    assert json.loads(out)["big"] == 2**70
    assert protocol.decode_header(out)["error"] == "caf?.png"
    with pytest.raises(protocol.BadMessage):
        protocol.decode_header(b'{"v":1,"type":"event","error":"\\ud800"}')


@pytest.mark.parametrize(("change", "what"), [
    ({"detections": [{"box": [0, 0, 3e9, 3e9], "score": 0.9, "label": "x"}]}, "within"),  # beyond cv2's int32
    ({"bits_stored": "12"}, "bits_stored"),  # a sink computes 2 ** bits_stored
    ({"bits_stored": 4096}, "bits_stored"),
    ({"photometric": "CMYK"}, "photometric"),
    ({"modality": "X" * 40}, "modality"),
    ({"truth": {"boxes": [[0] * 16000], "labels": [""] * 4000}}, "truth box"),  # 4000 boxes past a 1024 limit
])
def test_a_result_header_a_sink_computes_with_is_checked(change: dict, what: str) -> None:
    """Results the protocol used to accept and that then crashed the recorder (--video) and the viewer,
    which the supervisor restarted until it gave up on the whole pipeline."""
    frame = _frame(np.full((8, 6), 100, np.uint16), bits_stored=10, stream_id="s", seq=3, capture_ns=7)
    result = Result(stream_id="s", seq=3, capture_ns=7, enhanced=np.zeros((8, 6), np.uint16))
    parts = protocol.encode_result(result, frame=frame)
    h = json.loads(bytes(parts[0]))
    h.update(change)
    with pytest.raises(BadMessage, match=what):
        protocol.decode([json.dumps(h).encode(), *(np.asarray(p).tobytes() for p in parts[1:])])


def test_frames_without_spacing_send_null_and_nan_boxes_are_refused() -> None:
    frame = Frame(pixels=np.zeros((2, 3), np.uint8), stream_id="s", seq=1)
    assert json.loads(protocol.encode_frame(frame)[0])["spacing"] is None
    assert protocol.decode(protocol.encode_frame(frame)).frame.pixel_spacing is None  # type: ignore[union-attr]
    frame.truth = GroundTruth(boxes=np.array([[0, 0, np.nan, 1]]), labels=["x"])
    with pytest.raises(ProtocolError):
        protocol.encode_frame(frame)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(["v", "type", "stream", "seq", "capture_ns", "modality", "dtype", "bits_stored",
                            "shape", "photometric", "spacing", "stamps", "truth", "extra"]), value=_json,
       cut=st.integers(0, 40))
def test_fuzzed_headers_raise_only_bad_message(key: str, value: object, cut: int) -> None:
    """Whatever a peer sends, a receiver gets a Frame or a BadMessage: never another exception."""
    header, payload = _valid_frame_parts()
    header[key] = value
    try:
        m = protocol.decode([json.dumps(header).encode(), payload[: len(payload) - cut]])
        assert m.frame is not None
    except BadMessage as exc:
        assert exc.reason
