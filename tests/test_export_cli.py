"""export CLI guards: what `export validate` refuses, which calibration options each source takes."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from test_export_models import blur_manifest, blur_model

from edge_runtime.errors import ConfigError
from export import cli
from export.bundle_write import write_bundle


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return cli.run(parser.parse_args(argv))


def test_validate_without_candidates_is_refused(tmp_path: Path) -> None:
    """A report with no candidates would say "passed" about nothing."""
    import json

    blur_model(tmp_path / "fp32.onnx")
    (tmp_path / "m.json").write_text(json.dumps(blur_manifest()))
    with pytest.raises(ConfigError, match="a candidate to validate"):
        _cli(["validate", "--manifest", str(tmp_path / "m.json"), "--fp32", str(tmp_path / "fp32.onnx")])


def test_validate_repair_never_writes_inside_a_bundle(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    blur_model(root / "fp32.onnx")
    blur_model(root / "int8.onnx", damage=0.02)
    m = blur_manifest()
    m["artifacts"].append({"file": "int8.onnx", "kind": "onnx", "precision": "int8"})
    write_bundle(root, m)
    before = (root / "int8.onnx").read_bytes()
    for extra in ([], ["--repaired-out", str(root / "int8_repaired.onnx")]):
        with pytest.raises(ConfigError, match="outside the bundle"):
            _cli(["validate", "--bundle", str(root), "--repair", "--frames", "4", "--no-progress", *extra])
    with pytest.raises(ConfigError, match="outside the bundle"):  # named as a candidate, no --bundle
        _cli(["validate", "--manifest", str(root / "manifest.json"), "--fp32", str(root / "fp32.onnx"),
              "--candidate", f"int8={root / 'int8.onnx'}", "--repair", "--frames", "4", "--no-progress"])
    assert (root / "int8.onnx").read_bytes() == before


def _opts(calib: str, modality: str | None = None, bits: int | None = None, color: str = "gray") -> dict[str, object]:
    args = argparse.Namespace(calib=calib, calib_modality=modality, calib_bits=bits)
    return cli._source_opts(args, {**blur_manifest(), "modality": ["US"], "preprocess": {"color": color}})


def test_dicom_and_phantom_frames_keep_their_own_modality_and_bits() -> None:
    from pydicom.data import get_testdata_file

    us = get_testdata_file("examples_ybr_color.dcm")  # in the pydicom wheel: no download
    assert _opts(us) == {} and _opts("phantom") == {} and _opts("phantom:us") == {}
    for calib in (us, "phantom"):
        with pytest.raises(ConfigError, match="state their own"):
            _opts(calib, modality="US")
        with pytest.raises(ConfigError, match="state their own"):
            _opts(calib, bits=12)


def test_video_and_folder_frames_need_a_stated_modality(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    video.write_bytes(b"not dicom")
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "f0.png").write_bytes(b"png")
    with pytest.raises(ConfigError, match="--calib-modality for video"):
        _opts(str(video))
    with pytest.raises(ConfigError, match="no --calib-bits with video"):
        _opts(str(video), modality="US", bits=12)
    assert _opts(str(video), modality="US") == {"modality": "US", "gray": True}
    assert _opts(str(video), modality=" us") == {"modality": "US", "gray": True}  # DICOM codes are upper case
    assert _opts(str(folder), modality="US", bits=12, color="rgb") == {"modality": "US", "bits_stored": 12}


def test_missing_model_or_incomplete_manifest_is_a_config_error(tmp_path: Path) -> None:
    import json

    with pytest.raises(ConfigError, match="an existing ONNX model"):
        _cli(["quantize", str(tmp_path / "absent.onnx"), "--precision", "fp16", "--out", str(tmp_path / "h.onnx")])
    m = blur_manifest()
    del m["task"]
    (tmp_path / "m.json").write_text(json.dumps(m))
    blur_model(tmp_path / "fp32.onnx")
    with pytest.raises(ConfigError, match="task"):
        _cli(["validate", "--manifest", str(tmp_path / "m.json"), "--fp32", str(tmp_path / "fp32.onnx"),
              "--candidate", f"fp16={tmp_path / 'fp32.onnx'}"])


def test_validate_repair_takes_the_manifests_method_and_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --method / --max-float, a repair re-quantises as the bundle was (calibration method) and keeps
    at most the recipe's training.repair_max_float nodes in float, as `export reference --repair` does."""
    import json

    from export import validate as V

    blur_model(tmp_path / "fp32.onnx")
    blur_model(tmp_path / "int8.onnx", damage=0.02)  # fails the gate, so the repair starts
    m = {**blur_manifest(), "calibration": {"method": "percentile"}, "training": {"repair_max_float": 1}}
    (tmp_path / "m.json").write_text(json.dumps(m))
    seen: dict[str, object] = {}

    class Stop(Exception):
        pass

    def factory(fp32: object, cal: object, method: str, *rest: object) -> tuple[object, list[str]]:
        seen["method"] = method
        return (lambda exclude: None), ["n"]

    def repair(*args: object, max_float: int | None = None, **kw: object) -> object:
        seen["max_float"] = max_float
        raise Stop

    monkeypatch.setattr(cli, "_int8_factory", factory)
    monkeypatch.setattr(V, "repair_int8", repair)
    base = ["validate", "--manifest", str(tmp_path / "m.json"), "--fp32", str(tmp_path / "fp32.onnx"),
            "--candidate", f"int8={tmp_path / 'int8.onnx'}", "--repair", "--frames", "4", "--calib-frames", "4",
            "--min-frames", "4", "--repaired-out", str(tmp_path / "r.onnx"), "--no-progress"]
    with pytest.raises(Stop):
        _cli(base)
    assert seen == {"method": "percentile", "max_float": 1}
    with pytest.raises(Stop):
        _cli([*base, "--method", "entropy", "--max-float", "3"])
    assert seen == {"method": "entropy", "max_float": 3}


def test_quantize_takes_the_manifests_calibration_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`export quantize --precision int8` without --method calibrates as the manifest says (its calibration
    record, else the recipe's training.calibration_method); --method overrides."""
    import json

    from export import quantize as Q

    blur_model(tmp_path / "fp32.onnx")
    m = {**blur_manifest(), "training": {"calibration_method": "entropy"}}
    (tmp_path / "m.json").write_text(json.dumps(m))
    seen: list[str] = []

    class Stop(Exception):
        pass

    def spy(model: object, out: object, reader: object, *, method: str, **kw: object) -> object:
        seen.append(method)
        raise Stop

    monkeypatch.setattr(Q, "quantize_int8", spy)
    base = ["quantize", str(tmp_path / "fp32.onnx"), "--precision", "int8", "--out", str(tmp_path / "q.onnx"),
            "--manifest", str(tmp_path / "m.json"), "--calib-frames", "4", "--min-frames", "4", "--val-frames", "4",
            "--no-progress"]
    for extra in ([], ["--method", "minmax"]):
        with pytest.raises(Stop):
            _cli([*base, *extra])
    assert seen == ["entropy", "minmax"]


@pytest.mark.slow
def test_the_readmes_own_model_walkthrough_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README's "Your own model, end to end" block, command by command, in a copy of docs/examples/
    (the cine it names is pydicom's real one): the walkthrough a newcomer follows cannot rot."""
    import re
    import shlex
    import shutil

    pytest.importorskip("torch", reason="export onnx needs PyTorch (the train extra)")
    from edge_runtime.cli import main
    from edge_runtime.demo import real_cine_path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = re.search(r"Your own model, end to end.*?```sh\n(.*?)```", readme, re.DOTALL)
    assert block, "the walkthrough is gone from README.md"
    commands = [shlex.split(c.split("  #")[0]) for c in block.group(1).replace("\\\n", " ").splitlines() if c.strip()]
    shutil.copytree(root / "docs" / "examples", tmp_path / "my-model")
    monkeypatch.chdir(tmp_path / "my-model")
    for argv in commands:
        assert argv[0] == "edge-runtime", argv
        argv = [str(real_cine_path()) if a == "cine.dcm" else a for a in argv[1:]]
        if argv[:2] == ["export", "quantize"] or argv[:2] == ["export", "validate"]:
            argv.append("--no-progress")
        assert main(argv) == 0, argv
    assert (tmp_path / "my-model" / "out" / "my" / "results.jsonl").read_text().count("\n") == 30
