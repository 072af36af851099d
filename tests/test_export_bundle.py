"""Step 6: assembling bundles (directory and .tar) and verifying them through edge_runtime.bundle."""

from __future__ import annotations

import argparse
import json
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


def test_verify_fails_on_an_unlisted_file(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (bundle / "extra.onnx").write_bytes(b"\x08\x07")
    assert _cli(["verify", str(bundle)]) == 1
    assert "extra.onnx: present but not listed" in capsys.readouterr().out


def test_archive_is_deterministic_and_verifiable(bundle: Path, tmp_path: Path) -> None:
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
    assert _cli(["verify", str(tmp_path / "bad.tar")]) == 1


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
