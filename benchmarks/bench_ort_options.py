"""Which ONNX Runtime session options give the lowest per-frame latency on this CPU?

Times one conv model (default: 6 conv 3x3 layers, 16 channels, ReLU, one 512x512 grey frame,
batch 1 -- the shape of our enhancement / detection backbones) under a few option sets, each
through ``edge_runtime.backends.onnxruntime.session_options`` (so what is measured is what the
backend uses), and prints p50 / p99 / mean per set.

``--model PATH`` times that ONNX file instead (e.g. a bundle's int8.onnx, fed a random tensor of
its input shape with dynamic dims set to ``--size``); ``--config KEY=VALUE`` adds one more set, OrtBackend's
options plus that session config entry (e.g. ``session.qdqisint8allowed=1``: on x86 this keeps the
QDQ graph's int8 x int8 convolutions instead of converting activations to uint8; measured 8x slower
on us-lesion-det, so the backend must not set it).

``--busy N`` runs N background processes doing frame-sized numpy work (what a source, a
pre-processor or a sink does on the same cores of a cart) while timing, to show which options
hold up under contention.

Each option set runs in its own block (warm-up, then ``--runs`` timed calls), and the blocks run
``--rounds`` times, alternating forward and reverse order, so slow drift of a shared machine does
not favour whichever set ran first. Samples of all rounds are pooled per set.

    python -m benchmarks.bench_ort_options [--size 512] [--runs 200] [--rounds 2] [--busy 0] [--json out.json]
        [--model PATH] [--config KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge_runtime.backends.base import percentile
from edge_runtime.backends.onnxruntime import session_options
from edge_runtime.heap import pin_malloc_thresholds

# name -> session_options(...) arguments. "ours" is OrtBackend's default.
OPTION_SETS: dict[str, dict[str, object]] = {
    "ours (threads=0 -> physical cores, sequential, all, spinning off)": {},
    "threads=1": {"threads": 1},
    "threads=2": {"threads": 2},
    "parallel executor (inter_op=2)": {"execution_mode": "parallel", "inter_op_threads": 2},
    "graph opt basic": {"graph_optimization": "basic"},
    "graph opt disabled": {"graph_optimization": "disable"},
    "spinning on (ONNX Runtime's default)": {"spinning": "always"},
    "spinning during a run only (force_spinning_stop)": {"spinning": "run"},
}


def conv_model(path: Path, layers: int = 6, channels: int = 16) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    prev, prev_c = "image", 1
    for i in range(layers):
        w = (rng.standard_normal((channels, prev_c, 3, 3)) / np.sqrt(9 * prev_c)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(channels, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev, prev_c = f"r{i}", channels
    graph = helper.make_graph(
        nodes, "bench_conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, "H", "W"])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, channels, "H", "W"])], inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return path


def _busy_loop(stop: mp.synchronize.Event, size: int) -> None:
    """Frame-sized work like a neighbouring pipeline stage: scale, clip, convert, sum."""
    frame = np.random.default_rng(2).integers(0, 4096, (size, size), dtype=np.uint16)
    while not stop.is_set():
        scaled = np.clip(frame.astype(np.float32) / 4095.0 * 1.1, 0.0, 1.0)
        float(scaled.sum())


def time_set(model: Path, options: dict[str, object], image: np.ndarray, runs: int, warmup: int) -> list[float]:
    import onnxruntime as ort

    options = dict(options)
    config = options.pop("config", {})
    so = session_options(**options)  # type: ignore[arg-type]
    for key, value in config.items():  # type: ignore[attr-defined]
        so.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: image}
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - started) * 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="frame height and width")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per set per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--busy", type=int, default=0, help="background busy processes while timing")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    parser.add_argument("--model", type=Path, default=None, help="time this ONNX file instead of the conv model")
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                        help="also time OrtBackend's options plus this session config entry (repeatable)")
    args = parser.parse_args(argv)
    pin_malloc_thresholds()  # the same allocator for every option set (edge_runtime.heap)

    import onnxruntime as ort

    for entry in args.config:
        key, _, value = entry.partition("=")
        OPTION_SETS[f"ours + {key}={value}"] = {"config": {key: value}}
    shape = [1, 1, args.size, args.size]
    if args.model is not None:
        dims = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
        shape = [d if isinstance(d, int) else args.size for d in dims]
    image = np.random.default_rng(1).random(shape, dtype=np.float32)
    samples: dict[str, list[float]] = {name: [] for name in OPTION_SETS}
    stop = mp.Event()
    busy = [mp.Process(target=_busy_loop, args=(stop, args.size), daemon=True) for _ in range(args.busy)]
    for proc in busy:
        proc.start()
    try:
        _run_all(args, image, samples)
    finally:
        stop.set()
        for proc in busy:
            proc.join(5)

    rows = []
    for name, values in samples.items():
        rows.append({"options": name, "n": len(values), "p50_ms": percentile(values, 50),
                     "p99_ms": percentile(values, 99), "mean_ms": float(np.mean(values))})
    env = {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
           "machine": platform.machine(), "python": platform.python_version(), "onnxruntime": ort.__version__,
           "model": str(args.model) if args.model else f"6x conv3x3 16ch + ReLU, 1x1x{args.size}x{args.size} float32",
           "runs_per_set": args.runs * args.rounds,
           "busy_processes": args.busy, "loadavg_after": os.getloadavg()}
    print(f"\nONNX Runtime {ort.__version__}, {env['affinity']} usable CPUs, {env['model']}, "
          f"{env['runs_per_set']} runs per set, {args.busy} busy background processes, "
          f"load average after {env['loadavg_after'][0]:.1f}\n")
    print("| options | p50 ms | p99 ms | mean ms |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['options']} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['mean_ms']:.2f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    return 0


def _run_all(args: argparse.Namespace, image: np.ndarray, samples: dict[str, list[float]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model if args.model is not None else conv_model(Path(tmp) / "conv.onnx")
        names = list(OPTION_SETS)
        for round_index in range(args.rounds):
            for name in names if round_index % 2 == 0 else names[::-1]:
                samples[name] += time_set(model, OPTION_SETS[name], image, args.runs, args.warmup)
                print(f"round {round_index + 1}/{args.rounds} {name}: done", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
