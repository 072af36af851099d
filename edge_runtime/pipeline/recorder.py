"""Recorder sink: JSONL of every result, event and stats message, and optionally an annotated video.

Durability: each record is written with one ``os.write`` of a whole line (no user-space buffer), so
a crash or SIGKILL leaves only complete lines already handed to the kernel; ``os.fsync`` runs every
``fsync_every`` records, every ``fsync_interval_s`` and at stop, so a power cut loses at most that
window. On SIGTERM the recorder goes on recording until the hub's ``end`` event arrives (the
pipeline's final stats come just before it) or ``end_timeout_s`` passes, then fsyncs and exits.
Lines are in arrival order; each carries stream and seq (``read_records(sort=True)`` orders).

Runs: re-using a record directory appends to the same ``results.jsonl``. Every line carries the
``run_id`` of the supervisor run that wrote it (one id per run, the same across recorder restarts
within that run, so a restarted recorder appends to its run), and ``read_records`` returns the
latest run by default (``run="all"`` for every line, ``run=<id>`` for one; ``runs`` lists them).

The video (``<stream>.mp4``, MJPG ``.avi`` if mp4v is unavailable; ``<stream>-2.mp4`` and so on when
an earlier file is there: a restarted recorder or a reused directory never overwrites one) shows the input with detections
and masks next to the enhanced output; late results (older seq than the last frame written) are
skipped so the video never goes backwards. A video is finalised at a clean stop only; the JSONL is
the durable record.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from ..errors import ConfigError, InputError, expected
from ..outputs import FILE_MODE, file_stem, private_dir
from . import protocol
from .nodes import (
    EXIT_OK,
    RECORD_HWM,
    Counters,
    Endpoints,
    NodeSettings,
    Position,
    is_late,
    open_socket,
    position,
)
from .protocol import BadMessage, Message

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"


class JsonlWriter:
    """Append-only JSON lines: whole-line writes, fsync by count and by time."""

    def __init__(self, path: str | os.PathLike, fsync_every: int = 50, fsync_interval_s: float = 1.0) -> None:
        self.path = Path(path)
        private_dir(self.path.parent)
        try:  # O_NOFOLLOW: a link planted in a shared record folder would take the results elsewhere
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, FILE_MODE)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise ConfigError(expected(f"{self.path.name} in the record folder as a regular file",
                                       "a symbolic link (refused: the results would go wherever it points)")) from None
        if _ends_torn(self.path):  # a power cut mid-line last time: end that fragment before appending
            os.write(self.fd, b"\n")
        self.fsync_every = fsync_every
        self.fsync_interval_s = fsync_interval_s
        self.unsynced = 0
        self.written = 0
        self.last_sync = time.monotonic()

    def write(self, record: dict[str, Any]) -> None:
        data = memoryview((json.dumps(record, separators=(",", ":"), default=str) + "\n").encode("utf-8"))
        while data:
            n = os.write(self.fd, data)
            data = data[n:]
        self.written += 1
        self.unsynced += 1
        if self.unsynced >= self.fsync_every:
            self.sync()

    def maybe_sync(self) -> None:
        if self.unsynced and time.monotonic() - self.last_sync >= self.fsync_interval_s:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.fd)
        self.unsynced = 0
        self.last_sync = time.monotonic()

    def close(self) -> None:
        if self.fd >= 0:
            self.sync()
            os.close(self.fd)
            self.fd = -1


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _ends_torn(path: Path) -> bool:
    """True when a non-empty file does not end with a newline (its last line was cut off)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _read_all(path: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise InputError(expected("a recorder JSONL file", str(p)))
    text = p.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    complete = lines[:-1]  # whatever follows the last newline is incomplete (or empty)
    out = []
    for line in complete:
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a power cut, closed off by the next run's writer
            continue
    return out


def runs(path: str | os.PathLike) -> list[str]:
    """The run ids in a recorder JSONL, in the order their first line was written ("" for lines
    written before run ids existed)."""
    return list(dict.fromkeys(r.get("run_id", "") for r in _read_all(path)))


def read_records(path: str | os.PathLike, sort: bool = False, run: str = "latest") -> list[dict[str, Any]]:
    """Read a recorder JSONL; a torn line (a power cut mid-write: the last line, or one the next run's
    writer closed off with a newline before appending) is skipped.

    ``run``: ``"latest"`` (default) the lines of the run that wrote the last line, ``"all"`` every
    line, or one run id. ``sort``: results by (stream, seq) within each run, runs in the order they
    started, then the other records in file order.
    """
    records = _read_all(path)
    if run == "latest":
        run = records[-1].get("run_id", "") if records else ""
    if run != "all":
        records = [r for r in records if r.get("run_id", "") == run]
    if sort:
        order = {rid: i for i, rid in enumerate(dict.fromkeys(r.get("run_id", "") for r in records))}
        results = sorted((r for r in records if r.get("type") == "result"),
                         key=lambda r: (order[r.get("run_id", "")], r["stream"], r["seq"]))
        return results + [r for r in records if r.get("type") != "result"]
    return records


class VideoSink:
    """One annotated video per stream, opened at the first frame's size."""

    def __init__(self, out_dir: Path, fps: float) -> None:
        self.out_dir = out_dir
        self.fps = fps
        self.writers: dict[str, Any] = {}
        self.sizes: dict[str, tuple[int, int]] = {}
        self.last: dict[str, Position] = {}  # per stream: the newest result written
        self.paths: list[Path] = []
        self.failed = False

    def _open(self, stream: str, size: tuple[int, int]) -> Any:
        import cv2

        safe = file_stem(stream)
        for suffix, fourcc in ((".mp4", "mp4v"), (".avi", "MJPG")):
            # Never over an earlier file (a restarted recorder, a reused directory): VideoWriter truncates.
            # A name held by a link, even a dangling one, is taken (O_EXCL would refuse it: a crash).
            path = next(p for k in range(1, 10_000) if not os.path.lexists(
                p := self.out_dir / (f"{safe}{suffix}" if k == 1 else f"{safe}-{k}{suffix}")))
            # Made 0640 first (patient images, edge_runtime.outputs): VideoWriter truncates it and
            # keeps the mode, whenever its backend creates the file.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE))
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), self.fps, size)
            if writer.isOpened():
                self.paths.append(path)
                return writer
            writer.release()
            path.unlink(missing_ok=True)
        raise InputError(expected("an OpenCV VideoWriter for mp4v or MJPG", "neither opens"))

    def add(self, message: Message) -> bool:
        import cv2

        from .viewer import compose

        stream, pos = message.header["stream"], position(message.header)
        if is_late(pos, self.last.get(stream)):
            return False
        self.last[stream] = pos
        img = compose(message)
        if img.shape[0] % 2 or img.shape[1] % 2:
            # MPEG-4 wants even sizes, and FFmpeg scaled an odd one (333x257 input: 664x256 video, no longer
            # pixel for pixel): one black row / column at the bottom / right instead.
            img = cv2.copyMakeBorder(img, 0, img.shape[0] % 2, 0, img.shape[1] % 2, cv2.BORDER_CONSTANT, value=0)
        if stream not in self.writers:
            self.sizes[stream] = (img.shape[1], img.shape[0])
            self.writers[stream] = self._open(stream, self.sizes[stream])
        if (img.shape[1], img.shape[0]) != self.sizes[stream]:
            img = cv2.resize(img, self.sizes[stream])
        self.writers[stream].write(img)
        return True

    def close(self) -> None:
        for writer in self.writers.values():
            writer.release()
        self.writers.clear()


@dataclass
class RecorderNode:
    endpoints: Endpoints
    out_dir: str
    settings: NodeSettings = field(default_factory=NodeSettings)
    video: bool = False
    video_fps: float = 30.0
    fsync_every: int = 50
    fsync_interval_s: float = 1.0
    name: str = "recorder"
    # After SIGTERM, how long to go on recording while waiting for the hub's ``end`` (None: the
    # settings' drain_s + 2 s, within the time the supervisor gives a stopping recorder)
    end_timeout_s: float | None = None
    # Written into every line; the supervisor gives all incarnations of its recorder the same one.
    run_id: str = field(default_factory=new_run_id)

    def _record(self, m: Message, writer: JsonlWriter, videos: VideoSink | None, counters: Counters) -> bool:
        """Write one message; returns True on the hub's final ``end`` event."""
        record = dict(m.header)
        record.pop("v", None)
        record["run_id"] = self.run_id
        if m.type == "result":
            record.setdefault("stamps", {})["record"] = time.monotonic_ns()
            record["parts"] = [p["name"] for p in record.get("parts", [])]
        writer.write(record)
        if m.type == "result" and videos is not None and not videos.failed and m.arrays:
            try:
                videos.add(m)
            except InputError as exc:  # no codec: the JSONL goes on without video
                counters.drops["video"] += 1
                log.error("%s: video disabled: %s", self.name, exc)
                videos.close()
                videos.failed = True
            except OSError:
                raise
            except Exception as exc:  # noqa: BLE001 - a result OpenCV cannot draw: that frame only, never the recording
                counters.drops["video_frame"] += 1
                log.warning("%s: a result could not be drawn into the video (%s): frame left out",
                            self.name, type(exc).__name__)
        return m.type == "event" and m.header.get("event") == "end"

    def run(self, ctx: zmq.Context, stop: threading.Event) -> int:
        s = self.settings
        out = Path(self.out_dir)
        counters = Counters(self.name)
        writer = JsonlWriter(out / RESULTS_FILE, self.fsync_every, self.fsync_interval_s)
        videos = VideoSink(out, self.video_fps) if self.video else None
        pull = open_socket(ctx, zmq.PULL, s, connect=self.endpoints.record, heartbeats=False)
        pull.rcvhwm = RECORD_HWM
        writer.write({"type": "event", "event": "recorder_started", "node": self.name, "pid": os.getpid(),
                      "t_ns": time.monotonic_ns(), "run_id": self.run_id})
        ended = False

        def drain(deadline: float) -> bool:
            while time.monotonic() < deadline:
                try:
                    parts = pull.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return False
                try:
                    m = protocol.decode(parts, s.limits)
                except BadMessage as exc:
                    counters.reject(exc, self.endpoints.record)
                    continue
                if self._record(m, writer, videos, counters):
                    return True
            return False

        try:
            while not stop.is_set() and not ended:
                if pull.poll(200):
                    ended = drain(time.monotonic() + 1.0)
                writer.maybe_sync()
            if not ended:
                # SIGTERM. Sent to the whole process group it reaches this recorder while the
                # supervisor is still stopping the source and workers, before the hub's final stats
                # and ``end``: keep recording until ``end`` arrives or end_timeout_s passes.
                deadline = time.monotonic() + (s.drain_s + 2.0 if self.end_timeout_s is None else self.end_timeout_s)
                while not ended and time.monotonic() < deadline:
                    if pull.poll(100):
                        ended = drain(deadline)
                    writer.maybe_sync()
            if not ended:  # SIGTERM without an end: what is queued already is written, not dropped
                ended = drain(time.monotonic() + 1.0)
        finally:
            writer.write({"type": "event", "event": "recorder_stopped", "node": self.name, "t_ns": time.monotonic_ns(),
                          "records": writer.written, "rejected": dict(counters.rejected), "drops": dict(counters.drops),
                          "clean_end": ended, "run_id": self.run_id})
            writer.close()
            if videos is not None:
                videos.close()
            pull.close(linger=0)
        return EXIT_OK
