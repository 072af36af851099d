"""Built-in processors and a synthetic source: run the pipeline without a model bundle.

They exist for tests, benchmarks and ``edge-runtime run --processor ...``. Both are small frozen
dataclasses, so a spawned worker or source process receives them by value and builds the real thing
inside the child (heavy models load where they run).

Processor spec: ``+``-joined steps, applied in order::

    noop            nothing: an empty Result (transport benchmarks)
    identity        enhanced = the input pixels
    detect          one box around the bright blob of the frame (label "blob")
    slow:MS         sleep MS milliseconds (a deliberately slow model)
    jitter:MS       sleep MS milliseconds on even seq only (results arrive out of order)
    raise:SEQ       raise RuntimeError on that seq (a model that fails on one frame)
    hang:SEQ        sleep 5 s on that seq (a model call that hangs)
    exit:SEQ        os._exit(3) on that seq (a worker process that crashes; process mode only)
    hold:MS         checksum the pixels, sleep MS ms, checksum again: one detection labelled
                    ``crc:<crc32 hex>:intact`` or ``...:changed`` (shared-memory slot reuse tests)
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, expected
from ..frames import Frame, GroundTruth
from ..results import Detection, Result

STEPS = ("noop", "identity", "detect", "slow", "jitter", "raise", "hang", "exit", "hold")


def _parse(spec: str) -> list[tuple[str, int]]:
    steps = []
    for part in spec.split("+"):
        name, _, arg = part.strip().partition(":")
        if name not in STEPS:
            raise ConfigError(expected(f"processor steps from {STEPS} joined by '+'", spec))
        needs_arg = name in ("slow", "jitter", "raise", "hang", "exit", "hold")
        if needs_arg != bool(arg) or (arg and not arg.isdigit()):
            raise ConfigError(expected(f"'{name}:N' with an integer N" if needs_arg else f"'{name}' without an argument",
                                       part))
        steps.append((name, int(arg or 0)))
    return steps


@dataclass(frozen=True)
class BuiltinProcessor:
    """A processor factory: ``BuiltinProcessor("detect+slow:50")()`` -> frame -> Result."""

    spec: str = "identity"

    def __post_init__(self) -> None:
        _parse(self.spec)  # fail in the parent, before any process starts

    def __call__(self) -> Callable[[Frame], Result]:
        steps = _parse(self.spec)
        provenance = {"model": f"builtin:{self.spec}", "bundle_sha256": "", "backend": "python",
                      "precision": "none"}

        def process(frame: Frame) -> Result:
            result = Result(stream_id=frame.stream_id, seq=frame.seq, capture_ns=frame.capture_ns,
                            provenance=dict(provenance))
            result.stamps["preprocess"] = time.monotonic_ns()
            t0 = time.perf_counter()
            for name, arg in steps:
                if name == "identity":
                    result.enhanced = frame.pixels
                elif name == "detect":
                    result.detections.append(_blob(frame.pixels))
                elif name == "slow" or name == "jitter" and frame.seq % 2 == 0:
                    time.sleep(arg / 1000)
                elif name == "raise" and frame.seq == arg:
                    raise RuntimeError(f"builtin processor told to fail on seq {arg}")
                elif name == "hang" and frame.seq == arg:
                    time.sleep(5.0)
                elif name == "exit" and frame.seq == arg:
                    os._exit(3)
                elif name == "hold":
                    before = pixel_crc(frame.pixels)
                    time.sleep(arg / 1000)
                    state = "intact" if pixel_crc(frame.pixels) == before else "changed"
                    result.detections.append(Detection(box=(0.0, 0.0, 1.0, 1.0), score=1.0,
                                                       label=f"crc:{before:08x}:{state}"))
            result.stamps["infer"] = time.monotonic_ns()
            result.timings_ms["infer"] = (time.perf_counter() - t0) * 1000
            result.stamps["postprocess"] = time.monotonic_ns()
            return result

        return process


def pixel_crc(pixels: np.ndarray) -> int:
    """CRC-32 of the pixel bytes (C order), read in place."""
    return zlib.crc32(np.ascontiguousarray(pixels).data.cast("B"))


def _blob(pixels: np.ndarray) -> Detection:
    """A cheap 'detector': the bounding box of the pixels brighter than halfway from mean to max."""
    gray = pixels if pixels.ndim == 2 else pixels.mean(axis=2)
    small = gray[::4, ::4].astype(np.float32)
    ys, xs = np.nonzero(small >= (small.max() + small.mean()) / 2)
    if xs.size == 0:
        return Detection(box=(0.0, 0.0, 1.0, 1.0), score=0.0, label="blob")
    return Detection(box=(float(xs.min() * 4), float(ys.min() * 4), float(xs.max() * 4 + 4), float(ys.max() * 4 + 4)),
                     score=0.9, label="blob")


@dataclass(frozen=True)
class SyntheticSource:
    """A source factory: ``count`` frames (None: endless) of a moving bright disc on noise.

    ``fps`` None produces frames as fast as they are taken; otherwise frames are paced to wall time
    (deadline-based, so a slow consumer never slows the clock). Several ``streams`` interleave.
    """

    count: int | None = 100
    shape: tuple[int, ...] = (64, 64)
    dtype: str = "uint8"
    fps: float | None = None
    streams: tuple[str, ...] = ("0",)
    modality: str = "US"
    variants: int = 8  # distinct images generated up front and cycled (generation is not the test)

    @property
    def finite(self) -> bool:
        """Ends by itself (the supervisor does not restart a finite source: it would start over)."""
        return self.count is not None

    def _images(self) -> list[np.ndarray]:
        rng = np.random.default_rng(0)
        h, w = self.shape[:2]
        top = {"uint8": 255, "uint16": 4095, "float32": 1.0}.get(self.dtype)
        if top is None:
            raise ConfigError(expected("dtype uint8, uint16 or float32", self.dtype))
        yy, xx = np.mgrid[0:h, 0:w]
        images = []
        for i in range(self.variants):
            cx, cy = w * (0.25 + 0.5 * i / self.variants), h / 2
            disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < (min(h, w) / 8) ** 2
            img = rng.uniform(0, 0.3, size=self.shape) + 0.6 * (disc if len(self.shape) == 2 else disc[..., None])
            images.append(np.ascontiguousarray(img * top).astype(self.dtype))
        return images

    def __call__(self) -> Iterator[Frame]:
        images = self._images()
        bits = 12 if self.dtype == "uint16" else None
        photometric = "RGB" if len(self.shape) == 3 else "MONOCHROME2"
        t0 = time.monotonic()
        i = 0
        while self.count is None or i < self.count:
            if self.fps:
                delay = t0 + i / self.fps - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            stream = self.streams[i % len(self.streams)]
            h, w = self.shape[:2]
            yield Frame(pixels=images[i % len(images)], modality=self.modality, bits_stored=bits,
                        photometric=photometric, stream_id=stream, seq=i // len(self.streams),
                        source="synthetic", truth=GroundTruth(boxes=np.array([[w / 4, h / 4, w * 3 / 4, h * 3 / 4]]),
                                                              labels=["disc"]))
            i += 1
