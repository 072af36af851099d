"""Manifest-driven pre-processing: Frame -> NCHW float32 tensor + the exact way back.

The bundle's ``preprocess`` object (docs/BUNDLE.md) declares colour handling, MONOCHROME1
inversion, windowing or bit-depth scaling, resizing (letterbox / stretch / none, padding to a
multiple), normalisation and layout. The same class runs in export validation, in training of
the reference models and in the runtime, so parity checks compare like with like.

Cost matters (the runtime's budget is 15% of inference): geometry is resolved on integer
pixels (cv2.resize on uint8/uint16 before any float conversion), and window, inversion and
normalisation are folded into one affine map plus one clip, written straight into the
(pre-filled, padded) output tensor.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping as MappingABC
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from .errors import BundleError, InputError, expected
from .frames import Frame

KEYS = {"color", "invert_monochrome1", "window", "resize", "normalize", "layout", "dtype", "sector_mask"}
RESIZE_KEYS = {"mode", "size", "multiple", "pad_value", "interpolation", "align"}
RESIZE_MODES = ("none", "letterbox", "stretch")
INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}


@dataclass(frozen=True)
class PixelMapping:
    """How input-tensor pixel coordinates relate to the original frame's.

    Continuous coordinates with pixel edges at integers (a box ``x0, y0, x1, y1`` covers
    ``[x0, x1) x [y0, y1)``): ``x_in = x_orig * scale_x + offset_x``. The scales are the
    actual resized size over the original size (not a nominal ratio), so content edges map
    exactly onto pixel edges both ways. ``content`` is the region of the tensor holding the
    image (x0, y0, x1, y1); the rest is padding.
    """

    orig_size: tuple[int, int]  # H, W of the frame
    input_size: tuple[int, int]  # H, W of the tensor
    scale_x: float = 1.0
    scale_y: float = 1.0
    offset_x: int = 0
    offset_y: int = 0
    content_size: tuple[int, int] = (0, 0)  # H, W of the resized image inside the tensor

    @property
    def content(self) -> tuple[int, int, int, int]:
        h, w = self.content_size
        return self.offset_x, self.offset_y, self.offset_x + w, self.offset_y + h

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) boxes x0, y0, x1, y1 in original pixels -> input-tensor pixels."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        s = np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y])
        o = np.array([self.offset_x, self.offset_y, self.offset_x, self.offset_y], dtype=np.float64)
        return b * s + o

    def to_original(self, boxes: np.ndarray, *, clip: bool = True) -> np.ndarray:
        """(N, 4) boxes in input-tensor pixels -> original pixels (clipped to the frame)."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        s = np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y])
        o = np.array([self.offset_x, self.offset_y, self.offset_x, self.offset_y], dtype=np.float64)
        out = (b - o) / s
        if clip:  # ufuncs in place: np.clip's wrapper costs more than the work on a few boxes
            h, w = self.orig_size
            np.minimum(np.maximum(out, 0.0, out=out), (w, h, w, h), out=out)
        return out

    def box_to_original(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        """One box as ``to_original`` (clipped), in Python numbers: cheaper than numpy for a few boxes."""
        h, w = self.orig_size
        sx, sy, ox, oy = self.scale_x, self.scale_y, self.offset_x, self.offset_y
        return (min(max((x0 - ox) / sx, 0.0), w), min(max((y0 - oy) / sy, 0.0), h),
                min(max((x1 - ox) / sx, 0.0), w), min(max((y1 - oy) / sy, 0.0), h))


Mapping = PixelMapping  # the name the runtime's API uses


def _check_keys(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, MappingABC):
        raise BundleError(f"{where}: " + expected("an object", type(obj).__name__))
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise BundleError(f"{where}: unknown key(s) {unknown}; " + expected(f"keys among {sorted(allowed)}", unknown))
    return dict(obj)


def _per_channel(value: Any, channels: int, where: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, channels)
    if arr.size != channels:
        raise BundleError(f"{where}: " + expected(f"1 or {channels} values", arr.size))
    return arr


class Preprocessor:
    """``Preprocessor(spec, input_spec)(frame) -> (tensor [1, C, H, W], PixelMapping)``.

    ``spec`` is the manifest's ``preprocess`` object; ``input_spec`` the manifest's first
    ``inputs`` entry (or None). ``modality`` and ``bits_stored`` (from the manifest) make
    frames of another modality or bit depth an InputError rather than a silent misreading.
    ``reuse_tensor``: each call on a thread writes into the same tensor (one per thread), which
    the next call on that thread overwrites: for callers that are done with a tensor before the
    next frame (the runtime); a fresh 1 MB tensor per 512x512 frame costs ~0.1 ms in page faults
    and cache misses. Off by default: calibration and validation keep their tensors.
    """

    def __init__(self, spec: MappingABC[str, Any] | None, input_spec: MappingABC[str, Any] | None = None, *,
                 modality: Sequence[str] | None = None, bits_stored: int | None = None,
                 reuse_tensor: bool = False, photometric: str | None = None) -> None:
        self._local = threading.local() if reuse_tensor else None
        spec = _check_keys(spec or {}, KEYS, "preprocess")
        self.color = spec.get("color", "gray")
        if self.color not in ("gray", "rgb"):
            raise BundleError("preprocess.color: " + expected("'gray' or 'rgb'", self.color))
        self.channels = 1 if self.color == "gray" else 3
        self.invert_monochrome1 = bool(spec.get("invert_monochrome1", True))
        window = _check_keys(spec.get("window"), {"center", "width"}, "preprocess.window")
        self.window: tuple[float, float] | None = None
        if window:
            try:
                center, width = float(window["center"]), float(window["width"])
            except (KeyError, TypeError, ValueError):
                raise BundleError("preprocess.window: " + expected("numbers center and width", window)) from None
            if not (math.isfinite(center) and math.isfinite(width) and width >= 1):
                raise BundleError("preprocess.window: " + expected("a finite center and a width >= 1", window))
            self.window = (center, width)

        resize = _check_keys(spec.get("resize", {"mode": "none"}), RESIZE_KEYS, "preprocess.resize")
        self.mode = resize.get("mode", "none")
        if self.mode not in RESIZE_MODES:
            raise BundleError("preprocess.resize.mode: " + expected(f"one of {RESIZE_MODES}", self.mode))
        size = resize.get("size")
        if self.mode != "none":
            if not (isinstance(size, Sequence) and len(size) == 2 and all(int(v) > 0 for v in size)):
                raise BundleError("preprocess.resize.size: " + expected("[H, W] for letterbox/stretch", size))
            self.size: tuple[int, int] | None = (int(size[0]), int(size[1]))
        else:
            self.size = None
        self.multiple = int(resize.get("multiple", 1))
        if self.multiple < 1:
            raise BundleError("preprocess.resize.multiple: " + expected("an integer >= 1", self.multiple))
        self.pad_value = float(resize.get("pad_value", 0.0))
        interp = resize.get("interpolation")
        if interp is not None and interp not in INTERPOLATIONS:
            raise BundleError("preprocess.resize.interpolation: " + expected(f"one of {list(INTERPOLATIONS)}", interp))
        self.interpolation = interp
        self.align = resize.get("align", "center")
        if self.align not in ("center", "topleft"):
            raise BundleError("preprocess.resize.align: " + expected("'center' or 'topleft'", self.align))

        norm = _check_keys(spec.get("normalize", {}), {"mean", "std"}, "preprocess.normalize")
        self.mean = _per_channel(norm.get("mean", 0.0), self.channels, "preprocess.normalize.mean")
        self.std = _per_channel(norm.get("std", 1.0), self.channels, "preprocess.normalize.std")
        if np.any(self.std <= 0):
            raise BundleError("preprocess.normalize.std: " + expected("positive values", self.std.tolist()))
        if spec.get("layout", "NCHW") != "NCHW":
            raise BundleError("preprocess.layout: " + expected("'NCHW'", spec.get("layout")))
        if spec.get("dtype", "float32") != "float32":
            raise BundleError("preprocess.dtype: " + expected("'float32'", spec.get("dtype")))
        sector = _check_keys(spec.get("sector_mask"), {"threshold"}, "preprocess.sector_mask")
        self.sector_threshold = int(sector.get("threshold", 1)) if spec.get("sector_mask") else None

        self.modality = tuple(modality) if modality else None
        self.bits_stored = int(bits_stored) if bits_stored else None
        self.photometric = photometric  # the model's (manifest): a grey frame of the other polarity is refused
        if photometric == "MONOCHROME1" and self.invert_monochrome1:
            raise BundleError("preprocess.invert_monochrome1: " + expected(
                "false for a MONOCHROME1 model (inverting would give it the other polarity)", True))
        self.input_name = str((input_spec or {}).get("name", "image"))
        self._check_input_spec(input_spec)

    @classmethod
    def from_manifest(cls, manifest: MappingABC[str, Any], *, reuse_tensor: bool = False) -> Preprocessor:
        inputs = manifest.get("inputs") or [None]
        return cls(manifest.get("preprocess"), inputs[0], modality=manifest.get("modality"),
                   bits_stored=manifest.get("bits_stored"), reuse_tensor=reuse_tensor,
                   photometric=manifest.get("photometric"))

    def _tensor(self, th: int, tw: int) -> np.ndarray:
        shape = (1, self.channels, th, tw)
        if self._local is None:
            return np.empty(shape, np.float32)
        out: np.ndarray | None = getattr(self._local, "tensor", None)
        if out is None or out.shape != shape:
            out = self._local.tensor = np.empty(shape, np.float32)
        return out

    def _check_input_spec(self, input_spec: MappingABC[str, Any] | None) -> None:
        """A fixed input shape in the manifest must agree with what this spec produces."""
        shape = (input_spec or {}).get("shape")
        if not shape:
            return
        if len(shape) != 4:
            raise BundleError(f"input {self.input_name!r}: " + expected("an NCHW shape", shape))
        if isinstance(shape[1], int) and shape[1] != self.channels:
            raise BundleError(f"input {self.input_name!r}: " + expected(
                f"{self.channels} channel(s) for color {self.color!r}", shape[1]))
        if self.size is not None and all(isinstance(v, int) for v in shape[2:]):
            want = tuple(-(-s // self.multiple) * self.multiple for s in self.size)
            if tuple(shape[2:]) != want:
                raise BundleError(f"input {self.input_name!r}: " + expected(
                    f"spatial size {list(want)} from preprocess.resize", shape[2:]))

    # -- per frame ------------------------------------------------------------------------
    def check_frame(self, frame: Frame) -> None:
        if self.modality and frame.modality not in self.modality:
            raise InputError(expected(f"a frame of modality {list(self.modality)}", frame.modality))
        if self.bits_stored and frame.bits_stored != self.bits_stored:
            raise InputError(expected(f"a {self.bits_stored}-bit frame (the model's training data)",
                                      f"{frame.bits_stored}-bit"))
        grey = ("MONOCHROME1", "MONOCHROME2")
        if self.photometric in grey and frame.photometric in grey \
                and frame.photometric not in accepted_photometrics(self.photometric, self.invert_monochrome1):
            # e.g. invert_monochrome1: false: the model would see the anatomy inverted (as calibration refuses)
            raise InputError(expected(f"a {self.photometric} frame (the model's polarity; invert_monochrome1 "
                                      f"{str(self.invert_monochrome1).lower()})", frame.photometric))
        px = frame.pixels
        if self._inverts(frame) and px.dtype == np.float32 and frame.bits_stored == 32:
            # inverting is about the full scale: 2**32 - 1 (float32's default) is nobody's full scale
            raise InputError(expected("the bits_stored of a float32 MONOCHROME1 frame (inverted about "
                                      "2**bits_stored - 1)", "none (float32's default of 32)"))
        bits = int(frame.bits_stored or px.dtype.itemsize * 8)
        if px.dtype != np.float32 and bits < px.dtype.itemsize * 8:
            # e.g. uint16 storage of a 12-bit image: a value above 4095 (16-bit data labelled 12-bit, or
            # overlay bits left in the high bits) would be read as a brighter pixel than exists.
            peak = int(px.max())
            if peak > 2 ** bits - 1:
                raise InputError(expected(f"{px.dtype} pixel values in 0..{2 ** bits - 1} (bits_stored {bits})",
                                          f"a maximum of {peak}"))
        if self.window is None and px.dtype == np.float32:
            # Without a window, values are read as 0 .. 2**bits_stored - 1: anything else would reach
            # the model in a wrong range (e.g. signed or rescaled values).
            top = 2 ** int(frame.bits_stored or 32) - 1
            low, high = float(px.min()), float(px.max())
            if not (low >= 0 and high <= top):
                raise InputError(expected(
                    f"float32 pixel values in 0..{top} (bits_stored {frame.bits_stored}), or a window in the "
                    "bundle's preprocess", f"values in {low:g}..{high:g}"))

    def geometry(self, h: int, w: int) -> PixelMapping:
        """Where an h x w frame lands in the tensor."""
        th, tw = self.size or (h, w)
        if self.mode == "none":
            ch, cw = h, w
        elif self.mode == "stretch":
            ch, cw = th, tw
        else:
            r = min(th / h, tw / w)
            ch, cw = min(th, max(1, round(h * r))), min(tw, max(1, round(w * r)))
        ox = (tw - cw) // 2 if self.align == "center" else 0
        oy = (th - ch) // 2 if self.align == "center" else 0
        k = self.multiple
        th, tw = -(-th // k) * k, -(-tw // k) * k
        return PixelMapping((h, w), (th, tw), cw / w, ch / h, ox, oy, (ch, cw))

    def _inverts(self, frame: Frame) -> bool:
        return self.invert_monochrome1 and frame.photometric == "MONOCHROME1"

    def _affine(self, frame: Frame, inverts: bool) -> tuple[float, float, bool]:
        """Stored value v -> scaled y = a*v + b (before normalisation); clip needed?

        A MONOCHROME1 frame is inverted first (v' = 2**bits - 1 - v), then windowed: the manifest's
        window is in the model's polarity (bright = high signal), as DICOM sources deliver every frame
        (they invert MONOCHROME1 files themselves, after the file's own VOI)."""
        top = _top(frame)
        if self.window is not None and self.window[1] == 1:
            return 1.0, 0.0, False  # pixels already thresholded to 0 / 1 in __call__ (inverted there)
        if self.window is not None:
            c, w = self.window  # DICOM PS3.3 C.11.2.1.2.1 LINEAR, as pydicom's apply_voi_lut
            a, b, clip = 1.0 / (w - 1), 0.5 - (c - 0.5) / (w - 1), True
        else:
            a, b, clip = 1.0 / top, 0.0, False
        if inverts:  # y = a * (top - v) + b
            a, b = -a, a * top + b
        return a, b, clip

    def __call__(self, frame: Frame) -> tuple[np.ndarray, PixelMapping]:
        self.check_frame(frame)
        px = frame.pixels
        if px.ndim == 3 and self.color == "gray":
            px = cv2.cvtColor(px, cv2.COLOR_RGB2GRAY)
        inverts = self._inverts(frame)
        if self.sector_threshold is not None:
            if inverts:  # the mask looks for bright tissue on a dark background: the model's polarity
                px, inverts = _top(frame) - px, False  # (values checked <= top: no wrap-around)
            grey = px if px.ndim == 2 else cv2.cvtColor(px, cv2.COLOR_RGB2GRAY)
            mask = sector_mask(grey, self.sector_threshold, frame.bits_stored).astype(px.dtype)
            px = px * (mask if px.ndim == 2 else mask[:, :, None])
        m = self.geometry(px.shape[0], px.shape[1])
        ch, cw = m.content_size
        if (ch, cw) != px.shape[:2]:
            px = _resize(px, ch, cw, self.interpolation)
        if self.window is not None and self.window[1] == 1:
            # PS3.3 C.11.2.1.2.1: a width of 1 is a threshold at center - 0.5 (y = 0 at or below, 1 above),
            # of the inverted values for a MONOCHROME1 frame
            threshold = self.window[0] - 0.5
            px = ((_top(frame) - threshold > px) if inverts else (px > threshold)).astype(np.uint8)

        a, b, clip = self._affine(frame, inverts)
        # Fold normalisation into the affine map: x = (a*v + b - mean) / std, per channel.
        scale, shift = a / self.std, (b - self.mean) / self.std
        lo, hi = (0.0 - self.mean) / self.std, (1.0 - self.mean) / self.std
        pad = (self.pad_value - self.mean) / self.std
        th, tw = m.input_size
        out = self._tensor(th, tw)
        if m.content != (0, 0, tw, th):
            for c in range(self.channels):
                out[0, c].fill(pad[c])
        x0, y0, x1, y1 = m.content
        src = px if px.ndim == 2 else px.transpose(2, 0, 1)
        for c in range(self.channels):
            view = out[0, c, y0:y1, x0:x1]
            plane = src if src.ndim == 2 else src[c]
            if c > 0 and src.ndim == 2 and scale[c] == scale[0] and shift[c] == shift[0]:
                view[...] = out[0, 0, y0:y1, x0:x1]
                continue
            np.multiply(plane, np.float32(scale[c]), out=view, casting="unsafe")
            if shift[c] != 0:
                view += np.float32(shift[c])
            if clip:
                np.clip(view, min(lo[c], hi[c]), max(lo[c], hi[c]), out=view)
        return out, m


def accepted_photometrics(model: str | None, invert_monochrome1: bool) -> set[str | None]:
    """The photometric interpretations a model of photometric ``model`` takes as grey input: its own,
    and MONOCHROME1 for a MONOCHROME2 model that inverts it (the runtime and calibration's governance)."""
    return {model} | ({"MONOCHROME1"} if model == "MONOCHROME2" and invert_monochrome1 else set())


def _top(frame: Frame) -> int:
    """The frame's full scale, 2**bits_stored - 1 (8 bits when it does not say)."""
    return 2 ** int(frame.bits_stored or 8) - 1


def _resize(px: np.ndarray, ch: int, cw: int, interpolation: str | None) -> np.ndarray:
    """``px`` to (ch, cw): the manifest's interpolation, else area when shrinking and linear when
    enlarging; a stretch that shrinks one axis and enlarges the other runs one of each in turn
    (OpenCV's area mode then interpolates without averaging: a 2-px line shrunk 7.8x across vanished
    at half its positions)."""
    h, w = px.shape[:2]
    if interpolation is None and (ch - h) * (cw - w) < 0:
        px = cv2.resize(px, (cw, h) if cw < w else (w, ch), interpolation=cv2.INTER_AREA)
        return cv2.resize(px, (cw, ch), interpolation=cv2.INTER_LINEAR)
    interp = interpolation or ("area" if ch <= h and cw <= w else "linear")
    return cv2.resize(px, (cw, ch), interpolation=INTERPOLATIONS[interp])


SECTOR_DARK = 16 / 255  # a border median up to this fraction of full scale is background, not tissue


def sector_mask(gray: np.ndarray, threshold: int = 1, bits_stored: int | None = None) -> np.ndarray:
    """Ultrasound field of view: the filled convex hull of the largest region >= threshold, and above
    the background: the median of the frame's outermost rows and columns (+1) when that median is
    dark (at most SECTOR_DARK of full scale). JPEG cines rarely keep a black of 0 (the real pydicom
    cine's is 1 after YBR -> RGB, which made the mask the whole frame, text and toolbar included).
    A bright border is tissue: the field of view reaches the frame's edge (a linear probe, a frame
    cropped to the image), and raising the threshold to it zeroed 44% of a linear phantom's tissue.

    Full scale is 2**bits_stored - 1 (12-bit data in uint16 is not judged against 65535), else the dtype's.
    Text, calibration marks and colour bars outside the sector are zeroed by the caller.
    """
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = int(np.median(border))
    full = 2 ** bits_stored - 1 if bits_stored else 255 if gray.dtype == np.uint8 else \
        65535 if gray.dtype == np.uint16 else 1
    if background <= SECTOR_DARK * full:
        threshold = max(threshold, background + 1)
    binary = cv2.morphologyEx((gray >= threshold).astype(np.uint8), cv2.MORPH_CLOSE, np.ones((7, 7), np.uint8))
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    mask = np.zeros(gray.shape[:2], np.uint8)
    if contours:
        biggest = max(contours, key=cv2.contourArea)
        cv2.fillConvexPoly(mask, cv2.convexHull(biggest), 1)
    return mask
