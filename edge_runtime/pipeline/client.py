"""Client library for integrators: subscribe to a running pipeline's results.

    from edge_runtime.pipeline.client import Subscriber

    with Subscriber("tcp://cart.local:5555", curve_server_key="keys/server.key",
                    curve_client_secret="keys/viewer1.key_secret", idle_timeout_s=5) as sub:
        for result in sub:            # edge_runtime.results.Result objects
            print(result.seq, [d.label for d in result.detections])

Every receive has a timeout; iteration ends at the pipeline's ``end`` event, after ``idle_timeout_s``
without a message, or when ``close()`` is called from another thread. Messages are validated like
everywhere else (a bad one is counted in ``rejected`` and skipped). ``latest_only`` (for displays)
hands out only the newest result per stream: a thread of the Subscriber's own reads every message as
it arrives, so a consumer slower than the stream gets the result of the moment, not a queued one.
``reorder=N`` releases results in seq order using a window of N per stream (results from several
workers can arrive out of order).
"""

from __future__ import annotations

import heapq
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import zmq

from ..errors import ConfigError, expected
from ..results import Result
from . import protocol, security
from .nodes import Position, is_late
from .protocol import DEFAULT_LIMITS, BadMessage, Limits, Message


def _position(result: Result) -> Position:
    return result.capture_ns, result.seq


class Reorderer:
    """Releases results in capture order per stream (seq order within a source's run), holding at
    most ``window`` of them.

    Seq gaps are normal (superseded frames never reach a worker), so it never waits for a missing
    seq: the earliest held result goes out once more than ``window`` are held. A result captured
    before the last released one is late and dropped (counted in ``late``); a restarted source's
    seq 0 is captured later, so it follows (nodes.is_late).
    """

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ConfigError(expected("a reorder window >= 1", window))
        self.window = window
        self.heaps: dict[str, list[tuple[Position, int, Result]]] = {}
        self.released: dict[str, Position] = {}
        self.late = 0
        self._tie = 0

    def push(self, result: Result) -> list[Result]:
        if is_late(_position(result), self.released.get(result.stream_id)):
            self.late += 1
            return []
        heap = self.heaps.setdefault(result.stream_id, [])
        self._tie += 1
        heapq.heappush(heap, (_position(result), self._tie, result))
        out = []
        while len(heap) > self.window:
            out.append(self._pop(heap))
        return out

    def _pop(self, heap: list[tuple[Position, int, Result]]) -> Result:
        pos, _, result = heapq.heappop(heap)
        self.released[result.stream_id] = pos
        return result

    def flush(self) -> list[Result]:
        out = []
        for heap in self.heaps.values():
            while heap:
                out.append(self._pop(heap))
        return out


class Subscriber:
    """Iterate over a pipeline's results (``Result`` objects) from its PUB endpoint."""

    def __init__(self, endpoint: str, *, curve_server_key: str | os.PathLike | bytes | None = None,
                 curve_client_secret: str | os.PathLike | None = None, idle_timeout_s: float | None = None,
                 latest_only: bool = False, reorder: int = 0, topics: tuple[str, ...] = ("result/", "event"),
                 limits: Limits = DEFAULT_LIMITS, context: zmq.Context | None = None) -> None:
        if (curve_server_key is None) != (curve_client_secret is None):
            raise ConfigError(expected("both curve_server_key and curve_client_secret, or neither",
                                       "only one of them"))
        self.endpoint = endpoint
        self.idle_timeout_s = idle_timeout_s
        self.latest_only = latest_only
        self.reorderer = Reorderer(reorder) if reorder else None
        self.limits = limits
        self.rejected: Counter[str] = Counter()
        self.dropped = 0  # superseded under latest_only, or late under reorder
        self.ended = False
        self.last_stats: dict[str, Any] | None = None
        self._closed = threading.Event()
        self._owner = threading.get_ident()
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)
        self.sock.rcvhwm = 1000
        for topic in (*topics, "stats"):
            self.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        if curve_server_key is not None and curve_client_secret is not None:
            security.configure_client(self.sock, curve_client_secret, curve_server_key)
        self.sock.connect(endpoint)
        self._pending: list[Result] = []
        # latest_only: the newest result per stream not yet handed out, and the last one handed out
        self._latest: dict[str, Result] = {}
        self._handed: dict[str, Position] = {}
        self._changed = threading.Condition()
        self._error: BaseException | None = None
        self._receiver_done = False
        self._last_message = time.monotonic()
        self._receiver: threading.Thread | None = None
        if latest_only:  # from here on only this thread touches the socket
            self._receiver = threading.Thread(target=self._receive_latest, name="edge-subscriber", daemon=True)
            self._receiver.start()

    def receive(self, timeout_s: float | None = 1.0) -> Message | None:
        """The next valid message (result, event or stats), or None after ``timeout_s``. Not with
        ``latest_only``: a thread of the Subscriber's own reads the socket then (iterate instead)."""
        if self._receiver is not None and threading.current_thread() is not self._receiver:
            raise ConfigError(expected("iteration over a latest_only Subscriber", "a call to receive()"))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._closed.is_set():
            wait = 100 if deadline is None else max(0, min(100, int((deadline - time.monotonic()) * 1000)))
            if self.sock.poll(wait):
                parts = self.sock.recv_multipart(copy=False)
                try:
                    m = protocol.decode(parts[1:], self.limits)
                except BadMessage as exc:
                    self.rejected[exc.reason] += 1
                    continue
                if m.result is not None:
                    m.result.stamps["client_recv"] = time.monotonic_ns()
                if m.type == "stats":
                    self.last_stats = m.header.get("stats")
                return m
            if deadline is not None and time.monotonic() >= deadline:
                return None
        return None

    def _receive_latest(self) -> None:
        """The latest_only receiver thread: reads every message as it arrives and keeps only the newest
        result per stream. Draining only when the consumer asks cannot work: while a slow consumer is
        busy, the publisher's queue, the kernel's buffers and ours fill with results from the start of
        its pause (a PUB drops the new ones), so what it drained then was seconds old."""
        try:
            while not self._closed.is_set() and not self.ended:
                m = self.receive(0.1)
                if m is None:
                    continue
                self._last_message = time.monotonic()  # stats too: the pipeline is alive (idle_timeout_s)
                with self._changed:
                    if m.type == "event" and m.header.get("event") == "end":
                        self.ended = True  # nothing follows: the thread ends, the socket closes
                    elif m.result is not None:
                        self._offer(m.result)
                    else:
                        continue
                    self._changed.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the iterating thread, which raises it
            # (a terminated shared context included: ContextTerminated, as from receive() before)
            self._error = exc
        finally:
            self.sock.close(linger=0)
            with self._changed:
                self._receiver_done = True
                self._changed.notify_all()

    def _offer(self, r: Result) -> None:
        """Keep ``r`` if it is the newest of its stream; one not newer than the one held or last handed
        out is dropped (docs/PROTOCOL.md section 6). Called with ``_changed`` held."""
        held = self._latest.get(r.stream_id)
        if is_late(_position(r), _position(held) if held is not None else self._handed.get(r.stream_id)):
            self.dropped += 1
            return
        if held is not None:
            self.dropped += 1  # superseded by a newer one
        self._latest[r.stream_id] = r

    def _iter_latest(self) -> Iterator[Result]:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._latest) or self._receiver_done or self._closed.is_set(),
                                       timeout=0.2)
                out = None
                if self._latest:  # the stream waiting longest first; the others stay and may be superseded
                    out = min(self._latest.values(), key=lambda r: r.capture_ns)
                    del self._latest[out.stream_id]
                    self._handed[out.stream_id] = _position(out)
                elif self._error is not None:
                    raise self._error
                elif self._receiver_done or self._closed.is_set():
                    return  # the end event, or closed
            if out is not None:
                yield out
            elif self.idle_timeout_s is not None and time.monotonic() - self._last_message >= self.idle_timeout_s:
                return  # no message at all (results, events, stats) for idle_timeout_s

    def __iter__(self) -> Iterator[Result]:
        if self._receiver is not None:
            yield from self._iter_latest()
            return
        last = time.monotonic()
        while not self._closed.is_set():
            if self._pending:
                yield self._pending.pop(0)
                continue
            if self.ended:
                break
            m = self.receive(0.2)
            now = time.monotonic()
            if m is None:
                if self.idle_timeout_s is not None and now - last >= self.idle_timeout_s:
                    break
                continue
            last = now
            if m.type == "event" and m.header.get("event") == "end":
                self.ended = True
                continue
            if m.result is None:
                continue
            if self.reorderer is not None:
                before = self.reorderer.late
                self._pending.extend(self.reorderer.push(m.result))
                self.dropped += self.reorderer.late - before
            else:
                yield m.result
        if self.reorderer is not None:
            yield from self.reorderer.flush()

    def close(self) -> None:
        """Stop iteration; from another thread this only signals, the owning thread releases the socket."""
        self._closed.set()
        if threading.get_ident() == self._owner:
            self._release()

    def _release(self) -> None:
        self._closed.set()
        if self._receiver is not None:
            self._receiver.join(timeout=2.0)  # it closes the socket within 0.1 s
        elif not self.sock.closed:
            self.sock.close(linger=0)
        if self._own_ctx and not self.ctx.closed:
            self.ctx.term()

    def __enter__(self) -> Subscriber:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self._release()
