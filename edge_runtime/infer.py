"""``edge-runtime infer``: run bundles over a folder, video or DICOM file into an output folder.

In-process, no ZeroMQ: for batch work and for checking a model on a file before streaming it.
Writes ``results.jsonl`` (one line per frame: detections, provenance, stage timings, never pixels
of the input; replaced by each run), annotated PNGs (input with detections next to the enhanced
output, 8-bit for viewing) and, for enhancement models, every enhanced frame at the input's own bit
depth in ``enhanced/`` (16-bit PNG for 16-bit input, TIFF for float; stored values, as the input).
Each run first removes the files the last run's records name (its annotated PNGs and enhanced
frames), so OUT holds one run's output; no other file of the folder is touched.
A frame the models refuse (wrong range, modality, ...) is logged and skipped; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .errors import (
    WARN_SAME_REASON,
    BackendError,
    ConfigError,
    InputError,
    UnsupportedFormatError,
    describe_error,
    expected,
    reason_key,
)
from .frames import Frame
from .outputs import file_stem, private_dir, write_image
from .pipeline.recorder import JsonlWriter
from .pipeline.viewer import draw_overlay, to_display
from .results import Result
from .runtime import Runtime, RuntimeSet, resolve_bundle
from .telemetry import summarize

log = logging.getLogger(__name__)


def annotate(frame: Frame, result: Result, *, truth: bool = True) -> np.ndarray:
    """Input with detections (and ground truth in white, for phantoms) next to the enhanced output."""
    img = to_display(frame.pixels, frame.bits_stored, frame.photometric)
    if truth and frame.truth is not None:
        for x0, y0, x1, y1 in frame.truth.boxes.round().astype(int):
            cv2.rectangle(img, (x0 - 2, y0 - 2), (x1 + 1, y1 + 1), (255, 255, 255), 1, cv2.LINE_AA)
    panels = [draw_overlay(img, {"detections": [d.to_dict() for d in result.detections]}, result.masks)]
    if result.enhanced is not None:
        panels.append(to_display(result.enhanced, frame.bits_stored, frame.photometric))
    return np.hstack(panels)


def write_enhanced(out: Path, frame: Frame, result: Result) -> str | None:
    """The enhanced frame as the model's post-processing gave it (the input's dtype and range), not the
    8-bit display copy: ``enhanced/STREAM_SEQ.png`` (uint8 / uint16) or ``.tiff`` (float32). Its path
    relative to ``out``, or None for a result without one."""
    img = result.enhanced
    if img is None:
        return None
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR
    suffix = ".tiff" if img.dtype == np.float32 else ".png"
    folder = private_dir(out / "enhanced", "OUT/enhanced as a folder (where the enhanced frames go)")
    path = write_image(folder / f"{file_stem(frame.stream_id)}_{frame.seq:06d}{suffix}", img)
    return f"enhanced/{path.name}"


def _recorded_files(results: Path) -> list[str]:
    """The files an earlier run wrote, by its records in ``results``: each enhanced frame
    (``enhanced/NAME``) and each annotated PNG (``STREAM_SEQ.png``, named by the record's stream and
    seq), as paths relative to OUT. Only names of those two forms: never another file of the folder."""
    names = []
    try:
        lines = results.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            rec = json.loads(line)
            name, stream, seq = rec.get("enhanced_file"), rec.get("stream"), rec.get("seq")
        except (ValueError, AttributeError):
            continue
        base = name[len("enhanced/"):] if isinstance(name, str) and name.startswith("enhanced/") else ""
        if base and "/" not in base and Path(base).suffix in (".png", ".tiff") and not base.startswith("."):
            names.append(f"enhanced/{base}")
        if isinstance(stream, str) and isinstance(seq, int) and not isinstance(seq, bool):
            names.append(f"{file_stem(stream)}_{seq:06d}.png")
    return names


class _Writer:
    """Writes each processed frame's files, then its record, in order, in a thread of its own, so
    that encoding PNGs (in a folder run of 512x512 radiographs through two models, 18 of its 43 ms per
    frame, against 11 ms of inference: OpenCV releases the GIL while it encodes) overlaps decoding and
    inference of the next frames. At most ``depth`` frames wait (their pixels are held); an error in
    the thread (a full disk) is raised in the caller at the next frame or at close, and nothing after
    it is written. close() writes what is queued; close(drain=False), or a Ctrl-C / SIGTERM while it
    waits, finishes only the file in progress: never a half-written file, never a record without its
    files, and the interrupt is raised once the thread is done (a daemon thread killed inside OpenCV at
    exit aborted the process)."""

    def __init__(self, write: Any, depth: int = 4) -> None:
        self._write = write
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=depth)
        self._error: Exception | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="infer-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                if self._error is None and not self._stop.is_set():
                    try:
                        self._write(*item)
                    except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
                        self._error = exc
        finally:
            self._done.set()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, *item: Any) -> None:
        self._raise()
        self._queue.put(item)

    def close(self, *, drain: bool = True) -> None:
        if not drain:
            self._stop.set()
        interrupted: BaseException | None = None
        ended = False
        while not self._done.is_set():
            try:
                while not ended and not self._done.is_set():  # the queue may be full: the thread empties it
                    try:
                        self._queue.put(None, timeout=0.1)
                        ended = True
                    except queue.Full:
                        pass
                self._done.wait()
            except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (edge_runtime.cli) while waiting
                interrupted = interrupted or exc
                self._stop.set()  # queued frames dropped; the file in progress is finished
        if interrupted is not None:
            raise interrupted
        if drain:
            self._raise()


def _count(text: str) -> int:
    """argparse type: an integer >= 0 (a negative --limit ran nothing, a negative --every annotated all)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, found {value}")
    return value


def record(result: Result, enhanced_file: str | None = None, position: str = "",
           photometric: str = "") -> dict[str, Any]:
    """One results.jsonl line; ``photometric``: the enhanced file's (a 16-bit PNG cannot say it)."""
    return {"type": "result", "stream": result.stream_id, "seq": result.seq, **({"position": position} if position else {}),
            "detections": [d.to_dict() for d in result.detections],
            "enhanced": result.enhanced is not None, **({"enhanced_file": enhanced_file} if enhanced_file else {}),
            **({"photometric": photometric} if enhanced_file and photometric else {}),
            "timings_ms": {k: round(v, 3) for k, v in result.timings_ms.items()},
            "provenance": result.provenance}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", action="append", required=True,
                        help="bundle directory or reference model name (repeat: detector + enhancer)")
    parser.add_argument("--source", required=True, help="file, folder, phantom:us, phantom:xr, camera:0")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--device", default=None, help="device config name or YAML (default: detect)")
    parser.add_argument("--gpu", type=int, default=0, metavar="N",
                        help="CUDA device the engines are built for and run on (default 0)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "int8"])
    parser.add_argument("--limit", type=_count, default=None, help="stop after N frames (skipped ones count)")
    parser.add_argument("--every", type=_count, default=1, help="write an annotated PNG every K frames (0: none)")
    parser.add_argument("--save-enhanced", action=argparse.BooleanOptionalAction, default=True,
                        help="write every enhanced frame at the input's bit depth to OUT/enhanced/ (default: yes)")
    parser.add_argument("--modality", help="what a folder of images (required there) or a video shows, e.g. DX, US; "
                        "DICOM and phantoms state their own")
    parser.add_argument("--bits-stored", type=int, help="bits used in 16-bit images, e.g. 12 for detector data")
    parser.add_argument("--stream-id", help="stream id for the results (default: a pseudonym from a keyed hash of "
                        "the file or folder's absolute path); 1-64 of A-Z a-z 0-9 _ . : -")


def run(args: argparse.Namespace) -> int:
    from .heap import pin_for_runtime
    from .sources import bits_hint, check_stated_modality, open_source, source_kind, stated_options

    pin_for_runtime()
    kind = source_kind(args.source)
    opts = stated_options(kind, args.modality, args.bits_stored)
    if args.stream_id:
        opts["stream_id"] = args.stream_id
    folder, out = Path(args.source).resolve(), args.out.resolve()
    if folder.is_dir() and (out == folder or folder in out.parents):
        raise ConfigError(expected("--out outside the --source folder (the next run would read this run's "
                                   "annotated images as input)", "the source folder or one inside it"))
    enhanced_dir = out / "enhanced"
    if Path(args.source).resolve() == enhanced_dir or enhanced_dir in Path(args.source).resolve().parents:
        raise ConfigError(expected("a --source outside OUT/enhanced (this run replaces the enhanced frames there)",
                                   "a source inside it"))
    seen = [resolve_bundle(b).resolve() for b in args.bundle]
    if len(set(seen)) != len(seen):  # the same model twice doubled every detection
        raise ConfigError(expected("each --bundle once", f"{len(seen) - len(set(seen))} given again"))
    runtimes = RuntimeSet([Runtime(b, args.device, precision=args.precision, gpu=args.gpu) for b in args.bundle])
    timings: dict[str, list[float]] = {}
    n = skipped = 0
    reasons: dict[str, int] = {}  # why frames were skipped (numbers as N) -> how many
    first_said: dict[str, str] = {}  # each reason as first said
    started = time.perf_counter()
    with runtimes:
        wanted = runtimes.modalities()
        if kind == "images" and "modality" not in opts:  # the files do not say: "OT" is refused frame by frame
            raise ConfigError(expected(f"--modality for a folder of images (the files do not say what they show; "
                                       f"the bundles take {wanted})", "none"))
        source = open_source(args.source, **opts)
        check_stated_modality(source, wanted, kind, "modality" in opts)  # not one warning per frame
        if args.limit is None and source.n_frames is None and kind in ("phantom", "camera"):
            print(f"{args.source} has no end: stop with Ctrl-C, or give --limit N", file=sys.stderr)
        model_bits = [int(r.bundle.manifest["bits_stored"]) for r in runtimes.runtimes  # loaded by now
                      if r.bundle and r.bundle.manifest.get("bits_stored")]
        private_dir(args.out)  # only now: a start that failed (no camera, a bundle refused) left an empty one
        # this run's files only: those the last run recorded go (none other), whatever this run writes
        # (its annotated PNGs stayed beside fewer records; --no-save-enhanced orphaned its enhanced frames)
        for name in _recorded_files(args.out / "results.jsonl"):
            (args.out / name).unlink(missing_ok=True)
        (args.out / "results.jsonl").unlink(missing_ok=True)  # this run's results only (the writer appends)
        writer = JsonlWriter(args.out / "results.jsonl")

        recorded = 0

        def save(frame: Frame, result: Result, annotated: bool) -> None:
            nonlocal recorded
            # Images before their record: a run stopped in between leaves no record without its images.
            enhanced_file = write_enhanced(args.out, frame, result) if args.save_enhanced else None
            if annotated:
                write_image(args.out / f"{file_stem(frame.stream_id)}_{frame.seq:06d}.png", annotate(frame, result))
            grey = result.enhanced is not None and result.enhanced.ndim == 2  # a grey model's output of RGB input
            writer.write(record(result, enhanced_file, frame.position,
                                "MONOCHROME2" if grey and frame.photometric == "RGB" else frame.photometric))
            recorded += 1

        failed = None  # the source's own error (a truncated file): what it gave so far is kept
        frames = iter(source)
        files = _Writer(save)
        try:
            while args.limit is None or n < args.limit:
                try:
                    frame = next(frames)
                except StopIteration:
                    break
                except (InputError, UnsupportedFormatError, OSError) as exc:  # a cut file, a folder gone
                    failed = exc
                    break
                try:
                    result = runtimes.process(frame)
                except (InputError, BackendError) as exc:  # one bad frame is counted and skipped, never the run
                    skipped += 1
                    n += 1
                    why = str(exc)
                    reason = reason_key(why)  # the same refusal, whatever values it names
                    first_said.setdefault(reason, why)
                    reasons[reason] = reasons.get(reason, 0) + 1
                    if reasons[reason] <= WARN_SAME_REASON:  # a 1000-frame file gave 1000 identical warnings
                        # no stream id: file names can name patients
                        log.warning("frame %d%s skipped: %s%s%s", frame.seq,
                                    f" ({frame.position})" if frame.position else "", why,
                                    bits_hint(kind, frame, model_bits) if "bits_stored" not in opts and
                                    "-bit frame" in why else "",
                                    " (further frames skipped for this reason are counted, not logged)"
                                    if reasons[reason] == WARN_SAME_REASON else "")
                    continue
                files.put(frame, result, bool(args.every and n % args.every == 0))
                for stage, ms in result.timings_ms.items():
                    timings.setdefault(stage, []).append(ms)
                n += 1
        except BaseException as exc:
            files.close(drain=False)  # the exception in flight stays the one raised (exit 130 / 143)
            if isinstance(exc, KeyboardInterrupt):  # what a stopped run kept
                print(f"stopped after {n} frames: {recorded} recorded in {args.out}/results.jsonl, each with its "
                      "files", file=sys.stderr)
            raise
        files.close()
    writer.close()
    wall = time.perf_counter() - started
    files_skipped = getattr(source, "skipped", 0)
    print(f"{n} frames in {wall:.1f} s -> {args.out}/results.jsonl"
          + (f"; {skipped} skipped (see the warnings above)" if skipped else "")
          + (f"; {files_skipped} input file(s) unreadable and left out" if files_skipped else "")
          + "".join(f"\n  {count} skipped like this: {first_said[reason]}" for reason, count in reasons.items()
                    if count > WARN_SAME_REASON))
    if failed is not None:
        print(f"the source stopped after {n} frames: {type(failed).__name__}: {describe_error(failed)}", file=sys.stderr)
    for stage in ("preprocess", "infer", "postprocess"):
        if stage in timings:
            s = summarize(timings[stage])
            print(f"  {stage:<12} p50 {s['p50']:.2f} ms  p99 {s['p99']:.2f} ms  max {s['max']:.2f} ms")
    return 1 if skipped or files_skipped or failed is not None else 0
