"""Source, worker and hub nodes: the same code runs as a thread (inproc://) or a process (ipc/tcp).

Topology (docs/PROTOCOL.md has the wire details)::

    source ROUTER  --frames-->  worker DEALER (xN)     credit-based: a worker gets a frame only
           ^  <--credit/heartbeat--'                   after it said it is ready, so it always
           |                                           gets the newest frame (latest wins)
    worker/source PUSH --results, stats, errors, events--> hub PULL
    hub PUB  --[topic, header, parts]--> viewer, integrators' Subscribers (latest-only at the SUB)
    hub PUSH --[header, parts]--> recorder PULL        (high water mark + hub backlog: reliable)

A node is a dataclass with ``run(ctx, stop) -> exit code``; ``stop`` is a threading.Event that the
supervisor (thread mode) or a SIGTERM handler (process mode) sets. No call blocks without a timeout:
every receive is behind a poll with a timeout, every send is non-blocking or has SNDTIMEO.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from ..errors import ConfigError, InputError, ProtocolError, describe_error, expected
from ..frames import Frame
from ..results import Result
from ..telemetry import Stats
from . import protocol, security
from .protocol import DEFAULT_LIMITS, BadMessage, Limits
from .security import SecurityConfig

log = logging.getLogger(__name__)

SourceFactory = Callable[[], Iterable[Frame]]
ProcessorFactory = Callable[[], Any]  # -> frame -> Result, or an object with .process (and .close)

EXIT_OK = 0  # a finite source reached its end, or a node was asked to stop
EXIT_SOURCE_FAILED = 3  # the source raised: restarting would not help, the supervisor stops
EXIT_HUNG = 4  # a worker's model call ran past frame_timeout_s: exit so that the supervisor restarts it


@dataclass(frozen=True)
class Endpoints:
    """Where the four channels live. Binders: source (frames), hub (collect, results, record)."""

    frames: str
    collect: str
    results: str
    record: str

    @classmethod
    def inproc(cls, tag: str | None = None) -> Endpoints:
        t = tag or uuid.uuid4().hex[:12]
        return cls(*(f"inproc://edge-{t}-{n}" for n in ("frames", "collect", "results", "record")))

    @classmethod
    def ipc(cls, directory: str | os.PathLike) -> Endpoints:
        d = Path(directory).absolute()
        if len(str(d / "collect")) > 100:  # AF_UNIX socket paths are limited to 107 bytes
            raise ConfigError(expected("an ipc directory path of at most 92 characters", str(d)))
        d.mkdir(parents=True, exist_ok=True)
        return cls(*(f"ipc://{d / n}" for n in ("frames", "collect", "results", "record")))

    @classmethod
    def tcp(cls, host: str = "127.0.0.1", ports: tuple[int, int, int, int] | None = None) -> Endpoints:
        ports = ports or tuple(free_tcp_ports(4, host))  # type: ignore[assignment]
        return cls(*(f"tcp://{host}:{p}" for p in ports))  # type: ignore[union-attr]


def free_tcp_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the OS says are free now (bound to port 0 together, so they are distinct)."""
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class NodeSettings:
    heartbeat_s: float = 0.5  # ZMTP heartbeat and application heartbeat interval
    liveness_s: float = 2.0  # a worker silent this long is lost (its credit forgotten, frame counted)
    stats_interval_s: float = 1.0
    drain_s: float = 2.0  # how long a stopping node waits to finish / deliver its last work
    send_timeout_s: float = 1.0
    limits: Limits = DEFAULT_LIMITS
    security: SecurityConfig | None = None


# --------------------------------------------------------------------------- shared plumbing

MAX_NODES = 512  # distinct node ids whose counters the hub keeps (restarts make new ids)
# error/event messages the hub keeps for the report (the newest); older ones are only counted, so a
# model failing on every frame of a long run cannot grow the hub's memory (30 fps = 108000 an hour)
MAX_EVENTS = 1000
MAX_EVENT_KINDS = 256  # distinct event names / error reasons counted one by one
POLL_MS = 100  # the longest any node loop sleeps: how fast it notices a stop request
# The hub's once-a-second stats summarise the latest results only (about a minute at 30 fps): over
# the whole window they stalled its receive loop by tens of ms. Reports cover the whole window.
LIVE_STATS_RESULTS = 2048
# Messages queued in libzmq towards the recorder (each side). Counted in messages, not bytes, so kept
# small: with --video a message is ~1 MiB; the hub's own backlog, bounded in bytes, holds the rest.
RECORD_HWM = 64
# Frames whose result the hub remembers, to pass on only the first of two: policy "all" sends a
# silent worker's frames to another, and the silent one, if it was only paused, delivers them too.
DELIVERED_WINDOW = 8192
RETIRE_AFTER_S = 30.0  # a node whose stats stopped this long ago may leave the node table (_retire_silent)
ALL_DRAIN_S = 60.0  # policy 'all': end-of-stream wait for in-flight frames, from the last one back
FRAME_TOTALS = ("frames_read", "frames_sent", "frames_shm")  # a source's cumulative stats fields
Position = tuple[int, int]  # a result's place in its stream: (capture_ns, seq)


def position(header: dict[str, Any]) -> Position:
    return int(header["capture_ns"]), int(header["seq"])


REBOOT_GAP_NS = 10_000_000_000  # captured this long before the last result: a sender's clock restarted


def is_late(pos: Position, last: Position | None) -> bool:
    """A result a sink should drop: captured no later than the last one it used.

    Capture time first: a restarted source numbers from seq 0 again but captures later (capture_ns
    is monotonic), so its frames are new, and a straggler from before the restart is late; seq
    breaks ties (a client that stamps every frame alike is ordered by seq alone). A result captured
    more than REBOOT_GAP_NS before the last one is no straggler (none is 10 s late) but a sender whose
    monotonic clock started again (a rebooted cart, seen by a subscriber that stayed connected): new."""
    return last is not None and pos <= last and last[0] - pos[0] <= REBOOT_GAP_NS


SEND_ONLY_MAX_BYTES = 4096  # the largest message a send-only socket (PUB, PUSH) takes in


def open_socket(ctx: zmq.Context, kind: int, settings: NodeSettings, *, bind: str | None = None,
                connect: str | None = None, receives: bool = True, identity: bytes | None = None,
                heartbeats: bool = True) -> zmq.Socket:
    """A socket with the house options: LINGER 0, MAXMSGSIZE, heartbeats, CURVE policy, IMMEDIATE.

    ``heartbeats=False`` for the record channel: a recorder stalled on its disk longer than the
    liveness timeout had its connection dropped, and libzmq discards what it queued for a dropped
    peer (the supervisor watches the recorder process instead)."""
    sock = ctx.socket(kind)
    sock.linger = 0
    # A socket that only sends still takes messages in: a PUB its subscriptions, which libzmq keeps in
    # a trie of about 50x their size (one 20 MiB subscription took a hub from 61 MiB to 1 GiB, no key
    # needed on a loopback bind). Topics and ZMTP commands (a CURVE handshake) are far below this.
    sock.setsockopt(zmq.MAXMSGSIZE, settings.limits.max_message_bytes if receives else SEND_ONLY_MAX_BYTES)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    endpoint = bind or connect or ""
    if heartbeats and not endpoint.startswith("inproc://"):
        hb = int(settings.heartbeat_s * 1000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, hb)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(settings.liveness_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TTL, int(settings.liveness_s * 1000))
    sock.sndtimeo = int(settings.send_timeout_s * 1000)
    try:
        if bind is not None:
            security.bind(sock, bind, settings.security)
        if connect is not None:
            if kind in (zmq.DEALER, zmq.PUSH, zmq.REQ):
                sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue messages for a peer that is not there
            security.connect(sock, connect, settings.security)
    except BaseException:
        sock.close(linger=0)  # a refused bind must not leave a socket that blocks context termination
        raise
    return sock


_MONITOR_EVENTS: dict[int, str] = {
    int(zmq.EVENT_DISCONNECTED): "peer_disconnected",  # also how libzmq reports a > MAXMSGSIZE message
    int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): "auth_failed",  # a CURVE client not in the allow-list
    int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "handshake_failed",
    int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL): "handshake_failed",
}


class Counters:
    """Per-node counters (rejected by reason, drops by cause, transport events) + rate-limited logs."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.rejected: Counter[str] = Counter()
        self.drops: Counter[str] = Counter()
        self.transport: Counter[str] = Counter()
        self._last_log: dict[str, float] = {}
        self._monitors: list[tuple[zmq.Socket, zmq.Socket]] = []

    def warn(self, key: str, msg: str, *args: Any) -> None:
        """Log at most once per second per key: a stream of bad input must not flood the log."""
        now = time.monotonic()
        if now - self._last_log.get(key, -1e9) >= 1.0:
            self._last_log[key] = now
            log.warning(msg, *args)

    def reject(self, exc: BadMessage, origin: str = "") -> None:
        self.rejected[exc.reason] += 1
        # The reason and the offending header values only, never payload bytes.
        self.warn(exc.reason, "%s rejected a message%s (%d so far for %s): %s", self.node,
                  f" from {origin}" if origin else "", self.rejected[exc.reason], exc.reason, str(exc)[:300])

    def monitor(self, sock: zmq.Socket) -> zmq.Socket:
        mon = sock.get_monitor_socket(sum(_MONITOR_EVENTS))
        self._monitors.append((sock, mon))
        return mon

    def drain_monitors(self) -> None:
        for _, mon in self._monitors:
            while mon.poll(0):
                try:
                    event = recv_monitor_message(mon, zmq.NOBLOCK)
                except zmq.Again:
                    break
                name = _MONITOR_EVENTS.get(int(event["event"]))
                if name:
                    self.transport[name] += 1

    def close_monitors(self) -> None:
        for sock, mon in self._monitors:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            mon.close(linger=0)
        self._monitors.clear()

    def stats_message(self, **extra: Any) -> list[bytes]:
        self.drain_monitors()
        return protocol.encode_control("stats", node=self.node, t_ns=time.monotonic_ns(),
                                       drops=dict(self.drops), rejected=dict(self.rejected),
                                       transport=dict(self.transport), **extra)


class Waker:
    """Lets a helper thread wake a node's poll loop: a non-blocking pipe registered in the zmq Poller.

    A pipe rather than an inproc socket because ZeroMQ sockets must not be shared between threads,
    and a helper (a source read, a model call) may still be running when the node shuts down.
    """

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)

    def wake(self) -> None:
        try:
            os.write(self.w, b"\0")
        except OSError:  # pipe full (a wake-up is pending anyway) or closed at shutdown
            pass

    def drain(self) -> None:
        try:
            while os.read(self.r, 4096):
                pass
        except BlockingIOError:
            pass

    def wait(self, timeout_s: float) -> None:
        select.select([self.r], [], [], timeout_s)
        self.drain()

    def close(self, writer_done: bool) -> None:
        os.close(self.r)
        if writer_done:  # else leak the write end: a late write must not hit a reused fd number
            os.close(self.w)


def _send_quiet(sock: zmq.Socket, parts: list[Any], counters: Counters, what: str) -> bool:
    """Non-blocking send; a full or absent peer costs one counted drop, never a hang."""
    try:
        protocol.send(sock, parts, zmq.NOBLOCK)
        return True
    except zmq.Again:
        counters.transport[f"{what}_unsent"] += 1
        return False


# --------------------------------------------------------------------------- source


class FrameSlot:
    """The newest frame per stream. ``latest``: a new frame supersedes the waiting one (a counted drop);
    ``all``: the producer waits until the slot is taken (file replay at the workers' pace, no drops)."""

    def __init__(self, policy: str) -> None:
        if policy not in ("latest", "all"):
            raise ConfigError(expected("policy 'latest' or 'all'", policy))
        self.policy = policy
        self.frames: dict[str, Frame] = {}
        self.retry: deque[Frame] = deque()  # 'all': frames whose worker vanished, sent first
        self.cond = threading.Condition()
        self.superseded = 0
        self.read = 0

    def put(self, frame: Frame, stop: threading.Event) -> None:
        with self.cond:
            if self.policy == "all":
                while frame.stream_id in self.frames and not stop.is_set():
                    self.cond.wait(0.1)
            if stop.is_set():  # the source has stopped: not read (it would be in no count)
                return
            if frame.stream_id in self.frames:
                self.superseded += 1
            self.frames[frame.stream_id] = frame
            self.read += 1

    def take(self) -> Frame | None:
        with self.cond:
            if self.retry:
                return self.retry.popleft()
            if not self.frames:
                return None
            stream = min(self.frames, key=lambda s: self.frames[s].capture_ns)  # oldest stream first
            frame = self.frames.pop(stream)
            self.cond.notify_all()
            return frame

    def retry_next(self) -> bool:
        """Whether take() returns a frame sent again (only the dispatching thread adds those)."""
        with self.cond:
            return bool(self.retry)

    def put_back(self, frame: Frame) -> None:
        """Undo a take (the chosen worker vanished) unless a newer frame arrived meanwhile."""
        with self.cond:
            if frame.stream_id not in self.frames:
                self.frames[frame.stream_id] = frame
            elif self.policy == "all":
                self.retry.append(frame)
            else:
                self.superseded += 1

    def __len__(self) -> int:
        with self.cond:
            return len(self.frames) + len(self.retry)


@dataclass
class _WorkerState:
    name: str
    window: int
    done: int
    last_seen: float
    # stream, seq, shm slot, and the frame itself under policy 'all' (resent if the worker vanishes)
    inflight: deque[tuple[str, int, int | None, Frame | None]] = field(default_factory=deque)
    ready_since: float = 0.0
    shm: bool = False  # it said it maps shared-memory frames (same host, shm enabled)


@dataclass
class SourceNode:
    """Reads frames in a thread, keeps only the newest per stream, sends one to each worker with credit."""

    source_factory: SourceFactory
    endpoints: Endpoints
    settings: NodeSettings = field(default_factory=NodeSettings)
    policy: str = "latest"
    name: str = "source"
    # Start reading only when this many workers have said hello (or after start_timeout_s), so a
    # file replay does not race ahead of workers that are still loading their model.
    wait_for_workers: int = 1
    start_timeout_s: float = 30.0
    # Optional same-host payload path (docs/PROTOCOL.md 3.1): frames go through a ring of this many
    # shared-memory slots to workers that announce ``shm``; 0 = off (every payload inline).
    shm_slots: int = 0

    def _reader(self, slot: FrameSlot, waker: Waker, stop: threading.Event, state: dict[str, Any]) -> None:
        source: Any = None
        try:
            source = self.source_factory()
            state["source"] = source  # its ``skipped`` count (files of a folder it could not read)
            for frame in source:
                if stop.is_set():
                    break
                # Every worker would reject a frame whose stream id breaks the protocol: fail the
                # source with a clear error instead of sending frames that can only be refused.
                protocol.check_stream_id(str(frame.stream_id))
                frame.stamps.setdefault("capture", frame.capture_ns)
                slot.put(frame, stop)
                waker.wake()
        except Exception as exc:  # noqa: BLE001 - any source failure ends the stream; never log frame contents
            # describe_error: an OSError's text carries its file name (a patient identifier, perhaps)
            log.error("%s: the source failed: %s: %s", self.name, type(exc).__name__, describe_error(exc)[:300])
            state["error"] = f"{type(exc).__name__}: {describe_error(exc)[:300]}"
        finally:
            close = getattr(source, "close", None)
            if callable(close):  # a generator (paced): its video or camera released now, not when collected
                with contextlib.suppress(Exception):
                    close()
            state["exhausted"] = True
            waker.wake()

    def run(self, ctx: zmq.Context, stop: threading.Event) -> int:
        s = self.settings
        counters = Counters(self.name)
        router = open_socket(ctx, zmq.ROUTER, s, bind=self.endpoints.frames)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished worker raises, not drops
        router.sndtimeo = 0
        monitor = counters.monitor(router)
        push = open_socket(ctx, zmq.PUSH, s, connect=self.endpoints.collect, receives=False)
        waker = Waker()
        slot = FrameSlot(self.policy)
        state: dict[str, Any] = {"exhausted": False, "error": None}
        reader = threading.Thread(target=self._reader, args=(slot, waker, stop, state), daemon=True,
                                  name=f"{self.name}-reader")
        workers: dict[bytes, _WorkerState] = {}
        ring: protocol.ShmRing | None = None
        sent = shm_sent = 0
        next_stats = time.monotonic() + s.stats_interval_s
        drain_deadline: float | None = None
        next_probe = time.monotonic()
        poller = zmq.Poller()
        for sock in (router, waker.r, monitor):
            poller.register(sock, zmq.POLLIN)

        def release(slot: int | None) -> None:
            if slot is not None and ring is not None:
                ring.release(slot)

        def shm_ref(frame: Frame, pixels: Any) -> tuple[int | None, dict[str, Any] | None]:
            """Put the pixels in a free slot; (None, None) sends them inline (no slot free, too big)."""
            nonlocal ring
            if ring is None:
                try:
                    ring = protocol.ShmRing(pixels.nbytes, self.shm_slots)
                except (OSError, ValueError, ProtocolError) as exc:  # no /dev/shm, out of space: inline
                    counters.warn("shm", "%s: shared memory unavailable, sending inline: %s", self.name, exc)
                    self.shm_slots = 0
                    return None, None
            if pixels.nbytes > ring.slot_bytes:
                counters.transport["shm_inline"] += 1
                return None, None
            slot = ring.alloc()
            if slot is None:
                counters.transport["shm_inline"] += 1
                return None, None
            return slot, ring.write(slot, pixels)

        # a lost worker: its done count then, the frames counted lost, how many of those it has since finished
        lost_counted: dict[bytes, tuple[int, int, int]] = {}
        resent: set[tuple[str, int, int]] = set()  # frames already sent again once (stream, seq, capture_ns)

        def holds_resent(w: _WorkerState) -> bool:
            return bool(resent) and any(f is not None and (f.stream_id, f.seq, f.capture_ns) in resent
                                        for _, _, _, f in w.inflight)

        def lose(ident: bytes, why: str) -> None:
            w = workers.pop(ident)
            for _, _, held_slot, _ in w.inflight:
                release(held_slot)  # safe even if it still reads: the generation check catches a rewrite
            # Policy 'all' ("every frame is processed"): the frames go to another worker, first, once
            # each: a frame on which the model process dies (a native crash) killed every restarted
            # worker it was resent to until the supervisor gave up on the run. 'latest' counts them
            # (newer frames have come meanwhile).
            resend: list[Frame] = []
            lost = []
            for st, sq, _, f in w.inflight:
                key = (st, sq, f.capture_ns) if f is not None else None
                if self.policy == "all" and key is not None and key not in resent:
                    resent.add(key)
                    resend.append(f)
                else:  # 'latest', or sent again once already: counted, never sent a third time
                    if key is not None:
                        resent.discard(key)
                    lost.append({"stream": st, "seq": sq})
            slot.retry.extend(resend)
            if lost:
                counters.drops["worker_lost"] += len(lost)
                lost_counted[ident] = (w.done, len(lost), 0)
            counters.transport["frames_resent"] += len(resend)
            _send_quiet(push, protocol.encode_control(
                "event", node=self.name, event="worker_lost", worker=w.name, why=why, t_ns=time.monotonic_ns(),
                frames_lost=lost,
                frames_resent=[{"stream": f.stream_id, "seq": f.seq} for f in resend]), counters, "event")
            log.warning("%s: worker %s lost (%s), %d in-flight frame(s): %d sent again, %d counted lost", self.name,
                        w.name, why, len(w.inflight), len(resend), len(lost))

        def read_workers(now: float) -> None:
            """Credits and heartbeats from workers: all that are queued."""
            nonlocal drain_deadline
            while True:
                try:
                    msg = router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                ident = msg[0].bytes
                try:
                    m = protocol.decode(msg[1:], s.limits)
                    if m.type not in ("credit", "heartbeat") or m.header.get("state") == "serving":
                        raise BadMessage("unexpected_type", expected("credit or worker heartbeat", m.type))
                except BadMessage as exc:
                    counters.reject(exc, "a worker")
                    continue
                done, window = m.header["done"], m.header["window"]
                w = workers.get(ident)
                if w is None:  # a new worker, or one that outlived a source restart: adopt its count
                    w = workers[ident] = _WorkerState(m.header["worker"], window, done, now, ready_since=now)
                if ident in lost_counted:  # declared lost while only silent (SIGSTOP, a long pause): the
                    before, n_lost, back = lost_counted[ident]  # frames it finishes after all were not lost
                    now_back = min(max(0, done - before), n_lost)
                    counters.drops["worker_lost"] -= now_back - back
                    lost_counted[ident] = (before, n_lost, now_back)
                    if now_back == n_lost:
                        del lost_counted[ident]
                if done > w.done + len(w.inflight):
                    # More frames done than were sent to it (done may be up to 2^63-1): count it,
                    # then adopt its count as for a new worker (a worker that was declared lost
                    # with frames in hand and came back legitimately reports those too).
                    counters.reject(BadMessage("bad_credit", expected(
                        f"done <= {w.done + len(w.inflight)} (frames sent to {w.name[:64]})", done)), "a worker")
                for _ in range(min(max(0, done - w.done), len(w.inflight))):  # bounded by frames in flight
                    _, _, held_slot, f = w.inflight.popleft()
                    release(held_slot)  # the worker is done with it: slot reusable
                    if f is not None and resent:
                        resent.discard((f.stream_id, f.seq, f.capture_ns))
                    if self.policy == "all" and drain_deadline is not None:
                        drain_deadline = now + ALL_DRAIN_S  # still coming back: keep draining
                w.done, w.window, w.last_seen = max(done, w.done), window, now
                w.shm = m.header.get("shm") is True
                if m.type == "credit":
                    w.ready_since = now

        start_by = time.monotonic() + self.start_timeout_s
        try:
            while not stop.is_set():
                if reader.ident is None and (len(workers) >= self.wait_for_workers or time.monotonic() >= start_by):
                    reader.start()
                events = dict(poller.poll(POLL_MS))
                now = time.monotonic()
                if waker.r in events:
                    waker.drain()
                if monitor in events:
                    disconnects = counters.transport["peer_disconnected"]
                    counters.drain_monitors()
                    if counters.transport["peer_disconnected"] > disconnects:
                        next_probe = now  # a peer went away: find out which worker, now
                if router in events:  # credits and heartbeats from workers
                    read_workers(now)
                # Liveness: a silent worker's credit is forgotten and its frames are counted.
                for ident in [i for i, w in workers.items() if now - w.last_seen > s.liveness_s]:
                    lose(ident, "no heartbeat")
                # Probe workers with a heartbeat: ROUTER_MANDATORY makes a vanished one fail at once.
                if now >= next_probe:
                    next_probe = now + min(s.heartbeat_s, 0.25)
                    beat = protocol.encode_control("heartbeat", node=self.name, state="serving")
                    gone = []
                    for ident in list(workers):
                        try:
                            protocol.send(router, [ident, *beat], zmq.NOBLOCK)
                        except zmq.ZMQError as exc:
                            if exc.errno == zmq.EHOSTUNREACH:
                                gone.append(ident)
                    if gone:  # what they sent before going comes first (a timed-out worker's frames, done)
                        read_workers(now)
                        for ident in gone:
                            if ident in workers:
                                lose(ident, "disconnected")
                # Dispatch: the newest frame of the oldest-waiting stream to the longest-idle worker.
                # A frame sent again goes alone to an idle worker and nothing joins it there: should
                # it kill that worker too, no other frame is lost with it (the frame that shared a
                # window with a crashing one was lost on the crash's second round).
                while len(slot):
                    alone = slot.retry_next()
                    ready = [(len(w.inflight), w.ready_since, i) for i, w in workers.items()
                             if len(w.inflight) < w.window and not holds_resent(w)
                             and not (alone and w.inflight)]
                    if not ready:
                        break
                    ident = min(ready)[2]
                    frame = slot.take()
                    if frame is None:
                        break
                    held: int | None = None
                    try:
                        ref = None
                        if self.shm_slots and workers[ident].shm:
                            held, ref = shm_ref(frame, protocol.wire_array(frame.pixels)[0])
                        if ref is None and frame.pixels.nbytes > s.limits.max_message_bytes:
                            # libzmq would drop it at the worker, unseen, and the worker be lost waiting
                            counters.drops["message_too_large"] += 1
                            counters.warn("message_too_large", "%s: frame %s/%d of %d bytes exceeds "
                                          "max_message_bytes %d: not sent", self.name, frame.stream_id, frame.seq,
                                          frame.pixels.nbytes, s.limits.max_message_bytes)
                            continue
                        frame.stamps["source_send"] = time.monotonic_ns()
                        protocol.send(router, [ident, *protocol.encode_frame(frame, ref)], zmq.NOBLOCK)
                    except zmq.ZMQError as exc:  # EHOSTUNREACH (gone) or EAGAIN (stuck): not ready
                        release(held)
                        slot.put_back(frame)
                        lose(ident, f"send failed: {exc.strerror}")
                        continue
                    except protocol.ProtocolError as exc:
                        release(held)
                        counters.drops["unencodable"] += 1
                        counters.warn("unencodable", "%s: cannot encode frame %s/%d: %s", self.name, frame.stream_id,
                                      frame.seq, exc)
                        continue
                    workers[ident].inflight.append((frame.stream_id, frame.seq, held,
                                                    frame if self.policy == "all" else None))
                    sent += 1
                    shm_sent += held is not None
                counters.drops["superseded"] = slot.superseded
                if getattr(state.get("source"), "skipped", 0):
                    counters.drops["unreadable_file"] = int(state["source"].skipped)
                if now >= next_stats:
                    next_stats = now + s.stats_interval_s
                    _send_quiet(push, counters.stats_message(frames_read=slot.read, frames_sent=sent,
                                                             frames_shm=shm_sent, workers=len(workers)), counters, "stats")
                if state["exhausted"] and not len(slot):
                    # End of a finite source: give in-flight frames a bounded time to come back.
                    # 'all' promises every frame: a slow model (seconds a frame) gets a minute per frame
                    # that comes back; 'latest' a short drain (a stream, not a file, is the usual case).
                    drain_deadline = drain_deadline or now + (ALL_DRAIN_S if self.policy == "all" else s.drain_s)
                    if not any(w.inflight for w in workers.values()) or now >= drain_deadline:
                        break
        finally:
            stopped = stop.is_set()  # from outside (the supervisor): no end of stream to announce
            # Workers stop after the source: wait (at most drain_s) for the frames in flight to come back, so
            # the source's counts hold them ('all': a frame sent just before a stop was not processed and was
            # in no count, 3 runs in 20).
            deadline = time.monotonic() + s.drain_s
            while stopped and any(w.inflight for w in workers.values()) and time.monotonic() < deadline:
                if router.poll(50):
                    read_workers(time.monotonic())
            stop.set()  # no frame is read from here on (FrameSlot.put)
            with slot.cond:
                unsent = len(slot.frames) + len(slot.retry)
            if unsent:  # read, and waiting for a worker when the run stopped: counted, not lost from view
                counters.drops["unsent_at_stop"] += unsent
            counters.drops["superseded"] = slot.superseded
            if getattr(state.get("source"), "skipped", 0):
                counters.drops["unreadable_file"] = int(state["source"].skipped)
            _send_quiet(push, counters.stats_message(frames_read=slot.read, frames_sent=sent, frames_shm=shm_sent,
                                                     workers=len(workers)), counters, "stats")
            if state["exhausted"] and not stopped:
                _send_quiet(push, protocol.encode_control(
                    "event", node=self.name, event="end_of_stream", t_ns=time.monotonic_ns(),
                    frames_read=slot.read, frames_sent=sent, error=state["error"]), counters, "event")
            counters.close_monitors()
            router.close(linger=500)  # frames already sent reach their worker, which counts them if it stops first
            push.close(linger=int(s.drain_s * 1000))  # the end-of-stream event must reach the hub
            if reader.is_alive():
                reader.join(timeout=1.0)
            waker.close(writer_done=not reader.is_alive())
            if ring is not None:
                ring.close()  # unlinks the name; workers' mappings stay valid until they drop them
        if state["error"]:
            return EXIT_SOURCE_FAILED
        return EXIT_OK


# --------------------------------------------------------------------------- worker


def load_processor(factory: ProcessorFactory) -> tuple[Callable[[Frame], Result], Callable[[], None] | None]:
    """Call the factory (in the worker) and find ``process`` and ``close`` on what it returned."""
    made = factory()
    process = getattr(made, "process", made)
    if not callable(process):
        raise InputError(expected("a processor factory returning frame -> Result", type(made).__name__))
    owner = made if hasattr(made, "process") else getattr(process, "__self__", None)
    close = getattr(owner, "close", None)
    return process, close if callable(close) else None


def _stage_stamps(result: Result, start_ns: int) -> None:
    """Stamp preprocess/infer/postprocess from the processor's own timings when it did not stamp them.

    A Runtime measures the three steps back to back (timings_ms); laid end to end from the moment
    the call started they give the stage boundaries the telemetry needs.
    """
    stages = ("preprocess", "infer", "postprocess")
    if any(s in result.stamps for s in stages) or not all(s in result.timings_ms for s in stages):
        return
    t = start_ns
    for stage in stages:
        t += int(result.timings_ms[stage] * 1e6)
        result.stamps[stage] = t


@dataclass
class WorkerNode:
    """Asks for frames by credit, runs the processor in a helper thread, sends results to the hub.

    The processor runs off the socket thread so heartbeats keep flowing during a long inference:
    a worker is declared lost because its process died or hung the interpreter, not because it is slow.
    """

    make_processor: ProcessorFactory
    endpoints: Endpoints
    settings: NodeSettings = field(default_factory=NodeSettings)
    name: str = "w0"
    window: int = 1  # frames in flight per worker: 1 for latest-frame-wins, 2 to pipeline file replay
    attach_input: bool = False  # send the input pixels with each result (for video / viewer)
    incarnation: int = 0
    # A model call running longer than this is hung (a wedged GPU driver, a deadlock): the worker
    # exits with EXIT_HUNG and is restarted. None: no limit (heartbeats alone cannot see a hang).
    frame_timeout_s: float | None = None
    # Accept frames whose pixels are in the source's shared memory (same host; docs/PROTOCOL.md 3.1).
    # The pixels are then valid during the processor call only: a processor that keeps a frame
    # beyond it must copy the pixels (results that view them are copied before they are sent).
    shm: bool = False

    def _process_loop(self, process: Callable[[Frame], Result], inbox: queue.SimpleQueue, outbox: queue.SimpleQueue,
                      waker: Waker) -> None:
        while True:
            frame = inbox.get()
            if frame is None:
                return
            start = time.monotonic_ns()
            try:
                result: Any = process(frame)
                if not isinstance(result, Result):
                    raise InputError(expected("the processor to return a Result", type(result).__name__))
                _stage_stamps(result, start)
            except Exception as exc:  # noqa: BLE001 - one bad frame must not take the worker down
                result = exc
            outbox.put((frame, result))
            waker.wake()

    def run(self, ctx: zmq.Context, stop: threading.Event) -> int:
        s = self.settings
        identity = f"{self.name}.{self.incarnation}.{os.getpid()}.{uuid.uuid4().hex[:4]}"
        counters = Counters(identity)
        process, close = load_processor(self.make_processor)  # heavy loading happens here, in the worker
        dealer = open_socket(ctx, zmq.DEALER, s, connect=self.endpoints.frames, identity=identity.encode())
        dealer.sndtimeo = 0
        push = open_socket(ctx, zmq.PUSH, s, connect=self.endpoints.collect, receives=False)
        waker = Waker()
        inbox: queue.SimpleQueue = queue.SimpleQueue()  # C queues: cheap hand-offs
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        shm = protocol.ShmMap() if self.shm else None
        shm_refs: deque[dict[str, Any] | None] = deque()  # per frame in the inbox, in order
        announce_shm = shm is not None
        thread = threading.Thread(target=self._process_loop, args=(process, inbox, outbox, waker), daemon=True,
                                  name=f"{identity}-process")
        thread.start()
        pending = done = 0
        # ``done`` tells the source how many frames, in arrival order, it may forget (and whose
        # shared-memory slots it may reuse). A frame rejected while earlier ones are still being
        # processed is counted only after them: entries are how many frames must have finished first.
        finished = 0
        rejected_behind: deque[int] = deque()
        hung = False
        busy_since = 0.0  # when the oldest frame still in this worker arrived
        last_sent = 0.0
        next_stats = time.monotonic() + s.stats_interval_s
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(waker.r, zmq.POLLIN)

        def tell_source(kind: str, window: int | None = None) -> None:
            nonlocal last_sent
            fields: dict[str, Any] = {"worker": identity, "done": done,
                                      "window": self.window if window is None else window}
            if announce_shm:
                fields["shm"] = True
            if kind == "heartbeat":
                fields.update(node=identity, state="busy" if pending else "idle")
            try:
                protocol.send(dealer, protocol.encode_control(kind, **fields), zmq.NOBLOCK)
                last_sent = time.monotonic()
            except zmq.Again:  # no source connected right now: the next heartbeat says it again
                pass

        def unshare(frame: Frame, result: Any) -> None:
            """Results must not point into a shared-memory slot the source will reuse: copy what does."""
            for name in ("enhanced", "masks"):
                array = getattr(result, name, None)
                if isinstance(array, np.ndarray) and np.may_share_memory(array, frame.pixels):
                    setattr(result, name, array.copy())
            if self.attach_input:
                frame.pixels = frame.pixels.copy()

        def deliver() -> None:
            nonlocal pending, done, busy_since, finished
            delivered = False
            while True:
                try:
                    frame, result = outbox.get_nowait()
                except queue.Empty:
                    break
                ref = shm_refs.popleft()
                pending -= 1
                done += 1
                finished += 1
                while rejected_behind and rejected_behind[0] <= finished:
                    rejected_behind.popleft()
                    done += 1
                delivered = True
                busy_since = time.monotonic()
                if ref is not None and shm is not None:
                    if not isinstance(result, Exception):
                        unshare(frame, result)
                    if not shm.intact(ref):  # only a worker that was declared lost can see this
                        counters.drops["shm_overwritten"] += 1
                        counters.warn("shm_overwritten", "%s: the slot of %s/%d was rewritten while in use: "
                                      "result dropped", identity, frame.stream_id, frame.seq)
                        continue
                if isinstance(result, Exception):
                    counters.drops["processor_error"] += 1
                    detail = f"{type(result).__name__}: {describe_error(result)[:200]}"  # no file names
                    counters.warn("processor_error", "%s: processor failed on %s/%d (%d so far): %s", identity,
                                  frame.stream_id, frame.seq, counters.drops["processor_error"], detail)
                    parts = protocol.encode_control(
                        "error", node=identity, reason="processor_error", stream=frame.stream_id, seq=frame.seq,
                        detail=detail, t_ns=time.monotonic_ns())
                else:
                    result.stamps = {**frame.stamps, **result.stamps}
                    result.stamps["result_send"] = time.monotonic_ns()
                    try:
                        parts = protocol.encode_result(result, worker=identity, frame=frame,
                                                       attach_input=self.attach_input)
                    except protocol.ProtocolError as exc:
                        counters.drops["unencodable"] += 1
                        counters.warn("unencodable", "%s: result %s/%d cannot be encoded: %s", identity,
                                      frame.stream_id, frame.seq, exc)
                        continue
                try:  # SNDTIMEO bounds this: a missing hub costs a counted drop, not a hang
                    protocol.send(push, parts)
                except zmq.Again:
                    counters.drops["hub_unavailable"] += 1
            if delivered:  # one credit for all the frames finished since the last (done is cumulative)
                tell_source("credit")

        tell_source("credit")
        try:
            while not stop.is_set():
                events = dict(poller.poll(POLL_MS))
                if dealer in events:
                    while True:
                        try:
                            msg = dealer.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        try:
                            m = protocol.decode(msg, s.limits, shm)
                            if m.type == "heartbeat" and m.header["state"] == "serving":
                                continue  # the source probing us: the reply is our own heartbeat
                            if m.frame is None:
                                raise BadMessage("unexpected_type", expected("frame", m.type))
                        except BadMessage as exc:
                            counters.reject(exc, "the source")
                            if exc.reason == "shm_unavailable" and announce_shm:
                                # Cannot map the source's memory (another host, another user): stop
                                # announcing shm, so the source sends pixels inline from now on.
                                log.warning("%s: cannot use shared-memory frames (%s): asking for inline pixels",
                                            identity, str(exc)[:200])
                                announce_shm = False
                            if not pending:  # the source counted it in flight: credit it back now
                                done += 1
                                tell_source("credit")
                            else:  # behind frames still in the model: credited when they are done
                                rejected_behind.append(finished + pending)
                            continue
                        m.frame.stamps["worker_recv"] = time.monotonic_ns()
                        if not pending:
                            busy_since = time.monotonic()
                        pending += 1
                        shm_refs.append(m.shm)
                        inbox.put(m.frame)
                if waker.r in events:
                    waker.drain()
                    deliver()
                now = time.monotonic()
                if pending and self.frame_timeout_s is not None and now - busy_since > self.frame_timeout_s:
                    counters.drops["frame_timeout"] += pending
                    log.error("%s: the model has been busy for %.1f s (limit %.1f s): exiting to be restarted",
                              identity, now - busy_since, self.frame_timeout_s)
                    _send_quiet(push, counters.stats_message(frames=done), counters, "stats")
                    # Those frames are dealt with (counted above): the source must not count them again as
                    # worker_lost when this worker goes, nor send a frame that hangs the model to another.
                    # Window 0: a frame it sent on this credit would be lost with the worker.
                    done += pending
                    tell_source("credit", window=0)
                    hung = True
                    return EXIT_HUNG
                # Until the first frame arrives, say hello often: the source may not be up yet.
                if now - last_sent >= (s.heartbeat_s if done or pending else min(0.1, s.heartbeat_s)):
                    tell_source("heartbeat")
                if now >= next_stats:
                    next_stats = now + s.stats_interval_s
                    _send_quiet(push, counters.stats_message(frames=done), counters, "stats")
            # Stopping: finish (or, after drain_s, abandon) the frame in hand so its result is not lost.
            deadline = time.monotonic() + s.drain_s
            while pending and time.monotonic() < deadline:
                waker.wait(0.05)
                deliver()
            if pending:
                counters.drops["abandoned_at_stop"] += pending
            while True:  # frames still queued on the socket: sent, so the source counts them in flight
                try:
                    msg = dealer.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    if protocol.decode(msg, s.limits, shm).frame is not None:
                        counters.drops["abandoned_at_stop"] += 1
                except BadMessage as exc:
                    counters.reject(exc, "the source")
            _send_quiet(push, counters.stats_message(frames=done), counters, "stats")
        finally:
            inbox.put(None)
            thread.join(timeout=0 if hung else s.drain_s)
            if shm is not None and not thread.is_alive():
                shm.close()
            counters.close_monitors()
            dealer.close(linger=500 if hung else 0)  # a hung worker's last credit must reach the source
            waker.close(writer_done=not thread.is_alive())
            push.close(linger=int(s.drain_s * 1000))  # results already sent must reach the hub
            if close is not None and not thread.is_alive():
                close()
        return EXIT_OK


# --------------------------------------------------------------------------- hub (first sink)


def without_input(h: dict[str, Any], payload: Sequence[Any]) -> list[Any] | None:
    """A result for the public (--bind) PUB: without its ``input`` part, the raw frame attached for the
    pipeline's own sinks (video, viewer). Integrators get results, never the patient's images as
    captured. None when the result carries no input part."""
    descs = h.get("parts") or []
    keep = [i for i, d in enumerate(descs) if d["name"] != "input"]
    if len(keep) == len(descs):
        return None
    return [protocol.encode_header({**h, "parts": [descs[i] for i in keep]}), *(payload[i] for i in keep)]


@dataclass
class HubNode:
    """Collects results/stats/events from every node, stamps sink_recv, aggregates Stats, fans out.

    - ``results`` PUB: [topic, header, parts...]; a slow subscriber loses messages at its HWM, never
      slows the hub. Topics: ``result/<stream>``, ``stats``, ``event``, ``error``.
    - ``record`` PUSH: [header, parts...] to the recorder; when its HWM is full the hub keeps a bounded
      backlog (in order) instead of dropping, so the recorder sees everything unless it falls behind
      by more than ``backlog`` messages or ``backlog_bytes`` (the oldest go first, counted as drops
      "recorder_backlog"). Bytes count: with --video each message carries the frame and the enhanced
      pixels (~1 MiB at 512x512 uint16), and a recorder stalled on a hung disk grew the supervisor by
      ~30 MiB/s without bound.
    """

    endpoints: Endpoints
    settings: NodeSettings = field(default_factory=NodeSettings)
    record: bool = False
    # An extra PUB for integrators, e.g. tcp://0.0.0.0:5555 (CURVE); results without their input part
    public_endpoint: str | None = None
    keep_results: int = 10000  # result summaries kept for the PipelineReport
    backlog: int = 20000
    backlog_bytes: int = 256 << 20
    name: str = "hub"
    # The public PUB's own settings (its security is the user's --keys / --insecure, not the CURVE the
    # supervisor puts on internal tcp channels); None: ``settings``.
    public_settings: NodeSettings | None = None

    def __post_init__(self) -> None:
        self.stats = Stats()
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)  # the newest error/event messages
        # every error/event ever received, by "error/<reason>" or "event/<event>" (bounded: at most
        # MAX_EVENT_KINDS keys, the rest under "other")
        self.event_counts: Counter[str] = Counter()
        # end_of_stream events (they carry the source's error), kept apart so that no flood of other
        # events can push them out of ``events``
        self.stream_ends: deque[dict[str, Any]] = deque(maxlen=64)
        self.summaries: deque[dict[str, Any]] = deque(maxlen=self.keep_results)
        self.nodes: dict[str, dict[str, Any]] = {}  # the latest stats message of each node
        self._raw_totals: dict[str, Counter[str]] = {}  # FRAME_TOTALS as each node last sent them
        self.results_recorded = 0  # results handed to the recorder's socket (the supervisor checks the file)
        self._delivered: set[tuple[str, int, int]] = set()  # (stream, capture_ns, seq) of the last results
        self._delivered_order: deque[tuple[str, int, int]] = deque()
        self._node_seen: dict[str, float] = {}  # when each node's stats last came
        self._retired_totals: dict[str, Counter[str]] = {}  # ... summed over its earlier incarnations
        self.counters = Counters(self.name)
        self.lock = threading.Lock()
        self.ready = threading.Event()

    def snapshot(self) -> dict[str, Any]:
        """Live stats for other threads (does not move the once-a-second fps window)."""
        with self.lock:
            self._merge_own_counters()
            return self.stats.snapshot(advance=False)

    def _retire_silent(self) -> bool:
        """Make room among MAX_NODES (under self.lock): every restart of a worker is a new node id, so a
        cart whose workers crash now and then reached 512 and lost later workers' counters. Nodes silent
        for RETIRE_AFTER_S (dead incarnations: live ones report every second) leave ``nodes``; their
        counters stay in the totals. True when room was made."""
        now = time.monotonic()
        silent = [n for n, t in self._node_seen.items() if now - t > RETIRE_AFTER_S]
        for node in silent:
            self.stats.retire_node(node)
            self.nodes.pop(node, None)
            del self._node_seen[node]
        return bool(silent)

    def _with_earlier_incarnations(self, h: dict[str, Any]) -> dict[str, Any]:
        """A node's stats header with the frame totals of its earlier incarnations added: a restarted
        source keeps the name "source" and counts from 0 again (a count that goes down says so)."""
        node = h["node"]
        raw = Counter({k: v for k in FRAME_TOTALS if isinstance(v := h.get(k), int) and not isinstance(v, bool)})
        last = self._raw_totals.get(node)
        if last and any(raw[k] < v for k, v in last.items()):
            self._retired_totals.setdefault(node, Counter()).update(last)
            self.stats.retire_node(node)  # its drop / rejected / transport counts start again too
        self._raw_totals[node] = raw
        base = self._retired_totals.get(node)
        return {**h, **{k: base[k] + raw[k] for k in FRAME_TOTALS if k in h}} if base else h

    def _merge_own_counters(self) -> None:  # under self.lock; monitor sockets stay in the hub thread
        self.stats.set_node_counters(self.name, "rejected", self.counters.rejected)
        self.stats.set_node_counters(self.name, "transport", self.counters.transport)
        self.stats.set_node_counters(self.name, "drops", self.counters.drops)

    def run(self, ctx: zmq.Context, stop: threading.Event) -> int:
        s = self.settings
        pull = open_socket(ctx, zmq.PULL, s, bind=self.endpoints.collect)
        pubs = [open_socket(ctx, zmq.PUB, s, bind=self.endpoints.results, receives=False)]
        if self.public_endpoint:
            pubs.append(open_socket(ctx, zmq.PUB, self.public_settings or s, bind=self.public_endpoint,
                                    receives=False))
            # the bound address: a wildcard port (tcp://127.0.0.1:*) was never said anywhere
            log.info("%s: results for subscribers on %s", self.name, pubs[-1].last_endpoint.decode())
        for pub in pubs:
            pub.sndhwm = 64
        rec = None
        if self.record:
            rec = open_socket(ctx, zmq.PUSH, s, bind=self.endpoints.record, receives=False, heartbeats=False)
            rec.sndhwm = RECORD_HWM  # beyond it the byte-bounded backlog holds them
        monitors = [self.counters.monitor(pull)] + [self.counters.monitor(p) for p in pubs[1:]]
        backlog: deque[tuple[list[Any], int, bool]] = deque()  # (message parts, their bytes, a result?)
        held = 0  # bytes in the backlog
        next_stats = time.monotonic() + s.stats_interval_s
        quiet_since: float | None = None
        self.ready.set()

        def to_recorder(parts: list[Any] | None = None, result: bool = False) -> None:
            nonlocal held
            if rec is None:
                return
            if parts is not None:
                size = sum(memoryview(p).nbytes for p in parts)
                backlog.append((parts, size, result))
                held += size
                while len(backlog) > self.backlog or (held > self.backlog_bytes and len(backlog) > 1):
                    held -= backlog.popleft()[1]
                    self.counters.drops["recorder_backlog"] += 1
            while backlog:
                try:
                    protocol.send(rec, backlog[0][0], zmq.NOBLOCK)
                except zmq.Again:
                    return
                _, size, was_result = backlog.popleft()
                held -= size
                self.results_recorded += was_result

        def publish(topic: str, parts: list[Any], public: list[Any] | None = None) -> None:
            """``public``: what the --bind PUB gets instead of ``parts`` (None: the same)."""
            for i, pub in enumerate(pubs):
                try:
                    body = parts if i == 0 or public is None else public
                    protocol.send(pub, [topic.encode(), *body], zmq.NOBLOCK)
                except zmq.Again:
                    pass
            to_recorder(parts, topic.startswith("result"))

        def emit_stats() -> None:
            with self.lock:
                self._merge_own_counters()
                snap = self.stats.snapshot(recent=LIVE_STATS_RESULTS)
            publish("stats", protocol.encode_control("stats", node="pipeline", t_ns=time.monotonic_ns(), stats=snap))

        def handle(msg: list[Any]) -> None:
            try:
                m = protocol.decode(msg, s.limits)
            except BadMessage as exc:
                with self.lock:
                    self.counters.reject(exc, "a node")
                return
            h = m.header
            if m.type == "result":
                now = time.monotonic_ns()
                r = m.result
                if r is None:
                    return
                frame = (r.stream_id, r.capture_ns, r.seq)
                if frame in self._delivered:  # not a lost frame: a second result of one already passed on
                    with self.lock:
                        self.counters.transport["duplicate_results"] += 1
                    return
                self._delivered.add(frame)
                self._delivered_order.append(frame)
                if len(self._delivered_order) > DELIVERED_WINDOW:
                    self._delivered.discard(self._delivered_order.popleft())
                r.stamps["sink_recv"] = now
                h.setdefault("stamps", {})["sink_recv"] = now
                with self.lock:
                    self.stats.add(r.stream_id, r.seq, r.stamps, r.timings_ms, r.provenance)
                    self.summaries.append({"stream": r.stream_id, "seq": r.seq, "worker": h.get("worker", ""),
                                           "stamps": dict(r.stamps), "detections": len(r.detections)})
                publish(f"result/{r.stream_id}", [protocol.encode_header(h), *msg[1:]],
                        without_input(h, msg[1:]) if len(pubs) > 1 else None)
            elif m.type == "stats":  # a node's cumulative counters
                with self.lock:
                    if h["node"] not in self.nodes and len(self.nodes) >= MAX_NODES and not self._retire_silent():
                        self.counters.reject(BadMessage("too_many_nodes", expected(f"<= {MAX_NODES} nodes",
                                                                                    h["node"][:64])))
                        return
                    h = self._with_earlier_incarnations(h)
                    self.nodes[h["node"]] = h
                    self._node_seen[h["node"]] = time.monotonic()
                    for kind in ("drops", "rejected", "transport"):
                        if isinstance(h.get(kind), dict):
                            try:
                                self.stats.set_node_counters(h["node"], kind, h[kind])
                            except (TypeError, ValueError):
                                self.counters.rejected["bad_counters"] += 1
            elif m.type in ("event", "error"):
                kind = f"{m.type}/{h['event'] if m.type == 'event' else h['reason']}"
                if kind == "event/end" or (kind == "event/end_of_stream" and h.get("node") != "source"):
                    # Only the hub says "end" (sinks stop on it) and only the source ends the stream: a
                    # node sending either would stop the recording and every subscriber mid-run.
                    with self.lock:
                        self.counters.reject(BadMessage("reserved_event", expected(
                            "'end' from the hub only, 'end_of_stream' from the source", h.get("node"))))
                    return
                with self.lock:
                    self.events.append(h)
                    if kind in self.event_counts or len(self.event_counts) < MAX_EVENT_KINDS:
                        self.event_counts[kind] += 1
                    else:
                        self.event_counts[f"{m.type}/other"] += 1
                    if kind == "event/end_of_stream":
                        self.stream_ends.append(h)
                publish(m.type, list(msg))
            else:
                with self.lock:
                    self.counters.reject(BadMessage("unexpected_type", expected("result/stats/event/error",
                                                                                         m.type)))

        try:
            # After stop: keep draining until the collect socket has been quiet for 0.2 s (bounded).
            stop_deadline: float | None = None
            while True:
                now = time.monotonic()
                if stop.is_set():
                    stop_deadline = stop_deadline or now + s.drain_s
                    if (quiet_since is not None and now - quiet_since > 0.2) or now >= stop_deadline:
                        break
                if pull.poll(100):
                    quiet_since = None
                    while True:
                        try:
                            handle(pull.recv_multipart(zmq.NOBLOCK, copy=False))
                        except zmq.Again:
                            break
                        except (KeyError, TypeError, ValueError, AttributeError) as exc:
                            # A header the protocol checks let through must cost one message, not the hub
                            # (and with it the pipeline): counted like any rejected message.
                            with self.lock:
                                self.counters.reject(BadMessage("bad_header", f"unusable header: {type(exc).__name__}: "
                                                                              f"{str(exc)[:200]}"), "a node")
                else:
                    quiet_since = quiet_since or now
                    to_recorder()  # retry a backlog while nothing new arrives
                if any(mon.poll(0) for mon in monitors):
                    with self.lock:
                        self.counters.drain_monitors()  # only this thread touches the monitor sockets
                if time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + s.stats_interval_s
                    emit_stats()
            emit_stats()
            publish("event", protocol.encode_control("event", node=self.name, event="end", t_ns=time.monotonic_ns()))
            deadline = time.monotonic() + s.drain_s
            while backlog and rec is not None and time.monotonic() < deadline:
                try:
                    protocol.send(rec, backlog[0][0], zmq.NOBLOCK)
                    self.results_recorded += backlog.popleft()[2]
                except zmq.Again:
                    time.sleep(0.01)
            if backlog:
                self.counters.drops["recorder_backlog"] += len(backlog)
        finally:
            with self.lock:
                self._merge_own_counters()
            self.counters.close_monitors()
            pull.close(linger=0)
            for pub in pubs:
                pub.close(linger=200)
            if rec is not None:
                rec.close(linger=int(s.drain_s * 1000))  # what we queued must reach the recorder
        return EXIT_OK
