"""Result: what a worker produces for one Frame, and what sinks record and display."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Detection:
    """One detected object, in the ORIGINAL frame's pixel coordinates (x1/y1 exclusive)."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    score: float
    label: str

    def to_dict(self) -> dict:
        return {"box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 4),
                "label": self.label}


@dataclass
class Result:
    stream_id: str
    seq: int
    capture_ns: int
    detections: list[Detection] = field(default_factory=list)
    enhanced: np.ndarray | None = None  # same dtype, range and size as the input frame
    masks: np.ndarray | None = None  # uint8 (N, H, W), original frame size
    # per class, cv2.findContours point arrays of the masks; in process only (the wire carries the
    # masks, from which a receiver gets the same contours with cv2.findContours)
    contours: list[list[np.ndarray]] | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)  # preprocess / infer / postprocess
    # model name, bundle_sha256, backend, precision: every result says what produced it.
    provenance: dict[str, str] = field(default_factory=dict)
    stamps: dict[str, int] = field(default_factory=dict)  # per-stage monotonic ns, carried from the Frame
