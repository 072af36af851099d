"""Frame sources on real pydicom files, DICOM / image / video files written here, and errors."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import MPEG4HP41, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from edge_runtime.errors import ConfigError, InputError, UnsupportedFormatError
from edge_runtime.frames import Frame
from edge_runtime.sources import (
    CameraSource,
    DicomSource,
    ImageFolderSource,
    PhantomSource,
    VideoSource,
    open_source,
    paced,
)

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
PATIENT = ("Doe^Jane", "SECRET-ID-4711", "19700101")  # must never leak into frames, logs or errors


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 8,
                **attrs: object) -> Path:
    """A minimal Secondary Capture file with identifiers that must not leak."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT
    ds.StudyDate = PATIENT[2]
    ds.Modality = "DX"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.set_pixel_data(pixels, photometric, bits_stored)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_no_identifiers(frames: list[Frame], text: str = "") -> None:
    for frame in frames:
        fields = f"{frame.source} {frame.stream_id} {frame.modality} {frame.photometric}"
        assert not any(value in fields for value in PATIENT)
    assert not any(value in text for value in PATIENT)


# --- real pydicom ultrasound files ----------------------------------------------------------


def test_jpeg_ultrasound_cine_decodes_frame_by_frame_to_rgb() -> None:
    path = TEST_FILES / "examples_ybr_color.dcm"
    source = DicomSource(path)
    frames = list(source)
    assert len(frames) == 30 and source.n_frames == 30
    assert source.fps == pytest.approx(30.0, abs=0.01)
    assert [f.seq for f in frames] == list(range(30))
    first = frames[0]
    assert first.pixels.shape == (240, 320, 3) and first.pixels.dtype == np.uint8
    assert (first.photometric, first.modality, first.bits_stored) == ("RGB", "US", 8)
    # SequenceOfUltrasoundRegions: PhysicalDeltaX/Y in cm -> mm
    assert first.pixel_spacing == pytest.approx((0.5105, 0.5105), abs=1e-4)
    reference = pydicom.dcmread(path).pixel_array  # pydicom converts YBR_FULL_422 to RGB
    np.testing.assert_array_equal(np.stack([f.pixels for f in frames]), reference)


def test_palette_color_goes_through_its_lut() -> None:
    """The file's LUT is nominally 16-bit but holds 8-bit values scaled by 256: the frame is 8-bit colour
    (so the 8-bit ultrasound models take it); a LUT with real 16-bit entries stays 16-bit."""
    path = TEST_FILES / "examples_palette.dcm"
    (frame,) = list(DicomSource(path))
    ds = pydicom.dcmread(path)
    expected = apply_color_lut(ds.pixel_array, ds)
    assert expected.dtype == np.uint16 and not (expected & 0xFF).any()
    assert frame.photometric == "RGB" and frame.pixels.shape == (350, 800, 3)
    assert (frame.pixels.dtype, frame.bits_stored) == (np.uint8, 8)
    np.testing.assert_array_equal(frame.pixels, expected >> 8)


def test_palette_with_16_bit_entries_stays_16_bit(tmp_path) -> None:
    ds = pydicom.dcmread(TEST_FILES / "examples_palette.dcm")
    lut = np.frombuffer(ds.RedPaletteColorLookupTableData, "<u2").copy()
    lut[1::2] |= 1  # odd entries no longer a multiple of 256 (nor of 257)
    ds.RedPaletteColorLookupTableData = lut.tobytes()
    ds.save_as(tmp_path / "p16.dcm")
    (frame,) = list(DicomSource(tmp_path / "p16.dcm"))
    assert (frame.pixels.dtype, frame.bits_stored) == (np.uint16, 16)
    np.testing.assert_array_equal(frame.pixels, apply_color_lut(ds.pixel_array, ds))


def test_rgb_ultrasound_file() -> None:
    path = TEST_FILES / "examples_rgb_color.dcm"
    (frame,) = list(open_source(path))
    assert (frame.photometric, frame.modality, frame.pixels.dtype) == ("RGB", "US", np.uint8)
    np.testing.assert_array_equal(frame.pixels, pydicom.dcmread(path).pixel_array)


# --- DICOM files written here --------------------------------------------------------------


@pytest.fixture
def mono1_12bit(tmp_path: Path) -> Path:
    raw = np.random.default_rng(1).integers(0, 4096, (40, 48), dtype=np.uint16)
    return write_dicom(tmp_path / "mono1.dcm", raw, "MONOCHROME1", 12, WindowCenter=2000, WindowWidth=1000)


def test_monochrome1_12bit_is_inverted_and_keeps_depth(mono1_12bit: Path) -> None:
    ds = pydicom.dcmread(mono1_12bit)
    (frame,) = list(DicomSource(mono1_12bit))
    assert (frame.photometric, frame.bits_stored, frame.pixels.dtype) == ("MONOCHROME2", 12, np.uint16)
    np.testing.assert_array_equal(frame.pixels, 4095 - ds.pixel_array)


def test_window_from_file_matches_pydicom_then_inverts(mono1_12bit: Path) -> None:
    ds = pydicom.dcmread(mono1_12bit)
    shown = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)  # float64 in 0..4095
    (frame,) = list(DicomSource(mono1_12bit, apply_voi=True))
    assert frame.bits_stored == 12 and frame.photometric == "MONOCHROME2"
    np.testing.assert_array_equal(frame.pixels, 4095 - np.rint(shown).astype(np.uint16))
    assert frame.pixels.min() == 0 and frame.pixels.max() == 4095  # the window clips both ends


def test_window_argument_overrides_the_file(mono1_12bit: Path) -> None:
    ds = pydicom.dcmread(mono1_12bit)
    ds.WindowCenter, ds.WindowWidth = 1000, 500
    shown = apply_voi_lut(ds.pixel_array, ds)
    (frame,) = list(DicomSource(mono1_12bit, window=(1000, 500)))
    np.testing.assert_array_equal(frame.pixels, 4095 - np.rint(shown).astype(np.uint16))
    with pytest.raises(ConfigError, match="width"):
        DicomSource(mono1_12bit, window=(1000, 0))


def test_voi_lut_sequence_is_preferred_over_the_window(tmp_path: Path) -> None:
    raw = np.random.default_rng(2).integers(0, 4096, (32, 32), dtype=np.uint16)
    lut = np.rint(4095 * (np.arange(4096) / 4095) ** 0.5).astype(np.uint16)  # a gamma curve
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 12])  # LUT Descriptor: entries, first mapped, bits
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    path = write_dicom(tmp_path / "voi.dcm", raw, "MONOCHROME2", 12, WindowCenter=100, WindowWidth=10,
                       VOILUTSequence=[item])
    ds = pydicom.dcmread(path)
    (frame,) = list(DicomSource(path, apply_voi=True))
    np.testing.assert_array_equal(frame.pixels, apply_voi_lut(ds.pixel_array, ds, prefer_lut=True))
    np.testing.assert_array_equal(frame.pixels, lut[raw])


def test_one_rescale_tag_alone_still_rescales(tmp_path: Path) -> None:
    """The header said rescaled (dtype and bits_stored computed from slope/intercept) while pydicom's
    apply_modality_lut rescales only when both tags are present: the pixels went out unscaled."""
    raw = np.array([[0, 1000], [2000, 4095]], np.uint16)
    (f,) = list(DicomSource(write_dicom(tmp_path / "i.dcm", raw, "MONOCHROME2", 12, RescaleIntercept=-1024)))
    np.testing.assert_array_equal(f.pixels, raw.astype(np.float32) - 1024)
    (f,) = list(DicomSource(write_dicom(tmp_path / "s.dcm", raw, "MONOCHROME2", 12, RescaleSlope=2)))
    assert (f.pixels.dtype, f.bits_stored) == (np.uint16, 13)
    np.testing.assert_array_equal(f.pixels, raw * 2)


def test_a_window_over_a_negative_rescale_slope_keeps_dark_dark(tmp_path: Path) -> None:
    """Slope -1: pydicom's window output runs from y(0) = 4095 down to y(4095) = 0; read as the sorted
    range, every windowed frame came out inverted. The same rescaled values with slope +1 are the check."""
    raw = np.array([[0, 1000], [2000, 4095]], np.uint16)
    neg = write_dicom(tmp_path / "n.dcm", raw, "MONOCHROME2", 12, RescaleSlope=-1, RescaleIntercept=4095)
    pos = write_dicom(tmp_path / "p.dcm", 4095 - raw, "MONOCHROME2", 12, RescaleSlope=1, RescaleIntercept=0.5)
    (a,) = list(DicomSource(neg, window=(2000, 10)))
    (b,) = list(DicomSource(pos, window=(2000, 10)))
    np.testing.assert_array_equal(a.pixels, [[4095, 4095], [4095, 0]])  # rescaled 4095, 3095, 2095 | 0
    np.testing.assert_array_equal(a.pixels, b.pixels)


def test_rescale_slope_intercept(tmp_path: Path) -> None:
    raw = np.random.default_rng(3).integers(0, 4096, (16, 20), dtype=np.uint16)
    integral = write_dicom(tmp_path / "int.dcm", raw, "MONOCHROME2", 12, RescaleSlope=2, RescaleIntercept=100)
    fractional = write_dicom(tmp_path / "frac.dcm", raw, "MONOCHROME2", 12, RescaleSlope=0.5, RescaleIntercept=-10)
    (whole,) = list(DicomSource(integral))
    ds = pydicom.dcmread(integral)
    assert whole.pixels.dtype == np.uint16 and whole.bits_stored == 14  # 4095 * 2 + 100 needs 14 bits
    np.testing.assert_array_equal(whole.pixels, apply_modality_lut(ds.pixel_array, ds))
    # fractional (-10 .. 2037.5): the real values, float32, never shifted or stretched
    (real,) = list(DicomSource(fractional))
    assert (real.pixels.dtype, real.bits_stored) == (np.float32, 12)
    np.testing.assert_allclose(real.pixels, raw * 0.5 - 10)
    ct = pydicom.dcmread(TEST_FILES / "CT_small.dcm")  # signed 16-bit, intercept -1024: Hounsfield units
    (hu,) = list(DicomSource(TEST_FILES / "CT_small.dcm"))
    assert (hu.pixels.dtype, hu.bits_stored) == (np.float32, 16)
    np.testing.assert_array_equal(hu.pixels, apply_modality_lut(ct.pixel_array, ct))
    # with a window the window defines the mapping, on Hounsfield units as pydicom applies it
    (shown,) = list(DicomSource(TEST_FILES / "CT_small.dcm", window=(40, 400)))
    ct.WindowCenter, ct.WindowWidth = 40, 400
    expected_hu = apply_voi_lut(apply_modality_lut(ct.pixel_array, ct), ct)  # spans the post-rescale range
    top, lo, hi = 65535.0, -32768.0 - 1024, 32767.0 - 1024
    np.testing.assert_array_equal(shown.pixels, np.rint((expected_hu - lo) * (top / (hi - lo))).astype(np.uint16))


def one_image_stored_five_ways(tmp_path: Path) -> dict[str, Path]:
    """The same 12-bit values: unsigned, signed (PixelRepresentation 1), signed with an offset undone by
    the intercept, signed MONOCHROME1; and stored raw but shown as raw / 4 (a fractional slope)."""
    raw = np.random.default_rng(7).integers(0, 2048, (24, 32), dtype=np.uint16)  # what 12 bits signed can hold
    raw[0, :2] = 0, 2047
    return {
        "unsigned": write_dicom(tmp_path / "u.dcm", raw, "MONOCHROME2", 12),
        "signed": write_dicom(tmp_path / "s.dcm", raw.astype(np.int16), "MONOCHROME2", 12),
        "signed+intercept": write_dicom(tmp_path / "si.dcm", (raw.astype(np.int32) - 2048).astype(np.int16),
                                        "MONOCHROME2", 12, RescaleSlope=1, RescaleIntercept=2048),
        "signed MONOCHROME1": write_dicom(tmp_path / "m1.dcm", (4095 - raw.astype(np.int32) - 2048).astype(np.int16),
                                          "MONOCHROME1", 12, RescaleSlope=1, RescaleIntercept=2048),
        "slope 0.25": write_dicom(tmp_path / "q.dcm", raw, "MONOCHROME2", 12, RescaleSlope=0.25, RescaleIntercept=0),
    }


def test_signed_and_rescaled_storage_give_the_model_the_real_values(tmp_path: Path) -> None:
    """A stored value means the same number signed or unsigned (an earlier fix shifted signed storage
    by 2048): every storage of the same values gives one tensor; a rescale gives its real values; values
    outside 0..4095 (negative) are refused without a window instead of reaching the model shifted."""
    from edge_runtime.preprocess import Preprocessor

    files = one_image_stored_five_ways(tmp_path)
    pre = Preprocessor({"color": "gray"}, modality=["DX"], bits_stored=12)
    frames = {name: next(iter(DicomSource(path))) for name, path in files.items()}
    reference = frames["unsigned"].pixels.astype(np.float32)
    want = {"slope 0.25": reference / 4}
    for name, frame in frames.items():
        assert frame.bits_stored == 12 and frame.photometric == "MONOCHROME2", name
        np.testing.assert_allclose(frame.pixels, want.get(name, reference), err_msg=name)
        np.testing.assert_allclose(pre(frame)[0], want.get(name, reference)[None, None] / 4095, atol=1e-6,
                                   err_msg=name)
    negative = write_dicom(tmp_path / "n.dcm", (reference - 2048).astype(np.int16), "MONOCHROME2", 12)
    with pytest.raises(InputError, match=r"0\.\.4095"):
        pre(next(iter(DicomSource(negative))))


def test_float_pixel_data_needs_a_window(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "f.dcm", np.zeros((4, 4), np.uint16), "MONOCHROME2", 12)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    del ds.PixelRepresentation
    ds.FloatPixelData = np.linspace(-1, 1, 16, dtype=np.float32).tobytes()
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(UnsupportedFormatError, match=r"expected integer pixel data, or a window.*no window applied"):
        list(DicomSource(path))
    with pytest.raises(InputError, match="RescaleSlope"):
        DicomSource(write_dicom(tmp_path / "z.dcm", np.zeros((4, 4), np.uint16), "MONOCHROME2", 12,
                                RescaleSlope=0, RescaleIntercept=-5))


def test_rgb_and_multiframe_written_here(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    (frame,) = list(DicomSource(write_dicom(tmp_path / "rgb.dcm", rgb, "RGB", 8)))
    np.testing.assert_array_equal(frame.pixels, rgb)
    cine = rng.integers(0, 1024, (5, 20, 30), dtype=np.uint16)
    path = write_dicom(tmp_path / "cine.dcm", cine, "MONOCHROME2", 10, FrameTime=50, Modality="XA")
    source = DicomSource(path)
    frames = list(source)
    assert source.fps == pytest.approx(20.0) and source.n_frames == 5
    assert [f.modality for f in frames] == ["XA"] * 5 and frames[0].bits_stored == 10
    np.testing.assert_array_equal(np.stack([f.pixels for f in frames]), cine)
    # asked for a VOI the file does not have: pixels stay as stored (and a warning says so)
    np.testing.assert_array_equal(next(iter(DicomSource(path, apply_voi=True))).pixels, cine[0])


def test_series_folder_ordered_by_instance_number(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    # file names in the opposite order of InstanceNumber; each frame's value is its instance number
    for name, instance in [("a1.dcm", 4), ("a2.dcm", 3), ("a10.dcm", 1), ("b.dcm", 2)]:
        write_dicom(folder / name, np.full((8, 8), instance, np.uint8), InstanceNumber=instance, ImagerPixelSpacing=[0.2, 0.3])
    (folder / "README.txt").write_text("not a DICOM file")
    caplog.set_level(logging.DEBUG)
    source = open_source(folder)
    assert isinstance(source, DicomSource)
    frames = list(source)
    assert [int(f.pixels[0, 0]) for f in frames] == [1, 2, 3, 4]
    assert frames[0].pixel_spacing == pytest.approx((0.2, 0.3))
    assert_no_identifiers(frames, caplog.text)


def test_a_series_file_cut_in_its_header_is_counted_not_dropped_silently(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A file of a series cut before Rows read as a non-image object and vanished (2 frames, exit 0,
    positions 'file 1 of 3'); an image SOP class without image attributes is counted as unreadable.
    Images beside the DICOM files of a folder are named as left out."""
    folder = tmp_path / "series"
    folder.mkdir()
    for i in range(3):
        write_dicom(folder / f"im{i}.dcm", np.full((8, 8), i + 1, np.uint8), InstanceNumber=i + 1)
    data = (folder / "im1.dcm").read_bytes()
    (folder / "im1.dcm").write_bytes(data[:300])  # the header cut before (0028,0010) Rows
    cv2.imwrite(str(folder / "extra.png"), np.zeros((8, 8), np.uint8))
    caplog.set_level(logging.WARNING)
    source = open_source(folder)
    frames = list(source)
    assert [int(f.pixels[0, 0]) for f in frames] == [1, 3]
    assert source.skipped == 1 and "file cut short in its header" in caplog.text
    assert "1 image file(s) beside the DICOM files of the folder left out" in caplog.text
    assert_no_identifiers(frames, caplog.text)


def test_stream_ids_from_file_names_match_the_protocol(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """File and folder names with spaces, '^', non-ASCII or 68-character UIDs used to become stream ids
    that every worker rejects (protocol STREAM_RE); then names made safe, which still carried a patient's
    name into every header and recording. Now a file source's default id is a pseudonym (kind + hash of
    the name): valid, distinct, stable, and free of the name."""
    from edge_runtime.pipeline.protocol import STREAM_RE
    from edge_runtime.sources import safe_stream_id

    caplog.set_level(logging.DEBUG)
    image = np.full((8, 8), 100, np.uint8)
    uid = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678"  # 64 characters, the most
    assert len(uid + ".dcm") == 68
    folder = tmp_path / "scan 1"
    folder.mkdir()
    assert cv2.imwrite(str(folder / "a.png"), image)
    video = tmp_path / "échographie.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (8, 8))
    writer.write(np.zeros((8, 8, 3), np.uint8))
    writer.release()
    sources = [DicomSource(write_dicom(tmp_path / name, image)) for name in ("IM 0001", "Doe^John.dcm", uid + ".dcm")]
    sources += [open_source(folder), open_source(video)]
    ids = [s.stream_id for s in sources]
    for source, frame in zip(sources, (next(iter(s)) for s in sources)):
        assert STREAM_RE.fullmatch(source.stream_id) and frame.stream_id == source.stream_id, source.stream_id
        assert len(source.stream_id) <= 64
    assert [i.split("-")[0] for i in ids] == ["dicom", "dicom", "dicom", "images", "video"] and len(set(ids)) == 5
    assert all(re.fullmatch(r"[a-z]+-[0-9a-f]{12}", i) for i in ids), ids
    assert not any(part in i for i in ids for part in ("Doe", "John", "IM", "scan", "chographie"))
    assert DicomSource(tmp_path / "Doe^John.dcm").stream_id == ids[1]  # stable: the same file, the same id
    assert "Doe" not in caplog.text and "John" not in caplog.text  # no log line names the files
    # names that read alike after replacement stay apart; safe short names are kept as they are
    assert len({safe_stream_id(n) for n in ("Doe^John", "Doe_John", "Doe John", "Doe~John")}) == 4
    assert safe_stream_id("Doe_John") == "Doe_John" and safe_stream_id("chest.dcm") == "chest.dcm"
    assert safe_stream_id(uid + ".dcm") != safe_stream_id(uid + ".DCM")
    for name in ("", "x" * 65, "ü" * 200, "a/b\\c", "\udcff"):
        assert STREAM_RE.fullmatch(safe_stream_id(name)), name
    # an id the caller chose is checked, not rewritten
    assert ImageFolderSource(folder, stream_id="cart-1.probe:2").stream_id == "cart-1.probe:2"
    with pytest.raises(ConfigError, match="stream_id"):
        ImageFolderSource(folder, stream_id="probe 1")


# --- DICOM errors --------------------------------------------------------------------------


def test_missing_paths_are_input_errors_that_name_no_path(tmp_path: Path) -> None:
    """Source errors reach end-of-stream events, subscribers and recordings: no path in them (a folder
    or file name can be the patient's); the operator knows the path they gave."""
    missing = tmp_path / "nowhere" / "cine.dcm"
    for build in (DicomSource, VideoSource, ImageFolderSource, open_source):
        with pytest.raises(InputError, match="none at the path given") as info:
            build(missing)
        assert "nowhere" not in str(info.value) and "cine" not in str(info.value)


def test_non_dicom_file_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"hello, not DICOM" * 20)
    with pytest.raises(InputError, match="DICM"):
        DicomSource(path)
    with pytest.raises(UnsupportedFormatError, match="found 'a .dcm file'"):
        open_source(path)  # no preamble, not a video or image extension


def test_pixel_data_with_more_frames_than_declared_is_refused(tmp_path: Path) -> None:
    """Three frames of data under NumberOfFrames 2: pydicom decodes two and says nothing, so the third
    was lost unseen. Now refused, naming both counts; padding of less than a frame (a real pydicom
    file) still decodes."""
    cine = np.random.default_rng(2).integers(0, 4096, (3, 32, 32), dtype=np.uint16)
    path = write_dicom(tmp_path / "cine.dcm", cine, "MONOCHROME2", 12, NumberOfFrames=2)
    with pytest.raises(InputError, match=r"2 frame\(s\) \(NumberOfFrames\).*3 whole frames' worth") as info:
        list(DicomSource(path))
    assert_no_identifiers([], str(info.value))
    assert len(list(DicomSource(write_dicom(tmp_path / "ok.dcm", cine, "MONOCHROME2", 12)))) == 3
    padded = pydicom.dcmread(TEST_FILES / "MR_small_padded.dcm")
    assert len(padded.PixelData) > padded.Rows * padded.Columns * 2  # 128 bytes of padding
    assert len(list(DicomSource(TEST_FILES / "MR_small_padded.dcm"))) == 1


@pytest.mark.parametrize("source_name", ["examples_ybr_color.dcm", "uncompressed"])
def test_truncated_dicom_is_an_input_error(tmp_path: Path, source_name: str) -> None:
    if source_name == "uncompressed":
        cine = np.random.default_rng(5).integers(0, 4096, (3, 64, 64), dtype=np.uint16)
        data = write_dicom(tmp_path / "full.dcm", cine, "MONOCHROME2", 12).read_bytes()
    else:
        data = (TEST_FILES / source_name).read_bytes()
    cut = tmp_path / "DOE_JANE.dcm"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match="truncated") as info:
        list(DicomSource(cut))
    assert "DOE" not in str(info.value)  # no file name in a message that travels
    assert_no_identifiers([], str(info.value))
    cut.write_bytes(data[:200])  # inside the header
    with pytest.raises(InputError):
        list(DicomSource(cut))
    cut.write_bytes(data[:400])  # past the meta, before Rows: the message says it may be cut
    with pytest.raises(InputError, match="cut short in its header"):
        list(DicomSource(cut))


def test_undecodable_transfer_syntax_names_itself(tmp_path: Path) -> None:
    raw = np.zeros((16, 16), np.uint8)
    path = write_dicom(tmp_path / "h264.dcm", raw, "MONOCHROME2", 8)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = MPEG4HP41  # H.264 cine: pydicom has no decoder for it
    ds.PixelData = encapsulate([b"\x00\x00\x00\x01" + bytes(64)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(UnsupportedFormatError) as info:
        DicomSource(path)
    message = str(info.value)
    assert "MPEG-4 AVC/H.264" in message and str(MPEG4HP41) in message and "opencv-python" in message
    assert_no_identifiers([], message)


def test_missing_decoder_plugin_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydicom.pixels.decoders.base import Decoder

    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    with pytest.raises(UnsupportedFormatError, match="pylibjpeg-libjpeg") as info:
        DicomSource(TEST_FILES / "MR_small_jpeg_ls_lossless.dcm")
    assert "JPEG-LS Lossless" in str(info.value) and "1.2.840.10008.1.2.4.80" in str(info.value)
    with pytest.raises(UnsupportedFormatError, match="pylibjpeg-openjpeg"):
        DicomSource(TEST_FILES / "JPEG2000.dcm")


def test_empty_folders_are_input_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    for build in (DicomSource, ImageFolderSource, open_source):
        with pytest.raises(InputError, match="none"):
            build(tmp_path)


# --- images and video ----------------------------------------------------------------------


def test_16bit_png_and_tiff_keep_depth_in_natural_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    images = {name: rng.integers(0, 4096, (30, 40), dtype=np.uint16) for name in ("img2.png", "img10.tif", "img1.tiff")}
    for name, image in images.items():
        assert cv2.imwrite(str(tmp_path / name), image)
    source = ImageFolderSource(tmp_path, bits_stored=12, modality="DX")
    frames = list(source)
    assert source.n_frames is None and [f.bits_stored for f in frames] == [12] * 3  # TIFFs may hold several pages
    for frame, name in zip(frames, ["img1.tiff", "img2.png", "img10.tif"], strict=True):
        assert frame.pixels.dtype == np.uint16 and frame.modality == "DX"
        np.testing.assert_array_equal(frame.pixels, images[name])
    with pytest.raises(InputError, match="readable file of the 3 in the folder.*bits_stored=8"):
        list(ImageFolderSource(tmp_path, bits_stored=8))  # every file refused: an option is wrong


def test_8bit_colour_png_is_rgb(tmp_path: Path) -> None:
    bgr = np.zeros((10, 12, 3), np.uint8)
    bgr[..., 2] = 200  # red in OpenCV's BGR order
    assert cv2.imwrite(str(tmp_path / "red.png"), bgr)
    (frame,) = list(open_source(tmp_path))
    assert frame.photometric == "RGB" and frame.pixels[0, 0].tolist() == [200, 0, 0]
    (gray,) = list(ImageFolderSource(tmp_path / "red.png", gray=True))
    assert gray.pixels.ndim == 2 and gray.photometric == "MONOCHROME2"


def test_video_file_frame_rate_and_count(tmp_path: Path) -> None:
    path = tmp_path / "probe.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (64, 48))
    assert writer.isOpened()
    for i in range(12):
        bgr = np.zeros((48, 64, 3), np.uint8)
        bgr[..., 2] = 100 + 10 * i  # red ramp
        writer.write(bgr)
    writer.release()
    source = open_source(path)
    assert isinstance(source, VideoSource) and source.fps == pytest.approx(25.0)
    frames = list(source)
    assert len(frames) == 12 and frames[0].pixels.shape == (48, 64, 3)
    assert frames[0].modality == "US" and frames[-1].seq == 11
    red, green, blue = frames[5].pixels[24, 32].astype(int)
    assert abs(red - 150) < 8 and green < 8 and blue < 8  # BGR -> RGB, JPEG-lossy
    gray = next(iter(VideoSource(path, gray=True)))
    assert gray.pixels.shape == (48, 64)


def test_each_page_of_a_multi_page_tiff_is_a_frame(tmp_path: Path) -> None:
    """cv2.imdecode reads a TIFF's first page only: a 3-page stack gave one frame and no word."""
    pages = [np.full((20, 30), 1000 * (i + 1), np.uint16) for i in range(3)]
    assert cv2.imwritemulti(str(tmp_path / "a_stack.tif"), pages)
    cv2.imwrite(str(tmp_path / "b_single.png"), np.full((20, 30), 7, np.uint16))
    frames = list(ImageFolderSource(tmp_path, bits_stored=12, modality="DX"))
    assert [int(f.pixels[0, 0]) for f in frames] == [1000, 2000, 3000, 7]
    assert [f.seq for f in frames] == [0, 1, 2, 3]
    assert [f.position for f in frames][:3] == [f"image 1 of 2, page {k} of 3" for k in (1, 2, 3)]
    # Cut inside its last page, OpenCV gives the pages before without a word: refused (skipped, counted).
    stack = (tmp_path / "a_stack.tif").read_bytes()
    (tmp_path / "a_stack.tif").write_bytes(stack[: len(stack) - 40])
    source = ImageFolderSource(tmp_path, bits_stored=12, modality="DX")
    assert [int(f.pixels[0, 0]) for f in source] == [7] and source.skipped == 1


def test_natural_order_takes_only_ascii_digits_as_numbers() -> None:
    """'²'.isdigit() is True but int('²') fails: a folder holding such a name was a traceback."""
    from edge_runtime.sources import natural_key

    names = ["f10.png", "f2.png", "f1\u00b22.png", "F3.png"]
    assert sorted(names, key=natural_key) == ["f1\u00b22.png", "f2.png", "F3.png", "f10.png"]


def test_a_cut_or_damaged_video_keeps_its_whole_frames_and_says_so(tmp_path: Path) -> None:
    """FFmpeg (through OpenCV) ends a cut file early and skips frames it cannot decode, silently: a
    12-frame video cut in half gave 6 frames (the 6th damaged) and exit 0. The container's count tells:
    the frames before the cut are kept, the last one decoded is refused as possibly damaged, and the
    source then raises InputError naming both counts."""
    rng = np.random.default_rng(3)
    path = tmp_path / "cine.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (64, 48))
    for _ in range(12):
        writer.write(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))  # noise: frames of similar size
    writer.release()
    data = path.read_bytes()
    whole = list(VideoSource(path))
    assert len(whole) == 12
    cut = tmp_path / "DOE_JANE.avi"
    cut.write_bytes(data[: len(data) // 2])
    got: list[Frame] = []
    with pytest.raises(InputError, match=r"12 frames \(the container's count\).*cut off or damaged") as info:
        got.extend(VideoSource(cut))
    assert 3 <= len(got) <= 6 and [f.seq for f in got] == list(range(len(got)))
    for a, b in zip(got, whole):
        np.testing.assert_array_equal(a.pixels, b.pixels)  # every frame kept is whole
    assert "DOE" not in str(info.value)  # no file name
    damaged = bytearray(data)
    middle = len(data) // 2
    damaged[middle: middle + 3000] = bytes(3000)  # zeros over part of a frame in the middle
    bad = tmp_path / "bad.avi"
    bad.write_bytes(bytes(damaged))
    got = []
    with pytest.raises(InputError, match="12 frames"):
        got.extend(VideoSource(bad))
    assert len(got) < 12


def test_unreadable_video_and_camera_are_clear_errors(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.mp4"
    bogus.write_bytes(b"\x00" * 512)
    with pytest.raises(UnsupportedFormatError, match="a .mp4 file it cannot open"):
        VideoSource(bogus)
    with pytest.raises(InputError, match="camera"):
        CameraSource(97)
    with pytest.raises(ConfigError, match="camera"):
        open_source("camera:front")
    # A 16-bit PNG named .mp4: FFmpeg opened it as a one-frame 8-bit "video" (values down to <= 13)
    still = tmp_path / "scan.mp4"
    assert cv2.imwrite(str(tmp_path / "scan.png"), np.full((16, 16), 3000, np.uint16))
    (tmp_path / "scan.png").rename(still)
    with pytest.raises(UnsupportedFormatError, match="a video file \\(.mp4\\), found 'a PNG image named .mp4'"):
        open_source(still)


# --- pacing --------------------------------------------------------------------------------


@pytest.fixture
def ten_images(tmp_path: Path) -> Path:
    for i in range(10):
        assert cv2.imwrite(str(tmp_path / f"f{i}.png"), np.full((4, 4), i, np.uint8))
    return tmp_path


def test_realtime_pacing_follows_the_frame_rate(ten_images: Path) -> None:
    source = ImageFolderSource(ten_images, fps=100.0)
    start = time.monotonic()
    frames = list(paced(source, realtime=True))
    elapsed = time.monotonic() - start
    assert len(frames) == 10 and elapsed >= 0.08  # 9 periods of 10 ms after the first frame
    stamps = [f.capture_ns for f in frames]
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] >= 85_000_000


def test_a_paced_frame_is_stamped_on_schedule_even_when_the_consumer_is_late(ten_images: Path) -> None:
    """A paced file source stands in for a camera: a consumer (or a process woken) 50 ms late must see
    capture stamps on the 10 ms schedule, so the lateness counts in capture -> sink latency."""
    stream = paced(ImageFolderSource(ten_images, fps=100.0), realtime=True)
    first = next(stream)
    time.sleep(0.05)
    late = [next(stream) for _ in range(3)]  # due at +10, +20, +30 ms: all already late
    assert [f.capture_ns - first.capture_ns for f in late] == [10_000_000, 20_000_000, 30_000_000]
    assert time.monotonic_ns() - late[-1].capture_ns >= 20_000_000


def test_realtime_without_a_frame_rate_streams_unpaced(ten_images: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """`edge-runtime run` (real time by default) must stream a single X-ray or an image folder:
    no frame rate and no fps -> frames as fast as the consumer takes them, said once in the log."""
    caplog.set_level(logging.INFO, logger="edge_runtime.sources")
    xray = write_dicom(tmp_path / "Doe^Jane chest.dcm", np.full((16, 16), 1000, np.uint16), "MONOCHROME2", 12)
    for source in (ImageFolderSource(ten_images), DicomSource(xray)):
        assert source.fps is None
        caplog.clear()
        start = time.monotonic()
        frames = list(paced(source, realtime=True))
        assert len(frames) == source.n_frames and time.monotonic() - start < 2.0
        notes = [r for r in caplog.records if "as fast as the pipeline takes them" in r.getMessage()]
        assert len(notes) == 1 and notes[0].levelno == logging.INFO
        assert "Doe" not in caplog.text and "chest" not in caplog.text  # the file name is not logged again
    looped = paced(ImageFolderSource(ten_images), realtime=True, loop=True)
    assert [next(looped).seq for _ in range(15)] == list(range(15))


def test_every_file_source_takes_fps(ten_images: Path, tmp_path: Path) -> None:
    xray = write_dicom(tmp_path / "x.dcm", np.full((16, 16), 1000, np.uint16), "MONOCHROME2", 12)
    assert DicomSource(xray, fps=2.5).fps == 2.5 and open_source(xray, fps=4).fps == 4.0
    cine = write_dicom(tmp_path / "c.dcm", np.zeros((2, 8, 8), np.uint8), FrameTime=50)
    assert DicomSource(cine).fps == pytest.approx(20.0) and DicomSource(cine, fps=10).fps == 10.0
    assert open_source(ten_images, fps=50).fps == 50.0
    video = tmp_path / "v.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (16, 16))
    writer.write(np.zeros((16, 16, 3), np.uint8))
    writer.release()
    assert VideoSource(video).fps == pytest.approx(25.0) and open_source(video, fps=5).fps == 5.0
    start = time.monotonic()
    frames = list(paced(DicomSource(cine, fps=20), realtime=True))
    assert len(frames) == 2 and time.monotonic() - start >= 0.045  # one 50 ms period
    for bad in (0, -1, float("nan"), "fast"):
        with pytest.raises(ConfigError, match="fps"):
            DicomSource(xray, fps=bad)
        with pytest.raises(ConfigError, match="fps"):
            VideoSource(video, fps=bad)


def test_loop_keeps_seq_increasing(ten_images: Path) -> None:
    source = ImageFolderSource(ten_images, stream_id="probe-1")
    stream = paced(source, realtime=False, loop=True)
    frames = [next(stream) for _ in range(25)]
    assert [f.seq for f in frames] == list(range(25))
    assert [int(f.pixels[0, 0]) for f in frames[9:12]] == [9, 0, 1]  # restarted after 10
    assert {f.stream_id for f in frames} == {"probe-1"}
    assert len(list(paced(source, realtime=False))) == 10  # no loop: ends


def test_phantom_sources() -> None:
    pytest.importorskip("edge_runtime.phantoms")
    source = open_source("phantom:us", n_frames=3, size=(64, 64), seed=1)
    assert isinstance(source, PhantomSource) and source.fps == 30.0
    frames = list(source)
    assert len(frames) == 3 and frames[0].pixels.shape[:2] == (64, 64)
    assert [f.seq for f in frames] == [0, 1, 2] and frames[0].stream_id == "phantom:us"
    assert frames[0].truth is not None
    xr_source = PhantomSource("xr", n_frames=1, size=(64, 64))
    xr = next(iter(xr_source))
    assert xr_source.fps == pytest.approx(15.0)
    assert xr.pixels.dtype == np.uint16 and xr.truth is not None
    endless = paced(PhantomSource("us", size=(64, 64)), realtime=False)
    assert [next(endless).seq for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="kind"):
        PhantomSource("mri")


def test_a_stream_id_with_a_trailing_newline_is_not_accepted() -> None:
    """``$`` in a pattern also matches before a final newline: ids are checked with fullmatch."""
    from edge_runtime.errors import ProtocolError
    from edge_runtime.pipeline.protocol import check_stream_id
    from edge_runtime.sources import safe_stream_id

    assert "\n" not in safe_stream_id("scan.dcm\n")
    with pytest.raises(ProtocolError):
        check_stream_id("a\n")


# --- damaged or mislabelled files found by a review (2026-12-04) ----------------------------


@pytest.mark.parametrize("cut", [10, 2000])
def test_a_cine_cut_inside_its_last_fragment_refuses_the_damaged_frame(tmp_path: Path, cut: int) -> None:
    """JPEG decoders fill what is missing: such a frame decoded without an error and reached the model."""
    data = (TEST_FILES / "examples_ybr_color.dcm").read_bytes()
    path = tmp_path / "cine.dcm"
    path.write_bytes(data[:-cut])
    source = DicomSource(path)
    frames: list[Frame] = []
    with pytest.raises(InputError, match="ends early") as info:
        frames.extend(source)
    reference = pydicom.dcmread(TEST_FILES / "examples_ybr_color.dcm").pixel_array
    assert len(frames) == 29 and "29 whole frame" in str(info.value)
    np.testing.assert_array_equal(np.stack([f.pixels for f in frames]), reference[:29])  # all intact


def test_stored_values_above_bits_stored_are_refused_not_wrapped(tmp_path: Path) -> None:
    """pydicom masks bits above BitsStored: 16-bit data labelled 12-bit came back wrapped (65535 -> 4095)."""
    raw = np.array([[0, 1000, 4095, 5000], [20000, 40000, 65535, 4096]], np.uint16)
    path = write_dicom(tmp_path / "wrong.dcm", raw, "MONOCHROME2", 16)
    ds = pydicom.dcmread(path)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.save_as(path)
    with pytest.raises(InputError, match="below 4096 .*values up to 65535"):
        list(DicomSource(path))
    ok = write_dicom(tmp_path / "ok.dcm", raw % 4096, "MONOCHROME2", 16)
    ds = pydicom.dcmread(ok)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.save_as(ok)
    (frame,) = list(DicomSource(ok))
    np.testing.assert_array_equal(frame.pixels, raw % 4096)


def test_a_window_after_a_modality_lut_spans_the_lut_output(tmp_path: Path) -> None:
    raw = np.array([[0, 1000, 2000, 4095]], np.uint16)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor: 12-bit in, 16-bit out
    item.ModalityLUTType = "OD"
    item.add_new(0x00283006, "US", (np.arange(4096) * 16).tolist())
    path = write_dicom(tmp_path / "lut.dcm", raw, "MONOCHROME2", 12, ModalityLUTSequence=[item],
                       WindowCenter=32768, WindowWidth=65536)
    ds = pydicom.dcmread(path)
    shown = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    (frame,) = list(DicomSource(path, apply_voi=True))
    np.testing.assert_array_equal(frame.pixels, np.rint(shown * 4095 / 65535))  # was [0, 4095, 4095, 4095]


@pytest.mark.parametrize("change", ["window width 0", "unknown VOI function"])
def test_a_bad_voi_header_is_an_input_error_and_a_folder_skips_it(tmp_path: Path, change: str) -> None:
    raw = np.full((8, 8), 100, np.uint16)
    attrs = {"WindowCenter": 100, "WindowWidth": 0} if change == "window width 0" else \
        {"WindowCenter": 100, "WindowWidth": 50, "VOILUTFunction": "BOGUS"}
    folder = tmp_path / "series"
    folder.mkdir()
    write_dicom(folder / "1.dcm", raw, "MONOCHROME2", 12, InstanceNumber=1, **attrs)
    write_dicom(folder / "2.dcm", raw, "MONOCHROME2", 12, InstanceNumber=2, WindowCenter=100, WindowWidth=50)
    with pytest.raises(InputError, match="usable VOI LUT or window"):
        list(DicomSource(folder / "1.dcm", apply_voi=True))
    series = DicomSource(folder, apply_voi=True)
    assert len(list(series)) == 1 and series.skipped == 1


def test_deflated_and_big_endian_rgb_files_decode(tmp_path: Path) -> None:
    (deflated,) = list(DicomSource(TEST_FILES / "image_dfl.dcm"))  # refused as "no Pixel Data" before
    np.testing.assert_array_equal(deflated.pixels, pydicom.dcmread(TEST_FILES / "image_dfl.dcm").pixel_array)
    from pydicom.uid import ExplicitVRBigEndian

    rgb = np.random.default_rng(0).integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    path = write_dicom(tmp_path / "be.dcm", rgb, "RGB", 16, Modality="US")
    ds = pydicom.dcmread(path)
    ds.PixelData, ds.file_meta.TransferSyntaxUID = rgb.astype(">u2").tobytes(), ExplicitVRBigEndian
    pydicom.dcmwrite(path, ds, little_endian=False, implicit_vr=False, force_encoding=True)
    (frame,) = list(DicomSource(path))
    assert frame.pixels.dtype == np.dtype("=u2")
    np.testing.assert_array_equal(frame.pixels, rgb)


def test_a_truncated_jpeg_image_is_refused(tmp_path: Path) -> None:
    img = np.random.default_rng(1).integers(0, 255, (64, 80), dtype=np.uint8)
    ok, jpg = cv2.imencode(".jpg", img)
    assert ok
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpg.tobytes())
    (folder / "b.jpg").write_bytes(jpg.tobytes()[: len(jpg) // 2])
    images = ImageFolderSource(folder, modality="US")
    assert len(list(images)) == 1 and images.skipped == 1


def test_a_rescaled_monochrome1_file_is_inverted_about_its_value_range(tmp_path: Path) -> None:
    """Float frames (a fractional slope) were inverted about 2**bits - 1: stored 0..4095 at slope 0.25
    (0..1023.75) came out as 3071.25..4095, a different image for the model."""
    raw = np.array([[0, 1000, 4095]], np.uint16)
    twin = next(iter(DicomSource(write_dicom(tmp_path / "m2.dcm", 4095 - raw, "MONOCHROME2", 12,
                                             RescaleSlope=0.25, RescaleIntercept=0))))
    (m1,) = list(DicomSource(write_dicom(tmp_path / "m1.dcm", raw, "MONOCHROME1", 12, RescaleSlope=0.25,
                                         RescaleIntercept=0)))
    assert m1.photometric == "MONOCHROME2" and m1.pixels.dtype == np.float32
    np.testing.assert_allclose(m1.pixels, twin.pixels)  # 1023.75 - v / 4, as (4095 - v) / 4


def test_a_folder_warns_a_few_times_per_reason_then_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """210 16-bit images declared 8-bit gave 210 identical warnings before calibration's error (a review):
    the same reason is now warned 3 times (as `infer` does for frames), every file still counted."""
    import logging

    import cv2

    for i in range(6):
        assert cv2.imwrite(str(tmp_path / f"f{i}.png"), np.full((8, 8), 1000 + i, np.uint16))
    (tmp_path / "f7.png").write_bytes(b"not a png")  # another reason: warned too
    assert cv2.imwrite(str(tmp_path / "f8.png"), np.full((8, 8), 200, np.uint16))  # readable
    caplog.set_level(logging.WARNING)
    images = ImageFolderSource(tmp_path, bits_stored=8, modality="US")
    assert len(list(images)) == 1 and images.skipped == 7
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 4 and "further files skipped for this reason are counted" in warned[2], warned
