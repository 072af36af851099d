"""Calibration frames for INT8: gathered, governed, pre-processed, hashed, fed to ONNX Runtime.

Frames come from any source the runtime reads (folder, video, DICOM series: edge_runtime.sources)
or from the phantom generators, and go through the runtime's own Preprocessor, so calibration sees
exactly the tensors inference will see. Governance, all errors (ExportError), never warnings:
- at least ``min_frames`` distinct frames (default 200; by per-frame hash, so copies of a frame
  count once);
- every frame's modality, bits_stored and photometric interpretation match the model's manifest
  (MONOCHROME1 is accepted for a MONOCHROME2 model when the pre-processing inverts it);
- no frame may also be in the validation set (per-frame hashes compared).

Hashes (recorded in calibration.json): a frame's sha256 covers its raw stored pixels as the
source delivered them: ``dtype|HxW[xC]|photometric|bits_stored\\n`` followed by the C-contiguous
pixel bytes. The set's sha256 is the sha256 of the sorted per-frame hex digests joined by "\\n",
so it names the set independently of frame order.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import EdgeRuntimeError, ExportError, expected
from edge_runtime.frames import Frame

MIN_FRAMES = 200
RECORD_FORMAT = "edge-runtime-calibration"
HASH_DOC = ("sha256 of the sorted per-frame sha256 hex digests joined by newlines; a frame's sha256 covers "
            "'dtype|shape|photometric|bits_stored' + newline + its raw C-contiguous stored pixels")
# Phantom seed ranges, disjoint from each other and from the reference models' (export/training/
# data.py: training seeds below 9_000_000, its own held-out set from 9_000_000 up).
CALIBRATION_SEED0 = 20_000_000
VALIDATION_SEED0 = 21_000_000


def frame_sha256(frame: Frame) -> str:
    px = np.ascontiguousarray(frame.pixels)
    head = f"{px.dtype.str}|{'x'.join(map(str, px.shape))}|{frame.photometric}|{frame.bits_stored}\n"
    h = hashlib.sha256(head.encode())
    h.update(px.tobytes())  # one copy; frames are at most a few MB
    return h.hexdigest()


def set_sha256(frame_hashes: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(frame_hashes)).encode()).hexdigest()


def phantom_kind(manifest: Mapping[str, Any]) -> str:
    """'us' or 'xr' from the manifest's modality list."""
    mods = [str(m) for m in manifest.get("modality", [])]
    if "US" in mods:
        return "us"
    if any(m in ("XR", "DX", "CR", "RF", "MG") for m in mods):
        return "xr"
    raise ExportError(expected("a US or X-ray modality in the manifest for phantom frames", mods))


def phantom_size(manifest: Mapping[str, Any], default: tuple[int, int] = (512, 512)) -> tuple[int, int]:
    """Frame size for phantoms: the training record's size, else a static input's, else ``default``."""
    training = manifest.get("training") or {}
    for key in ("frame_size", "size", "image_size"):
        v = training.get(key) or (training.get("phantom") or {}).get(key)
        if isinstance(v, Sequence) and len(v) == 2:
            return int(v[0]), int(v[1])
    shape = ((manifest.get("inputs") or [{}])[0]).get("shape") or []
    if len(shape) == 4 and all(isinstance(v, int) for v in shape[2:]):
        return int(shape[2]), int(shape[3])
    return default


def phantom_frames(kind: str, count: int, seed0: int, *, size: tuple[int, int] = (512, 512),
                   per_seed: int = 4) -> Iterator[Frame]:
    """``count`` phantom frames: short cines from consecutive seeds (varied anatomy, some motion)."""
    from edge_runtime.sources import PhantomSource

    made = 0
    for seed in itertools.count(seed0):
        n = min(per_seed, count - made)
        if n <= 0:
            return
        for frame in PhantomSource(kind, seed=seed, n_frames=n, size=size):
            yield frame
            made += 1


def _range(value: Any, default: tuple[int, int]) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, Sequence) and len(value) == 2 else default


def recipe_frames(manifest: Mapping[str, Any], count: int, seed0: int, *, role: str = "calibration"
                  ) -> Iterator[Frame] | None:
    """Single phantom frames drawn like the model's training data (manifest ``training.phantom``),
    one seed each from ``seed0``; None when the manifest does not name a phantom generator.

    Calibration follows the training distribution (e.g. the X-ray denoiser's dose range);
    validation (``role="validation"``) the evaluation one (``eval_dose`` when recorded).
    """
    from edge_runtime import phantoms

    ph = (manifest.get("training") or {}).get("phantom") or {}
    gen = str(ph.get("generator", ""))
    size = _range(ph.get("size"), phantom_size(manifest))
    if gen.endswith("us_frame"):
        geometry = str(ph.get("geometry", "sector"))
        both = "sector" in geometry and "linear" in geometry
        lesions = _range(ph.get("n_lesions"), (1, 3))
        return (phantoms.us_frame(s, size=size, n_lesions=lesions, seq=i,
                                  geometry=("sector" if s % 2 == 0 else "linear") if both else geometry.split()[0])
                for i, s in enumerate(range(seed0, seed0 + count)))
    if gen.endswith("xr_frame"):
        nodules = _range(ph.get("n_nodules"), (0, 3))
        span = re.search(r"([0-9.]+)\s*\.\.\s*([0-9.]+)", str(ph.get("train_dose", "")))

        def dose(seed: int) -> float:
            if role == "validation" and "eval_dose" in ph:
                return float(ph["eval_dose"])
            if span and "dose" not in ph:  # log-uniform over the training range, reproducible per seed
                lo, hi = math.log(float(span.group(1))), math.log(float(span.group(2)))
                return float(math.exp(lo + np.random.default_rng([seed, 7]).random() * (hi - lo)))
            return float(ph.get("dose", 1.0))

        return (phantoms.xr_frame(s, size=size, dose=dose(s), n_nodules=nodules, seq=i)
                for i, s in enumerate(range(seed0, seed0 + count)))
    return None


def describe(spec: str, manifest: Mapping[str, Any], count: int, seed0: int) -> str:
    """How frames_from(spec, ...) draws its frames, for records and reports."""
    if not (spec == "phantom" or spec.startswith("phantom:")):  # a folder named phantom_x is a folder
        return spec
    kind = spec.split(":", 1)[1] if ":" in spec else phantom_kind(manifest)
    gen = str(((manifest.get("training") or {}).get("phantom") or {}).get("generator", ""))
    how = f"single frames drawn like the training data ({gen})" if spec == "phantom" and gen else "cines, 4 per seed"
    return f"phantom:{kind} seeds {seed0}.. ({how}, {count} frames)"


def frames_from(spec: str, manifest: Mapping[str, Any], count: int, *, seed0: int, role: str = "calibration",
                **opts: Any) -> Iterator[Frame]:
    """Frames from "phantom" (drawn like the model's training data, else generic phantoms of its
    modality), "phantom:us|xr" (generic cines), or a path via edge_runtime.sources.open_source."""
    if spec == "phantom":
        recipe = recipe_frames(manifest, count, seed0, role=role)
        if recipe is not None:
            return recipe
        spec = f"phantom:{phantom_kind(manifest)}"
    if spec.startswith("phantom:"):
        return phantom_frames(spec.split(":", 1)[1], count, seed0, size=opts.pop("size", phantom_size(manifest)))
    from edge_runtime.sources import open_source

    return itertools.islice(iter(open_source(spec, **opts)), count)


def governance_problems(frames: Sequence[Frame], manifest: Mapping[str, Any], invert_monochrome1: bool = True) -> list[str]:
    """Modality / bits_stored / photometric mismatches against the manifest, counted."""
    from edge_runtime.preprocess import accepted_photometrics  # the runtime's rule (imported where used)

    problems = []
    n = len(frames)
    mods = [str(m) for m in manifest.get("modality", [])]
    bad = Counter(f.modality for f in frames if mods and f.modality not in mods)
    if bad:
        problems.append(f"{sum(bad.values())} of {n} frames: " + expected(f"modality in {mods} (manifest)",
                                                                            dict(bad)))
    bits = manifest.get("bits_stored")
    bad_bits = Counter(f.bits_stored for f in frames if bits is not None and f.bits_stored != int(bits))
    if bad_bits:
        problems.append(f"{sum(bad_bits.values())} of {n} frames: " + expected(f"bits_stored {bits} (manifest)",
                                                                                 dict(bad_bits)))
    photo = manifest.get("photometric")
    ok = accepted_photometrics(photo, invert_monochrome1)
    if photo in ("MONOCHROME1", "MONOCHROME2") and (manifest.get("preprocess") or {}).get("color", "gray") == "gray":
        ok.add("RGB")  # the runtime's pre-processing makes grey of colour frames for a grey model, as `infer` does
    bad = Counter(f.photometric for f in frames if photo and f.photometric not in ok)
    if bad:
        problems.append(f"{sum(bad.values())} of {n} frames: " + expected(f"photometric {photo} (manifest)",
                                                                            dict(bad)))
    return problems


class FrameReader:
    """ONNX Runtime CalibrationDataReader over pre-processed tensors (with __len__ and set_range
    for ORT's chunked calibration). Subclassing ORT's ABC is not needed: it checks get_next."""

    def __init__(self, input_name: str, tensors: Sequence[np.ndarray], progress: Any = None) -> None:
        self.input_name = input_name
        self.tensors = list(tensors)
        self.progress = progress
        self._range = (0, len(self.tensors))
        self._pos = 0

    def __len__(self) -> int:
        return len(self.tensors)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._range = (start_index, min(end_index, len(self.tensors)))
        self._pos = start_index

    def rewind(self) -> None:
        self.set_range(0, len(self.tensors))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self._range[1]:
            return None
        x = self.tensors[self._pos]
        self._pos += 1
        if self.progress is not None:
            self.progress.update(1)
        return {self.input_name: x}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item


@dataclass
class CalibrationSet:
    tensors: list[np.ndarray]
    frame_hashes: list[str]
    source: str
    input_name: str
    manifest_name: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return set_sha256(self.frame_hashes)

    def __len__(self) -> int:
        return len(self.tensors)

    def reader(self, progress: Any = None) -> FrameReader:
        return FrameReader(self.input_name, self.tensors, progress)

    def record(self, *, method: str, min_frames: int = MIN_FRAMES, validation_sha256: str | None = None) -> dict[str, Any]:
        """calibration.json: what was used, how it was checked, and its hashes."""
        return {"format": RECORD_FORMAT, "version": 1, "model": self.manifest_name, "method": method,
                "frames": len(self), "min_frames": min_frames, "source": self.source, **self.details,
                "sha256": self.sha256, "hash": HASH_DOC, "validation_overlap": 0,
                "validation_set_sha256": validation_sha256,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "frame_sha256": sorted(self.frame_hashes)}


def _unnamed(source: str) -> str:
    """A calibration source for a message or a record: a phantom spec as given, a path only by its kind."""
    if source.startswith("phantom:"):
        return source
    p = Path(source)
    return f"(a {p.suffix} file)" if p.is_file() and p.suffix else "(a folder)" if p.is_dir() else "(the path given)"


def build(frames: Iterable[Frame], manifest: Mapping[str, Any], *, source: str, min_frames: int = MIN_FRAMES,
          exclude: Iterable[str] = (), progress: bool = False, details: Mapping[str, Any] | None = None
          ) -> CalibrationSet:
    """Check and pre-process calibration ``frames`` for the model described by ``manifest``.

    ``exclude``: per-frame hashes of the validation set; any overlap is refused.
    """
    from edge_runtime.preprocess import Preprocessor

    pre = Preprocessor.from_manifest(manifest)
    # Named by kind, never by path, in messages and in calibration.json (which the bundle's manifest
    # copies): file and folder names can identify patients; the set is identified by its sha256.
    label = _unnamed(source)
    try:
        items = list(_progress(frames, progress, "calibration frames"))
    except EdgeRuntimeError as exc:
        raise ExportError(f"calibration source {label}: {exc}") from None
    if len(items) < min_frames:
        raise ExportError(f"calibration source {label}: " + expected(
            f"at least {min_frames} calibration frames", f"{len(items)} frames"))
    problems = governance_problems(items, manifest, pre.invert_monochrome1)
    if problems:
        raise ExportError(f"calibration frames from {label} do not match model {manifest.get('name')!r}: "
                          + "; ".join(problems))
    hashes = [frame_sha256(f) for f in items]
    distinct = len(set(hashes))
    dupes = len(hashes) - distinct
    if distinct < min_frames:  # copies add no information about the activation ranges
        raise ExportError(f"calibration source {label}: " + expected(
            f"at least {min_frames} distinct calibration frames",
            f"{distinct} distinct of {len(items)} ({dupes} duplicates)"))
    overlap = set(hashes) & set(exclude)
    if overlap:
        raise ExportError(f"calibration source {label}: " + expected(
            "no frame shared with the validation set (its frames or their clean references)",
            f"{len(overlap)} of {len(items)} frames shared"))
    tensors = [pre(f)[0] for f in items]
    info = {"modality": sorted({f.modality for f in items}),
            "bits_stored": sorted({int(f.bits_stored or 0) for f in items}),
            "photometric": sorted({f.photometric for f in items}), "duplicate_frames": dupes,
            "frame_shape": sorted({"x".join(map(str, f.pixels.shape)) for f in items}),
            "tensor_shape": sorted({"x".join(map(str, t.shape)) for t in tensors}), **(details or {})}
    return CalibrationSet(tensors, hashes, label, pre.input_name, str(manifest.get("name", "")), info)


def _progress(frames: Iterable[Frame], show: bool, desc: str) -> Iterable[Frame]:
    if not show:
        return frames
    from tqdm import tqdm

    return tqdm(frames, desc=desc, unit="frame", leave=False)
