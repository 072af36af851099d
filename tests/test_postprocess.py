"""Post-processing: detection decoding + NMS, enhancement back to the frame, tiling, masks."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edge_runtime.errors import BackendError, BundleError, InputError
from edge_runtime.frames import Frame
from edge_runtime.postprocess import Postprocessor, enhance_tiled, nms
from edge_runtime.preprocess import Preprocessor


def _centernet_outputs() -> dict[str, np.ndarray]:
    heat = np.zeros((1, 2, 8, 8), np.float32)
    size = np.zeros((1, 2, 8, 8), np.float32)
    off = np.zeros((1, 2, 8, 8), np.float32)
    heat[0, 0, 2, 3] = 0.9  # class 0 peak
    heat[0, 0, 2, 4] = 0.6  # its neighbour: not a 3x3 maximum -> no detection
    heat[0, 0, 6, 6] = 0.2  # below threshold
    heat[0, 1, 5, 1] = 0.7  # class 1 peak
    heat[0, 1, 5, 3] = 0.65  # class 1, a separate peak whose box overlaps the one above
    size[0, :, 2, 3] = (8, 4)
    off[0, :, 2, 3] = (0.5, 0.25)
    size[0, :, 5, 1] = (10, 10)
    size[0, :, 5, 3] = (10, 10)
    off[0, :, 5, 3] = (-0.5, 0.0)  # centre at x = 2.5 * 4 = 10 vs 4: IoU 4/16 ... see below
    return {"heatmap": heat, "size": size, "offset": off}


def test_centernet_decode_and_nms_hand_computed() -> None:
    spec = {"type": "centernet", "stride": 4, "classes": ["cyst", "solid"], "score_threshold": 0.3,
            "nms_iou": 0.5, "max_detections": 10}
    pre = Preprocessor({})
    frame = Frame(np.zeros((32, 32), np.uint8))
    _, m = pre(frame)
    dets = Postprocessor(spec)(_centernet_outputs(), m, frame).detections
    # class 0: centre ((3 + .5) * 4, (2 + .25) * 4) = (14, 9), size 8 x 4
    assert [d.label for d in dets] == ["cyst", "solid", "solid"]
    np.testing.assert_allclose(dets[0].box, (10, 7, 18, 11))
    assert dets[0].score == pytest.approx(0.9)
    # class 1: (4, 20) and (10, 20), 10 x 10; intersection 4*10 = 40, union 160 -> IoU 0.25 < 0.5: both kept
    np.testing.assert_allclose(dets[1].box, (0, 15, 9, 25))  # x0 = -1 clipped to the frame
    np.testing.assert_allclose(dets[2].box, (5, 15, 15, 25))
    # A stricter NMS removes the lower-scoring overlapping box of the same class only.
    spec["nms_iou"] = 0.2
    dets = Postprocessor(spec)(_centernet_outputs(), m, frame).detections
    assert [(d.label, round(d.score, 2)) for d in dets] == [("cyst", 0.9), ("solid", 0.7)]


def test_centernet_boxes_map_back_through_letterbox() -> None:
    spec = {"type": "centernet", "stride": 4, "classes": ["a", "b"], "score_threshold": 0.3}
    pre = Preprocessor({"resize": {"mode": "letterbox", "size": [32, 32]}})
    frame = Frame(np.zeros((40, 80), np.uint8))  # scale 0.4, content 16 x 32 at offset_y 8
    _, m = pre(frame)
    dets = Postprocessor(spec)(_centernet_outputs(), m, frame).detections
    # class 0 box in the tensor (10, 7, 18, 11) -> ((10, 7-8, 18, 11-8) / 0.4), y clipped at 0
    np.testing.assert_allclose(dets[0].box, (25, 0, 45, 7.5))


@pytest.mark.parametrize("few", [0, 10**6])  # every candidate by numpy / one by one in Python
@pytest.mark.parametrize("kernel", [2, 3, 5])
def test_centernet_peaks_equal_a_dilation_reference(kernel: int, few: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The candidate-only peak search finds exactly the cells cv2.dilate's max-pool finds,
    on heatmaps with plateaus (ties) and peaks on the border, in both of its ways."""
    import cv2

    import edge_runtime.postprocess as pp

    monkeypatch.setattr(pp, "FEW_CANDIDATES", few)

    rng = np.random.default_rng(kernel)
    spec = {"type": "centernet", "stride": 1, "classes": ["a", "b", "c"], "score_threshold": 0.5,
            "nms_iou": 1.0, "max_detections": 10_000, "peak_kernel": kernel}
    frame = Frame(np.zeros((16, 12), np.uint8))
    _, m = Preprocessor({})(frame)
    for _ in range(20):
        heat = np.round(rng.random((1, 3, 16, 12)), 1).astype(np.float32)  # coarse values: many ties
        outs = {"heatmap": heat, "size": np.full((1, 2, 16, 12), 0.5, np.float32),
                "offset": np.zeros((1, 2, 16, 12), np.float32)}
        got = {(d.label, round(d.box[0] + 0.25), round(d.box[1] + 0.25))
               for d in Postprocessor(spec)(outs, m, frame).detections}
        want = set()
        for c, label in enumerate(spec["classes"]):
            plane = heat[0, c]
            peaks = (plane >= 0.5) & (plane == cv2.dilate(plane, np.ones((kernel, kernel), np.uint8)))
            want |= {(label, int(x), int(y)) for y, x in zip(*np.nonzero(peaks))}
        assert got == want


def test_centernet_decodes_a_few_candidates_as_it_decodes_many(monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to FEW_CANDIDATES cells above the threshold are decoded in plain Python, more with numpy:
    the same detections, boxes, scores and order either way (ties included), through a letterbox."""
    import edge_runtime.postprocess as pp

    rng = np.random.default_rng(7)
    spec = {"type": "centernet", "stride": 4, "classes": ["a", "b"], "score_threshold": 0.3,
            "nms_iou": 0.5, "max_detections": 5}
    frame = Frame(np.zeros((50, 70), np.uint8))
    _, m = Preprocessor({"resize": {"mode": "letterbox", "size": [64, 64]}})(frame)
    for trial in range(30):
        heat = np.round(rng.random((1, 2, 16, 16)) * rng.uniform(0.3, 1.0), 2).astype(np.float32)
        outs = {"heatmap": heat, "size": rng.uniform(-2, 30, (1, 2, 16, 16)).astype(np.float32),
                "offset": rng.uniform(-1, 1, (1, 2, 16, 16)).astype(np.float32)}
        got = {}
        for few in (0, 10**6):
            monkeypatch.setattr(pp, "FEW_CANDIDATES", few)
            got[few] = [(d.label, d.score, d.box) for d in Postprocessor(spec)(outs, m, frame).detections]
        assert got[0] == got[10**6] and (trial > 0 or got[0]), trial


def test_nms_is_class_wise_and_orders_by_score() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]], float)
    scores = np.array([0.8, 0.9, 0.7, 0.5])
    cls = np.array([0, 0, 1, 0])
    # IoU(0, 1) = 81 / 119 = 0.68 > 0.5: box 0 suppressed by box 1; box 2 is another class.
    assert nms(boxes, scores, cls, 0.5).tolist() == [1, 2, 3]
    assert nms(boxes, scores, cls, 0.7).tolist() == [1, 0, 2, 3]
    assert nms(boxes, scores, cls, 0.5, max_detections=2).tolist() == [1, 2]


def test_yolov8_layout_decoded() -> None:
    # [1, 4 + 2, N]: rows cx, cy, w, h, score(class0), score(class1)
    preds = np.array([
        [50, 50, 20, 10, 0.9, 0.1],
        [52, 50, 20, 10, 0.8, 0.05],  # overlaps the first, same class -> suppressed
        [50, 50, 20, 10, 0.1, 0.6],  # same place, other class -> kept
        [10, 10, 4, 4, 0.2, 0.1],  # below threshold
    ], np.float32)
    spec = {"type": "yolov8", "classes": ["cyst", "solid"], "score_threshold": 0.25, "nms_iou": 0.5}
    pre = Preprocessor({"resize": {"mode": "letterbox", "size": [128, 128]}})
    frame = Frame(np.zeros((64, 128), np.uint8))  # scale 1, offset_y 32
    _, m = pre(frame)
    for out in (preds.T[None], preds[None]):  # the common layout and its transposed variant
        dets = Postprocessor(spec)({"output0": out}, m, frame).detections
        assert [(d.label, round(d.score, 2)) for d in dets] == [("cyst", 0.9), ("solid", 0.6)]
        np.testing.assert_allclose(dets[0].box, (40, 13, 60, 23))
    with pytest.raises(InputError, match="YOLOv8"):
        Postprocessor(spec)({"output0": np.zeros((1, 7, 5), np.float32)}, m, frame)


def test_enhance_back_to_uint16_12_bit_range_and_size() -> None:
    rng = np.random.default_rng(1)
    px = rng.integers(0, 4096, (300, 200), dtype=np.uint16)
    frame = Frame(px, modality="DX", bits_stored=12)
    pre = Preprocessor({"resize": {"mode": "none", "multiple": 16}}, bits_stored=12)
    x, m = pre(frame)
    assert x.shape == (1, 1, 304, 208)
    post = Postprocessor({"type": "enhance"}, preprocess=pre)
    out = post({"enhanced": x}, m, frame).enhanced
    assert out.dtype == np.uint16 and out.shape == (300, 200)
    np.testing.assert_array_equal(out, px)  # identity model -> identical pixels
    y = x * 2.0  # out-of-range predictions clip to the 12-bit maximum
    out = post({"enhanced": y}, m, frame).enhanced
    assert out.max() == 4095
    # MONOCHROME1: inverted for the model, inverted back for the result.
    f1 = Frame(px, modality="DX", bits_stored=12, photometric="MONOCHROME1")
    x1, m1 = pre(f1)
    np.testing.assert_array_equal(post({"enhanced": x1}, m1, f1).enhanced, px)
    # A window and MONOCHROME1 together (the window meets the inverted values, 4095 - v): values inside
    # the window come back exactly, the rest clipped.
    pre_w = Preprocessor({"window": {"center": 2000, "width": 1001}, "resize": {"mode": "none", "multiple": 16}},
                         bits_stored=12)
    xw, mw = pre_w(f1)
    out = Postprocessor({"type": "enhance"}, preprocess=pre_w)({"enhanced": xw}, mw, f1).enhanced
    inv, out_inv = 4095 - px.astype(int), 4095 - out.astype(int)
    inside = (inv >= 1500) & (inv <= 2499)  # 2500 lies at the clipped edge (1499.5 .. 2499.5)
    np.testing.assert_array_equal(out[inside], px[inside])
    assert out_inv[inv < 1500].min() >= 1499 and out_inv[inv > 2500].max() <= 2501
    # Resized models: the result comes back at the frame's size.
    pre_r = Preprocessor({"resize": {"mode": "letterbox", "size": [128, 128]}}, bits_stored=12)
    xr, mr = pre_r(frame)
    out = Postprocessor({"type": "enhance"}, preprocess=pre_r)([xr], mr, frame).enhanced
    assert out.shape == (300, 200) and np.abs(out.astype(float) - px).mean() < 1200  # content, not padding


def _conv_model(path: str) -> ort.InferenceSession:
    """A fully convolutional identity-like ONNX model: 3x3 conv, centre 0.9, ring 0.0125."""
    w = np.full((1, 1, 3, 3), 0.0125, np.float32)
    w[0, 0, 1, 1] = 0.9
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["enhanced"], pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, "h", "w"])],
        [helper.make_tensor_value_info("enhanced", TensorProto.FLOAT, [1, 1, "h", "w"])],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, path)
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def test_tiled_enhancement_equals_untiled(tmp_path) -> None:
    sess = _conv_model(str(tmp_path / "conv.onnx"))

    def run(t: np.ndarray) -> np.ndarray:
        return sess.run(None, {"image": t})[0]

    x = np.random.default_rng(2).random((1, 1, 200, 300), dtype=np.float32)
    whole = run(x)
    tiled = enhance_tiled(run, x, tile=64, overlap=16)
    assert tiled.shape == whole.shape
    np.testing.assert_allclose(tiled, whole, atol=2e-3)
    assert np.abs(enhance_tiled(run, x, tile=64, overlap=0) - whole).max() > 1e-3  # seams without overlap
    np.testing.assert_array_equal(enhance_tiled(run, x[:, :, :64, :64], 64, 16), run(x[:, :, :64, :64]))


def test_the_last_tiles_blend_spans_its_whole_overlap() -> None:
    """The last tile is aligned to the frame's end, so it often overlaps its neighbour far more than
    ``overlap``; blending over ``overlap`` only gave full weight to outputs near its edge, where a model
    lacks context (the shipped enhancers: seams of 13/255 and 112/4095 on 1100 x 1100 frames)."""
    import cv2

    def run(t: np.ndarray) -> np.ndarray:  # 15 px of context each side: wrong within 15 px of a tile edge
        return cv2.blur(t[0, 0], (31, 31), borderType=cv2.BORDER_CONSTANT)[None, None]

    x = np.random.default_rng(0).random((1, 1, 100, 100)).astype(np.float32)  # tiles at 0 and 36: 28 px shared
    seams = np.abs(enhance_tiled(run, x, 64, 8) - run(x)).max()
    assert seams < 0.08, seams  # 0.068 with the blend over the 28 px shared, 0.125 over 8


def test_segmentation_logits_to_masks_and_contours() -> None:
    frame = Frame(np.zeros((40, 80), np.uint8))
    pre = Preprocessor({"resize": {"mode": "letterbox", "size": [32, 32]}})
    _, m = pre(frame)  # content rows 8..24
    logits = np.full((1, 1, 32, 32), -5.0, np.float32)
    logits[0, 0, 12:20, 8:16] = 5.0  # -> original rows 10..30, cols 20..40
    masks, contours = Postprocessor({"type": "segmentation"}).segment(logits, m)
    assert masks.shape == (1, 40, 80) and masks.dtype == np.uint8
    ys, xs = np.nonzero(masks[0])
    assert abs(ys.min() - 10) <= 1 and abs(ys.max() - 29) <= 1 and abs(xs.min() - 20) <= 1
    assert len(contours[0]) == 1
    two = np.stack([-logits[0, 0], logits[0, 0]])[None]  # softmax over 2 classes
    masks, _ = Postprocessor({"type": "segmentation", "activation": "softmax"}).segment(two, m)
    assert masks.shape == (2, 40, 80) and np.all(masks.sum(axis=0) == 1)


def test_bad_specs_are_bundle_errors() -> None:
    with pytest.raises(BundleError, match="type"):
        Postprocessor({"type": "ssd"})
    with pytest.raises(BundleError, match="iou_threshold"):
        Postprocessor({"type": "centernet", "classes": ["a"], "iou_threshold": 0.5})
    with pytest.raises(BundleError, match="classes"):
        Postprocessor({"type": "yolov8"})


def test_manifest_mistakes_are_bundle_errors_at_load_not_key_errors_per_frame() -> None:
    with pytest.raises(BundleError, match="postprocess.tile: expected a 'size'"):
        Postprocessor({"type": "enhance", "tile": {"overlap": 8}})
    for tile in ({"size": 0}, {"size": 64, "overlap": 64}, {"size": 64, "overlap": -1}):
        with pytest.raises(BundleError, match="size > 0 and 0 <= overlap < size"):
            Postprocessor({"type": "enhance", "tile": tile})
    with pytest.raises(BundleError, match="max_detections: expected an integer >= 1"):
        Postprocessor({"type": "centernet", "classes": ["a"], "max_detections": 0})
    with pytest.raises(BundleError, match=r"postprocess.outputs: unknown key\(s\) \['boxes'\]"):
        Postprocessor({"type": "centernet", "classes": ["a"], "outputs": {"boxes": "b"}})
    # Values that failed on every frame (numpy ValueError, ZeroDivisionError), or silently found nothing.
    for key, value, what in (("peak_kernel", 0, "an integer >= 1"), ("stride", 0, "an integer >= 1"),
                             ("stride", -4, "an integer >= 1"), ("score_threshold", 2, r"a number in \(0, 1\]"),
                             ("score_threshold", None, r"a number in \(0, 1\]"), ("nms_iou", 1.5, r"a number in \[0, 1\]"),
                             ("stride", 2.5, "an integer >= 1"), ("max_detections", True, "an integer >= 1"),
                             ("stride", float("nan"), "an integer >= 1"), ("peak_kernel", float("inf"), "an integer")):
        with pytest.raises(BundleError, match=rf"postprocess.{key}: expected {what}"):
            Postprocessor({"type": "centernet", "classes": ["a"], key: value})
    for threshold in (1.0, 1.5, -0.2, 0):
        with pytest.raises(BundleError, match=r"postprocess.threshold: expected a number in \(0, 1\)"):
            Postprocessor({"type": "segmentation", "threshold": threshold})
    with pytest.raises(BundleError, match="postprocess.activation: expected 'sigmoid' or 'softmax'"):
        Postprocessor({"type": "segmentation", "activation": "softmx"})


def test_nan_or_inf_in_a_detectors_output_is_a_backend_error_not_no_findings() -> None:
    """An all-NaN heatmap gave no detections and no error (NaN >= threshold is false): a broken
    engine or an FP16 overflow would read as "no lesion". YOLOv8: argmax picked a NaN class score
    and hid a 0.95 box; an infinite width gave a box across the frame."""
    spec = {"type": "centernet", "stride": 4, "classes": ["cyst", "solid"], "score_threshold": 0.3}
    frame = Frame(np.zeros((32, 32), np.uint8))
    _, m = Preprocessor({})(frame)
    post = Postprocessor(spec)
    assert len(post(_centernet_outputs(), m, frame).detections) == 3
    for tensor, cell, value in (("heatmap", (0, 0, 0, 0), np.nan), ("heatmap", (0, 1, 7, 7), np.inf),
                                ("heatmap", (0, 1, 7, 7), -np.inf),
                                ("size", (0, 0, 2, 3), np.nan), ("offset", (0, 1, 5, 1), np.inf)):
        outs = _centernet_outputs()
        outs[tensor][cell] = value
        with pytest.raises(BackendError, match="expected finite .* from the model, found 'NaN or infinite values'"):
            post(outs, m, frame)
    yolo = Postprocessor({"type": "yolov8", "classes": ["a", "b"], "score_threshold": 0.25})
    out = np.zeros((1, 6, 3), np.float32)
    out[0, :, 0] = (10, 10, 4, 4, np.nan, 0.95)
    with pytest.raises(BackendError, match="finite class scores"):
        yolo({"output0": out}, m, frame)
    out[0, :, 0] = (10, 10, np.inf, 4, 0.05, 0.95)
    with pytest.raises(BackendError, match="finite boxes"):
        yolo({"output0": out}, m, frame)
    out[0, :, 0] = (10, 10, 4, 4, 0.05, 0.95)
    assert [d.label for d in yolo({"output0": out}, m, frame).detections] == ["b"]
    assert yolo({"output0": np.zeros((1, 6, 0), np.float32)}, m, frame).detections == []  # no rows: none


def test_a_heatmap_of_logits_is_a_backend_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A detector exported without its heatmap's sigmoid gave no findings (or false ones) without a
    word (a review); scores above 1 now say what the model gave, in both peak paths."""
    import edge_runtime.postprocess as pp

    spec = {"type": "centernet", "stride": 4, "classes": ["cyst", "solid"], "score_threshold": 0.3}
    frame = Frame(np.zeros((32, 32), np.uint8))
    _, m = Preprocessor({})(frame)
    outs = _centernet_outputs()
    outs["heatmap"][0, 0, 2, 3] = 4.2  # a logit
    for few in (0, 10**6):
        monkeypatch.setattr(pp, "FEW_CANDIDATES", few)
        with pytest.raises(BackendError, match="heatmap scores in 0..1 .* found 'a score of 4.2'"):
            Postprocessor(spec)(outs, m, frame)
    outs["heatmap"][0, 0, 2, 3] = 1.0
    assert len(Postprocessor(spec)(outs, m, frame).detections) == 3


def test_centernet_outputs_can_rename_some_tensors() -> None:
    """docs/BUNDLE.md's own example renames only the heatmap: the other two keep their names."""
    spec = {"type": "centernet", "stride": 4, "classes": ["cyst", "solid"], "score_threshold": 0.3,
            "outputs": {"heatmap": "hm"}}
    outs = _centernet_outputs()
    outs["hm"] = outs.pop("heatmap")
    frame = Frame(np.zeros((32, 32), np.uint8))
    _, m = Preprocessor({})(frame)
    dets = Postprocessor(spec)(outs, m, frame).detections
    assert [d.label for d in dets] == ["cyst", "solid", "solid"]


def test_nan_in_an_enhancement_output_is_an_error_not_a_black_pixel() -> None:
    px = np.full((16, 16), 1000, np.uint16)
    frame = Frame(px, modality="DX", bits_stored=12)
    pre = Preprocessor({}, bits_stored=12)
    x, m = pre(frame)
    post = Postprocessor({"type": "enhance"}, preprocess=pre)
    x[0, 0, 3, 4] = np.nan
    x[0, 0, 5, 5] = np.nan
    with pytest.raises(BackendError, match="expected finite model output, found '2 NaN values of 256'"):
        post({"enhanced": x}, m, frame)
    fx = Frame(px.astype(np.float32), modality="DX", bits_stored=12)  # float frames too
    with pytest.raises(BackendError, match="NaN"):
        post({"enhanced": x}, m, fx)


def test_float_frames_come_back_within_the_range_the_model_was_given() -> None:
    """Float frames (signed or fractionally rescaled storage) were returned unclipped: an enhancer's
    over- and undershoot gave values below 0 and above 2**bits - 1, which the frame cannot hold."""
    px = np.linspace(0, 2047, 16 * 16, dtype=np.float32).reshape(16, 16)
    frame = Frame(px, modality="DX", bits_stored=12)
    pre = Preprocessor({"resize": {"mode": "none", "multiple": 16}}, bits_stored=12)
    x, m = pre(frame)
    post = Postprocessor({"type": "enhance"}, preprocess=pre)
    np.testing.assert_allclose(post({"enhanced": x}, m, frame).enhanced, px, atol=1e-3)  # identity
    out = post({"enhanced": x * 4.0 - 0.5}, m, frame).enhanced
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 4095.0
    pre_w = Preprocessor({"window": {"center": 1000, "width": 501}, "resize": {"mode": "none", "multiple": 16}},
                         bits_stored=12)
    xw, mw = pre_w(frame)
    out = Postprocessor({"type": "enhance"}, preprocess=pre_w)({"enhanced": xw * 3.0 - 0.5}, mw, frame).enhanced
    assert out.min() == pytest.approx(1000 - 0.5 - 250) and out.max() == pytest.approx(1000 - 0.5 + 250)
