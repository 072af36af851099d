"""Runtime: bundle + frame in, result out, on real ONNX Runtime sessions with tiny bundles."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge_runtime.bundle import Bundle
from edge_runtime.devices import load_config
from edge_runtime.errors import BundleError, ConfigError, InputError
from edge_runtime.frames import Frame
from edge_runtime.runtime import Runtime, RuntimeSet, choose_precision
from export.bundle_write import write_bundle


def _invert_model(path: Path, op: str = "Sub", value: float = 1.0) -> None:
    """y = 1 - x on [1, 1, H, W]: an 'enhancer' whose output we can compute by hand (``op``(value, x))."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, "H", "W"])
    y = helper.make_tensor_value_info("enhanced", TensorProto.FLOAT, [1, 1, "H", "W"])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [value])
    graph = helper.make_graph([helper.make_node(op, ["one", "image"], ["enhanced"])], "invert", [x], [y], [one])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def _enhance_bundle(root: Path, *, tile: dict | None = None, post: dict | None = None, value: float = 1.0) -> Path:
    """A bundle of ``value`` - x (an enhancer; with ``post``, e.g. a segmentation head, another task)."""
    root.mkdir()
    _invert_model(root / "fp32.onnx", value=value)
    task = {"segmentation": "segmentation", "centernet": "detection", "yolov8": "detection"}.get(
        (post or {}).get("type", ""), "enhancement")
    post = post or {"type": "enhance", "output": "enhanced"} | ({"tile": tile} if tile else {})
    write_bundle(root, {
        "name": "tiny-invert", "task": task, "modality": ["DX"], "bits_stored": 12,
        "photometric": "MONOCHROME2", "description": "test model",
        "inputs": [{"name": "image", "dtype": "float32", "shape": [1, 1, "H", "W"]}],
        "outputs": [{"name": "enhanced", "dtype": "float32", "shape": [1, 1, "H", "W"]}],
        "preprocess": {"color": "gray", "resize": {"mode": "none", "multiple": 8}},
        "postprocess": post,
        "artifacts": [{"file": "fp32.onnx", "kind": "onnx", "precision": "fp32"}],
    })
    return root


def _xr(h: int = 60, w: int = 70) -> Frame:
    px = np.random.default_rng(0).integers(0, 4096, (h, w)).astype(np.uint16)
    return Frame(px, modality="DX", bits_stored=12, seq=7, stream_id="s")


def test_enhancement_roundtrip_matches_hand_computed(tmp_path: Path) -> None:
    frame = _xr()
    with Runtime(_enhance_bundle(tmp_path / "b"), "cpu-x86") as rt:
        res = rt.process(frame)
    assert res.enhanced is not None and res.enhanced.dtype == np.uint16 and res.enhanced.shape == (60, 70)
    # 1 - v/4095 scaled back by 4095: 4095 - v, exactly, after rounding.
    np.testing.assert_array_equal(res.enhanced, 4095 - frame.pixels)
    assert res.seq == 7 and res.stream_id == "s"
    assert res.provenance["backend"] == "onnxruntime" and res.provenance["precision"] == "fp32"
    assert res.provenance["bundle_sha256"] == Bundle.load(tmp_path / "b").sha256
    assert set(res.timings_ms) == {"preprocess", "infer", "postprocess"}


def test_tiled_enhancement_equals_whole_frame(tmp_path: Path) -> None:
    frame = _xr(100, 90)
    with Runtime(_enhance_bundle(tmp_path / "t", tile={"size": 32, "overlap": 8}), "cpu-x86") as rt:
        tiled = rt.process(frame).enhanced
    np.testing.assert_array_equal(tiled, 4095 - frame.pixels)


def test_tampered_bundle_is_refused(tmp_path: Path) -> None:
    root = _enhance_bundle(tmp_path / "b")
    data = bytearray((root / "fp32.onnx").read_bytes())
    data[-1] ^= 0x01
    (root / "fp32.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="fp32.onnx: sha256"):
        Runtime(root, "cpu-x86").load()


def test_wrong_modality_is_a_clear_error(tmp_path: Path) -> None:
    frame = Frame(np.zeros((32, 32), np.uint8), modality="US")
    with Runtime(_enhance_bundle(tmp_path / "b"), "cpu-x86") as rt, pytest.raises(InputError, match="modality"):
        rt.process(frame)


def test_precision_choice_follows_device_and_artifacts(tmp_path: Path) -> None:
    bundle = Bundle.load(_enhance_bundle(tmp_path / "b"))
    assert choose_precision(bundle, load_config("cpu-x86")) == "fp32"
    with pytest.raises(BundleError, match="int8"):
        choose_precision(bundle, load_config("cpu-x86"), "int8")
    with pytest.raises(ConfigError, match="fp16"):
        choose_precision(bundle, load_config("cpu-x86"), "fp16")  # CPU configs do not allow fp16


def test_runtime_set_routes_by_modality(tmp_path: Path) -> None:
    rs = RuntimeSet([Runtime(_enhance_bundle(tmp_path / "b"), "cpu-x86")]).load()
    try:
        res = rs.process(_xr())
        assert res.enhanced is not None and res.provenance["model"] == "tiny-invert"
        assert "tiny-invert.infer" in res.timings_ms
        with pytest.raises(InputError, match="modality"):
            rs.process(Frame(np.zeros((8, 8), np.uint8), modality="US"))
    finally:
        rs.close()


def test_manifest_edit_changes_identity(tmp_path: Path) -> None:
    root = _enhance_bundle(tmp_path / "b")
    before = Bundle.load(root).sha256
    m = json.loads((root / "manifest.json").read_text())
    m["description"] = "edited"
    (root / "manifest.json").write_text(json.dumps(m))
    assert Bundle.load(root).sha256 != before


def test_missing_engine_serves_onnxruntime_then_swaps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exercises the runtime's engine-cache logic around TensorRT with fakes (no TensorRT, no GPU
    here): a missing engine starts a background build while ONNX Runtime serves, and the runtime
    swaps to the engine between two frames once the build reports ready."""
    from edge_runtime import runtime as rt_mod
    from edge_runtime.backends import OrtBackend
    from edge_runtime.engine_cache import EngineKey
    from export import trt_build

    key = EngineKey("ab" * 32, "10.3.0", "Orin", "8.7", 8, "fp32", None, {})
    built = tmp_path / "cache" / "model.engine"
    release = __import__("threading").Event()

    def fake_build(cache, k, onnx_path, **opts):
        release.wait(5)
        built.parent.mkdir(parents=True, exist_ok=True)
        built.write_bytes(b"engine")
        return built

    class FakeTrt(OrtBackend):  # runs the ONNX model but reports itself as TensorRT
        name = "tensorrt"

        def __init__(self, engine_path: Path, *, precision: str = "fp32", **_: object) -> None:
            super().__init__(tmp_path / "b" / "fp32.onnx", precision=precision)
            self.engine_path = engine_path

    monkeypatch.setattr(rt_mod, "tensorrt_available", lambda: (True, "fake TensorRT"))
    monkeypatch.setattr(rt_mod, "TrtBackend", FakeTrt)
    monkeypatch.setattr(trt_build, "engine_key_for", lambda *a, **k: key)
    monkeypatch.setattr(trt_build, "build_into_cache", fake_build)
    bundle = _enhance_bundle(tmp_path / "b")
    rt = Runtime(bundle, "x86-dgpu", precision="fp32", engine_cache_dir=tmp_path / "cache").load()
    try:
        assert rt.process(_xr()).provenance["backend"] == "onnxruntime"
        assert "engine build started" in rt.events[0]
        release.set()
        rt._builder.wait(10)
        res = rt.process(_xr())
        assert res.provenance["backend"] == "tensorrt"
        assert any("swapped to TensorRT" in e for e in rt.events)
        np.testing.assert_array_equal(res.enhanced, 4095 - _xr().pixels)
    finally:
        rt.close()


def test_device_detection_picks_a_config(tmp_path: Path) -> None:
    """device=None detects the machine (CPU here) and loads its config."""
    from edge_runtime.runtime import resolve_device

    cfg = resolve_device(None)
    assert cfg.name in ("cpu-x86", "cpu-arm64", "x86-dgpu") and cfg.precisions


def test_infer_command_writes_results_and_pngs(tmp_path: Path) -> None:
    from edge_runtime.cli import main
    from edge_runtime.pipeline.recorder import read_records

    bundle = _enhance_bundle(tmp_path / "b")
    out = tmp_path / "out"
    rc = main(["infer", "--bundle", str(bundle), "--source", "phantom:xr", "--out", str(out),
               "--device", "cpu-x86", "--limit", "3", "--every", "2"])
    assert rc == 0
    records = read_records(out / "results.jsonl")
    assert [r["seq"] for r in records] == [0, 1, 2]
    assert all(r["enhanced"] and r["provenance"]["model"] == "tiny-invert" for r in records)
    assert sorted(p.name for p in out.glob("*.png")) == ["phantom_xr_000000.png", "phantom_xr_000002.png"]  # no ':'
    # Every enhanced frame at the input's depth (it was only in the 8-bit side-by-side PNG before).
    for r in records:
        img = cv2.imread(str(out / r["enhanced_file"]), cv2.IMREAD_UNCHANGED)
        assert img.dtype == np.uint16 and img.shape == (512, 512) and img.max() > 255, r["enhanced_file"]
        assert r["photometric"] == "MONOCHROME2"  # the file's polarity: a 16-bit PNG cannot say it
    assert main(["infer", "--bundle", str(bundle), "--source", "phantom:xr", "--out", str(out),
                 "--device", "cpu-x86", "--limit", "1", "--every", "0"]) == 0
    assert [p.name for p in (out / "enhanced").iterdir()] == ["phantom_xr_000000.png"]  # this run's only
    assert main(["infer", "--bundle", str(bundle), "--source", "phantom:xr", "--out", str(tmp_path / "o2"),
                 "--device", "cpu-x86", "--limit", "1", "--no-save-enhanced"]) == 0
    assert not (tmp_path / "o2" / "enhanced").exists()


def test_infer_stops_at_a_failed_write_with_records_only_for_written_frames(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Files are written in a thread of their own (edge_runtime.infer._Writer): a write that fails there
    (a full disk) must still stop the run with exit 1, and no record may follow the frame it lost."""
    from edge_runtime import infer
    from edge_runtime.cli import main
    from edge_runtime.pipeline.recorder import read_records

    bundle = _enhance_bundle(tmp_path / "b")
    real, calls = infer.write_image, []

    def full_disk(path: Path, image: np.ndarray) -> Path:
        calls.append(path)
        if len(calls) == 4:  # frame 0: enhanced + annotated, frame 1: enhanced, then its annotated PNG
            raise OSError(28, "No space left on device")
        return real(path, image)

    monkeypatch.setattr(infer, "write_image", full_disk)
    out = tmp_path / "out"
    rc = main(["infer", "--bundle", str(bundle), "--source", "phantom:xr", "--out", str(out), "--device", "cpu-x86",
               "--limit", "8"])
    assert rc == 1 and "No space left on device" in capsys.readouterr().err
    assert [r["seq"] for r in read_records(out / "results.jsonl")] == [0]  # frame 1's record never written
    assert len(calls) == 4  # nothing written after the failure


def test_an_interrupt_while_the_writer_drains_finishes_the_file_in_progress_only() -> None:
    """Ctrl-C / SIGTERM (a KeyboardInterrupt in the main thread) while close() waits for queued frames:
    the write in progress completes, the rest are dropped, and the interrupt is raised after the thread
    is done (it was killed mid-file at exit: hidden .partial files, and an abort in 6 of 8 runs)."""
    import signal
    import time

    from edge_runtime.infer import _Writer

    done: list[int] = []

    def slow(i: int) -> None:
        time.sleep(0.3)
        done.append(i)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    w = _Writer(slow)
    for i in range(4):
        w.put(i)
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.45)  # inside the second write
        with pytest.raises(KeyboardInterrupt):
            w.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert done == [0, 1]  # the second write finished, frames 2 and 3 dropped
    assert not w._thread.is_alive()


def test_a_later_infer_run_leaves_no_file_of_an_earlier_one(tmp_path: Path) -> None:
    """30 annotated PNGs stayed beside a later run's 5 records (27 showing the old results), and
    --no-save-enhanced orphaned the earlier run's enhanced frames for good: each run removes what the
    last one recorded, whatever it writes itself."""
    from edge_runtime.cli import main

    bundle = _enhance_bundle(tmp_path / "b")
    out = tmp_path / "out"
    base = ["infer", "--bundle", str(bundle), "--source", "phantom:xr", "--out", str(out), "--device", "cpu-x86"]
    assert main(base + ["--limit", "6"]) == 0
    assert len(list(out.glob("*.png"))) == 6 and len(list((out / "enhanced").iterdir())) == 6
    assert main(base + ["--limit", "3", "--every", "2"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["phantom_xr_000000.png", "phantom_xr_000002.png"]
    assert len(list((out / "enhanced").iterdir())) == 3
    assert main(base + ["--limit", "2", "--every", "0", "--no-save-enhanced"]) == 0
    assert not list(out.glob("*.png")) and not list((out / "enhanced").iterdir())


def test_a_failed_start_makes_no_output_folder(tmp_path: Path) -> None:
    from edge_runtime.cli import main

    bundle = _enhance_bundle(tmp_path / "b")
    out = tmp_path / "out"
    assert main(["infer", "--bundle", str(bundle), "--source", "camera:9", "--out", str(out)]) == 1
    assert not out.exists()  # an empty folder was left behind


def test_infer_refuses_an_output_folder_inside_its_source_folder(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """--out equal to --source: the second run read the first run's annotated PNGs as input."""
    from edge_runtime.cli import main

    bundle = _enhance_bundle(tmp_path / "b")
    folder = tmp_path / "pngs"
    folder.mkdir()
    cv2.imwrite(str(folder / "f0.png"), _xr().pixels)
    for out in (folder, folder / "results"):
        assert main(["infer", "--bundle", str(bundle), "--source", str(folder), "--out", str(out), "--modality", "DX",
                     "--bits-stored", "12", "--device", "cpu-x86"]) == 1
        assert "--out outside the --source folder" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["f0.png"]
    # Nor a source inside OUT/enhanced, which the run replaces; and files there not of a run stay.
    out = tmp_path / "out"
    (out / "enhanced").mkdir(parents=True)
    cv2.imwrite(str(out / "enhanced" / "mine.png"), _xr().pixels)
    assert main(["infer", "--bundle", str(bundle), "--source", str(out / "enhanced"), "--out", str(out),
                 "--modality", "DX", "--bits-stored", "12", "--device", "cpu-x86"]) == 1
    assert "a --source outside OUT/enhanced" in capsys.readouterr().err
    assert main(["infer", "--bundle", str(bundle), "--source", "phantom:xr", "--out", str(out), "--limit", "1",
                 "--device", "cpu-x86"]) == 0
    assert main(["infer", "--bundle", str(bundle), "--source", "phantom:xr", "--out", str(out), "--limit", "1",
                 "--device", "cpu-x86"]) == 0
    assert sorted(p.name for p in (out / "enhanced").iterdir()) == ["mine.png", "phantom_xr_000000.png"]


def test_main_gives_back_the_callers_sigterm_handler(tmp_path: Path) -> None:
    """main() turns SIGTERM into an exception while a command runs; in-process callers (tests,
    integrators) must get their own handler back."""
    import signal

    from edge_runtime.cli import main

    mine = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        def handler(signum: int, frame: object) -> None:
            pass

        signal.signal(signal.SIGTERM, handler)
        assert main(["devices", "--json"]) == 0
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, mine)


def test_sigterm_during_infer_leaves_whole_files_and_records_only_for_them(tmp_path: Path) -> None:
    """SIGTERM killed `infer` where it stood: a hidden half-written PNG (.NAME.partial, a patient image
    no later run removes) was left in 2 of 6 runs, and results.jsonl ran ahead of the images. Now
    SIGTERM unwinds like Ctrl-C (exit 143), and each record is written after its images."""
    import signal
    import subprocess

    bundle = _enhance_bundle(tmp_path / "b")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "infer", "--bundle", str(bundle), "--source",
                             "phantom:xr", "--out", str(out), "--device", "cpu-x86", "--limit", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list((out / "enhanced").glob("*.png"))) < 3:
        time.sleep(0.05)
    time.sleep(0.37)  # somewhere in the middle of a frame
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM and "terminated" in err, (proc.returncode, err[-500:])
    assert not [p.name for p in out.rglob(".*.partial")]
    from edge_runtime.pipeline.recorder import read_records

    records = read_records(out / "results.jsonl")
    assert records and all((out / r["enhanced_file"]).is_file() for r in records)
    assert all((out / f"phantom_xr_{r['seq']:06d}.png").is_file() for r in records)


def test_infer_over_a_folder_of_16_bit_images_takes_a_stated_modality(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A folder of radiograph PNGs says neither what it shows nor its bit depth: --modality (required)
    and --bits-stored say it; DICOM and phantom sources refuse both (they state their own)."""
    import cv2

    from edge_runtime.cli import main
    from edge_runtime.pipeline.recorder import read_records

    bundle = _enhance_bundle(tmp_path / "b")
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(2):
        cv2.imwrite(str(folder / f"f{i}.png"), _xr().pixels)
    common = ["infer", "--bundle", str(bundle), "--source", str(folder), "--device", "cpu-x86", "--every", "0"]
    assert main([*common, "--out", str(tmp_path / "o1")]) == 1
    assert re.search(r"ConfigError: expected --modality for a folder of images .*\['DX'\]", capsys.readouterr().err)
    assert main([*common, "--out", str(tmp_path / "o2"), "--modality", "DX", "--bits-stored", "12"]) == 0
    assert [r["seq"] for r in read_records(tmp_path / "o2" / "results.jsonl")] == [0, 1]
    # After a skipped file, seq no longer says which file a result is of: the record's position does.
    (folder / "f1.png").write_bytes(b"cut")
    cv2.imwrite(str(folder / "f2.png"), _xr().pixels)
    assert main([*common, "--out", str(tmp_path / "o4"), "--modality", "DX", "--bits-stored", "12"]) == 1
    records = read_records(tmp_path / "o4" / "results.jsonl")
    assert [(r["seq"], r["position"]) for r in records] == [(0, "image 1 of 3"), (1, "image 3 of 3")]
    assert main(["infer", "--bundle", str(bundle), "--source", "phantom:xr", "--modality", "DX",
                 "--out", str(tmp_path / "o3"), "--limit", "1"]) == 1
    assert "state their own" in capsys.readouterr().err


def test_infer_says_which_bits_to_state_refuses_a_bundle_twice_and_negative_counts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """12-bit data in 16-bit PNGs without --bits-stored: each skip names the option (for image files
    only: DICOM states its own depth and refuses it; the Python API's message names no CLI flag). The
    same bundle twice doubled every detection; --limit -1 ran nothing and --every -1 annotated all."""
    import cv2

    from edge_runtime.cli import main
    from edge_runtime.runtime import Runtime

    bundle = _enhance_bundle(tmp_path / "b")
    folder = tmp_path / "pngs"
    folder.mkdir()
    cv2.imwrite(str(folder / "f0.png"), _xr().pixels)
    common = ["infer", "--source", str(folder), "--device", "cpu-x86", "--modality", "DX"]
    assert main([*common, "--bundle", str(bundle), "--out", str(tmp_path / "o")]) == 1
    assert "say so: --bits-stored 12" in caplog.text
    with Runtime(bundle, "cpu-x86") as rt, pytest.raises(InputError) as err:
        rt.process(Frame(_xr().pixels, modality="DX"))  # read as 16-bit
    assert "12-bit frame" in str(err.value) and "--bits-stored" not in str(err.value)
    assert main([*common, "--bundle", str(bundle), "--bundle", str(bundle), "--out", str(tmp_path / "o2")]) == 1
    assert "each --bundle once" in capsys.readouterr().err
    for flag in ("--limit", "--every"):
        with pytest.raises(SystemExit):
            main([*common, "--bundle", str(bundle), "--out", str(tmp_path / "o3"), flag, "-1"])
        assert "expected an integer >= 0, found -1" in capsys.readouterr().err


def test_quantised_artefact_needs_a_passed_gate(tmp_path: Path) -> None:
    root = _enhance_bundle(tmp_path / "b")
    (root / "int8.onnx").write_bytes((root / "fp32.onnx").read_bytes())
    m = json.loads((root / "manifest.json").read_text())
    m["artifacts"].append({"file": "int8.onnx", "kind": "onnx", "precision": "int8"})
    for passed, served in ((False, "fp32"), (True, "int8")):
        _gate_report(root, {"int8.onnx": passed})
        m["validation"] = {"file": "validation.json", "passed": passed}
        write_bundle(root, m)
        assert choose_precision(Bundle.load(root), load_config("cpu-x86")) == served
    # A record that says passed needs its hashed report to say so for every FP16/INT8 file, and must
    # name a report that is there; the writer refuses before replacing the manifest.
    _gate_report(root, {"int8.onnx": False})
    with pytest.raises(BundleError, match="a passing result for int8.onnx"):
        write_bundle(root, m)
    assert Bundle.load(root, verify=False).manifest["validation"]["passed"] is True  # the old manifest stays
    m["validation"] = {"file": "nope.json", "passed": True}
    with pytest.raises(BundleError, match="a 'file' listed in files"):
        write_bundle(root, m)
    m["validation"] = {"file": ["validation.json"], "passed": True}
    with pytest.raises(BundleError, match="a 'file' listed in files"):
        write_bundle(root, m)


def _gate_report(root: Path, results: dict[str, bool]) -> None:
    """A minimal validation.json: one result per file, by name (as reports without sha256 match)."""
    (root / "validation.json").write_text(json.dumps(
        {"passed": all(results.values()), "candidates": [{"file": f, "passed": ok} for f, ok in results.items()]}))


def test_onnxruntime_spinning_follows_the_device_config_unless_overridden(tmp_path: Path) -> None:
    """cpu_spinning in the device config reaches the ONNX Runtime session; spinning= overrides it."""
    import dataclasses

    bundle = _enhance_bundle(tmp_path / "b")
    cfg = load_config("cpu-x86")
    for config_value, override, expect in (("always", None, "always"), ("off", None, "off"), ("run", None, "run"),
                                           ("always", False, "off"), ("off", True, "always"), ("off", "run", "run")):
        device = dataclasses.replace(cfg, cpu_spinning=config_value)
        with Runtime(bundle, device, precision="fp32", spinning=override) as rt:
            assert rt.backend is not None and rt.backend.name == "onnxruntime"
            assert rt.backend.spinning == expect  # type: ignore[attr-defined]
            live = rt.backend._session.get_session_options()  # type: ignore[attr-defined]  # what ORT got
            assert live.get_session_config_entry("session.intra_op.allow_spinning") == ("0" if expect == "off" else "1")
            if expect == "run":
                assert live.get_session_config_entry("session.force_spinning_stop") == "1"
            np.testing.assert_array_equal(rt.process(_xr()).enhanced, 4095 - _xr().pixels)
    with pytest.raises(ConfigError, match="spinning"):
        Runtime(bundle, cfg, spinning="sometimes")  # refused at construction, whatever the backend


# -- which INT8 file runs: int8_cpu.onnx (target onnxruntime-cpu) on CPU devices, int8.onnx elsewhere ---------
def _int8_bundle(root: Path, *, cpu_form: bool = True) -> Path:
    """int8.onnx computes 1 - x (as fp32.onnx), int8_cpu.onnx 0.5 x: the output says which file ran."""
    _enhance_bundle(root)
    (root / "int8.onnx").write_bytes((root / "fp32.onnx").read_bytes())
    m = json.loads((root / "manifest.json").read_text())
    m["artifacts"].append({"file": "int8.onnx", "kind": "onnx", "precision": "int8",
                           "targets": ["tensorrt", "onnxruntime"]})
    if cpu_form:
        _invert_model(root / "int8_cpu.onnx", "Mul", 0.5)  # y = 0.5 x
        m["artifacts"].append({"file": "int8_cpu.onnx", "kind": "onnx", "precision": "int8",
                               "targets": ["onnxruntime-cpu"]})
    _gate_report(root, {a["file"]: True for a in m["artifacts"] if a["precision"] != "fp32"})
    m["validation"] = {"file": "validation.json", "passed": True}
    write_bundle(root, m)
    return root


def test_cpu_device_runs_the_cpu_int8_artifact_and_says_so(tmp_path: Path) -> None:
    frame = _xr()
    with Runtime(_int8_bundle(tmp_path / "b"), "cpu-x86") as rt:
        assert rt.precision == "int8" and rt.artifact == "int8_cpu.onnx"
        assert rt.backend is not None and Path(rt.backend.model_path).name == "int8_cpu.onnx"
        res = rt.process(frame)
        assert res.provenance["artifact"] == "int8_cpu.onnx" and res.provenance["precision"] == "int8"
        assert rt.status()["artifact"] == "int8_cpu.onnx"
    np.testing.assert_allclose(res.enhanced.astype(np.float64), frame.pixels * 0.5, atol=1)  # 0.5 x: int8_cpu ran


def test_gpu_device_uses_the_int8_file_that_runs_everywhere(tmp_path: Path) -> None:
    """On a GPU config (ONNX Runtime here: no TensorRT in the test environment) int8.onnx runs, never the
    CPU-only form; the target is None for every non-CPU device, so TensorRT builds from int8.onnx too."""
    from edge_runtime.runtime import onnx_target

    frame = _xr()
    with Runtime(_int8_bundle(tmp_path / "b"), "x86-dgpu", precision="int8") as rt:
        assert rt.artifact == "int8.onnx" and rt._onnx_path().name == "int8.onnx"
        res = rt.process(frame)
    assert res.provenance["artifact"] == "int8.onnx"
    np.testing.assert_array_equal(res.enhanced, 4095 - frame.pixels)
    assert onnx_target(load_config("cpu-x86")) == "onnxruntime-cpu"
    for name in ("x86-dgpu", "jetson-orin-nx-16gb", "jetson-nano"):
        assert onnx_target(load_config(name)) is None
        assert onnx_target(load_config(name), "onnxruntime") is None


def test_cpu_device_falls_back_to_int8_onnx_without_a_cpu_form(tmp_path: Path) -> None:
    with Runtime(_int8_bundle(tmp_path / "b", cpu_form=False), "cpu-x86") as rt:
        assert rt.precision == "int8" and rt.artifact == "int8.onnx"
        res = rt.process(_xr())
    assert res.provenance["artifact"] == "int8.onnx"
    np.testing.assert_array_equal(res.enhanced, 4095 - _xr().pixels)
    with Runtime(_int8_bundle(tmp_path / "c"), "cpu-x86", precision="fp32") as rt:
        assert rt.artifact == "fp32.onnx" and rt.process(_xr()).provenance["artifact"] == "fp32.onnx"


def test_legacy_nano_tensorrt_stays_on_onnxruntime_and_builds_nothing(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """JetPack 4.6 (TensorRT 8.2) on a Jetson Nano, whose device config says backend: tensorrt: the
    runtime used to build an engine in the background and then fail to load it (TrtBackend needs
    >= 8.5). It must serve with ONNX Runtime and never look for, or build, an engine."""
    import sys
    import types

    from edge_runtime import runtime as rt_mod
    from edge_runtime.backends import tensorrt as trt_backend
    from edge_runtime.errors import BackendError

    fake = types.ModuleType("tensorrt")  # what `import tensorrt` gives there, as far as the check reads it
    fake.__version__ = "8.2.1.8"  # type: ignore[attr-defined]
    fake.Builder = object  # type: ignore[attr-defined]
    driver = types.ModuleType("pycuda.driver")  # and a CUDA device that answers
    driver.init = lambda: None  # type: ignore[attr-defined]
    driver.Device = types.SimpleNamespace(count=lambda: 1)  # type: ignore[attr-defined]
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    monkeypatch.setattr(trt_backend, "_logged_too_old", set(), raising=False)

    def no_engine(self: object) -> None:
        raise AssertionError("an engine was looked up or built with TensorRT 8.2")

    monkeypatch.setattr(rt_mod.Runtime, "_cached_engine", no_engine)
    assert load_config("jetson-nano").backend == "tensorrt"
    frame = _xr()
    with Runtime(_enhance_bundle(tmp_path / "b"), "jetson-nano", precision="fp32",
                 engine_cache_dir=tmp_path / "cache") as rt:
        res = rt.process(frame)
        assert rt._builder is None
    assert res.provenance["backend"] == "onnxruntime"
    np.testing.assert_array_equal(res.enhanced, 4095 - frame.pixels)
    assert not (tmp_path / "cache").exists()
    # asked for explicitly by the caller, TensorRT still fails clearly
    with pytest.raises(BackendError, match=r"backend tensorrt: expected TensorRT.*>= 8\.5\.0.*found 8\.2\.1\.8"):
        Runtime(_enhance_bundle(tmp_path / "c"), "jetson-nano", precision="fp32", backend="tensorrt").load()


def test_auto_precision_serves_fp32_where_int8_weights_would_saturate(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundle whose only INT8 file has 8-bit weights (the TensorRT form), on a CPU whose int8 kernels would
    saturate them (faked: x86 without VNNI): "auto" serves FP32 and says why; an explicit int8 runs emulated
    (exact). With VNNI (faked) the same bundle runs INT8 fused."""
    from test_export_models import blur_manifest, blur_model
    from test_export_quantize import _calset

    from edge_runtime.backends import onnxruntime as B
    from edge_runtime.devices import CpuInt8
    from export.quantize import quantize_int8

    root = tmp_path / "b"
    root.mkdir()
    blur_model(root / "fp32.onnx")
    quantize_int8(root / "fp32.onnx", root / "int8.onnx", _calset(8).reader())
    m = blur_manifest() | {"artifacts": [{"file": "fp32.onnx", "kind": "onnx", "precision": "fp32"},
                                         {"file": "int8.onnx", "kind": "onnx", "precision": "int8",
                                          "targets": ["tensorrt", "onnxruntime"]}],
                           "validation": {"file": "validation.json", "passed": True}}
    _gate_report(root, {"int8.onnx": True})
    write_bundle(root, m)
    frame = _xr(64, 64)
    for exact in (True, False):
        monkeypatch.setattr(B, "cpu_int8", lambda exact=exact: CpuInt8("test", "x86_64", ("avx512_vnni",) if exact else (), exact))
        with Runtime(root, "cpu-x86") as rt:
            assert rt.precision == ("int8" if exact else "fp32") and rt.process(frame).enhanced is not None
            assert any("serving fp32" in e for e in rt.events) is (not exact)
        with Runtime(root, "cpu-x86", precision="int8") as rt:
            assert rt.precision == "int8" and rt.backend is not None
            assert rt.backend.int8_emulated is (not exact)  # type: ignore[attr-defined]


def test_auto_precision_counts_only_artefacts_the_device_can_run(tmp_path: Path) -> None:
    """A bundle whose only INT8 file is the CPU form: INT8 on a CPU config, FP32 on a GPU config (the CPU
    form serves neither TensorRT nor ONNX Runtime's GPU providers); asking a GPU config for int8 says so."""
    root = _int8_bundle(tmp_path / "b")
    m = json.loads((root / "manifest.json").read_text())
    m["artifacts"] = [a for a in m["artifacts"] if a["file"] != "int8.onnx"]
    (root / "int8.onnx").unlink()
    write_bundle(root, m)
    bundle = Bundle.load(root)
    assert choose_precision(bundle, load_config("cpu-x86")) == "int8"
    assert choose_precision(bundle, load_config("x86-dgpu")) == "fp32"
    with pytest.raises(BundleError, match="int8 for every backend"):
        choose_precision(bundle, load_config("x86-dgpu"), "int8")
    with Runtime(root, "x86-dgpu") as rt:  # loads (FP32) instead of failing on the missing GPU file
        assert rt.precision == "fp32" and rt.process(_xr()).enhanced is not None


@pytest.mark.parametrize("validation", [{"passed": "false"}, {"passed": 1}, "passed", []])
def test_a_malformed_gate_record_is_refused_not_read_as_passed(tmp_path: Path, validation: object) -> None:
    root = _int8_bundle(tmp_path / "b")
    m = json.loads((root / "manifest.json").read_text())
    m["validation"] = validation
    (root / "manifest.json").write_text(json.dumps(m))  # edited by hand (write_bundle refuses it too)
    with pytest.raises(BundleError, match="validation as an object with a boolean 'passed'"):
        Bundle.load(root)
    m["validation"] = None  # no gate record: FP32 only (the report stays, unread)
    write_bundle(root, m)
    assert choose_precision(Bundle.load(root), load_config("cpu-x86")) == "fp32"


def test_a_cached_version_compatible_engine_serves_with_host_code_allowed(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake TensorRT (none here): an engine built with --version-compatible under TensorRT 10.3 serves a
    runtime on 10.7 (no rebuild), and only such an engine is deserialised with host code allowed."""
    from edge_runtime import backends
    from edge_runtime import runtime as rt_mod
    from edge_runtime.backends import OrtBackend
    from edge_runtime.engine_cache import EngineCache, EngineKey
    from export import trt_build

    here = EngineKey("ab" * 32, "10.7.0.23", "Orin", "8.7", 8, "fp32", None, {})
    opened: list[dict[str, object]] = []

    class FakeTrt(OrtBackend):  # runs the ONNX model but reports itself as TensorRT
        name = "tensorrt"

        def __init__(self, engine_path: Path, *, precision: str = "fp32", **kw: object) -> None:
            super().__init__(tmp_path / "b" / "fp32.onnx", precision=precision)
            opened.append({"engine": Path(engine_path).name, **kw})

    builds: list[EngineKey] = []

    def no_build(cache: object, key: EngineKey, *a: object, **k: object) -> None:
        builds.append(key)
        raise RuntimeError("no GPU here")  # the exact engine would replace the compatible one

    for module in (rt_mod, backends):  # the runtime asks; select_backend constructs the backend
        monkeypatch.setattr(module, "tensorrt_available", lambda: (True, "fake TensorRT"))
    monkeypatch.setattr(backends, "TrtBackend", FakeTrt)
    monkeypatch.setattr(trt_build, "engine_key_for", lambda *a, **k: here)
    monkeypatch.setattr(trt_build, "build_into_cache", no_build)
    bundle = _enhance_bundle(tmp_path / "b")
    cache = EngineCache(tmp_path / "cache")
    plain_old = cache.store(EngineKey(**{**here.__dict__, "trt_version": "10.3.0.30"}), b"plain")
    with Runtime(bundle, "x86-dgpu", precision="fp32", engine_cache_dir=cache.directory, build_engines=False) as rt:
        assert rt.backend is not None and rt.backend.name == "onnxruntime"  # a 10.3 engine does not run on 10.7
    assert opened == [] and plain_old.is_file()
    vc = cache.store(EngineKey(**{**here.__dict__, "trt_version": "10.3.0.30", "version_compatible": True}), b"vc")
    with Runtime(bundle, "x86-dgpu", precision="fp32", engine_cache_dir=cache.directory) as rt:
        res = rt.process(_xr())
        assert res.provenance["backend"] == "tensorrt" and rt.artifact == vc.name
        assert any("version-compatible" in e and "serves" in e for e in rt.events)
        assert "engine build started; serving with a compatible engine meanwhile" in rt.events
        rt._builder.wait(10)
    assert opened == [{"engine": vc.name, "device_index": 0, "use_cuda_graph": False, "dla_core": None,
                       "allow_host_code": True}]
    assert builds == [here]  # the exact key, not the compatible engine's
    exact = cache.store(here, b"exact")
    with Runtime(bundle, "x86-dgpu", precision="fp32", engine_cache_dir=cache.directory) as rt:
        assert rt.artifact == exact.name and rt._builder is None  # the exact engine before a compatible one
    assert opened[-1]["allow_host_code"] is False
    exact.unlink()
    cache.sidecar_path(exact).unlink()
    cache.directory.chmod(0o777)  # anyone could have put the engine there: its host code does not run
    try:
        with Runtime(bundle, "x86-dgpu", precision="fp32", engine_cache_dir=cache.directory,
                     build_engines=False) as rt:
            assert rt.backend is not None and rt.backend.name == "onnxruntime"
    finally:
        cache.directory.chmod(0o755)


def test_an_engine_tensorrt_refuses_at_start_is_an_event_and_onnxruntime_serves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake TensorRT (none here): a cached engine that does not deserialise (a compatible one from another
    release, say) used to make Runtime.load raise; now ONNX Runtime serves and the event says why."""
    from edge_runtime import backends
    from edge_runtime import runtime as rt_mod
    from edge_runtime.backends import OrtBackend
    from edge_runtime.engine_cache import EngineCache, EngineKey
    from edge_runtime.errors import BackendError
    from export import trt_build

    here = EngineKey("ab" * 32, "10.7.0.23", "Orin", "8.7", 8, "fp32", None, {})

    class Refused(OrtBackend):
        name = "tensorrt"

        def __init__(self, engine_path: Path, **_: object) -> None:
            super().__init__(tmp_path / "b" / "fp32.onnx")

        def _load(self) -> None:
            raise BackendError("TensorRT 10.7 could not deserialise it (fake)")

    for module in (rt_mod, backends):
        monkeypatch.setattr(module, "tensorrt_available", lambda: (True, "fake TensorRT"))
    monkeypatch.setattr(backends, "TrtBackend", Refused)
    monkeypatch.setattr(trt_build, "engine_key_for", lambda *a, **k: here)
    bundle = _enhance_bundle(tmp_path / "b")
    cache = EngineCache(tmp_path / "cache")
    cache.store(here, b"engine")
    with Runtime(bundle, "x86-dgpu", precision="fp32", engine_cache_dir=cache.directory, build_engines=False) as rt:
        assert rt.backend is not None and rt.backend.name == "onnxruntime" and rt.artifact == "fp32.onnx"
        assert any("failed to load" in e and "could not deserialise" in e for e in rt.events)
        assert rt.process(_xr()).provenance["backend"] == "onnxruntime"


def test_an_engine_that_fails_to_load_costs_no_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake TensorRT (none here): the built engine cannot be deserialised; the frame that finds it pending
    is still served by ONNX Runtime and the failure is in the events, not raised into process()."""
    from edge_runtime import runtime as rt_mod
    from edge_runtime.errors import BackendError

    class BrokenTrt:
        def __init__(self, *a: object, **k: object) -> None:
            pass

        def load(self) -> None:
            raise BackendError("engine deserialisation failed (fake)")

    monkeypatch.setattr(rt_mod, "TrtBackend", BrokenTrt)
    rt = Runtime(_enhance_bundle(tmp_path / "b"), "cpu-x86").load()
    try:
        rt._engine_ready(tmp_path / "model.engine")
        res = rt.process(_xr())
        assert res.provenance["backend"] == "onnxruntime"
        np.testing.assert_array_equal(res.enhanced, 4095 - _xr().pixels)
        assert any("model.engine failed to load" in e and "deserialisation" in e for e in rt.events)
        assert rt._pending_engine is None and rt.process(_xr()).provenance["backend"] == "onnxruntime"
    finally:
        rt.close()


def test_infer_replaces_old_results_and_skips_refused_frames(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A second run into the same folder leaves only its own lines; a frame the runtime refuses is logged
    by number (no stream id: file names can name patients), skipped, and makes the exit status 1."""
    from edge_runtime.cli import main
    from edge_runtime.pipeline.recorder import read_records

    bundle = _enhance_bundle(tmp_path / "b")
    out = tmp_path / "out"
    args = ["infer", "--bundle", str(bundle), "--source", "phantom:xr", "--out", str(out), "--device", "cpu-x86",
            "--limit", "3", "--every", "0"]
    assert main(args) == 0 and main(args) == 0
    assert [r["seq"] for r in read_records(out / "results.jsonl")] == [0, 1, 2]
    real = RuntimeSet.process

    def refuse_seq_1(self: RuntimeSet, frame: Frame):  # type: ignore[no-untyped-def]
        if frame.seq == 1:
            raise InputError("expected uint16 pixel values in 0..4095 (bits_stored 12), found 'a maximum of 65535'")
        return real(self, frame)

    monkeypatch.setattr(RuntimeSet, "process", refuse_seq_1)
    capsys.readouterr()
    assert main(args) == 1
    assert [r["seq"] for r in read_records(out / "results.jsonl")] == [0, 2]
    captured = capsys.readouterr()
    assert "3 frames" in captured.out and "1 skipped" in captured.out
    assert "frame 1 skipped: expected uint16 pixel values" in caplog.text


def test_an_artifact_file_that_is_not_a_string_is_a_bundle_error(tmp_path: Path) -> None:
    root = _enhance_bundle(tmp_path / "b")
    m = json.loads((root / "manifest.json").read_text())
    m["artifacts"][0]["file"] = ["fp32.onnx"]
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"expected artifact \['fp32.onnx'\] listed in files"):
        Bundle.load(root)


def test_infer_takes_a_stream_id_instead_of_the_file_name(tmp_path: Path) -> None:
    """File names can carry patient identifiers; --stream-id keeps them out of the results."""
    import cv2

    from edge_runtime.cli import main
    from edge_runtime.pipeline.recorder import read_records

    folder = tmp_path / "Doe_Jane_MRN123"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), _xr().pixels)
    out = tmp_path / "o"
    assert main(["infer", "--bundle", str(_enhance_bundle(tmp_path / "b")), "--source", str(folder), "--out", str(out),
                 "--device", "cpu-x86", "--modality", "DX", "--bits-stored", "12", "--stream-id", "cart-1"]) == 0
    (rec,) = read_records(out / "results.jsonl")
    assert rec["stream"] == "cart-1"
    assert [p.name for p in out.glob("*.png")] == ["cart-1_000000.png"]
    assert "MRN123" not in (out / "results.jsonl").read_text()


def test_an_image_to_image_bundle_is_not_built_for_dla(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake TensorRT (none here): on an Orin NX (2 DLA cores) an INT8 enhancer with dynamic H/W gets a GPU
    engine key (dla_core None): DLA runs static shapes only."""
    from edge_runtime import runtime as rt_mod
    from export import trt_build

    seen: dict[str, object] = {}

    def key_for(onnx_path: Path, precision: str, **kw: object) -> object:
        seen.update(kw)
        raise RuntimeError("stop here")  # the key is all this test needs

    monkeypatch.setattr(rt_mod, "tensorrt_available", lambda: (True, "fake TensorRT"))
    monkeypatch.setattr(trt_build, "engine_key_for", key_for)
    with pytest.raises(RuntimeError, match="stop here"):
        Runtime(_int8_bundle(tmp_path / "b"), "jetson-orin-nx-16gb", precision="int8").load()
    assert seen["dla_core"] is None and seen["profiles"] is not None


def test_infer_refuses_a_source_of_another_modality_before_reading_a_frame(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A source whose frames all state one modality (a DICOM file, a phantom, a video or image folder
    with --modality) that no bundle takes was refused frame by frame, a warning each: pydicom's real
    30-frame ultrasound cine through the radiograph detector gave 30 identical warnings. Now one error
    up front, naming both, and no output folder is made."""
    import pydicom

    from edge_runtime.cli import main

    cine = Path(pydicom.__file__).parent / "data" / "test_files" / "examples_ybr_color.dcm"
    out = tmp_path / "out"
    for source, said in ((cine, "stated by the DICOM file"), ("phantom:us", "the phantom's frames")):
        assert main(["infer", "--bundle", "xr-nodule-det", "--source", str(source), "--out", str(out),
                     "--device", "cpu-x86"]) == 1
        err = capsys.readouterr().err
        assert "expected a source of modality ['CR', 'DX', 'XR'] (what the bundles take), found 'US'" in err, err
        assert said in err and not out.exists()
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), _xr().pixels)
    assert main(["infer", "--bundle", str(_enhance_bundle(tmp_path / "b")), "--source", str(images), "--out", str(out),
                 "--modality", "us", "--device", "cpu-x86"]) == 1
    assert "found 'US' (--modality)" in capsys.readouterr().err


def test_infer_logs_a_repeated_reason_for_skipping_three_times_then_counts_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames refused one by one for the same reason (a folder whose images exceed the model's bit
    depth): the first three are logged with their numbers, the rest counted and summed up at the end."""
    from edge_runtime import infer
    from edge_runtime.cli import main

    def refuse(self: RuntimeSet, frame: Frame):  # type: ignore[no-untyped-def]
        # one reason, naming a value of its own frame each time (it was logged for every frame)
        raise InputError(f"expected uint16 pixel values in 0..4095 (bits_stored 12), found 'a maximum of "
                         f"{65000 + frame.seq}'")

    monkeypatch.setattr(RuntimeSet, "process", refuse)
    assert main(["infer", "--bundle", str(_enhance_bundle(tmp_path / "b")), "--source", "phantom:xr",
                 "--out", str(tmp_path / "out"), "--device", "cpu-x86", "--limit", "7"]) == 1
    warned = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warned) == infer.WARN_SAME_REASON == 3, warned
    assert warned[0].startswith("frame 0 skipped: expected uint16") and "counted, not logged" in warned[-1]
    out = capsys.readouterr().out
    assert "7 frames" in out and "7 skipped" in out, out
    assert "\n  7 skipped like this: expected uint16 pixel values in 0..4095 (bits_stored 12), found 'a maximum " \
           "of 65000'" in out, out


def test_infer_says_an_endless_source_runs_until_stopped(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """phantom:xr without --limit never ends: said at the start (it looked hung); Ctrl-C stops it (130)."""
    from edge_runtime.cli import main

    real = RuntimeSet.process

    def stop_at_2(self: RuntimeSet, frame: Frame):  # type: ignore[no-untyped-def]
        if frame.seq == 2:
            raise KeyboardInterrupt
        return real(self, frame)

    monkeypatch.setattr(RuntimeSet, "process", stop_at_2)
    assert main(["infer", "--bundle", str(_enhance_bundle(tmp_path / "b")), "--source", "phantom:xr",
                 "--out", str(tmp_path / "out"), "--device", "cpu-x86"]) == 130
    err = capsys.readouterr().err
    assert "phantom:xr has no end: stop with Ctrl-C, or give --limit N" in err
    assert re.search(r"stopped after 2 frames: [0-2] recorded", err), err  # queued frames are dropped at Ctrl-C


def test_ctrl_c_while_a_command_imports_its_modules_exits_130_without_a_traceback(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing a group (onnxruntime, torch) takes seconds; a Ctrl-C then gave a traceback."""
    from edge_runtime import cli

    def interrupted(name: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    assert cli.main(["infer", "--help"]) == 130
    assert capsys.readouterr().err == "edge-runtime infer: interrupted\n"


def test_a_segmentation_bundle_gives_masks_and_their_contours(tmp_path: Path) -> None:
    """Runtime.process computed the contours on every frame and dropped them (Result had no field)."""
    # logit 0.5 - x: > 0 where x < 0.5
    root = _enhance_bundle(tmp_path / "seg", value=0.5,
                           post={"type": "segmentation", "output": "enhanced", "classes": ["dark"]})
    px = np.full((60, 70), 4000, np.uint16)
    px[10:30, 20:50] = 100  # one dark rectangle
    frame = Frame(px, modality="DX", bits_stored=12)
    with Runtime(root, "cpu-x86") as rt:
        res = rt.process(frame)
    assert res.masks is not None and res.masks.shape == (1, 60, 70) and res.masks[0].sum() == 20 * 30
    assert res.contours is not None and len(res.contours[0]) == 1
    x, y, w, h = cv2.boundingRect(res.contours[0][0])
    assert (x, y, w, h) == (20, 10, 30, 20)
    with RuntimeSet([Runtime(root, "cpu-x86")]) as rs:
        merged = rs.process(frame)
    assert merged.contours is not None and len(merged.contours[0]) == 1


def test_a_cart_serves_only_the_bundles_it_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verification catches a changed file, not a rewritten manifest: a raised score threshold (every
    finding hidden) or swapped class names verified and ran (a privacy review). With
    $EDGE_RUNTIME_TRUSTED_BUNDLES only the manifests listed there are served."""
    import json
    import shutil

    from edge_runtime.bundle import TRUSTED_ENV, Bundle
    from edge_runtime.runtime import reference_bundles
    from export.bundle_write import write_bundle

    shipped = Bundle.load(reference_bundles()["us-lesion-det"])
    edited = tmp_path / "us-lesion-det"
    shutil.copytree(shipped.path, edited)
    m = json.loads((edited / "manifest.json").read_text())
    m["postprocess"]["score_threshold"] = 0.999
    write_bundle(edited, m)  # hashes rewritten: it verifies
    (tmp_path / "trusted.txt").write_text(f"{shipped.sha256}  # us-lesion-det as validated\n")
    monkeypatch.setenv(TRUSTED_ENV, str(tmp_path / "trusted.txt"))
    Runtime(shipped.path, "cpu-x86").load().close()
    with pytest.raises(BundleError, match=f"listed in \\${TRUSTED_ENV} \\(1 listed\\)"):
        Runtime(edited, "cpu-x86").load()
    monkeypatch.setenv(TRUSTED_ENV, str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="a readable file of manifest sha256s"):
        Runtime(shipped.path, "cpu-x86").load()
