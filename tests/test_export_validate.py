"""Step 4: the accuracy gate (FP32 vs candidates on held-out phantoms) and --repair."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from test_export_models import blur_manifest, blur_model

from edge_runtime.errors import AccuracyGateError, ConfigError, ExportError
from edge_runtime.frames import Frame, GroundTruth
from edge_runtime.preprocess import PixelMapping
from export import calibration as C
from export import cli
from export import validate as V
from export.bundle_write import write_bundle
from export.quantize import quantize_int8, to_fp16

SIZE = (64, 64)


@pytest.fixture(scope="module")
def evalset() -> V.EvalSet:
    frames = list(C.phantom_frames("xr", 24, C.VALIDATION_SEED0, size=SIZE))
    return V.EvalSet.build(blur_manifest(), frames, source="phantom:xr test")


@pytest.fixture(scope="module")
def calset(evalset: V.EvalSet) -> C.CalibrationSet:
    frames = C.phantom_frames("xr", 16, C.CALIBRATION_SEED0, size=SIZE)
    return C.build(frames, blur_manifest(), source="phantom:xr", min_frames=16, exclude=evalset.frame_hashes)


def test_gate_passes_for_fp16_and_int8_of_a_sound_model(tmp_path: Path, evalset: V.EvalSet,
                                                        calset: C.CalibrationSet) -> None:
    fp32 = blur_model(tmp_path / "fp32.onnx")
    to_fp16(fp32, tmp_path / "fp16.onnx")
    quantize_int8(fp32, tmp_path / "int8.onnx", calset.reader())
    report = V.validate(blur_manifest(), fp32, {"fp16": tmp_path / "fp16.onnx", "int8": tmp_path / "int8.onnx"},
                        evalset)
    assert report.passed, report.text()
    report.raise_if_failed()
    int8 = report.candidate("int8")
    assert 20 < report.fp32["psnr_db"] < 60 and int8.metrics["psnr_db"] > report.fp32["psnr_db"] - 0.3
    assert 0 < int8.output_error["enhanced"]["max_abs"] < 0.05
    assert report.candidate("fp16").output_error["enhanced"]["max_abs"] < 1e-3
    data = json.loads(report.write(tmp_path / "validation.json").read_text())
    assert data["passed"] and data["tolerances"] == {"psnr_db": 0.3, "ssim": 0.01}
    assert data["validation_set_sha256"] == C.set_sha256(evalset.frame_hashes)
    assert data["frame_sha256"] == sorted(evalset.exclude_hashes)  # `export bundle` checks calibration against it


def test_gate_fails_on_damaged_weights_with_a_readable_report(tmp_path: Path, evalset: V.EvalSet) -> None:
    fp32 = blur_model(tmp_path / "fp32.onnx")
    damaged = blur_model(tmp_path / "damaged.onnx", damage=0.02)
    report = V.validate(blur_manifest(), fp32, {"int8": damaged}, evalset)
    assert not report.passed
    failure = report.candidate("int8").failures[0]
    assert failure.metric == "psnr_db" and failure.candidate < failure.fp32 - 0.3
    with pytest.raises(AccuracyGateError) as err:
        report.raise_if_failed()
    msg = str(err.value)
    assert "psnr_db: FP32" in msg and "candidate" in msg and "tolerance 0.3" in msg and "FAIL" in msg


def test_cli_validate_exits_non_zero_on_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blur_model(tmp_path / "fp32.onnx")
    blur_model(tmp_path / "damaged.onnx", damage=0.02)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(blur_manifest()))
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    base = ["validate", "--manifest", str(manifest), "--fp32", str(tmp_path / "fp32.onnx"), "--frames", "8",
            "--no-progress", "--report", str(tmp_path / "v.json")]
    assert cli.run(parser.parse_args(base + ["--candidate", f"fp32copy={tmp_path / 'fp32.onnx'}"])) == 0
    capsys.readouterr()
    with pytest.raises(AccuracyGateError, match=r"int8 \(damaged.onnx\) \(report above\)"):
        cli.run(parser.parse_args(base + ["--candidate", f"int8={tmp_path / 'damaged.onnx'}"]))
    out, err = capsys.readouterr()
    assert out.count("FAILED psnr_db: FP32") == 1  # the report once, not again inside the error
    assert "note: 8 held-out frames" in err
    assert json.loads((tmp_path / "v.json").read_text())["passed"] is False
    from edge_runtime.cli import main  # the dispatcher turns the error into exit code 1

    if "export" in __import__("edge_runtime.cli", fromlist=["GROUPS"]).GROUPS:
        assert main(["export"] + base + ["--candidate", f"int8={tmp_path / 'damaged.onnx'}"]) == 1


def test_repair_keeps_the_outlier_layers_in_float(tmp_path: Path, evalset: V.EvalSet,
                                                 calset: C.CalibrationSet) -> None:
    fp32 = blur_model(tmp_path / "fp32.onnx", outlier=True)
    q, nodes = cli._int8_factory(fp32, calset, "minmax", tmp_path, False)
    q([], tmp_path / "int8.onnx")
    ref = V.reference(fp32, evalset)
    report = V.validate(blur_manifest(), fp32, {"int8": tmp_path / "int8.onnx"}, evalset, ref=ref)
    assert not report.passed  # one channel of +500 leaves no INT8 resolution for the image
    rr = V.repair_int8(q, nodes, fp32, evalset, ref, report.tolerances, tmp_path, max_float=3, sensitivity_frames=6)
    assert rr.report.passed and sorted(rr.nodes_in_float) == ["conv1", "conv2", "relu1"], rr.to_dict()
    assert all(err > 1.0 for _, err in rr.sensitivity)  # each of them alone quantises the outlier tensor
    d = rr.to_dict()
    assert d["passed"] and d["ms_before"] > 0 and d["ms_after"] > 0
    assert not d["steps"][0]["passed"] and d["steps"][-1]["passed"]


def test_detection_metrics_through_the_runtime_postprocessor() -> None:
    """Outputs drawn from the truth give AP50 1; a missed object costs sensitivity and AP."""
    manifest = {"name": "det", "task": "detection", "modality": ["US"], "bits_stored": 8,
                "photometric": "MONOCHROME2", "inputs": [{"name": "image", "shape": [1, 1, 64, 64]}],
                "outputs": [{"name": "heatmap"}, {"name": "size"}, {"name": "offset"}], "preprocess": {},
                "postprocess": {"type": "centernet", "stride": 4, "classes": ["lesion"], "score_threshold": 0.3,
                                "nms_iou": 0.5, "max_detections": 10}}
    boxes = [np.array([[8, 8, 24, 24]], np.float32), np.array([[30, 30, 46, 50], [4, 40, 16, 52]], np.float32)]
    frames = [Frame(np.zeros((64, 64), np.uint8), modality="US", truth=GroundTruth(b, ["lesion"] * len(b)))
              for b in boxes]

    def outputs(bs: np.ndarray, drop_last: bool = False) -> dict[str, np.ndarray]:
        heat, size, off = np.zeros((1, 1, 16, 16), np.float32), np.zeros((1, 2, 16, 16), np.float32), \
            np.zeros((1, 2, 16, 16), np.float32)
        for x0, y0, x1, y1 in bs[:-1] if drop_last else bs:
            cx, cy = (x0 + x1) / 8, (y0 + y1) / 8
            ix, iy = int(cx), int(cy)
            heat[0, 0, iy, ix] = 0.9
            size[0, :, iy, ix] = (x1 - x0, y1 - y0)
            off[0, :, iy, ix] = (cx - ix, cy - iy)
        return {"heatmap": heat, "size": size, "offset": off}

    ev = V.EvalSet(manifest, frames, [np.zeros((1, 1, 64, 64), np.float32)] * 2,
                   [PixelMapping((64, 64), (64, 64), content_size=(64, 64))] * 2, "test", ["a", "b"])
    good = V.task_metrics(ev, [outputs(b) for b in boxes])
    assert good["ap50"] == pytest.approx(1.0) and good["sensitivity"] == pytest.approx(1.0)
    worse = V.task_metrics(ev, [outputs(boxes[0]), outputs(boxes[1], drop_last=True)])
    assert worse["sensitivity"] == pytest.approx(2 / 3) and worse["ap50"] < 0.7
    fail = V.gate("detection", good, worse, V.tolerances_for(manifest))
    assert {f.metric for f in fail} == {"ap50", "sensitivity"}


def test_reference_flow_rewrites_a_bundle(tmp_path: Path) -> None:
    """The full `export reference` flow on a tiny bundle (200 calibration frames, as governed)."""
    from edge_runtime.bundle import Bundle

    root = tmp_path / "xr-blur"
    root.mkdir()
    blur_model(root / "fp32.onnx")
    write_bundle(root, blur_manifest())
    out = cli.export_reference(root, val_frames=16, progress=False)
    b = Bundle.load(root)
    assert out["passed"] and {a.precision for a in b.artifacts} == {"fp32", "fp16", "int8"}
    assert set(b.manifest["files"]) == {"fp32.onnx", "fp16.onnx", "int8.onnx", "int8_cpu.onnx", "calibration.json",
                                        "validation.json"}
    int8 = b.artifact("int8")
    assert int8.file == "int8.onnx" and int8.targets == ("tensorrt", "onnxruntime")
    assert int8.metrics["psnr_db"] > b.artifact("fp32").metrics["psnr_db"] - 0.3
    assert int8.info["qdq"]["nonzero_zero_points"] == 0 and int8.info["bias"] == "float32"
    cpu = b.artifact("int8", target="onnxruntime-cpu")
    assert cpu.file == "int8_cpu.onnx" and cpu.targets == ("onnxruntime-cpu",)
    assert "not for TensorRT" in cpu.info["note"] and cpu.info["activations"].startswith("uint8 asymmetric")
    assert cpu.info["qdq"]["activation_zero_point_types"].keys() == {"uint8"}
    assert cpu.metrics["psnr_db"] > b.artifact("fp32").metrics["psnr_db"] - 0.3
    assert b.artifact("int8", target="tensorrt").file == "int8.onnx"
    assert set(out["nodes_in_float"]) == {"int8.onnx", "int8_cpu.onnx"}
    cal = json.loads((root / "calibration.json").read_text())
    assert cal["frames"] == 200 and b.manifest["calibration"]["sha256"] == cal["sha256"]
    val = json.loads((root / "validation.json").read_text())
    assert val["passed"] and cal["validation_set_sha256"] == val["validation_set_sha256"]
    assert [(c["precision"], c["file"]) for c in val["candidates"]] == [
        ("fp16", "fp16.onnx"), ("int8", "int8.onnx"), ("int8_cpu", "int8_cpu.onnx")]
    assert set(out["times_s"]) >= {"check", "fp16", "int8 (calibrate + quantize)", "int8_cpu (calibrate + quantize)",
                                   "validate candidates"}


def test_reference_flow_refuses_a_failing_int8_and_leaves_the_bundle(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_runtime.bundle import Bundle

    monkeypatch.chdir(tmp_path)  # the failed report goes to ./out/export/
    root = tmp_path / "xr-blur"
    root.mkdir()
    blur_model(root / "fp32.onnx", outlier=True)
    before = write_bundle(root, blur_manifest()).sha256
    with pytest.raises(AccuracyGateError, match="bundle left unchanged"):
        cli.export_reference(root, val_frames=8, progress=False)
    assert Bundle.load(root).sha256 == before
    assert sorted(p.name for p in root.iterdir()) == ["fp32.onnx", "manifest.json"]
    failed = json.loads((tmp_path / "out" / "export" / "xr-blur.validation.failed.json").read_text())
    assert failed["passed"] is False and failed["candidates"][-1]["failures"]


# -- both INT8 files are candidates: int8.onnx (TensorRT form) and int8_cpu.onnx (ONNX Runtime CPU form) --
def test_a_failing_cpu_candidate_fails_the_gate_and_is_named(tmp_path: Path, evalset: V.EvalSet,
                                                             calset: C.CalibrationSet) -> None:
    fp32 = blur_model(tmp_path / "fp32.onnx")
    quantize_int8(fp32, tmp_path / "int8.onnx", calset.reader())
    damaged = blur_model(tmp_path / "int8_cpu.onnx", damage=0.02)
    report = V.validate(blur_manifest(), fp32, {"int8": tmp_path / "int8.onnx", "int8_cpu": damaged}, evalset)
    assert report.candidate("int8").passed and not report.candidate("int8_cpu").passed
    assert not report.passed
    assert "int8_cpu (int8_cpu.onnx) FAILED psnr_db" in report.text()
    data = json.loads(report.write(tmp_path / "v.json").read_text())
    assert data["passed"] is False and data["failed_files"] == ["int8_cpu.onnx"]
    with pytest.raises(AccuracyGateError, match=r"int8_cpu \(int8_cpu.onnx\)"):
        report.raise_if_failed()


def test_repair_works_for_the_cpu_form(tmp_path: Path, evalset: V.EvalSet, calset: C.CalibrationSet) -> None:
    fp32 = blur_model(tmp_path / "fp32.onnx", outlier=True)
    q, nodes = cli._int8_factory(fp32, calset, "minmax", tmp_path, False, "cpu")
    res = q([], tmp_path / "int8_cpu.onnx")
    assert res.form == "cpu" and (tmp_path / "ranges-cpu.json").is_file()
    ref = V.reference(fp32, evalset)
    report = V.validate(blur_manifest(), fp32, {"int8_cpu": tmp_path / "int8_cpu.onnx"}, evalset, ref=ref)
    assert not report.passed  # the +500 channel leaves no uint8 resolution for the image either
    rr = V.repair_int8(q, nodes, fp32, evalset, ref, report.tolerances, tmp_path, max_float=3, sensitivity_frames=6,
                       label="int8_cpu")
    assert rr.report.passed and rr.report.precision == "int8_cpu" and rr.path.name.startswith("int8_cpu-")
    report.replace("int8_cpu", rr.report, rr.to_dict())
    assert report.passed and set(report.repairs) == {"int8_cpu"} and report.repair is None
    assert "repair int8_cpu:" in report.text()


def test_cli_validate_bundle_gates_both_int8_files_and_repairs_each(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`export validate --repair`: a failing CPU form is repaired to --repaired-out, never in place inside
    the bundle (its manifest would no longer match); int8.onnx, which passes, is left alone."""
    root = tmp_path / "xr-blur"
    root.mkdir()
    blur_model(root / "fp32.onnx")
    write_bundle(root, blur_manifest())
    cli.export_reference(root, val_frames=8, progress=False)
    assert cli._bundle_candidates(root) == {k: str(root / f) for k, f in
                                            (("fp16", "fp16.onnx"), ("int8", "int8.onnx"), ("int8_cpu", "int8_cpu.onnx"))}
    blur_model(root / "int8_cpu.onnx", damage=0.02)  # stands for a CPU form that fails the gate
    int8_before = (root / "int8.onnx").read_bytes()
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    base = ["validate", "--manifest", str(tmp_path / "m.json"), "--fp32", str(root / "fp32.onnx"), "--frames", "8",
            "--no-progress", "--report", str(tmp_path / "v.json")]
    (tmp_path / "m.json").write_text(json.dumps(blur_manifest()))
    cands = [f"--candidate=int8={root / 'int8.onnx'}", f"--candidate=int8_cpu={root / 'int8_cpu.onnx'}"]
    with pytest.raises(AccuracyGateError, match="int8_cpu"):
        cli.run(parser.parse_args(base + cands))
    repair = ["--repair", "--calib-frames", "16", "--min-frames", "16"]
    with pytest.raises(ConfigError, match="outside the bundle"):
        cli.run(parser.parse_args(base + cands + repair))
    damaged = (root / "int8_cpu.onnx").read_bytes()
    out = tmp_path / "int8_cpu.repaired.onnx"
    assert cli.run(parser.parse_args(base + cands + repair + ["--repaired-out", str(out)])) == 0
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["passed"] and list(v["repairs"]) == ["int8_cpu"] and v["repair"] is None
    assert [c["file"] for c in v["candidates"]] == ["int8.onnx", "int8_cpu.repaired.onnx"] and out.is_file()
    from edge_runtime.bundle import sha256_file
    from export.quantize import stamped_source

    # stamped with its FP32, and the verdict names the stamped bytes (export bundle matches it by sha256)
    assert stamped_source(out) == sha256_file(root / "fp32.onnx")
    assert v["candidates"][1]["sha256"] == sha256_file(out)
    record = json.loads((tmp_path / "int8_cpu.repaired.calibration.json").read_text())  # for `export bundle`
    assert record["model"] == "xr-blur" and record["frames"] == 16 and record["validation_set_sha256"] == \
        v["validation_set_sha256"]
    assert (root / "int8.onnx").read_bytes() == int8_before and (root / "int8_cpu.onnx").read_bytes() == damaged


# -- no evidence is not a pass ---------------------------------------------------------------
def _det_manifest() -> dict:
    return {"name": "det", "task": "detection", "modality": ["US"], "bits_stored": 8, "photometric": "MONOCHROME2",
            "inputs": [{"name": "image", "shape": [1, 1, 64, 64]}],
            "outputs": [{"name": "heatmap"}, {"name": "size"}, {"name": "offset"}], "preprocess": {},
            "postprocess": {"type": "centernet", "stride": 4, "classes": ["lesion"], "score_threshold": 0.3,
                            "nms_iou": 0.5, "max_detections": 10}}


def test_a_nan_fp32_reference_is_refused_not_passed(tmp_path: Path) -> None:
    """Validation frames without a ground-truth object give FP32 AP50 NaN; every candidate would pass."""
    frames = [Frame(np.zeros((64, 64), np.uint8), modality="US", truth=GroundTruth())]
    ev = V.EvalSet(_det_manifest(), frames, [np.zeros((1, 1, 64, 64), np.float32)],
                   [PixelMapping((64, 64), (64, 64), content_size=(64, 64))], "test", ["a"])
    empty = {"heatmap": np.zeros((1, 1, 16, 16), np.float32), "size": np.zeros((1, 2, 16, 16), np.float32),
             "offset": np.zeros((1, 2, 16, 16), np.float32)}
    fp32 = V.task_metrics(ev, [empty])
    assert np.isnan(fp32["ap50"])
    msg = (r"expected a finite FP32 ap50 on the validation set \(frames with ground-truth objects\), "
           r"found 'nan over 1 frames \(0 objects\)'")
    with pytest.raises(ExportError, match=msg):
        V.gate("detection", fp32, {"ap50": 0.0, "sensitivity": 0.0}, V.tolerances_for(_det_manifest()))
    ref = V.Reference([empty], fp32, 1.0)
    with pytest.raises(ExportError, match=msg):  # before any candidate runs (the file does not exist)
        V.validate(_det_manifest(), tmp_path / "fp32.onnx", {"int8": tmp_path / "int8.onnx"}, ev, ref=ref)
    with pytest.raises(ExportError, match="finite FP32 psnr_db"):
        V.gate("enhancement", {"psnr_db": float("inf"), "ssim": 1.0, "frames": 3}, {"psnr_db": 0.0, "ssim": 0.0},
               {"psnr_db": 0.3, "ssim": 0.01})


def test_a_reference_within_its_tolerance_of_zero_is_refused(tmp_path: Path) -> None:
    """An untrained detector (AP50 0 on the validation frames) passed an INT8 file that output only zeros:
    ``candidate < 0 - 0.01`` is never true. Such a reference judges nothing and is refused; so is a
    candidate whose outputs have another shape (a traceback from numpy before)."""
    tol = V.tolerances_for(_det_manifest())
    with pytest.raises(ExportError, match=r"FP32 ap50 above 0.01 .* found '0.0000 over 200 frames.*does not work"):
        V.gate("detection", {"ap50": 0.0, "sensitivity": 0.5, "frames": 200}, {"ap50": 0.0, "sensitivity": 0.0}, tol)
    assert V.gate("detection", {"ap50": 0.5, "sensitivity": 0.5}, {"ap50": 0.495, "sensitivity": 0.49}, tol) == []
    assert V.gate("enhancement", {"psnr_db": 0.2, "ssim": 0.5}, {"psnr_db": 0.1, "ssim": 0.5},
                  {"psnr_db": 0.3, "ssim": 0.01}) == []  # PSNR has no floor of 0
    ref = [{"y": np.zeros((1, 6, 1024), np.float32)}]
    with pytest.raises(ExportError, match=r"output 'y': expected the FP32 model's shape \(1, 6, 1024\), found \(1, 6, 4\)"):
        V.output_errors(ref, [{"y": np.zeros((1, 6, 4), np.float32)}])


def test_validate_with_no_candidates_is_refused(tmp_path: Path, evalset: V.EvalSet) -> None:
    fp32 = blur_model(tmp_path / "fp32.onnx")
    with pytest.raises(ExportError, match="expected at least one candidate .* found 'none'"):
        V.validate(blur_manifest(), fp32, {}, evalset.subset(2))
    empty = V.ValidationReport("m", "enhancement", "s", 2, {}, {"psnr_db": 30.0, "ssim": 0.9}, 1.0)
    assert not empty.passed and empty.to_dict()["passed"] is False
    with pytest.raises(AccuracyGateError, match="no candidates"):
        empty.raise_if_failed()


def test_report_conditions_record_the_threads_used(tmp_path: Path, evalset: V.EvalSet) -> None:
    fp32 = blur_model(tmp_path / "fp32.onnx")
    sub = evalset.subset(2)
    cond = V.validate(blur_manifest(), fp32, {"fp32copy": fp32}, sub, threads=1).to_dict()["conditions"]
    assert cond["threads"] == 1 and cond["fp32_threads"] == 1 and cond["ms_per_frame"].endswith(", 1 thread(s)")
    assert cond["backend"] == "onnxruntime CPUExecutionProvider via edge_runtime.backends"
    ref = V.reference(fp32, sub, threads=3)  # the reference measured apart, as `export reference` does
    cond = V.validate(blur_manifest(), fp32, {"fp32copy": fp32}, sub, threads=1, ref=ref).to_dict()["conditions"]
    assert cond["threads"] == 1 and cond["fp32_threads"] == 3
    assert "1 thread(s) for the candidates, 3 for the FP32 reference" in cond["ms_per_frame"]


# -- segmentation Dice: the background is not a class to score ---------------------------------
def _seg_evalset(classes: list[str] | None) -> tuple[V.EvalSet, list[dict[str, np.ndarray]]]:
    """Two frames with one lesion each, and the logits of a perfect 2-channel softmax segmenter
    (channel 0 background, channel 1 lesion)."""
    post: dict = {"type": "segmentation", "output": "logits", "activation": "softmax"}
    if classes is not None:
        post["classes"] = classes
    manifest = {"name": "seg", "task": "segmentation", "modality": ["US"], "bits_stored": 8,
                "photometric": "MONOCHROME2", "inputs": [{"name": "image", "shape": [1, 1, 64, 64]}],
                "outputs": [{"name": "logits"}], "preprocess": {}, "postprocess": post}
    frames, outs = [], []
    for x0, y0 in ((8, 8), (30, 20)):
        mask = np.zeros((1, 64, 64), bool)
        mask[0, y0:y0 + 16, x0:x0 + 20] = True
        box = np.array([[x0, y0, x0 + 20, y0 + 16]], np.float32)
        frames.append(Frame(np.zeros((64, 64), np.uint8), modality="US",
                            truth=GroundTruth(box, ["lesion"], masks=mask)))
        fg = mask[0].astype(np.float32)
        outs.append({"logits": (np.stack([1 - fg, fg])[None] * 10).astype(np.float32)})
    ev = V.EvalSet(manifest, frames, [np.zeros((1, 1, 64, 64), np.float32)] * 2,
                   [PixelMapping((64, 64), (64, 64), content_size=(64, 64))] * 2, "test", ["a", "b"])
    return ev, outs


def test_dice_skips_the_background_channel() -> None:
    ev, outs = _seg_evalset(["background", "lesion"])
    m = V.task_metrics(ev, outs)  # scored the background channel against empty truth: 0.5
    assert m["dice"] == pytest.approx(1.0) and m["dice_classes"] == ["lesion"]
    ev, outs = _seg_evalset(None)  # no class names: a softmax output's channel 0 is the background
    m = V.task_metrics(ev, outs)
    assert m["dice"] == pytest.approx(1.0) and m["dice_classes"] == ["channel 1"]
    ev, outs = _seg_evalset(["lesion", "cyst"])  # a class no frame labels (cyst) has no evidence
    shifted = [{"logits": o["logits"][:, ::-1].copy()} for o in outs]  # channel 0 = lesion in this manifest
    m = V.task_metrics(ev, shifted)
    assert m["dice"] == pytest.approx(1.0) and m["dice_classes"] == ["lesion"]
    ev, outs = _seg_evalset(["background"] * 2)  # nothing left to score: NaN, refused by validate()
    assert np.isnan(V.task_metrics(ev, outs)["dice"])


# -- calibration: the minimum counts distinct frames ----------------------------------------
def test_calibration_minimum_counts_distinct_frames() -> None:
    frames = list(C.phantom_frames("xr", 12, C.CALIBRATION_SEED0, size=SIZE))
    padded = frames + frames[:4]  # 16 frames, 12 distinct
    with pytest.raises(ExportError, match=r"expected at least 16 distinct calibration frames, "
                                          r"found '12 distinct of 16 \(4 duplicates\)'"):
        C.build(padded, blur_manifest(), source="copies", min_frames=16)
    cal = C.build(padded, blur_manifest(), source="copies", min_frames=12)
    rec = cal.record(method="minmax", min_frames=12)
    assert rec["frames"] == 16 and rec["duplicate_frames"] == 4


# -- benchmarks/RESULTS.md: the gate verdict of the run that was measured -----------------------
def test_results_render_the_gate_of_the_benchmarks_own_export_run() -> None:
    from benchmarks.bench_export import table
    from benchmarks.run_all import render_export

    def lat(nodes: dict) -> dict:
        return {"fp32": {"p50_ms": 2.0, "p99_ms": 3.0}, "int8": {"p50_ms": 1.0, "p99_ms": 2.0},
                "loadavg_before": [1.0], "loadavg_after": [1.0], "gate_passed": True,
                "gate": {"fp16": True, "int8": True, "int8_cpu": True}, "nodes_in_float": nodes}

    ran = {"latency": lat({"int8": ["bundle_node"]}),  # the shipped bundle's validation.json says passed
           "steps": {"times_s": {"check": 0.1}, "total_s": 5.0, "passed": False,
                     "validation": {"gate_passed": False, "gate": {"fp16": True, "int8": True, "int8_cpu": False},
                                    "nodes_in_float": {"int8": ["run_node"]}}}}
    skipped = {"latency": lat({"int8": ["shipped_node"]})}
    d = {"onnxruntime": "1.x", "cpu": {}, "extra": {}, "models": {"a": ran, "b": skipped}}
    text = "\n".join(render_export(d))
    assert "| a |" in text and "FAILED (int8_cpu) (this run)" in text and "passed (bundle)" in text
    assert "nodes kept in float by --repair (this run's export): int8: run_node" in text
    assert "bundle_node" not in text
    assert "nodes kept in float by --repair (shipped bundle's validation.json): int8: shipped_node" in text
    assert "this run's export for a (export steps ran)" in text
    assert "shipped bundle's validation.json for b (export steps skipped)" in text
    rows = table(d).splitlines()
    assert "FAIL(int8_cpu)" in rows[1] and "pass*" in rows[2]


def test_results_pages_are_per_machine_and_mark_emulated_int8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bench run writes the page of the machine it ran on (named after its CPU and int8 class) and an
    index of every page; an INT8 file that ran emulated is marked, not shown as a plain speed."""
    from benchmarks import run_all
    from edge_runtime.devices import CpuInt8

    monkeypatch.setattr(run_all, "_cpu_model", lambda: "AMD EPYC 7B13 64-Core Processor")
    monkeypatch.setattr("edge_runtime.devices.cpu_int8", lambda *a, **k: CpuInt8("x", "x86_64", (), False))
    assert run_all.machine_slug() == "amd-epyc-7b13-64-core-processor-no-vnni"
    monkeypatch.setattr("edge_runtime.devices.cpu_int8", lambda *a, **k: CpuInt8("x", "x86_64", ("avx512_vnni",), True))
    assert run_all.machine_slug().endswith("-vnni") and not run_all.machine_slug().endswith("no-vnni")
    # A model name without a number (VMs: "AMD EPYC" on Zen 3, 4 and 5) gets its CPU family.
    monkeypatch.setattr(run_all, "_cpu_model", lambda: "AMD EPYC")
    monkeypatch.setattr("edge_runtime.devices.cpu_family", lambda *a, **k: "26")
    assert run_all.machine_slug() == "amd-epyc-family-26-vnni"
    monkeypatch.setattr(run_all, "_cpu_model", lambda: "Intel(R) Xeon(R) Processor")  # family 6 says nothing
    assert run_all.machine_slug() == "intel-xeon-processor-vnni"
    monkeypatch.setattr(run_all, "PAGES", tmp_path / "results")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "b-vnni.md").write_text("# Benchmark results: B\n\nMachine: B, 2 cores.\n")
    (tmp_path / "results" / "a-no-vnni.md").write_text("# Benchmark results: A\n\nMachine: A, 2 cores.\n")
    index = run_all.render_index()
    assert index.index("[A](results/a-no-vnni.md): Machine: A") < index.index("[B](results/b-vnni.md): Machine: B")
    lat = {"fp32": {"p50_ms": 2.0, "p99_ms": 3.0}, "int8": {"p50_ms": 9.0, "p99_ms": 9.5},
           "int8_cpu": {"p50_ms": 1.0, "p99_ms": 1.5}, "emulated": ["int8"], "int8_speedup_p50": 0.22,
           "int8_cpu_speedup_p50": 2.0, "loadavg_before": [1.0],
           "loadavg_after": [1.0]}
    d = {"onnxruntime": "1.x", "cpu": {}, "models": {"m": {"latency": lat}}}
    text = "\n".join(run_all.render_export(d))
    assert "9.00 / 9.50 (emulated)" in text and "1.00 / 1.50 |" in text and run_all.EMULATED_NOTE in text
    assert "| emulated / 2.00 (>= 1.5x: met) |" in text  # no speed-up shown for the emulated file
    assert run_all.EMULATED_NOTE in "\n".join(run_all.render_export_1t(d))
    # The verdict is computed: the CPU form's speed-up against 1.5x, and the gate where the run has one.
    assert "1.40 (>= 1.5x: MISSED)" in run_all._speedups({**lat, "int8_cpu_speedup_p50": 1.4})
    assert run_all._speedups(lat, True).endswith("2.00 (>= 1.5x with the gate: met)")
    assert run_all._speedups(lat, False).endswith("2.00 (>= 1.5x with the gate: MISSED)")
    assert run_all._speedups({**lat, "emulated": ["int8", "int8_cpu"]}) == "emulated / emulated"


def test_gate_judges_wide_int8_weights_emulated_where_they_would_saturate(
        tmp_path: Path, evalset: V.EvalSet, calset: C.CalibrationSet, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU whose int8 kernels would saturate 8-bit weights (faked: x86 without VNNI), the TensorRT form is
    judged on its exact Q/DQ arithmetic (emulated), and the report says so and names the CPU; the CPU form
    (7-bit weights) runs fused; both pass, as they do in exact arithmetic."""
    from edge_runtime.backends import onnxruntime as B
    from edge_runtime.devices import CpuInt8
    from export.quantize import quantize_int8_cpu

    fp32 = blur_model(tmp_path / "fp32.onnx")
    quantize_int8(fp32, tmp_path / "int8.onnx", calset.reader())
    quantize_int8_cpu(fp32, tmp_path / "int8_cpu.onnx", calset.reader())
    reports = {}
    for exact in (True, False):
        monkeypatch.setattr(B, "cpu_int8", lambda exact=exact: CpuInt8("t", "x86_64", ("avx512_vnni",) if exact else (), exact))
        monkeypatch.setattr(V, "cpu_int8", lambda exact=exact: CpuInt8("t", "x86_64", ("avx512_vnni",) if exact else (), exact))
        reports[exact] = V.validate(blur_manifest(), fp32, {"int8": tmp_path / "int8.onnx",
                                                            "int8_cpu": tmp_path / "int8_cpu.onnx"}, evalset)
    slow, fast = reports[False], reports[True]
    assert slow.candidate("int8").emulated and not slow.candidate("int8_cpu").emulated
    assert not fast.candidate("int8").emulated
    assert "Q/DQ emulated in float" in slow.text() and "emulated" not in fast.text()
    assert slow.to_dict()["conditions"]["cpu"]["int8_exact_with_8bit_weights"] is False
    assert slow.passed, slow.text()


def test_export_reference_keeps_the_bundles_own_calibration_method() -> None:
    """A re-export calibrates as the bundle was calibrated (manifest), else as its recipe asks, else minmax."""
    assert cli.calibration_method({"calibration": {"method": "percentile"}, "training": {"calibration_method": "x"}}) \
        == "percentile"
    assert cli.calibration_method({"training": {"calibration_method": "entropy"}}) == "entropy"
    assert cli.calibration_method({}) == "minmax"
    assert cli.calibration_method({"calibration": {"method": "percentile"}}, "entropy") == "entropy"  # as asked
    # The repair limit likewise: asked for, else the recipe's (xr-denoise: 14), else repair_int8's default.
    assert cli.repair_limit({"training": {"repair_max_float": 14}}) == 14
    assert cli.repair_limit({"training": {"repair_max_float": 14}}, 3) == 3 and cli.repair_limit({}) is None
    from export.training.train import RECIPES

    assert RECIPES["us-despeckle"].calib_method == "percentile" and RECIPES["us-lesion-det"].calib_method == "minmax"


def test_results_page_renders_from_the_machines_committed_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page is rendered from the JSON kept next to it (benchmarks/results/<machine>/), so a run of
    some benchmarks (--only) keeps the other sections' last figures instead of "Not run yet."."""
    from benchmarks import run_all

    monkeypatch.setattr(run_all, "PAGES", tmp_path / "results")
    monkeypatch.setattr(run_all, "machine_slug", lambda: "cpu-x-vnni")
    monkeypatch.setattr(run_all, "_cpu_model", lambda: "CPU X")
    monkeypatch.setattr(run_all, "_int8_class", lambda: "exact")
    wall = {k: {"p50": 2.0, "p99": 3.0} for k in ("ours_fp32", "plain_ort_fp32")}
    runtime = {"frames": 10, "config_spinning": "off", "models": {"m": {"wall_ms": wall, "overhead_fraction_of_infer": 0.05}},
               "machine": {"threads": 2, "onnxruntime": "1.0", "opencv": "4", "load_avg_start": 0.1,
                           "load_avg_end": 0.2, "malloc_thresholds_pinned": True}}
    assert run_all.data_dir() == tmp_path / "results" / "cpu-x-vnni"
    run_all.data_dir().mkdir(parents=True)
    (run_all.data_dir() / "runtime.json").write_text(json.dumps(runtime))
    page = run_all.render()
    runtime_section = page.split("## Runtime")[1].split("## ")[0]
    assert "| m | 2.00 / 3.00 |" in runtime_section and "malloc thresholds pinned" in runtime_section
    assert page.split("## Transport")[1].split("## ")[0].strip().endswith("\n\nNot run yet.")


def test_tolerances_with_unknown_keys_or_non_numbers_are_refused_not_defaulted() -> None:
    """Dropped quietly, these fell back to the looser defaults and let a candidate through."""
    ok = V.tolerances_for({"task": "enhancement", "tolerances": {"psnr_db": 0.05}})
    assert ok == {"psnr_db": 0.05, "ssim": V.DEFAULT_TOLERANCES["ssim"]}
    assert V.tolerances_for({"task": "detection"}) == {"ap50": 0.01, "sensitivity": 0.02}
    with pytest.raises(ExportError, match=r"tolerances: \['psnr'\] expected keys among this enhancement"):
        V.tolerances_for({"task": "enhancement", "tolerances": {"psnr": 0.05}})
    with pytest.raises(ExportError, match=r"\['sensitivity_at_0.5_fppi'\]"):
        V.tolerances_for({"task": "detection", "tolerances": {"sensitivity_at_0.5_fppi": 0.0}})
    for value in ("0.001", True, -0.1, float("nan"), None):
        with pytest.raises(ExportError, match="finite numbers >= 0"):
            V.tolerances_for({"task": "enhancement", "tolerances": {"ssim": value}})


def test_results_pages_compute_transport_and_runtime_verdicts_from_the_json() -> None:
    """Each verdict follows the data it is rendered from (the committed Zen 3 JSON, then edited)."""
    import copy

    from benchmarks import run_all

    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "amd-epyc-family-25-no-vnni"
    transport = json.loads((root / "transport.json").read_text())
    shm = transport["throughput"]["ours_transport_ipc_shm_w4"]
    row = next(t for t in run_all.render_transport(transport) if t.startswith("| ours_transport_ipc_shm_w4"))
    assert row.endswith(f"| >= 3.0x: {'met' if shm['x_imagezmq'] >= 3 else 'MISSED'} |")
    edited = copy.deepcopy(transport)
    edited["throughput"]["ours_transport_ipc_shm_w4"]["x_imagezmq"] = 3.2
    edited["hop_ipc"]["ours"]["one_way"]["p50"] = edited["hop_ipc"]["bare"]["one_way"]["p50"] * 1.2004
    text = "\n".join(run_all.render_transport(edited))
    assert ">= 3.0x: met" in text and "| 1.200 | <= 1.2: MISSED |" in text
    runtime = json.loads((root / "runtime.json").read_text())
    w = runtime["models"]["xr-denoise"]["wall_ms"]
    row = next(t for t in run_all.render_runtime(runtime) if t.startswith(("| xr-denoise | 0.", "| xr-denoise | 1.")))
    assert row.split(" | ")[1] == f"{w['plain_ort_fp32']['p50'] / w['ours_fp32']['p50']:.2f}"


def test_a_repair_that_fails_names_the_candidates_own_file(tmp_path: Path, calset: C.CalibrationSet) -> None:
    """`export validate --repair` within --max-float 1 of a model that needs three nodes in float: the
    report and the error name the candidate's file (they named the repair's deleted temporary file)."""
    fp32 = blur_model(tmp_path / "fp32.onnx", outlier=True)
    q, _ = cli._int8_factory(fp32, calset, "minmax", tmp_path, False)
    q([], tmp_path / "int8.onnx")
    before = (tmp_path / "int8.onnx").read_bytes()
    (tmp_path / "m.json").write_text(json.dumps(blur_manifest()))
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    argv = ["validate", "--manifest", str(tmp_path / "m.json"), "--fp32", str(fp32), "--frames", "8", "--no-progress",
            "--candidate", f"int8={tmp_path / 'int8.onnx'}", "--report", str(tmp_path / "v.json"), "--repair",
            "--max-float", "1", "--calib-frames", "16", "--min-frames", "16"]
    with pytest.raises(AccuracyGateError, match=r"int8 \(int8\.onnx\)") as err:
        cli.run(parser.parse_args(argv))
    assert "edge-repair-" not in str(err.value)
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["failed_files"] == ["int8.onnx"] and [c["file"] for c in v["candidates"]] == ["int8.onnx"]
    assert not v["repairs"]["int8"]["passed"] and len(v["repairs"]["int8"]["nodes_in_float"]) == 1
    assert (tmp_path / "int8.onnx").read_bytes() == before  # left as it was
