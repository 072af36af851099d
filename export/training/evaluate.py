"""Held-out evaluation of a model through the runtime's own path, and of the classical baselines.

The model runs as the runtime runs it: ``Preprocessor`` -> ONNX Runtime (CPU, 2 threads) ->
``Postprocessor``, all driven by the manifest. Baselines see the same frames. Timings are
wall-clock per frame in the same process: for the detectors one after the other; for the
enhancers in a timing pass of their own (``time_interleaved``), apart from the metrics, whose
SSIM work between calls would otherwise leave each timed call a cold cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

from edge_runtime.backends.onnxruntime import session_options
from edge_runtime.frames import Frame
from edge_runtime.heap import pin_malloc_thresholds
from edge_runtime.postprocess import Postprocessor, enhance_tiled
from edge_runtime.preprocess import Preprocessor
from edge_runtime.results import Detection
from export.metrics import average_precision, psnr, sensitivity_at_fppi, ssim

from . import baselines

THREADS = 2
AP_SCORE_THRESHOLD = 0.01  # decode low-scoring peaks too, so AP sees the whole precision-recall curve


# Rounds of two timing passes in the enhancer cards: a 2-core VM's speed drifts by 20-30% over
# tens of seconds (neighbours, clocks), so one run's ratio says little near parity.
TIMING_ROUNDS = 5


def session(path: str | Path, threads: int = THREADS, spinning: str = "run") -> ort.InferenceSession:
    """The runtime's session options (backends/onnxruntime.py). Spinning "run" by default: one model
    called in-process, as here; ONNX Runtime's own default keeps its threads spinning after each run,
    on the core that the post-processing and the baselines then share."""
    opts = session_options(threads=threads, spinning=spinning)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@dataclass
class ModelRunner:
    """Manifest + ONNX file -> ``run(frame)`` with per-stage timings, as the runtime does it."""

    manifest: Mapping[str, Any]
    onnx_path: Path
    overrides: dict[str, Any] = field(default_factory=dict)  # postprocess keys, e.g. a low threshold
    spinning: str = "run"  # ONNX Runtime intra-op spinning, as the device configs' cpu_spinning

    def __post_init__(self) -> None:
        self.pre = Preprocessor.from_manifest(self.manifest, reuse_tensor=True)
        post_spec = {**self.manifest["postprocess"], **self.overrides}
        names = [o["name"] for o in self.manifest["outputs"]]
        self.post = Postprocessor(post_spec, output_names=names, preprocess=self.pre)
        self.sess = session(self.onnx_path, spinning=self.spinning)
        self.input_name = self.manifest["inputs"][0]["name"]
        self.output_names = names
        self.timings: dict[str, list[float]] = {"preprocess": [], "infer": [], "postprocess": []}

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.sess.run(self.output_names, {self.input_name: x})))

    def run(self, frame: Frame) -> Any:
        t0 = time.perf_counter()
        x, m = self.pre(frame)
        t1 = time.perf_counter()
        if self.post.type == "enhance" and self.post.tile is not None:
            size, overlap = self.post.tile
            out = {self.output_names[0]: enhance_tiled(lambda t: self.infer(t)[self.output_names[0]], x, size, overlap)}
        else:
            out = self.infer(x)
        t2 = time.perf_counter()
        decoded = self.post(out, m, frame)
        t3 = time.perf_counter()
        for k, dt in zip(("preprocess", "infer", "postprocess"), (t1 - t0, t2 - t1, t3 - t2)):
            self.timings[k].append(dt * 1e3)
        return decoded

    def median_ms(self) -> dict[str, float]:
        out = {k: float(np.median(v)) for k, v in self.timings.items() if v}
        out["total"] = float(sum(out.values()))
        return out


def detection_metrics(pairs: Sequence[tuple[list[Detection], Any]], classes: list[str]) -> dict[str, Any]:
    ap = average_precision(pairs, 0.5, classes)
    return {"ap50": round(ap["ap"], 4),
            "ap50_per_class": {k: (None if v is None else round(v, 4)) for k, v in ap["per_class"].items()},
            "sensitivity_at_0.5_fppi": round(sensitivity_at_fppi(pairs, 0.5, 0.5), 4),
            "frames": len(pairs), "objects": int(sum(len(_truth_boxes(t)) for _, t in pairs))}


def _truth_boxes(t: Any) -> np.ndarray:
    return np.zeros((0, 4)) if t is None else np.asarray(t.boxes)


def eval_detector(manifest: Mapping[str, Any], onnx_path: Path, frames: Sequence[Frame],
                  baseline: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """AP50 / sensitivity of the model (and of the tuned baseline) on the same frames."""
    pin_malloc_thresholds()  # as in time_interleaved: the baseline allocates per frame
    classes = list(manifest["postprocess"]["classes"])
    runner = ModelRunner(manifest, onnx_path, {"score_threshold": AP_SCORE_THRESHOLD})
    model_dets = [runner.run(f).detections for f in frames]
    out: dict[str, Any] = {"model": {**detection_metrics([(d, f.truth) for d, f in zip(model_dets, frames)], classes),
                                     "ms_per_frame": runner.median_ms()},
                           "detections": model_dets}
    if baseline is not None:
        fn = baselines.DETECTORS[manifest["name"]]
        base_dets: list[list[Detection]] = []
        ms: list[float] = []
        for f in frames:
            t0 = time.perf_counter()
            base_dets.append(fn(f, **baseline["params"]))
            ms.append((time.perf_counter() - t0) * 1e3)
        out["baseline"] = {**detection_metrics([(d, f.truth) for d, f in zip(base_dets, frames)], classes),
                           "ms_per_frame": float(np.median(ms)), "params": baseline["params"]}
        out["baseline_detections"] = base_dets
    return out


def time_interleaved(fns: Mapping[str, Callable[[Frame], Any]], frames: Sequence[Frame],
                     passes: int = 4) -> dict[str, list[float]]:
    """ms per call of each function on each frame, in passes over the frames that alternate the order
    of the functions (so each sees the same machine state); the first pass is a warm-up, not kept.
    glibc's malloc thresholds are pinned first: the filters allocate per call, and without it they paid
    page faults on every call in this process (edge_runtime.heap)."""
    pin_malloc_thresholds()
    out: dict[str, list[float]] = {k: [] for k in fns}
    items = list(fns.items())
    for p in range(passes + 1):
        for name, fn in (items if p % 2 == 0 else items[::-1]):
            for f in frames:
                t0 = time.perf_counter()
                fn(f)
                if p > 0:
                    out[name].append((time.perf_counter() - t0) * 1e3)
    return out


def _filter_frame(fn: Callable[..., np.ndarray], params: Mapping[str, Any], frame: Frame) -> np.ndarray:
    return fn(frame.pixels, **params)


def eval_enhancer(manifest: Mapping[str, Any], onnx_path: Path, frames: Sequence[Frame],
                  filters: Mapping[str, Mapping[str, Any]] | None = None, *, timing: bool = True,
                  rounds: int = TIMING_ROUNDS) -> dict[str, Any]:
    """PSNR / SSIM against the clean reference and (``timing``) median ms per frame, model and filters,
    with each one's median per round of two passes (``ms_rounds``: how much the machine drifts)."""
    bits = int(manifest["bits_stored"])
    rng = float(2 ** bits - 1)
    runner = ModelRunner(manifest, onnx_path)
    cv2.setNumThreads(THREADS)
    rows: dict[str, dict[str, list[float]]] = {"input": {"psnr": [], "ssim": []}, "model": {"psnr": [], "ssim": []}}
    outputs: dict[str, list[np.ndarray]] = {"model": []}
    for name in filters or {}:
        rows[name] = {"psnr": [], "ssim": []}
        outputs[name] = []
    for f in frames:
        clean = f.truth.clean if f.truth is not None else None
        if clean is None:
            raise ValueError("enhancement evaluation needs frames with a clean reference")
        rows["input"]["psnr"].append(psnr(clean, f.pixels, rng))
        rows["input"]["ssim"].append(ssim(clean, f.pixels, rng))
        y = runner.run(f).enhanced
        outputs["model"].append(y)
        rows["model"]["psnr"].append(psnr(clean, y, rng))
        rows["model"]["ssim"].append(ssim(clean, y, rng))
        for name, spec in (filters or {}).items():
            z = baselines.FILTERS[name](f.pixels, **spec["params"])
            outputs[name].append(z)
            rows[name]["psnr"].append(psnr(clean, z, rng))
            rows[name]["ssim"].append(ssim(clean, z, rng))
    out: dict[str, Any] = {}
    for name, r in rows.items():
        out[name] = {"psnr_db": round(float(np.mean(r["psnr"])), 3), "ssim": round(float(np.mean(r["ssim"])), 4)}
        if name in (filters or {}):
            out[name]["params"] = dict(filters[name]["params"])  # type: ignore[index]
    if timing:
        # Timing pass: the model as timed for the card (spinning during a run) and with the shipped cpu
        # configs' spinning off, next to the filters, on the same frames.
        off = ModelRunner(manifest, onnx_path, spinning="off")
        runner.timings = {k: [] for k in runner.timings}
        fns: dict[str, Callable[[Frame], Any]] = {"model": runner.run, "model_spinning_off": off.run}
        for name, spec in (filters or {}).items():
            fns[name] = partial(_filter_frame, baselines.FILTERS[name], spec["params"])
        timed = time_interleaved(fns, frames, passes=2 * rounds)
        per_round = 2 * len(frames)
        for name, ms in timed.items():
            key = "model" if name == "model_spinning_off" else name
            suffix = "_spinning_off" if name == "model_spinning_off" else ""
            out[key][f"ms_per_frame{suffix}"] = round(float(np.median(ms)), 2)
            out[key][f"ms_rounds{suffix}"] = [round(float(np.median(ms[i:i + per_round])), 2)
                                              for i in range(0, len(ms), per_round)]
        # Whole calls above, the same statistic as the filters'; the stage split without the warm-up
        # pass (the model's first len(frames) calls: "model" runs first in that pass).
        out["model"]["ms_infer"] = round(float(np.median(runner.timings["infer"][len(frames):])), 2)
    out["frames"] = len(frames)
    out["size"] = list(frames[0].pixels.shape[:2]) if frames else []
    out["outputs"] = outputs
    return out
