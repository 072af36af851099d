"""Step 6: assembling bundles (directory and .tar) and verifying them through edge_runtime.bundle."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from test_export_models import blur_manifest, blur_model

from edge_runtime.bundle import Bundle
from edge_runtime.errors import BundleError
from export import cli
from export.bundle_write import unpack_archive, write_archive, write_bundle
from export.quantize import to_fp16


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return cli.run(parser.parse_args(argv))


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    root = tmp_path / "xr-blur"
    root.mkdir()
    blur_model(root / "fp32.onnx")
    to_fp16(root / "fp32.onnx", root / "fp16.onnx")
    manifest = blur_manifest()
    manifest["artifacts"].append({"file": "fp16.onnx", "kind": "onnx", "precision": "fp16"})
    write_bundle(root, manifest)
    return root


def test_verify_ok_then_fails_after_one_flipped_byte(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["verify", str(bundle)]) == 0
    assert "OK" in capsys.readouterr().out
    data = bytearray((bundle / "fp16.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / "fp16.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"fp16.onnx: sha256 .* manifest says"):
        Bundle.load(bundle)
    assert _cli(["verify", str(bundle)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "fp16.onnx" in out and "fp32.onnx" not in out


def test_verify_builds_the_pre_and_post_processing_the_runtime_would(bundle: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown pre-processing key passed verify and failed only when a runtime loaded the bundle."""
    m = json.loads((bundle / "manifest.json").read_text())
    m["preprocess"]["bogus"] = 1
    write_bundle(bundle, m)  # hashes agree: only the key is wrong
    assert _cli(["verify", str(bundle)]) == 1
    assert "FAILED" in (out := capsys.readouterr().out) and "bogus" in out
    root = Path(__file__).resolve().parents[1] / "edge_runtime" / "models"
    assert _cli(["verify", *map(str, sorted(root.glob("*/")))]) == 0  # the shipped bundles pass


def test_verify_checks_the_manifests_tensors_against_the_model(bundle: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """From an export walkthrough: a manifest naming input 'images' for the model's 'image', or shapes
    the model does not have, verified OK, and then the runtime skipped every frame."""
    good = json.loads((bundle / "manifest.json").read_text())
    for change, word in ((lambda m: m["inputs"][0].update(name="images"), "'images'"),
                         (lambda m: m["outputs"][0].update(shape=[1, 3, "H", "W"]), "the model's shape"),
                         (lambda m: m["outputs"][0].update(name="denoised"), "a name of the model's outputs")):
        m = json.loads(json.dumps(good))
        change(m)
        write_bundle(bundle, m)
        assert _cli(["verify", str(bundle)]) == 1
        out = capsys.readouterr().out
        assert "FAILED" in out and word in out, out
    write_bundle(bundle, good)
    assert _cli(["verify", str(bundle)]) == 0


def test_a_detectors_class_count_is_checked_against_its_output(tmp_path: Path) -> None:
    """A YOLOv8-layout model [1, 4 + 2, N] with 3 class names in the manifest verified OK; each frame was
    then refused ("expected a YOLOv8 output [1, 7, N]")."""
    import types

    import onnx
    from onnx import TensorProto, helper

    from edge_runtime.errors import ConfigError
    from export.cli import _check_io

    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["output0"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 6, 16])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 6, 16])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    m = {"inputs": [{"name": "image", "shape": [1, 6, 16]}], "outputs": [{"name": "output0", "shape": [1, 6, 16]}],
         "postprocess": {"type": "yolov8", "output": "output0"}}
    _check_io(m, tmp_path / "m.onnx", types.SimpleNamespace(classes=["cyst", "solid"]))
    with pytest.raises(ConfigError, match=r"a model output \[1, 4 \+ 3, N\] \(YOLOv8 layout\), found \[1, 6, 16\]"):
        _check_io(m, tmp_path / "m.onnx", types.SimpleNamespace(classes=["cyst", "solid", "calcification"]))


def _graph(tmp_path: Path, inputs: dict[str, list[int | str]], outputs: dict[str, tuple[list[int | str], int]],
           name: str = "m") -> Path:
    """A model of Casts of its first input: only the names, dtypes and shapes of its tensors matter here."""
    import onnx
    from onnx import TensorProto, helper

    first = next(iter(inputs))
    nodes = [helper.make_node("Cast", [first], [name], to=dtype) for name, (_, dtype) in outputs.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
                              [helper.make_tensor_value_info(n, d, s) for n, (s, d) in outputs.items()])
    path = tmp_path / f"{name}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_the_manifest_is_checked_against_what_the_runtime_will_feed_and_read(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Each of these verified OK and then every frame was skipped, or gave wrong results (a review bringing
    its own models): a second model input, a post-processing output name the model lacks, a CenterNet stride
    its fixed shapes rule out (stride 8 on a stride-4 head: no findings), a float16 output named float32."""
    from onnx import TensorProto

    from edge_runtime.errors import ConfigError
    from export.cli import _check_processing

    f32 = TensorProto.FLOAT
    head = {"heatmap": ([1, 2, 32, 32], f32), "size": ([1, 2, 32, 32], f32), "offset": ([1, 2, 32, 32], f32)}
    det = {"inputs": [{"name": "image", "dtype": "float32", "shape": [1, 1, 128, 128]}],
           "outputs": [{"name": n, "dtype": "float32", "shape": s} for n, (s, _) in head.items()],
           "preprocess": {"resize": {"mode": "letterbox", "size": [128, 128]}},
           "postprocess": {"type": "centernet", "stride": 4, "classes": ["a", "b"]}}
    model = _graph(tmp_path, {"image": [1, 1, 128, 128]}, head)
    _check_processing(det, model)  # as made: fine
    odd = {n: ([1, 2, 63, 63], t) for n, (_, t) in head.items()}  # 250 / 4 rounded up: a working head
    _check_processing({**det, "inputs": [{**det["inputs"][0], "shape": [1, 1, 250, 250]}],
                       "outputs": [{**t, "shape": [1, 2, 63, 63]} for t in det["outputs"]],
                       "preprocess": {"resize": {"mode": "letterbox", "size": [250, 250]}}},
                      _graph(tmp_path, {"image": [1, 1, 250, 250]}, odd, "odd"))
    for change, match in (({"stride": 8}, r"postprocess.stride 8: expected input / heatmap size, \[4.0, 4.0\]"),
                          ({"outputs": {"heatmap": "hm"}}, r"output names among the model's outputs .* found \['hm'\]")):
        with pytest.raises(ConfigError, match=match):
            _check_processing({**det, "postprocess": {**det["postprocess"], **change}}, model)
    two = _graph(tmp_path, {"image": [1, 1, 128, 128], "prior": [1, 1, 128, 128]}, head)
    with pytest.raises(ConfigError, match=r"one image input .* found \"inputs \['image', 'prior'\]"):
        _check_processing(det, two)
    enh = {"inputs": [{"name": "image", "dtype": "float32", "shape": [1, 1, "H", "W"]}],
           "outputs": [{"name": "enhanced", "dtype": "float32", "shape": [1, 1, "H", "W"]}],
           "preprocess": {}, "postprocess": {"type": "enhance", "output": "enhanced"}}
    half = _graph(tmp_path, {"image": [1, 1, "H", "W"]}, {"enhanced": ([1, 1, "H", "W"], TensorProto.FLOAT16)})
    with pytest.raises(ConfigError, match=r"manifest outputs 'enhanced': expected the model's dtype float16"):
        _check_processing(enh, half)
    fixed = _graph(tmp_path, {"image": [1, 1, 64, 64]}, {"enhanced": ([1, 1, 64, 64], f32)})
    capsys.readouterr()
    _check_processing({**enh, "inputs": [{**enh["inputs"][0], "shape": [1, 1, 64, 64]}],
                       "outputs": [{**enh["outputs"][0], "shape": [1, 1, 64, 64]}]}, fixed)
    assert "fixed at 64x64 and preprocess.resize mode is none: frames of any other size" in capsys.readouterr().err


def test_verify_fails_on_an_unlisted_file(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (bundle / "extra.onnx").write_bytes(b"\x08\x07")
    assert _cli(["verify", str(bundle)]) == 1
    assert "extra.onnx: present but not listed" in capsys.readouterr().out


def test_a_nested_file_named_manifest_json_is_listed_like_any_other(bundle: Path) -> None:
    """Only the top-level manifest.json is the manifest: write_bundle used to skip every file of that name,
    and the bundle it had just written then failed its own verification."""
    (bundle / "notes").mkdir()
    (bundle / "notes" / "manifest.json").write_text("{}")
    written = write_bundle(bundle, json.loads((bundle / "manifest.json").read_text()))
    assert "notes/manifest.json" in written.manifest["files"]
    Bundle.load(bundle, verify=True)


def test_symbolic_links_are_refused_by_write_and_verify(bundle: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.onnx").write_bytes(b"\x08\x07")
    (bundle / "linked").symlink_to(outside, target_is_directory=True)  # rglob does not enter it
    with pytest.raises(BundleError, match=r"linked: a symbolic link"):
        Bundle.load(bundle, verify=True)
    with pytest.raises(BundleError, match=r"expected plain files only, found \"symbolic links \['linked'\]\""):
        write_bundle(bundle, json.loads((bundle / "manifest.json").read_text()))


def test_archive_is_deterministic_and_verifiable(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_archive(bundle, tmp_path / "a.tar")
    b = write_archive(bundle, tmp_path / "b.tar")
    assert a.read_bytes() == b.read_bytes()
    assert _cli(["verify", str(a)]) == 0
    unpacked = unpack_archive(a, tmp_path / "x")
    assert Bundle.load(unpacked).sha256 == Bundle.load(bundle).sha256
    raw = bytearray(a.read_bytes())
    i = raw.find(b"ONNX", 2048)  # inside a member's data, past the first headers
    raw[i if i > 0 else 4096] ^= 0x20
    (tmp_path / "bad.tar").write_bytes(bytes(raw))
    capsys.readouterr()
    assert _cli(["verify", str(tmp_path / "bad.tar")]) == 1
    said = capsys.readouterr().out  # the archive, not the temporary folder it was unpacked into
    assert f"bundle {tmp_path / 'bad.tar'}/xr-blur failed verification" in said and "edge-verify-" not in said, said


def test_unpack_refuses_paths_outside(tmp_path: Path) -> None:
    import io
    import tarfile

    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("b/../../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(BundleError):
        unpack_archive(evil, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_cli_bundle_assembles_from_artefacts(tmp_path: Path) -> None:
    blur_model(tmp_path / "model.onnx")
    to_fp16(tmp_path / "model.onnx", tmp_path / "half.onnx")
    m = blur_manifest()
    m["artifacts"] = []
    (tmp_path / "m.json").write_text(json.dumps(m))
    cal = {"frames": 200, "source": "phantom:xr", "sha256": "ab" * 32, "method": "minmax", "min_frames": 200}
    (tmp_path / "cal.json").write_text(json.dumps(cal))
    out = tmp_path / "out"
    assert _cli(["bundle", "--manifest", str(tmp_path / "m.json"), "--out", str(out), "--fp32",
                 str(tmp_path / "model.onnx"), "--fp16", str(tmp_path / "half.onnx"), "--calibration",
                 str(tmp_path / "cal.json"), "--archive", str(tmp_path / "out.tar")]) == 0
    b = Bundle.load(out)
    assert {a.precision for a in b.artifacts} == {"fp32", "fp16"}
    assert b.manifest["calibration"]["sha256"] == "ab" * 32
    assert set(b.manifest["files"]) == {"fp32.onnx", "fp16.onnx", "calibration.json"}
    assert _cli(["verify", str(tmp_path / "out.tar")]) == 0


# -- artefact targets: int8.onnx runs everywhere, int8_cpu.onnx on ONNX Runtime's CPU provider only -------
def _two_int8(tmp_path: Path) -> Path:
    """A bundle assembled by `export bundle` with both INT8 files (stand-ins: copies of the FP32 graph)."""
    blur_model(tmp_path / "model.onnx")
    m = blur_manifest()
    m["artifacts"] = []
    (tmp_path / "m.json").write_text(json.dumps(m))
    out = tmp_path / "out"
    assert _cli(["bundle", "--manifest", str(tmp_path / "m.json"), "--out", str(out), "--fp32",
                 str(tmp_path / "model.onnx"), "--int8", str(tmp_path / "model.onnx"), "--int8-cpu",
                 str(tmp_path / "model.onnx")]) == 0
    return out


def test_bundle_records_targets_and_picks_the_artefact_per_target(tmp_path: Path) -> None:
    b = Bundle.load(_two_int8(tmp_path))
    by_file = {a.file: a for a in b.artifacts}
    assert by_file["int8.onnx"].targets == ("tensorrt", "onnxruntime") and by_file["int8.onnx"].precision == "int8"
    assert by_file["int8_cpu.onnx"].targets == ("onnxruntime-cpu",) and by_file["int8_cpu.onnx"].precision == "int8"
    assert by_file["fp32.onnx"].targets == () and by_file["fp32.onnx"].serves("tensorrt")
    assert b.artifact("int8").file == "int8.onnx"  # no target: the one that serves every backend
    assert b.artifact("int8", target="tensorrt").file == "int8.onnx"
    assert b.artifact("int8", target="onnxruntime").file == "int8.onnx"
    assert b.artifact("int8", target="onnxruntime-cpu").file == "int8_cpu.onnx"
    assert b.artifact("fp32", target="onnxruntime-cpu").file == "fp32.onnx"  # no targets: every backend
    assert not by_file["int8_cpu.onnx"].serves("tensorrt") and by_file["int8.onnx"].serves("onnxruntime-cpu")


def test_cpu_only_artefact_never_serves_tensorrt_and_is_verified(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = _two_int8(tmp_path)
    m = json.loads((root / "manifest.json").read_text())
    m["artifacts"] = [a for a in m["artifacts"] if a["file"] != "int8.onnx"]
    (root / "int8.onnx").unlink()
    b = write_bundle(root, m)
    with pytest.raises(BundleError, match="for every backend"):
        b.artifact("int8")
    with pytest.raises(BundleError, match="for tensorrt"):
        b.artifact("int8", target="tensorrt")
    assert b.artifact("int8", target="onnxruntime-cpu").file == "int8_cpu.onnx"
    data = bytearray((root / "int8_cpu.onnx").read_bytes())
    data[-1] ^= 1
    (root / "int8_cpu.onnx").write_bytes(bytes(data))
    assert _cli(["verify", str(root)]) == 1
    assert "int8_cpu.onnx: sha256" in capsys.readouterr().out


def test_unknown_or_empty_targets_are_refused(tmp_path: Path) -> None:
    root = _two_int8(tmp_path)
    m = json.loads((root / "manifest.json").read_text())
    for bad in (["cuda"], [], "onnxruntime"):
        m["artifacts"][-1]["targets"] = bad
        (root / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(BundleError, match="targets"):
            Bundle.load(root)


def test_two_artefacts_that_serve_the_same_target_are_refused(tmp_path: Path) -> None:
    """int8.onnx and int8_cpu.onnx may share a precision only because their targets differ."""
    root = _two_int8(tmp_path)
    m = json.loads((root / "manifest.json").read_text())
    cpu = next(a for a in m["artifacts"] if a["file"] == "int8_cpu.onnx")
    for overlapping in (["onnxruntime"], None):  # names a target of int8.onnx / no targets = every backend
        if overlapping is None:
            cpu.pop("targets", None)
        else:
            cpu["targets"] = overlapping
        (root / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(BundleError, match="disjoint"):
            Bundle.load(root)


# -- what `export bundle` trusts: the gate report it is given, files made from this fp32 -------------------
def _report(files: dict[str, bool]) -> dict[str, object]:
    from export.validate import REPORT_FORMAT

    return {"format": REPORT_FORMAT, "version": 1, "frames": 200, "source": "phantom:xr", "tolerances": {},
            "passed": all(files.values()), "candidates": [{"file": f, "passed": ok} for f, ok in files.items()]}


def _bundle_with_report(tmp_path: Path, report: dict[str, object] | None, template_passed: bool = True,
                        extra: Sequence[str] = ()) -> int:
    blur_model(tmp_path / "model.onnx")
    to_fp16(tmp_path / "model.onnx", tmp_path / "fp16.onnx")
    m = blur_manifest()
    m["artifacts"] = []
    m["validation"] = {"file": "validation.json", "passed": template_passed}  # a template's, for other files
    (tmp_path / "m.json").write_text(json.dumps(m))
    argv = ["bundle", "--manifest", str(tmp_path / "m.json"), "--out", str(tmp_path / "out"), "--fp32",
            str(tmp_path / "model.onnx"), "--fp16", str(tmp_path / "fp16.onnx")]
    if report is not None:
        (tmp_path / "validation.json").write_text(json.dumps(report))
        argv += ["--validation", str(tmp_path / "validation.json")]
    return _cli([*argv, *extra])


def test_bundle_gate_record_comes_from_the_report_not_the_template(tmp_path: Path) -> None:
    from edge_runtime.devices import load_config
    from edge_runtime.runtime import choose_precision

    assert _bundle_with_report(tmp_path, None) == 0  # no report: the template's "passed" is dropped
    b = Bundle.load(tmp_path / "out")
    assert "validation" not in b.manifest and choose_precision(b, load_config("cpu-x86")) == "fp32"
    assert _bundle_with_report(tmp_path, _report({"fp16.onnx": True}), template_passed=False) == 0
    b = Bundle.load(tmp_path / "out")
    assert b.manifest["validation"]["passed"] is True and b.manifest["validation"]["frames"] == 200
    # Bundling only the candidates that passed (what the gate's error advises) loads: the record speaks
    # for the bundled files, not for the report's failed int8.
    assert _bundle_with_report(tmp_path, _report({"fp16.onnx": True, "int8.onnx": False})) == 0
    assert Bundle.load(tmp_path / "out").manifest["validation"]["passed"] is True


def test_bundle_refuses_a_failed_or_missing_gate_result(tmp_path: Path) -> None:
    from edge_runtime.errors import AccuracyGateError, ConfigError

    with pytest.raises(AccuracyGateError, match="fp16.onnx failed the accuracy gate"):
        _bundle_with_report(tmp_path, _report({"fp16.onnx": False}))
    with pytest.raises(ConfigError, match="a result for fp16.onnx"):
        _bundle_with_report(tmp_path, _report({"int8.onnx": True}))
    with pytest.raises(ConfigError, match="edge-runtime-validation report"):
        _bundle_with_report(tmp_path, {"passed": True})


def test_bundle_refuses_another_models_calibration_and_a_name_with_a_slash(tmp_path: Path) -> None:
    """From an export walkthrough: an X-ray model's calibration.json went into a US bundle and its manifest
    claimed that calibration; a bundle named "lab/yolo" made an archive only the reader refused."""
    from edge_runtime.errors import ConfigError

    blur_model(tmp_path / "model.onnx")
    m = blur_manifest()
    m["artifacts"] = []
    (tmp_path / "m.json").write_text(json.dumps(m))
    base = ["bundle", "--manifest", str(tmp_path / "m.json"), "--out", str(tmp_path / "out"), "--fp32",
            str(tmp_path / "model.onnx"), "--calibration", str(tmp_path / "calibration.json")]
    record = {"format": "edge-runtime-calibration", "model": "us-lesion-det", "modality": ["US"], "bits_stored": [8],
              "frames": 200, "source": "phantom:us", "sha256": "0" * 64, "method": "minmax", "min_frames": 200}
    (tmp_path / "calibration.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"--calibration made for 'xr-blur', found \"one for 'us-lesion-det'\""):
        _cli(base)
    (tmp_path / "calibration.json").write_text(json.dumps({**record, "model": "xr-blur"}))
    with pytest.raises(ConfigError, match=r"modality in \['CR', 'DX', 'XR'\]"):
        _cli(base)
    (tmp_path / "calibration.json").write_text(json.dumps({**record, "model": "xr-blur", "modality": ["DX"],
                                                           "bits_stored": [12]}))
    assert _cli(base) == 0
    m["name"] = "lab/blur"
    (tmp_path / "m.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="no '/'"):
        _cli([*base[:4], str(tmp_path / "out2"), *base[5:-2]])  # no calibration record


def test_bundle_refuses_a_calibration_sharing_frames_with_the_gate(tmp_path: Path) -> None:
    """`export quantize` checks calibration against its own --val-source (phantoms by default), so an INT8
    calibrated on the very frames `export validate --source` then judged it by was bundled, its record
    saying "validation_overlap 0" (a review). The report now lists the frames judged; bundle compares."""
    from edge_runtime.errors import ConfigError

    record = {"format": "edge-runtime-calibration", "model": "xr-blur", "modality": ["DX"], "bits_stored": [12],
              "frames": 3, "source": "(a folder)", "sha256": "0" * 64, "method": "minmax", "min_frames": 3,
              "frame_sha256": ["a" * 64, "b" * 64, "c" * 64]}
    (tmp_path / "calibration.json").write_text(json.dumps(record))
    for judged, ok in ((["d" * 64], True), (["b" * 64, "e" * 64], False)):
        report = {**_report({"fp16.onnx": True}), "frame_sha256": judged}
        (tmp_path / "validation.json").write_text(json.dumps(report))
        argv = ["--calibration", str(tmp_path / "calibration.json"), "--validation", str(tmp_path / "validation.json")]
        if ok:
            assert _bundle_with_report(tmp_path, None, extra=argv) == 0
        else:
            with pytest.raises(ConfigError, match="none of which the gate .* found '1 of its 3 frames among them'"):
                _bundle_with_report(tmp_path, None, extra=argv)


def test_quantize_refuses_to_write_into_a_bundle(bundle: Path) -> None:
    """`export quantize --out BUNDLE/int8.onnx` overwrote the bundle's int8.onnx and calibration.json, and
    the bundle no longer verified."""
    from edge_runtime.errors import ConfigError

    before = {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="outside a bundle"):
        _cli(["quantize", str(bundle / "fp32.onnx"), "--precision", "int8", "--bundle", str(bundle),
              "--out", str(bundle / "int8.onnx")])
    assert {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()} == before


def test_bundle_refuses_missing_input_files_before_writing(tmp_path: Path) -> None:
    from edge_runtime.errors import ConfigError

    blur_model(tmp_path / "model.onnx")
    (tmp_path / "m.json").write_text(json.dumps(blur_manifest()))
    with pytest.raises(ConfigError, match="existing files to bundle"):
        _cli(["bundle", "--manifest", str(tmp_path / "m.json"), "--out", str(tmp_path / "out"), "--fp32",
              str(tmp_path / "model.onnx"), "--int8", str(tmp_path / "absent.onnx")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--manifest"):
        _cli(["bundle", "--manifest", str(tmp_path / "absent.json"), "--out", str(tmp_path / "out"), "--fp32",
              str(tmp_path / "model.onnx")])


def test_derived_artefact_of_another_fp32_is_refused_as_stale(bundle: Path) -> None:
    """fp16.onnx records the fp32 it was made from; after the fp32 is swapped it no longer matches."""
    m = json.loads((bundle / "manifest.json").read_text())
    fp32_sha = m["files"]["fp32.onnx"]
    for a in m["artifacts"]:
        if a["file"] == "fp16.onnx":
            a["info"] = {"source_fp32_sha256": fp32_sha}
    write_bundle(bundle, m)  # consistent: loads
    blur_model(bundle / "fp32.onnx", damage=0.5)  # a different fp32, fp16.onnx left behind
    with pytest.raises(BundleError, match="stale"):
        write_bundle(bundle, m)
    assert Bundle.load(bundle, verify=False).manifest["files"]["fp32.onnx"] == fp32_sha  # the old manifest stays


@pytest.mark.parametrize(("field", "value"), [
    ("artifacts", ["fp32.onnx"]), ("files", {"fp32.onnx": None}), ("preprocess", "window"),
    ("artifacts", {"file": "fp32.onnx"}), ("inputs", "x"), ("outputs", [{"shape": [1]}]), ("modality", "XR"),
    ("format_version", True), ("bits_stored", 40), ("artifacts", [])])
def test_malformed_manifest_is_a_bundle_error(bundle: Path, field: str, value: object) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    m[field] = value
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=field):
        Bundle.load(bundle)


def test_a_misspelt_field_or_an_unknown_photometric_is_refused(bundle: Path) -> None:
    """A misspelt "bits_stord" was ignored, so the bit-depth check was off and an 8-bit model ran on
    16-bit frames; "tolerences" left the gate on its defaults; "MONOCHROME3" was taken (a review)."""
    m = json.loads((bundle / "manifest.json").read_text())
    for field, value, match in (("bits_stord", 8, r"unknown field\(s\) \['bits_stord'\]"),
                                ("tolerences", {"psnr_db": 0.3}, "tolerences"),
                                ("photometric", "MONOCHROME3", "photometric in")):
        with pytest.raises(BundleError, match=match):
            write_bundle(bundle, {**m, field: value})
    Bundle.load(bundle, verify=True)  # left as it was


def test_a_hash_that_is_not_lower_case_hex_is_refused(bundle: Path) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"]["fp32.onnx"] = m["files"]["fp32.onnx"].upper()  # was read as "stale" naming the same hash
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="64 lower-case hex digits"):
        Bundle.load(bundle)


def test_a_gate_report_on_another_fp32_model_is_refused(tmp_path: Path) -> None:
    """A report records the sha256 of the FP32 it judged: bundling it with another model's fp32.onnx
    (a mixed bundle: one model's gate, another's weights) is refused, and so is such a bundle on load."""
    from edge_runtime.bundle import sha256_file
    from edge_runtime.errors import ConfigError

    blur_model(tmp_path / "other.onnx", damage=0.5)
    report = _report({"fp16.onnx": True}) | {"fp32": {"metrics": {}, "sha256": sha256_file(tmp_path / "other.onnx")}}
    with pytest.raises(ConfigError, match="judged against fp32 sha256"):
        _bundle_with_report(tmp_path, report)
    blur_model(tmp_path / "model.onnx")
    report["fp32"] = {"metrics": {}, "sha256": sha256_file(tmp_path / "model.onnx")}
    assert _bundle_with_report(tmp_path, report) == 0  # the right model: bundled
    out = tmp_path / "out"
    blur_model(out / "fp32.onnx", damage=0.5)  # swap the weights, re-hash the manifest
    m = json.loads((out / "manifest.json").read_text())
    with pytest.raises(BundleError, match="another model"):
        write_bundle(out, m)


def test_write_bundle_leaves_no_temporary_manifest_on_failure(bundle: Path) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    m["description"] = object()  # json cannot write it
    with pytest.raises(TypeError):
        write_bundle(bundle, m)
    assert sorted(p.name for p in bundle.iterdir()) == ["fp16.onnx", "fp32.onnx", "manifest.json"]
    Bundle.load(bundle)


def test_staged_rewrite_swaps_in_whole_or_not_at_all(bundle: Path) -> None:
    from export.bundle_write import staged

    before = (bundle / "manifest.json").read_bytes()
    with pytest.raises(RuntimeError), staged(bundle) as stage:
        (stage / "fp16.onnx").write_bytes(b"half written")
        raise RuntimeError("crash mid-export")
    assert (bundle / "manifest.json").read_bytes() == before and Bundle.load(bundle)
    with staged(bundle) as stage:
        m = json.loads((stage / "manifest.json").read_text())
        m["description"] = "rewritten"
        write_bundle(stage, m)
    assert Bundle.load(bundle).manifest["description"] == "rewritten"
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["xr-blur"]  # no stage or backup left


def test_bundle_matches_verdicts_to_files_by_sha256(tmp_path: Path) -> None:
    """A passing verdict for another file of the same name does not vouch for the file being bundled."""
    from edge_runtime.bundle import sha256_file
    from edge_runtime.errors import ConfigError

    blur_model(tmp_path / "other.onnx", damage=0.5)
    report = _report({"fp16.onnx": True})
    report["candidates"][0]["sha256"] = sha256_file(tmp_path / "other.onnx")  # type: ignore[index]
    with pytest.raises(ConfigError, match="a result for fp16.onnx"):
        _bundle_with_report(tmp_path, report)
    to_fp16(tmp_path / "model.onnx", tmp_path / "fp16.onnx")
    report["candidates"][0]["sha256"] = sha256_file(tmp_path / "fp16.onnx")  # type: ignore[index]
    assert _bundle_with_report(tmp_path, report) == 0


def test_bundle_in_place_needs_a_verdict_for_every_listed_artefact(bundle: Path, tmp_path: Path) -> None:
    """Re-bundling in place with a report on int8 only must not vouch for the fp16.onnx already there."""
    from edge_runtime.errors import ConfigError

    blur_model(tmp_path / "int8.onnx")
    (tmp_path / "v.json").write_text(json.dumps(_report({"int8.onnx": True})))
    argv = ["bundle", "--manifest", str(bundle / "manifest.json"), "--out", str(bundle), "--int8",
            str(tmp_path / "int8.onnx"), "--validation", str(tmp_path / "v.json")]
    with pytest.raises(ConfigError, match="a result for fp16.onnx"):
        _cli(argv)
    Bundle.load(bundle)  # untouched and still valid
    (tmp_path / "v.json").write_text(json.dumps(_report({"int8.onnx": True, "fp16.onnx": True})))
    assert _cli(argv) == 0 and Bundle.load(bundle).manifest["validation"]["passed"] is True


def test_staging_copies_are_not_reference_models(monkeypatch: pytest.MonkeyPatch, bundle: Path) -> None:
    """A crash mid-swap can leave .NAME.stage-PID behind: it must not be listed as a shipped model."""
    import shutil

    from edge_runtime import runtime

    models = bundle.parent / "edge_runtime" / "models"
    models.mkdir(parents=True)
    shutil.copytree(bundle, models / "xr-blur")
    shutil.copytree(bundle, models / ".xr-blur.stage-123")
    monkeypatch.setattr(runtime, "__file__", str(bundle.parent / "edge_runtime" / "runtime.py"))
    assert list(runtime.reference_bundles()) == ["xr-blur"]


def test_a_bundle_carries_engines_for_fixed_targets_and_the_runtime_takes_the_matching_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`export bundle --engine` takes engines from a cache (key from the sidecar, bytes checked), one per
    GPU; the bundle refuses an engine built from another model; the runtime, with a fake TensorRT (none
    here), serves the carried engine whose key matches this GPU and builds nothing."""
    import hashlib

    from edge_runtime import backends
    from edge_runtime import runtime as rt_mod
    from edge_runtime.backends import OrtBackend
    from edge_runtime.engine_cache import EngineCache, EngineKey
    from edge_runtime.runtime import Runtime
    from export import trt_build

    model = blur_model(tmp_path / "model.onnx")
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    cache = EngineCache(tmp_path / "cache")
    orin = EngineKey(sha, "10.3.0.30", "Orin", "8.7", 16, "fp32", profile={"image": ((1, 1, 32, 32),) * 3})
    agx = EngineKey(**{**orin.__dict__, "gpu_name": "NVIDIA Jetson AGX Orin", "sm_count": 14})
    engines = [cache.store(orin, b"engine for the NX"), cache.store(agx, b"engine for the AGX")]
    other = cache.store(EngineKey(**{**orin.__dict__, "model_sha256": "cd" * 32}), b"another model's engine")
    (tmp_path / "m.json").write_text(json.dumps(blur_manifest()))
    argv = ["bundle", "--manifest", str(tmp_path / "m.json"), "--fp32", str(model)]
    assert _cli([*argv, "--out", str(tmp_path / "b"), *(f"--engine={e}" for e in engines)]) == 0
    bundle = Bundle.load(tmp_path / "b")
    assert sorted(k.gpu_name for _, k in bundle.engines("fp32")) == ["NVIDIA Jetson AGX Orin", "Orin"]
    with pytest.raises(BundleError, match="an engine built from this bundle's fp32 ONNX artefact"):
        _cli([*argv, "--out", str(tmp_path / "bad"), f"--engine={other}"])

    opened: list[str] = []

    class FakeTrt(OrtBackend):  # runs the ONNX model but reports itself as TensorRT
        name = "tensorrt"

        def __init__(self, engine_path: Path, *, precision: str = "fp32", **_: object) -> None:
            super().__init__(model, precision=precision)
            opened.append(Path(engine_path).read_bytes().decode())

    for module in (rt_mod, backends):
        monkeypatch.setattr(module, "tensorrt_available", lambda: (True, "fake TensorRT"))
    monkeypatch.setattr(backends, "TrtBackend", FakeTrt)
    monkeypatch.setattr(trt_build, "engine_key_for", lambda *a, **k: agx)  # this GPU: an AGX Orin
    with Runtime(bundle, "jetson-agx-orin-64gb", precision="fp32", engine_cache_dir=tmp_path / "empty",
                 build_engines=False) as rt:
        assert rt.backend is not None and rt.backend.name == "tensorrt" and rt._builder is None
    assert opened == ["engine for the AGX"]
    (tmp_path / "b" / "engines" / engines[1].name).write_bytes(b"engine for the AGY")
    with pytest.raises(BundleError, match="engines/"):
        Bundle.load(tmp_path / "b")


def test_a_shipped_manifest_as_template_gives_a_bundle_of_only_the_files_given(tmp_path: Path) -> None:
    """A newcomer's obvious template: its other files (not given, not in --out) are left out instead of
    failing after the copies with a half-written --out; created and toolchain are this bundle's own."""
    from edge_runtime.runtime import reference_bundles

    shipped = Bundle.load(reference_bundles()["us-lesion-det"])
    out = tmp_path / "b"
    assert _cli(["bundle", "--manifest", str(shipped.path / "manifest.json"), "--out", str(out),
                 "--fp32", str(shipped.file("fp32.onnx")), "--int8-cpu", str(shipped.file("int8_cpu.onnx"))]) == 0
    made = Bundle.load(out, verify=True).manifest
    assert sorted(a["file"] for a in made["artifacts"]) == ["fp32.onnx", "int8_cpu.onnx"]
    assert made["created"] != shipped.manifest["created"] and "validation" not in made


def test_a_refused_bundle_leaves_no_half_written_folder(tmp_path: Path) -> None:
    from edge_runtime.errors import ConfigError
    from edge_runtime.runtime import reference_bundles

    shipped = Bundle.load(reference_bundles()["us-lesion-det"])
    template = dict(shipped.manifest)
    template["preprocess"] = {**template["preprocess"], "colour": "gray"}  # a typo `export verify` refuses
    (tmp_path / "m.json").write_text(json.dumps(template))
    out = tmp_path / "b"
    with pytest.raises((BundleError, ConfigError), match="colour"):
        _cli(["bundle", "--manifest", str(tmp_path / "m.json"), "--out", str(out),
              "--fp32", str(shipped.file("fp32.onnx"))])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]  # neither --out nor a staging folder


def test_bundle_drops_the_templates_calibration_record_unless_one_is_given(tmp_path: Path) -> None:
    """A shipped manifest as template, a repaired INT8 file and no --calibration: the template's record
    (of its own INT8 file and a calibration.json not in the new bundle) stayed and verified OK."""
    shipped = Path(__file__).resolve().parents[1] / "edge_runtime" / "models" / "us-despeckle"
    assert "calibration" in json.loads((shipped / "manifest.json").read_text())
    out = tmp_path / "out"
    other = tmp_path / "int8.onnx"  # another INT8 file (its bytes differ from the template's)
    import onnx

    model = onnx.load(str(shipped / "int8.onnx"))
    model.doc_string = "another calibration"
    onnx.save(model, str(other))
    assert _cli(["bundle", "--manifest", str(shipped / "manifest.json"), "--out", str(out),
                 "--fp32", str(shipped / "fp32.onnx"), "--int8", str(other)]) == 0
    assert "calibration" not in Bundle.load(out).manifest
    # the template's own INT8 file again: its record still describes it, and stays
    assert _cli(["bundle", "--manifest", str(shipped / "manifest.json"), "--out", str(tmp_path / "same"),
                 "--fp32", str(shipped / "fp32.onnx"), "--int8", str(shipped / "int8.onnx"),
                 "--add", str(shipped / "calibration.json")]) == 0
    assert Bundle.load(tmp_path / "same").manifest["calibration"]["file"] == "calibration.json"
    assert _cli(["bundle", "--manifest", str(shipped / "manifest.json"), "--out", str(out), "--fp32",
                 str(shipped / "fp32.onnx"), "--int8", str(shipped / "int8.onnx"), "--calibration",
                 str(shipped / "calibration.json")]) == 0
    assert Bundle.load(out).manifest["calibration"]["file"] == "calibration.json"


def test_export_takes_a_shipped_models_name_like_infer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--bundle us-lesion-det` (and `verify us-lesion-det`) as `infer --bundle` takes it; the report's
    folder is made first (a missing one failed only after the work)."""
    assert _cli(["verify", "us-lesion-det"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK ") and "us-lesion-det, " in out and "files verified" in out
    fp32 = Path(__file__).resolve().parents[1] / "edge_runtime" / "models" / "us-lesion-det" / "fp32.onnx"
    report = tmp_path / "new" / "dir" / "v.json"
    assert _cli(["validate", "--bundle", "us-lesion-det", "--candidate", f"same={fp32}", "--frames", "4",
                 "--no-progress", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["model"] == "us-lesion-det"


def test_a_refused_manifest_is_named_by_the_bundle_not_its_working_copy(tmp_path: Path) -> None:
    """`export bundle` assembles in a hidden folder beside --out: its schema errors named that folder
    (".b.new-1234/manifest.json: ..."), a path the user never gave and that is gone after the run."""
    from edge_runtime.runtime import reference_bundles

    shipped = Bundle.load(reference_bundles()["us-lesion-det"])
    (tmp_path / "m.json").write_text(json.dumps({**shipped.manifest, "modality": "US"}))  # not a list
    existing = tmp_path / "existing"
    _cli(["bundle", "--manifest", str(shipped.path / "manifest.json"), "--out", str(existing),
          "--fp32", str(shipped.file("fp32.onnx"))])
    for out in (tmp_path / "b", existing):  # written new, and rewritten in place
        with pytest.raises(BundleError, match="modality") as err:
            _cli(["bundle", "--manifest", str(tmp_path / "m.json"), "--out", str(out),
                  "--fp32", str(shipped.file("fp32.onnx"))])
        assert str(err.value).startswith(f"{out / 'manifest.json'}: "), str(err.value)


def test_a_model_with_external_data_is_refused_by_every_step(tmp_path: Path, bundle: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Weights saved beside the graph (onnx.save(..., save_as_external_data=True)): `export bundle` copied
    the graph only and verify said OK, then FP32 could not load; and the sha256 tying INT8 files and gate
    reports to their FP32 covered the graph only, so new weights passed with the old INT8 and verdict."""
    import onnx

    from edge_runtime.errors import ExportError
    from export.lint import check_model

    ext = tmp_path / "ext" / "fp32.onnx"
    ext.parent.mkdir()
    onnx.save(onnx.load(str(bundle / "fp32.onnx")), str(ext), save_as_external_data=True,
              location="fp32.onnx.data", size_threshold=0)
    assert (ext.parent / "fp32.onnx.data").is_file()
    why = r"an ONNX model in one file .* found \"weights in \['fp32.onnx.data'\]\""
    with pytest.raises(ExportError, match=why):
        _cli(["quantize", str(ext), "--precision", "fp16", "--out", str(tmp_path / "fp16.onnx")])
    with pytest.raises(ExportError, match=why):
        _cli(["bundle", "--manifest", str(bundle / "manifest.json"), "--out", str(tmp_path / "b"), "--fp32", str(ext)])
    assert not (tmp_path / "b").exists()
    assert [f.rule for f in check_model(ext).findings if f.severity == "error"][:1] == ["external-data"]
    # A bundle assembled by hand with both files verifies its hashes, and `export verify` refuses it.
    (bundle / "fp32.onnx").write_bytes(ext.read_bytes())
    (bundle / "fp32.onnx.data").write_bytes((ext.parent / "fp32.onnx.data").read_bytes())
    (bundle / "fp16.onnx").unlink()
    m = json.loads((bundle / "manifest.json").read_text())
    write_bundle(bundle, {**m, "artifacts": [a for a in m["artifacts"] if a["file"] == "fp32.onnx"]})
    capsys.readouterr()
    assert _cli(["verify", str(bundle)]) == 1
    assert "fp32.onnx: expected an ONNX model in one file" in capsys.readouterr().out


def test_an_int8_file_given_for_the_other_form_is_refused(tmp_path: Path) -> None:
    """The CPU form (uint8 activations) given as --int8 was bundled as a TensorRT artefact, which
    TensorRT refuses (asymmetric Q/DQ); verify said OK (a review)."""
    from edge_runtime.errors import ConfigError
    from edge_runtime.runtime import reference_bundles

    shipped = Bundle.load(reference_bundles()["us-lesion-det"])
    for flag, file, match in (("--int8", "int8_cpu.onnx", "--int8: expected the TensorRT form .* give it as --int8-cpu"),
                              ("--int8-cpu", "int8.onnx", "--int8-cpu: expected the CPU form .* give it as --int8")):
        with pytest.raises(ConfigError, match=match):
            _cli(["bundle", "--manifest", str(shipped.path / "manifest.json"), "--out", str(tmp_path / "b"),
                  "--fp32", str(shipped.file("fp32.onnx")), flag, str(shipped.file(file))])
    assert not (tmp_path / "b").exists()
