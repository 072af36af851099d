"""Step 3 + calibration: FP16 and INT8 variants, the INT8 graph's form, calibration governance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from test_export_models import blur_manifest, blur_model

from edge_runtime.backends.onnxruntime import OrtBackend
from edge_runtime.errors import ConfigError, ExportError
from edge_runtime.frames import Frame, GroundTruth
from export import calibration as C
from export.lint import check_model, parse_profile
from export.quantize import quantize_int8, to_fp16

SIZE = (64, 64)


def _xr(n: int, seed0: int = C.CALIBRATION_SEED0) -> list[Frame]:
    return list(C.phantom_frames("xr", n, seed0, size=SIZE))


def _calset(n: int = 16, **kw: object) -> C.CalibrationSet:
    return C.build(_xr(n), blur_manifest(), source="test", min_frames=n, **kw)  # type: ignore[arg-type]


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    """Through the runtime's ONNX Runtime backend: an INT8 file whose weights this CPU's int8 kernels would
    saturate (x86 without VNNI) runs its Q/DQ emulated, as the gate and the runtime run it."""
    with OrtBackend(path, providers=["cpu"], threads=2) as b:
        return b.infer({"image": x})[b.outputs[0].name]


def test_fp16_keeps_float32_io_and_matches(tmp_path: Path) -> None:
    src = blur_model(tmp_path / "fp32.onnx")
    out = to_fp16(src, tmp_path / "fp16.onnx")
    m = onnx.load(str(out))
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {i.data_type for i in m.graph.initializer} == {onnx.TensorProto.FLOAT16}
    x = np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(_run(out, x), _run(src, x), atol=2e-3)
    # The converter's input Cast used to come after its readers: ONNX Runtime loaded it, the checker did not.
    onnx.checker.check_model(m, full_check=True)
    assert "onnx-checker" not in check_model(out).rules()


@pytest.mark.parametrize("name", ["us-lesion-det", "xr-denoise"])
def test_fp16_of_a_reference_model_passes_export_check(tmp_path: Path, name: str) -> None:
    src = Path(__file__).parents[1] / "edge_runtime" / "models" / name / "fp32.onnx"
    out = to_fp16(src, tmp_path / "fp16.onnx")
    report = check_model(out)
    assert "onnx-checker" not in report.rules(), report.rules()


def test_int8_graph_is_symmetric_per_channel_with_float_bias(tmp_path: Path) -> None:
    src = blur_model(tmp_path / "fp32.onnx")
    cal = _calset()
    res = quantize_int8(src, tmp_path / "int8.onnx", cal.reader(), method="minmax", float_single_channel_convs=False)
    m = onnx.load(str(res.path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    q = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert q, "no Q/DQ nodes"
    for n in q:
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), n.name
    weights = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    scales = {n.input[0]: inits[n.input[1]].shape for n in weights}
    assert sorted(scales.values()) == [(1,), (4,)]  # one scale per output channel (conv2 has one)
    assert all(inits[n.input[0]].dtype == np.int8 for n in weights)
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert all(inits[c.input[2]].dtype == np.float32 for c in convs)  # bias not quantised
    assert res.summary["nonzero_zero_points"] == 0 and res.summary["per_channel_weights"] == 2
    lint = check_model(res.path, profile=parse_profile("image:1x1x64x64,1x1x64x64,1x1x64x64"))
    assert lint.ok, lint.table()
    x = cal.tensors[0]
    assert np.abs(_run(res.path, x) - _run(src, x)).max() < 0.02


def test_histogram_methods_refuse_mixed_frame_sizes_with_a_message(tmp_path: Path) -> None:
    """A dynamic H/W model calibrated on frames of several sizes: minmax works, percentile and entropy
    failed inside ONNX Runtime ("an inhomogeneous shape after 3 dimensions")."""
    src = blur_model(tmp_path / "fp32.onnx")
    tensors = [np.zeros((1, 1, h, 64), np.float32) for h in (64, 64, 48)]
    for method in ("percentile", "entropy"):
        with pytest.raises(ExportError, match=rf"one tensor size for method {method}.*found '2 sizes"):
            quantize_int8(src, tmp_path / "q.onnx", C.FrameReader("image", tensors), method=method)
    quantize_int8(src, tmp_path / "q.onnx", C.FrameReader("image", tensors), method="minmax")


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_produce_valid_graphs(tmp_path: Path, method: str) -> None:
    src = blur_model(tmp_path / "fp32.onnx")
    res = quantize_int8(src, tmp_path / f"{method}.onnx", _calset().reader(), method=method)
    assert res.summary["nonzero_zero_points"] == 0 and res.info()["calibration_method"] == method


def test_nodes_to_exclude_and_cached_ranges(tmp_path: Path) -> None:
    src = blur_model(tmp_path / "fp32.onnx")
    cache = tmp_path / "ranges.json"
    quantize_int8(src, tmp_path / "a.onnx", _calset().reader(), cache=cache)
    assert cache.is_file()
    res = quantize_int8(src, tmp_path / "b.onnx", None, nodes_to_exclude=["conv2"], cache=cache,
                        float_single_channel_convs=False)
    assert res.summary["float_compute_nodes"] == ["conv2"]
    assert res.info()["nodes_in_float"] == ["conv2"]
    with pytest.raises(ExportError, match="calibration frames or a calibration cache"):
        quantize_int8(src, tmp_path / "c.onnx", None)
    with pytest.raises(ExportError, match="calibration method"):
        quantize_int8(src, tmp_path / "c.onnx", _calset().reader(), method="kl")


# -- calibration governance --------------------------------------------------------------------
def test_too_few_frames_states_count_and_minimum(tmp_path) -> None:
    with pytest.raises(ExportError, match=r"at least 200 calibration frames, found '150 frames'"):
        C.build(_xr(150), blur_manifest(), source="phantom:xr")
    named = tmp_path / "DOE_JANE_MRN1234.dcm"  # a file name can identify a patient: not in the message
    named.write_bytes(b"")
    with pytest.raises(ExportError, match=r"calibration source \(a \.dcm file\): expected at least 200") as info:
        C.build(_xr(150), blur_manifest(), source=str(named))
    assert "DOE" not in str(info.value)


def test_the_calibration_record_names_its_source_by_kind_only(tmp_path) -> None:
    """calibration.json (copied into the bundle's manifest and archive) recorded the --calib path as
    given: data/LEAKTEST_NAME/LEAKID123.dcm, a patient's folder and file name, in every copy of the bundle."""
    named = tmp_path / "DOE_JANE" / "MRN1234"
    named.mkdir(parents=True)
    record = C.build(_xr(12), blur_manifest(), source=str(named), min_frames=12).record(method="minmax")
    assert record["source"] == "(a folder)" and "DOE" not in json.dumps(record) and "MRN" not in json.dumps(record)
    assert C.build(_xr(12), blur_manifest(), source="phantom:xr", min_frames=12).source == "phantom:xr"


def test_wrong_modality_is_an_error_with_counts() -> None:
    us = list(C.phantom_frames("us", 12, C.CALIBRATION_SEED0, size=SIZE))
    with pytest.raises(ExportError, match=r"12 of 12 frames: expected modality in \['DX', 'CR', 'XR'\]"):
        C.build(us, blur_manifest(), source="phantom:us", min_frames=12)


def test_wrong_bit_depth_is_an_error_with_values() -> None:
    frames = _xr(10)
    eight_bit = [Frame((f.pixels >> 4).astype(np.uint8), modality="DX", bits_stored=8, truth=GroundTruth())
                 for f in frames[:3]]
    with pytest.raises(ExportError, match=r"3 of 10 frames: expected bits_stored 12 \(manifest\), found \{8: 3\}"):
        C.build(frames[3:] + eight_bit, blur_manifest(), source="mixed", min_frames=10)


def test_wrong_photometric_is_an_error() -> None:
    """Grey frames for a colour model are refused. Colour frames for a grey model are what the runtime
    takes too (its pre-processing makes them grey, as `infer` does on a colour ultrasound DICOM), so
    calibration takes them (it refused that DICOM before)."""
    rgb = [Frame(np.random.default_rng(i).integers(0, 4096, (*SIZE, 3), dtype=np.uint16), modality="DX",
                 bits_stored=12, photometric="RGB") for i in range(4)]
    assert len(C.build(rgb, blur_manifest(), source="rgb", min_frames=4)) == 4
    colour_model = {**blur_manifest(), "photometric": "RGB", "preprocess": {"color": "rgb"},
                    "inputs": [{"name": "image", "dtype": "float32", "shape": [1, 3, "H", "W"]}]}
    grey = [Frame(np.zeros(SIZE, np.uint16), modality="DX", bits_stored=12) for _ in range(4)]
    with pytest.raises(ExportError, match="photometric RGB"):
        C.build(grey, colour_model, source="grey", min_frames=4)


def test_overlap_with_validation_is_refused() -> None:
    frames = _xr(12)
    val_hashes = [C.frame_sha256(f) for f in frames[5:7]]
    with pytest.raises(ExportError, match="2 of 12 frames shared"):
        C.build(frames, blur_manifest(), source="test", min_frames=12, exclude=val_hashes)


def test_record_hashes_and_reader() -> None:
    frames = _xr(12)
    cal = C.build(frames, blur_manifest(), source="phantom:xr", min_frames=12)
    assert cal.sha256 == C.set_sha256(reversed([C.frame_sha256(f) for f in frames]))  # order-independent
    changed = frames[:11] + [Frame(frames[11].pixels ^ np.uint16(1), modality="DX", bits_stored=12)]
    assert C.build(changed, blur_manifest(), source="x", min_frames=12).sha256 != cal.sha256
    rec = cal.record(method="minmax", min_frames=12)
    assert rec["frames"] == 12 and len(rec["frame_sha256"]) == 12 and rec["modality"] == ["DX"]
    assert rec["bits_stored"] == [12] and rec["tensor_shape"] == ["1x1x64x64"]
    r = cal.reader()
    assert len(r) == 12
    r.set_range(4, 8)
    got = []
    while (item := r.get_next()) is not None:
        got.append(item["image"])
    assert len(got) == 4 and got[0] is cal.tensors[4]
    assert abs(float(cal.tensors[0].max()) - frames[0].pixels.max() / 4095) < 1e-6  # the runtime's scaling


def test_calibration_from_image_folder(tmp_path: Path) -> None:
    """A folder source goes through edge_runtime.sources; 8-bit PNGs of a US model."""
    import cv2

    for i, f in enumerate(C.phantom_frames("us", 6, 1, size=SIZE)):
        cv2.imwrite(str(tmp_path / f"f{i:02d}.png"), f.pixels)
    manifest = {**blur_manifest(), "modality": ["US"], "bits_stored": 8}
    cal = C.build(C.frames_from(str(tmp_path), manifest, 6, seed0=0, modality="US"), manifest,
                  source=str(tmp_path), min_frames=6)
    assert len(cal) == 6 and cal.details["modality"] == ["US"]


def _optimized_ops(path: Path, tmp_path: Path) -> list[str]:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.intra_op_num_threads = 1
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


def _fanout_model(tmp_path: Path, *, same_kernel: bool) -> Path:
    """c0 -> Relu r0 read by two convs ca (3x3) and cb (3x3, or 1x1 when not same_kernel), added."""
    from onnx import TensorProto, helper
    from test_export_models import save

    rng = np.random.default_rng(0)
    kb = 3 if same_kernel else 1
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), "wa"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, kb, kb)).astype(np.float32), "wb"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8,)).astype(np.float32), "bb")]
    nodes = [helper.make_node("Conv", ["image", "w0"], ["c"], name="c0", pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"], name="r0"),
             helper.make_node("Conv", ["r", "wa"], ["a"], name="ca", pads=[1] * 4),
             helper.make_node("Conv", ["r", "wb", "bb"], ["b"], name="cb", pads=[kb // 2] * 4),
             helper.make_node("Add", ["a", "b"], ["enhanced"], name="add")]
    return save(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 64, 64])],
                [helper.make_tensor_value_info("enhanced", TensorProto.FLOAT, [1, 8, 64, 64])], inits,
                tmp_path / "fp32.onnx")


def test_int8_shared_tensor_runs_as_qlinearconv_on_ort_cpu(tmp_path: Path) -> None:
    """A Relu read by two convs: per-reader Q nodes stay distinct (axis), so ORT fuses both convs."""
    src = _fanout_model(tmp_path, same_kernel=False)
    res = quantize_int8(src, tmp_path / "int8.onnx", _calset(8).reader(), float_single_channel_convs=False)
    m = onnx.load(str(res.path))
    assert [n.op_type for n in m.graph.node if n.name == "r0"] == ["LeakyRelu"]
    readers = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "r"]
    axes = [next((a.i for a in n.attribute if a.name == "axis"), 1) for n in readers]
    assert len(readers) == 2 and len(set(axes)) == 2
    x = _calset(8).tensors[0]
    np.testing.assert_allclose(_run(res.path, x), _run(src, x), atol=0.1)
    ops = _optimized_ops(res.path, tmp_path)
    assert ops.count("QLinearConv") == 3 and "Conv" not in ops


def test_sibling_convs_merge_into_one_conv_and_split(tmp_path: Path) -> None:
    """Convs with the same input and attributes become one Conv + Split: same function, one int8 conv."""
    from export.quantize import merge_sibling_convs, preprocess

    src = _fanout_model(tmp_path, same_kernel=True)
    pre = preprocess(src, tmp_path / "pre.onnx", merge_siblings=False)
    assert merge_sibling_convs(pre, tmp_path / "merged.onnx") == 1
    m = onnx.load(str(tmp_path / "merged.onnx"))
    assert [n.op_type for n in m.graph.node].count("Conv") == 2 and "Split" in [n.op_type for n in m.graph.node]
    x = _calset(8).tensors[0]
    np.testing.assert_allclose(_run(tmp_path / "merged.onnx", x), _run(src, x), rtol=1e-5, atol=1e-5)
    res = quantize_int8(src, tmp_path / "int8.onnx", _calset(8).reader(), float_single_channel_convs=False)
    ops = _optimized_ops(res.path, tmp_path)
    assert ops.count("QLinearConv") == 2 and "Conv" not in ops and "LeakyRelu" not in ops
    np.testing.assert_allclose(_run(res.path, x), _run(src, x), atol=0.1)


def test_tensor_read_by_float_and_int8_nodes_keeps_the_int8_conv(tmp_path: Path) -> None:
    """A reader kept in float must not make the int8 reader of the same tensor fall back to float."""
    src = _fanout_model(tmp_path, same_kernel=False)
    res = quantize_int8(src, tmp_path / "int8.onnx", _calset(8).reader(), nodes_to_exclude=["cb"],
                        float_single_channel_convs=False)
    m = onnx.load(str(res.path))
    for q in [n for n in m.graph.node if n.op_type == "QuantizeLinear"]:
        readers = [n for n in m.graph.node if q.output[0] in n.input]
        assert len(readers) == 1 and readers[0].op_type == "DequantizeLinear", q.name
    ops = _optimized_ops(res.path, tmp_path)
    # c0 and ca run as int8; so does cb here: its input is dequantised and its output quantised, and
    # ORT quantises a float weight between those itself
    assert ops.count("QLinearConv") == 3 and "Conv" not in ops
    assert res.summary["float_compute_nodes"] == ["cb"]


def test_single_channel_stem_conv_stays_float_for_speed(tmp_path: Path) -> None:
    """A 3x3 conv over one channel (and its Relu) stays float; a 5x5 one (blur_model's conv1) does not."""
    src = _fanout_model(tmp_path, same_kernel=False)
    res = quantize_int8(src, tmp_path / "int8.onnx", _calset(8).reader())
    assert res.info()["nodes_in_float_for_speed"] == ["c0", "r0"] and res.info()["nodes_in_float"] == []
    assert res.summary["float_compute_nodes"] == ["c0"] and res.summary["nonzero_zero_points"] == 0
    x = _calset(8).tensors[0]
    np.testing.assert_allclose(_run(res.path, x), _run(src, x), atol=0.1)
    ops = _optimized_ops(res.path, tmp_path)
    assert ops.count("QLinearConv") == 2
    blur = quantize_int8(blur_model(tmp_path / "blur.onnx"), tmp_path / "blur8.onnx", _calset().reader())
    assert blur.info()["nodes_in_float_for_speed"] == []


def test_cli_quantize_int8_and_fp16(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import json

    from export import cli

    src = blur_model(tmp_path / "fp32.onnx")
    (tmp_path / "m.json").write_text(json.dumps(blur_manifest()))
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    base = ["quantize", str(src), "--manifest", str(tmp_path / "m.json"), "--no-progress", "--val-frames", "8"]
    args = parser.parse_args(base + ["--precision", "int8", "--out", str(tmp_path / "int8.onnx"),
                                     "--calib-frames", "20", "--min-frames", "20", "--method", "percentile"])
    assert cli.run(args) == 0
    rec = json.loads((tmp_path / "calibration.json").read_text())
    assert rec["frames"] == 20 and rec["method"] == "percentile" and rec["source"].startswith("phantom:xr")
    assert "zero points all 0" in capsys.readouterr().out
    with pytest.raises(ExportError, match="at least 200 calibration frames, found '20 frames'; --calib-frames N "
                                          "reads more, --min-frames N lowers the minimum"):
        cli.run(parser.parse_args(base + ["--precision", "int8", "--out", str(tmp_path / "x.onnx"),
                                          "--calib-frames", "20"]))
    assert cli.run(parser.parse_args(["quantize", str(src), "--precision", "fp16", "--out",
                                      str(tmp_path / "fp16.onnx")])) == 0
    assert (tmp_path / "fp16.onnx").is_file()
    assert "FP16 inside, inputs/outputs float32 as in the FP32 model" in capsys.readouterr().out  # said, not assumed
    # The INT8 file carries its calibration set's sha256: bundling it with another set's record (a review:
    # a cine-calibrated INT8 with a phantom record) is refused, with its own record it bundles.
    assert cli.run(parser.parse_args(base + ["--precision", "int8", "--out", str(tmp_path / "other" / "int8.onnx"),
                                             "--calib-frames", "24", "--min-frames", "24"])) == 0
    bundle = ["bundle", "--manifest", str(tmp_path / "m.json"), "--fp32", str(src), "--int8", str(tmp_path / "int8.onnx")]
    with pytest.raises(ConfigError, match="the record of the set --int8 was calibrated on"):
        cli.run(parser.parse_args(bundle + ["--out", str(tmp_path / "b1"), "--calibration",
                                            str(tmp_path / "other" / "calibration.json")]))
    assert cli.run(parser.parse_args(bundle + ["--out", str(tmp_path / "b2"), "--calibration",
                                               str(tmp_path / "calibration.json")])) == 0


def test_recipe_frames_follow_the_training_record() -> None:
    """Phantoms drawn like the model's training data: generator, size, geometry, dose per role."""
    us = {"modality": ["US"], "training": {"phantom": {
        "generator": "edge_runtime.phantoms.us_frame", "size": [64, 64],
        "geometry": "sector (even seeds) / linear (odd seeds)", "n_lesions": [0, 3]}}}
    frames = list(C.recipe_frames(us, 2, 10))
    assert [f.pixels.shape for f in frames] == [(64, 64)] * 2 and frames[0].modality == "US"
    assert not np.array_equal(frames[0].pixels > 0, frames[1].pixels > 0)  # sector then linear footprint
    xr = {"modality": ["DX"], "training": {"phantom": {
        "generator": "edge_runtime.phantoms.xr_frame", "size": [64, 64],
        "train_dose": "log-uniform 0.05..1.0 per seed", "eval_dose": 0.1}}}
    cal = [f.pixels.astype(float) - f.truth.clean for f in C.recipe_frames(xr, 6, 100)]
    val = [f.pixels.astype(float) - f.truth.clean for f in C.recipe_frames(xr, 6, 100, role="validation")]
    assert len({round(float(n.std()), 3) for n in cal}) == 6  # a different dose per calibration seed
    assert float(np.mean([n.std() for n in val])) > 0  # fixed low evaluation dose: noisy frames
    assert C.recipe_frames({"modality": ["US"]}, 2, 0) is None
    assert "drawn like the training data" in C.describe("phantom", us, 2, 10)


# -- the ONNX Runtime CPU form (int8_cpu.onnx) ----------------------------------------------------
def test_cpu_form_has_uint8_asymmetric_activations_and_symmetric_per_channel_weights(tmp_path: Path) -> None:
    from export.quantize import quantize_int8_cpu

    src = _fanout_model(tmp_path, same_kernel=False)
    res = quantize_int8_cpu(src, tmp_path / "int8_cpu.onnx", _calset(8).reader(), float_single_channel_convs=False)
    m = onnx.load(str(res.path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    acts = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[0] not in inits]
    assert acts and all(inits[n.input[2]].dtype == np.uint8 for n in acts)
    assert any(inits[n.input[2]].any() for n in acts)  # calibrated, asymmetric zero points
    weights = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weights) == 3 and all(inits[n.input[0]].dtype == np.int8 for n in weights)
    assert all(not inits[n.input[2]].any() and inits[n.input[1]].ndim == 1 for n in weights)  # symmetric, per channel
    assert not [n for n in m.graph.node if n.op_type in ("Relu", "LeakyRelu")]  # folded into the uint8 Q
    assert all(inits[c.input[2]].dtype == np.float32 for c in m.graph.node if c.op_type == "Conv" and len(c.input) > 2)
    assert res.form == "cpu" and res.summary["activation_zero_point_types"].keys() == {"uint8"}
    info = res.info()
    assert info["form"] == "onnxruntime-cpu" and "not for TensorRT" in info["note"]
    assert info["activations"].startswith("uint8 asymmetric") and info["weights"] == "int8 symmetric, per-channel, 7-bit (+-64)"
    assert max(int(np.abs(inits[n.input[0]].astype(np.int16)).max()) for n in weights) == 64 == res.summary["weight_peak"]
    x = _calset(8).tensors[0]
    np.testing.assert_allclose(_run(res.path, x), _run(src, x), atol=0.1)
    ops = _optimized_ops(res.path, tmp_path)
    assert ops.count("QLinearConv") == 3 and "Conv" not in ops and "Relu" not in ops
    # The TensorRT lint still refuses it (correctly): asymmetric uint8 Q/DQ.
    assert {"qdq-zero-point", "qdq-type"} <= check_model(res.path).rules("error")


def test_cpu_form_honours_exclusions_and_the_stem_rule(tmp_path: Path) -> None:
    from export.quantize import quantize_int8_cpu

    src = _fanout_model(tmp_path, same_kernel=False)
    cache = tmp_path / "ranges-cpu.json"
    quantize_int8_cpu(src, tmp_path / "a.onnx", _calset(8).reader(), cache=cache)
    res = quantize_int8_cpu(src, tmp_path / "b.onnx", None, cache=cache, nodes_to_exclude=["cb"])
    assert res.summary["float_compute_nodes"] == ["c0", "cb"]
    assert res.info()["nodes_in_float"] == ["cb"] and res.info()["nodes_in_float_for_speed"] == ["c0", "r0"]
    with pytest.raises(ExportError, match="INT8 form"):
        quantize_int8(src, tmp_path / "c.onnx", None, cache=cache, form="trt")


def test_cli_quantize_cpu_form(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import json

    from export import cli

    src = blur_model(tmp_path / "fp32.onnx")
    (tmp_path / "manifest.json").write_text(json.dumps(blur_manifest()))
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    args = parser.parse_args(["quantize", str(src), "--precision", "int8", "--form", "cpu", "--out",
                              str(tmp_path / "int8_cpu.onnx"), "--manifest", str(tmp_path / "manifest.json"),
                              "--calib-frames", "16", "--min-frames", "16", "--val-frames", "8", "--no-progress"])
    assert cli.run(args) == 0
    assert "cpu form" in capsys.readouterr().out
    m = onnx.load(str(tmp_path / "int8_cpu.onnx"))
    zps = {numpy_helper.to_array(i).dtype for i in m.graph.initializer if i.name.endswith("zero_point")}
    assert np.dtype(np.uint8) in zps


def test_preprocess_leaves_nothing_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ORT's symbolic shape inference gives up on the shipped enhancer's dynamic H/W and then saves
    sym_shape_infer_temp.onnx + an external-data file into the cwd: preprocess must keep it elsewhere."""
    from edge_runtime.runtime import reference_bundles
    from export.quantize import preprocess

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    src = reference_bundles()["us-despeckle"] / "fp32.onnx"
    out = preprocess(src, "pre.onnx")  # a relative destination still means the caller's directory
    assert out.resolve() == (cwd / "pre.onnx").resolve() and Path.cwd() == cwd
    assert sorted(p.name for p in cwd.iterdir()) == ["pre.onnx"]
    onnx.checker.check_model(str(out))


def _stem_model(tmp_path: Path, k: int, stride: int, pads: list[int], hw: tuple[object, object]) -> Path:
    from onnx import TensorProto, helper
    from test_export_models import save

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 1, k, k)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "b0"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), "w1")]
    nodes = [helper.make_node("Conv", ["image", "w0", "b0"], ["c"], name="c0", kernel_shape=[k, k],
                              strides=[stride, stride], pads=pads, auto_pad="NOTSET"),  # as ORT's optimiser writes it
             helper.make_node("Relu", ["c"], ["r"], name="r0"),
             helper.make_node("Conv", ["r", "w1"], ["enhanced"], name="c1", pads=[1] * 4)]
    return save(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, *hw])],
                [helper.make_tensor_value_info("enhanced", TensorProto.FLOAT, None)], inits, tmp_path / "stem.onnx")


@pytest.mark.parametrize(("k", "stride", "pads"), [(3, 2, [1, 1, 1, 1]), (5, 2, [2, 2, 2, 2]), (4, 2, [1, 1, 1, 1]),
                                                   (3, 2, [0, 0, 0, 0]), (7, 4, [3, 3, 3, 3]), (3, 2, [1, 0, 0, 1])])
def test_strided_stem_as_space_to_depth_is_the_same_function(tmp_path: Path, k: int, stride: int,
                                                             pads: list[int]) -> None:
    from export.quantize import stem_as_space_to_depth

    src = _stem_model(tmp_path, k, stride, pads, (64, 48))
    assert stem_as_space_to_depth(src, tmp_path / "s2d.onnx") == ["c0"]
    m = onnx.load(str(tmp_path / "s2d.onnx"))
    assert [n.op_type for n in m.graph.node][:2] == ["SpaceToDepth", "Conv"]
    x = np.random.default_rng(2).normal(size=(1, 1, 64, 48)).astype(np.float32)
    np.testing.assert_allclose(_run(tmp_path / "s2d.onnx", x), _run(src, x), atol=2e-5)


@pytest.mark.parametrize("hw", [("h", "w"), (63, 48)])
def test_stem_is_left_alone_without_static_multiples_of_the_stride(tmp_path: Path, hw: tuple[object, object]) -> None:
    from export.quantize import stem_as_space_to_depth

    src = _stem_model(tmp_path, 3, 2, [1, 1, 1, 1], hw)
    assert stem_as_space_to_depth(src, tmp_path / "s2d.onnx") == []
    assert "SpaceToDepth" not in [n.op_type for n in onnx.load(str(tmp_path / "s2d.onnx")).graph.node]


def test_cpu_form_runs_a_strided_stem_as_an_int8_conv(tmp_path: Path) -> None:
    """CPU form: the stride-2 stem becomes SpaceToDepth + an int8 conv (no float conv left); the
    TensorRT form keeps the stem as it is, in float."""
    from export.quantize import quantize_int8_cpu

    src = _stem_model(tmp_path, 3, 2, [1, 1, 1, 1], (64, 64))
    cpu = quantize_int8_cpu(src, tmp_path / "cpu.onnx", _calset(8).reader())
    assert cpu.info()["stems_as_space_to_depth"] == ["c0"] and cpu.info()["nodes_in_float_for_speed"] == []
    assert cpu.summary["float_compute_nodes"] == []
    ops = _optimized_ops(cpu.path, tmp_path)
    assert ops.count("QLinearConv") == 2 and "Conv" not in ops
    x = _calset(8).tensors[0]
    ref = _run(src, x)
    assert np.abs(_run(cpu.path, x) - ref).max() < 0.05 * np.abs(ref).max()
    trt = quantize_int8(src, tmp_path / "trt.onnx", _calset(8).reader())
    assert trt.info()["nodes_in_float_for_speed"] == ["c0", "r0"] and "stems_as_space_to_depth" not in trt.info()


def _saturating_model(tmp_path: Path) -> Path:
    """image -> conv 1->8 (positive) -> Relu -> conv 8->4 (positive 3x3): every product pair of the second
    conv is large and of one sign, the case that overflows 16-bit u8 x s8 pair sums (x86 without VNNI)."""
    from onnx import TensorProto, helper
    from test_export_models import save

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.0, (8, 1, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.uniform(0.5, 1.0, (4, 8, 3, 3)).astype(np.float32), "w1")]
    nodes = [helper.make_node("Conv", ["image", "w0"], ["c"], name="c0", pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"], name="r0"),
             helper.make_node("Conv", ["r", "w1"], ["enhanced"], name="c1", pads=[1] * 4)]
    return save(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 64, 64])],
                [helper.make_tensor_value_info("enhanced", TensorProto.FLOAT, [1, 4, 64, 64])], inits,
                tmp_path / "fp32.onnx")


def _session_out(path: Path, x: np.ndarray, level: str) -> np.ndarray:
    from edge_runtime.backends.onnxruntime import session_options

    sess = ort.InferenceSession(str(path), session_options(threads=1, graph_optimization=level),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": x})[0]


def test_cpu_form_computes_the_same_on_every_x86_int8_kernel(tmp_path: Path) -> None:
    """The CPU form's fused int8 kernels (graph optimisation "all") give what its Q/DQ arithmetic says
    ("basic": emulated in float) also where ORT sums u8 x s8 pairs in saturating 16 bits (x86 without
    VNNI, e.g. AMD Zen 3): its weights are 7-bit. With 8-bit weights such a CPU is off by far more."""
    from export.quantize import quantize_int8_cpu

    src = _saturating_model(tmp_path)
    cal = _calset(8)
    res = quantize_int8_cpu(src, tmp_path / "int8_cpu.onnx", cal.reader(), float_single_channel_convs=False)
    assert res.summary["weight_peak"] <= 64
    x = cal.tensors[0] * (1.0 / max(float(cal.tensors[0].max()), 1e-6))  # the brightest frame the ranges allow
    fused, emulated = _session_out(res.path, x, "all"), _session_out(res.path, x, "basic")
    step = float(np.abs(emulated).max()) / 255  # one output quantisation step
    assert np.abs(fused - emulated).max() <= 2 * step + 1e-6
    from edge_runtime.devices import cpu_int8

    if not cpu_int8().exact:  # where the kernels saturate, the model does make 8-bit weights go wrong
        wide = quantize_int8(src, tmp_path / "int8.onnx", cal.reader(), float_single_channel_convs=False)
        assert wide.summary["weight_peak"] == 127
        assert np.abs(_session_out(wide.path, x, "all") - _session_out(wide.path, x, "basic")).max() > 10 * step


def test_backend_emulates_wide_int8_weights_on_a_saturating_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU whose int8 kernels would saturate (faked: x86 without VNNI), an INT8 file with 8-bit weights
    (the TensorRT form) runs emulated (exact), a 7-bit one (the CPU form) and FP32 run as usual."""
    from edge_runtime.backends import onnxruntime as B
    from edge_runtime.devices import CpuInt8
    from export.quantize import quantize_int8_cpu

    src = _saturating_model(tmp_path)
    cal = _calset(8)
    trt = quantize_int8(src, tmp_path / "int8.onnx", cal.reader(), float_single_channel_convs=False)
    cpu = quantize_int8_cpu(src, tmp_path / "int8_cpu.onnx", cal.reader(), float_single_channel_convs=False)
    assert trt.summary["weight_peak"] == 127 and B.int8_weight_peak(src) == 0
    x = cal.tensors[0]
    for exact, expect in ((True, False), (False, True)):
        monkeypatch.setattr(B, "cpu_int8", lambda exact=exact: CpuInt8("test", "x86_64", ("avx512_vnni",) if exact else (), exact))
        with B.OrtBackend(trt.path, providers=["cpu"], threads=1, precision="int8") as b:
            assert b.int8_emulated is expect
            if expect:
                np.testing.assert_allclose(b.infer({"image": x})["enhanced"], _session_out(trt.path, x, "disable"),
                                           rtol=1e-5, atol=1e-5)
        for path in (cpu.path, src):
            with B.OrtBackend(path, providers=["cpu"], threads=1) as b:
                assert b.int8_emulated is False


def test_backend_emulates_after_onnxruntime_falls_back_from_cuda_to_cpu(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA asked for but unusable: ONNX Runtime (this CPU-only build, for real) serves on its CPU provider
    instead, so an INT8 file with 8-bit weights on a saturating CPU (faked) must still end up emulated."""
    from edge_runtime.backends import onnxruntime as B
    from edge_runtime.devices import CpuInt8

    src = _saturating_model(tmp_path)
    trt = quantize_int8(src, tmp_path / "int8.onnx", _calset(8).reader(), float_single_channel_convs=False)
    monkeypatch.setattr(B, "cpu_int8", lambda: CpuInt8("test", "x86_64", (), False))
    monkeypatch.setattr(B, "resolve_providers", lambda *a: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    x = _calset(8).tensors[0]
    with B.OrtBackend(trt.path, threads=1, precision="int8") as b:
        assert b.provider == "CPUExecutionProvider" and b.int8_emulated is True
        np.testing.assert_allclose(b.infer({"image": x})["enhanced"], _session_out(trt.path, x, "disable"),
                                   rtol=1e-5, atol=1e-5)


def _up_model(tmp_path: Path, k: int = 2, stride: int = 2, pads: list[int] | None = None, bias: bool = True) -> Path:
    """image [1, 4, 16, 16] -> ConvTranspose(4 -> 3, kernel k, stride) -> enhanced."""
    from onnx import TensorProto, helper
    from test_export_models import save

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, k, k)).astype(np.float32), "w")]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (3,)).astype(np.float32), "b"))
    node = helper.make_node("ConvTranspose", ["image", "w", *(["b"] if bias else [])], ["enhanced"], name="up",
                            kernel_shape=[k, k], strides=[stride, stride], pads=pads or [0, 0, 0, 0])
    return save([node], [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 4, 16, 16])],
                [helper.make_tensor_value_info("enhanced", TensorProto.FLOAT, None)], inits, tmp_path / "up.onnx")


@pytest.mark.parametrize(("stride", "bias"), [(2, True), (2, False), (3, True)])
def test_conv_transpose_as_conv_is_the_same_function(tmp_path: Path, stride: int, bias: bool) -> None:
    from export.quantize import conv_transpose_as_conv

    src = _up_model(tmp_path, stride, stride, bias=bias)
    assert conv_transpose_as_conv(src, tmp_path / "conv.onnx") == ["up"]
    assert [n.op_type for n in onnx.load(str(tmp_path / "conv.onnx")).graph.node] == ["Conv", "DepthToSpace"]
    x = np.random.default_rng(4).normal(size=(1, 4, 16, 16)).astype(np.float32)
    y = _run(tmp_path / "conv.onnx", x)
    assert y.shape == (1, 3, 16 * stride, 16 * stride)
    np.testing.assert_allclose(y, _run(src, x), atol=2e-5)


@pytest.mark.parametrize(("k", "pads", "skip"), [(3, [0, 0, 0, 0], ()), (2, [1, 1, 0, 0], ()), (2, None, ("up",))])
def test_conv_transpose_is_left_alone_unless_kernel_is_stride_without_padding(
        tmp_path: Path, k: int, pads: list[int] | None, skip: tuple[str, ...]) -> None:
    from export.quantize import conv_transpose_as_conv

    src = _up_model(tmp_path, k, 2, pads)
    assert conv_transpose_as_conv(src, tmp_path / "conv.onnx", skip) == []
    assert [n.op_type for n in onnx.load(str(tmp_path / "conv.onnx")).graph.node] == ["ConvTranspose"]


def _decoder_model(tmp_path: Path) -> Path:
    """image [1, 1, 64, 64] -> conv 1->8 stride 2 -> Relu -> ConvTranspose 8->8 (2x2, stride 2) + a 1x1 conv
    of the image (a U-Net's skip) -> conv 8->8 stride 2 -> Relu -> nearest Resize x2 (as torch exports
    F.interpolate) -> conv 8->1."""
    from onnx import TensorProto, helper
    from test_export_models import save

    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 2, 2)).astype(np.float32), "wu"),
             numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "bu"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 1, 1, 1)).astype(np.float32), "ws"),
             numpy_helper.from_array(rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(rng.normal(0, 0.2, (1, 8, 3, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["image", "w0"], ["c0"], name="c0", pads=[1] * 4, strides=[2, 2]),
             helper.make_node("Relu", ["c0"], ["r0"], name="r0"),
             helper.make_node("ConvTranspose", ["r0", "wu", "bu"], ["u"], name="up", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["image", "ws"], ["skip"], name="cs"),
             helper.make_node("Add", ["u", "skip"], ["ru"], name="add"),
             helper.make_node("Conv", ["ru", "w1"], ["c1"], name="c1", pads=[1] * 4, strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
             helper.make_node("Resize", ["r1", "", "scales"], ["z"], name="resize", mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
             helper.make_node("Conv", ["z", "w2"], ["enhanced"], name="c2", pads=[1] * 4)]
    return save(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 64, 64])],
                [helper.make_tensor_value_info("enhanced", TensorProto.FLOAT, [1, 1, 64, 64])], inits,
                tmp_path / "dec.onnx")


def test_cpu_form_runs_up_convolution_and_upsampling_in_uint8(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU form: the 2x2 stride-2 ConvTranspose becomes an int8 1x1 conv + DepthToSpace, and the
    DepthToSpace and the nearest Resize move the uint8 tensor channels-last: ONNX Runtime's optimised
    graph keeps no ConvTranspose, Resize or DepthToSpace, adds no layout Transpose over the file without
    the channels-last movement, and computes exactly what that file computes. The TensorRT form keeps both."""
    from export import quantize as Q

    src = _decoder_model(tmp_path)
    cpu = Q.quantize_int8_cpu(src, tmp_path / "cpu.onnx", _calset(8).reader())
    assert cpu.info()["conv_transposes_as_conv"] == ["up"]
    assert sorted(cpu.info()["uint8_movement_in_nhwc"]) == ["resize", "up_depth_to_space"]
    ops = _optimized_ops(cpu.path, tmp_path)
    assert not {"ConvTranspose", "Resize", "DepthToSpace", "DequantizeLinear"} & set(ops[:-1]), ops
    monkeypatch.setattr(Q, "uint8_movement_in_nhwc", lambda path, skip=(): [])
    plain = Q.quantize_int8_cpu(src, tmp_path / "plain.onnx", _calset(8).reader())
    plain_ops = _optimized_ops(plain.path, tmp_path)
    assert {"Resize", "DepthToSpace"} <= set(plain_ops)
    # One Transpose more: the DepthToSpace's own interleave; those into and out of NHWC cancel.
    assert ops.count("Transpose") == plain_ops.count("Transpose") + 1
    x = _calset(8).tensors[0]
    np.testing.assert_array_equal(_run(cpu.path, x), _run(plain.path, x))
    ref = _run(src, x)  # 8-bit activations, 7-bit weights: a few per cent of the peak (a wrong order: ~100%)
    assert np.abs(_run(cpu.path, x) - ref).max() < 0.1 * np.abs(ref).max()
    trt = Q.quantize_int8(src, tmp_path / "trt.onnx", _calset(8).reader())
    assert {"ConvTranspose", "Resize"} <= {n.op_type for n in onnx.load(str(trt.path)).graph.node}
    assert "conv_transposes_as_conv" not in trt.info()


def test_uint8_movement_needs_one_scale_on_both_sides(tmp_path: Path) -> None:
    """A Resize between a DQ and a Q with different scales re-quantises: it is left as it is."""
    from export import quantize as Q

    cpu = Q.quantize_int8_cpu(_decoder_model(tmp_path), tmp_path / "cpu.onnx", _calset(8).reader())
    m = onnx.load(str(cpu.path))
    for i in m.graph.initializer:  # give the upsampled tensor's Q a scale of its own
        if i.name.startswith("z") and i.name.endswith("scale"):
            i.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(i) * 2, i.name))
    onnx.save(m, str(tmp_path / "edited.onnx"))
    assert Q.uint8_movement_in_nhwc(tmp_path / "edited.onnx") == []


def test_conv_transpose_with_a_computed_bias_or_a_taken_name_is_left_alone(tmp_path: Path) -> None:
    from onnx import helper

    from export.quantize import conv_transpose_as_conv

    m = onnx.load(str(_up_model(tmp_path)))
    b = next(i for i in m.graph.initializer if i.name == "b")
    m.graph.initializer.remove(b)
    m.graph.node.insert(0, helper.make_node("Constant", [], ["b"], name="bias", value=b))  # bias from a node
    onnx.save(m, str(tmp_path / "computed.onnx"))
    assert conv_transpose_as_conv(tmp_path / "computed.onnx", tmp_path / "out.onnx") == []
    m = onnx.load(str(_up_model(tmp_path)))
    m.graph.node[0].output[0] = "up_as_conv"  # the name the rewrite would give its conv
    m.graph.output[0].name = "up_as_conv"
    onnx.save(m, str(tmp_path / "taken.onnx"))
    assert conv_transpose_as_conv(tmp_path / "taken.onnx", tmp_path / "out.onnx") == []


def test_cpu_form_keeps_excluded_resize_and_up_convolution_as_they_are(tmp_path: Path) -> None:
    from export import quantize as Q

    cpu = Q.quantize_int8_cpu(_decoder_model(tmp_path), tmp_path / "cpu.onnx", _calset(8).reader(),
                              nodes_to_exclude=["resize", "up"])
    assert cpu.info()["conv_transposes_as_conv"] == [] and cpu.info()["uint8_movement_in_nhwc"] == []
    assert {"ConvTranspose", "Resize"} <= {n.op_type for n in onnx.load(str(cpu.path)).graph.node}


def test_uint8_movement_removes_a_dq_it_leaves_unread(tmp_path: Path) -> None:
    """One DQ read by two Resizes (each with its own Q): both rewritten, the DQ gone, values equal."""
    from onnx import TensorProto, helper
    from test_export_models import save

    from export.quantize import uint8_movement_in_nhwc

    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(3, np.uint8), "z"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")]
    resize = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    nodes = [helper.make_node("QuantizeLinear", ["image", "s", "z"], ["q"], name="q0"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["f"], name="dq"),
             *(helper.make_node("Resize", ["f", "", "sc"], [f"r{i}"], name=f"resize{i}", **resize) for i in (1, 2)),
             *(helper.make_node("QuantizeLinear", [f"r{i}", "s", "z"], [f"y{i}"], name=f"q{i}") for i in (1, 2)),
             helper.make_node("Add", ["y1", "y2"], ["enhanced"], name="add")]  # uint8 + uint8: wraps, equally
    src = save(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, [2, 3, 8, 6])],
               [helper.make_tensor_value_info("enhanced", TensorProto.UINT8, None)], inits, tmp_path / "dq.onnx")
    x = np.random.default_rng(6).random((2, 3, 8, 6), dtype=np.float32) * 10
    before = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert sorted(uint8_movement_in_nhwc(src)) == ["resize1", "resize2"]
    m = onnx.load(str(src))
    assert "DequantizeLinear" not in [n.op_type for n in m.graph.node]
    after = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.testing.assert_array_equal(after, before)


def test_calibration_cache_made_with_an_excluded_up_convolution_is_refused_clearly(tmp_path: Path) -> None:
    """Kept in float, the ConvTranspose is not rewritten, so a cache made then has no range for the 1x1
    conv that replaces it in a later call: an ExportError that names the cache, not a bare ORT error."""
    from export import quantize as Q

    src, cache = _decoder_model(tmp_path), tmp_path / "ranges.json"
    Q.quantize_int8_cpu(src, tmp_path / "a.onnx", _calset(8).reader(), nodes_to_exclude=["up"], cache=cache)
    with pytest.raises(ExportError, match="calibration cache .* lacks that tensor's range"):
        Q.quantize_int8_cpu(src, tmp_path / "b.onnx", None, cache=cache)


def _two_heads(path: Path) -> Path:
    """A stem conv then two 1x1 heads reading one tensor: what merge_sibling_convs merges."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    ws = {"w0": rng.normal(size=(8, 1, 3, 3)), "wa": rng.normal(size=(2, 8, 1, 1)), "wb": rng.normal(size=(3, 8, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["f"], name="stem", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["f"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "wa"], ["heatmap"], name="head_hm", kernel_shape=[1, 1]),
             helper.make_node("Conv", ["r", "wb"], ["size"], name="head_size", kernel_shape=[1, 1])]
    g = helper.make_graph(nodes, "two_heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 32, 32])],
                          [helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, [1, 2, 32, 32]),
                           helper.make_tensor_value_info("size", TensorProto.FLOAT, [1, 3, 32, 32])],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in ws.items()])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("form", ["tensorrt", "cpu"])
def test_a_node_named_to_stay_in_float_stays_in_float(tmp_path: Path, form: str) -> None:
    """Merging sibling heads renamed them, so ONNX Runtime quantised a head the manifest said was kept in
    float; an unknown name (a typo) was skipped the same way. Now the named head stays float, unmerged,
    and an unknown name is refused."""
    src = _two_heads(tmp_path / "fp32.onnx")
    frames = [np.random.default_rng(i).random((1, 1, 32, 32), dtype=np.float32) for i in range(8)]
    res = quantize_int8(src, tmp_path / "int8.onnx", C.FrameReader("x", frames), nodes_to_exclude=["head_hm"],
                        form=form, float_single_channel_convs=False)
    assert "head_hm" in res.summary["float_compute_nodes"] and res.info()["nodes_in_float"] == ["head_hm"]
    assert "head_size" not in res.summary["float_compute_nodes"]
    with pytest.raises(ExportError, match=r"nodes_to_exclude: \['head_hmm'\] not in the graph"):
        quantize_int8(src, tmp_path / "int8b.onnx", C.FrameReader("x", frames), nodes_to_exclude=["head_hmm"],
                      form=form)


def test_keeping_every_node_in_float_gives_the_fp32_outputs_of_merged_centernet_heads(tmp_path) -> None:
    """The three CenterNet heads are merged into one Conv + Split before quantising; ORT quantises a
    Split on its own, so with every repairable node kept in float the heads' outputs stayed int8 (4 Q/DQ
    pairs left, sizes off by about 1 px) and `validate --repair` could never pass (a review's own detector)."""
    from edge_runtime.runtime import reference_bundles
    from export.quantize import preprocess, qdq_summary, quantizable_nodes

    src = reference_bundles()["us-lesion-det"] / "fp32.onnx"
    nodes = quantizable_nodes(preprocess(src, tmp_path / "pre.onnx"))
    assert any(n.endswith("_merged") for n in nodes)
    x = [np.random.default_rng(i).random((1, 1, 256, 256), dtype=np.float32) for i in range(4)]
    quantize_int8(src, tmp_path / "q.onnx", C.FrameReader("image", x, None), nodes_to_exclude=nodes)
    assert qdq_summary(tmp_path / "q.onnx")["quantize_linear"] == 0
    want = ort.InferenceSession(str(src)).run(None, {"image": x[0]})
    got = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, {"image": x[0]})
    for a, b in zip(want, got):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_quantizing_a_modality_the_phantoms_lack_says_to_give_validation_frames(tmp_path: Path) -> None:
    """An MR model with its own --calib: the default validation set (phantoms) failed with "expected a US or
    X-ray modality in the manifest for phantom frames", not saying which option avoids it (a review)."""
    import argparse

    from export import cli

    src = blur_model(tmp_path / "fp32.onnx")
    (tmp_path / "m.json").write_text(json.dumps({**blur_manifest(), "modality": ["MR"]}))
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    args = parser.parse_args(["quantize", str(src), "--manifest", str(tmp_path / "m.json"), "--no-progress",
                              "--precision", "int8", "--out", str(tmp_path / "int8.onnx"), "--calib", str(tmp_path)])
    with pytest.raises(ExportError, match=r"US or X-ray modality .* give held-out frames of your own "
                                          r"\(--val-source PATH with --val-reference CLEAN\)"):
        cli.run(args)
