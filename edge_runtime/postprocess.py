"""Manifest-driven post-processing: raw model outputs -> detections / enhanced pixels / masks.

Decoding lives here, not in the graphs, so that one ONNX file serves every backend and the
thresholds stay editable in the manifest. Everything returned is in the ORIGINAL frame's pixel
coordinates, dtype and range, using the PixelMapping the pre-processor produced.

Supported ``postprocess.type`` values (docs/BUNDLE.md): ``centernet`` (our reference
detectors), ``yolov8`` (the common YOLOv8/YOLO11 ONNX export, ``[1, 4 + C, N]``), ``enhance``
(image to image) and ``segmentation`` (per-class logits).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from .errors import BackendError, BundleError, InputError, expected
from .frames import Frame
from .preprocess import PixelMapping, _check_keys
from .results import Detection

TYPES = ("centernet", "yolov8", "enhance", "segmentation")
FEW_CANDIDATES = 64  # heatmap cells above the threshold decoded one by one in Python (more: numpy)
CENTERNET_OUTPUTS = ("heatmap", "size", "offset")  # in the graph's output order
DETECTION_KEYS = {"type", "classes", "score_threshold", "nms_iou", "max_detections"}
KEYS = {
    "centernet": DETECTION_KEYS | {"stride", "peak_kernel", "outputs"},
    "yolov8": DETECTION_KEYS | {"output"},
    "enhance": {"type", "output", "tile"},
    "segmentation": {"type", "output", "classes", "activation", "threshold"},
}


def _number(spec: Mapping[str, Any], key: str, default: float, kind: type, what: str,
            ok: Callable[[Any], bool]) -> Any:
    """spec[key] (or the default) as ``kind`` if ``ok``, else a BundleError naming the key."""
    value = spec.get(key, default)
    try:
        fine = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
            and (kind is not int or value == int(value)) and ok(kind(value))
    except OverflowError:  # an integer beyond a float (JSON allows it)
        fine = False
    if not fine:
        raise BundleError(f"postprocess.{key}: " + expected(what, value))
    return kind(value)


def _finite(value: float | np.ndarray, what: str) -> None:
    """A model output that is NaN or infinite is the backend's failure (an FP16 overflow, a broken
    engine), never "no findings": NaN scores compare false with every threshold."""
    if not np.isfinite(value).all():
        raise BackendError(expected(f"finite {what} from the model", "NaN or infinite values"))


@dataclass
class Decoded:
    """What post-processing produced for one frame (the runtime copies it into a Result)."""

    detections: list[Detection] = field(default_factory=list)
    enhanced: np.ndarray | None = None  # input frame's dtype, range and size
    masks: np.ndarray | None = None  # uint8 (C, H, W), 0/1, original frame size
    contours: list[list[np.ndarray]] | None = None  # per class, cv2.findContours point arrays


def nms(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, iou: float,
        max_detections: int = 0) -> np.ndarray:
    """Class-wise NMS (OpenCV's NMSBoxesBatched): indices kept, best score first."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    xywh = np.array(boxes, np.float64)  # a copy: x0, y0, x1, y1 -> x, y, w, h in place
    xywh[:, 2:] -= xywh[:, :2]
    return np.asarray(_nms_xywh(xywh, np.asarray(scores), np.asarray(class_ids), iou, max_detections), np.int64)


def _nms_xywh(xywh: Any, scores: Any, class_ids: Any, iou: float, max_detections: int) -> list[int]:
    """OpenCV's class-wise NMS on (x, y, w, h) boxes given as arrays or lists: kept indices, best score
    first (ties in OpenCV's order), at most ``max_detections`` (0: all)."""
    # OpenCV's stubs say Sequence; its bindings take numpy arrays without a per-element conversion.
    kept = cv2.dnn.NMSBoxesBatched(xywh, scores, class_ids, -np.inf, float(iou))  # type: ignore[arg-type]
    keep = sorted(np.asarray(kept, np.int64).reshape(-1).tolist(), key=lambda i: -float(scores[i]))
    return keep[:max_detections] if max_detections > 0 else keep


def enhance_tiled(run_fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tile: int,
                  overlap: int) -> np.ndarray:
    """Run an image-to-image model over [1, C, H, W] in overlapping tiles and blend them.

    Each tile's output is weighted by a ramp that falls to nearly zero at tile borders that
    touch another tile (not at the image border), so seams where the model sees little
    context get little weight. The ramp spans the whole overlap with the neighbouring tile,
    which is ``overlap`` between inner tiles but often far more for the last one (aligned to the
    frame's end): a ramp of only ``overlap`` there gave half weight to outputs 32 px from a tile
    edge, where the shipped enhancers lack context (seams of up to 13/255 and 112/4095 on
    textured 1100 x 1100 frames). ``tile`` should respect the model's size multiple; frames not
    larger than a tile run in one call.
    """
    if tile <= 0 or not 0 <= overlap < tile:
        raise BundleError(expected("tile > 0 and 0 <= overlap < tile", (tile, overlap)))
    _, _, h, w = x.shape
    if h <= tile and w <= tile:
        return run_fn(x)

    def starts(n: int) -> list[int]:
        if n <= tile:
            return [0]
        step = tile - overlap
        out = list(range(0, n - tile, step)) + [n - tile]
        return sorted(set(out))

    def ramps(n: int) -> list[tuple[int, np.ndarray]]:
        """(start, weight per pixel) of each tile along one axis of length n."""
        first = starts(n)
        size = min(tile, n)
        return [(s, _ramp(size, first[i - 1] + size - s if i else 0,
                          s + size - first[i + 1] if i + 1 < len(first) else 0))
                for i, s in enumerate(first)]

    acc: np.ndarray | None = None
    weight = np.zeros((h, w), np.float32)
    for y, wy in ramps(h):
        for x0, wx in ramps(w):
            th, tw = len(wy), len(wx)
            y_tile = run_fn(np.ascontiguousarray(x[:, :, y:y + th, x0:x0 + tw]))
            if acc is None:
                acc = np.zeros((1, y_tile.shape[1], h, w), np.float32)
            wt = np.outer(wy, wx)
            acc[:, :, y:y + th, x0:x0 + tw] += y_tile * wt
            weight[y:y + th, x0:x0 + tw] += wt
    if acc is None:  # unreachable: there is always at least one tile
        raise InputError(expected("at least one tile", (h, w)))
    acc /= weight
    return acc


def _ramp(n: int, fade_in: int, fade_out: int) -> np.ndarray:
    """Weights of n pixels: rising over the first ``fade_in``, falling over the last ``fade_out``."""
    r = np.ones(n, np.float32)
    if fade_in > 0:
        r[:fade_in] = (np.arange(fade_in, dtype=np.float32) + 0.5) / fade_in
    if fade_out > 0:
        r[n - fade_out:] = np.minimum(r[n - fade_out:], (np.arange(fade_out, 0, -1, dtype=np.float32) - 0.5) / fade_out)
    return r


class Postprocessor:
    """``Postprocessor(spec, preprocess=...)(outputs, mapping, frame) -> Decoded``.

    ``outputs`` maps output names to arrays (or is a sequence in the manifest's output order,
    given ``output_names``). ``preprocess`` is the bundle's pre-processor: enhancement needs
    it to undo windowing and inversion.
    """

    def __init__(self, spec: Mapping[str, Any], *, output_names: Sequence[str] | None = None,
                 preprocess: Any = None) -> None:
        kind = (spec or {}).get("type")
        if kind not in TYPES:
            raise BundleError("postprocess.type: " + expected(f"one of {TYPES}", kind))
        self.spec = _check_keys(spec, KEYS[kind], f"postprocess ({kind})")
        self.type = kind
        self.output_names = list(output_names) if output_names else None
        self.pre = preprocess
        self.classes = [str(c) for c in self.spec.get("classes", [])]
        # Checked here, at load: out of range, each failed on every frame or silently found nothing
        # (a kernel of 0 raised in numpy, a stride of 0 made every box 4 px, a threshold of 2 kept none).
        self.score_threshold = _number(self.spec, "score_threshold", 0.3, float, "a number in (0, 1]",
                                       lambda v: 0 < v <= 1)
        self.nms_iou = _number(self.spec, "nms_iou", 0.5, float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
        self.max_detections = _number(self.spec, "max_detections", 100, int, "an integer >= 1", lambda v: v >= 1)
        self.stride = _number(self.spec, "stride", 4, int, "an integer >= 1", lambda v: v >= 1)
        self.peak_kernel = _number(self.spec, "peak_kernel", 3, int, "an integer >= 1", lambda v: v >= 1)
        if kind == "segmentation":
            _number(self.spec, "threshold", 0.5, float, "a number in (0, 1)", lambda v: 0 < v < 1)
            if self.spec.get("activation", "sigmoid") not in ("sigmoid", "softmax"):
                raise BundleError("postprocess.activation: " + expected("'sigmoid' or 'softmax'",
                                                                        self.spec["activation"]))
        if kind in ("centernet", "yolov8") and not self.classes:
            raise BundleError(f"postprocess ({kind}): " + expected("a non-empty classes list", self.classes))
        # The CenterNet tensors by role; the manifest may rename some of them (docs/BUNDLE.md).
        renames = _check_keys(self.spec.get("outputs"), set(CENTERNET_OUTPUTS), "postprocess.outputs")
        self.centernet_outputs = {role: str(renames.get(role, role)) for role in CENTERNET_OUTPUTS}
        tile = _check_keys(self.spec.get("tile"), {"size", "overlap"}, "postprocess.tile")
        self.tile: tuple[int, int] | None = None
        if tile:
            if "size" not in tile:
                raise BundleError("postprocess.tile: " + expected("a 'size' (tile side in pixels)", sorted(tile)))
            size, overlap = int(tile["size"]), int(tile.get("overlap", 0))
            if size <= 0 or not 0 <= overlap < size:
                raise BundleError("postprocess.tile: " + expected("size > 0 and 0 <= overlap < size",
                                                                  {"size": size, "overlap": overlap}))
            self.tile = (size, overlap)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], preprocess: Any = None) -> Postprocessor:
        names = [o["name"] for o in manifest.get("outputs", [])]
        return cls(manifest["postprocess"], output_names=names or None, preprocess=preprocess)

    def _output(self, outputs: Any, name: str | None, default_index: int = 0) -> np.ndarray:
        if isinstance(outputs, Mapping):
            if name is None:
                if len(outputs) != 1:
                    raise InputError(expected("exactly one model output", list(outputs)))
                return np.asarray(next(iter(outputs.values())))
            if name not in outputs:
                raise InputError(expected(f"model output {name!r}", list(outputs)))
            return np.asarray(outputs[name])
        seq = list(outputs)
        if name is not None and self.output_names and name in self.output_names:
            return np.asarray(seq[self.output_names.index(name)])
        return np.asarray(seq[default_index])

    def __call__(self, outputs: Any, mapping: PixelMapping, frame: Frame) -> Decoded:
        if self.type == "centernet":
            return Decoded(detections=self.decode_centernet(outputs, mapping))
        if self.type == "yolov8":
            return Decoded(detections=self.decode_yolov8(outputs, mapping))
        if self.type == "enhance":
            return Decoded(enhanced=self.to_frame_pixels(self._output(outputs, self.spec.get("output")),
                                                         mapping, frame))
        masks, contours = self.segment(self._output(outputs, self.spec.get("output")), mapping)
        return Decoded(masks=masks, contours=contours)

    # -- detection ------------------------------------------------------------------------
    def _finish(self, boxes: np.ndarray, scores: np.ndarray, cls: np.ndarray,
                mapping: PixelMapping) -> list[Detection]:
        if len(boxes) == 0:
            return []
        boxes = mapping.to_original(boxes)
        ok = (boxes[:, 2:] > boxes[:, :2]).all(axis=1)  # drop boxes all in padding
        if not ok.all():
            boxes, scores, cls = boxes[ok], scores[ok], cls[ok]
        keep = nms(boxes, scores, cls, self.nms_iou, self.max_detections)
        # One conversion to Python numbers per array: the decode runs right after an inference has
        # evicted the caches, where every numpy call costs several times what it does warm.
        return [Detection((x0, y0, x1, y1), score, self.classes[c]) for (x0, y0, x1, y1), score, c
                in zip(boxes[keep].tolist(), scores[keep].tolist(), cls[keep].tolist())]

    def decode_centernet(self, outputs: Any, mapping: PixelMapping) -> list[Detection]:
        names = self.centernet_outputs
        heat = self._output(outputs, names["heatmap"], 0)[0]
        size = self._output(outputs, names["size"], 1)[0]
        offset = self._output(outputs, names["offset"], 2)[0]
        c, h, w = heat.shape
        if c != len(self.classes):
            raise InputError(expected(f"a heatmap with {len(self.classes)} classes", heat.shape))
        if size.shape != (2, h, w) or offset.shape != (2, h, w):
            raise InputError(expected(f"size and offset of shape (2, {h}, {w})", (size.shape, offset.shape)))
        # The decode runs right after an inference has evicted the caches, where each numpy call
        # costs 10-20 us whatever its size: the map is read by three calls (a sum, whose NaN/inf
        # says the model failed, then the threshold), and the few cells above it are decoded in
        # plain Python (first call after an inference, Zen 4: us-lesion-det 446 -> 264 us, xr-nodule-det 489 -> 292 us,
        # the same detections on 1200 frames).
        if not math.isfinite(heat.sum(dtype=np.float64)):
            _finite(heat, "heatmap scores")
        flat = np.flatnonzero(heat >= self.score_threshold)
        if len(flat) == 0:
            return []
        peaks = self._peaks(heat, flat)[: self.max_detections * 4]  # top-k before NMS
        boxes, scores, cls = [], [], []
        for score, k, y, x in peaks:
            cx, cy = (x + float(offset[0, y, x])) * self.stride, (y + float(offset[1, y, x])) * self.stride
            bw, bh = max(float(size[0, y, x]), 0.0) / 2, max(float(size[1, y, x]), 0.0) / 2
            boxes.append((cx - bw, cy - bh, cx + bw, cy + bh))
            scores.append(score)
            cls.append(k)
        if not all(math.isfinite(v) for box in boxes for v in box):
            _finite(np.array(boxes), "box sizes and offsets")  # only the few decoded cells
        return self._finish_few(boxes, scores, cls, mapping)

    def _peaks(self, heat: np.ndarray, flat: np.ndarray) -> list[tuple[float, int, int, int]]:
        """(score, class, y, x) of the cells in ``flat`` (flat indices into heat, all at or above the
        threshold) that equal the max of their k x k neighbourhood (CenterNet's max-pool; the border
        as -inf), best first, ties in map order."""
        _, h, w = heat.shape
        n, r = self.peak_kernel, self.peak_kernel // 2  # offsets -r .. n - 1 - r: cv2.dilate's anchor
        if len(flat) <= FEW_CANDIDATES:
            found = []
            for i in flat.tolist():
                k, rest = divmod(i, h * w)
                y, x = divmod(rest, w)
                v = heat[k, y, x]
                if v >= heat[k, max(y - r, 0):y - r + n, max(x - r, 0):x - r + n].max():
                    found.append((float(v), k, y, x))
        else:  # a map with many candidates (an untrained or failing model): vectorised
            cls, rest = np.divmod(flat, h * w)
            ys, xs = np.divmod(rest, w)
            d = np.arange(n) - r
            # Clipping an offset that leaves the map lands on a cell already inside the window, so the
            # neighbourhood max is the same as with a -inf border.
            ny = np.minimum(np.maximum(ys[:, None, None] + d[None, :, None], 0), h - 1)
            nx = np.minimum(np.maximum(xs[:, None, None] + d[None, None, :], 0), w - 1)
            vals = heat[cls, ys, xs]
            peak = vals >= heat[cls[:, None, None], ny, nx].max(axis=(1, 2))
            found = list(zip(vals[peak].astype(np.float64).tolist(), cls[peak].tolist(), ys[peak].tolist(),
                             xs[peak].tolist()))
        found.sort(key=lambda p: -p[0])  # stable: ties stay in map order
        if found and found[0][0] > 1.001:  # the highest cell is a peak; int8/fp16 rounding stays far below this
            # a heatmap of logits (no sigmoid in the graph) gave no findings or false ones, without a word
            raise BackendError(expected("heatmap scores in 0..1 from the model (centernet: sigmoid in the graph)",
                                        f"a score of {found[0][0]:.3g}"))
        return found

    def _finish_few(self, boxes: list[tuple[float, float, float, float]], scores: list[float], cls: list[int],
                    mapping: PixelMapping) -> list[Detection]:
        """``_finish`` for a few boxes (at most 4 x max_detections) as Python numbers."""
        mapped = [mapping.box_to_original(*b) for b in boxes]
        ok = [i for i, (x0, y0, x1, y1) in enumerate(mapped) if x1 > x0 and y1 > y0]  # drop boxes all in padding
        if not ok:
            return []
        xywh = [(mapped[i][0], mapped[i][1], mapped[i][2] - mapped[i][0], mapped[i][3] - mapped[i][1]) for i in ok]
        keep = _nms_xywh(xywh, [scores[i] for i in ok], [cls[i] for i in ok], self.nms_iou, self.max_detections)
        return [Detection(mapped[ok[j]], scores[ok[j]], self.classes[cls[ok[j]]]) for j in keep]

    def decode_yolov8(self, outputs: Any, mapping: PixelMapping) -> list[Detection]:
        out = self._output(outputs, self.spec.get("output"))
        nc = len(self.classes)
        if out.ndim != 3 or out.shape[0] != 1 or 4 + nc not in out.shape[1:]:
            raise InputError(expected(f"a YOLOv8 output [1, {4 + nc}, N]", out.shape))
        pred = out[0].T if out.shape[1] == 4 + nc else out[0]  # (N, 4 + C); some exports transpose
        scores_all = pred[:, 4:]
        if len(pred) == 0:  # an export with no candidate rows
            return []
        _finite(np.array([scores_all.min(), scores_all.max()]), "class scores")  # argmax would pick a NaN
        cls = scores_all.argmax(axis=1)
        scores = scores_all[np.arange(len(pred)), cls].astype(np.float64)
        ok = scores >= self.score_threshold
        pred, cls, scores = pred[ok], cls[ok], scores[ok]
        cx, cy, bw, bh = (pred[:, i].astype(np.float64) for i in range(4))
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
        _finite(boxes, "boxes")  # those above the threshold
        return self._finish(boxes, scores, cls, mapping)

    # -- enhancement ----------------------------------------------------------------------
    def to_frame_pixels(self, y: np.ndarray, mapping: PixelMapping, frame: Frame) -> np.ndarray:
        """[1, C, H, W] in the scaled [0, 1] domain -> the frame's dtype, range and size."""
        if y.ndim != 4 or y.shape[0] != 1 or tuple(y.shape[2:]) != mapping.input_size:
            raise InputError(expected(f"an output [1, C, {mapping.input_size[0]}, {mapping.input_size[1]}]",
                                      y.shape))
        x0, y0, x1, y1 = mapping.content
        img = y[0, :, y0:y1, x0:x1]
        img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        bits = int(frame.bits_stored or 8)
        maxval = float(2 ** bits - 1)
        # Back to stored values in one affine map v = alpha * y + beta (undoing inversion and the window).
        alpha, beta = maxval, 0.0
        pre = self.pre
        if pre is not None and pre.window is not None:
            c, w = pre.window  # inverse of the DICOM linear window (clipped values stay clipped)
            alpha, beta = w - 1, c - 0.5 - 0.5 * (w - 1)
        if pre is not None and pre.invert_monochrome1 and frame.photometric == "MONOCHROME1":
            alpha, beta = -alpha, maxval - beta  # the model saw the window of maxval - v
        h, w = mapping.orig_size
        integer = frame.pixels.dtype != np.float32  # float32: signed or fractionally rescaled stored values
        # What the model's [0, 1] spans in stored values: 0 .. 2**bits - 1 (the pre-processor refuses float
        # frames outside it), or the window's range; outputs beyond it are not values the frame could hold.
        span = sorted((beta, alpha + beta))
        resize = img.shape[:2] != (h, w)
        if integer and not resize:
            beta += 0.5  # round half up on the cast below
        out = np.empty(img.shape, np.float32)  # C order, whatever the strides of the crop
        np.multiply(img, np.float32(alpha), out=out)
        if beta != 0:
            out += np.float32(beta)
        if resize:
            out = cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)
            if integer:
                np.add(out, np.float32(0.5), out=out)
        if np.isnan(out.min()):  # one pass; NaN would otherwise be cast to 0, a black pixel passed as real
            raise BackendError(expected("finite model output", f"{int(np.isnan(out).sum())} NaN values of {out.size}"))
        if not integer:
            return np.clip(out, span[0], span[1], out=out)
        np.clip(out, 0.5, maxval + 0.5, out=out)
        return out.astype(frame.pixels.dtype)

    # -- segmentation ---------------------------------------------------------------------
    def segment(self, logits: np.ndarray, mapping: PixelMapping) -> tuple[np.ndarray, list[list[np.ndarray]]]:
        """Logits [1, C, h, w] -> uint8 masks (C, H, W) at the original size, and contours."""
        if logits.ndim != 4 or logits.shape[0] != 1:
            raise InputError(expected("segmentation logits [1, C, h, w]", logits.shape))
        act = self.spec.get("activation", "sigmoid" if logits.shape[1] == 1 else "softmax")
        ih, iw = mapping.input_size
        x0, y0, x1, y1 = mapping.content
        oh, ow = mapping.orig_size
        planes = []
        for c in range(logits.shape[1]):
            p: np.ndarray = np.ascontiguousarray(logits[0, c], dtype=np.float32)
            if p.shape != (ih, iw):  # an output stride: back to the input grid first
                p = cv2.resize(p, (iw, ih), interpolation=cv2.INTER_LINEAR)
            planes.append(cv2.resize(p[y0:y1, x0:x1], (ow, oh), interpolation=cv2.INTER_LINEAR))
        stack = np.stack(planes)
        _finite(np.array([stack.min(), stack.max()]), "segmentation logits")  # a NaN plane would win the argmax, or no pixel
        if act == "softmax":
            winner = stack.argmax(axis=0)
            masks = np.stack([(winner == c) for c in range(len(planes))]).astype(np.uint8)
        elif act == "sigmoid":
            thr = float(self.spec.get("threshold", 0.5))
            logit_thr = np.log(thr / (1 - thr))  # threshold logits, no sigmoid needed
            masks = (stack > logit_thr).astype(np.uint8)
        else:
            raise BundleError("postprocess.activation: " + expected("'sigmoid' or 'softmax'", act))
        contours = [list(cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]) for m in masks]
        return masks, contours
