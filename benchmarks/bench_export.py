"""Export toolchain benchmark: time per export step, and FP32 vs FP16 vs both INT8 forms on ONNX Runtime CPU.

For each reference bundle (edge_runtime/models/*/):
1. export steps: the full `edge-runtime export reference` flow (check, fp16, calibration frames,
   calibrate + quantise, validation) on a temporary copy of the bundle, timed per step;
2. latency: the bundle's fp32 / fp16 / int8 (int8.onnx, the TensorRT form that runs everywhere) /
   int8_cpu (int8_cpu.onnx, the artefact targeted at onnxruntime-cpu, which the runtime runs on CPU
   devices) ONNX files through the runtime's OrtBackend (CPU provider, ``--threads`` intra-op threads),
   one pre-processed phantom frame of the model's modality, interleaved (fp32, fp16, int8, int8_cpu,
   fp32, ...) in the same run on the same frame so machine drift hits all alike, ``--runs`` timed calls
   each after a warm-up; p50 / p99 / mean in ms and both INT8 / FP32 speed-ups (``int8_speedup_p50``,
   ``int8_cpu_speedup_p50``).

The accuracy gate's verdict per file (``gate_view``) comes from step 1's own validation report when
the export steps ran (``steps.validation``), and from the shipped bundle's validation.json only with
``--skip-steps`` (``latency.gate_passed`` / ``gate`` / ``nodes_in_float``); renderings name the source.

INT8 speed on x86 comes from ONNX Runtime's VNNI / AVX-512 / AMX kernels; the CPU flags that
matter are recorded in the JSON, with the load average before and after each model (timings taken
while other work runs are noisy; the interleaved ratios hold up better than the absolute figures).

``--extra LABEL=PATH`` times further INT8 files of the same model in the same interleaved loop
(``{model}`` in PATH is replaced by the bundle name), e.g. the INT8 file of an earlier commit or a
CPU-only variant: ``--extra before=/tmp/old/{model}.int8.onnx``; their speed-up over FP32 is reported
as ``LABEL_speedup_p50``.

    python -m benchmarks.bench_export [out/bench/export.json] [--models a,b] [--runs 200] [--skip-steps]
        [--extra LABEL=PATH ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge_runtime.backends.base import percentile
from edge_runtime.heap import pin_malloc_thresholds

MODELS = ROOT / "edge_runtime" / "models"
PRECISIONS = ("fp32", "fp16", "int8")
COLUMNS = (*PRECISIONS, "int8_cpu")  # int8_cpu: the bundle's onnxruntime-cpu INT8 artefact (int8_cpu.onnx)
CPU_TARGET = "onnxruntime-cpu"
METRICS = ("ap50", "sensitivity", "psnr_db", "ssim", "dice")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "avx512_fp16")


def cpu_info() -> dict[str, Any]:
    from edge_runtime.devices import cpu_flags, cpu_int8

    cpu = cpu_int8()
    flags = cpu_flags() or set()
    return {"model": cpu.model or platform.processor(), "cores": os.cpu_count(),
            "int8_flags": {f: f in flags for f in CPU_FLAGS}, "int8_kernels": cpu.describe()}


def frame_tensor(manifest: dict[str, Any]) -> Any:
    from edge_runtime.preprocess import Preprocessor
    from export.calibration import VALIDATION_SEED0, phantom_frames, phantom_kind, phantom_size

    frame = next(iter(phantom_frames(phantom_kind(manifest), 1, VALIDATION_SEED0, size=phantom_size(manifest))))
    return Preprocessor.from_manifest(manifest)(frame)[0]


def latency(bundle_dir: Path, runs: int, threads: int, extra: dict[str, str] | None = None,
            spinning: str = "off") -> dict[str, Any]:
    from edge_runtime.backends.onnxruntime import OrtBackend
    from edge_runtime.bundle import Bundle

    b = Bundle.load(bundle_dir)
    x = frame_tensor(b.manifest)
    name = b.manifest["inputs"][0]["name"]
    backends = {}
    files: dict[str, str] = {}
    for p in COLUMNS:
        try:
            a = b.artifact("int8", target=CPU_TARGET) if p == "int8_cpu" else b.artifact(p)
            if p == "int8_cpu" and a.file == files.get("int8"):
                raise LookupError("no artefact targeted at onnxruntime-cpu")
            backends[p] = OrtBackend(b.file(a.file), threads=threads, providers=["cpu"], precision=p[:4],
                                     spinning=spinning).load()
            files[p] = a.file
        except Exception as exc:  # noqa: BLE001 - a missing artefact is reported, not fatal
            print(f"  {b.name}: no {p} ({exc})", file=sys.stderr)
    for label, template in (extra or {}).items():
        path = Path(template.replace("{model}", b.name))
        if path.is_file():
            backends[label] = OrtBackend(path, threads=threads, providers=["cpu"], precision="int8",
                                         spinning=spinning).load()
        else:
            print(f"  {b.name}: no {label} ({path})", file=sys.stderr)
    from export.validate import interleaved_times

    load_before = os.getloadavg()
    times = interleaved_times(backends, {name: x}, runs=runs, warmup=5)
    out: dict[str, Any] = {"input_shape": list(x.shape), "runs": runs, "threads": threads, "spinning": spinning,
                           "files": files, "emulated": [k for k, v in backends.items() if v.int8_emulated],
                           "loadavg_before": [round(v, 2) for v in load_before],
                           "loadavg_after": [round(v, 2) for v in os.getloadavg()]}
    for p, ts in times.items():
        out[p] = {"p50_ms": percentile(ts, 50), "p99_ms": percentile(ts, 99), "mean_ms": sum(ts) / len(ts)}
    for label in ("int8", "int8_cpu", *(extra or {})):
        if label in out and "fp32" in out:
            out[f"{label}_speedup_p50"] = out["fp32"]["p50_ms"] / out[label]["p50_ms"]
    if "fp16" in out and "fp32" in out:
        out["fp16_speedup_p50"] = out["fp32"]["p50_ms"] / out["fp16"]["p50_ms"]
    val = bundle_dir / "validation.json"
    if val.is_file():
        out.update(gate_summary(json.loads(val.read_text())))
    return out


def gate_summary(v: dict[str, Any]) -> dict[str, Any]:
    """The gate verdict, per-candidate verdicts, repairs and gated metrics of a validation.json."""
    repairs = v.get("repairs") or ({"int8": v["repair"]} if v.get("repair") else {})
    out: dict[str, Any] = {"gate_passed": v.get("passed"),
                           "gate": {c["precision"]: c["passed"] for c in v.get("candidates", [])},
                           "nodes_in_float": {label: r.get("nodes_in_float", []) for label, r in repairs.items()}}
    out["int8_nodes_in_float"] = out["nodes_in_float"].get("int8", [])
    out["metrics"] = {c["precision"]: {k: c["metrics"].get(k) for k in METRICS if k in c["metrics"]}
                      for c in v.get("candidates", [])}
    out["metrics"]["fp32"] = {k: v["fp32"]["metrics"].get(k) for k in METRICS if k in v["fp32"]["metrics"]}
    return out


RUN_SOURCE = "this run's export"
BUNDLE_SOURCE = "shipped bundle's validation.json"


def gate_view(entry: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(gate summary, where it came from) for one model's results entry.

    When the export steps ran, the verdict is theirs (the benchmark measured that export, not the
    shipped one); the bundle's validation.json stands in only when they were skipped. A steps entry
    without a report (an older JSON, or a failure whose report was not found) still gives ``passed``.
    """
    steps = entry.get("steps")
    if steps:
        return steps.get("validation") or {"gate_passed": steps.get("passed")}, RUN_SOURCE
    return entry.get("latency", {}), BUNDLE_SOURCE


def export_steps(bundle_dir: Path, threads: int, repair: bool) -> dict[str, Any]:
    """The full reference flow on a copy (the shipped bundle is not touched)."""
    from edge_runtime.bundle import Bundle
    from edge_runtime.errors import AccuracyGateError
    from export.bundle_write import write_bundle
    from export.cli import calibration_method, export_reference, failed_report_path

    b = Bundle.load(bundle_dir)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        copy = Path(tmp) / b.name
        copy.mkdir()
        fp32 = b.artifact("fp32").file
        shutil.copyfile(b.file(fp32), copy / fp32)
        manifest = {k: v for k, v in b.manifest.items() if k not in ("calibration", "validation")}
        manifest["artifacts"] = [a for a in manifest["artifacts"] if a["precision"] == "fp32" and a["kind"] == "onnx"]
        write_bundle(copy, manifest)
        t = time.perf_counter()
        try:
            res = export_reference(copy, method=calibration_method(b.manifest), threads=threads, repair=repair,
                                   progress=False)
        except AccuracyGateError as exc:
            out = {"passed": False, "error": str(exc).splitlines()[0], "total_s": round(time.perf_counter() - t, 2),
                   "times_s": {}}
            # export_reference leaves the failed report there; only this run's counts.
            failed = failed_report_path(b.name)
            if failed.is_file() and failed.stat().st_mtime >= started:
                out["validation"] = gate_summary(json.loads(failed.read_text()))
            return out
        total = time.perf_counter() - t
        validation = gate_summary(json.loads((copy / "validation.json").read_text()))
        # The timing is of the shipped files; the verdict is this export's: say whether they are the same files.
        same = {f: (copy / f).is_file() and b.file(f).is_file() and _sha256(copy / f) == _sha256(b.file(f))
                for f in ("int8.onnx", "int8_cpu.onnx") if b.file(f).is_file()}
    return {"times_s": res["times_s"], "total_s": round(total, 2), "passed": res["passed"],
            "nodes_in_float": res["nodes_in_float"], "validation": validation, "same_as_timed": same}


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def table(results: dict[str, Any]) -> str:
    extra = list(results.get("extra", {}))
    lines = [f"{'model':<16}" + "".join(f"{(c + ' p50/p99'):>18}" for c in COLUMNS) + f"{'int8 x':>8}"
             + f"{'int8_cpu x':>11}" + "".join(f"{(e + ' x'):>14}" for e in extra)
             + "  gate  load avg (1 min) before/after"]
    for name, r in results["models"].items():
        lat = r["latency"]
        cells = [f"{lat[p]['p50_ms']:.2f}/{lat[p]['p99_ms']:.2f}" if p in lat else "-" for p in COLUMNS]
        verdict, source = gate_view(r)
        gate = {True: "pass", False: "FAIL", None: "?"}[verdict.get("gate_passed")]
        if verdict.get("gate_passed") is False:
            gate += "(" + ",".join(k for k, ok in (verdict.get("gate") or {}).items() if not ok) + ")"
        gate += "*" if source == BUNDLE_SOURCE else ""
        speedups = "".join(f"{lat.get(f'{k}_speedup_p50', float('nan')):>{w}.2f}"
                           for k, w in (("int8", 8), ("int8_cpu", 11), *((e, 14) for e in extra)))
        load = f"{lat['loadavg_before'][0]:.2f}/{lat['loadavg_after'][0]:.2f}"
        lines.append(f"{name:<16}" + "".join(f"{c:>18}" for c in cells) + speedups + f"  {gate}  {load}")
    lines.append("(ms per frame, ONNX Runtime CPU, interleaved runs; x = FP32 p50 / p50; int8 = int8.onnx, the "
                 f"TensorRT form; int8_cpu = int8_cpu.onnx, the onnxruntime-cpu form; gate: {RUN_SOURCE}, "
                 f"* = {BUNDLE_SOURCE} (export steps skipped))")
    for name, r in results["models"].items():
        if "steps" in r:
            s = r["steps"]
            lines.append(f"{name}: export {s['total_s']:.1f} s: "
                         + ", ".join(f"{k} {v:.2f}" for k, v in s["times_s"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default="out/bench/export.json")
    ap.add_argument("--models", help="comma-separated bundle names (default: all under edge_runtime/models)")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spinning", choices=("off", "run", "always"), default="off",
                    help="ONNX Runtime intra-op spinning (default: the runtime's default, off)")
    ap.add_argument("--skip-steps", action="store_true", help="latency only (no export-step timing)")
    ap.add_argument("--repair", action="store_true", help="export steps with --repair when the gate fails")
    ap.add_argument("--extra", action="append", default=[], metavar="LABEL=PATH",
                    help="another INT8 file to time in the same loop ({model} = bundle name); repeatable")
    args = ap.parse_args(argv)
    extra = dict(e.split("=", 1) for e in args.extra)
    if any(k in COLUMNS or not k for k in extra):
        ap.error(f"--extra labels must be non-empty and differ from {COLUMNS}")
    import onnxruntime

    pinned = pin_malloc_thresholds()  # every contender in this process sees the same allocator
    names = args.models.split(",") if args.models else sorted(p.parent.name for p in MODELS.glob("*/manifest.json"))
    results: dict[str, Any] = {"cpu": cpu_info(), "onnxruntime": onnxruntime.__version__, "extra": extra,
                               "malloc_thresholds_pinned": pinned,
                               "models": {}}
    for name in names:
        print(f"[{name}] latency ...", file=sys.stderr, flush=True)
        entry: dict[str, Any] = {"latency": latency(MODELS / name, args.runs, args.threads, extra, args.spinning)}
        if not args.skip_steps:
            print(f"[{name}] export steps ...", file=sys.stderr, flush=True)
            entry["steps"] = export_steps(MODELS / name, args.threads, args.repair)
        results["models"][name] = entry
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
