"""Classical OpenCV baselines the reference models are measured against.

Enhancement: non-local means, bilateral and median filters with parameters tuned by grid
search (PSNR against the clean reference) on frames from the TRAINING seed range. 16-bit
frames are filtered as 16-bit where OpenCV allows it (NLM with NORM_L1; median for 3x3 / 5x5),
bilateral on float32; never through an 8-bit round trip that would cost 4 bits of precision.

Detection: a classical detector per modality, tuned the same way (AP50 on training seeds):
- ultrasound lesions: despeckle (median), subtract a large-scale background, threshold dark
  and bright regions, connected components -> boxes; scored by contrast, labelled cyst when the
  region is nearly anechoic;
- X-ray nodules: template matching (normalised cross-correlation) with projected-sphere templates
  over a range of radii, optionally inside a classical lung mask (Otsu on the smoothed body);
  local maxima -> boxes of the best radius, scored by the correlation. (A determinant-of-Hessian
  blob detector was tried first: rib crossings and lung markings outrank the nodules, AP50 ~0.003.)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np

from edge_runtime.frames import Frame
from edge_runtime.postprocess import nms
from edge_runtime.results import Detection
from export.metrics import average_precision, psnr


# -- enhancement filters -----------------------------------------------------------------------
def nlm(img: np.ndarray, h: float, template: int = 7, search: int = 21) -> np.ndarray:
    if img.dtype == np.uint8:
        return cv2.fastNlMeansDenoising(img, None, float(h), template, search)
    return cv2.fastNlMeansDenoising(img, [float(h)], None, template, search, cv2.NORM_L1)


def bilateral(img: np.ndarray, d: int, sigma_color: float, sigma_space: float) -> np.ndarray:
    if img.dtype == np.uint8:
        return cv2.bilateralFilter(img, int(d), float(sigma_color), float(sigma_space))
    out = cv2.bilateralFilter(img.astype(np.float32), int(d), float(sigma_color), float(sigma_space))
    return np.clip(out + 0.5, 0, np.iinfo(img.dtype).max).astype(img.dtype)


def median(img: np.ndarray, k: int) -> np.ndarray:
    return cv2.medianBlur(img, int(k))  # uint16 supports k in (3, 5) only


FILTERS: dict[str, Callable[..., np.ndarray]] = {"nlm": nlm, "bilateral": bilateral, "median": median}


def filter_grid(bits: int) -> dict[str, list[dict[str, Any]]]:
    """Parameter grids, in the frame's stored units (bits_stored)."""
    s = (2 ** bits - 1) / 255.0  # grids written for 8-bit, scaled to the bit depth
    nlm_h = [5, 10, 15, 20, 30, 40, 55, 70, 90, 120]
    bil: list[tuple[int, int, float]] = list(itertools.product((5, 9, 15, 21), (10, 25, 50, 100, 200), (3, 6, 10)))
    if bits <= 8:
        med = [3, 5, 7, 9, 11, 13, 15, 19, 25]
    else:
        med = [3, 5]
        # 12-bit X-ray: the 8-bit grids put the best NLM h and the best bilateral (smallest d and
        # sigma_space) on the grid's edge, so finer / smaller values are added (a superset: the
        # tuned filters can only get better on the tuning frames).
        nlm_h = sorted({*nlm_h, 2, 3, 4, 6, 7, 8, 12})
        bil += [v for v in itertools.product((3, 5, 7, 9), (25, 35, 50, 70), (1, 1.5, 2, 2.5)) if v not in bil]
    return {
        "nlm": [{"h": h * s} for h in nlm_h],
        "bilateral": [{"d": d, "sigma_color": c * s, "sigma_space": sp} for d, c, sp in bil],
        "median": [{"k": k} for k in med],
    }


def tune_filters(pairs: Sequence[tuple[np.ndarray, np.ndarray]], bits: int) -> dict[str, dict[str, Any]]:
    """Best parameters per filter by mean PSNR over (noisy, clean) pairs (training seeds)."""
    rng = float(2 ** bits - 1)
    best: dict[str, dict[str, Any]] = {}
    for name, grid in filter_grid(bits).items():
        scores = []
        for params in grid:
            scores.append(np.mean([psnr(c, FILTERS[name](n, **params), rng) for n, c in pairs]))
        i = int(np.argmax(scores))
        best[name] = {"params": grid[i], "tuning_psnr_db": round(float(scores[i]), 3)}
    return best


# -- classical detectors -----------------------------------------------------------------------
def _fan(gray: np.ndarray) -> np.ndarray:
    """Imaged region of an ultrasound frame, eroded so the fan border is not an 'edge'.

    Filled inside its outer border: an anechoic cyst reads 0 like the background outside the fan, and
    a mask of the non-zero pixels alone cut the cysts out of the search (until 2026-12-04 the baseline
    found 1 cyst in 11 on its tuning frames, AP50 0.098 overall; filled 0.456 with the same parameters).
    """
    m = cv2.morphologyEx((gray > 0).astype(np.uint8), cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    outer, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(m)
    cv2.drawContours(filled, outer, -1, 1, thickness=cv2.FILLED)
    return cv2.erode(filled, np.ones((9, 9), np.uint8)).astype(bool)


def us_lesion_detect(frame: Frame, *, median_k: int = 7, bg_sigma: float = 20.0, dark: float = 25.0,
                     bright: float = 25.0, min_area: int = 40, cyst_level: float = 30.0,
                     max_aspect: float = 3.0, work: int = 256) -> list[Detection]:
    """Dark (cysts, hypoechoic masses) and bright (hyperechoic masses) regions vs local background.

    Hysteresis: a region is the connected set above half the threshold that holds at least one
    pixel above the threshold, so boxes reach the blurred lesion edges. Regions whose box is more
    than ``max_aspect`` times as long as it is wide are tissue layers and fascia lines, not lesions.
    """
    gray = frame.pixels if frame.pixels.ndim == 2 else cv2.cvtColor(frame.pixels, cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    s = work / max(h, w)
    small = cv2.resize(gray, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    fan = _fan(small)
    sm = cv2.medianBlur(small, median_k).astype(np.float32)
    # Background from imaged pixels only (normalised convolution), so the fan edge does not leak.
    fm = fan.astype(np.float32)
    bg = cv2.GaussianBlur(sm * fm, (0, 0), bg_sigma) / np.maximum(cv2.GaussianBlur(fm, (0, 0), bg_sigma), 1e-3)
    diff = sm - bg
    dets: list[Detection] = []
    kernel = np.ones((3, 3), np.uint8)
    for sign, thr in ((-1.0, dark), (1.0, bright)):
        low = cv2.morphologyEx(((sign * diff > thr / 2) & fan).astype(np.uint8), cv2.MORPH_OPEN, kernel)
        n, lab, stats, _ = cv2.connectedComponentsWithStats(low, connectivity=8)
        for i in range(1, n):
            x, y, bw, bh, area = stats[i]
            if area < min_area or max(bw, bh) > max_aspect * min(bw, bh):
                continue
            region = lab[y:y + bh, x:x + bw] == i
            vals = sign * diff[y:y + bh, x:x + bw][region]
            if vals.max() <= thr:
                continue
            level = float(sm[y:y + bh, x:x + bw][region].mean())
            label = "cyst" if sign < 0 and level < cyst_level else "solid"
            score = float(vals.mean()) / 100.0 * min(1.0, area / (4 * min_area))
            dets.append(Detection((x / s, y / s, (x + bw) / s, (y + bh) / s), score, label))
    return _nms_dets(dets, ["cyst", "solid"])


def _lung_mask(img: np.ndarray, open_k: int = 21) -> np.ndarray:
    """Lungs: the dark Otsu class of the smoothed body, opened to cut thin soft-tissue strips."""
    sm = cv2.GaussianBlur(img, (0, 0), 6)
    body = sm > 0.06
    v8 = np.clip(sm * 255, 0, 255).astype(np.uint8)
    if not body.any():
        return body
    t, _ = cv2.threshold(v8[body], 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    lung = ((v8 < t) & body).astype(np.uint8)
    se = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (open_k, open_k))
    return cv2.morphologyEx(lung, cv2.MORPH_OPEN, se).astype(bool)


def _dome_template(radius: float, margin: float) -> np.ndarray:
    """A projected sphere of this radius (the nodule model) on a flat surround of ``margin`` x radius."""
    n = int(np.ceil(radius * margin)) * 2 + 1
    y, x = np.mgrid[:n, :n] - n // 2
    return np.sqrt(np.clip(1.0 - (x * x + y * y) / (radius * radius), 0.0, 1.0)).astype(np.float32)


def xr_nodule_detect(frame: Frame, *, radii: tuple[float, ...] = (4, 6, 9, 13, 18), margin: float = 1.3,
                     threshold: float = 0.3, lungs: bool = True) -> list[Detection]:
    """Template matching: normalised cross-correlation with sphere templates over radii.

    The correlation is highest where a round bright blob sits on a locally flat background;
    ribs and edges match a round template poorly. Boxes are the best radius around each
    local maximum, scored by the correlation.
    """
    img = frame.pixels.astype(np.float32) / float(2 ** int(frame.bits_stored or 12) - 1)
    best = np.full(img.shape, -1.0, np.float32)
    rad = np.zeros(img.shape, np.float32)
    for r in radii:
        t = _dome_template(float(r), margin)
        if t.shape[0] > min(img.shape):
            continue
        res = cv2.matchTemplate(img, t, cv2.TM_CCOEFF_NORMED)
        pad = t.shape[0] // 2
        view = best[pad:pad + res.shape[0], pad:pad + res.shape[1]]
        better = res > view
        view[better] = res[better]
        rad[pad:pad + res.shape[0], pad:pad + res.shape[1]][better] = r
    peaks = (best == cv2.dilate(best, np.ones((7, 7), np.uint8))) & (best > threshold)
    if lungs:
        peaks &= _lung_mask(img)
    ys, xs = np.nonzero(peaks)
    dets = [Detection((x + 0.5 - rad[y, x], y + 0.5 - rad[y, x], x + 0.5 + rad[y, x], y + 0.5 + rad[y, x]),
                      float(best[y, x]), "nodule") for y, x in zip(ys, xs)]
    return _nms_dets(dets, ["nodule"], limit=50)


def _nms_dets(dets: list[Detection], classes: list[str], iou: float = 0.3, limit: int = 100) -> list[Detection]:
    if not dets:
        return []
    boxes = np.array([d.box for d in dets])
    scores = np.array([d.score for d in dets])
    cls = np.array([classes.index(d.label) for d in dets])
    return [dets[i] for i in nms(boxes, scores, cls, iou, limit)]


DETECTORS: dict[str, Callable[..., list[Detection]]] = {"us-lesion-det": us_lesion_detect,
                                                         "xr-nodule-det": xr_nodule_detect}


def detector_grid(name: str) -> list[dict[str, Any]]:
    if name == "us-lesion-det":
        return [{"median_k": k, "bg_sigma": bg, "dark": d, "bright": b, "min_area": a, "cyst_level": c,
                 "max_aspect": r}
                for k, bg, d, b, a, c, r in itertools.product((5, 9), (12.0, 24.0), (15.0, 25.0, 35.0),
                                                              (15.0, 25.0), (20, 60), (40.0, 60.0, 80.0), (1.5, 2.0, 3.0))]
    return [{"radii": r, "margin": mg, "threshold": 0.3, "lungs": lu}
            for r, mg, lu in itertools.product(((4, 6, 9, 13, 18), (3, 4, 5, 7, 9, 12, 15, 19)), (1.3, 1.6),
                                               (True, False))]


def tune_detector(name: str, frames: Sequence[Frame], classes: list[str]) -> dict[str, Any]:
    """Grid search of the classical detector's parameters by AP50 on (training-seed) frames."""
    fn = DETECTORS[name]
    best: dict[str, Any] = {"params": {}, "tuning_ap50": -1.0}
    for params in detector_grid(name):
        pairs = [(fn(f, **params), f.truth) for f in frames]
        ap = average_precision(pairs, 0.5, classes)["ap"]
        if ap > best["tuning_ap50"]:
            best = {"params": params, "tuning_ap50": round(float(ap), 4)}
    return best
