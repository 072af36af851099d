"""Task metrics shared by the reference-model cards and the export accuracy gate.

Detection: AP@IoU (VOC all-point interpolation, per class then mean) and sensitivity at a
given false-positives-per-image rate (a FROC operating point). Enhancement: PSNR, SSIM
(Gaussian window, Wang et al. 2004), and for images without a clean reference the speckle SNR,
the equivalent number of looks and an edge-preservation index. Segmentation: Dice.

Boxes are ``x0, y0, x1, y1`` in continuous pixel coordinates (x1/y1 exclusive), so a box's
area is ``(x1 - x0) * (y1 - y0)`` with no VOC "+1".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import cv2
import numpy as np

from edge_runtime.errors import InputError, expected

Region = tuple[int, int, int, int]  # x0, y0, x1, y1


# -- detection ------------------------------------------------------------------------------
def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _as_dets(dets: Iterable[Any]) -> list[tuple[np.ndarray, float, str]]:
    """Detection objects or (box, score, label) tuples."""
    out = []
    for d in dets:
        if hasattr(d, "box"):
            out.append((np.asarray(d.box, np.float64), float(d.score), str(d.label)))
        else:
            box, score, label = d
            out.append((np.asarray(box, np.float64), float(score), str(label)))
    return out


def _as_truth(truth: Any) -> tuple[np.ndarray, list[str]]:
    """A GroundTruth (boxes, labels), a (boxes, labels) tuple, or None (a frame without objects)."""
    if truth is None:
        return np.zeros((0, 4), np.float64), []
    if hasattr(truth, "boxes"):
        return np.asarray(truth.boxes, np.float64).reshape(-1, 4), [str(v) for v in truth.labels]
    boxes, labels = truth
    return np.asarray(boxes, np.float64).reshape(-1, 4), [str(v) for v in labels]


def _match(pairs: Sequence[tuple[Any, Any]], iou: float,
           cls: str | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Greedy matching, highest score first: (scores, is_tp, n_truth) over all images. A detection takes
    the best-overlapping truth box not matched yet (COCO's rule; VOC's devkit instead counts a detection
    whose single best box is already taken as a false positive).

    ``cls`` None matches every class, but a detection only matches truth of its own label.
    """
    scores, tps, n_truth = [], [], 0
    for dets, truth in pairs:
        gboxes, glabels = _as_truth(truth)
        gsel = [i for i, lab in enumerate(glabels) if cls is None or lab == cls]
        n_truth += len(gsel)
        ds = [d for d in _as_dets(dets) if cls is None or d[2] == cls]
        ds.sort(key=lambda d: -d[1])
        used = np.zeros(len(glabels), bool)
        ious = iou_matrix(np.stack([d[0] for d in ds]), gboxes) if ds else np.zeros((0, len(glabels)))
        for k, (_, score, label) in enumerate(ds):
            best, best_iou = -1, iou
            for g in gsel:
                if not used[g] and glabels[g] == label and ious[k, g] >= best_iou:
                    best, best_iou = g, ious[k, g]
            if best >= 0:
                used[best] = True
            scores.append(score)
            tps.append(best >= 0)
    return np.asarray(scores, np.float64), np.asarray(tps, bool), n_truth


def average_precision(pairs: Sequence[tuple[Any, Any]], iou: float = 0.5,
                      classes: Sequence[str] | None = None) -> dict[str, Any]:
    """VOC all-point interpolated AP per class and their mean (``ap``).

    ``pairs``: one ``(detections, truth)`` per image. Classes without any ground truth are
    left out of the mean (their AP is undefined) and reported as None.
    """
    if classes is None:
        found = {lab for _, t in pairs for lab in _as_truth(t)[1]} | {d[2] for ds, _ in pairs for d in _as_dets(ds)}
        classes = sorted(found)
    per_class: dict[str, float | None] = {}
    for cls in classes:
        scores, tp, n_truth = _match(pairs, iou, cls)
        if n_truth == 0:
            per_class[cls] = None
            continue
        order = np.argsort(-scores, kind="stable")
        tp, ranked = tp[order], scores[order]
        ctp, cfp = np.cumsum(tp), np.cumsum(~tp)
        # One operating point per distinct score (the last of a run of equal scores): detections of
        # one score are kept or dropped together, so their input order cannot change the AP.
        last = np.r_[ranked[1:] != ranked[:-1], True] if len(ranked) else np.zeros(0, bool)
        ctp, cfp = ctp[last], cfp[last]
        recall = ctp / n_truth
        precision = ctp / np.maximum(ctp + cfp, 1)
        mrec = np.concatenate([[0.0], recall, [1.0]])
        mpre = np.concatenate([[0.0], precision, [0.0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
        steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
        per_class[cls] = float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))
    valid = [v for v in per_class.values() if v is not None]
    return {"ap": float(np.mean(valid)) if valid else float("nan"), "per_class": per_class, "iou": iou}


def sensitivity_at_fppi(pairs: Sequence[tuple[Any, Any]], fppi: float = 0.5, iou: float = 0.5) -> float:
    """Best sensitivity (recall, all classes) at a score threshold with FP/image <= ``fppi``."""
    scores, tp, n_truth = _match(pairs, iou, None)
    if n_truth == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    tp = tp[order]
    ctp, cfp = np.cumsum(tp), np.cumsum(~tp)
    ok = cfp / max(len(pairs), 1) <= fppi
    # Thresholds between distinct scores only: ties enter together.
    s = scores[order]
    last_of_tie = np.append(s[1:] != s[:-1], True)
    ok &= last_of_tie
    return float(ctp[ok].max() / n_truth) if ok.any() else 0.0


# -- enhancement ----------------------------------------------------------------------------
def _pair(ref: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if ref.shape != test.shape:
        raise InputError(expected(f"images of the same shape {ref.shape}", test.shape))
    return np.asarray(ref, np.float64), np.asarray(test, np.float64)


def psnr(ref: np.ndarray, test: np.ndarray, data_range: float) -> float:
    r, t = _pair(ref, test)
    mse = float(np.mean((r - t) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def ssim(ref: np.ndarray, test: np.ndarray, data_range: float, *, sigma: float = 1.5,
         win: int = 11, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM with an 11x11 Gaussian window (sigma 1.5), Wang et al. 2004.

    Local statistics use the normalised Gaussian weights (population covariance); the mean
    is taken over positions whose window lies inside the image, as scikit-image does.
    """
    r, t = _pair(ref, test)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2

    def blur(a: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(a, (win, win), sigma, borderType=cv2.BORDER_REFLECT)

    mu_r, mu_t = blur(r), blur(t)
    var_r = blur(r * r) - mu_r ** 2
    var_t = blur(t * t) - mu_t ** 2
    cov = blur(r * t) - mu_r * mu_t
    smap = ((2 * mu_r * mu_t + c1) * (2 * cov + c2)) / ((mu_r ** 2 + mu_t ** 2 + c1) * (var_r + var_t + c2))
    p = (win - 1) // 2
    inner = smap[p:-p, p:-p] if smap.shape[0] > 2 * p and smap.shape[1] > 2 * p else smap
    return float(inner.mean())


def _region(img: np.ndarray, region: Region | np.ndarray | None) -> np.ndarray:
    a = np.asarray(img, np.float64)
    if region is None:
        return a.reshape(-1)
    if isinstance(region, np.ndarray) and region.dtype == bool:
        return a[region]
    x0, y0, x1, y1 = (int(v) for v in region)
    return a[y0:y1, x0:x1].reshape(-1)


def speckle_snr(img: np.ndarray, region: Region | np.ndarray | None = None) -> float:
    """Mean over standard deviation in a homogeneous region (higher = less speckle)."""
    v = _region(img, region)
    sd = float(v.std())
    return float("inf") if sd == 0 else float(v.mean() / sd)


def enl(img: np.ndarray, region: Region | np.ndarray | None = None) -> float:
    """Equivalent number of looks, mean**2 / variance in a homogeneous region."""
    v = _region(img, region)
    var = float(v.var())
    return float("inf") if var == 0 else float(v.mean() ** 2 / var)


def edge_preservation_index(filtered: np.ndarray, reference: np.ndarray,
                            region: Region | np.ndarray | None = None) -> float:
    """Sattar et al. (1997) EPI: correlation of the Laplacians of filtered and reference.

    1 means the edges (high-pass content) of the reference survive the filter unchanged.
    """
    f, r = _pair(reference, filtered)[::-1]
    lf = _region(cv2.Laplacian(f, cv2.CV_64F, ksize=3), region)
    lr = _region(cv2.Laplacian(r, cv2.CV_64F, ksize=3), region)
    lf, lr = lf - lf.mean(), lr - lr.mean()
    den = float(np.sqrt(np.sum(lf * lf) * np.sum(lr * lr)))
    return float("nan") if den == 0 else float(np.sum(lf * lr) / den)


# -- segmentation ---------------------------------------------------------------------------
def dice(a: np.ndarray, b: np.ndarray) -> float:
    """2|A and B| / (|A| + |B|); 1.0 when both masks are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise InputError(expected(f"masks of the same shape {a.shape}", b.shape))
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)
