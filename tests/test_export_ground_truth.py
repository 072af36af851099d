"""The accuracy gate on held-out frames of the user's own: clean reference pairs (enhancement) and
COCO boxes (detection), read from real files by the runtime's sources (export/ground_truth.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from test_export_models import blur_manifest, blur_model

from edge_runtime.bundle import Bundle
from edge_runtime.errors import AccuracyGateError, ConfigError, ExportError
from export import calibration as C
from export import cli
from export import validate as V
from export.quantize import to_fp16

MODELS_DIR = cli.MODELS_DIR


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return int(cli.run(parser.parse_args(argv)))


def _pairs(root: Path, n: int = 10, size: int = 64, noise: float = 3000.0) -> tuple[Path, Path]:
    """16-bit low-dose / full-dose stand-ins: smooth clean images and the same with Gaussian noise."""
    rng = np.random.default_rng(0)
    noisy, clean = root / "noisy", root / "clean"
    noisy.mkdir()
    clean.mkdir()
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        c = 20000 + 15000 * np.sin(xx / (5 + i)) * np.cos(yy / 7)
        cv2.imwrite(str(clean / f"f{i:02d}.png"), c.astype(np.uint16))
        cv2.imwrite(str(noisy / f"f{i:02d}.png"), np.clip(c + rng.normal(0, noise, c.shape), 0, 65535).astype(np.uint16))
    return noisy, clean


def _manifest16(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    m = blur_manifest("xr16")
    m["bits_stored"] = 16  # a model for data the phantom generators do not make
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(m))
    return m, path


def test_a_16_bit_denoiser_is_gated_on_the_users_own_pairs(tmp_path: Path) -> None:
    _, manifest = _manifest16(tmp_path)
    noisy, clean = _pairs(tmp_path)
    fp32 = blur_model(tmp_path / "fp32.onnx")
    to_fp16(fp32, tmp_path / "fp16.onnx")
    blur_model(tmp_path / "damaged.onnx", damage=0.3)
    base = ["validate", "--manifest", str(manifest), "--fp32", str(fp32), "--no-progress", "--source", str(noisy),
            "--reference", str(clean), "--modality", "DX", "--report", str(tmp_path / "v.json")]
    assert _run(base + ["--candidate", f"fp16={tmp_path / 'fp16.onnx'}"]) == 0
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["frames"] == 10 and report["passed"]
    # PSNR over the 16-bit range, against the clean files: the blur removes much of the noise
    frames = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in (noisy / "f00.png", clean / "f00.png")]
    noisy_psnr = 10 * np.log10(65535.0 ** 2 / np.mean((frames[0].astype(float) - frames[1]) ** 2))
    assert report["fp32"]["metrics"]["psnr_db"] > noisy_psnr + 3
    with pytest.raises(AccuracyGateError, match="psnr_db"):
        _run(base + ["--candidate", f"int8={tmp_path / 'damaged.onnx'}"])
    # without frames of its own the message says why the phantoms do not fit, and what to give
    with pytest.raises(ExportError, match=r"bits_stored 16 \(manifest\), found \{12: 8\}.*--reference CLEAN"):
        _run(["validate", "--manifest", str(manifest), "--fp32", str(fp32), "--no-progress", "--frames", "8",
              "--candidate", f"fp16={tmp_path / 'fp16.onnx'}"])
    with pytest.raises(ConfigError, match="--reference CLEAN"):
        _run(base[:-6] + ["--modality", "DX", "--candidate", f"fp16={tmp_path / 'fp16.onnx'}"])


def test_pairs_that_do_not_line_up_are_refused(tmp_path: Path) -> None:
    m, _ = _manifest16(tmp_path)
    noisy, clean = _pairs(tmp_path, n=4)
    opts = {"opts": {"modality": "DX"}}
    (clean / "f03.png").rename(clean / "g03.png")
    with pytest.raises(ExportError, match="same image file names.*2 name"):
        cli._validation_set(m, 10, str(noisy), reference=str(clean), **opts)
    (clean / "g03.png").rename(clean / "f03.png")
    (clean / "f02.png").write_bytes(b"not an image")  # skipped by a folder source: the pairs would shift
    with pytest.raises(ExportError, match="validation frame 3: expected every --reference file readable"):
        cli._validation_set(m, 10, str(noisy), reference=str(clean), **opts)
    cv2.imwrite(str(clean / "f02.png"), np.zeros((64, 32), np.uint16))
    with pytest.raises(ExportError, match=r"validation frame 3: expected a --reference frame of the same shape"):
        cli._validation_set(m, 10, str(noisy), reference=str(clean), **opts)
    cv2.imwrite(str(clean / "f02.png"), np.zeros((64, 64), np.uint16))
    video = tmp_path / "clean.avi"  # a reference with fewer frames than the folder
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (64, 64))
    for _ in range(2):
        w.write(np.zeros((64, 64, 3), np.uint8))
    w.release()
    for p in noisy.iterdir():
        cv2.imwrite(str(p), np.zeros((64, 64), np.uint8))
    m8 = dict(m, bits_stored=8)
    with pytest.raises(ExportError, match="as many --reference frames as validation frames"):
        cli._validation_set(m8, 10, str(noisy), reference=str(video), opts={"modality": "DX", "gray": True})
    with pytest.raises(ConfigError, match="--reference / --labels with held-out frames of your own"):
        cli._validation_set(m, 10, "phantom", reference=str(clean))


@pytest.fixture(scope="module")
def lesion() -> tuple[dict[str, Any], list[Any]]:
    b = Bundle.load(MODELS_DIR / "us-lesion-det")
    m = dict(b.manifest)
    return m, list(C.frames_from("phantom", m, 12, seed0=C.VALIDATION_SEED0, role="validation"))


def _coco(root: Path, frames: list[Any], classes: list[str], shift: float = 0.0) -> tuple[Path, Path]:
    """The frames as PNGs in a folder and their truth as a COCO file, as an annotation tool writes them."""
    folder = root / "images"
    folder.mkdir(exist_ok=True)
    coco: dict[str, Any] = {"images": [], "annotations": [],
                            "categories": [{"id": i + 7, "name": c} for i, c in enumerate(classes)]}
    cid = {c["name"]: c["id"] for c in coco["categories"]}
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"img{i}.png"), f.pixels)
        coco["images"].append({"id": 100 + i, "file_name": f"img{i}.png", "width": f.width, "height": f.height})
        for (x0, y0, x1, y1), lab in zip(f.truth.boxes.tolist(), f.truth.labels):
            coco["annotations"].append({"id": len(coco["annotations"]), "image_id": 100 + i, "iscrowd": 0,
                                        "bbox": [x0 + shift, y0, x1 - x0, y1 - y0], "category_id": cid[lab]})
    labels = root / "labels.json"
    labels.write_text(json.dumps(coco))
    return folder, labels


def test_coco_labels_give_the_same_gate_as_the_phantoms_they_describe(tmp_path: Path, lesion: Any) -> None:
    m, frames = lesion
    folder, labels = _coco(tmp_path, frames, m["postprocess"]["classes"])
    fp32 = MODELS_DIR / "us-lesion-det" / "fp32.onnx"
    phantom = V.reference(fp32, V.EvalSet.build(m, frames, source="phantom"))
    own = cli._validation_set(m, 50, str(folder), labels=str(labels), opts={"modality": "US", "gray": True})
    assert own.frame_hashes == [C.frame_sha256(f) for f in frames]  # PNG kept every pixel
    assert V.reference(fp32, own).metrics == phantom.metrics and phantom.metrics["ap50"] > 0.9
    assert own.frames[3].position == "image 4 of 12"
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    folder2, labels2 = _coco(shifted, frames, m["postprocess"]["classes"], shift=12.0)  # boxes off target
    worse = V.reference(fp32, cli._validation_set(m, 50, str(folder2), labels=str(labels2),
                                                 opts={"modality": "US", "gray": True}))
    assert worse.metrics["ap50"] < phantom.metrics["ap50"] - 0.2  # the labels are what is scored


def _broken(labels: Path, edit: Any) -> Path:
    data = json.loads(labels.read_text())
    edit(data)
    out = labels.with_name("broken.json")
    out.write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("edit,error", [
    (lambda d: d["categories"][0].update(name="Cyst"), r"category names among the model's classes.*\['Cyst'\]"),
    (lambda d: d["images"][2].update(file_name="../img2.png"), "relative to the --source folder"),
    (lambda d: d["images"][2].update(file_name="gone.png"), r"image \d+ of 12 listed in --labels: expected its file"),
    (lambda d: d["images"][0].update(width=300), "width x height 300x512 as --labels says"),
    (lambda d: d["annotations"][0].update(bbox=[500, 10, 30, 30]), "boxes inside the 512x512 image"),
    (lambda d: d["annotations"][0].update(bbox=[10, 10, 0, 30]), "width and height > 0"),
    (lambda d: d["annotations"][0].update(iscrowd=1), "no crowd regions"),
    (lambda d: d["annotations"][0].update(image_id=5), "image_id among the images"),
    (lambda d: d.pop("annotations"), "'images' and 'annotations' lists"),
])
def test_coco_mistakes_are_refused_by_name(tmp_path: Path, lesion: Any, edit: Any, error: str) -> None:
    m, frames = lesion
    folder, labels = _coco(tmp_path, frames, m["postprocess"]["classes"])
    assert frames[0].width == 512
    with pytest.raises((ConfigError, ExportError), match=error):
        cli._validation_set(m, 50, str(folder), labels=str(_broken(labels, edit)), opts={"modality": "US"})


def test_quantize_refuses_calibration_on_the_users_validation_frames(tmp_path: Path) -> None:
    m, manifest = _manifest16(tmp_path)
    noisy, clean = _pairs(tmp_path, n=6)
    fp32 = blur_model(tmp_path / "fp32.onnx")
    base = ["quantize", str(fp32), "--precision", "int8", "--out", str(tmp_path / "int8.onnx"), "--manifest",
            str(manifest), "--calib-modality", "DX", "--min-frames", "4", "--no-progress",
            "--val-source", str(noisy), "--val-reference", str(clean), "--val-modality", "DX"]
    with pytest.raises(ExportError, match="no frame shared with the validation set.*6 of 6"):
        _run(base + ["--calib", str(noisy)])
    assert _run(base + ["--calib", str(clean)]) == 0  # other frames: calibrated and recorded
    record = json.loads((tmp_path / "calibration.json").read_text())
    evalset = cli._validation_set(m, 200, str(noisy), reference=str(clean), opts={"modality": "DX"})
    assert record["validation_set_sha256"] == C.set_sha256(evalset.frame_hashes) and record["frames"] == 6


def _seg_model(path: Path, bias: float = 0.0) -> Path:
    """A 1x1 convolution thresholding brightness at 0.5: logits [background, lesion] (``bias`` moves
    the threshold: a damaged model)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.array([[[[-20.0]]], [[[20.0]]]], np.float32)
    b = np.array([10.0 - bias, -10.0 + bias], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["logits"], name="conv")], "seg",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2, "H", "W"])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_segmentation_is_gated_on_label_map_pairs(tmp_path: Path) -> None:
    m = {"name": "seg", "task": "segmentation", "modality": ["US"], "bits_stored": 8, "photometric": "MONOCHROME2",
         "inputs": [{"name": "image", "dtype": "float32", "shape": [1, 1, "H", "W"]}],
         "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, 2, "H", "W"]}], "preprocess": {},
         "postprocess": {"type": "segmentation", "output": "logits", "activation": "softmax",
                         "classes": ["background", "lesion"]}}
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        label = np.zeros((64, 80), np.uint8)
        cv2.circle(label, (int(rng.integers(20, 60)), int(rng.integers(20, 44))), int(rng.integers(6, 14)), 1, -1)
        img = np.where(label == 1, 170, 60).astype(np.uint8) + rng.integers(0, 40, label.shape, dtype=np.uint8)
        cv2.imwrite(str(images / f"s{i}.png"), img)
        cv2.imwrite(str(masks / f"s{i}.png"), label)
    ev = cli._validation_set(m, 50, str(images), reference=str(masks), opts={"modality": "US", "gray": True})
    assert ev.frames[0].truth.labels == ["lesion"] and ev.frames[0].truth.masks.shape == (1, 64, 80)
    good, damaged = _seg_model(tmp_path / "fp32.onnx"), _seg_model(tmp_path / "bad.onnx", bias=6.0)
    report = V.validate(m, good, {"int8": damaged, "same": good}, ev)
    assert report.fp32["dice"] > 0.95 and report.candidate("same").passed
    assert not report.candidate("int8").passed and report.candidate("int8").failures[0].metric == "dice"
    cv2.imwrite(str(masks / "s2.png"), np.full((64, 80), 2, np.uint8))  # no class 2 in this model
    with pytest.raises(ExportError, match=r"validation frame 3: expected label values 0..1"):
        cli._validation_set(m, 50, str(images), reference=str(masks), opts={"modality": "US", "gray": True})


def test_a_colour_label_map_is_refused_not_mixed_to_grey(tmp_path: Path) -> None:
    """A palette / colour label map read through a grey model's options would have its class values
    mixed into grey levels; it is refused with a message saying how to save it."""
    m = {"task": "segmentation", "postprocess": {"classes": ["background", "lesion"]}}
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    cv2.imwrite(str(images / "a.png"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(masks / "a.png"), np.dstack([np.ones((8, 8), np.uint8)] * 3) * (0, 0, 128))
    from export.ground_truth import labelled_frames

    with pytest.raises(ExportError, match="single-channel integer label map.*8-bit grey"):
        labelled_frames(str(images), m, 10, reference=str(masks), modality="US", gray=True)
