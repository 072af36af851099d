"""The four shipped reference models: bundles verify, ONNX Runtime matches PyTorch, and each
beats its classical baseline on held-out phantoms generated here (random weights would not)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_runtime import phantoms
from edge_runtime.bundle import Bundle
from edge_runtime.frames import Frame
from edge_runtime.postprocess import Postprocessor
from edge_runtime.preprocess import Preprocessor
from export.metrics import average_precision, psnr

MODELS = Path(__file__).resolve().parents[1] / "edge_runtime" / "models"
NAMES = ["us-lesion-det", "xr-nodule-det", "us-despeckle", "xr-denoise"]
# Held-out seeds for these tests: outside both the training range (< 9e6) and the card's
# held-out range (9e6 .. 9e6 + 200), so nothing here was tuned on.
TEST_SEED = 9_500_000
# ORT vs PyTorch on the same weights (float32, same graph): summed-order differences only.
PARITY_ATOL = {"heatmap": 1e-4, "size": 1e-2, "offset": 1e-3, "enhanced": 1e-4}


def _bundle(name: str) -> Bundle:
    path = MODELS / name
    if not (path / "manifest.json").is_file():
        pytest.fail(f"shipped bundle {path} is missing")
    return Bundle.load(path)


def _session(bundle: Bundle):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(bundle.file(bundle.artifact("fp32").file)), so,
                                providers=["CPUExecutionProvider"])


def _run(bundle: Bundle, sess, frame: Frame):
    pre = Preprocessor.from_manifest(bundle.manifest)
    post = Postprocessor.from_manifest(bundle.manifest, preprocess=pre)
    x, m = pre(frame)
    names = [o["name"] for o in bundle.manifest["outputs"]]
    out = dict(zip(names, sess.run(names, {"image": x})))
    return post, out, m


@pytest.mark.parametrize("name", NAMES)
def test_bundle_is_shipped_small_and_labelled(name: str) -> None:
    b = _bundle(name)
    m = b.manifest
    assert "not for clinical use" in m["description"]
    assert b.file("fp32.onnx").stat().st_size < 2_000_000
    assert m["tolerances"] and m["metrics"] and m["training"]["seed"] == 0
    assert m["inputs"][0]["name"] == "image"


@pytest.mark.parametrize("name", NAMES)
def test_every_shipped_onnx_file_passes_the_onnx_checker(name: str) -> None:
    """What `export check` runs first; ONNX Runtime alone loads files the checker refuses (an FP16 file
    with its input Casts after their readers shipped that way until 2026-12-03)."""
    import onnx

    b = _bundle(name)
    for a in b.artifacts:
        if a.kind == "onnx":
            onnx.checker.check_model(str(b.file(a.file)), full_check=True)


@pytest.mark.parametrize("name", NAMES)
def test_onnxruntime_matches_pytorch(name: str) -> None:
    torch = pytest.importorskip("torch", reason="PyTorch (the train extra) is not installed")
    from export.training.train import torch_from_onnx

    b = _bundle(name)
    model = torch_from_onnx(b.manifest, b.file("fp32.onnx"))
    sess = _session(b)
    shape = b.manifest["inputs"][0]["shape"]
    sizes = [(96, 160), (64, 64)] if isinstance(shape[2], str) else [tuple(shape[2:])]
    rng = np.random.default_rng(0)
    for hw in sizes:
        x = rng.random((1, 1, *hw), dtype=np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x))
        ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        names = [o.name for o in sess.get_outputs()]
        for n, r, g in zip(names, ref, sess.run(names, {"image": x})):
            assert g.shape == tuple(r.shape)
            assert np.abs(r.numpy() - g).max() <= PARITY_ATOL[n], n


def _detector_vs_baseline(name: str, frames: list[Frame]) -> tuple[float, float]:
    from export.training import baselines

    b = _bundle(name)
    sess = _session(b)
    classes = b.manifest["postprocess"]["classes"]
    model_pairs, base_pairs = [], []
    params = b.manifest["baselines"]["params"]
    for f in frames:
        post, out, m = _run(b, sess, f)
        post.score_threshold = 0.01
        model_pairs.append((post(out, m, f).detections, f.truth))
        base_pairs.append((baselines.DETECTORS[name](f, **params), f.truth))
    return (average_precision(model_pairs, 0.5, classes)["ap"], average_precision(base_pairs, 0.5, classes)["ap"])


def test_us_lesion_detector_beats_classical_baseline() -> None:
    frames = [phantoms.us_frame(TEST_SEED + i, geometry=("sector", "linear")[i % 2], n_lesions=(1, 3))
              for i in range(12)]
    model_ap, base_ap = _detector_vs_baseline("us-lesion-det", frames)
    assert model_ap > 0.6 and model_ap > base_ap + 0.2, (model_ap, base_ap)


def test_xr_nodule_detector_beats_classical_baseline() -> None:
    frames = [phantoms.xr_frame(TEST_SEED + i, n_nodules=(1, 3)) for i in range(8)]
    model_ap, base_ap = _detector_vs_baseline("xr-nodule-det", frames)
    assert model_ap > 0.5 and model_ap > base_ap + 0.2, (model_ap, base_ap)


def _enhancer_vs_baseline(name: str, frames: list[Frame]) -> tuple[float, float, Frame, np.ndarray]:
    from export.training import baselines

    b = _bundle(name)
    sess = _session(b)
    base = b.manifest["baselines"]
    best = max((k for k in base if k in baselines.FILTERS), key=lambda k: base[k]["psnr_db"])
    rng = float(2 ** b.manifest["bits_stored"] - 1)
    ours, theirs = [], []
    y = None
    for f in frames:
        post, out, m = _run(b, sess, f)
        y = post(out, m, f).enhanced
        assert y.dtype == f.pixels.dtype and y.shape == f.pixels.shape
        ours.append(psnr(f.truth.clean, y, rng))
        theirs.append(psnr(f.truth.clean, baselines.FILTERS[best](f.pixels, **base[best]["params"]), rng))
    return float(np.mean(ours)), float(np.mean(theirs)), frames[-1], y


def test_us_despeckle_beats_best_classical_filter() -> None:
    frames = [phantoms.us_frame(TEST_SEED + i, size=(256, 256), geometry=("sector", "linear")[i % 2])
              for i in range(4)]
    ours, theirs, _, _ = _enhancer_vs_baseline("us-despeckle", frames)
    assert ours > theirs + 0.5, (ours, theirs)


def test_xr_denoise_beats_best_classical_filter_in_12_bit() -> None:
    frames = [phantoms.xr_frame(TEST_SEED + i, size=(256, 256), dose=0.1) for i in range(4)]
    ours, theirs, f, y = _enhancer_vs_baseline("xr-denoise", frames)
    assert ours > theirs + 0.5, (ours, theirs)
    assert y.dtype == np.uint16 and y.max() <= 4095 and f.bits_stored == 12


def test_us_baseline_searches_inside_anechoic_cysts() -> None:
    """A cyst reads 0 like the background outside the fan: the baseline's imaged-region mask must
    still cover it (a mask of the non-zero pixels cut every black cyst out of the search)."""
    from export.training import baselines

    rng = np.random.default_rng(5)
    img = np.zeros((512, 512), np.uint8)
    yy, xx = np.mgrid[:512, :512]
    fan = (yy > 20) & (yy < 490) & (xx > 30) & (xx < 480)
    img[fan] = np.clip(rng.normal(110, 25, fan.sum()), 1, 255).astype(np.uint8)
    cyst = (yy - 250) ** 2 + (xx - 200) ** 2 < 30 ** 2
    img[cyst] = 0
    assert baselines._fan(cv2.resize(img, (256, 256), interpolation=cv2.INTER_AREA))[125, 100]
    dets = baselines.us_lesion_detect(Frame(img, modality="US"), median_k=9, bg_sigma=12.0, dark=25.0, bright=15.0,
                                      min_area=60, cyst_level=60.0, max_aspect=2.0)
    box = (170, 220, 230, 280)

    def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        return w * h / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h)

    assert any(d.label == "cyst" and iou(d.box, box) >= 0.5 for d in dets), dets


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


def test_phantom_calibrated_int8_agrees_with_fp32_on_the_real_ultrasound_cine() -> None:
    """The INT8 files were calibrated and gated on phantoms; on the real 30-frame cine pydicom ships
    (no ground truth, so agreement, not accuracy) they must still follow FP32: the despeckler within
    45 dB PSNR of FP32's output on every frame (measured here 49.9-50.3; 45.8-48.0 on phantoms), the
    detector differing only by detections at its score threshold (measured: 13 of 203 unmatched,
    scores <= 0.31 for a threshold of 0.3). A calibration whose ranges clipped real images fails."""
    from edge_runtime.demo import real_cine_path
    from edge_runtime.runtime import Runtime
    from edge_runtime.sources import open_source

    frames = list(open_source(real_cine_path()))
    assert len(frames) == 30
    with Runtime("us-despeckle", "cpu-x86", precision="fp32") as a, \
            Runtime("us-despeckle", "cpu-x86", precision="int8") as b:
        assert b.provenance["precision"] == "int8"
        for f in frames:
            ya, yb = (r.process(f).enhanced.astype(np.float64) for r in (a, b))
            assert psnr(ya, yb, 255.0) > 45.0
    with Runtime("us-lesion-det", "cpu-x86", precision="fp32") as a, \
            Runtime("us-lesion-det", "cpu-x86", precision="int8") as b:
        threshold = float(a.bundle.manifest["postprocess"]["score_threshold"])
        found = unmatched = 0
        for f in frames:
            da, db = a.process(f).detections, b.process(f).detections
            found += len(da) + len(db)
            for mine, theirs in ((da, db), (db, da)):
                for d in mine:
                    if not any(e.label == d.label and _iou(np.asarray(d.box), np.asarray(e.box)) > 0.5 for e in theirs):
                        unmatched += 1
                        assert d.score < threshold + 0.05, (d.score, d.label)
        assert found > 60 and unmatched <= found // 8
