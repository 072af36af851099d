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
    noisy.mkdir(parents=True)
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
    with pytest.raises(AccuracyGateError, match=r"int8 \(damaged.onnx\)"):
        _run(base + ["--candidate", f"int8={tmp_path / 'damaged.onnx'}"])
    assert json.loads((tmp_path / "v.json").read_text())["candidates"][0]["failures"][0]["metric"] == "psnr_db"
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
    with pytest.raises(ExportError, match="same file names in the --source and --reference folders.*2 name"):
        cli._validation_set(m, 10, str(noisy), reference=str(clean), **opts)
    (clean / "g03.png").rename(clean / "f03.png")
    (clean / "f02.png").write_bytes(b"not an image")  # skipped by a folder source: the pairs would shift
    with pytest.raises(ExportError, match="validation frame 3: expected every --reference file readable"):
        cli._validation_set(m, 10, str(noisy), reference=str(clean), **opts)
    cv2.imwrite(str(clean / "f02.png"), np.zeros((64, 32), np.uint16))
    with pytest.raises(ExportError, match=r"validation frame 3: expected a --reference frame of the same shape"):
        cli._validation_set(m, 10, str(noisy), reference=str(clean), **opts)
    with pytest.raises(ConfigError, match="--reference / --labels with held-out frames of your own"):
        cli._validation_set(m, 10, "phantom", reference=str(clean))


def test_pages_files_and_frame_counts_must_line_up(tmp_path: Path) -> None:
    """Multi-page TIFFs with other page counts per file, a DICOM series against a folder, single files
    with other frame counts: each is refused (each once paired frames of different images silently)."""
    from test_sources import write_dicom

    m, _ = _manifest16(tmp_path)
    img = [np.full((16, 16), 1000 * (i + 1), np.uint16) for i in range(3)]
    for side, pages in (("a", (3, 2)), ("b", (2, 3))):  # 5 frames each side, pages per file swapped
        (tmp_path / side).mkdir()
        cv2.imwritemulti(str(tmp_path / side / "x.tif"), img[:pages[0]])
        cv2.imwritemulti(str(tmp_path / side / "y.tif"), img[:pages[1]])
    with pytest.raises(ExportError, match=r"validation frame 1: expected its --reference frame at the same place "
                                          r"\(image 1 of 2, page 1 of 3\), found 'image 1 of 2, page 1 of 2'"):
        cli._validation_set(m, 10, str(tmp_path / "a"), reference=str(tmp_path / "b"), opts={"modality": "DX"})
    series = tmp_path / "series"
    series.mkdir()
    for i in range(2):  # InstanceNumber against the file names: a series is read by InstanceNumber
        write_dicom(series / f"{i}.dcm", img[i], bits_stored=16, InstanceNumber=2 - i)
    with pytest.raises(ExportError, match="both folders of images or both DICOM series.*DicomSource and a "
                                          "ImageFolderSource"):
        cli._validation_set(m, 10, str(series), reference=str(tmp_path / "a"))
    twin = tmp_path / "series2"
    twin.mkdir()
    for i in range(2):
        write_dicom(twin / f"{i}.dcm", img[i], bits_stored=16, InstanceNumber=i + 1)
    with pytest.raises(ExportError, match="read in the same order.*another order"):
        cli._validation_set(m, 10, str(series), reference=str(twin))
    videos = []
    for n in (2, 3):
        videos.append(tmp_path / f"v{n}.avi")
        w = cv2.VideoWriter(str(videos[-1]), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (16, 16))
        for _ in range(n):
            w.write(np.zeros((16, 16, 3), np.uint8))
        w.release()
    m8 = dict(m, bits_stored=8)
    with pytest.raises(ExportError, match="as many --reference frames as --source frames, found '3 and 2'"):
        cli._validation_set(m8, 1, str(videos[0]), reference=str(videos[1]), opts={"modality": "DX", "gray": True})


def test_a_12_bit_dicom_pairs_with_a_png_reference_checked_against_its_bits(tmp_path: Path) -> None:
    """The reference is read by its own kind: a DICOM source states 12 bits (and refuses --bits-stored),
    a 16-bit PNG reference is then checked against the frame's 12 bits, not its own 16."""
    from test_sources import write_dicom

    m = blur_manifest("xr12")  # 12 bits stored
    clean = np.full((64, 64), 2000, np.uint16)
    noisy = write_dicom(tmp_path / "n.dcm", clean + 50, bits_stored=12)
    cv2.imwrite(str(tmp_path / "c.png"), clean)
    ev = cli._validation_set(m, 10, str(noisy), reference=str(tmp_path / "c.png"))
    assert ev.frames[0].bits_stored == 12 and np.array_equal(ev.frames[0].truth.clean, clean)
    assert ev.reference_hashes and ev.truth_sha256
    cv2.imwrite(str(tmp_path / "c.png"), clean + 3000)
    with pytest.raises(ExportError, match=r"--reference values within the frame's 12 bits \(0..4095\), found "
                                          "'a maximum of 5000'"):
        cli._validation_set(m, 10, str(noisy), reference=str(tmp_path / "c.png"))


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
    assert own.frames[3].position == "image 4 of 12 (id 103)"
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    folder2, labels2 = _coco(shifted, frames, m["postprocess"]["classes"], shift=12.0)  # boxes off target
    worse = V.reference(fp32, cli._validation_set(m, 50, str(folder2), labels=str(labels2),
                                                 opts={"modality": "US", "gray": True}))
    assert worse.metrics["ap50"] < phantom.metrics["ap50"] - 0.2  # the labels are what is scored
    other = cli._validation_set(m, 50, str(folder2), labels=str(labels2), opts={"modality": "US", "gray": True})
    assert other.frame_hashes == own.frame_hashes and other.truth_sha256 != own.truth_sha256


def test_coco_names_in_subfolders_with_backslashes_and_an_empty_root(tmp_path: Path, lesion: Any) -> None:
    """file_name "sub\\img0.png" (Windows tools) and a root holding only subfolders: read as images."""
    m, frames = lesion
    folder, labels = _coco(tmp_path, frames[:3], m["postprocess"]["classes"])
    sub = folder / "sub"
    sub.mkdir()
    for p in folder.glob("*.png"):
        p.rename(sub / p.name)
    data = json.loads(labels.read_text())
    for img in data["images"]:
        img["file_name"] = "sub\\" + img["file_name"]
    labels.write_text(json.dumps(data))
    bundle = str(MODELS_DIR / "us-lesion-det")
    rc = _run(["validate", "--bundle", bundle, "--candidate", f"same={MODELS_DIR / 'us-lesion-det' / 'fp32.onnx'}",
               "--source", str(folder), "--labels", str(labels), "--modality", "US", "--no-progress",
               "--report", str(tmp_path / "v.json")])
    report = json.loads((tmp_path / "v.json").read_text())
    assert rc == 0 and report["frames"] == 3 and report["ground_truth_sha256"]
    assert str(tmp_path) not in report["source"] and "COCO boxes" in report["source"]  # no path in the bundle


def _broken(labels: Path, edit: Any) -> Path:
    data = json.loads(labels.read_text())
    edit(data)
    out = labels.with_name("broken.json")
    out.write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("edit,error", [
    (lambda d: d["categories"][0].update(name="Cyst"), r"category names among the model's classes.*\['Cyst'\]"),
    (lambda d: d["images"][2].update(file_name="../img2.png"), "relative to the --source folder"),
    (lambda d: d["images"][2].update(file_name="gone.png"), r"image \d+ of 12 \(file-name order\) in --labels, id 102: expected its file"),
    (lambda d: d["images"][0].update(width=300), "width x height 300x512 as --labels says"),
    (lambda d: d["annotations"][0].update(bbox=[500, 10, 30, 30]), "boxes inside the 512x512 image"),
    (lambda d: d["annotations"][0].update(bbox=[10, 10, 0, 30]), "width and height > 0"),
    (lambda d: d["annotations"][0].update(iscrowd=1), "no crowd regions"),
    (lambda d: d["annotations"][0].update(image_id=5), "image_id among the images"),
    (lambda d: d.pop("annotations"), "'images' and 'annotations' lists"),
    (lambda d: d["images"][1].update(id=100), "each image id once"),
    (lambda d: d["categories"].append({"id": 7, "name": "solid"}), "each category id once"),
    (lambda d: d["images"][1].update(file_name="./img0.png"), "each image file listed once"),
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
    for shared in (noisy, clean):  # the held-out frames, and their clean references
        with pytest.raises(ExportError, match="no frame shared with the validation set.*6 of 6"):
            _run(base + ["--calib", str(shared)])
    other, _ = _pairs(tmp_path / "more", n=6, noise=2000.0)
    assert _run(base + ["--calib", str(other)]) == 0  # other frames: calibrated and recorded
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


def test_label_map_values_follow_the_models_classes() -> None:
    """With a background class first, value k is class k; without one (a sigmoid ["lesion"] head), 0 is
    background and value k is class k - 1; without class names only one foreground value is allowed
    (the gate would compare each channel with the union of all classes)."""
    from export.ground_truth import label_map_truth

    lm = np.zeros((8, 8), np.uint8)
    lm[1:3, 1:4], lm[5:7, 5:8] = 1, 2
    t = label_map_truth(lm, (8, 8), ["background", "a", "b"])
    assert t.labels == ["a", "b"] and t.boxes.tolist() == [[1, 1, 4, 3], [5, 5, 8, 7]]
    assert label_map_truth(lm, (8, 8), ["a", "b"]).labels == ["a", "b"]
    one = (lm == 1).astype(np.uint8)
    t = label_map_truth(one, (8, 8), ["lesion"])
    assert t.labels == ["lesion"] and int(t.masks.sum()) == 6
    assert label_map_truth(np.zeros((8, 8), np.uint8), (8, 8), ["lesion"]).masks.shape == (0, 8, 8)
    with pytest.raises(ExportError, match=r"label values 0..1 \(0 background, then the classes \['lesion'\]\), found 2"):
        label_map_truth(lm, (8, 8), ["lesion"])
    with pytest.raises(ExportError, match="one foreground label value without class names"):
        label_map_truth(lm, (8, 8), True)
    assert label_map_truth(one, (8, 8), True).labels == ["1"]


def test_files_made_from_another_fp32_are_refused_by_the_gate_and_the_bundle(tmp_path: Path) -> None:
    """`export quantize` stamps the FP32 sha256 into what it writes: another model's INT8 file is refused
    as a candidate and as a bundle member (a bundle of xr-denoise with us-despeckle's int8 verified OK)."""
    from edge_runtime.bundle import sha256_file
    from export.quantize import stamped_source

    _, manifest = _manifest16(tmp_path)
    noisy, clean = _pairs(tmp_path, n=6)
    fp32, other = blur_model(tmp_path / "fp32.onnx"), blur_model(tmp_path / "other.onnx", damage=0.01)
    assert _run(["quantize", str(other), "--precision", "fp16", "--out", str(tmp_path / "q" / "fp16.onnx")]) == 0
    made = tmp_path / "q" / "fp16.onnx"  # its folder made first (it failed after the work before)
    assert stamped_source(made) == sha256_file(other)
    with pytest.raises(ExportError, match=r"fp16 \(fp16.onnx\) was made from fp32 sha256 .*pre-processed copy"):
        _run(["validate", "--manifest", str(manifest), "--fp32", str(fp32), "--candidate", f"fp16={made}",
              "--source", str(noisy), "--reference", str(clean), "--modality", "DX", "--no-progress"])
    with pytest.raises(ConfigError, match="--fp16: expected a file made from this --fp32"):
        _run(["bundle", "--manifest", str(manifest), "--out", str(tmp_path / "b"), "--fp32", str(fp32),
              "--fp16", str(made)])
    assert not (tmp_path / "b").exists()
    assert _run(["bundle", "--manifest", str(manifest), "--out", str(tmp_path / "b"), "--fp32", str(other),
                 "--fp16", str(made)]) == 0
    b = json.loads((tmp_path / "b" / "manifest.json").read_text())  # what verify's stale check reads
    assert [a["info"]["source_fp32_sha256"] for a in b["artifacts"] if a["file"] == "fp16.onnx"] == \
        [sha256_file(other)]
    # a shipped bundle's own INT8 file (its record in the template's manifest) with another FP32
    shipped = MODELS_DIR / "us-despeckle"
    with pytest.raises(ConfigError, match="--int8: expected a file made from this --fp32"):
        _run(["bundle", "--manifest", str(shipped / "manifest.json"), "--out", str(tmp_path / "c"), "--fp32",
              str(MODELS_DIR / "xr-denoise" / "fp32.onnx"), "--int8", str(shipped / "int8.onnx")])
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07 not a model")
    with pytest.raises(ExportError, match="junk.onnx: expected an ONNX model file"):
        _run(["validate", "--manifest", str(manifest), "--fp32", str(fp32), "--candidate",
              f"int8={tmp_path / 'junk.onnx'}", "--source", str(noisy), "--reference", str(clean), "--modality", "DX"])


def test_a_folder_named_like_a_shipped_model_does_not_hide_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--report xr-denoise/validation.json` made ./xr-denoise; `--bundle xr-denoise` then found no manifest."""
    from edge_runtime.runtime import resolve_bundle

    monkeypatch.chdir(tmp_path)
    (tmp_path / "xr-denoise").mkdir()
    assert resolve_bundle("xr-denoise") == MODELS_DIR / "xr-denoise"
    (tmp_path / "xr-denoise" / "manifest.json").write_text("{}")  # a bundle of the user's own: it wins
    assert resolve_bundle("xr-denoise") == Path("xr-denoise")


def test_12_bit_data_in_16_bit_files_is_told_to_give_its_bits(tmp_path: Path) -> None:
    """A 12-bit model validated on a folder of 16-bit PNGs holding 12-bit data, without --bits-stored:
    the message names the option to give (it said only 'expected bits_stored 12, found 16')."""
    noisy, clean = _pairs(tmp_path, n=3, noise=10.0)
    for folder in (noisy, clean):
        for p in folder.iterdir():
            cv2.imwrite(str(p), (cv2.imread(str(p), cv2.IMREAD_UNCHANGED) >> 4).astype(np.uint16))
    m = blur_manifest("xr12")
    with pytest.raises(ExportError, match=r"bits_stored 12 .*if these 16-bit files hold 12-bit data, say so: --bits-stored 12\)"):
        cli._validation_set(m, 10, str(noisy), reference=str(clean), opts={"modality": "DX"},
                            flags={"source": "--source", "reference": "--reference", "labels": "--labels",
                                   "bits": "--bits-stored"})
    ev = cli._validation_set(m, 10, str(noisy), reference=str(clean), opts={"modality": "DX", "bits_stored": 12})
    assert [f.bits_stored for f in ev.frames] == [12, 12, 12]
    from test_sources import write_dicom  # DICOM states its depth and refuses the option: no such hint

    px = cv2.imread(str(noisy / "f00.png"), cv2.IMREAD_UNCHANGED)
    dcm = write_dicom(tmp_path / "n.dcm", px, bits_stored=16)
    with pytest.raises(ExportError, match="bits_stored 12 ") as err:
        cli._validation_set(m, 10, str(dcm), reference=str(clean / "f00.png"))
    assert "--bits-stored" not in str(err.value)
