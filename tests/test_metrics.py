"""Task metrics against hand-computed cases."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from edge_runtime.errors import InputError
from edge_runtime.frames import GroundTruth
from edge_runtime.results import Detection
from export.metrics import (
    average_precision,
    dice,
    edge_preservation_index,
    enl,
    iou_matrix,
    psnr,
    sensitivity_at_fppi,
    speckle_snr,
    ssim,
)


def _pairs(with_late_hit: bool) -> list:
    t1 = GroundTruth(boxes=[[0, 0, 10, 10], [20, 20, 30, 30]], labels=["a", "a"])
    t2 = GroundTruth(boxes=[[0, 0, 10, 10]], labels=["a"])
    d1 = [Detection((0, 0, 10, 10), 0.9, "a"),  # TP
          Detection((1, 1, 11, 11), 0.8, "a"),  # duplicate of a matched box (IoU 0.68): FP
          Detection((50, 50, 60, 60), 0.7, "a")]  # FP
    if with_late_hit:
        d1.append(Detection((20, 20, 30, 30), 0.5, "a"))  # TP at the lowest score
    d2 = [Detection((0, 0, 10, 10), 0.85, "a"), Detection((20, 20, 30, 30), 0.6, "a")]  # TP, FP
    return [(d1, t1), (d2, t2)]


def test_iou_matrix() -> None:
    m = iou_matrix(np.array([[0, 0, 10, 10]]), np.array([[1, 1, 11, 11], [10, 10, 20, 20], [0, 0, 10, 10]]))
    np.testing.assert_allclose(m, [[81 / 119, 0.0, 1.0]])


def test_ap_all_point_interpolation_hand_computed() -> None:
    # Ranked: TP TP FP FP FP; 3 truths -> recall 1/3, 2/3 at precision 1: AP = 2/3.
    assert average_precision(_pairs(False))["ap"] == pytest.approx(2 / 3)
    # A last TP at rank 6 reaches recall 1 at precision 3/6: AP = 2/3 + 1/3 * 1/2.
    assert average_precision(_pairs(True))["ap"] == pytest.approx(2 / 3 + 1 / 6)


def test_ap_is_per_class_then_mean() -> None:
    truth = GroundTruth(boxes=[[0, 0, 10, 10], [30, 30, 40, 40]], labels=["a", "b"])
    dets = [Detection((0, 0, 10, 10), 0.9, "b"),  # right place, wrong class: FP for "b"
            Detection((0, 0, 10, 10), 0.8, "a"),
            Detection((30, 30, 40, 40), 0.7, "b")]
    res = average_precision([(dets, truth)], classes=["a", "b", "c"])
    assert res["per_class"] == {"a": 1.0, "b": pytest.approx(0.5), "c": None}
    assert res["ap"] == pytest.approx(0.75)
    # Tuples work as well as the dataclasses.
    res2 = average_precision([([((0, 0, 10, 10), 0.8, "a")], ([[0, 0, 10, 10]], ["a"]))])
    assert res2["ap"] == 1.0


def test_ap_of_tied_scores_does_not_depend_on_their_order() -> None:
    """A TP and an FP of one score are kept or dropped together: one point at recall 1, precision
    1/2, so AP 0.5 in either order (was 1.0 with the TP listed first). A frame without truth (None)
    counts its detections as false positives."""
    truth = GroundTruth(boxes=[[0, 0, 10, 10]], labels=["a"])
    hit, miss = Detection((0, 0, 10, 10), 0.7, "a"), Detection((50, 50, 60, 60), 0.7, "a")
    assert average_precision([([hit, miss], truth)])["ap"] == pytest.approx(0.5)
    assert average_precision([([miss, hit], truth)])["ap"] == pytest.approx(0.5)
    empty = average_precision([([hit], truth), ([Detection((0, 0, 5, 5), 0.9, "a")], None)])
    assert empty["ap"] == pytest.approx(0.5) and sensitivity_at_fppi([([hit], truth), ([], None)]) == 1.0
    assert average_precision([([], truth)])["ap"] == 0.0  # nothing detected


def test_sensitivity_at_fppi_hand_computed() -> None:
    pairs = _pairs(True)  # 2 images; ranked TP TP FP FP FP TP
    assert sensitivity_at_fppi(pairs, fppi=0.5) == pytest.approx(2 / 3)  # at most 1 FP
    assert sensitivity_at_fppi(pairs, fppi=1.5) == pytest.approx(1.0)  # at most 3 FP
    assert sensitivity_at_fppi(pairs, fppi=0.0) == pytest.approx(2 / 3)
    empty = [([], GroundTruth(boxes=[[0, 0, 5, 5]], labels=["a"]))]
    assert sensitivity_at_fppi(empty) == 0.0


def test_psnr() -> None:
    a = np.zeros((8, 8), np.uint8)
    assert psnr(a, a + 1, 255) == pytest.approx(20 * math.log10(255))
    assert psnr(a, a, 255) == math.inf
    with pytest.raises(InputError):
        psnr(a, np.zeros((4, 4)), 255)


def _ssim_by_hand(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Direct per-window SSIM with explicit Gaussian weights (Wang et al. 2004)."""
    r = np.arange(-5, 6)
    g = np.exp(-(r ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for i in range(5, x.shape[0] - 5):
        for j in range(5, x.shape[1] - 5):
            px, py = x[i - 5:i + 6, j - 5:j + 6], y[i - 5:i + 6, j - 5:j + 6]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_against_direct_computation() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (24, 30)).astype(np.float64)
    y = np.clip(x + rng.normal(0, 20, x.shape), 0, 255)
    assert ssim(x, x, 255) == pytest.approx(1.0)
    assert ssim(x, y, 255) == pytest.approx(_ssim_by_hand(x, y, 255), abs=1e-9)
    assert ssim(x, y, 255) < 0.99


def test_speckle_snr_and_enl() -> None:
    img = np.tile(np.array([1.0, 3.0]), (4, 4))  # mean 2, variance 1 over the region
    img[0, 0] = 100  # outside the region below
    assert speckle_snr(img, (2, 1, 8, 4)) == pytest.approx(2.0)
    assert enl(img, (2, 1, 8, 4)) == pytest.approx(4.0)
    mask = np.zeros(img.shape, bool)
    mask[1:, :] = True
    assert enl(img, mask) == pytest.approx(4.0)


def test_edge_preservation_index() -> None:
    ref = np.zeros((32, 32))
    ref[:, 16:] = 100
    ref += np.random.default_rng(1).normal(0, 1, ref.shape)
    assert edge_preservation_index(ref, ref) == pytest.approx(1.0)
    assert edge_preservation_index(2 * ref + 5, ref) == pytest.approx(1.0)  # linear: edges kept
    blurred = cv2.GaussianBlur(ref, (9, 9), 3)
    assert 0 < edge_preservation_index(blurred, ref) < 0.9
    assert math.isnan(edge_preservation_index(np.full_like(ref, 7.0), ref))


def test_dice() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 pixels
    b[:2, :3] = True  # 6 pixels, 4 shared
    assert dice(a, b) == pytest.approx(8 / 10)
    assert dice(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
