"""A folder to an output folder, end to end: `edge-runtime infer` vs the loop a user would write.

    python -m benchmarks.bench_infer [--out out/bench/infer.json] [--frames 60] [--rounds 6]

A folder of --frames phantom 512x512 12-bit radiographs (16-bit PNGs) through xr-denoise, FP32 on
both sides (the same graph), every enhanced frame written as a 16-bit PNG:
  ours   edge_runtime.infer, in process: what `edge-runtime infer --bundle xr-denoise --source DIR
         --modality DX --bits-stored 12 --precision fp32 --every 0 --out OUT` runs (cpu-x86 config,
         its files written by a thread of its own, results.jsonl);
  plain  a sequential loop: cv2.imread, the hand-written numpy pre/post of bench_runtime, a default
         onnxruntime.InferenceSession, cv2.imwrite of the same PNG.
Each round times the whole folder, model loading included, the two in a fresh random order each round
so that both see the same machine load. Reported: seconds per round (median, min, max) and frames/s,
and the outputs compared file by file (stored levels).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_runtime import make_plain
from edge_runtime import phantoms
from edge_runtime.bundle import Bundle
from edge_runtime.frames import Frame
from edge_runtime.runtime import resolve_bundle

MODEL = "xr-denoise"


def write_folder(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"r{i:04d}.png")
        cv2.imwrite(str(paths[-1]), phantoms.xr_frame(80_000 + i, dose=0.25).pixels)
    return paths


def ours(folder: Path, out: Path) -> None:
    import contextlib
    import io

    from edge_runtime.cli import main

    with contextlib.redirect_stdout(io.StringIO()):  # its summary lines
        rc = main(["infer", "--bundle", MODEL, "--source", str(folder), "--modality", "DX", "--bits-stored", "12",
                   "--precision", "fp32", "--every", "0", "--device", "cpu-x86", "--out", str(out)])
    if rc != 0:
        raise RuntimeError(f"infer exited {rc}")


def plain(files: list[Path], out: Path) -> None:
    """What a user writes without the runtime: one file after another."""
    run = make_plain(Bundle.load(resolve_bundle(MODEL)))  # the bundle's fp32.onnx in a default session
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        px = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        if px is None:
            raise RuntimeError(f"{f.name}: unreadable")
        y = run(Frame(px, modality="DX", bits_stored=12))
        cv2.imwrite(str(out / f.name), y)


def compare(files: list[Path], ours_out: Path, plain_out: Path) -> dict[str, Any]:
    records = [json.loads(line) for line in (ours_out / "results.jsonl").read_text().splitlines()]
    diffs = []
    for f, r in zip(files, records):
        a, b = (cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in (ours_out / r["enhanced_file"], plain_out / f.name))
        if a is None or b is None:
            raise RuntimeError(f"{f.name}: an output missing")
        diffs.append(int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max()))
    return {"files": len(diffs), "records": len(records), "max_abs_levels": max(diffs) if diffs else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/bench/infer.json"))
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args(argv)
    logging.disable(logging.INFO)  # infer's per-load log lines are not what is timed
    times: dict[str, list[float]] = {"ours": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp_s:
        tmp = Path(tmp_s)
        files = write_folder(tmp / "in", args.frames)
        ours(tmp / "in", tmp / "warm")  # first-call imports and page cache, untimed
        plain(files, tmp / "warm_plain")
        agreement = compare(files, tmp / "warm", tmp / "warm_plain")
        rng = random.Random(0)
        for r in range(args.rounds):
            order = ["ours", "plain"]
            rng.shuffle(order)
            for k in order:
                out = tmp / f"{k}{r}"
                t = time.perf_counter()
                ours(tmp / "in", out) if k == "ours" else plain(files, out)
                times[k].append(time.perf_counter() - t)
    summary = {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v),
                   "frames_per_s": args.frames / statistics.median(v), "rounds_s": v} for k, v in times.items()}
    data = {"model": MODEL, "frames": args.frames, "rounds": args.rounds, "precision": "fp32",
            "frame": "512x512 uint16, 12 bits stored (phantom X-ray, 16-bit PNG)", "agreement": agreement,
            "results": summary, "plain_over_ours": summary["plain"]["median_s"] / summary["ours"]["median_s"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2))
    print(json.dumps({k: round(v["median_s"], 3) for k, v in summary.items()}), f"plain/ours {data['plain_over_ours']:.2f}",
          f"agreement {agreement}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
