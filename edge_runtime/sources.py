"""Frame sources: video file, camera, image folder, DICOM, phantom -> iterator of Frame.

Every source is re-iterable (each ``iter()`` starts from the first frame), has a ``name``, a
``stream_id`` and ``fps`` (the native frame rate when the input says so, else ``None``), and
raises the project's own errors for what it cannot read: ``InputError`` (missing, truncated or
non-image input) or ``UnsupportedFormatError`` (readable, but an encoding this install cannot
decode; the message names the encoding and the PyPI package that decodes it).

``paced()`` turns a source into a stream: real time at the native (or a given) frame rate, or as
fast as possible, optionally looping, with a monotonically increasing ``seq``. ``open_source()``
builds a source from a string ("phantom:us", "camera:0", a path).

DICOM pixel pipeline (``DicomSource``), per frame, in this order:
  decode (pydicom pixel handlers + installed pylibjpeg plugins; YBR_FULL / YBR_FULL_422 -> RGB)
  -> PALETTE COLOR through its colour LUT (pydicom ``apply_color_lut``; uint8 or uint16 RGB as
     the LUT's nominal depth says, bits_stored = that depth)
  -> grayscale only: modality LUT / rescale slope+intercept (``apply_modality_lut``)
  -> grayscale only, when asked: VOI LUT or window (``apply_voi_lut``), then scaled to the
     display range 0 .. 2**BitsStored - 1 (uint8 when BitsStored <= 8, else uint16)
  -> MONOCHROME1 inverted to MONOCHROME2 (after the VOI when it was applied).
Output dtype without VOI is decided once per file from the header, so every frame of a stream
has the same dtype: the possible value range after the modality LUT is computed from BitsStored,
PixelRepresentation and slope/intercept (or the modality LUT's depth); integral and within
0..255 for 8-bit input -> uint8, integral and within 0..65535 -> uint16 (bits_stored = what that
range needs, never less than BitsStored), anything else (signed storage, negative intercept,
fractional slope) -> the real values as float32 with bits_stored = BitsStored: a stored value means
the same number whether the file is signed or not, so an image stored signed with non-negative
values reaches the model exactly as its unsigned storage does, and values outside 0 .. 2**BitsStored
- 1 (e.g. negative ones) are refused by the pre-processor unless a window maps them (a window, when
applied, defines the mapping). Float pixel data is refused unless a window is applied. Patient identifiers are never copied
into frames, logs or messages: only shape and coding attributes are; a file source's default stream id
is a pseudonym (kind + a keyed hash of the file or folder name, see ``_stream_id``), never the name
itself, and no error message names a file or folder (messages travel in end-of-stream events to
subscribers and recordings): one file of a folder is "image 3 of 10 (in name order)" / "DICOM image
file 3 of 10 of the series". A folder source skips a file it cannot read (counted in ``skipped`` on
every pass, logged) and goes on.
Refused (InputError; a folder skips the file): compressed pixel data without its closing delimiter
(a file cut inside its last fragment: the frames before the damaged one are kept), native unsigned
data with values above BitsStored (pydicom would mask them: 65535 labelled 12-bit became 4095),
a VOI / palette / modality LUT pydicom cannot apply, and a JPEG image file without its end marker.
A 16-bit palette whose entries are all 8-bit values scaled to 16 bits gives 8-bit RGB.
Not handled: per-frame functional groups of enhanced multi-frame objects (per-frame windows and
rescales); the first (shared) values are used.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import re
import sys
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .errors import (
    WARN_SAME_REASON,
    ConfigError,
    EdgeRuntimeError,
    InputError,
    UnsupportedFormatError,
    describe_error,
    expected,
    reason_key,
)
from .frames import STREAM_ID_CHARS, STREAM_ID_RE, Frame
from .pseudonym import pseudonym

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".avi", ".mp4", ".m4v", ".mov", ".mkv", ".mpg", ".mpeg", ".wmv", ".webm")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
EXACT_COUNT_EXTENSIONS = (".avi", ".mp4", ".m4v", ".mov")  # containers that store their frame count


def natural_key(name: str) -> list[Any]:
    """Sort key so that "img2" < "img10" (alternating text / number chunks)."""
    # ASCII digits only: "²".isdigit() is True but int("²") fails (a traceback on such a file name)
    return [int(part) if part.isascii() and part.isdigit() else part.lower()
            for part in re.split(r"([0-9]+)", name)]


def _image_signature(path: Path) -> str:
    """The image format a file's first bytes say ("PNG", "JPEG", "TIFF", "BMP"), or ""."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError:
        return ""
    for magic, name in ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"),
                        (b"MM\x00*", "TIFF"), (b"BM", "BMP")):
        if head.startswith(magic):
            return name
    return ""


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` has the DICOM Part 10 preamble ("DICM" at byte 128)."""
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


_STREAM_ID_BAD = re.compile(rf"[^{STREAM_ID_CHARS}]")


def safe_stream_id(name: str) -> str:
    """A stream id the protocol accepts, derived from a source name (often a file name).

    A name made only of letters, digits, '_', '.', ':' and '-' and at most 64 long is kept. Otherwise
    every other character becomes '_' and the result is cut to 55 characters plus '-' and 8 hex
    digits of the name's SHA-256, so two names that read alike after the replacement stay apart.
    """
    if STREAM_ID_RE.fullmatch(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{_STREAM_ID_BAD.sub('_', name)[:55]}-{digest}"


def _where(path: Path) -> str:
    """What a file source's pseudonym is of: its absolute path. Its name alone gave two patients'
    IM000001.dcm (or SERIES1 folders) one stream id, and so one set of result and video file names."""
    return os.fspath(path.resolve())


def _stream_id(given: str | None, name: str, kind: str | None = None) -> str:
    """The caller's stream id (checked), else one derived from the source: for a file source (``kind``
    "video", "images" or "dicom") a pseudonym, kind + 12 hex digits of a keyed hash of its absolute
    path (edge_runtime.pseudonym: not reversible without this install's key), because file and
    folder names can carry patient identifiers and the id travels in every header, recording, video
    file name and log line; for cameras and phantoms the (safe) name itself."""
    if given is None or given == "":
        if kind is not None:
            return f"{kind}-{pseudonym(name)}"
        return safe_stream_id(name)
    if not isinstance(given, str) or not STREAM_ID_RE.fullmatch(given):
        raise ConfigError(expected("a stream_id of 1-64 letters, digits, '_', '.', ':' or '-'", given))
    return given


def _check_fps(fps: float | None) -> float | None:
    if fps is None:
        return None
    try:
        rate = float(fps)
    except (TypeError, ValueError):
        raise ConfigError(expected("fps as a number > 0", fps)) from None
    if not (rate > 0 and math.isfinite(rate)):
        raise ConfigError(expected("fps > 0", fps))
    return rate


def _check_spacing(spacing: tuple[float, float] | None) -> tuple[float, float] | None:
    if spacing is None:
        return None
    try:
        row, col = (float(v) for v in spacing)
    except (TypeError, ValueError):
        raise ConfigError(expected("pixel_spacing as (row_mm, col_mm)", spacing)) from None
    if not (row > 0 and col > 0 and math.isfinite(row) and math.isfinite(col)):
        raise ConfigError(expected("positive finite pixel_spacing in mm", spacing))
    return row, col


class Source(ABC):
    """Base of every source: assigns ``seq`` (from 0 per pass), ``stream_id`` and ``source``."""

    name: str = ""
    fps: float | None = None
    stream_id: str = "0"
    n_frames: int | None = None  # frames per pass when known; None = unknown or infinite
    live: bool = False  # frames arrive at their own pace (camera): paced() never sleeps for them
    from_files = False  # name is a file or folder name, so possibly a patient identifier

    def __iter__(self) -> Iterator[Frame]:
        for seq, frame in enumerate(self._frames()):
            frame.seq = seq
            frame.stream_id = self.stream_id
            # never a file name (frames reach sinks and logs): a file source is known by its stream id
            frame.source = self.stream_id if self.from_files else self.name
            yield frame

    @abstractmethod
    def _frames(self) -> Iterator[Frame]:
        """Yield the frames of one pass, starting from the first."""

    def stated_modality(self) -> str | None:
        """The modality every frame of this source carries, known before a frame is read (so a model
        for another one can be refused up front, not frame by frame); None when frames may differ."""
        return getattr(self, "modality", None)

    skipped: int = 0  # files of a folder that could not be read (logged, left out)

    def _skip(self, which: str, exc: Exception) -> None:
        """One unreadable file of a folder is counted and skipped, never the folder; warned once per file
        (a looped folder would repeat it every pass: later passes log it at DEBUG) and WARN_SAME_REASON
        times per reason (a folder of 210 16-bit images declared 8-bit gave 210 identical warnings)."""
        self.skipped += 1
        warned: set[str] = self.__dict__.setdefault("_warned", set())
        reasons: dict[str, int] = self.__dict__.setdefault("_reasons", {})
        key = reason_key(str(exc))
        if which not in warned:
            reasons[key] = reasons.get(key, 0) + 1
        loud = which not in warned and reasons[key] <= WARN_SAME_REASON
        log.log(logging.WARNING if loud else logging.DEBUG, "%s skipped: %s%s", which, exc,
                " (further files skipped for this reason are counted, not logged)"
                if loud and reasons[key] == WARN_SAME_REASON else "")
        warned.add(which)

    def __repr__(self) -> str:  # the stream id, not the name: a file name can be a patient identifier
        return f"{type(self).__name__}(stream_id={self.stream_id!r}, fps={self.fps}, n_frames={self.n_frames})"


def _to_rgb_or_gray(img: np.ndarray, gray: bool) -> tuple[np.ndarray, str]:
    """OpenCV's BGR / BGRA / gray -> RGB or gray, with the matching photometric."""
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        return np.ascontiguousarray(img), "MONOCHROME2"
    if img.shape[2] == 4:
        code = cv2.COLOR_BGRA2GRAY if gray else cv2.COLOR_BGRA2RGB
    else:
        code = cv2.COLOR_BGR2GRAY if gray else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(img, code), "MONOCHROME2" if gray else "RGB"


# --- OpenCV video and camera ---------------------------------------------------------------


class _CaptureSource(Source):
    def __init__(self, *, gray: bool, modality: str, pixel_spacing: tuple[float, float] | None) -> None:
        self.gray = bool(gray)
        self.modality = modality
        self.pixel_spacing = _check_spacing(pixel_spacing)

    @abstractmethod
    def _open(self) -> cv2.VideoCapture: ...

    def _frames(self) -> Iterator[Frame]:
        cap = self._open()
        decoded = 0
        held: Frame | None = None  # a file with a known frame count: each frame waits for the next read
        try:
            while True:
                ok, img = cap.read()
                if not ok:
                    break
                captured = time.monotonic_ns()
                pixels, photometric = _to_rgb_or_gray(img, self.gray)
                decoded += 1
                frame = Frame(pixels, modality=self.modality, photometric=photometric,
                              pixel_spacing=self.pixel_spacing, capture_ns=captured)
                if self.n_frames is None:
                    yield frame
                    continue
                if held is not None:
                    yield held
                held = frame
        finally:
            cap.release()
        if held is not None and decoded >= (self.n_frames or 0) - self._count_slack:
            yield held
        self._ended(decoded)

    # Frames the container's count may overstate without the file being short (an estimate from the
    # duration where the container stores no count).
    _count_slack = 0

    def _ended(self, decoded: int) -> None:
        """OpenCV's read() says only False, at the end of a file or when it cannot go on."""




class VideoSource(_CaptureSource):
    """A video file read with OpenCV; fps from CAP_PROP_FPS (``fps`` overrides it); frames RGB (or gray)."""

    from_files = True

    def __init__(self, path: str | Path, *, gray: bool = False, modality: str = "US", fps: float | None = None,
                 stream_id: str | None = None, pixel_spacing: tuple[float, float] | None = None) -> None:
        super().__init__(gray=gray, modality=modality, pixel_spacing=pixel_spacing)
        given_fps = _check_fps(fps)
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(expected("an existing video file", "none at the path given"))
        self.name = self.path.name
        self.stream_id = _stream_id(stream_id, _where(self.path), "video")
        cap = self._open()
        native = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        cap.release()
        self.fps = given_fps or (native if native > 0 and math.isfinite(native) else None)
        self.n_frames = count if count > 0 else None
        # AVI and MP4/MOV store their frame count; for the others FFmpeg estimates it from the duration
        # and frame rate, which can overstate it by one.
        self._count_slack = 0 if self.path.suffix.lower() in EXACT_COUNT_EXTENSIONS else 1

    def _ended(self, decoded: int) -> None:
        # FFmpeg (through OpenCV) ends a cut file early and skips frames it cannot decode without a word,
        # and numbers the frames it did decode 0, 1, 2 ...; the container's frame count tells.
        # The last frame decoded before such an end is refused too: a cut inside it decodes, damaged.
        if self.n_frames is not None and decoded < self.n_frames - self._count_slack:
            raise InputError(expected(
                f"{self.n_frames} frames (the container's count)",
                f"{decoded} decodable: {self.n_frames - decoded} cut off or damaged (truncated or corrupt file?); "
                f"the last one decoded is left out as possibly damaged, and where frames were lost inside the "
                "file the seq of every later frame is that many too low"))

    def _open(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            cap.release()
            raise UnsupportedFormatError(expected(
                f"a video OpenCV {cv2.__version__} can decode ({', '.join(VIDEO_EXTENSIONS)})",
                f"a {self.path.suffix or 'suffix-less'} file it cannot open"))
        return cap


class CameraSource(_CaptureSource):
    """A live camera (OpenCV device index); capture_ns is the grab time, never re-paced."""

    live = True

    def __init__(self, index: int = 0, *, gray: bool = False, modality: str = "US",
                 stream_id: str | None = None, pixel_spacing: tuple[float, float] | None = None) -> None:
        super().__init__(gray=gray, modality=modality, pixel_spacing=pixel_spacing)
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ConfigError(expected("a camera index >= 0", index))
        self.index = index
        self.name = f"camera:{index}"
        self.stream_id = _stream_id(stream_id, self.name)
        cap = self._open()
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        cap.release()
        self.fps = fps if fps > 0 and math.isfinite(fps) else None

    def _ended(self, decoded: int) -> None:
        # A live camera has no end: a read that fails is a camera unplugged or failing.
        raise InputError(expected("a camera that keeps delivering frames",
                                  f"no frame from camera {self.index} after {decoded} (unplugged or failing?)"))

    def _open(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(self.index)
        if not cap.isOpened():
            cap.release()
            raise InputError(expected(f"a camera OpenCV can open at index {self.index}", "none"))
        return cap


# --- image folder --------------------------------------------------------------------------


class ImageFolderSource(Source):
    """A folder of images (or one image file), in natural filename order.

    Read with cv2.IMREAD_UNCHANGED so bit depth is kept: 8-bit PNG/JPEG -> uint8, 16-bit
    PNG/TIFF -> uint16, float TIFF -> float32. ``bits_stored`` overrides the dtype's depth (e.g.
    12 for detector data in uint16) and every frame is checked against it. Colour images are
    RGB (alpha dropped) unless ``gray``. Each page of a multi-page TIFF is a frame.
    """

    from_files = True

    def __init__(self, path: str | Path, *, bits_stored: int | None = None, gray: bool = False,
                 modality: str = "OT", fps: float | None = None, stream_id: str | None = None,
                 pixel_spacing: tuple[float, float] | None = None) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            files = [p for p in _listing(self.path) if p.suffix.lower() in IMAGE_EXTENSIONS]
            if not files:
                raise InputError(expected(f"image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder given", "none"))
            self.files = sorted(files, key=lambda p: natural_key(p.name))
        elif self.path.is_file():
            if self.path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise UnsupportedFormatError(expected(f"an image file ({', '.join(IMAGE_EXTENSIONS)})",
                                                      f"a {self.path.suffix or 'suffix-less'} file"))
            self.files = [self.path]
        else:
            raise InputError(expected("an existing image folder or file", "none at the path given"))
        if bits_stored is not None and not (isinstance(bits_stored, int) and 1 <= bits_stored <= 16):
            raise ConfigError(expected("bits_stored in 1..16", bits_stored))
        self.bits_stored = bits_stored
        self.gray = bool(gray)
        self.modality = modality
        self.fps = _check_fps(fps)
        self.pixel_spacing = _check_spacing(pixel_spacing)
        self.name = self.path.name
        self.stream_id = _stream_id(stream_id, _where(self.path), "images")
        # a multi-page TIFF holds more frames than one
        self.n_frames = None if any(f.suffix.lower() in (".tif", ".tiff") for f in self.files) else len(self.files)

    def _frames(self) -> Iterator[Frame]:
        first: Exception | None = None
        failed = 0  # in this pass (``skipped`` counts over every pass of a looped stream)
        for index, file in enumerate(self.files):
            try:
                pages = self._read(file)
            except (InputError, UnsupportedFormatError) as exc:
                if len(self.files) == 1:
                    raise
                self._skip(f"image {index + 1} of {len(self.files)} (in name order)", exc)
                failed += 1
                first = first or exc
                if failed == len(self.files):
                    raise _every_file(len(self.files), first) from None  # a wrong option, not one bad file
                continue
            where = f"image {index + 1} of {len(self.files)}"
            for page, (pixels, photometric) in enumerate(pages):
                yield Frame(pixels, modality=self.modality, bits_stored=self.bits_stored, photometric=photometric,
                            pixel_spacing=self.pixel_spacing,
                            position=where + (f", page {page + 1} of {len(pages)}" if len(pages) > 1 else ""))

    def _read(self, file: Path) -> list[tuple[np.ndarray, str]]:
        """The file's image, or each page of a multi-page TIFF (imdecode gives the first page only)."""
        data = _read_bytes(file)
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
        if img is None:
            raise InputError(expected("an image OpenCV can decode", f"a {file.suffix} file it cannot read"))
        if data[:2] == b"\xff\xd8" and not _jpeg_complete(data):
            # OpenCV decodes a cut JPEG (grey rows where the data ended) and only prints a warning.
            raise InputError(expected("a complete JPEG (its end-of-image marker after the last scan)",
                                      "a JPEG that ends early (file truncated?)"))
        pages = [img]
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            ok, decoded = cv2.imdecodemulti(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            count, cut = _tiff_directory(data)
            if not ok or cut or len(decoded) < count:
                # OpenCV stops where the pages end or cannot be read: the rest would be lost without a word
                raise InputError(expected(f"a TIFF whose {count} page(s) all decode and whose page list is whole",
                                          f"{len(decoded) if ok else 0} decodable"
                                          + (", the list pointing past the end (file cut short?)" if cut else "")))
            pages = list(decoded)
        return [self._page(page) for page in pages]

    def _page(self, img: np.ndarray) -> tuple[np.ndarray, str]:
        if img.dtype == np.float64:
            img = img.astype(np.float32)
        if img.dtype not in (np.uint8, np.uint16, np.float32):
            raise UnsupportedFormatError(expected("an 8/16-bit unsigned or float image", str(img.dtype)))
        pixels, photometric = _to_rgb_or_gray(img, self.gray)
        bits = self.bits_stored
        if bits is not None:
            if bits > pixels.dtype.itemsize * 8 or pixels.dtype == np.float32:
                raise InputError(expected(f"an integer image of at least {bits} bits", str(pixels.dtype)))
            top = int(pixels.max(initial=0))
            if top >= 1 << bits:
                raise InputError(expected(f"values below {1 << bits} for bits_stored={bits}", top))
        return pixels, photometric


def _tiff_directory(data: bytes) -> tuple[int, bool]:
    """(pages listed, cut) of a classic TIFF: its image directories form a chain of offsets, and a file
    cut short ends the chain with an offset past its end (OpenCV then quietly gives the pages before).
    BigTIFF and unreadable headers: (0, False), left to OpenCV."""
    import struct

    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or len(data) < 8 or struct.unpack(order + "H", data[2:4])[0] != 42:
        return 0, False
    offset, pages, seen = struct.unpack(order + "I", data[4:8])[0], 0, set()
    while offset and offset not in seen:
        seen.add(offset)
        if offset + 2 > len(data):
            return pages, True
        entries = struct.unpack(order + "H", data[offset:offset + 2])[0]
        end = offset + 2 + 12 * entries
        if end + 4 > len(data):
            return pages, True
        pages += 1
        offset = struct.unpack(order + "I", data[end:end + 4])[0]
    return pages, False


def _read_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as exc:  # its text carries the path
        raise InputError(expected("a readable image file", describe_error(exc))) from None


def _jpeg_complete(data: bytes) -> bool:
    """An end-of-image marker (FFD9) after the last start-of-scan (FFDA). Inside entropy-coded data
    every FF byte is stuffed (FF00) or a restart marker, so FFD9 there can only be the real end; an
    EXIF thumbnail's own FFD9 comes before the main image's scans."""
    return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda") >= 0


def _listing(folder: Path) -> list[Path]:
    """The files of ``folder``; an OSError (permissions) becomes an InputError without the path, which
    OSError's text carries (source errors travel in events and recordings)."""
    try:
        return [p for p in folder.iterdir() if p.is_file()]
    except OSError as exc:
        raise InputError(expected("a folder this process can read", describe_error(exc))) from None


def _every_file(n: int, first: Exception | None) -> InputError:
    return InputError(expected(f"at least one readable file of the {n} in the folder",
                               f"none; the first: {first}"))


# --- DICOM ---------------------------------------------------------------------------------

# PyPI packages that let pydicom decode each compressed transfer syntax (by UID).
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg (or pillow)",
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg (or pillow)",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg (or pyjpegls)",
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg (or pyjpegls)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg (or pillow)",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg (or pillow)",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "numpy (pydicom's own RLE decoder) or pylibjpeg-rle",
}
_VIDEO_HINT = ("no PyPI package lets pydicom decode video transfer syntaxes (MPEG-2, H.264, HEVC): "
               "export the cine as JPEG baseline or uncompressed, or decode the stream with opencv-python / ffmpeg")


def _syntax_error(uid: Any, why: str) -> UnsupportedFormatError:
    import pydicom.uid

    name = getattr(uid, "name", str(uid)) or str(uid)
    if uid in pydicom.uid.MPEGTransferSyntaxes:
        hint = _VIDEO_HINT
    else:
        hint = f"install {_DECODER_PACKAGES[str(uid)]}" if str(uid) in _DECODER_PACKAGES else (
            "no known PyPI decoder for this transfer syntax")
    return UnsupportedFormatError(
        f"{expected('a transfer syntax this install can decode', f'{name} ({uid})')}: {why}; {hint}")


def _first_float(value: Any) -> float | None:
    """A DICOM DS/IS value (possibly multi-valued) as a finite float, else None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if len(value) == 0:
            return None
        value = value[0]
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _spacing(ds: Any) -> tuple[float, float] | None:
    """(row, col) mm from PixelSpacing / ImagerPixelSpacing / shared functional groups / US regions."""
    candidates = [ds.get("PixelSpacing"), ds.get("ImagerPixelSpacing")]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and "PixelMeasuresSequence" in shared[0] and shared[0].PixelMeasuresSequence:
        candidates.append(shared[0].PixelMeasuresSequence[0].get("PixelSpacing"))
    for value in candidates:
        try:
            if value is not None and len(value) == 2:
                row, col = float(value[0]), float(value[1])
                if row > 0 and col > 0:
                    return row, col
        except (TypeError, ValueError):
            continue
    for region in ds.get("SequenceOfUltrasoundRegions") or []:
        # Physical units code 3 = cm (PS3.3 C.8.5.5.1.15); deltas are per pixel.
        if region.get("PhysicalUnitsXDirection") == 3 and region.get("PhysicalUnitsYDirection") == 3:
            dx, dy = _first_float(region.get("PhysicalDeltaX")), _first_float(region.get("PhysicalDeltaY"))
            if dx and dy and dx > 0 and dy > 0:
                return abs(dy) * 10.0, abs(dx) * 10.0
    return None


def _fps(ds: Any) -> float | None:
    frame_time = _first_float(ds.get("FrameTime"))  # ms per frame
    if frame_time and frame_time > 0:
        return 1000.0 / frame_time
    for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
        rate = _first_float(ds.get(keyword))
        if rate and rate > 0:
            return rate
    return None


@dataclass
class _Plan:
    """What to do with every frame of one DICOM file, decided once from its header."""

    path: Path
    header: Any  # pydicom Dataset without pixel data
    n_frames: int
    color: str  # "gray", "rgb" or "palette"
    monochrome1: bool
    modality_lut: bool
    dtype: np.dtype  # output dtype when no VOI is applied
    bits_out: int
    value_range: tuple[float, float]  # possible range after the modality LUT
    integral: bool  # values after the modality LUT are whole numbers
    voi: Any | None  # dataset to take the VOI from, None = no VOI
    voi_range: tuple[float, float] = (0.0, 0.0)  # what pydicom's VOI outputs span
    display_bits: int = 8
    rescale: tuple[float, float] | None = None  # (slope, intercept) applied here, not by pydicom
    unused_bits_checked: bool = False  # native unsigned data with BitsStored < BitsAllocated (see _plan)
    cut: bool = False  # encapsulated pixel data without its closing delimiter: the last frame is damaged
    palette_shift: int = 0  # a 16-bit colour LUT holding 8-bit values (v * 256 or v * 257): >> 8 to uint8


SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0, little endian


def _cut_inside_pixel_data(path: Path) -> bool:
    """Encapsulated (compressed) pixel data ends with a sequence delimiter, and Pixel Data is the last
    element but for (FFFA,FFFA) signatures or (FFFC,FFFC) padding. A file cut inside its last
    fragment decodes, damaged (JPEG decoders fill the missing rows), so it is told by its end."""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - len(SEQUENCE_DELIMITER)))
        if f.read() == SEQUENCE_DELIMITER:
            return False
    try:  # rare: elements after Pixel Data; if pydicom reads them, the pixel data before them is whole
        tags = _quiet_dcmread(path).keys()
    except Exception:  # noqa: BLE001 - a cut file may fail to parse at all
        return True
    return not any(int(t) > 0x7FE00010 for t in tags)


def _check_native_frame_count(path: Path, frame_bits: int, n_frames: int) -> None:
    """Uncompressed Pixel Data holding a whole frame more than NumberOfFrames declares is refused:
    pydicom decodes the declared frames and says nothing, so the rest were lost unseen (and a wrong
    Rows/Columns reads the same way). Less than a frame over is padding, which files do have."""
    from pydicom.tag import Tag

    try:
        ds = _quiet_dcmread(path, defer_size=1024)  # values over 1 KiB are not read
        elem = ds._dict.get(Tag(0x7FE00010))  # the raw element: its length, the value not loaded
        length = int(getattr(elem, "length", None) or len(elem.value or b"")) if elem is not None else 0
    except Exception:  # noqa: BLE001 - a cut file: the decoder reports it
        return
    frame_bytes = (frame_bits + 7) // 8
    if frame_bytes and length >= (n_frames + 1) * frame_bytes:
        raise InputError(expected(
            f"Pixel Data of {n_frames} frame(s) (NumberOfFrames), {n_frames * frame_bytes} bytes",
            f"{length} bytes, {length // frame_bytes} whole frames' worth (NumberOfFrames or Rows/Columns wrong?)"))


def _pydicom() -> Any:
    """pydicom, with its checks of element values on reading off (for the whole process): they run
    when a value is first used and their warnings quote it (a StudyInstanceUID built from an accession
    number, a name) to the log and stderr. Values are checked where used, by what uses them."""
    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    return pydicom


def _quiet_dcmread(path: Path, **read: Any) -> Any:
    """The whole dataset, without pydicom's warnings on a cut file: they name the path (a patient
    identifier, often), so they are neither logged nor shown."""
    pydicom = _pydicom()
    pydicom_log = logging.getLogger("pydicom")
    was_disabled, pydicom_log.disabled = pydicom_log.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, **read)
    finally:
        pydicom_log.disabled = was_disabled


def _pixel_overlays(ds: Any) -> bool:
    """Overlays stored in the unused high bits of the pixel data (retired, but in old files)."""
    return any(0x6000 <= e.tag.group <= 0x601E and e.tag.element == 0x0102 and int(e.value or 0) > 0 for e in ds)


def _palette_shift(ds: Any) -> int:
    """8 when every entry of a 16-bit colour LUT is an 8-bit value scaled to 16 bits (v * 256 or
    v * 257), as many ultrasound scanners write them: the frames are 8-bit colour then."""
    from pydicom.pixels import apply_color_lut

    try:
        first = int(ds.RedPaletteColorLookupTableDescriptor[1])
        n = int(ds.RedPaletteColorLookupTableDescriptor[0]) or 65536
        lut = apply_color_lut(np.arange(first, first + n, dtype=np.uint16 if first + n > 256 else np.uint8), ds)
    except Exception:  # noqa: BLE001 - a bad LUT is refused per frame (_process)
        return 0
    if lut.dtype != np.uint16:
        return 0
    v = lut.astype(np.uint32) >> 8
    return 8 if bool(np.all((lut == v * 256) | (lut == v * 257))) else 0


def _sop_class_name(ds: Any) -> str:
    """The SOP class's name (from the dataset, else the file meta: both near the start of a file)."""
    meta = getattr(ds, "file_meta", None)
    uid = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    return str(getattr(uid, "name", "") or "")


def _read_header(path: Path) -> Any:
    from pydicom.errors import InvalidDicomError

    pydicom = _pydicom()
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        raise InputError(expected("a DICOM file (128-byte preamble then 'DICM')", "a file without it")) from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a cut or corrupt header
        raise InputError(expected("a complete DICOM header", f"{type(exc).__name__} (truncated or corrupt)")) from None


def _plan(path: Path, apply_voi: bool, window: tuple[float, float] | None) -> _Plan:
    from pydicom.pixels import get_decoder

    ds = _read_header(path)
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid is None:
        raise InputError(expected("a Transfer Syntax UID in the file meta", "none"))
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise _syntax_error(uid, "pydicom has no decoder for it") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin installed"
        raise _syntax_error(uid, f"no decoding plugin available ({missing})")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise InputError(expected("an image (Rows, Columns, Pixel Data)",
                                  "no image attributes (not an image, or a file cut short in its header)"))
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    bits_stored = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    bits_allocated = int(ds.get("BitsAllocated") or bits_stored)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    n_frames = int(_first_float(ds.get("NumberOfFrames")) or 1)

    if photometric == "PALETTE COLOR" and samples == 1:
        color = "palette"
    elif samples == 3:
        color = "rgb"  # RGB as is; YBR_* converted to RGB by pydicom's decoder (raw=False)
    elif samples == 1:
        color = "gray"
    else:
        raise UnsupportedFormatError(expected("1 or 3 samples per pixel", samples))

    # Possible value range after the modality LUT, from the header alone.
    lo, hi = (-(2.0 ** (bits_stored - 1)), 2.0 ** (bits_stored - 1) - 1) if signed else (0.0, 2.0**bits_stored - 1)
    integral = True
    modality_lut = False
    rescale: tuple[float, float] | None = None
    voi_ends = (lo, hi)  # pydicom's window output runs from the first to the second (descending for slope < 0)
    if color == "gray" and ds.get("ModalityLUTSequence"):
        modality_lut = True
        lo, hi = 0.0, 2.0 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
        voi_ends = (lo, hi)  # a window then spans the LUT's output range (PS3.3 C.11.1.1.1)
    elif color == "gray" and ("RescaleSlope" in ds or "RescaleIntercept" in ds):
        slope = _first_float(ds.get("RescaleSlope"))
        intercept = _first_float(ds.get("RescaleIntercept"))
        slope = 1.0 if slope is None else slope
        intercept = 0.0 if intercept is None else intercept
        if (slope, intercept) != (1.0, 0.0):
            modality_lut = True
            # Done here: pydicom's apply_modality_lut rescales only when both tags are present.
            rescale = (slope, intercept)
            voi_ends = (lo * slope + intercept, hi * slope + intercept)
            lo, hi = min(voi_ends), max(voi_ends)
            integral = slope.is_integer() and intercept.is_integer()
            if slope == 0:
                raise InputError(expected("a non-zero RescaleSlope", 0))
    if ds.get("FloatPixelData") is not None or ds.get("DoubleFloatPixelData") is not None:
        integral = False
    dtype: np.dtype[Any]
    if integral and lo >= 0 and hi <= 255 and bits_allocated <= 8:
        dtype, bits_out = np.dtype(np.uint8), max(1, min(8, max(bits_stored, int(hi).bit_length())))
    elif integral and lo >= 0 and hi <= 65535:
        dtype, bits_out = np.dtype(np.uint16), max(1, min(16, max(bits_stored, int(hi).bit_length())))
    else:  # possibly negative or fractional: the real values, as float32 (the pre-processor checks their range)
        dtype, bits_out = np.dtype(np.float32), max(1, min(32, bits_stored))

    plan = _Plan(path, ds, n_frames, color, photometric == "MONOCHROME1", modality_lut, dtype, bits_out, (lo, hi),
                 integral, None, rescale=rescale)
    if uid.is_encapsulated:
        plan.cut = _cut_inside_pixel_data(path)
    else:
        _check_native_frame_count(path, rows * cols * samples * bits_allocated, n_frames)
        # pydicom masks the bits above BitsStored, so 16-bit data labelled 12-bit would wrap (65535 -> 4095)
        # instead of being refused: such data is read unmasked and checked (overlays in those bits excepted).
        plan.unused_bits_checked = not signed and bits_stored < bits_allocated and not _pixel_overlays(ds)
    if color == "palette":
        plan.palette_shift = _palette_shift(ds)
    if (apply_voi or window is not None) and color == "gray":
        voi = ds
        if window is not None:
            voi = copy.deepcopy(ds)
            if "VOILUTSequence" in voi:
                del voi.VOILUTSequence
            voi.WindowCenter, voi.WindowWidth = float(window[0]), float(window[1])
            voi.VOILUTFunction = "LINEAR"
        if rescale is not None and ("RescaleSlope" not in voi or "RescaleIntercept" not in voi):
            voi = copy.deepcopy(voi) if voi is ds else voi  # pydicom's window range needs both tags
            voi.RescaleSlope, voi.RescaleIntercept = rescale
        uses_lut = bool(voi.get("VOILUTSequence")) and voi.VOILUTSequence[0].get("LUTData") is not None
        has_window = voi.get("WindowCenter") is not None and voi.get("WindowWidth") is not None
        if uses_lut:
            plan.voi = voi
            plan.voi_range = (0.0, 2.0 ** int(voi.VOILUTSequence[0].LUTDescriptor[2]) - 1)
        elif has_window:
            plan.voi = voi
            plan.voi_range = voi_ends  # pydicom's windowing spans the post-modality-LUT range, in slope order
        else:
            log.warning("DICOM: VOI asked but the file has no VOI LUT or window; pixels left as stored")  # unnamed: PHI
        plan.display_bits = max(1, min(16, bits_stored))
    elif (apply_voi or window is not None) and color != "gray":
        log.warning("DICOM: VOI applies to grayscale only; ignored for %s", photometric)  # unnamed: PHI
    return plan


def _pydicom_step(what: str, fn: Callable[..., np.ndarray], *args: Any, **kwargs: Any) -> np.ndarray:
    """A pydicom LUT step; its ValueError on a bad header (a window width of 0, a palette without its
    LUT data, an unknown VOI function) becomes an InputError, so a folder skips that file."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise InputError(expected(what, f"{type(exc).__name__}: {str(exc)[:160]}")) from None


def _process(plan: _Plan, arr: np.ndarray) -> tuple[np.ndarray, int, str]:
    """Decoded frame -> (pixels, bits_stored, photometric) as the module docstring describes."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    ds = plan.header
    if plan.color == "palette":
        rgb = _pydicom_step("a usable palette colour LUT", apply_color_lut, arr, ds)
        if plan.palette_shift:
            rgb = (rgb >> plan.palette_shift).astype(np.uint8)
        return np.ascontiguousarray(rgb), rgb.dtype.itemsize * 8, "RGB"
    if plan.color == "rgb":
        if arr.dtype.kind == "u" and not arr.dtype.isnative:  # Explicit VR Big Endian
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if arr.dtype not in (np.uint8, np.uint16):
            raise UnsupportedFormatError(expected("8- or 16-bit RGB pixels", str(arr.dtype)))
        return np.ascontiguousarray(arr), min(int(ds.get("BitsStored") or 8), arr.dtype.itemsize * 8), "RGB"

    if plan.voi is None and arr.dtype.kind == "f":  # its range is not known from the header
        raise UnsupportedFormatError(expected(
            "integer pixel data, or a window for float pixel data (apply_voi=True or window=)",
            "float pixel data and no window applied"))
    if plan.rescale is not None:
        values = arr.astype(np.float64) * plan.rescale[0] + plan.rescale[1]
    else:
        values = _pydicom_step("a usable modality LUT", apply_modality_lut, arr, ds) if plan.modality_lut else arr
    if plan.voi is not None:
        if plan.integral:  # give a VOI LUT integer indices, as pydicom expects
            values = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values.astype(np.int64)
        shown = _pydicom_step("a usable VOI LUT or window", apply_voi_lut, values, plan.voi, prefer_lut=True)
        shown = shown.astype(np.float64)
        top = float(2**plan.display_bits - 1)
        y_min, y_max = plan.voi_range
        if (y_min, y_max) != (0.0, top):
            shown = (shown - y_min) * (top / (y_max - y_min))
        out = np.rint(np.clip(shown, 0.0, top))
        if plan.monochrome1:
            out = top - out
        dtype = np.uint8 if plan.display_bits <= 8 else np.uint16
        return out.astype(dtype), plan.display_bits, "MONOCHROME2"

    lo, hi = plan.value_range
    if plan.dtype == np.float32:  # a stored value means the same number signed or not: never shifted
        out = np.asarray(values, dtype=np.float32)
        if plan.monochrome1:
            # about the value range (a fractional slope's 0..1023.75 stays there; it became 3071.25..4095),
            # except for signed storage of unrescaled values: about 2**bits - 1, as its unsigned twin
            out = np.float32(lo + hi if lo >= 0 else 2**plan.bits_out - 1) - out
        return out, plan.bits_out, "MONOCHROME2"
    if plan.monochrome1:
        values = (lo + hi) - np.asarray(values, dtype=np.float64)
    if values.dtype.kind == "f":
        values = np.rint(values)
    return np.asarray(values).astype(plan.dtype), plan.bits_out, "MONOCHROME2"


class DicomSource(Source):
    """A DICOM file (single or multi-frame, native or compressed) or a folder (a series).

    A folder yields the frames of every DICOM image file in it (files with the DICM preamble;
    others, and non-image objects, are skipped), ordered by InstanceNumber, then natural file
    name; files of different series are kept apart, each series in the order its first file
    appears. Frames are decoded one at a time with pydicom's ``iter_pixels``, so a long cine is
    never decoded up front. ``apply_voi`` applies the file's VOI LUT (preferred) or first
    window; ``window=(centre, width)`` overrides the file's and implies ``apply_voi``. ``fps``
    overrides the frame rate of the first file's header (FrameTime, CineRate, ...); a single image
    usually has none. See the module docstring for dtypes and value ranges.
    """

    from_files = True

    def __init__(self, path: str | Path, *, apply_voi: bool = False, window: tuple[float, float] | None = None,
                 modality: str | None = None, fps: float | None = None, stream_id: str | None = None) -> None:
        given_fps = _check_fps(fps)
        self.path = Path(path)
        if window is not None:
            try:
                centre, width = (float(v) for v in window)
            except (TypeError, ValueError):
                raise ConfigError(expected("window as (centre, width)", window)) from None
            if not (width >= 1 and math.isfinite(centre) and math.isfinite(width)):
                raise ConfigError(expected("a finite window centre and a width >= 1", window))
            window = (centre, width)
        self.apply_voi = bool(apply_voi) or window is not None
        self.window = window
        if self.path.is_dir():
            self.files = self._series(self.path)  # unreadable headers skipped (self.skipped)
        elif self.path.is_file():
            self.files = [self.path]
        else:
            raise InputError(expected("an existing DICOM file or folder", "none at the path given"))
        # Plan the first readable file now so unreadable input fails at construction, not mid-stream.
        for index, first in enumerate(self.files):
            try:
                self._first = _plan(first, self.apply_voi, self.window)
                break
            except (InputError, UnsupportedFormatError) as exc:
                if len(self.files) == 1:
                    raise
                self._skip(f"DICOM image file {index + 1} of {len(self.files)} of the series", exc)
                if index == len(self.files) - 1:
                    raise _every_file(len(self.files), exc) from None
        self.files = self.files[index:]
        ds = self._first.header
        self.modality = modality or str(ds.get("Modality") or "OT")
        self._modality_override = modality
        self.fps = given_fps or _fps(ds)
        self.transfer_syntax = str(getattr(ds.file_meta.TransferSyntaxUID, "name", ds.file_meta.TransferSyntaxUID))
        self.n_frames = self._first.n_frames if len(self.files) == 1 else None
        self.name = self.path.name
        self.stream_id = _stream_id(stream_id, _where(self.path), "dicom")
        # Not named: a DICOM file or folder name can be a patient identifier.
        log.info("DICOM: %d file(s), %s, %s frame(s) in the first, %s", len(self.files),
                 self.transfer_syntax, self._first.n_frames, f"{self.fps:.1f} fps" if self.fps else "no frame rate")

    def stated_modality(self) -> str | None:
        # a series folder: each file states its own (a folder may mix them)
        return self.modality if self._modality_override or len(self.files) == 1 else None

    def _series(self, folder: Path) -> list[Path]:
        entries = []
        listed = sorted(_listing(folder), key=lambda p: natural_key(p.name))
        for index, path in enumerate(listed):
            if not is_dicom_file(path):
                continue
            try:
                ds = _read_header(path)
            except InputError as exc:
                self._skip(f"DICOM file {index + 1} of {len(listed)} in the folder (in name order)", exc)
                continue
            if not ds.get("Rows"):
                if "Image Storage" in _sop_class_name(ds):
                    # an image object without image attributes: cut short in its header (pydicom reads
                    # what is there); it vanished from the series without a word
                    self._skip(f"DICOM file {index + 1} of {len(listed)} in the folder (in name order)", InputError(
                        expected("an image (Rows, Columns, Pixel Data)", "an image object without image "
                                 "attributes (file cut short in its header?)")))
                continue  # DICOMDIR, structured reports, presentation states: no pixels
            number = _first_float(ds.get("InstanceNumber"))
            entries.append((str(ds.get("SeriesInstanceUID", "")), number, path))
        if not entries:
            raise InputError(expected("DICOM image files in the folder given", "none"))
        images = sum(p.suffix.lower() in IMAGE_EXTENSIONS and not is_dicom_file(p) for p in listed)
        if images:  # read as a DICOM series, the folder's other images are not read at all
            log.warning("%d image file(s) beside the DICOM files of the folder left out (a folder is read as a "
                        "DICOM series when it holds any DICOM file: give the images as a folder of their own)",
                        images)
        series_order: dict[str, int] = {}
        for uid, _, _ in entries:
            series_order.setdefault(uid, len(series_order))
        entries.sort(key=lambda e: (series_order[e[0]], e[1] is None, e[1] or 0.0, natural_key(e[2].name)))
        return [path for _, _, path in entries]

    def _frames(self) -> Iterator[Frame]:
        first: Exception | None = None
        empty = 0  # files of this pass that gave no frame at all
        for index, path in enumerate(self.files):
            given = 0
            try:
                plan = self._first if index == 0 else _plan(path, self.apply_voi, self.window)
                for frame in self._file_frames(plan):
                    given += 1
                    frame.position = (f"file {index + 1} of {len(self.files)}, " if len(self.files) > 1 else "") + \
                        f"frame {given} of {plan.n_frames}"
                    yield frame
            except (InputError, UnsupportedFormatError) as exc:
                if len(self.files) == 1:
                    raise
                self._skip(f"DICOM image file {index + 1} of {len(self.files)} of the series", exc)
                first, empty = first or exc, empty + (given == 0)
        if empty and empty == len(self.files):
            raise _every_file(empty, first) from None

    def _file_frames(self, plan: _Plan) -> Iterator[Frame]:
        from pydicom.pixels import iter_pixels

        modality = self._modality_override or str(plan.header.get("Modality") or "OT")
        spacing = _spacing(plan.header)
        decoded = 0
        options = {"correct_unused_bits": False} if plan.unused_bits_checked else {}
        frames = iter_pixels(plan.path, **options)  # raw=False: YBR_FULL(_422) -> RGB
        held: Frame | None = None  # with plan.cut, each frame waits for the next: the last one is damaged
        while True:
            try:
                arr = next(frames)
            except StopIteration:
                break
            except EdgeRuntimeError:
                raise
            except Exception as exc:  # noqa: BLE001 - pydicom / plugin failures on cut or corrupt pixel data
                if decoded == 0:
                    # Read from the path, pydicom's frame iterator parses the file its own way, which refuses
                    # some files its dataset reader takes (deflated transfer syntax, a mislabelled VR): retry
                    # once from the dataset.
                    try:
                        frames = iter_pixels(_quiet_dcmread(plan.path), **options)
                        arr = next(frames)
                    except Exception:  # noqa: BLE001 - the first failure is the one to report
                        arr = None
                if decoded or arr is None:
                    why = str(exc).replace(str(plan.path), "<file>").replace(plan.path.name, "<file>")[:200]
                    raise InputError(expected(
                        f"{plan.n_frames} decodable frame(s)",
                        f"failure at frame {decoded}: {type(exc).__name__}: {why} (truncated or corrupt?)",
                    )) from None
            if plan.unused_bits_checked:
                bits_stored = int(plan.header.get("BitsStored"))
                if arr.size and int(arr.max()) >> bits_stored:
                    raise InputError(expected(
                        f"stored values below {2 ** bits_stored} (BitsStored {bits_stored})",
                        f"values up to {int(arr.max())} in frame {decoded} (BitsStored wrong for this data?)"))
            pixels, bits, photometric = _process(plan, arr)
            decoded += 1
            frame = Frame(pixels, modality=modality, bits_stored=bits, photometric=photometric, pixel_spacing=spacing)
            if not plan.cut:
                yield frame
                continue
            if held is not None:
                yield held
            held = frame
        if plan.cut:
            raise InputError(expected(
                f"{plan.n_frames} complete frame(s)",
                f"compressed pixel data that ends early, after {max(0, decoded - 1)} whole frame(s): its closing"
                " delimiter is missing and the frame it ends in is refused (file truncated?)"))
        if decoded < plan.n_frames:
            raise InputError(expected(f"{plan.n_frames} frame(s)", f"{decoded} decodable (file truncated?)"))


# --- phantoms ------------------------------------------------------------------------------


class PhantomSource(Source):
    """Synthetic ultrasound ("us") or X-ray ("xr") frames with ground truth (edge_runtime.phantoms).

    ``n_frames=None`` streams forever. ``fps`` is the native rate used for real-time pacing; by
    default 30 for "us" and phantoms.XR_FPS (the rate its breathing motion assumes) for "xr".
    Extra keyword arguments go to the generator (e.g. geometry="linear" or dose=0.5).
    """

    def __init__(self, kind: str = "us", *, seed: int = 0, n_frames: int | None = None,
                 size: tuple[int, int] = (512, 512), fps: float | None = None, stream_id: str | None = None,
                 **kwargs: Any) -> None:
        if kind not in ("us", "xr"):
            raise ConfigError(expected("phantom kind 'us' or 'xr'", kind))
        if fps is None and kind == "us":
            fps = 30.0
        elif fps is None:
            from . import phantoms

            fps = float(getattr(phantoms, "XR_FPS", 15.0))
        if n_frames is not None and (not isinstance(n_frames, int) or n_frames < 1):
            raise ConfigError(expected("n_frames >= 1 or None (infinite)", n_frames))
        if not (fps > 0 and math.isfinite(fps)):
            raise ConfigError(expected("fps > 0", fps))
        self.kind = kind
        self.seed = seed
        self.n_frames = n_frames
        self.size = (int(size[0]), int(size[1]))
        self.rate = float(fps)
        self.fps = self.rate
        self.kwargs = kwargs
        self.name = f"phantom:{kind}"
        self.stream_id = _stream_id(stream_id, self.name)

    def stated_modality(self) -> str | None:
        from . import phantoms

        return phantoms.US_MODALITY if self.kind == "us" else phantoms.XR_MODALITY

    def _frames(self) -> Iterator[Frame]:
        from . import phantoms  # imported lazily: sources must not depend on phantoms at import

        count = sys.maxsize if self.n_frames is None else self.n_frames  # the generators are lazy
        if self.kind == "us":
            return phantoms.us_cine(self.seed, count, size=self.size, fps=self.rate,
                                    stream_id=self.stream_id, **self.kwargs)
        return phantoms.xr_sequence(self.seed, count, size=self.size, stream_id=self.stream_id, **self.kwargs)


# --- pacing and construction ---------------------------------------------------------------


class PacedStream(Iterator[Frame]):
    """What ``paced`` returns: its frames, and the source's ``skipped`` count for the pipeline's
    report (files of a folder that could not be read)."""

    def __init__(self, source: Source, frames: Iterator[Frame]) -> None:
        self.source = source
        self._frames = frames

    def __next__(self) -> Frame:
        return next(self._frames)

    def close(self) -> None:
        """Stop the stream: the source's generator ends, releasing a video file or camera it holds."""
        close = getattr(self._frames, "close", None)
        if callable(close):
            close()

    @property
    def skipped(self) -> int:
        return self.source.skipped


def paced(source: Source, *, realtime: bool, loop: bool = False, fps: float | None = None) -> PacedStream:
    """Stream ``source`` with a global, monotonically increasing ``seq`` (see ``_paced``)."""
    return PacedStream(source, _paced(source, realtime=realtime, loop=loop, fps=fps))


def _paced(source: Source, *, realtime: bool, loop: bool, fps: float | None) -> Iterator[Frame]:
    """Stream ``source`` with a global, monotonically increasing ``seq``.

    realtime: frame k is emitted at start + k / fps on the monotonic clock (deadline-based, so
    sleep jitter never accumulates into drift; a consumer that falls behind gets the late
    frames back to back until it has caught up; dropping is the transport's job). ``fps``
    overrides the source's native rate. Live sources (cameras) are never slept on, nor are sources
    with no frame rate and no ``fps`` (a single X-ray, an image folder): their frames go out as
    fast as the consumer takes them, which is logged once (INFO). capture_ns is the frame's
    scheduled time when paced (start + k / fps, as a camera would have grabbed it), the emission
    time when unpaced, and the grab time for live sources. loop: restart the source when it ends
    (seq keeps increasing).
    """
    given = _check_fps(fps)
    rate = given if given is not None else source.fps
    sleeping = realtime and not source.live
    if sleeping and not rate:
        # not named: a file name can be a patient identifier
        log.info("%s has no frame rate and no fps was given: frames are sent as fast as the pipeline takes them",
                 type(source).__name__)
        sleeping = False
    period_ns = round(1e9 / rate) if sleeping and rate else 0
    seq = 0
    start_ns: int | None = None
    while True:
        emitted = 0
        for frame in source:
            if sleeping:
                now = time.monotonic_ns()
                if start_ns is None:
                    start_ns = now
                wait = start_ns + seq * period_ns - now
                if wait > 0:
                    time.sleep(wait / 1e9)
            if not source.live:
                # A paced file source stands in for a camera: its frame is "captured" on schedule, so a
                # late wake-up of this process counts in capture -> sink latency instead of hiding.
                frame.capture_ns = start_ns + seq * period_ns if sleeping and start_ns is not None \
                    else time.monotonic_ns()
            frame.seq = seq
            frame.stream_id = source.stream_id
            yield frame
            seq += 1
            emitted += 1
        if not loop or emitted == 0:
            return


def source_kind(spec: str | Path) -> str:
    """What ``open_source`` makes of ``spec``: "phantom", "camera", "dicom", "video" or "images".

    A file is DICOM when it has the DICM preamble (whatever its extension), else a video or an
    image by extension; a folder is a DICOM series when it holds any DICOM file, else an image
    folder.
    """
    text = str(spec)
    if text.startswith(("phantom:", "camera:")):
        return text.split(":", 1)[0]
    path = Path(text)
    if not path.exists():
        raise InputError(expected("an existing file or folder (or phantom:us|xr, camera:N)", "none at the path given"))
    if path.is_dir():
        files = _listing(path)
        if any(is_dicom_file(p) for p in files):
            return "dicom"
        if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in files):
            return "images"
        raise InputError(expected(f"DICOM files or images ({', '.join(IMAGE_EXTENSIONS)}) in the folder given", "none"))
    if is_dicom_file(path):
        return "dicom"
    suffix = path.suffix.lower()
    image = _image_signature(path)
    if suffix in VIDEO_EXTENSIONS:
        if image:
            # FFmpeg opens a still image as a one-frame video, in 8 bits: a 16-bit PNG lost its depth
            raise UnsupportedFormatError(expected(f"a video file ({suffix})", f"a {image} image named {suffix}"))
        return "video"
    if suffix in IMAGE_EXTENSIONS:
        return "images"
    raise UnsupportedFormatError(expected(
        f"a DICOM file (DICM preamble), a video ({', '.join(VIDEO_EXTENSIONS)}) or an image "
        f"({', '.join(IMAGE_EXTENSIONS)})", f"a {path.suffix or 'suffix-less'} file"))


def stated_options(kind: str, modality: str | None, bits_stored: int | None,
                   flags: tuple[str, str] = ("--modality", "--bits-stored")) -> dict[str, Any]:
    """Source options for what a folder, video or camera cannot say about itself (``flags``: the CLI
    names, for the messages). DICOM and phantom frames carry their own modality and bit depth, and
    the runtime's checks must see those, so overriding them is refused; video and camera frames are
    8-bit, so a bit depth is refused there."""
    # DICOM modality codes are upper case (CS): "dx" was refused frame by frame as not "DX"
    given: dict[str, Any] = {"modality": modality.strip().upper()} if modality else {}
    if bits_stored is not None:  # 0 goes on to the source, which says what it expected
        given["bits_stored"] = bits_stored
    if kind in ("phantom", "dicom"):
        if given:
            raise ConfigError(expected(f"no {flags[0]} / {flags[1]} with {kind} frames (they state their own)",
                                       sorted(given)))
        return {}
    if kind in ("video", "camera") and "bits_stored" in given:
        raise ConfigError(expected(f"no {flags[1]} with {kind} frames (8-bit)", bits_stored))
    return given


def check_stated_modality(source: Source, wanted: Iterable[str], kind: str, stated: bool) -> None:
    """ConfigError when every frame of ``source`` states a modality outside ``wanted`` (the bundles'):
    each frame would be refused, one by one (``stated``: the modality came from the user's option)."""
    modality, wanted = source.stated_modality(), sorted(wanted)
    if modality is None or modality in wanted:
        return
    said = {"dicom": "stated by the DICOM file", "phantom": "the phantom's frames"}.get(
        kind, "--modality" if stated else f"the default for {kind} frames; --modality says otherwise")
    raise ConfigError(expected(f"a source of modality {wanted} (what the bundles take)", modality) + f" ({said})")


def bits_hint(kind: str, frame: Frame, model_bits: Iterable[int], flag: str = "--bits-stored") -> str:
    """For image files read at their dtype's depth where a model takes fewer bits (12-bit detector
    data in 16-bit PNGs): the option that says so, else "". Only for image files: DICOM states its own
    depth (and refuses the option), video is 8-bit."""
    px = frame.pixels
    if kind != "images" or px.dtype == np.float32 or frame.bits_stored != px.dtype.itemsize * 8:
        return ""
    fewer = sorted(b for b in model_bits if b < int(frame.bits_stored or 0))
    return f" (if these {frame.bits_stored}-bit files hold {fewer[0]}-bit data, say so: {flag} {fewer[0]})" \
        if fewer else ""


def open_source(spec: str | Path, **opts: Any) -> Source:
    """Build a source from "phantom:us", "phantom:xr", "camera:N" or a path (kinds: ``source_kind``).
    ``opts`` go to the source's constructor."""
    text = str(spec)
    kind = source_kind(text)
    if kind == "phantom":
        return PhantomSource(text.split(":", 1)[1], **opts)
    if kind == "camera":
        index = text.split(":", 1)[1]
        if not index.isdigit():
            raise ConfigError(expected("camera:<index> with an integer index", text))
        return CameraSource(int(index), **opts)
    kinds: dict[str, Callable[..., Source]] = {"dicom": DicomSource, "video": VideoSource, "images": ImageFolderSource}
    return kinds[kind](Path(text), **opts)
