"""Frame: the unit that flows from sources through workers to sinks.

Pixels are kept as the source produced them (uint8, uint16 or float32; HxW or HxWx3) with the
metadata a pre-processor needs to interpret them (modality, bits stored, photometric
interpretation, spacing). Phantom frames also carry their ground truth.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np

# The stream ids the wire protocol carries (docs/PROTOCOL.md); use with fullmatch (``$`` would also
# accept a trailing newline). Sources derive theirs from file names through this rule.
STREAM_ID_CHARS = r"A-Za-z0-9_.:\-"  # a regex character-class body
STREAM_ID_RE = re.compile(rf"[{STREAM_ID_CHARS}]{{1,64}}")

from .errors import InputError, expected

DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2", "RGB")
# DICOM modality codes we expect to see; others are accepted but these drive defaults.
MODALITIES = ("US", "XR", "CR", "DX", "MG", "RF", "OT")


@dataclass
class GroundTruth:
    """What a phantom knows about its own frame.

    boxes: float32 (N, 4) as x0, y0, x1, y1 in pixel coordinates (x1/y1 exclusive).
    labels: one class name per box. masks: bool (N, H, W) or None.
    clean: the noise-free reference image (same shape as the frame) for enhancement metrics.
    """

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: list[str] = field(default_factory=list)
    masks: np.ndarray | None = None
    clean: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        if len(self.labels) != len(self.boxes):
            raise InputError(expected(f"{len(self.boxes)} labels, one per box", len(self.labels)))


@dataclass
class Frame:
    pixels: np.ndarray
    modality: str = "OT"
    bits_stored: int | None = None
    photometric: str = "MONOCHROME2"
    pixel_spacing: tuple[float, float] | None = None  # (row, column) in mm
    stream_id: str = "0"
    seq: int = 0
    capture_ns: int = field(default_factory=time.monotonic_ns)
    source: str = ""
    truth: GroundTruth | None = None
    stamps: dict[str, int] = field(default_factory=dict)  # per-stage monotonic ns
    # Where in a folder or series the frame came from, 1-based and without names ("image 3 of 10",
    # "file 2 of 4, frame 5"): seq counts the frames given, so after a skipped file it no longer says
    # which file. Set by folder and DICOM sources; `infer` records it (it does not travel on the wire).
    position: str = ""

    def __post_init__(self) -> None:
        px = self.pixels
        if not isinstance(px, np.ndarray):
            raise InputError(expected("pixels as a numpy array", type(px).__name__))
        if px.dtype not in DTYPES:
            raise InputError(expected("pixel dtype uint8, uint16 or float32", str(px.dtype)))
        if not (px.ndim == 2 or (px.ndim == 3 and px.shape[2] == 3)):
            raise InputError(expected("pixels of shape HxW or HxWx3", px.shape))
        if px.shape[0] == 0 or px.shape[1] == 0:
            raise InputError(expected("at least one pixel (H >= 1 and W >= 1)", px.shape))
        if self.photometric not in PHOTOMETRICS:
            raise InputError(expected(f"photometric in {PHOTOMETRICS}", self.photometric))
        if (px.ndim == 3) != (self.photometric == "RGB"):
            raise InputError(expected("3 channels exactly when photometric is RGB", (px.shape, self.photometric)))
        if self.bits_stored is None:
            self.bits_stored = 32 if px.dtype == np.float32 else px.dtype.itemsize * 8
        limit = 32 if px.dtype == np.float32 else px.dtype.itemsize * 8
        if not 1 <= self.bits_stored <= limit:
            raise InputError(expected(f"bits_stored in 1..{limit} for {px.dtype}", self.bits_stored))

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    def stamp(self, stage: str) -> None:
        """Record the monotonic time at which ``stage`` finished with this frame."""
        self.stamps[stage] = time.monotonic_ns()
