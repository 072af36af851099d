"""Phantom datasets for the reference models, generated in memory and deterministic on one machine
(across CPUs a few pixels differ by one level: see edge_runtime.phantoms).

Frames go through the bundle's own ``Preprocessor`` (the code the runtime runs), and are kept
as the integers the pre-processor scaled (uint8 / uint16), which reproduces its float tensor
exactly at a quarter of the memory. Training and held-out sets use disjoint seed ranges:
training seeds start at ``seed * TRAIN_STRIDE``, held-out seeds at ``HELDOUT_BASE``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from edge_runtime import phantoms
from edge_runtime.frames import Frame
from edge_runtime.preprocess import Preprocessor

TRAIN_STRIDE = 100_000
HELDOUT_BASE = 9_000_000  # never reached by training seeds (seed < 90)


def train_seeds(seed: int, n: int) -> range:
    return range(seed * TRAIN_STRIDE, seed * TRAIN_STRIDE + n)


def heldout_seeds(n: int, offset: int = 0) -> range:
    return range(HELDOUT_BASE + offset, HELDOUT_BASE + offset + n)


# -- phantom recipes -------------------------------------------------------------------------
def us_det_frame(seed: int, size: tuple[int, int] = (512, 512)) -> Frame:
    """Lesion frames: sector and linear probes alternate; 0-3 lesions (negatives included)."""
    return phantoms.us_frame(seed, size=size, geometry="sector" if seed % 2 == 0 else "linear", n_lesions=(0, 3))


def xr_det_frame(seed: int, size: tuple[int, int] = (512, 512)) -> Frame:
    return phantoms.xr_frame(seed, size=size, dose=1.0, n_nodules=(0, 3))


def us_pair_frame(seed: int, size: tuple[int, int] = (512, 512)) -> Frame:
    return phantoms.us_frame(seed, size=size, geometry="sector" if seed % 2 == 0 else "linear")


def xr_dose(seed: int, lo: float = 0.05, hi: float = 0.5) -> float:
    """Training dose of a seed: log-uniform in [lo, hi], reproducible from the seed alone."""
    u = np.random.default_rng([seed, 7]).random()
    return float(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))))


def xr_pair_frame(seed: int, size: tuple[int, int] = (512, 512), dose: float | None = None) -> Frame:
    return phantoms.xr_frame(seed, size=size, dose=xr_dose(seed) if dose is None else dose)


# -- detection -------------------------------------------------------------------------------
@dataclass
class DetectionSet:
    images: np.ndarray  # (N, H, W) uint8/uint16: the pre-processed tensor times ``maxval``
    maxval: float
    boxes: list[np.ndarray] = field(default_factory=list)  # per image (n, 4) in input pixels
    labels: list[np.ndarray] = field(default_factory=list)  # per image (n,) class indices

    def __len__(self) -> int:
        return len(self.images)


def detection_set(make: Callable[[int], Frame], seeds: Iterable[int], pre: Preprocessor,
                  classes: list[str], progress: Callable[[Iterable[int]], Iterator[int]] | None = None) -> DetectionSet:
    seeds = list(seeds)
    it = progress(seeds) if progress else iter(seeds)
    images, boxes, labels = None, [], []
    maxval = 0.0
    for i, s in enumerate(it):
        frame = make(s)
        x, m = pre(frame)
        maxval = float(2 ** int(frame.bits_stored or 8) - 1)
        if images is None:
            images = np.empty((len(seeds), *x.shape[2:]), np.uint8 if maxval <= 255 else np.uint16)
        images[i] = np.rint(x[0, 0] * maxval)
        truth = frame.truth
        boxes.append(m.to_input(truth.boxes).astype(np.float32) if truth else np.zeros((0, 4), np.float32))
        labels.append(np.array([classes.index(v) for v in (truth.labels if truth else [])], np.int64))
    if images is None:
        images = np.zeros((0, 1, 1), np.uint8)
    return DetectionSet(images, maxval, boxes, labels)


def centernet_targets(boxes: np.ndarray, labels: np.ndarray, num_classes: int, out_hw: tuple[int, int],
                      stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Heatmap (C, h, w) with Gaussian peaks of exactly 1 at centre cells; log size / stride,
    sub-cell offset (2, h, w each) and a mask (h, w) of the centre cells."""
    h, w = out_hw
    heat = np.zeros((num_classes, h, w), np.float32)
    size = np.zeros((2, h, w), np.float32)
    offset = np.zeros((2, h, w), np.float32)
    mask = np.zeros((h, w), np.float32)
    for (x0, y0, x1, y1), c in zip(boxes, labels):
        bw, bh = (x1 - x0) / stride, (y1 - y0) / stride
        if bw <= 0 or bh <= 0:
            continue
        cx, cy = (x0 + x1) / 2 / stride, (y0 + y1) / 2 / stride
        ix, iy = math.floor(cx), math.floor(cy)
        if not (0 <= ix < w and 0 <= iy < h):
            continue
        # Gaussian extent ~ box size (TTFNet: sigma = 0.54 * side / 6), at least half a cell.
        sx, sy = max(0.5, 0.09 * bw), max(0.5, 0.09 * bh)
        rx, ry = int(3 * sx) + 1, int(3 * sy) + 1
        xs0, xs1, ys0, ys1 = max(0, ix - rx), min(w, ix + rx + 1), max(0, iy - ry), min(h, iy + ry + 1)
        gx = np.exp(-((np.arange(xs0, xs1) - ix) ** 2) / (2 * sx * sx))
        gy = np.exp(-((np.arange(ys0, ys1) - iy) ** 2) / (2 * sy * sy))
        np.maximum(heat[c, ys0:ys1, xs0:xs1], np.outer(gy, gx), out=heat[c, ys0:ys1, xs0:xs1])
        size[:, iy, ix] = (math.log(bw), math.log(bh))
        offset[:, iy, ix] = (cx - ix, cy - iy)
        mask[iy, ix] = 1.0
    return heat, size, offset, mask


def sample_detection_batch(ds: DetectionSet, rng: np.random.Generator, batch: int, crop: int | None,
                           num_classes: int, stride: int, object_bias: float = 0.7) -> tuple[np.ndarray, ...]:
    """A random batch with horizontal flips, and random crops when ``crop`` is set.

    Crops are what makes training affordable on two cores (the networks are fully
    convolutional, inference sees the whole input); with probability ``object_bias`` a crop is
    placed around a random object of the frame, so few crops are empty. Crop origins are
    multiples of the stride, so the output grid stays aligned with the full image's.
    """
    idx = rng.integers(0, len(ds), batch)
    h, w = ds.images.shape[1:]
    ch, cw = (min(crop, h), min(crop, w)) if crop else (h, w)
    xb = np.empty((batch, 1, ch, cw), np.float32)
    targets: list[list[np.ndarray]] = [[], [], [], []]
    for b, i in enumerate(idx):
        boxes, labels = ds.boxes[i], ds.labels[i]
        y0 = x0 = 0
        if crop:
            if len(boxes) and rng.random() < object_bias:
                x_a, y_a, x_b, y_b = boxes[int(rng.integers(0, len(boxes)))]
                cx, cy = (x_a + x_b) / 2, (y_a + y_b) / 2
                x0 = int(np.clip(cx - rng.uniform(0.2, 0.8) * cw, 0, w - cw))
                y0 = int(np.clip(cy - rng.uniform(0.2, 0.8) * ch, 0, h - ch))
            else:
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            x0, y0 = x0 // stride * stride, y0 // stride * stride
        img = ds.images[i, y0:y0 + ch, x0:x0 + cw]
        boxes = boxes - np.array([x0, y0, x0, y0], np.float32)
        if crop and len(boxes):  # keep objects whose centre is inside the crop
            c = (boxes[:, :2] + boxes[:, 2:]) / 2
            keep = (c[:, 0] >= 0) & (c[:, 0] < cw) & (c[:, 1] >= 0) & (c[:, 1] < ch)
            boxes, labels = boxes[keep], labels[keep]
        if rng.random() < 0.5:
            img = img[:, ::-1]
            boxes = boxes.copy()
            boxes[:, [0, 2]] = cw - boxes[:, [2, 0]]
        np.multiply(img, np.float32(1.0 / ds.maxval), out=xb[b, 0], casting="unsafe")
        for t, v in zip(targets, centernet_targets(boxes, labels, num_classes, (ch // stride, cw // stride), stride)):
            t.append(v)
    return (xb, *(np.stack(t) for t in targets))


# -- enhancement -----------------------------------------------------------------------------
@dataclass
class PairSet:
    noisy: np.ndarray  # (N, H, W) stored integers
    clean: np.ndarray
    maxval: float
    valid: list[np.ndarray]  # per image: flat indices of pixels a patch may be centred on

    def __len__(self) -> int:
        return len(self.noisy)


def pair_set(make: Callable[[int], Frame], seeds: Iterable[int],
             progress: Callable[[Iterable[int]], Iterator[int]] | None = None) -> PairSet:
    seeds = list(seeds)
    noisy = clean = None
    valid = []
    maxval = 0.0
    for i, s in enumerate(progress(seeds) if progress else iter(seeds)):
        f = make(s)
        if f.truth is None or f.truth.clean is None:
            raise ValueError("phantom frame without a clean reference")
        if noisy is None or clean is None:
            noisy = np.empty((len(seeds), *f.pixels.shape), f.pixels.dtype)
            clean = np.empty_like(noisy)
        noisy[i], clean[i] = f.pixels, f.truth.clean
        maxval = float(2 ** int(f.bits_stored or 8) - 1)
        valid.append(np.flatnonzero(f.truth.clean > 0))  # inside an ultrasound fan / the body
    if noisy is None or clean is None:
        raise ValueError("no seeds")
    return PairSet(noisy, clean, maxval, valid)


def sample_pair_batch(ps: PairSet, rng: np.random.Generator, batch: int, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """Random crops centred on imaged pixels, flipped left-right at random; scaled to [0, 1]."""
    h, w = ps.noisy.shape[1:]
    xb = np.empty((batch, 1, crop, crop), np.float32)
    yb = np.empty_like(xb)
    scale = np.float32(1.0 / ps.maxval)
    for b in range(batch):
        i = int(rng.integers(0, len(ps)))
        v = ps.valid[i]
        cy, cx = divmod(int(v[rng.integers(0, len(v))]), w) if len(v) else (h // 2, w // 2)
        y0 = min(max(0, cy - crop // 2), h - crop)
        x0 = min(max(0, cx - crop // 2), w - crop)
        sl = (i, slice(y0, y0 + crop), slice(x0, x0 + crop))
        flip = rng.random() < 0.5
        for dst, src in ((xb, ps.noisy), (yb, ps.clean)):
            patch = src[sl][:, ::-1] if flip else src[sl]
            np.multiply(patch, scale, out=dst[b, 0], casting="unsafe")
    return xb, yb
