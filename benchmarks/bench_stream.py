"""Streaming benchmark: a 30 fps 512x512 ultrasound stream, detection + enhancement, on this CPU.

    python -m benchmarks.bench_stream [--seconds 600] [--workers 1] [--out out/bench/stream.json]

A phantom cine (60 frames, 512x512, sector) is rendered once to PNGs, then replayed in real time at
30 fps, looping, through the pipeline as shipped (source, worker and recorder processes over ipc;
the hub thread in the supervisor) with the bundled us-lesion-det and us-despeckle models (INT8 on
cpu-x86). Rendering up front keeps the phantom generator's own CPU cost out of the measurement:
a probe delivers frames, it does not simulate them.

Reported: capture -> sink latency p50/p99/max, the worst frame's seq, drops by cause, and latency
growth: p50 of the last tenth of the run minus p50 of the first tenth (target: no growth; p99
under 50 ms on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge_runtime import phantoms
from edge_runtime.devices import load_config
from edge_runtime.pipeline.supervisor import RuntimeProcessor, SourceSpec, run_pipeline
from edge_runtime.runtime import reference_bundles
from edge_runtime.telemetry import end_to_end_ms, summarize


def render_cine(folder: Path, n: int = 60) -> Path:
    for f in phantoms.us_cine(4242, n, size=(512, 512), geometry="sector"):
        cv2.imwrite(str(folder / f"{f.seq:04d}.png"), f.pixels)
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--spinning", choices=("off", "run", "always"),
                    help="ONNX Runtime intra-op spinning (default: the cpu-x86 config's cpu_spinning)")
    ap.add_argument("--out", type=Path, default=Path("out/bench/stream.json"))
    args = ap.parse_args(argv)
    shipped = reference_bundles()
    bundles = tuple(str(shipped[n]) for n in ("us-lesion-det", "us-despeckle"))
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = render_cine(Path(tmp))
        source = SourceSpec(str(folder), realtime=True, loop=True,
                            options=(("modality", "US"), ("fps", 30.0), ("stream_id", "us")))
        report = run_pipeline(source, RuntimeProcessor(bundles, "cpu-x86", args.spinning), n_workers=args.workers,
                              mode="process", duration=args.seconds, keep_results=int(args.seconds * 40))
    e2e = [v for v in (end_to_end_ms(r["stamps"]) for r in report.records) if v is not None]
    tenth = max(1, len(e2e) // 10)
    first, last = float(np.median(e2e[:tenth])), float(np.median(e2e[-tenth:]))
    out: dict[str, Any] = {
        "seconds": args.seconds, "workers": args.workers, "fps": round(report.fps, 2), "results": report.results,
        "spinning": args.spinning or load_config("cpu-x86").cpu_spinning,
        "e2e_ms": summarize(e2e), "worst": report.stats.get("worst"), "drops": report.drops,
        # every frame read is a result, a counted drop, or was in flight when the run was stopped
        "frames_read": report.frames_read,
        "frames_sent": sum(n.get("frames_sent") or 0 for n in report.nodes.values()),
        "rejected": report.rejected, "restarts": report.restarts,
        "growth_ms": {"first_tenth_p50": round(first, 3), "last_tenth_p50": round(last, 3),
                      "delta": round(last - first, 3)},
        "stages": {k: v for k, v in report.stats.items() if k.endswith("_ms")},
        "load_avg": {"start": load_start, "end": os.getloadavg()[0]}, "cores": os.cpu_count(),
        "capture_stamp": "scheduled",  # sources.paced: a paced file source's frames carry their scheduled time
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str))
    report.write_latency_report(args.out.parent, name=f"{args.out.stem}_latency",  # stream.json: stream_latency
                                title=f"30 fps 512x512 US, det + despeckle, {args.seconds:.0f} s")
    s = out["e2e_ms"]
    print(f"{report.results} results, {report.fps:.1f} fps; capture->sink p50 {s['p50']:.1f} p99 {s['p99']:.1f} "
          f"max {s['max']:.1f} ms; growth {out['growth_ms']['delta']:+.2f} ms; drops {report.drops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
