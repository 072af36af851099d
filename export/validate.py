"""Accuracy gate: FP32 against each candidate (FP16 / INT8 ONNX, a TensorRT engine) on held-out frames.

Every frame goes through the runtime's own Preprocessor, backend (edge_runtime.backends) and
Postprocessor, so the numbers describe what the runtime will do. Task metrics come from
export/metrics.py: detection AP50 and sensitivity at a fixed false-positive rate per image,
enhancement PSNR and SSIM against the phantom's clean image, segmentation Dice; plus raw output
error statistics per output. A candidate fails when any gated metric drops below the FP32 value
by more than the manifest's tolerance; ``raise_if_failed`` turns that into AccuracyGateError.

For detection AP the decoder's score threshold is lowered to ``AP_SCORE_THRESHOLD`` (as the reference models' own evaluation; same
Postprocessor class, same NMS), so the precision-recall curve is not cut off at the operating
threshold; sensitivity is read at ``fppi`` false positives per image on that curve.

Candidates are keyed by a label: a precision (``fp16``, ``int8``) or a precision and a form
(``int8_cpu``: the bundle's ONNX Runtime CPU INT8 file); every candidate is gated alike and the report
passes only when each one does, naming the file of each failure.

Repair (``repair_int8``): rank compute nodes by how much keeping each one alone in float reduces
the INT8 output error (all quantised but one), then keep the worst in float, one more at a time,
re-quantising from cached calibration ranges, until the gate passes or ``max_float`` is reached.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.backends.onnxruntime import INT8_EXACT_PEAK
from edge_runtime.bundle import sha256_file
from edge_runtime.devices import cpu_int8
from edge_runtime.errors import AccuracyGateError, ExportError, expected
from edge_runtime.frames import Frame

GATED = {"detection": ("ap50", "sensitivity"), "enhancement": ("psnr_db", "ssim"), "segmentation": ("dice",)}
DEFAULT_TOLERANCES = {"ap50": 0.01, "sensitivity": 0.02, "psnr_db": 0.3, "ssim": 0.01, "dice": 0.01}
AP_SCORE_THRESHOLD = 0.01  # as export/training/evaluate.py: the whole PR curve
DEFAULT_FPPI = 0.5
REPORT_FORMAT = "edge-runtime-validation"


def precision_of(label: str) -> str:
    """The precision of a candidate label: ``int8_cpu`` -> ``int8``, ``int8:before`` -> ``int8``."""
    return label.split(":")[0].split("_")[0]


# -- held-out frames, pre-processed once ----------------------------------------------------
@dataclass
class EvalSet:
    manifest: Mapping[str, Any]
    frames: list[Frame]
    tensors: list[np.ndarray]
    mappings: list[Any]
    source: str
    frame_hashes: list[str]
    # sha256 over every frame's ground truth (truth_sha256): the same frames judged against other
    # labels or references are another validation set
    truth_sha256: str = ""
    # the clean references' hashes as input frames of the same header: calibrating on them is refused too
    reference_hashes: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, manifest: Mapping[str, Any], frames: Sequence[Frame], *, source: str) -> EvalSet:
        from edge_runtime.preprocess import Preprocessor

        from .calibration import frame_sha256

        pre = Preprocessor.from_manifest(manifest)
        frames = list(frames)
        if not frames:
            raise ExportError(expected("held-out validation frames", "none"))
        missing = sum(f.truth is None for f in frames)
        if missing:
            raise ExportError(expected("ground truth on every validation frame (phantoms carry it)",
                                       f"{missing} of {len(frames)} frames without"))
        done = [pre(f) for f in frames]
        refs = [frame_sha256(Frame(f.truth.clean, modality=f.modality, bits_stored=f.bits_stored,
                                   photometric=f.photometric))
                for f in frames if f.truth is not None and f.truth.clean is not None]
        return cls(manifest, frames, [t for t, _ in done], [m for _, m in done], source,
                   [frame_sha256(f) for f in frames], truth_sha256(frames), refs)

    @property
    def exclude_hashes(self) -> list[str]:
        """What calibration must not use: the validation frames and their clean references."""
        return self.frame_hashes + self.reference_hashes

    @property
    def input_name(self) -> str:
        return str(((self.manifest.get("inputs") or [{}])[0]).get("name", "image"))

    def subset(self, n: int) -> EvalSet:
        return EvalSet(self.manifest, self.frames[:n], self.tensors[:n], self.mappings[:n], self.source,
                       self.frame_hashes[:n], truth_sha256(self.frames[:n]),
                       reference_hashes=self.reference_hashes)  # what calibration must avoid stays whole

    def profile(self) -> dict[str, dict[str, list[int]]]:
        """An optimisation profile covering every validation tensor shape (for the lint)."""
        shapes = np.array([t.shape for t in self.tensors])
        common = max({tuple(s) for s in shapes.tolist()}, key=lambda s: sum(tuple(x) == s for x in shapes.tolist()))
        return {self.input_name: {"min": shapes.min(0).tolist(), "opt": list(common), "max": shapes.max(0).tolist()}}


def truth_sha256(frames: Sequence[Frame]) -> str:
    """sha256 over the frames' ground truth in order: per frame its boxes (float32), labels, masks and
    clean image (dtype, shape and bytes of each)."""
    import hashlib

    h = hashlib.sha256()
    for f in frames:
        t = f.truth
        if t is None:
            h.update(b"none\n")
            continue
        h.update(("|".join(t.labels) + "\n").encode())
        for a in (t.boxes, t.masks, t.clean):
            if a is None:
                h.update(b"-\n")
            else:
                a = np.ascontiguousarray(a)
                h.update(f"{a.dtype.str}|{'x'.join(map(str, a.shape))}\n".encode())
                h.update(a.tobytes())
    return h.hexdigest()


# -- running a model ------------------------------------------------------------------------
def open_backend(path: str | os.PathLike[str], precision: str, *, threads: int = 2) -> Any:
    """The runtime's backend for ``path``: ONNX Runtime CPU for .onnx, TensorRT for an engine."""
    p = Path(path)
    if p.suffix == ".onnx":
        from edge_runtime.backends.onnxruntime import OrtBackend

        return OrtBackend(p, threads=threads, providers=["cpu"], precision=precision).load()
    try:
        from edge_runtime.backends import tensorrt as trt_backend  # only this module imports tensorrt
    except ImportError as exc:
        raise ExportError(f"{p}: cannot validate a TensorRT engine here ({exc})") from None
    return trt_backend.TrtBackend(p, precision=precision).load()


def run_outputs(backend: Any, evalset: EvalSet, *, progress: str | None = None) -> list[dict[str, np.ndarray]]:
    """Raw outputs per frame (enhancement with a tile spec runs tiled, as the runtime does)."""
    from edge_runtime.postprocess import enhance_tiled

    post = evalset.manifest.get("postprocess") or {}
    tile = post.get("tile") if post.get("type") == "enhance" else None
    name = evalset.input_name
    items: Any = evalset.tensors
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc=progress, unit="frame", leave=False)
    out = []
    for x in items:
        if tile:
            key = str(post.get("output") or backend.outputs[0].name)

            def run_tile(t: np.ndarray, k: str = key) -> np.ndarray:
                return backend.infer({name: t})[k]

            y = enhance_tiled(run_tile, x, int(tile["size"]), int(tile.get("overlap", 0)))
            out.append({key: y})
        else:
            out.append(backend.infer({name: x}))
    return out


def task_metrics(evalset: EvalSet, outputs: Sequence[Mapping[str, np.ndarray]], *,
                 fppi: float = DEFAULT_FPPI) -> dict[str, Any]:
    from edge_runtime.postprocess import Postprocessor
    from edge_runtime.preprocess import Preprocessor

    from . import metrics as M

    manifest = evalset.manifest
    task = manifest["task"]
    post_spec = dict(manifest["postprocess"])
    if task == "detection":
        post_spec["score_threshold"] = min(float(post_spec.get("score_threshold", 1.0)), AP_SCORE_THRESHOLD)
    post = Postprocessor(post_spec, output_names=[o["name"] for o in manifest.get("outputs", [])] or None,
                         preprocess=Preprocessor.from_manifest(manifest))
    decoded = [post(o, m, f) for o, m, f in zip(outputs, evalset.mappings, evalset.frames)]
    if task == "detection":
        pairs = [(d.detections, f.truth) for d, f in zip(decoded, evalset.frames)]
        ap = M.average_precision(pairs, 0.5, classes=post.classes)
        return {"ap50": ap["ap"], "ap50_per_class": ap["per_class"], "sensitivity": M.sensitivity_at_fppi(
            pairs, fppi, 0.5), "fppi": fppi, "frames": len(pairs),
            "objects": int(sum(len(f.truth.boxes) for f in evalset.frames if f.truth is not None))}
    if task == "enhancement":
        p, s = [], []
        for d, f in zip(decoded, evalset.frames):
            clean = f.truth.clean if f.truth is not None else None
            if clean is None or d.enhanced is None:
                raise ExportError(expected("a clean reference image and an enhanced output per frame", "none"))
            rng = float(2 ** int(f.bits_stored or 8) - 1) if f.pixels.dtype != np.float32 else 1.0
            p.append(M.psnr(clean, d.enhanced, rng))
            s.append(M.ssim(clean, d.enhanced, rng))
        return {"psnr_db": float(np.mean(p)), "ssim": float(np.mean(s)), "frames": len(p)}
    dices = []
    classes = [str(c) for c in post_spec.get("classes", [])]
    scored: list[int] | None = None
    for d, f in zip(decoded, evalset.frames):
        truth = f.truth
        if d.masks is None or truth is None or truth.masks is None:
            raise ExportError(expected("predicted and ground-truth masks per frame", "none"))
        if scored is None:
            scored = scored_channels(d.masks.shape[0], classes, post_spec.get("activation"), evalset.frames)
        for c in scored:
            want = [i for i, lab in enumerate(truth.labels) if not classes or lab == classes[c]]
            gt = np.asarray(truth.masks[want].any(axis=0)) if want else np.zeros(d.masks.shape[1:], bool)
            dices.append(M.dice(d.masks[c], gt))
    # No scored channel gives NaN: validate() then refuses the reference (no evidence) instead of passing.
    return {"dice": float(np.mean(dices)) if dices else float("nan"), "frames": len(evalset.frames),
            "dice_classes": [classes[c] if classes else f"channel {c}" for c in scored or []]}


def scored_channels(channels: int, classes: Sequence[str], activation: Any, frames: Sequence[Frame]) -> list[int]:
    """The segmentation output channels Dice is computed on: foreground classes with ground truth.

    Skipped: a class named ``background`` (any case), and a class no validation frame labels (its
    ground truth is empty everywhere, so Dice would only count its pixels as false positives: the
    background channel of a softmax output scored ~0 and halved the mean). Without a classes list,
    channel 0 of a multi-channel softmax output is the background (arg-max must put every pixel
    somewhere), and every other channel is compared with the union of the ground-truth masks.
    """
    if not classes:
        softmax = activation == "softmax" or (activation is None and channels > 1)
        return list(range(1 if softmax and channels > 1 else 0, channels))
    if len(classes) != channels:
        raise ExportError(expected(f"one postprocess class name per segmentation output channel ({channels})",
                                   list(classes)))
    labelled = {str(lab) for f in frames if f.truth is not None for lab in f.truth.labels}
    return [c for c, name in enumerate(classes) if name.lower() != "background" and name in labelled]


def output_errors(ref: Sequence[Mapping[str, np.ndarray]], got: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Per output: max and mean absolute error over all frames, and the FP32 output's range."""
    stats: dict[str, Any] = {}
    for name in ref[0]:
        mx, total, count, lo, hi, sq, var = 0.0, 0.0, 0, math.inf, -math.inf, 0.0, 0.0
        for r, g in zip(ref, got):
            a, b = np.asarray(r[name], np.float64), np.asarray(g[name], np.float64)
            if a.shape != b.shape:
                raise ExportError(f"output {name!r}: " + expected(f"the FP32 model's shape {a.shape}", b.shape)
                                  + " (a candidate made from another model?)")
            d = np.abs(a - b)
            mx = max(mx, float(d.max()))
            total += float(d.sum())
            sq += float((d * d).sum())
            var += float(a.var() * a.size)
            count += d.size
            lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
        stats[name] = {"max_abs": mx, "mean_abs": total / count, "rmse": math.sqrt(sq / count),
                       "fp32_min": lo, "fp32_max": hi, "nmse": sq / var if var > 0 else 0.0}
    return stats


def error_score(errors: Mapping[str, Any]) -> float:
    """One number for ranking quantisation damage: output error energy over FP32 variance, summed."""
    return float(sum(v["nmse"] for v in errors.values()))


# -- the gate ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateFailure:
    metric: str
    fp32: float
    candidate: float
    tolerance: float

    def text(self) -> str:
        return (f"{self.metric}: FP32 {self.fp32:.4f}, candidate {self.candidate:.4f}, drop "
                f"{self.fp32 - self.candidate:.4f} > tolerance {self.tolerance:g}")


def tolerances_for(manifest: Mapping[str, Any]) -> dict[str, float]:
    """The manifest's tolerances for this task's gated metrics; defaults fill the gaps.

    A key that is not a gated metric of the task, or a value that is not a finite number >= 0, is an
    ExportError: dropped quietly, a stricter limit the author meant (e.g. under the metric's manifest
    name ``sensitivity_at_0.5_fppi``) would give way to the looser default."""
    gated = GATED[manifest["task"]]
    given = manifest.get("tolerances") or {}
    if not isinstance(given, Mapping):
        raise ExportError(expected(f"tolerances as an object {{metric: drop}} over {list(gated)}", given))
    unknown = sorted(set(given) - set(gated))
    if unknown:
        raise ExportError(f"tolerances: {unknown} " + expected(f"keys among this {manifest['task']} task's gated "
                                                                f"metrics {list(gated)}", unknown))
    bad = {k: v for k, v in given.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0}
    if bad:
        raise ExportError("tolerances: " + expected("finite numbers >= 0 (the largest drop allowed)", bad))
    return {m: float(given.get(m, DEFAULT_TOLERANCES[m])) for m in gated}


# What a gated metric needs from the validation frames to be a number (shown when the FP32 value is not).
_EVIDENCE = {"detection": "frames with ground-truth objects", "enhancement": "frames with a clean reference image",
             "segmentation": "frames with ground-truth masks of a scored (non-background) class"}


# Metrics that cannot go below 0: a FP32 value within its tolerance of 0 lets every candidate pass.
METRIC_FLOOR = {"ap50": 0.0, "sensitivity": 0.0, "ssim": 0.0, "dice": 0.0}


def require_finite_reference(task: str, fp32: Mapping[str, Any], tol: Mapping[str, float] | None = None) -> None:
    """Refuse a FP32 reference that cannot judge a candidate.

    ``candidate < fp32 - tolerance`` is False for every candidate when ``fp32`` is NaN, so such a
    reference (e.g. AP50 over frames with no ground-truth object) would pass anything: no evidence. So
    does a FP32 value within its tolerance of the metric's floor: a model that scores AP50 0 on the
    validation frames (untrained, or meant for other images) passed a candidate that output zeros.
    """
    for m in GATED[task]:
        a = float(fp32[m])
        over = f" over {fp32['frames']} frames" if "frames" in fp32 else ""
        objects = f" ({fp32['objects']} objects)" if "objects" in fp32 else ""
        if not math.isfinite(a):
            raise ExportError(expected(f"a finite FP32 {m} on the validation set ({_EVIDENCE[task]})",
                                       f"{a}{over}{objects}"))
        floor = METRIC_FLOOR.get(m)
        if tol is not None and floor is not None and a - tol[m] <= floor:
            raise ExportError(expected(
                f"a FP32 {m} above {floor + tol[m]:g} on the validation frames (its floor {floor:g} plus the "
                f"tolerance {tol[m]:g}), or every candidate passes", f"{a:.4f}{over}{objects}: the model does not "
                "work on these frames (trained for others? validate on frames like its training data; with "
                "labels of your own: are their class names those of the model?)"))


def gate(task: str, fp32: Mapping[str, Any], cand: Mapping[str, Any], tol: Mapping[str, float]) -> list[GateFailure]:
    require_finite_reference(task, fp32, tol)
    out = []
    for m in GATED[task]:
        a, b = float(fp32[m]), float(cand[m])
        if math.isnan(b) or b < a - tol[m] - 1e-12:  # ``a`` is finite (checked above)
            out.append(GateFailure(m, a, b, tol[m]))
    return out


@dataclass
class CandidateReport:
    precision: str
    file: str
    metrics: dict[str, Any]
    output_error: dict[str, Any]
    failures: list[GateFailure]
    ms_per_frame: float
    sha256: str = ""  # of the file judged: `export bundle` matches bundled files to their verdicts by it
    emulated: bool = False  # int8 Q/DQ run emulated in float: this CPU's int8 kernels would saturate its weights
    # fp16 ONNX on ONNX Runtime's CPU provider: no FP16 kernels there, so it computes in FP32 and the
    # verdict covers only the weights' and activations' rounding at the casts, not FP16 arithmetic
    fp16_in_fp32: bool = False

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class ValidationReport:
    model: str
    task: str
    source: str
    frames: int
    tolerances: dict[str, float]
    fp32: dict[str, Any]
    fp32_ms_per_frame: float
    candidates: list[CandidateReport] = field(default_factory=list)
    repairs: dict[str, dict[str, Any]] = field(default_factory=dict)  # candidate label -> what --repair did
    validation_set_sha256: str = ""
    ground_truth_sha256: str = ""  # EvalSet.truth_sha256: the labels or references the frames were judged by
    tolerance_source: dict[str, str] = field(default_factory=dict)  # metric -> "manifest" / "default"
    threads: int = 2  # intra-op threads the candidates ran with
    fp32_threads: int = 2  # ... and the FP32 reference (computed separately when validate() is given ``ref``)
    backends: list[str] = field(default_factory=list)  # what ran the models (backend_name of each file)
    fp32_sha256: str = ""  # the FP32 file the candidates were judged against (bundling checks it)
    # frames judged and their clean references: `export bundle` refuses a calibration that used any
    frame_sha256: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.candidates) and all(c.passed for c in self.candidates)  # nothing judged: not passed

    @property
    def repair(self) -> dict[str, Any] | None:
        """The repair of the ``int8`` candidate (int8.onnx), as in reports before the CPU form existed."""
        return self.repairs.get("int8")

    def replace(self, label: str, report: CandidateReport, repair: dict[str, Any] | None = None) -> None:
        """Put ``report`` in place of the candidate ``label`` (after a repair), keeping the order."""
        report.precision = label
        self.candidates = [report if c.precision == label else c for c in self.candidates]
        if repair is not None:
            self.repairs[label] = repair

    def candidate(self, precision: str) -> CandidateReport:
        for c in self.candidates:
            if c.precision == precision:
                return c
        raise ExportError(expected(f"a {precision} candidate in the report", [c.precision for c in self.candidates]))

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "version": 1, "model": self.model, "task": self.task,
                "frames": self.frames, "source": self.source, "validation_set_sha256": self.validation_set_sha256,
                "frame_sha256": sorted(self.frame_sha256),
                **({"ground_truth_sha256": self.ground_truth_sha256} if self.ground_truth_sha256 else {}),
                "tolerances": self.tolerances, "tolerance_source": self.tolerance_source,
                "gated_metrics": list(GATED[self.task]), "passed": self.passed,
                "fp32": {"metrics": self.fp32, "ms_per_frame": self.fp32_ms_per_frame,
                         **({"sha256": self.fp32_sha256} if self.fp32_sha256 else {})},
                "candidates": [{**asdict(c), "passed": c.passed, "failures": [asdict(f) for f in c.failures]}
                               for c in self.candidates],
                "repair": self.repair, "repairs": self.repairs,
                "failed_files": [c.file for c in self.candidates if not c.passed],
                "conditions": {"backend": ", ".join(self.backends or [ORT_CPU])
                               + " via edge_runtime.backends",
                               "cpu": cpu_int8().to_dict(),
                               "ap_score_threshold": AP_SCORE_THRESHOLD, "threads": self.threads,
                               "fp32_threads": self.fp32_threads,
                               "ms_per_frame": "median backend.infer wall time during validation, "
                               + _threads_text(self.threads, self.fp32_threads)}}

    def write(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n")
        return p

    def text(self) -> str:
        gated = GATED[self.task]
        lines = [f"{self.model} ({self.task}): {self.frames} held-out frames from {self.source}"]
        head = f"  {'precision':<10}" + "".join(f"{m:>12}" for m in gated) + f"{'ms/frame':>10}  gate"
        lines.append(head)
        lines.append(f"  {'fp32':<10}" + "".join(f"{float(self.fp32[m]):>12.4f}" for m in gated)
                     + f"{self.fp32_ms_per_frame:>10.2f}  reference")
        for c in self.candidates:
            lines.append(f"  {c.precision:<10}" + "".join(f"{float(c.metrics[m]):>12.4f}" for m in gated)
                         + f"{c.ms_per_frame:>10.2f}  " + ("pass" if c.passed else "FAIL"))
        unscored = [c for c, v in (self.fp32.get("ap50_per_class") or {}).items() if v is None]
        if unscored:  # AP50 is the mean over the classes with ground truth; these did not count
            lines.append(f"  not scored: no ground-truth object of class {', '.join(map(str, unscored))} in these frames")
        lines.append("  tolerances (largest allowed drop): " + ", ".join(
            f"{k} {v:g}" + (f" ({self.tolerance_source[k]})" if k in self.tolerance_source else "")
            for k, v in self.tolerances.items()))
        for c in self.candidates:
            err = ", ".join(f"{k} max|d| {v['max_abs']:.3g} mean|d| {v['mean_abs']:.3g}"
                            for k, v in c.output_error.items())
            lines.append(f"  {c.precision} output error vs fp32: {err}")
            if c.emulated:
                lines.append(f"  {c.precision}: int8 weights beyond +-{INT8_EXACT_PEAK} on this CPU ({cpu_int8().describe()}): "
                             "Q/DQ emulated in float (exact; its ms/frame is not its speed)")
            if c.fp16_in_fp32:
                lines.append(f"  {c.precision}: judged on ONNX Runtime's CPU provider, which has no FP16 kernels and "
                             "computes this graph in FP32: FP16 arithmetic (a GPU's) was not judged; validate the "
                             "engine on the target (--candidate fp16=ENGINE) before relying on it, above all for "
                             "16-bit outputs")
            for f in c.failures:
                lines.append(f"  {c.precision} ({c.file}) FAILED {f.text()}")
        for label, r in self.repairs.items():
            lines.append(f"  repair {label}: {len(r['nodes_in_float'])} node(s) kept in float "
                         f"{r['nodes_in_float']}; {label} ms/frame {r['ms_before']:.2f} -> {r['ms_after']:.2f} "
                         f"(fp32 {r['ms_fp32']:.2f}); {'passed' if r['passed'] else 'did not pass'}")
        return "\n".join(lines)

    def raise_if_failed(self, *, with_report: bool = True) -> None:
        """AccuracyGateError naming each failing file, with the report's text unless the caller has
        just printed it (``with_report`` False)."""
        if not self.passed:
            failed = ", ".join(f"{c.precision} ({c.file})" for c in self.candidates if not c.passed) or "no candidates"
            raise AccuracyGateError(f"accuracy gate failed for {failed}" + (":\n" + self.text() if with_report
                                                                          else " (report above)"))


ORT_CPU = "onnxruntime CPUExecutionProvider"


def backend_name(path: str | os.PathLike[str]) -> str:
    """What open_backend runs ``path`` with, for the report's conditions."""
    return ORT_CPU if Path(path).suffix == ".onnx" else "TensorRT"


def _threads_text(threads: int, fp32_threads: int) -> str:
    if threads == fp32_threads:
        return f"{threads} thread(s)"
    return f"{threads} thread(s) for the candidates, {fp32_threads} for the FP32 reference"


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


@dataclass
class Reference:
    """FP32 outputs and metrics, computed once and reused for every candidate and repair step."""

    outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, Any]
    ms_per_frame: float
    threads: int = 2  # what ms_per_frame was measured with


def reference(fp32: str | os.PathLike[str], evalset: EvalSet, *, threads: int = 2, progress: bool = False,
              fppi: float = DEFAULT_FPPI) -> Reference:
    backend = open_backend(fp32, "fp32", threads=threads)
    try:
        outs = run_outputs(backend, evalset, progress="validate fp32" if progress else None)
        ms = backend.timing_summary()["p50_ms"]
    finally:
        backend.close()
    return Reference(outs, task_metrics(evalset, outs, fppi=fppi), ms, threads)


def evaluate_candidate(path: str | os.PathLike[str], precision: str, evalset: EvalSet, ref: Reference,
                       tol: Mapping[str, float], *, threads: int = 2, progress: bool = False,
                       fppi: float = DEFAULT_FPPI) -> CandidateReport:
    backend = open_backend(path, precision_of(precision), threads=threads)
    try:
        outs = run_outputs(backend, evalset, progress=f"validate {precision}" if progress else None)
        ms = backend.timing_summary()["p50_ms"]
        emulated = bool(getattr(backend, "int8_emulated", False))
    finally:
        backend.close()
    m = task_metrics(evalset, outs, fppi=fppi)
    task = evalset.manifest["task"]
    fp16_in_fp32 = precision_of(precision) == "fp16" and Path(path).suffix == ".onnx"  # open_backend: ORT CPU
    return CandidateReport(precision, Path(path).name, m, output_errors(ref.outputs, outs),
                           gate(task, ref.metrics, m, tol), ms, sha256_file(path), emulated, fp16_in_fp32)


def check_provenance(fp32: str | os.PathLike[str], candidates: Mapping[str, str | os.PathLike[str]]) -> None:
    """Refuse candidates stamped as made from another FP32 file (export/quantize.py stamp_source): a
    verdict against this FP32 would mean nothing (e.g. another model's int8.onnx)."""
    from .quantize import PROVENANCE_HINT, provenance_problems

    problems = provenance_problems(fp32, dict(candidates))
    if problems:
        raise ExportError("candidates: " + expected("files made from the FP32 model they are judged against",
                                                    "; ".join(problems)) + f" ({PROVENANCE_HINT})")


def validate(manifest: Mapping[str, Any], fp32: str | os.PathLike[str],
             candidates: Mapping[str, str | os.PathLike[str]], evalset: EvalSet, *,
             tolerances: Mapping[str, float] | None = None, threads: int = 2, progress: bool = False,
             fppi: float = DEFAULT_FPPI, ref: Reference | None = None) -> ValidationReport:
    """Compare each candidate ({precision: path}) with FP32 on ``evalset``; never raises on a failed gate.

    Raises ExportError when there is nothing to judge (no candidates) or nothing to judge against
    (a gated FP32 metric that is NaN or infinite): either would otherwise make a report that passes.
    """
    from .calibration import set_sha256

    if not candidates:
        raise ExportError(expected("at least one candidate (label: model file) to compare with FP32", "none"))
    tol = dict(tolerances) if tolerances is not None else tolerances_for(manifest)
    ref = ref or reference(fp32, evalset, threads=threads, progress=progress, fppi=fppi)
    require_finite_reference(manifest["task"], ref.metrics, tol)
    check_provenance(fp32, candidates)
    fp32_sha = sha256_file(fp32)
    given = manifest.get("tolerances") or {}
    report = ValidationReport(str(manifest.get("name", "")), manifest["task"], evalset.source, len(evalset.frames),
                              tol, ref.metrics, ref.ms_per_frame,
                              validation_set_sha256=set_sha256(evalset.frame_hashes),
                              ground_truth_sha256=evalset.truth_sha256, frame_sha256=evalset.exclude_hashes,
                              tolerance_source={m: "manifest" if m in given and tolerances is None else
                                                "caller" if tolerances is not None else "default" for m in tol},
                              threads=threads, fp32_threads=ref.threads,
                              backends=sorted({backend_name(p) for p in [fp32, *candidates.values()]}),
                              fp32_sha256=fp32_sha)
    for precision, path in candidates.items():
        report.candidates.append(evaluate_candidate(path, precision, evalset, ref, tol, threads=threads,
                                                    progress=progress, fppi=fppi))
    return report


# -- latency and repair ---------------------------------------------------------------------
def latency_ms(paths: Mapping[str, str | os.PathLike[str]], x: np.ndarray, input_name: str, *, runs: int = 30,
               threads: int = 2) -> dict[str, float]:
    """Median ms per inference of each model, interleaved so that load drifts hit all alike."""
    backends = {k: open_backend(p, precision_of(k), threads=threads) for k, p in paths.items()}
    times = interleaved_times(backends, {input_name: x}, runs=runs, warmup=1)
    return {k: statistics.median(v) for k, v in times.items()}


def interleaved_times(backends: Mapping[str, Any], feeds: Mapping[str, np.ndarray], *, runs: int,
                      warmup: int) -> dict[str, list[float]]:
    """ms per call of each loaded backend, calls interleaved so load drifts hit all alike, in a fresh
    (seeded) order each round so no backend always runs after the same one; closes them."""
    times: dict[str, list[float]] = {k: [] for k in backends}
    order = list(backends.items())
    rng = random.Random(0)
    try:
        for b in backends.values():
            for _ in range(warmup):
                b.infer(feeds)
        for _ in range(runs):
            rng.shuffle(order)
            for k, b in order:
                t = time.perf_counter()
                b.infer(feeds)
                times[k].append((time.perf_counter() - t) * 1e3)
    finally:
        for b in backends.values():
            b.close()
    return times


@dataclass
class RepairResult:
    path: Path
    nodes_in_float: list[str]
    report: CandidateReport
    sensitivity: list[tuple[str, float]]
    steps: list[dict[str, Any]]
    ms_before: float
    ms_after: float
    ms_fp32: float

    def to_dict(self) -> dict[str, Any]:
        return {"nodes_in_float": self.nodes_in_float, "passed": self.report.passed,
                "sensitivity": [{"node": n, "output_nmse_alone": s} for n, s in self.sensitivity],
                "steps": self.steps, "ms_before": self.ms_before, "ms_after": self.ms_after,
                "ms_fp32": self.ms_fp32, "method": REPAIR_METHOD}


REPAIR_METHOD = ("rank candidate nodes by the output error (NMSE vs FP32, sensitivity subset) of a model in which "
                 "only that node is quantised; keep the worst in float (1, 2, 3, 4, 6, 9, 13, ... nodes) and "
                 "re-run the full gate after each step until it passes or the limit is reached, then bisect "
                 "down to the smallest passing count")


def _schedule(limit: int) -> list[int]:
    out, k = [], 1
    while k < limit:
        out.append(k)
        k = k + 1 if k < 4 else int(k * 1.5)
    return out + [limit]


def _try_float(quantize: Callable[[Sequence[str], Path], Any], sens: Sequence[tuple[str, float]], k: int,
               work: Path, evalset: EvalSet, ref: Reference, tol: Mapping[str, float], threads: int, fppi: float,
               steps: list[dict[str, Any]], label: str = "int8") -> tuple[list[str], Path, CandidateReport]:
    """INT8 with the ``k`` most sensitive nodes in float, through the full gate; logged in ``steps``."""
    kept = [n for n, _ in sens[:k]]
    path = work / f"{label}-float{k}.onnx"
    quantize(kept, path)
    report = evaluate_candidate(path, label, evalset, ref, tol, threads=threads, fppi=fppi)
    steps.append({"nodes_in_float": kept, "passed": report.passed, **{m: report.metrics[m] for m in tol}})
    return kept, path, report


def repair_int8(quantize: Callable[[Sequence[str], Path], Any], nodes: Sequence[str], fp32: str | os.PathLike[str],
                evalset: EvalSet, ref: Reference, tol: Mapping[str, float], workdir: str | os.PathLike[str], *,
                max_float: int | None = None, sensitivity_frames: int = 24, threads: int = 2,
                progress: bool = False, fppi: float = DEFAULT_FPPI, label: str = "int8") -> RepairResult:
    """Keep the most sensitive of ``nodes`` in float until the INT8 gate passes.

    ``quantize(nodes_to_exclude, out_path)`` writes an INT8 model (from cached calibration ranges).
    Quantising one node alone shows the damage of its weights and of the activations it reads and
    writes (a tensor stays float only when every node touching it is excluded, so single
    exclusions from the full model would hide an activation outlier). The result's
    ``report.passed`` says whether the gate passed within ``max_float`` nodes. ``label`` names the
    candidate (``int8``, ``int8_cpu``) in the report and its work files.
    """
    work = Path(workdir)
    limit = min(len(nodes), max_float if max_float is not None else max(1, len(nodes) // 2))
    sub = evalset.subset(min(sensitivity_frames, len(evalset.frames)))
    sub_ref = ref.outputs[: len(sub.frames)]

    def score(path: Path) -> float:
        b = open_backend(path, "int8", threads=threads)
        try:
            return error_score(output_errors(sub_ref, run_outputs(b, sub)))
        finally:
            b.close()

    base_path = work / f"{label}-all.onnx"
    quantize([], base_path)
    sens = []
    items: Any = nodes
    if progress:
        from tqdm import tqdm

        items = tqdm(nodes, desc="node sensitivity", unit="node", leave=False)
    probe = work / f"{label}-probe.onnx"
    for n in items:
        quantize([m for m in nodes if m != n], probe)
        sens.append((n, score(probe)))
    sens.sort(key=lambda t: -t[1])
    report = evaluate_candidate(base_path, label, evalset, ref, tol, threads=threads, fppi=fppi)
    steps: list[dict[str, Any]] = [{"nodes_in_float": [], "passed": report.passed,
                                    **{m: report.metrics[m] for m in tol}}]
    kept: list[str] = []
    path = base_path
    failed_k = 0
    for k in _schedule(limit) if limit > 0 else []:
        if report.passed:
            break
        failed_k = len(kept)
        kept, path, report = _try_float(quantize, sens, k, work, evalset, ref, tol, threads, fppi, steps, label)
    # The schedule may overshoot: bisect between the last failing and the first passing count.
    lo, hi = failed_k, len(kept)
    best = (kept, path, report)
    while report.passed and hi - lo > 1:
        mid = (lo + hi) // 2
        trial = _try_float(quantize, sens, mid, work, evalset, ref, tol, threads, fppi, steps, label)
        if trial[2].passed:
            hi, best = mid, trial
        else:
            lo = mid
    kept, path, report = best
    x = evalset.tensors[0]
    ms = latency_ms({"fp32": fp32, "int8:before": base_path, "int8:after": path}, x, evalset.input_name,
                    threads=threads)
    return RepairResult(path, kept, report, sens, steps, ms["int8:before"], ms["int8:after"], ms["fp32"])
