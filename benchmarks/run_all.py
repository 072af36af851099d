"""Run every benchmark and regenerate this machine's results page from their JSON.

    edge-runtime bench [--only transport,runtime,export,export_1t,export_spin,stream] [--stream-seconds 600] [--render-only]

Each benchmark runs as its own process (a quiet interpreter, no state shared with the others) and
writes JSON under out/bench/; the page is rendered from those files only, so every figure in it
comes from a measurement on this machine, with the machine's load recorded beside it.

One page per machine: benchmarks/results/<machine>.md, named after the CPU model and its int8 class
(VNNI or not: INT8 speed and even INT8 results differ between the two, see edge_runtime.devices),
so that a run on another machine adds a page instead of overwriting the figures of the last one.
benchmarks/RESULTS.md is the index of those pages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out" / "bench"
INDEX = ROOT / "benchmarks" / "RESULTS.md"
PAGES = ROOT / "benchmarks" / "results"


def use_base(base: Path) -> None:
    """Write the JSON, pages and index under ``base`` (benchmarks/results/, benchmarks/RESULTS.md, out/bench/):
    by default the checkout; from an installed package the working directory, not site-packages."""
    global OUT, INDEX, PAGES
    OUT, INDEX, PAGES = base / "out" / "bench", base / "benchmarks" / "RESULTS.md", base / "benchmarks" / "results"


def default_base() -> Path:
    return ROOT if (ROOT / ".git").exists() else Path.cwd()
# The issues' targets; every verdict on a page is computed from its JSON with these.
OVERHEAD_TARGET = 0.15  # pre + post + bookkeeping over backend.infer
INT8_TARGET = 1.5  # INT8 CPU p50 speed-up over FP32, gate passing
HOP_TARGET = 1.2  # our one-way hop p50 over bare pyzmq's
SHM_TARGET = 3.0  # shared-memory throughput over imagezmq's REQ/REP
STREAM_P99_TARGET_MS = 50.0  # 30 fps capture -> sink p99
BENCHES = {  # name -> (module, extra args)
    "transport": ("benchmarks.bench_transport", ["--frames", "1000"]),
    "runtime": ("benchmarks.bench_runtime", ["--frames", "1000"]),
    "export": ("benchmarks.bench_export", ["--repair"]),
    "export_1t": ("benchmarks.bench_export", ["--threads", "1", "--skip-steps"]),
    "export_spin": ("benchmarks.bench_export", ["--threads", "2", "--spinning", "run", "--skip-steps"]),
    "stream": ("benchmarks.bench_stream", []),
    "infer": ("benchmarks.bench_infer", ["--frames", "60", "--rounds", "6"]),
}


def _cpu_model() -> str:
    from edge_runtime.devices import cpu_int8

    return cpu_int8().model or platform.processor() or platform.machine()


def _cpu_name() -> str:
    """The CPU model, with its family where the model names no number (edge_runtime.devices.cpu_name)."""
    from edge_runtime.devices import cpu_name

    return cpu_name(model=_cpu_model()) or _cpu_model()


def machine_slug() -> str:
    """The page name for this machine, e.g. ``amd-epyc-family-25-no-vnni`` or ``intel-xeon-processor-vnni``."""
    from edge_runtime.devices import X86, cpu_int8

    words = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$", " ", _cpu_name().lower())
    base = "-".join(re.findall(r"[a-z0-9]+", words)) or platform.machine()
    cpu = cpu_int8()
    return f"{base}-{'vnni' if cpu.dot_flags else 'no-vnni'}" if cpu.machine.lower() in X86 else base


def results_page() -> Path:
    return PAGES / f"{machine_slug()}.md"


def data_dir() -> Path:
    """This machine's benchmark JSON, committed next to its page: a run of some benchmarks (--only)
    re-renders the others' sections from their last measurement on this machine instead of losing them."""
    return PAGES / machine_slug()


def _load(name: str) -> dict[str, Any] | None:
    p = data_dir() / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _f(v: Any, nd: int = 2) -> str:
    return f"{v:.{nd}f}" if isinstance(v, (int, float)) else str(v)


def _load_span(lat: dict[str, Any]) -> str:
    """1-minute load average before -> after a model's export timing."""
    return f"{_f(lat['loadavg_before'][0])} -> {_f(lat['loadavg_after'][0])}" if "loadavg_before" in lat else "?"


def render_transport(d: dict[str, Any]) -> list[str]:
    lines = [(f"Frames: {d['frame']['shape'][0]}x{d['frame']['shape'][1]} {d['frame']['dtype']} "
             f"({d['frame']['mib']} MiB). Load average {d['machine']['load1_at_start']} -> "
             f"{d['machine']['load1_at_end']}."), "",
             "| hop (one way) | ours p50 / p99 (us) | bare pyzmq p50 / p99 (us) | ratio p50 | target |",
             "|---|---|---|---|---|"]
    for key in ("hop_ipc", "hop_tcp"):
        h = d[key]
        o, b = h["ours"]["one_way"], h["bare"]["one_way"]
        ok = "met" if o["p50"] / b["p50"] <= HOP_TARGET else "MISSED"  # unrounded: 1.2004 is a miss
        lines.append(f"| {h['endpoint']} | {_f(o['p50'], 0)} / {_f(o['p99'], 0)} | {_f(b['p50'], 0)} / "
                     f"{_f(b['p99'], 0)} | {_f(o['p50'] / b['p50'], 3)} | <= {HOP_TARGET}: {ok} |")
    lines += ["", ("Throughput: each of our runs is paired with an imagezmq run just before or after it (in turns; "
                   "rounds rotate); "
                   "median over the rounds, min-max in brackets. Every frame of ours is validated and delivered. "
                   "`ours_transport_*`: our protocol alone, one sender to one receiver process, as imagezmq's "
                   "sender to its hub (`_shm`: pixels through the shared-memory ring, `--shared-memory`); "
                   "`ours_process_*` / `ours_thread_*`: the whole pipeline, source -> worker (model thread) -> hub."),
              "", "| throughput | fps | x imagezmq REQ/REP (same round) | target |", "|---|---|---|---|"]
    for key, t in d["throughput"].items():
        fps = f"{_f(t['fps'], 0)} ({_f(t.get('fps_min', t['fps']), 0)}-{_f(t.get('fps_max', t['fps']), 0)})"
        x = f"{t['x_imagezmq']} ({t.get('x_imagezmq_min', t['x_imagezmq'])}-{t.get('x_imagezmq_max', t['x_imagezmq'])})"
        # the shared-memory transport's target (median over the rounds); the other rows have none
        target = (f">= {SHM_TARGET}x: {'met' if t['x_imagezmq'] >= SHM_TARGET else 'MISSED'}"
                  if key.startswith("ours_transport_") and "_shm" in key else "")
        lines.append(f"| {key} | {fps} | {x} | {target} |")
    hc = d["header_cost"]
    lines += ["", (f"Header: {hc['header_bytes']} bytes JSON; encode p50 {_f(hc['encode']['p50'], 1)} us, "
              f"decode + validate p50 {_f(hc['decode_validate']['p50'], 1)} us, vs one copy of the pixels "
              f"{_f(hc['pixel_copy_for_scale']['p50'], 1)} us.")]
    return lines


def _aa_noise(d: dict[str, Any]) -> float | None:
    """This run's A/A spread at p50 (``ours`` against ``ours, spinning off`` when the config's spinning is
    off: the same settings twice), the largest over the models; None where the run has no A/A pair."""
    if d.get("config_spinning") != "off":
        return None
    ratios = [r["wall_ms"]["ours_fp32_nospin"]["p50"] / r["wall_ms"]["ours_fp32"]["p50"]
              for r in d["models"].values() if {"ours_fp32", "ours_fp32_nospin"} <= set(r["wall_ms"])]
    return max((abs(x - 1.0) for x in ratios), default=None)


def faster_verdict(ratio: float, noise: float | None) -> str:
    """The target says ours must be faster than the peer: met only above 1 by more than the A/A noise."""
    margin = noise or 0.0
    if ratio > 1.0 + margin:
        return "met"
    if ratio < 1.0 - margin:
        return "MISSED (slower)"
    return f"MISSED (parity within the A/A noise of {100 * margin:.1f}%)"


def render_runtime(d: dict[str, Any]) -> list[str]:
    m = d["machine"]
    threads = m["threads"] if isinstance(m["threads"], str) else f"{m['threads']} threads"
    lines = [(f"{d['frames']} frames per model after warm-up, {threads}, onnxruntime "
             f"{m['onnxruntime']}, OpenCV {m['opencv']}; load average {_f(m['load_avg_start'])} -> "
             f"{_f(m['load_avg_end'])}. Wall time per frame (ms, p50 / p99), all FP32 unless named; a p99 of "
             f"{d['frames']} frames rests on its {max(1, d['frames'] // 100)} slowest."), "",
             ("`ours` runs with the cpu-x86 config (ONNX Runtime intra-op spinning "
             f"{d.get('config_spinning', '?')}); `ours, spinning on` uses the session settings of the plain "
             "InferenceSession (ONNX Runtime's defaults), so that column isolates our pre/post-processing; "
             "`spinning during run` spins while a run is in progress and stops when it returns "
             "(session.force_spinning_stop)."
             + (" glibc malloc thresholds pinned for the whole run (edge_runtime.heap), so the hand-written "
                "peers' per-frame arrays do not pay page faults on every call." if m.get("malloc_thresholds_pinned")
                else "")), "",
             ("| model | ours | ours, spinning on | ours, spinning off | ours, spinning during run | plain ORT + numpy "
             "| OpenCV DNN | ours INT8 | overhead / infer (target <= 15%) | overhead, spinning on |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in d["models"].items():
        w = r["wall_ms"]

        def cell(k: str, w: dict[str, Any] = w) -> str:
            return f"{_f(w[k]['p50'])} / {_f(w[k]['p99'])}" if k in w else "n/a"

        def over(frac: float | None) -> str:
            return "n/a" if frac is None else f"{100 * frac:.1f}% ({'met' if frac <= OVERHEAD_TARGET else 'MISSED'})"

        spin_over = (r.get("overhead_by_config") or {}).get("ours_fp32_spin")
        lines.append(f"| {name} | {cell('ours_fp32')} | {cell('ours_fp32_spin')} | {cell('ours_fp32_nospin')} | "
                     f"{cell('ours_fp32_run')} | {cell('plain_ort_fp32')} | {cell('opencv_dnn_fp32')} | "
                     f"{cell('ours_int8')} | {over(r['overhead_fraction_of_infer'])} | {over(spin_over)} |")
    lines += ["", ("Overhead = (pre + post + bookkeeping) p50 / backend.infer p50 of the same configuration; with "
                   "spinning off ONNX Runtime's thread wake-ups count in infer, which lowers the ratio, so the "
                   "spinning-on column is the stricter one.")]
    agreement = {(name, peer): a for name, r in d["models"].items() for peer, a in (r.get("agreement") or {}).items()}
    if agreement:
        bad = [f"{peer} on {name}" for (name, peer), a in agreement.items() if not a["all_agree"]]
        lines += ["", ("Outputs checked on 4 frames before timing (enhancement within 1 stored level, detections "
                       "the same count, scores within 0.01, boxes within 1 px): "
                       + ("every peer gave ours." if not bad else f"**differ: {', '.join(bad)}** (timing not like for like).")
                       )]
    same = d.get("config_spinning") == "off"  # then `ours` and `ours, spinning off` are one configuration
    noise = _aa_noise(d)
    lines += ["", ("Peer p50 / ours p50 (above 1: ours faster; target: ours, as shipped, faster than both peers on "
                   "the same model: met only above 1 by more than this run's A/A spread"
                   + (f", {100 * noise:.1f}%" if noise is not None else "") + "). "
                   + ("`ours` and `ours, spinning off` run the same settings here, so their ratio "
                      "is this run's noise floor (A/A)." if same else "")), "",
              "| model | plain / ours | plain / ours spinning on | OpenCV DNN / ours | OpenCV DNN / ours spinning on "
              + ("| A/A: ours spinning off / ours " if same else "") + "| faster than plain | faster than OpenCV DNN |",
              "|---|---|---|---|---|" + ("---|" if same else "") + "---|---|"]
    for name, r in d["models"].items():
        w = r["wall_ms"]

        def ratio(a: str, b: str, w: dict[str, Any] = w) -> str:
            return _f(w[a]["p50"] / w[b]["p50"]) if a in w and b in w else "n/a"

        def verdict(peer: str, w: dict[str, Any] = w) -> str:
            return faster_verdict(w[peer]["p50"] / w["ours_fp32"]["p50"], noise) if peer in w else "n/a"

        lines.append(f"| {name} | {ratio('plain_ort_fp32', 'ours_fp32')} | {ratio('plain_ort_fp32', 'ours_fp32_spin')} "
                     f"| {ratio('opencv_dnn_fp32', 'ours_fp32')} | {ratio('opencv_dnn_fp32', 'ours_fp32_spin')} |"
                     + (f" {ratio('ours_fp32_nospin', 'ours_fp32')} |" if same else "")
                     + f" {verdict('plain_ort_fp32')} | {verdict('opencv_dnn_fp32')} |")
    return lines


EMULATED_NOTE = ("emulated: the file's 8-bit int8 weights would saturate this CPU's int8 kernels (x86 without VNNI), "
                 "so ONNX Runtime runs its Q/DQ emulated in float (exact, not a speed figure)")


def _cells(lat: dict[str, Any], columns: tuple[str, ...], p99: bool) -> list[str]:
    out = []
    for p in columns:
        if p not in lat:
            out.append("n/a")
            continue
        cell = f"{_f(lat[p]['p50_ms'])} / {_f(lat[p]['p99_ms'])}" if p99 else _f(lat[p]["p50_ms"])
        out.append(cell + (" (emulated)" if p in lat.get("emulated", ()) else ""))
    return out


def _speedups(lat: dict[str, Any], gate_passed: bool | None = None) -> str:
    """INT8 / INT8 CPU speed-ups over FP32; "emulated" where the file ran emulated (no speed figure);
    then the target verdict on what the runtime runs on a CPU device (INT8 CPU >= 1.5x FP32, with the
    accuracy gate passing when ``gate_passed`` is given)."""
    text = " / ".join("emulated" if k in lat.get("emulated", ()) else _f(lat.get(f"{k}_speedup_p50"))
                      for k in ("int8", "int8_cpu"))
    cpu = lat.get("int8_cpu_speedup_p50")
    if not isinstance(cpu, (int, float)) or "int8_cpu" in lat.get("emulated", ()):
        return text
    ok = cpu >= INT8_TARGET and gate_passed is not False
    return f"{text} (>= {INT8_TARGET}x{' with the gate' if gate_passed is not None else ''}: {'met' if ok else 'MISSED'})"


def _emulated_note(d: dict[str, Any]) -> list[str]:
    return [f"- {EMULATED_NOTE}."] if any(r["latency"].get("emulated") for r in d["models"].values()) else []


def render_export(d: dict[str, Any]) -> list[str]:
    from benchmarks.bench_export import BUNDLE_SOURCE, RUN_SOURCE, gate_view

    lines = [f"ONNX Runtime {d['onnxruntime']} CPU; CPU: {json.dumps(d['cpu'])}.", "",
             ("INT8 (TensorRT form) = int8.onnx (symmetric Q/DQ, runs everywhere); INT8 CPU = int8_cpu.onnx (uint8 "
             "asymmetric activations, ONNX Runtime CPU only: what the runtime runs on CPU devices). Same run, same "
             "frame, interleaved. p99 here is the nearest-rank value of the timed calls (the runtime, transport and "
             "stream sections interpolate: numpy's percentile)."), "",
             ("| model | FP32 p50 / p99 (ms) | FP16 | INT8 (TensorRT form) | INT8 CPU | speed-up INT8 / INT8 CPU (p50) "
             "| accuracy gate | load avg | export flow (s) |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in d["models"].items():
        lat = r["latency"]
        cells = _cells(lat, ("fp32", "fp16", "int8", "int8_cpu"), p99=True)
        verdict, source = gate_view(r)  # this run's export when its steps ran, else the shipped bundle's
        gate = {True: "passed", False: "FAILED", None: "?"}[verdict.get("gate_passed")]
        failed = [k for k, ok in (verdict.get("gate") or {}).items() if not ok]
        if failed:
            gate += f" ({', '.join(failed)})"
        gate += " (this run)" if source == RUN_SOURCE else " (bundle)"
        steps = r.get("steps", {})
        load = _load_span(lat)
        lines.append(f"| {name} | {' | '.join(cells)} | {_speedups(lat, (verdict.get('gate') or {}).get('int8_cpu', verdict.get('gate_passed')))}"
                     f" | {gate} | {load} | {_f(steps.get('total_s'), 1)} |")
    sources = {name: gate_view(r)[1] for name, r in d["models"].items()}
    lines += ["", "Accuracy gate: " + "; ".join(
        f"{src} for {', '.join(n for n, s in sources.items() if s == src)}"
        + (" (export steps ran)" if src == RUN_SOURCE else " (export steps skipped)")
        for src in (RUN_SOURCE, BUNDLE_SOURCE) if src in sources.values()) + ".", ""]
    for name, r in d["models"].items():
        verdict, source = gate_view(r)
        floats = {k: v for k, v in (verdict.get("nodes_in_float") or {}).items() if v}
        if floats:
            lines.append(f"- {name} nodes kept in float by --repair ({source}): "
                         + "; ".join(f"{k}: {', '.join(v)}" for k, v in floats.items()))
    for name, r in d["models"].items():
        same = r.get("steps", {}).get("same_as_timed")
        if same is not None and not all(same.values()):
            lines.append(f"- {name}: this run's export made other INT8 files than the shipped ones timed above "
                         f"({', '.join(f for f, ok in same.items() if not ok)}): the timed files' own verdict is "
                         "their bundle's validation.json.")
        elif same:
            lines.append(f"- {name}: this run's export made the same INT8 files as the shipped ones timed (sha256).")
    for name, r in d["models"].items():
        if r.get("steps", {}).get("times_s"):
            lines.append(f"- {name} export steps (s): "
                         + ", ".join(f"{k} {_f(v)}" for k, v in r["steps"]["times_s"].items()))
    return lines + _emulated_note(d)


def _export_gates() -> dict[str, bool | None]:
    """Each model's INT8 CPU gate verdict from the export section (the same files' accuracy), for the
    sections that only time them."""
    from benchmarks.bench_export import gate_view

    d = _load("export")
    gates: dict[str, bool | None] = {}
    for name, r in (d or {}).get("models", {}).items():
        verdict, _ = gate_view(r)
        gates[name] = (verdict.get("gate") or {}).get("int8_cpu", verdict.get("gate_passed"))
    return gates


def render_export_1t(d: dict[str, Any], note: str = "Same files, same interleaved timing, `--threads 1`.") -> list[str]:
    """The same INT8-vs-FP32 timing with one intra-op thread: a model that has a core to itself, as
    when a 2-core device runs two models or the source and sinks take the other core."""
    gates = _export_gates()
    lines = [note + " The gate verdict is the export section's.", "",
             "| model | FP32 p50 (ms) | INT8 (TensorRT form) | INT8 CPU | speed-up INT8 / INT8 CPU (p50) | load avg |",
             "|---|---|---|---|---|---|"]
    for name, r in d["models"].items():
        lat = r["latency"]
        cells = _cells(lat, ("fp32", "int8", "int8_cpu"), p99=False)
        load = _load_span(lat)
        lines.append(f"| {name} | {' | '.join(cells)} | {_speedups(lat, gates.get(name))}"
                     f" | {load} |")
    emulated = _emulated_note(d)
    return lines + ([""] + emulated if emulated else [])


def _spin_note(d: dict[str, Any]) -> str:
    first: dict[str, Any] = next(iter(d["models"].values()), {})
    lat = first.get("latency", {})
    return (f"Same files, same interleaved timing, {lat.get('threads', '?')} threads, `--spinning "
            f"{lat.get('spinning', '?')}` (run: threads spin while a run is in progress and sleep after it; the "
            "shipped configs keep spinning off, see Runtime above). Not `always`: the idle sessions' threads "
            "would keep spinning while the next file runs.")


def stream_png() -> Path:
    """The stream's latency picture kept beside the page (copied by ``run`` when the stream ran)."""
    return PAGES / "img" / f"{machine_slug()}-stream_latency.png"


def render_stream(d: dict[str, Any]) -> list[str]:
    kept = stream_png()
    picture = ["", f"![latency distribution](img/{kept.name})"] if kept.is_file() else []
    s, g = d["e2e_ms"], d["growth_ms"]
    ok = "met" if s["p99"] < STREAM_P99_TARGET_MS else "MISSED"
    stamp = ("Capture is each frame's scheduled time (start + k / 30 s), so a late source process counts. "
             if d.get("capture_stamp") == "scheduled" else
             "Capture was stamped when the source process emitted the frame (before 2026-12-03 16:00; a late "
             "source process did not count). ")
    return [stamp + (f"{d['seconds']:.0f} s at 30 fps, {d['workers']} worker(s), {d['results']} results "
            f"({d['fps']} fps delivered); load average {_f(d['load_avg']['start'])} -> {_f(d['load_avg']['end'])}."),
            "", "| capture -> sink (ms) | p50 | p99 | max | worst seq |", "|---|---|---|---|---|",
            f"| end to end | {_f(s['p50'])} | {_f(s['p99'])} | {_f(s['max'])} | {(d.get('worst') or {}).get('seq')} |",
            "", (f"p99 target < {STREAM_P99_TARGET_MS} ms: {ok}. Growth (p50 of last tenth - first tenth): "
            f"{g['delta']:+.2f} ms ({g['first_tenth_p50']} -> {g['last_tenth_p50']}"
            + (f", {100 * g['delta'] / g['first_tenth_p50']:+.0f}%" if g.get("first_tenth_p50") else "")
            + "; no threshold is set for it, so no verdict). "
            + f"Drops: {d['drops']}. Restarts: {d['restarts']}." + _accounting(d)),
            *picture]


def _accounting(d: dict[str, Any]) -> str:
    """Frames read = results + drops + what was in flight when the run was stopped."""
    read = d.get("frames_read")
    if not isinstance(read, int) or not read:
        return " (Frames read not recorded by this run.)"
    dropped = sum(v for v in (d.get("drops") or {}).values() if isinstance(v, int))
    rest = read - d["results"] - dropped
    return (f" Frames read {read} = {d['results']} results + {dropped} dropped + {rest} "
            + ("in flight or queued when the run was stopped." if rest >= 0 else "(more results than frames: a bug)."))


def render_infer(d: dict[str, Any]) -> list[str]:
    r, a = d["results"], d["agreement"]
    lines = [(f"A folder of {d['frames']} frames ({d['frame']}) through {d['model']} ({d['precision']}, the same "
              "graph on both sides), every enhanced frame written as a 16-bit PNG, model loading included; rounds "
              f"in random order ({d['rounds']}). `edge-runtime infer` (cpu-x86 config, files written by a thread of "
              "its own) against a sequential loop a user would write (cv2.imread, numpy pre/post, a default "
              "InferenceSession, cv2.imwrite)."), "",
             "| | seconds per folder (median / min / max) | frames/s |", "|---|---|---|"]
    for k, name in (("ours", "`edge-runtime infer`"), ("plain", "plain loop")):
        v = r[k]
        lines.append(f"| {name} | {_f(v['median_s'])} / {_f(v['min_s'])} / {_f(v['max_s'])} | {_f(v['frames_per_s'], 1)} |")
    lines += ["", (f"plain / ours {_f(d['plain_over_ours'])}x (above 1: ours faster). Outputs compared file by file: "
                   f"{a['files']} files, largest difference {a['max_abs_levels']} stored level(s).")]
    return lines


RENDER = {"transport": ("Transport: our protocol vs bare pyzmq vs imagezmq", render_transport),
          "runtime": ("Runtime: ours vs plain ONNX Runtime vs OpenCV DNN", render_runtime),
          "export": ("Export: time per step, INT8 vs FP32 on the CPU", render_export),
          "export_1t": ("INT8 vs FP32 with one intra-op thread", render_export_1t),
          "export_spin": ("INT8 vs FP32 with intra-op spinning during a run", lambda d: render_export_1t(d, _spin_note(d))),
          "stream": ("Streaming: 30 fps 512x512 ultrasound, detection + enhancement", render_stream),
          "infer": ("A folder end to end: `edge-runtime infer` vs a plain loop", render_infer)}


def stamp() -> dict[str, Any]:
    """When, from which code and on how many cores a section was measured (recorded beside its figures):
    the page is one machine's, but --only re-runs a section and keeps the others' older figures."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], check=False, cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"utc": datetime.now(timezone.utc).isoformat(timespec="minutes"), "commit": git("rev-parse", "--short", "HEAD"),
            # the benchmark's own outputs (pages, their JSON) do not make the code "changed"
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results",
                              ":!benchmarks/RESULTS.md")), "cores": os.cpu_count(),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def _stamp_line(d: dict[str, Any]) -> str:
    st = d.get("stamp")
    if not st:
        return "Measured before sections were stamped (no date or commit recorded)."
    return (f"Measured {st['utc']} at commit {st['commit'] or '?'}{' with local changes' if st.get('dirty') else ''}, "
            f"{st['cores']} cores.")


def render() -> str:
    lines = [f"# Benchmark results: {_cpu_name()}", "",
             ("Regenerated by `edge-runtime bench` (benchmarks/run_all.py) from out/bench/*.json; other machines: "
              "[RESULTS.md](../RESULTS.md)."),
             (f"Machine: {_cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}; int8 kernels: "
             f"{_int8_class()}. Rendered {datetime.now(timezone.utc).isoformat(timespec='minutes')}."),
             "No GPU figures: nothing here ran on a GPU or under TensorRT.", ""]
    for name, (title, fn) in RENDER.items():
        d = _load(name)
        lines += [f"## {title}", ""]
        lines += [_stamp_line(d), "", *fn(d)] if d is not None else ["Not run yet."]
        lines.append("")
    return "\n".join(lines)


def _int8_class() -> str:
    from edge_runtime.devices import cpu_int8

    return cpu_int8().describe()


def render_index() -> str:
    """benchmarks/RESULTS.md: one line per machine page (its heading and the line that says when and where)."""
    lines = ["# Benchmark results", "",
             ("One page per machine the benchmarks ran on (`edge-runtime bench` writes the page of the machine it "
              "runs on). Figures from different machines are not comparable with each other; ratios within a "
              "section are measured side by side in one run, and each section says when and at which commit "
              "(sections of one page can come from different runs: `--only` re-runs some). No page has GPU "
              "figures: nothing here ran on a GPU or under TensorRT."), ""]
    for page in sorted(PAGES.glob("*.md")):
        text = page.read_text().splitlines()
        title = text[0].lstrip("# ").removeprefix("Benchmark results: ") if text else page.stem
        when = next((t for t in text if t.startswith("Machine:")), "")
        lines.append(f"- [{title}](results/{page.name}): {when}")
    return "\n".join(lines) + "\n"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset")
    parser.add_argument("--stream-seconds", type=float, default=600.0)
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where benchmarks/results/ and out/bench/ go (default: the checkout; the working "
                             "directory for an installed package)")


def run(args: argparse.Namespace) -> int:
    use_base((args.out_dir or default_base()).resolve())
    if not args.render_only:
        OUT.mkdir(parents=True, exist_ok=True)
        for name in [n.strip() for n in args.only.split(",") if n.strip()]:
            module, extra = BENCHES[name]
            if name == "stream":
                extra = ["--seconds", str(args.stream_seconds)]
            out = str(OUT / f"{name}.json")
            cmd = [sys.executable, "-m", module, *([out] if name.startswith("export") else ["--out", out]), *extra]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)
            data_dir().mkdir(parents=True, exist_ok=True)
            data = json.loads(Path(out).read_text())
            data["stamp"] = stamp()
            (data_dir() / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
            if name == "stream" and (OUT / "stream_latency.png").is_file():  # this run's picture, not an older one
                stream_png().parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(OUT / "stream_latency.png", stream_png())
    page = results_page()
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render())
    INDEX.write_text(render_index())
    print(f"wrote {page} and {INDEX}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure(p)
    sys.exit(run(p.parse_args()))
