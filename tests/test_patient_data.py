"""Patient data stays where it belongs (from a review that reproduced each leak on the old code):
no file or folder name (often an MRN or the patient's name) in any error, event, recording, report or
log line; stream ids not reversible to the name; recordings and snapshots not world-readable; a
result the protocol accepts never takes a sink down."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path

import cv2
import numpy as np
import pydicom.data
import pytest
from test_sources import write_dicom

from edge_runtime import pseudonym
from edge_runtime.cli import main
from edge_runtime.errors import ConfigError, EdgeRuntimeError
from edge_runtime.sources import DicomSource, ImageFolderSource, open_source

NAME = "ZZDOE_JANE_MRN998877"  # a file and folder name a clinic might well use
CINE = Path(pydicom.data.__file__).parent / "test_files" / "examples_ybr_color.dcm"  # 30-frame US cine (JPEG)


def truncated_cine(folder: Path) -> Path:
    """The real cine cut to half its size, in a folder and a file named after the patient."""
    folder.mkdir(parents=True)
    data = CINE.read_bytes()
    path = folder / f"{NAME}.dcm"
    path.write_bytes(data[: len(data) // 2])
    return path


def everything_written(*roots: Path) -> str:
    """The names and the text of every file under ``roots`` (binary files by name only)."""
    out = []
    for root in roots:
        for p in sorted(root.rglob("*")):
            out.append(str(p.relative_to(root)))
            if p.is_file() and p.suffix in (".json", ".jsonl", ".txt", ".log"):
                out.append(p.read_text(errors="replace"))
    return "\n".join(out)


def test_infer_on_a_truncated_file_names_no_file_keeps_its_frames_and_fails(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    source = truncated_cine(tmp_path / NAME)
    out = tmp_path / "out"
    assert main(["infer", "--source", str(source), "--bundle", "us-lesion-det", "--out", str(out),
                 "--device", "cpu-x86", "--every", "5"]) == 1
    printed = capsys.readouterr()
    lines = (out / "results.jsonl").read_text().splitlines()
    assert 0 < len(lines) < 30  # the frames before the cut are kept
    assert f"{len(lines)} frames" in printed.out and "the source stopped after" in printed.err
    assert "truncated" in printed.err
    text = printed.out + printed.err + caplog.text + everything_written(out)
    assert NAME not in text and "ZZDOE" not in text and "MRN998877" not in text


def test_a_folder_skips_the_file_it_cannot_read_and_says_which_by_position(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    folder = tmp_path / NAME
    folder.mkdir()
    for i in range(3):
        assert cv2.imwrite(str(folder / f"img{i}_{NAME}.png"), np.full((64, 64), 40 * i, np.uint8))
    (folder / f"img1_{NAME}.png").write_bytes(b"not a png")  # the second of three, in name order
    images = ImageFolderSource(folder, modality="US")
    assert len(list(images)) == 2 and images.skipped == 1
    assert "image 2 of 3 (in name order) skipped" in caplog.text
    out = tmp_path / "out"
    assert main(["infer", "--source", str(folder), "--bundle", "us-lesion-det", "--out", str(out),
                 "--device", "cpu-x86", "--modality", "US"]) == 1
    printed = capsys.readouterr()
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    assert "1 input file(s) unreadable" in printed.out
    assert NAME not in printed.out + printed.err + caplog.text + everything_written(out)


def test_dicom_series_skips_a_broken_file_and_no_error_names_a_file(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    series = tmp_path / NAME
    series.mkdir()
    for i in range(3):
        write_dicom(series / f"{NAME}_{i}.dcm", np.full((16, 16), 10 * i, np.uint8), InstanceNumber=i + 1)
    good = (series / f"{NAME}_1.dcm").read_bytes()
    (series / f"{NAME}_1.dcm").write_bytes(good[:-100])  # its pixel data cut short
    source = DicomSource(series)
    assert len(list(source)) == 2 and source.skipped == 1
    errors = []
    for bad in (tmp_path / f"{NAME}.avi", tmp_path / NAME / "missing", series / f"{NAME}_1.dcm"):
        with pytest.raises(EdgeRuntimeError) as info:  # each its own error type; the text is the point
            list(open_source(bad))  # the cut file fails when its frames are read
        errors.append(str(info.value))
    assert all(NAME not in e and "ZZDOE" not in e for e in errors), errors
    assert NAME not in caplog.text and repr(source).startswith("DicomSource(stream_id='dicom-")


def test_pipeline_events_recording_and_report_name_no_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The reviewer's reproduction: a truncated cine ended the stream with an error naming the file,
    which went into the end-of-stream event (published to subscribers), results.jsonl and latency.json."""
    caplog.set_level(logging.DEBUG)
    source = truncated_cine(tmp_path / NAME)
    record, report = tmp_path / "rec", tmp_path / "report"
    main(["run", "--source", str(source), "--processor", "identity", "--mode", "thread", "--fast",
          "--record", str(record), "--report", str(report), "--duration", "20"])
    printed = capsys.readouterr()
    events = [json.loads(line) for line in (record / "results.jsonl").read_text().splitlines()]
    ends = [e for e in events if e.get("event") == "end_of_stream"]
    assert ends and "truncated" in str(ends[0].get("error"))  # the reason is still given
    text = printed.out + printed.err + caplog.text + everything_written(record, report)
    assert NAME not in text and "MRN998877" not in text


def test_stream_ids_are_keyed_pseudonyms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unkeyed SHA-256 of "804217.dcm" is found by trying the 10^6 six-digit names (1.2 s on a CPU);
    a keyed one is not, without the install's key (0600, made on first use)."""
    path = write_dicom(tmp_path / "804217.dcm", np.zeros((8, 8), np.uint8))
    monkeypatch.setenv(pseudonym.ENV_VAR, str(tmp_path / "a" / "pseudonym.key"))
    first = DicomSource(path).stream_id
    assert first == DicomSource(path).stream_id  # stable on one install
    assert first != "dicom-" + hashlib.sha256(b"804217.dcm").hexdigest()[:12]
    key = tmp_path / "a" / "pseudonym.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == pseudonym.KEY_BYTES
    monkeypatch.setenv(pseudonym.ENV_VAR, str(tmp_path / "b" / "pseudonym.key"))
    assert DicomSource(path).stream_id != first  # another install, another id
    (tmp_path / "short.key").write_bytes(b"0123")
    monkeypatch.setenv(pseudonym.ENV_VAR, str(tmp_path / "short.key"))
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        DicomSource(path)


def test_an_unwritable_key_place_falls_back_to_a_process_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    monkeypatch.setenv(pseudonym.ENV_VAR, str(blocked / "pseudonym.key"))
    monkeypatch.setattr(pseudonym, "_fallback", None)
    key = pseudonym.key()
    assert len(key) == pseudonym.KEY_BYTES and "for this process only" in caplog.text
    assert pseudonym.key() == key  # one per process: ids stay stable within the run


def test_a_filesystem_without_hard_links_still_gets_one_stable_key(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """vfat / exFAT (a removable partition on a cart) refuse os.link: the key is made in place."""
    def no_links(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setenv(pseudonym.ENV_VAR, str(tmp_path / "vfat" / "pseudonym.key"))
    key = pseudonym.key()
    assert (tmp_path / "vfat" / "pseudonym.key").read_bytes() == key and len(key) == pseudonym.KEY_BYTES
    assert not [p for p in (tmp_path / "vfat").iterdir() if p.name.startswith(".pseudonym-")]


def test_a_looped_folder_with_a_bad_last_file_keeps_streaming(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """The 'every file failed' check once read the skip count of all passes: the third pass of a
    looped folder whose last file is bad ended the stream as failed."""
    from edge_runtime.sources import paced

    for i in range(2):
        assert cv2.imwrite(str(tmp_path / f"a{i}.png"), np.full((8, 8), i, np.uint8))
    (tmp_path / "z.png").write_bytes(b"broken")
    source = ImageFolderSource(tmp_path, modality="US")
    stream = paced(source, realtime=False, loop=True)
    with caplog.at_level(logging.DEBUG, logger="edge_runtime.sources"):
        assert [next(stream).seq for _ in range(10)] == list(range(10))  # 5 passes of 2 good frames
    assert source.skipped == 4
    said = [r.levelno for r in caplog.records if "image 3 of 3" in r.getMessage()]
    assert said == [logging.WARNING] + [logging.DEBUG] * 3  # warned once, not every pass


def test_recorded_images_are_not_world_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = os.umask(0o022)  # the usual default: what OpenCV's files used to get
    try:
        out = tmp_path / "out"
        assert main(["infer", "--source", "phantom:us", "--bundle", "us-lesion-det", "--out", str(out),
                     "--device", "cpu-x86", "--limit", "2"]) == 0
        record = tmp_path / "rec"
        main(["run", "--source", "phantom:us", "--processor", "identity", "--mode", "thread", "--fast",
              "--record", str(record), "--video", "--duration", "3"])
    finally:
        os.umask(old)
    files = [*out.glob("*.png"), out / "results.jsonl", *record.glob("*.mp4"), *record.glob("*.avi"),
             record / "results.jsonl"]
    assert any(p.suffix == ".png" for p in files) and any(p.suffix in (".mp4", ".avi") for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) & 0o007 == 0, (p.name, oct(p.stat().st_mode))
    for d in (out, record):
        assert stat.S_IMODE(d.stat().st_mode) & 0o007 == 0, (d.name, oct(d.stat().st_mode))


def test_newcomer_mistakes_are_one_line_errors_without_the_path(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A DICOM file given where a folder or a YAML file is meant, a bundle or device that is not there,
    Ctrl-C: exit status 1 (130 for Ctrl-C) and one line naming what was expected, no traceback and no
    file name (it can identify a patient); `run` checks bundles and device before starting workers
    (it printed a traceback per worker restart and could exit 0)."""
    dcm = tmp_path / "Doe^Jane.dcm"
    dcm.write_bytes(Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes())
    cases = [
        (["infer", "--bundle", "us-lesion-det", "--source", "phantom:us", "--out", str(dcm)], "an output folder"),
        (["run", "--source", "phantom:us", "--processor", "identity", "--mode", "thread", "--duration", "1",
          "--record", str(dcm)], "an output folder"),
        (["keys", "generate", str(dcm)], "File exists"),
        (["devices", "--config", str(dcm)], "a UTF-8 YAML device config"),
        (["run", "--source", "phantom:us", "--bundle", "nope", "--mode", "thread", "--duration", "1"],
         "a bundle directory"),
        (["run", "--source", "phantom:us", "--bundle", "us-lesion-det", "--device", "nope", "--mode", "thread",
          "--duration", "1"], "a device config name"),
    ]
    for argv, says in cases:
        capsys.readouterr()
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and "Doe" not in err, (argv, err)

    from edge_runtime import infer

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(infer, "run", interrupted)
    assert main(["infer", "--bundle", "us-lesion-det", "--source", "phantom:us", "--out", str(tmp_path / "o")]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_pydicom_never_quotes_an_element_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    """Scanners write non-conforming values; pydicom's checks (run when a value is first used: every
    element of a 12-bit file, a series folder's SeriesInstanceUID) quoted them in warnings to the log
    and stderr, e.g. a StudyInstanceUID built from an accession number (a privacy review)."""
    import warnings

    from pydicom import config

    monkeypatch.setattr(config.settings, "reading_validation_mode", config.WARN)  # pydicom's default
    px = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096
    (tmp_path / "s").mkdir()
    monkeypatch.setattr(config.settings, "writing_validation_mode", config.IGNORE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dicom(tmp_path / "s" / "a.dcm", px, bits_stored=12,
                    StudyInstanceUID="1.2.826.0.1.ACC777LEAK.01", SeriesInstanceUID="1.2.826.0.1.MRN123LEAK.02")
    caplog.clear()
    capfd.readouterr()
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for source in (tmp_path / "s" / "a.dcm", tmp_path / "s"):  # a file, a series folder
            assert len(list(open_source(source))) == 1
    shown = capfd.readouterr()
    text = caplog.text + shown.out + shown.err + " ".join(str(w.message) for w in caught)
    assert "LEAK" not in text, text


def test_two_patients_files_of_one_name_get_two_stream_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scanner exports name every patient's files alike: two patients' IM000001.dcm (and SERIES1 folders)
    got one stream id, so one set of result, PNG and video names (a privacy review). The pseudonym is
    now of the absolute path: stable for one file, distinct for two."""
    monkeypatch.setenv(pseudonym.ENV_VAR, str(tmp_path / "pseudonym.key"))
    ids = {}
    for patient in ("A", "B"):
        (tmp_path / patient / "SERIES1").mkdir(parents=True)
        path = write_dicom(tmp_path / patient / "SERIES1" / "IM000001.dcm", np.zeros((8, 8), np.uint8))
        ids[patient] = (DicomSource(path).stream_id, open_source(path.parent).stream_id)
        assert ids[patient] == (DicomSource(path).stream_id, open_source(path.parent).stream_id)
    assert len({*ids["A"], *ids["B"]}) == 4, ids
