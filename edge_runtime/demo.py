"""``edge-runtime demo`` (``make demo``): the product end to end on the CPU, written to out/demo/.

1. Sources: phantom ultrasound (sector and linear), phantom X-ray at two doses, and the real
   30-frame JPEG ultrasound cine that pydicom ships, with ground truth drawn where it exists.
2. Models in process: the bundled reference models on those frames (detections next to the
   enhanced output; ground truth in white).
3. Streaming: the real ultrasound cine at its native 30 fps and a phantom X-ray sequence at 15 fps
   through the ZeroMQ pipeline (source -> worker processes -> recorder), detection plus
   enhancement with the bundled INT8 models, an annotated video, a latency report and PNG.

The reference models are demonstration models trained on synthetic phantoms, not for clinical use.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import cv2
import numpy as np

from .errors import EdgeRuntimeError, InputError
from .frames import Frame
from .outputs import private_dir, write_image
from .pipeline.viewer import to_display

TILE = 320  # contact-sheet cell height in pixels
# The demo is the CPU path by design (no engine builds on a Jetson); pick the CPU config of this arch.
CPU_DEVICE = "cpu-arm64" if platform.machine().lower() in ("aarch64", "arm64") else "cpu-x86"


def real_cine_path() -> Path:
    """pydicom's own 30-frame JPEG-baseline ultrasound cine (YBR_FULL_422, 240 x 320)."""
    import pydicom

    path = Path(pydicom.__file__).parent / "data" / "test_files" / "examples_ybr_color.dcm"
    if not path.is_file():
        raise InputError(f"expected pydicom's test file {path.name} in the pydicom install, found none")
    return path


def _cell(img: np.ndarray, caption: str) -> np.ndarray:
    scale = TILE / img.shape[0]
    img = cv2.resize(img, (max(1, round(img.shape[1] * scale)), TILE), interpolation=cv2.INTER_AREA)
    cv2.rectangle(img, (0, 0), (img.shape[1], 18), (0, 0, 0), -1)
    cv2.putText(img, caption, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def _sheet(cells: list[np.ndarray], columns: int) -> np.ndarray:
    """Rows of cells (each TILE high), padded to the widest row."""
    rows = [np.hstack(cells[i:i + columns]) for i in range(0, len(cells), columns)]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.vstack(rows)


def _with_truth(frame: Frame) -> np.ndarray:
    img = to_display(frame.pixels, frame.bits_stored, frame.photometric)
    if frame.truth is not None:
        for (x0, y0, x1, y1), label in zip(frame.truth.boxes.round().astype(int), frame.truth.labels):
            color = (80, 255, 80) if label != "cyst" else (0, 200, 255)
            cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), color, 1, cv2.LINE_AA)
    return img


def demo_frames() -> list[tuple[str, Frame]]:
    from . import phantoms
    from .sources import DicomSource

    real = list(DicomSource(real_cine_path()))
    return [
        ("phantom US sector", phantoms.us_frame(11, geometry="sector")),
        ("phantom US linear", phantoms.us_frame(12, geometry="linear")),
        ("phantom X-ray dose 1.0", phantoms.xr_frame(13, dose=1.0, n_nodules=(2, 3))),
        ("phantom X-ray dose 0.1", phantoms.xr_frame(13, dose=0.1, n_nodules=(2, 3))),
        ("real US cine (pydicom) #0", real[0]),
        ("real US cine (pydicom) #29", real[29]),
    ]


def sources_sheet(frames: list[tuple[str, Frame]], out: Path) -> Path:
    path = out / "contact_sheet_sources.png"
    write_image(path, _sheet([_cell(_with_truth(f), name) for name, f in frames], 3))
    return path


def results_sheet(frames: list[tuple[str, Frame]], bundles: dict[str, Path], out: Path) -> Path:
    from .infer import annotate
    from .runtime import Runtime, RuntimeSet

    cells = []
    with RuntimeSet([Runtime(p, CPU_DEVICE) for p in bundles.values()]) as models:
        covered = {m for r in models.runtimes if r.bundle for m in r.bundle.manifest["modality"]}
        for name, frame in frames:
            if frame.modality not in covered:
                continue
            result = models.process(frame)
            dets = len(result.detections)
            cells.append(_cell(annotate(frame, result), f"{name}: {dets} det, {result.provenance['precision']}"))
    path = out / "contact_sheet_results.png"
    write_image(path, _sheet(cells, 2))  # frames of a real (anonymised) cine: 0640 like every image out
    return path


def stream(name: str, spec: str, bundles: tuple[str, ...], out: Path, seconds: float, fps: float) -> str:
    from .pipeline.supervisor import RuntimeProcessor, SourceSpec, run_pipeline

    report = run_pipeline(SourceSpec(spec, realtime=True, loop=True), RuntimeProcessor(bundles, CPU_DEVICE),
                          n_workers=1, mode="process", record_dir=out / name, duration=seconds,
                          video=True, video_fps=fps)
    report.write_latency_report(out / name, title=f"{name}: capture -> recorder latency")
    if report.failure or report.source_error:
        raise EdgeRuntimeError(f"{name} stream failed: {report.failure or report.source_error}")
    return f"{name}: " + report.summary().replace("\n", "\n    ")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    parser.add_argument("--seconds", type=float, default=15.0, help="streaming time per modality")
    parser.add_argument("--no-stream", action="store_true", help="skip the ZeroMQ streaming part")


def run(args: argparse.Namespace) -> int:
    from .runtime import reference_bundles

    out: Path = args.out
    private_dir(out)
    started = time.perf_counter()
    frames = demo_frames()
    lines = [f"sources contact sheet: {sources_sheet(frames, out)}"]
    bundles = reference_bundles()
    if not bundles:
        print("\n".join(lines + ["no reference bundles are installed: models skipped"]))
        return 0
    lines.append(f"model results contact sheet: {results_sheet(frames, bundles, out)}")
    if not args.no_stream:
        us = tuple(str(bundles[n]) for n in ("us-lesion-det", "us-despeckle") if n in bundles)
        xr = tuple(str(bundles[n]) for n in ("xr-nodule-det", "xr-denoise") if n in bundles)
        if us:
            lines.append(stream("us", str(real_cine_path()), us, out, args.seconds, 30.0))
        if xr:
            lines.append(stream("xr", "phantom:xr", xr, out, args.seconds, 15.0))
    lines.append(f"done in {time.perf_counter() - started:.0f} s; everything is under {out}/ "
                 "(models: demonstration only, trained on synthetic phantoms)")
    print("\n".join(lines))
    return 0
