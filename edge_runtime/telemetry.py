"""Latency telemetry the way Holoscan does it: per-stage stamps carried with each frame.

Every frame carries ``stamps`` (stage -> CLOCK_MONOTONIC ns): capture, source_send, worker_recv,
preprocess, infer, postprocess, result_send, sink_recv. A stage's duration is its stamp minus the
previous stamp that is present (a processor that does not stamp preprocess/infer/postprocess makes
``result_send`` cover the whole worker). Monotonic clocks are comparable between processes on one
host, not between hosts.

``Stats`` aggregates results into fps, p50/p99/max per stage and end to end (capture -> sink_recv),
the worst frame's seq, drops by cause, and the backend/precision in use.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

STAGES = ("capture", "source_send", "worker_recv", "preprocess", "infer", "postprocess", "result_send",
          "sink_recv")


def stage_durations_ms(stamps: Mapping[str, int]) -> dict[str, float]:
    """Duration of each present stage since the previous present stage, in ms."""
    out: dict[str, float] = {}
    prev: int | None = None
    for stage in STAGES:
        t = stamps.get(stage)
        if t is None:
            continue
        if prev is not None:
            out[stage] = (t - prev) / 1e6
        prev = t
    return out


def end_to_end_ms(stamps: Mapping[str, int]) -> float | None:
    if "capture" in stamps and "sink_recv" in stamps:
        return (stamps["sink_recv"] - stamps["capture"]) / 1e6
    return None


def frame_age_ms(stamps: Mapping[str, int]) -> float | None:
    """How old a frame was when a worker started on it (capture -> worker_recv)."""
    if "capture" in stamps and "worker_recv" in stamps:
        return (stamps["worker_recv"] - stamps["capture"]) / 1e6
    return None


def summarize(values: Any) -> dict[str, float]:
    a = np.fromiter(values, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"n": int(a.size), "mean": round(float(a.mean()), 3), "p50": round(float(p50), 3),
            "p90": round(float(p90), 3), "p99": round(float(p99), 3), "max": round(float(a.max()), 3)}


JTOP_SOCKET = Path("/run/jtop.sock")  # where the jetson-stats service listens on a Jetson


def jtop_health(stats: Mapping[str, Any]) -> dict[str, float]:
    """The numeric readings we keep from jetson-stats' ``jtop.stats`` (keys as jetson-stats 4.x-7.x
    writes them): GPU load %, EMC (memory bandwidth) %, RAM used %, board power in W, hottest sensor.
    Entries a board lacks or reports as "OFF" are left out."""

    def num(value: Any) -> float | None:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    out: dict[str, float] = {}
    for key, name, scale in (("GPU", "gpu_load_pct", 1.0), ("EMC", "emc_pct", 1.0), ("RAM", "ram_used_pct", 100.0),
                             ("Power TOT", "power_w", 1e-3)):  # RAM is a fraction, power in mW
        v = num(stats.get(key))
        if v is not None:
            out[name] = round(v * scale, 2)
    # jtop reports an offline sensor as -256 C
    temps = [t for k, v in stats.items() if k.startswith("Temp ") and (t := num(v)) is not None and t > -100]
    if temps:
        out["temp_c_max"] = round(max(temps), 1)
    return out


class JetsonStats:
    """Health readings from jetson-stats (``pip install jetson-stats``, its jtop service running).

    jtop's client connects to the service's socket and keeps a thread of its own, so one client is
    opened on first use and kept until ``close`` (or exit). Connecting can take seconds, and the hub
    reads health while it holds its lock, so the connection is made on a thread of its own: readings
    appear from the first read after it. Package missing, service down or a client error: the reader
    logs once and switches itself off; health then falls back to the load average and thermal zones.
    """

    def __init__(self, factory: Any = None, socket: Path = JTOP_SOCKET) -> None:
        self._factory = factory
        self._socket = socket
        self._client: Any = None
        self._connecting: threading.Thread | None = None
        self.off = False

    def available(self) -> bool:
        return not self.off and (self._client is not None or self._socket.exists())

    def read(self) -> dict[str, float]:
        if not self.available():
            return {}
        client = self._client
        if client is None:
            if self._connecting is None:
                self._connecting = threading.Thread(target=self._connect, daemon=True, name="jtop-connect")
                self._connecting.start()
            return {}
        try:
            return jtop_health(client.stats)
        except Exception as exc:  # noqa: BLE001 - a health reading must never stop the pipeline
            self._switch_off(exc)
            return {}

    def wait_connected(self, timeout: float) -> bool:
        """Block until the connection attempt ended (tests, tools); True when readings flow."""
        if self._connecting is not None:
            self._connecting.join(timeout)
        return self._client is not None

    def _connect(self) -> None:
        try:
            factory = self._factory
            if factory is None:
                import jtop  # optional: the `jetson` extra

                factory = jtop.jtop
            client = factory(interval=1.0)
            client.start()  # raises when the service does not answer
        except Exception as exc:  # noqa: BLE001 - package, service or client: readings off, pipeline on
            self._switch_off(exc)
            return
        self._client = client
        atexit.register(self.close)

    def _switch_off(self, exc: Exception) -> None:
        log.warning("jetson-stats readings switched off (%s: %s)", type(exc).__name__, exc)
        self.close()
        self.off = True

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as exc:  # noqa: BLE001 - closing a dead client
                log.debug("closing the jtop client: %s", exc)


_JETSON = JetsonStats()


def device_health(jetson: JetsonStats | None = None, thermal: Path = Path("/sys/class/thermal")) -> dict[str, float]:
    """Cheap health readings: 1-min load and the hottest thermal zone (Jetson and most Linux boxes),
    plus GPU load, EMC, RAM, board power and jtop's temperatures where jetson-stats runs."""
    health: dict[str, float] = {}
    try:
        health["load1"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    temps = []
    for zone in thermal.glob("thermal_zone*/temp"):
        try:
            # L4T 32 (Nano, TX2, Xavier) has a PMIC-Die zone that always reads 100 C, a placeholder;
            # an offline zone reads -256 C.
            if (zone.parent / "type").read_text().strip() == "PMIC-Die":
                continue
            celsius = int(zone.read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue
        if celsius > -100:
            temps.append(celsius)
    if temps:
        health["temp_c_max"] = round(max(temps), 1)
    health.update((jetson or _JETSON).read())
    return health


MAX_TIMING_KEYS = 64  # distinct timings_ms names kept (per-model stages: a few per bundle)
MAX_COUNTER_KEYS = 64  # entries of one node's drops / rejected / transport map


class Stats:
    """Aggregates results and drop counters; ``snapshot()`` is the stats message body.

    Keeps the last ``window`` samples per stage (percentiles over thousands of frames, bounded memory).
    Drop and reject counters are cumulative per reporting node and summed in the snapshot, so a
    node that restarts (a new identity) adds to the totals instead of resetting them.
    """

    def __init__(self, window: int = 20000) -> None:
        self.window = window
        self.stages: dict[str, deque[float]] = {s: deque(maxlen=window) for s in STAGES[1:]}
        self.e2e: deque[tuple[float, str, int]] = deque(maxlen=window)  # (ms, stream, seq)
        self.age: deque[float] = deque(maxlen=window)
        self.timings: dict[str, deque[float]] = {}
        self.results = 0
        self.started = time.monotonic()
        self._last_snapshot = (self.started, 0)
        self.local_drops: Counter[str] = Counter()
        self.node_counters: dict[str, dict[str, Counter[str]]] = {}
        self.retired: dict[str, Counter[str]] = {}  # by kind: counts of earlier incarnations of a node name
        self.worst: tuple[float, str, int] | None = None
        self.backend = ""
        self.precision = ""
        self.model = ""

    def add(self, stream: str, seq: int, stamps: Mapping[str, int], timings_ms: Mapping[str, float] | None = None,
            provenance: Mapping[str, str] | None = None) -> None:
        self.results += 1
        for stage, ms in stage_durations_ms(stamps).items():
            self.stages[stage].append(ms)
        e2e = end_to_end_ms(stamps)
        if e2e is not None:
            self.e2e.append((e2e, stream, seq))
            if self.worst is None or e2e > self.worst[0]:
                self.worst = (e2e, stream, seq)
        age = frame_age_ms(stamps)
        if age is not None:
            self.age.append(age)
        for name, ms in (timings_ms or {}).items():
            if name not in self.timings and len(self.timings) >= MAX_TIMING_KEYS:
                continue  # results naming ever new stages would grow this (and the stats header) forever
            self.timings.setdefault(name, deque(maxlen=self.window)).append(float(ms))
        if provenance:
            self.backend = provenance.get("backend", self.backend)
            self.precision = provenance.get("precision", self.precision)
            self.model = provenance.get("model", self.model)

    def count_drop(self, cause: str, n: int = 1) -> None:
        self.local_drops[cause] += n

    def set_node_counters(self, node: str, kind: str, counters: Mapping[str, int]) -> None:
        """Replace one node's cumulative counters of one kind (drops / rejected / transport).
        ValueError for more than MAX_COUNTER_KEYS entries (docs/PROTOCOL.md: at most 64 a map)."""
        if len(counters) > MAX_COUNTER_KEYS:
            raise ValueError(f"{len(counters)} {kind} counters (at most {MAX_COUNTER_KEYS})")
        self.node_counters.setdefault(node, {})[kind] = Counter({str(k): int(v) for k, v in counters.items()})

    def retire_node(self, node: str) -> None:
        """A node that is gone (a dead incarnation, or one whose name a restarted node now reports under):
        its counters move into the totals of earlier ones."""
        for kind, counters in self.node_counters.pop(node, {}).items():
            self.retired.setdefault(kind, Counter()).update(counters)

    def totals(self, kind: str) -> dict[str, int]:
        total: Counter[str] = Counter(self.retired.get(kind, Counter()))
        for counters in self.node_counters.values():
            total.update(counters.get(kind, Counter()))
        if kind == "drops":
            total.update(self.local_drops)
        return dict(sorted(total.items()))

    def e2e_ms(self) -> list[float]:
        return [ms for ms, _, _ in self.e2e]

    def snapshot(self, advance: bool = True, recent: int | None = None) -> dict[str, Any]:
        """The stats message body; ``fps`` covers the time since the last advancing snapshot.

        ``recent``: percentiles over the last ``recent`` results only (the hub's live stats, once a
        second: over the whole window of 20000 they took 33 ms on a 2-core Zen 3, a stall of the hub's
        receive loop that every result arriving meanwhile paid); None: the whole window (reports).
        """
        def last(values: deque[Any]) -> Iterable[Any]:  # order does not matter to a percentile
            return values if recent is None else islice(reversed(values), recent)

        now = time.monotonic()
        last_t, last_n = self._last_snapshot
        if advance:
            self._last_snapshot = (now, self.results)
        elapsed = max(now - self.started, 1e-9)
        worst = None if self.worst is None else {"ms": round(self.worst[0], 3), "stream": self.worst[1],
                                                 "seq": self.worst[2]}
        return {
            "results": self.results,
            "fps": round((self.results - last_n) / max(now - last_t, 1e-9), 2),
            "fps_avg": round(self.results / elapsed, 2),
            "elapsed_s": round(elapsed, 3),
            "summary_of": "all results in the window" if recent is None else f"the last {recent} results",
            "stages_ms": {s: summarize(last(v)) for s, v in self.stages.items() if v},
            "e2e_ms": summarize(ms for ms, _, _ in last(self.e2e)),
            "age_at_worker_ms": summarize(last(self.age)),
            "timings_ms": {k: summarize(last(v)) for k, v in self.timings.items()},
            "worst": worst,
            "drops": self.totals("drops"),
            "rejected": self.totals("rejected"),
            "transport": self.totals("transport"),
            "backend": self.backend,
            "precision": self.precision,
            "model": self.model,
            "health": device_health(),
        }


def _histogram_png(path: Path, samples: list[float], snapshot: Mapping[str, Any], title: str) -> None:
    """Latency distribution: matplotlib when importable, else an OpenCV drawing."""
    from .outputs import write_file, write_image
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        have_matplotlib = True
    except ImportError:
        have_matplotlib = False
    e2e = snapshot.get("e2e_ms", {})
    if have_matplotlib:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ax1.hist(samples or [0.0], bins=60, color="#3b7dd8")
        for key, style in (("p50", "--"), ("p99", ":")):
            if key in e2e:
                ax1.axvline(e2e[key], color="k", linestyle=style, label=f"{key} {e2e[key]:.1f} ms")
        ax1.set_xlabel("capture -> sink latency (ms)")
        ax1.set_ylabel("frames")
        if e2e.get("n"):  # no results: no percentile lines, and matplotlib warns of an empty legend
            ax1.legend()
        stages = snapshot.get("stages_ms", {})
        names = [s for s in STAGES[1:] if s in stages]
        xs = np.arange(len(names))
        ax2.bar(xs - 0.2, [stages[n]["p50"] for n in names], 0.4, label="p50")
        ax2.bar(xs + 0.2, [stages[n]["p99"] for n in names], 0.4, label="p99")
        ax2.set_xticks(xs, names, rotation=30, ha="right")
        ax2.set_ylabel("ms")
        if names:
            ax2.legend()
        fig.suptitle(title)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        write_file(path, png.getvalue())
        return
    import cv2

    img = np.full((400, 700, 3), 255, np.uint8)
    if samples:
        counts, edges = np.histogram(samples, bins=60)
        scale = 330 / max(int(counts.max()), 1)
        for i, c in enumerate(counts):
            x0 = 40 + i * 10
            cv2.rectangle(img, (x0, 360 - int(c * scale)), (x0 + 8, 360), (216, 125, 59), -1)
        cv2.putText(img, f"{edges[0]:.1f} ms", (40, 385), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
        cv2.putText(img, f"{edges[-1]:.1f} ms", (600, 385), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    label = f"{title}  p50 {e2e.get('p50', 0):.1f}  p99 {e2e.get('p99', 0):.1f}  max {e2e.get('max', 0):.1f} ms"
    cv2.putText(img, label, (10, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    write_image(path, img)


def write_latency_report(stats: Stats, out_dir: str | os.PathLike, name: str = "latency",
                         title: str = "edge-runtime latency", extra: Mapping[str, Any] | None = None
                         ) -> tuple[Path, Path]:
    """Write ``NAME.json`` (snapshot + histogram) and ``NAME.png`` (distribution) into ``out_dir``."""
    from .outputs import write_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    snap = stats.snapshot(advance=False)
    samples = stats.e2e_ms()
    counts, edges = np.histogram(samples, bins=50) if samples else (np.zeros(0), np.zeros(0))
    report = {**snap, "histogram_e2e_ms": {"counts": counts.astype(int).tolist(),
                                          "edges": [round(float(e), 3) for e in edges]}, **(extra or {})}
    json_path = out / f"{name}.json"
    write_file(json_path, json.dumps(report, indent=2, default=str).encode())  # never through a planted link
    png_path = out / f"{name}.png"
    _histogram_png(png_path, samples, snap, title)
    return json_path, png_path
