"""Step 2: onnx.checker, shape inference and the TensorRT lint (rules, table, JSON, exit code)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_export_models import blur_model, save

from edge_runtime.errors import ExportError
from export import cli
from export.lint import check_model, parse_profile


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return cli.run(parser.parse_args(argv))


def _qdq_conv(path: Path, zero_point: int, zp_type: int = TensorProto.INT8, peak: int = 1) -> Path:
    """x -> Q -> DQ -> Conv (int8 weights of +-peak behind a DQ), with the given activation zero point."""
    w = numpy_helper.from_array(np.full((2, 1, 3, 3), peak, np.int8) * np.array([1, -1], np.int8)[:, None, None, None],
                                "w_q")
    inits = [w, numpy_helper.from_array(np.full(2, 0.1, np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(2, np.int8), "w_zp"),
             numpy_helper.from_array(np.array(0.02, np.float32), "x_s"),
             helper.make_tensor("x_zp", zp_type, [], [zero_point])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_zp"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_zp"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["wd"], name="dq_w", axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    return save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 16, 16])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 16, 16])], inits, path)


def test_symmetric_qdq_static_model_is_clean(tmp_path: Path) -> None:
    report = check_model(_qdq_conv(tmp_path / "sym.onnx", 0))
    assert report.ok, report.table()
    assert report.op_counts["QuantizeLinear"] == 1
    dla = check_model(tmp_path / "sym.onnx", dla=1)  # int8 weights behind a DQ count as constant weights
    assert "dla-fallback" not in dla.rules() and "dla" in dla.rules("info")


def test_int8_weights_beyond_7_bits_are_flagged_for_cpus_without_vnni(tmp_path: Path) -> None:
    """8-bit weights run emulated (slow) on x86 CPUs without VNNI: a note for the TensorRT form, a warning for a
    uint8-activation (ONNX Runtime CPU) form, nothing for weights within +-64."""
    assert "cpu-int8-range" not in check_model(_qdq_conv(tmp_path / "w64.onnx", 0, peak=64)).rules()
    trt = check_model(_qdq_conv(tmp_path / "w127.onnx", 0, peak=127))
    assert "cpu-int8-range" in trt.rules("info") and trt.ok
    assert "+-127" in next(f.message for f in trt.findings if f.rule == "cpu-int8-range")
    cpu = check_model(_qdq_conv(tmp_path / "u8.onnx", 128, TensorProto.UINT8, peak=-128))
    assert "cpu-int8-range" in cpu.rules("warn")


def test_asymmetric_qdq_is_an_error(tmp_path: Path) -> None:
    report = check_model(_qdq_conv(tmp_path / "asym.onnx", 7))
    assert not report.ok
    f = [f for f in report.findings if f.rule == "qdq-zero-point"]
    assert {x.node for x in f} == {"q_x", "dq_x"}
    assert "[7]" in f[0].message and f[0].severity == "error"


def test_uint8_asymmetric_quantizer_output_is_flagged(tmp_path: Path) -> None:
    """What ORT's quantizer makes with its CPU defaults (uint8, asymmetric): TensorRT cannot build it."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    src = blur_model(tmp_path / "fp32.onnx")

    class Reader:
        def __init__(self) -> None:
            self.it = iter([{"image": np.random.default_rng(i).random((1, 1, 16, 16), dtype=np.float32) * 2 - 1}
                            for i in range(4)])

        def get_next(self) -> dict | None:
            return next(self.it, None)

    quantize_static(str(src), str(tmp_path / "u8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8)
    report = check_model(tmp_path / "u8.onnx", profile=parse_profile("image:1x1x16x16,1x1x64x64,1x1x128x128"))
    assert {"qdq-zero-point", "qdq-type"} <= report.rules("error")


def test_unsupported_and_custom_ops(tmp_path: Path) -> None:
    nodes = [helper.make_node("Det", ["x"], ["d"], name="det"),
             helper.make_node("Relu", ["d"], ["y"], name="relu")]
    path = save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [], tmp_path / "det.onnx")
    report = check_model(path)
    bad = [f for f in report.findings if f.rule == "unsupported-op"]
    assert [(f.node, f.op_type, f.severity) for f in bad] == [("det", "Det", "error")]
    assert _run_cli(["check", str(path)]) == 1


def test_dynamic_dims_need_a_profile(tmp_path: Path) -> None:
    path = blur_model(tmp_path / "m.onnx")
    report = check_model(path)
    assert report.rules("error") == {"dynamic-dims"}
    ok = check_model(path, profile=parse_profile("image:1x1x64x64,1x1x256x256,1x1x512x512"))
    assert ok.ok and "profile" in ok.rules("info")
    bad = check_model(path, profile=parse_profile("image:1x1x64x64,1x1x32x32,1x1x512x512"))
    assert "profile" in bad.rules("error")
    wrong_static = check_model(path, profile=parse_profile("image:1x3x64x64,1x3x64x64,1x3x64x64"))
    assert "profile" in wrong_static.rules("error")
    with pytest.raises(ExportError, match="profile like"):
        parse_profile("image:1x1x64x64")


def test_opset_range(tmp_path: Path) -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="r")]
    io = ([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    old = check_model(save(nodes, *io, [], tmp_path / "o7.onnx", opset=7))
    assert "opset" in old.rules("error")
    new = check_model(save(nodes, *io, [], tmp_path / "o22.onnx", opset=22))
    assert "opset" in new.rules("warn") and new.ok


def test_dla_fallback_layers(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w")
    big = numpy_helper.from_array(np.ones((4, 4, 33, 33), np.float32), "wbig")
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="conv_ok", pads=[1, 1, 1, 1]),
             helper.make_node("Softplus", ["a"], ["b"], name="softplus"),
             helper.make_node("Conv", ["b", "wbig"], ["c"], name="conv_big", pads=[16, 16, 16, 16]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    path = save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 40, 40])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 40, 40])], [w, big],
                tmp_path / "dla.onnx")
    assert "dla-fallback" not in check_model(path).rules()  # no DLA on the device: no DLA rule
    report = check_model(path, device={"name": "xavier", "dla_cores": 2})
    fallback = {f.node for f in report.findings if f.rule == "dla-fallback"}
    assert fallback == {"softplus", "conv_big"}
    assert report.ok  # fallback is a warning: TensorRT runs those layers on the GPU


def test_dla_concat_reason_names_the_rank(tmp_path: Path) -> None:
    """A rank-3 Concat on axis 1 (a YOLOv8 head) was reported as 'axis 1 (DLA: channel axis only)'."""
    nodes = [helper.make_node("Concat", ["a", "b"], ["y"], name="head_concat", axis=1)]
    path = save(nodes, [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 100]) for n in ("a", "b")],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 100])], [], tmp_path / "c.onnx")
    report = check_model(path, device={"name": "xavier", "dla_cores": 2})
    (finding,) = [f for f in report.findings if f.rule == "dla-fallback"]
    assert "rank-3" in finding.message and "channel axis only" not in finding.message, finding.message


def test_table_and_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _qdq_conv(tmp_path / "asym.onnx", 3)
    assert _run_cli(["check", str(path), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["counts"]["error"] == 2
    assert {f["rule"] for f in data["findings"]} == {"qdq-zero-point"}
    assert _run_cli(["check", str(_qdq_conv(tmp_path / "sym.onnx", 0))]) == 0
    table = capsys.readouterr().out
    assert "severity" in table and "OK" in table


def test_corrupt_file_is_an_export_error(tmp_path: Path) -> None:
    p = tmp_path / "x.onnx"
    p.write_bytes(b"not a protobuf at all \xff\xfe")
    with pytest.raises(ExportError, match="not a readable ONNX model"):
        check_model(p)


def test_cli_check_on_the_cpu_int8_form_reports_tensorrt_errors(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`export check int8_cpu.onnx`: its uint8 asymmetric zero points are TensorRT errors (correctly)."""
    from test_export_models import blur_manifest
    from test_export_quantize import _fanout_model

    from export.calibration import CALIBRATION_SEED0, build, phantom_frames
    from export.quantize import quantize_int8_cpu

    cal = build(phantom_frames("xr", 8, CALIBRATION_SEED0, size=(64, 64)), blur_manifest(), source="t", min_frames=8)
    quantize_int8_cpu(_fanout_model(tmp_path, same_kernel=False), tmp_path / "int8_cpu.onnx", cal.reader())
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    assert cli.run(parser.parse_args(["check", str(tmp_path / "int8_cpu.onnx"), "--json"])) == 1
    data = json.loads(capsys.readouterr().out)
    errors = {f["rule"] for f in data["findings"] if f["severity"] == "error"}
    assert errors == {"qdq-zero-point", "qdq-type"}
    assert any("int8_cpu.onnx" in f["message"] for f in data["findings"])


def _if_model(path: Path, then_nodes: list, else_nodes: list, inits: list) -> Path:
    """y = If(c) with the given branch bodies (outputs 't' / 'e'); ``inits`` in the outer graph."""
    out = helper.make_tensor_value_info
    then_g = helper.make_graph(then_nodes, "then", [], [out("t", TensorProto.FLOAT, [2, 2])])
    else_g = helper.make_graph(else_nodes, "else", [], [out("e", TensorProto.FLOAT, [])])
    node = helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)
    return save([node], [out("m", TensorProto.FLOAT, [2, 2]), out("c", TensorProto.BOOL, [])],
                [out("y", TensorProto.FLOAT, None)], inits, path)


def test_subgraphs_are_linted_for_ops_and_qdq(tmp_path: Path) -> None:
    """If branches (and Loop / Scan bodies) are parsed by TensorRT too: their nodes get the same rules."""
    then_nodes = [helper.make_node("QuantizeLinear", ["m", "s", "zp"], ["q"], name="q_in_branch"),
                  helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["t"], name="dq_in_branch")]
    else_nodes = [helper.make_node("Det", ["m"], ["e"], name="det_in_branch")]
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(5, np.int8), "zp")]  # outer-scope constants, read in the branch
    report = check_model(_if_model(tmp_path / "if.onnx", then_nodes, else_nodes, inits))
    bad = {(f.rule, f.node, f.op_type) for f in report.errors if f.rule in ("unsupported-op", "qdq-zero-point")}
    assert bad == {("unsupported-op", "if/else_branch/det_in_branch", "Det"),
                   ("qdq-zero-point", "if/then_branch/q_in_branch", "QuantizeLinear"),
                   ("qdq-zero-point", "if/then_branch/dq_in_branch", "DequantizeLinear")}, report.table()
    assert not report.ok


def test_quantize_without_zero_point_is_a_uint8_error(tmp_path: Path) -> None:
    """No y_zero_point: ONNX quantises to uint8, which TensorRT cannot build (unless opset 21's
    output_dtype says INT8, whose default zero point is 0)."""
    io = ([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    scale = [numpy_helper.from_array(np.array(0.1, np.float32), "s")]

    def model(name: str, opset: int, **q_attrs: int) -> Path:
        nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"], name="q", **q_attrs),
                 helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dq")]
        return save(nodes, *io, scale, tmp_path / name, opset=opset)

    report = check_model(model("u8.onnx", 17))
    f = [f for f in report.findings if f.rule == "qdq-zero-point"]
    assert [(x.severity, x.node) for x in f] == [("error", "q")] and not report.ok
    assert "found 'no y_zero_point, so ONNX quantises to uint8'" in f[0].message
    int8 = check_model(model("s8.onnx", 21, output_dtype=TensorProto.INT8))
    assert "qdq-zero-point" not in int8.rules(), int8.table()
