"""Supervisor: start source, workers and sinks (threads or processes), restart what dies, stop cleanly.

``run_pipeline(...)`` is the one-call form for Python callers (the demo, benchmarks, tests)::

    if __name__ == "__main__":  # nodes are spawned processes: they import the calling script
        report = run_pipeline(SyntheticSource(count=300, fps=30), BuiltinProcessor("detect"),
                              n_workers=2, mode="process", record_dir="out/run")
        print(report.summary())

The hub (first sink: stats, fan-out to PUB and recorder) runs as a thread in the supervisor's
process in both modes, so the report is assembled where the results were counted.

Restart policy: a worker, recorder or viewer that exits while the pipeline runs is restarted after a
backoff (0.2 s doubling to 5 s, reset once it stayed up 10 s); the gap is an event on the results
channel and in the recorder (``node_exit`` with the exit code, then ``node_restarted`` with the time
down). The source exits 0 at the end of a finite stream (the pipeline then stops) and 3 when the
source itself failed (stop, no restart); any other exit of an endless source (camera, phantom, looped
file) is restarted; a finite one (a file read once) is not: it would start again from its first frame.

Factories cross into spawned processes by multiprocessing's pickling of the node's arguments
(parent to child over a local pipe, trusted); frames and results never do: they use the protocol.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from ..errors import ConfigError, expected
from ..telemetry import Stats, write_latency_report
from . import protocol, security
from .nodes import (
    EXIT_OK,
    EXIT_SOURCE_FAILED,
    Endpoints,
    HubNode,
    NodeSettings,
    ProcessorFactory,
    SourceFactory,
    SourceNode,
    WorkerNode,
    open_socket,
)
from .recorder import RESULTS_FILE, JsonlWriter, RecorderNode, new_run_id
from .security import SecurityConfig
from .viewer import ViewerNode

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- factories for real use


@dataclass(frozen=True)
class SourceSpec:
    """A source factory from a spec string: ``edge_runtime.sources.open_source`` + ``paced``.

    ``synthetic`` or ``synthetic:HxW`` needs no sources module (the built-in moving disc).
    """

    spec: str  # a path is taken too (as text)
    realtime: bool = True
    loop: bool = False
    fps: float = 30.0  # synthetic only
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "spec", os.fspath(self.spec))  # a Path failed in a node: no .split

    def __call__(self) -> Any:
        if self.spec.split(":")[0] == "synthetic":
            from .builtins import SyntheticSource

            _, _, size = self.spec.partition(":")
            try:
                h, w = (int(v) for v in size.split("x")) if size else (256, 256)
            except ValueError as exc:
                raise ConfigError(expected("synthetic or synthetic:HxW", self.spec)) from exc
            return SyntheticSource(count=None if self.loop else 300, shape=(h, w), dtype="uint8",
                                   fps=self.fps if self.realtime else None)()
        from ..sources import open_source, paced  # written elsewhere: imported only when used

        return paced(open_source(self.spec, **dict(self.options)), realtime=self.realtime, loop=self.loop)

    @property
    def finite(self) -> bool:
        """Whether the source ends by itself: a file, folder or DICOM series read once (not looped), or a
        phantom with ``n_frames``. A camera, a phantom without a count and a looped file do not."""
        kind = self.spec.split(":")[0]
        if self.loop or kind == "camera":
            return False
        return kind != "phantom" or dict(self.options).get("n_frames") is not None

    def has_rate(self) -> bool:
        """Whether real time means anything for this source: a camera, a synthetic stream, or a file
        with a frame rate (its own or ``fps=``). A single radiograph or an image folder has none."""
        if self.spec.split(":")[0] in ("synthetic", "camera") or dict(self.options).get("fps"):
            return True
        from ..sources import open_source

        src = open_source(self.spec, **dict(self.options))
        return bool(src.live or src.fps)


@dataclass(frozen=True)
class RuntimeProcessor:
    """A processor factory for model bundles; the models load inside the worker that uses them.

    One bundle gives a ``Runtime``; several (e.g. a detector and an enhancer) a ``RuntimeSet`` that
    routes each frame to the models of its modality. A frozen dataclass, not a closure, so that it
    can be handed to a spawned worker process.
    """

    bundles: tuple[str, ...]
    device: str | None = None
    spinning: str | None = None  # overrides the device config's cpu_spinning (off / run / always)
    gpu: int = 0  # the CUDA device for TensorRT engines (and ONNX Runtime's CUDA provider)

    def __post_init__(self) -> None:
        if isinstance(self.bundles, str) or not self.bundles:
            raise ConfigError(expected("a non-empty tuple of bundle paths", self.bundles))

    def check(self) -> None:
        """Raise the error a worker would meet first (a bundle that is not there or fails verification,
        an unknown device config), here in the supervisor, before workers restart on it in a loop."""
        from ..bundle import Bundle
        from ..runtime import resolve_bundle, resolve_device

        for b in self.bundles:
            Bundle.load(resolve_bundle(b))
        resolve_device(self.device)

    def __call__(self) -> Any:
        from ..runtime import Runtime, RuntimeSet  # written elsewhere: imported only when used

        runtimes = [Runtime(b, device=self.device, spinning=self.spinning, gpu=self.gpu) for b in self.bundles]
        made = runtimes[0] if len(runtimes) == 1 else RuntimeSet(runtimes)
        made.load()
        return made  # the worker calls .process(frame) and, at the end, .close()


# --------------------------------------------------------------------------- configuration + report


@dataclass
class PipelineConfig:
    n_workers: int = 1
    mode: str = "thread"  # "thread": one process, inproc://; "process": one process per node
    transport: str = "auto"  # auto (thread: inproc, process: ipc) | ipc | tcp (loopback, random ports)
    endpoints: Endpoints | None = None  # overrides transport
    public_endpoint: str | None = None  # extra results PUB for integrators (--bind); CURVE off the box
    policy: str = "latest"  # "latest": live, drop superseded frames; "all": replay every frame
    window: int = 1  # frames in flight per worker (1 for latest-frame-wins)
    # Optional same-host payload path for process mode (docs/PROTOCOL.md 3.1): frames travel through
    # a ring of POSIX shared-memory slots, ZeroMQ carries the header and the slot reference. Only
    # with mode "process" over ipc or loopback tcp; shm_slots 0 = n_workers * window + 2.
    shared_memory: bool = False
    shm_slots: int = 0
    record_dir: str | None = None
    video: bool = False
    video_fps: float = 30.0
    view: bool = False  # a viewer node: a window if a display exists, else snapshots to view_dir
    # None: with no display, snapshots go to <record_dir>/view, or ./out/view without a record_dir
    view_dir: str | None = None
    duration_s: float | None = None
    settings: NodeSettings = field(default_factory=NodeSettings)
    restart_backoff_s: tuple[float, float] = (0.2, 5.0)
    stable_after_s: float = 10.0
    max_quick_failures: int = 5  # a node that dies this often in a row, each time soon after start: stop
    frame_timeout_s: float | None = None  # a model call longer than this is a hang: restart the worker
    keep_results: int = 10000
    attach_input: bool | None = None  # send input pixels with results; None: when video or view is on
    work_dir: str | None = None  # where ipc sockets live (default: a fresh temporary directory)
    log_level: int = logging.INFO

    def validate(self) -> None:
        if not isinstance(self.n_workers, int) or not 1 <= self.n_workers <= 64:
            raise ConfigError(expected("workers in 1..64", self.n_workers))
        if self.mode not in ("thread", "process"):
            raise ConfigError(expected("mode 'thread' or 'process'", self.mode))
        if self.transport not in ("auto", "inproc", "ipc", "tcp"):
            raise ConfigError(expected("transport auto, inproc, ipc or tcp", self.transport))
        if self.transport == "inproc" and self.mode == "process":
            raise ConfigError(expected("ipc or tcp between processes", "inproc"))
        if self.policy not in ("latest", "all"):
            raise ConfigError(expected("policy 'latest' or 'all'", self.policy))
        if not 1 <= self.window <= 64 or (self.policy == "latest" and self.window != 1):
            raise ConfigError(expected("window 1 with policy 'latest' (more would queue stale frames), "
                                       "1..64 with 'all'", self.window))
        if self.shared_memory:
            if self.mode != "process":
                raise ConfigError(expected("shared_memory with mode 'process' (threads share memory already)",
                                           self.mode))
            frames = self.endpoints.frames if self.endpoints is not None else (
                "tcp://127.0.0.1" if self.transport == "tcp" else "ipc://")
            host = frames.split("://", 1)[-1].rsplit(":", 1)[0]
            if not (frames.startswith("ipc://") or host in ("127.0.0.1", "localhost", "[::1]")):
                raise ConfigError(expected("shared_memory over ipc or loopback tcp (one host)", frames))
            if not os.path.isdir("/dev/shm"):
                raise ConfigError(expected("POSIX shared memory at /dev/shm for shared_memory", "none"))
        if not 0 <= self.shm_slots <= 1024:
            raise ConfigError(expected("shm_slots in 0..1024", self.shm_slots))
        if self.frame_timeout_s is not None and self.frame_timeout_s <= 0:
            raise ConfigError(expected("a positive frame timeout in seconds", self.frame_timeout_s))
        if self.duration_s is not None and self.duration_s <= 0:
            raise ConfigError(expected("a positive duration in seconds", self.duration_s))
        if self.public_endpoint is not None:
            security.wants_curve(self.public_endpoint, self.settings.security)  # refuse early, loudly


@dataclass
class PipelineReport:
    results: int
    duration_s: float
    fps: float
    stats: dict[str, Any]
    drops: dict[str, int]
    rejected: dict[str, int]
    transport: dict[str, int]
    events: list[dict[str, Any]]  # the newest error/event messages (at most nodes.MAX_EVENTS)
    event_counts: dict[str, int]  # all of them, by "error/<reason>" and "event/<event>"
    restarts: int
    records: list[dict[str, Any]]  # one summary per result (stream, seq, worker, stamps), newest kept
    record_path: Path | None
    exit_codes: dict[str, int | None]
    source_error: str | None
    failure: str | None  # why the supervisor gave up (a node crash-looping), else None
    nodes: dict[str, dict[str, Any]]
    stats_obj: Stats = field(repr=False)
    run_id: str = ""  # the recorder's run_id of this run (read_records(path, run=run_id))

    def write_latency_report(self, out_dir: str | os.PathLike, name: str = "latency",
                             title: str = "edge-runtime latency") -> tuple[Path, Path]:
        return write_latency_report(self.stats_obj, out_dir, name=name, title=title,
                                    extra={"restarts": self.restarts, "events": self.events[-100:],
                                           "event_counts": self.event_counts})

    @property
    def frames_read(self) -> int:
        """Frames the source read (its latest cumulative stats), 0 if it reported none."""
        counts = [n.get("frames_read") for n in self.nodes.values()]
        return sum(c for c in counts if isinstance(c, int) and not isinstance(c, bool))

    def no_results(self) -> str | None:
        """Why a run that read frames produced no result at all (every frame refused by the workers,
        failed in the model or could not be sent), or None. Counts only: never a file name."""
        if self.results or not self.frames_read:
            return None
        drops = {k: v for k, v in self.drops.items() if v and k != "superseded"}
        return (f"{self.frames_read} frame(s) read but no result came back "
                f"(rejected: {self.rejected or 'none'}, drops: {drops or 'none'})")

    def summary(self) -> str:
        e2e = self.stats.get("e2e_ms", {})
        # fps counts from the supervisor's start, so start-up (spawning, model loads) is inside it.
        read = f" of {self.frames_read} frames read" if self.frames_read else ""
        if read and any(e.get("event") == "node_exit" and e.get("kind") == "source" for e in self.events):
            # a killed source's frames since its last stats message (once a second) are in no count
            read = f" of at least {self.frames_read} frames read (a source process was lost: what it read after " \
                   "its last stats message is not counted)"
        lines = [f"{self.results} results{read} in {self.duration_s:.1f} s ({self.fps:.1f} fps incl. start-up)"]
        if e2e.get("n"):
            worst = self.stats.get("worst") or {}
            lines.append(f"capture->sink ms: p50 {e2e['p50']:.1f}  p99 {e2e['p99']:.1f}  max {e2e['max']:.1f} "
                         f"(worst: stream {worst.get('stream')} seq {worst.get('seq')})")
        drops = {k: v for k, v in self.drops.items() if v}
        lines.append(f"drops: {drops or 'none'}   rejected: {self.rejected or 'none'}   restarts: {self.restarts}")
        if self.stats.get("backend"):
            lines.append(f"backend {self.stats['backend']}, precision {self.stats['precision']}, "
                         f"model {self.stats.get('model', '')}")
        if self.source_error:
            lines.append(f"source error: {self.source_error}")
        if self.failure:
            lines.append(f"FAILED: {self.failure}")
        elif why := self.no_results():
            lines.append(f"FAILED: {why}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- running one node


def run_node_process(node: Any, log_level: int = logging.INFO) -> None:
    """Spawn target: a fresh context, SIGTERM -> stop, SIGINT left to the supervisor."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    parent = os.getppid()

    def orphan_watch() -> None:  # the supervisor was killed (SIGKILL, OOM): do not run on alone
        while not stop.wait(0.5):
            if os.getppid() != parent:
                log.error("%s: supervisor %d is gone, stopping", getattr(node, "name", "node"), parent)
                stop.set()

    threading.Thread(target=orphan_watch, daemon=True, name="orphan-watch").start()
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    ctx = zmq.Context()
    code = 1
    try:
        code = node.run(ctx, stop)
    except Exception:  # noqa: BLE001 - logged with its traceback; the exit code tells the supervisor
        log.error("%s crashed:\n%s", getattr(node, "name", "node"), traceback.format_exc(limit=8))
    finally:
        security.stop_authenticator(ctx)
        ctx.destroy(linger=0)
    sys.exit(code)


class NodeHandle:
    """One supervised node: a thread or a spawned process, restartable with a new incarnation."""

    def __init__(self, name: str, kind: str, make: Callable[[int], Any], mode: str, ctx: zmq.Context,
                 log_level: int) -> None:
        self.name, self.kind, self.make, self.mode, self.ctx = name, kind, make, mode, ctx
        self.log_level = log_level
        self.incarnation = -1
        self.proc: Any = None
        self.thread: threading.Thread | None = None
        self.stop_event = threading.Event()
        self.thread_code: int | None = None
        self.started_at = 0.0
        self.exited_at: float | None = None
        self.last_exit: int | None = None
        self.restart_at: float | None = None
        self.backoff = 0.0
        self.restarts = 0
        self.quick_failures = 0  # exits in a row, each soon after its start
        self.finished = False  # exited for good (end of stream, or stopped)

    def start(self) -> None:
        self.incarnation += 1
        node = self.make(self.incarnation)
        self.started_at = time.monotonic()
        self.exited_at = None
        self.restart_at = None
        if self.mode == "process":
            spawn = mp.get_context("spawn")
            proc = spawn.Process(target=run_node_process, args=(node, self.log_level),
                                 name=f"edge-{self.name}.{self.incarnation}", daemon=False)
            proc.start()
            self.proc = proc  # only a started process: join/terminate on it are always valid
        else:
            self.stop_event = threading.Event()
            self.thread_code = None

            def main() -> None:
                try:
                    self.thread_code = node.run(self.ctx, self.stop_event)
                except Exception:  # noqa: BLE001 - a crashed node thread is restarted like a process
                    log.error("%s crashed:\n%s", self.name, traceback.format_exc(limit=8))
                    self.thread_code = 1

            self.thread = threading.Thread(target=main, name=f"edge-{self.name}.{self.incarnation}", daemon=True)
            self.thread.start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        if self.mode == "process":
            return self.proc is not None and self.proc.is_alive()
        return self.thread is not None and self.thread.is_alive()

    def exitcode(self) -> int | None:
        if self.mode == "process":
            return None if self.proc is None else self.proc.exitcode
        return self.thread_code

    def request_stop(self) -> None:
        if self.mode == "process":
            if self.proc is not None and self.proc.is_alive():
                self.proc.terminate()  # SIGTERM: the node finishes its frame / flushes, then exits
        else:
            self.stop_event.set()

    def join(self, timeout: float) -> bool:
        if self.mode == "process" and self.proc is not None:
            self.proc.join(timeout)
            if self.proc.is_alive():
                log.warning("%s did not stop in %.1f s: killing it", self.name, timeout)
                self.proc.kill()
                self.proc.join(2.0)
        elif self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                log.warning("%s (thread) did not stop in %.1f s", self.name, timeout)
        return not self.alive()


# --------------------------------------------------------------------------- supervisor


class Supervisor:
    def __init__(self, source_factory: SourceFactory, make_processor: ProcessorFactory,
                 config: PipelineConfig | None = None) -> None:
        self.source_factory = source_factory
        self.make_processor = make_processor
        self.config = config or PipelineConfig()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.handles: list[NodeHandle] = []
        self.source_ended: int | None = None
        self.failure: str | None = None
        # One id per run, in every line the recorder writes (a re-used record directory holds several)
        self.run_id = new_run_id()
        self.started = 0.0
        self.stopped = 0.0

    # -- setup

    def _endpoints(self) -> Endpoints:
        c = self.config
        if c.endpoints is not None:
            return c.endpoints
        transport = c.transport if c.transport != "auto" else ("inproc" if c.mode == "thread" else "ipc")
        if transport == "inproc":
            return Endpoints.inproc()
        if transport == "tcp":
            return Endpoints.tcp()
        if c.work_dir is not None:
            return Endpoints.ipc(c.work_dir)
        self._tmp = tempfile.TemporaryDirectory(prefix="edge-")
        return Endpoints.ipc(self._tmp.name)

    def _internal_tcp_security(self, given: SecurityConfig | None) -> SecurityConfig:
        """CURVE on the internal channels when they run over tcp: unlike ipc in a 0700 folder, a
        loopback port is open to every local user, who could pose as a worker and be sent the frames,
        or inject results. Always a key pair made for this run in a private temporary folder (removed
        at the end), never the --keys folder: every key its allowed/ list holds (an integrator's
        subscriber key) would open these channels too."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="edge-")
        keys = Path(self._tmp.name) / "keys"
        security.generate_keys(keys, "server")
        security.generate_keys(keys, "client", allow=True)
        return SecurityConfig.from_keys_dir(keys, insecure=bool(given and given.insecure), curve_on_loopback=True)

    def start(self) -> None:
        c = self.config
        c.validate()
        check = getattr(self.make_processor, "check", None)  # e.g. RuntimeProcessor: bundles and device
        if callable(check):
            check()
        if c.record_dir is not None:  # a refused results.jsonl (a planted link): said now, not by a recorder's crashes
            JsonlWriter(Path(c.record_dir) / RESULTS_FILE).close()
        s = c.settings
        if c.shared_memory:
            left = protocol.sweep_dead_owners()
            if left:
                log.info("unlinked %d shared-memory segment(s) left by a pipeline that was killed", len(left))
        self.endpoints = ep = self._endpoints()
        if any(e.startswith("tcp://") for e in (ep.frames, ep.collect, ep.results, ep.record)):
            s = dataclasses.replace(s, security=self._internal_tcp_security(s.security))
        self.ctx = zmq.Context()
        attach = c.attach_input if c.attach_input is not None else (c.video or c.view)
        self.hub = HubNode(ep, s, record=c.record_dir is not None, public_endpoint=c.public_endpoint,
                           keep_results=c.keep_results, public_settings=c.settings)
        self._hub_stop = threading.Event()
        self._hub_error: BaseException | None = None

        def hub_main() -> None:
            try:
                self.hub.run(self.ctx, self._hub_stop)
            except BaseException as exc:  # noqa: BLE001 - a bind refused (security) or address in use: surface it
                self._hub_error = exc
                log.error("hub failed: %s", exc)

        self._hub_thread = threading.Thread(target=hub_main, name="edge-hub", daemon=True)
        self._hub_thread.start()
        while not self.hub.ready.wait(0.05):
            if not self._hub_thread.is_alive():
                security.stop_authenticator(self.ctx)
                self.ctx.destroy(linger=0)
                if self._tmp is not None:
                    self._tmp.cleanup()
                raise self._hub_error or ConfigError(expected("the hub to start", "it exited"))
        self._events = open_socket(self.ctx, zmq.PUSH, s, connect=ep.collect, receives=False)

        def add(name: str, kind: str, make: Callable[[int], Any]) -> None:
            self.handles.append(NodeHandle(name, kind, make, c.mode, self.ctx, c.log_level))

        if c.record_dir is not None:
            add("recorder", "recorder", lambda _: RecorderNode(ep, str(c.record_dir), s, video=c.video,
                                                               video_fps=c.video_fps, run_id=self.run_id))
        if c.view:
            headless = str(Path(c.record_dir) / "view") if c.record_dir is not None else str(Path("out") / "view")
            add("viewer", "viewer", lambda _: ViewerNode(ep.results, s, snapshot_dir=c.view_dir, headless_dir=headless))

        def worker(name: str) -> Callable[[int], WorkerNode]:
            return lambda inc: WorkerNode(self.make_processor, ep, s, name=name, window=c.window,
                                          attach_input=attach, incarnation=inc, frame_timeout_s=c.frame_timeout_s,
                                          shm=c.shared_memory)

        for i in range(c.n_workers):
            add(f"w{i}", "worker", worker(f"w{i}"))
        shm_slots = (c.shm_slots or c.n_workers * c.window + 2) if c.shared_memory else 0
        add("source", "source", lambda _: SourceNode(self.source_factory, ep, s, policy=c.policy,
                                                      wait_for_workers=c.n_workers, shm_slots=shm_slots))
        self.started = time.monotonic()
        try:
            for h in self.handles:
                h.start()
        except BaseException:
            self._shutdown()
            self._done.set()
            raise
        self._loop_thread = threading.Thread(target=self._loop, name="edge-supervisor", daemon=True)
        self._loop_thread.start()

    # -- the supervision loop (one thread owns every handle)

    def _event(self, event: str, **fields: Any) -> None:
        fields.setdefault("t_ns", time.monotonic_ns())
        try:
            protocol.send(self._events, protocol.encode_control("event", node="supervisor", event=event, **fields))
        except zmq.Again:
            log.warning("supervisor event %s not delivered (hub busy)", event)

    def _unlink_source_memory(self, h: NodeHandle) -> None:
        """A source process that died without closing its shared-memory ring (SIGKILL, crash) would
        leave it in /dev/shm for as long as the supervisor runs: unlink it by the source's pid."""
        if h.kind == "source" and self.config.shared_memory and h.pid is not None and not h.alive():
            for name in protocol.unlink_orphans(h.pid):
                log.warning("%s: unlinked its orphaned shared-memory segment %s", h.name, name)

    def _on_exit(self, h: NodeHandle, now: float) -> None:
        code = h.exitcode()
        h.exited_at, h.last_exit = now, code
        self._unlink_source_memory(h)
        if h.kind == "source" and code in (EXIT_OK, EXIT_SOURCE_FAILED):
            h.finished = True
            self.source_ended = code
            return
        if h.kind == "source":
            with self.hub.lock:
                ended = list(self.hub.stream_ends)
            if ended:  # it died closing down, after its end of stream: restarted, it read the file again
                h.finished = True
                self.source_ended = EXIT_SOURCE_FAILED if any(e.get("error") for e in ended) else EXIT_OK
                return
            if getattr(self.source_factory, "finite", False):
                # Restarted, a file source replays from its first frame: every frame it had sent came back
                # twice (a review: 394 results of 365 frames read, 94 seqs recorded twice).
                self._event("node_exit", node_name=h.name, kind=h.kind, exitcode=code, incarnation=h.incarnation,
                            uptime_s=round(now - h.started_at, 3))
                self.failure = (f"the source exited with code {code} before the end of its input; a finite source "
                                "(a file read once) is not restarted: it would replay from its first frame; see its "
                                "log above")
                log.error("%s", self.failure)
                h.finished = True
                return
        lo, hi = self.config.restart_backoff_s
        uptime = now - h.started_at
        stable = uptime >= self.config.stable_after_s
        h.quick_failures = 0 if stable else h.quick_failures + 1
        h.backoff = lo if stable or h.backoff == 0 else min(hi, h.backoff * 2)
        self._event("node_exit", node_name=h.name, kind=h.kind, exitcode=code, incarnation=h.incarnation,
                    uptime_s=round(uptime, 3))
        if h.quick_failures >= self.config.max_quick_failures:
            # e.g. a bundle that cannot load: restarting forever would only hide it
            self.failure = (f"{h.name} failed {h.quick_failures} times in a row within {self.config.stable_after_s} s "
                            f"of starting (last exit code {code}); see its log above")
            log.error("giving up: %s", self.failure)
            h.finished = True
            return
        h.restart_at = now + h.backoff
        log.warning("%s exited with code %s after %.1f s; restarting in %.1f s", h.name, code, uptime, h.backoff)

    def _loop(self) -> None:
        c = self.config
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if c.duration_s is not None and now - self.started >= c.duration_s:
                    break
                if self.source_ended is not None or self.failure is not None:
                    break
                if not self._hub_thread.is_alive():
                    self.failure = f"the hub stopped: {self._hub_error!r}"
                    log.error("%s; stopping the pipeline", self.failure)
                    break
                for h in self.handles:
                    if h.finished:
                        continue
                    if h.restart_at is None and not h.alive() and h.exited_at is None:
                        self._on_exit(h, now)
                    elif h.restart_at is not None and now >= h.restart_at:
                        down_ms = (now - (h.exited_at or now)) * 1000
                        h.start()
                        h.restarts += 1
                        self._event("node_restarted", node_name=h.name, kind=h.kind, incarnation=h.incarnation,
                                    previous_exitcode=h.last_exit, down_ms=round(down_ms, 1))
                self._stop.wait(0.05)
        except Exception:  # noqa: BLE001 - whatever happens, the finally below shuts down
            log.error("supervisor loop failed:\n%s", traceback.format_exc(limit=8))
        finally:
            self._shutdown()
            self._done.set()

    def _shutdown(self) -> None:
        """Source first (no new frames; it waits up to drain_s for the frames in flight), then workers
        (finish or abandon their frame), then the hub
        (drains, sends the final stats and ``end``), then the recorder (writes all, fsyncs) and viewer."""
        s = self.config.settings
        by_kind = {k: [h for h in self.handles if h.kind == k] for k in ("source", "worker", "recorder", "viewer")}
        # the source waits up to drain_s for frames in flight (workers stop after it): its timeout covers that
        for kind, timeout in (("source", s.drain_s + 3.0), ("worker", s.drain_s + 3.0)):
            for h in by_kind[kind]:
                h.restart_at = None
                h.request_stop()
            for h in by_kind[kind]:
                h.join(timeout)
                self._unlink_source_memory(h)
        self._hub_stop.set()
        self._hub_thread.join(s.drain_s + 5.0)
        for h in by_kind["recorder"]:  # it exits by itself on the hub's "end"; SIGTERM if it does not
            if self.config.mode == "process" and h.proc is not None:
                h.proc.join(s.drain_s + 3.0)
            h.request_stop()
            h.join(s.drain_s + 3.0)
        if by_kind["recorder"]:
            self._count_unrecorded()
        for h in by_kind["viewer"]:
            h.request_stop()
            h.join(3.0)
        self._events.close(linger=0)
        self.stopped = time.monotonic()
        if self._hub_thread.is_alive() or (self.config.mode == "thread" and any(h.alive() for h in self.handles)):
            # terminating a context with a socket still open would block forever
            log.warning("a node thread is still running: leaving its ZeroMQ context open")
        else:
            security.stop_authenticator(self.ctx)
            self.ctx.term()
        if self._tmp is not None:
            self._tmp.cleanup()

    def _count_unrecorded(self) -> None:
        """Results the hub handed to the recorder's socket but the file of this run lacks: queued in
        ZeroMQ when a recorder was killed or restarted, they are gone. Counted (drops "recorder_lost")
        and said, never silent."""
        from .recorder import RESULTS_FILE, read_records

        path = Path(str(self.config.record_dir)) / RESULTS_FILE
        try:
            written = sum(r.get("type") == "result" for r in read_records(path, run=self.run_id))
        except OSError:
            written = 0
        lost = self.hub.results_recorded - written
        if lost > 0:
            with self.hub.lock:
                self.hub.stats.count_drop("recorder_lost", lost)
            log.warning("%d result(s) reached the recorder's queue but not the recording (a recorder restart "
                        "loses what was queued for it)", lost)
            # Said in the recording too: its last stats line (sent before the recorder was gone) showed
            # neither the loss nor the right count, and the file is what outlives the run.
            try:
                out = JsonlWriter(path)
                out.write({"type": "event", "event": "recorder_lost", "node": "supervisor", "run_id": self.run_id,
                           "t_ns": time.monotonic_ns(), "results_lost": lost, "results_recorded": written})
                out.close()
            except (OSError, ConfigError) as exc:  # ConfigError: results.jsonl became a symbolic link
                log.warning("could not add the recorder_lost line to the recording: %s",
                            getattr(exc, "strerror", None) or exc)

    # -- control

    def request_stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the pipeline has stopped (end of stream, duration, stop request or failure)."""
        return self._done.wait(timeout)

    def stop(self, timeout: float = 60.0) -> PipelineReport:
        self.request_stop()
        if not self._done.wait(timeout):
            raise ConfigError(expected(f"the pipeline to stop within {timeout} s", "still running"))
        return self.report()

    def handle(self, name: str) -> NodeHandle:
        for h in self.handles:
            if h.name == name:
                return h
        raise ConfigError(expected(f"a node named one of {[h.name for h in self.handles]}", name))

    def report(self) -> PipelineReport:
        hub = self.hub
        snap = hub.snapshot()
        end = self.stopped or time.monotonic()
        duration = max(end - self.started, 1e-9)
        with hub.lock:
            events, event_counts, stream_ends = list(hub.events), dict(hub.event_counts), list(hub.stream_ends)
        source_error = next((e.get("error") for e in stream_ends if e.get("error")), None)
        record_path = Path(self.config.record_dir) / RESULTS_FILE if self.config.record_dir else None
        return PipelineReport(
            results=snap["results"], duration_s=duration, fps=snap["results"] / duration, stats=snap,
            drops=snap["drops"], rejected=snap["rejected"], transport=snap["transport"], events=events,
            event_counts=event_counts,
            restarts=sum(h.restarts for h in self.handles), records=list(hub.summaries), record_path=record_path,
            exit_codes={h.name: h.exitcode() for h in self.handles}, source_error=source_error, failure=self.failure,
            nodes=dict(hub.nodes), stats_obj=hub.stats, run_id=self.run_id)


def run_pipeline(source_factory: SourceFactory, make_processor: ProcessorFactory, n_workers: int = 1,
                 mode: str = "thread", record_dir: str | os.PathLike | None = None, duration: float | None = None,
                 **options: Any) -> PipelineReport:
    """Run until the source ends, ``duration`` seconds pass, or SIGINT/SIGTERM; return the report.

    ``options`` are PipelineConfig fields (policy, window, video, view, view_dir, public_endpoint,
    settings, transport, ...).
    """
    config = PipelineConfig(n_workers=n_workers, mode=mode, duration_s=duration,
                            record_dir=None if record_dir is None else str(record_dir))
    for key, value in options.items():
        if not hasattr(config, key):
            raise ConfigError(expected("a PipelineConfig field", key))
        setattr(config, key, value)
    sup = Supervisor(source_factory, make_processor, config)
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: sup.request_stop())
    try:
        sup.start()
        while not sup.wait(0.2):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return sup.report()

