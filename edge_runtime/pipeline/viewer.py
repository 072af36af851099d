"""Viewer sink: a window where a display exists, periodic PNG snapshots where not; plus the drawing
code the recorder's annotated video shares.

Display is latest-only: a reader thread takes every message off the SUB socket as it arrives and
keeps only the newest result per stream, which the next draw shows; results older than one already
taken for drawing (a slower worker's) are dropped as late.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from ..outputs import file_stem, private_dir, write_image
from . import protocol
from .nodes import EXIT_OK, Counters, NodeSettings, Position, is_late, open_socket, position
from .protocol import BadMessage, Message

log = logging.getLogger(__name__)

COLORS = [(0, 200, 255), (80, 255, 80), (255, 120, 60), (200, 80, 255)]  # BGR, cycled by label


def to_display(pixels: np.ndarray, bits_stored: int | None = None, photometric: str = "MONOCHROME2") -> np.ndarray:
    """Any frame (uint8/uint16/float32, gray or RGB) as 8-bit BGR for drawing and video."""
    import cv2

    px = np.asarray(pixels)
    if px.dtype == np.uint8:
        img = px
    elif px.dtype == np.uint16:
        top = float(2 ** (bits_stored or 16) - 1)
        img = np.clip(px.astype(np.float32) * (255.0 / top), 0, 255).astype(np.uint8)
    else:  # float32: [0, 1] images as such, anything else min-max
        lo, hi = float(np.nanmin(px)), float(np.nanmax(px))
        if lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
        img = np.clip((px - lo) * (255.0 / max(hi - lo, 1e-6)), 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":  # high values are dark: show it the way a reader expects
        img = 255 - img
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[..., 0], cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(np.ascontiguousarray(img[..., :3]), cv2.COLOR_RGB2BGR)


def draw_overlay(img: np.ndarray, header: dict[str, Any], masks: np.ndarray | None) -> np.ndarray:
    import cv2

    img = img.copy()
    labels: dict[str, int] = {}
    if masks is not None and masks.shape[1:] == img.shape[:2]:
        for i, mask in enumerate(masks):
            tint = np.array(COLORS[i % len(COLORS)], np.float32)
            sel = mask > 0
            img[sel] = (0.6 * img[sel] + 0.4 * tint).astype(np.uint8)
    for det in header.get("detections", []):
        color = COLORS[labels.setdefault(det["label"], len(labels)) % len(COLORS)]
        x0, y0, x1, y1 = (round(v) for v in det["box"])
        cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), color, 1)
        cv2.putText(img, f"{det['label']} {det['score']:.2f}", (x0, max(y0 - 3, 10)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4, color, 1, cv2.LINE_AA)
    return img


def compose(message: Message) -> np.ndarray:
    """Input (with detections and masks) and enhanced output side by side, as BGR uint8."""
    import cv2

    h = message.header
    bits, photometric = h.get("bits_stored") or None, h.get("photometric", "MONOCHROME2")
    panels = []
    source = message.arrays.get("input")
    if source is None:
        source = message.arrays.get("enhanced")
    if source is not None:
        panels.append(draw_overlay(to_display(source, bits, photometric), h, message.arrays.get("masks")))
    if "input" in message.arrays and "enhanced" in message.arrays:
        enhanced = to_display(message.arrays["enhanced"], bits, photometric)
        if enhanced.shape != panels[0].shape:
            enhanced = cv2.resize(enhanced, (panels[0].shape[1], panels[0].shape[0]))
        panels.append(enhanced)
    if not panels:  # a result without pixels: draw the boxes on a blank canvas
        boxes = [d["box"] for d in h.get("detections", [])]
        w = int(max([b[2] for b in boxes], default=256)) + 8
        hh = int(max([b[3] for b in boxes], default=256)) + 8
        panels.append(draw_overlay(np.zeros((min(hh, 2048), min(w, 2048), 3), np.uint8), h, None))
    img = np.hstack(panels) if len(panels) > 1 else panels[0]
    e2e = ""
    stamps = h.get("stamps", {})
    if "capture" in stamps and "sink_recv" in stamps:
        e2e = f"  {(stamps['sink_recv'] - stamps['capture']) / 1e6:.1f} ms"
    cv2.putText(img, f"{h['stream']} #{h['seq']}{e2e}", (4, img.shape[0] - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                (255, 255, 255), 1, cv2.LINE_AA)
    return img


def has_display() -> bool:
    """A display server is reachable and this OpenCV build has a GUI (opencv-python, not -headless)."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        import cv2

        cv2.namedWindow("edge-runtime-probe", cv2.WINDOW_NORMAL)
        cv2.destroyWindow("edge-runtime-probe")
        return True
    except Exception:  # noqa: BLE001 - cv2.error "The function is not implemented" on headless builds
        return False


@dataclass
class ViewerNode:
    """Shows the newest result per stream in a window, or writes PNG snapshots every interval."""

    endpoint: str
    settings: NodeSettings = field(default_factory=NodeSettings)
    snapshot_dir: str | None = None
    snapshot_interval_s: float = 1.0
    keep_snapshots: int = 200
    window: bool | None = None  # None: a window if a display exists, else snapshots
    name: str = "viewer"
    # Where snapshots go when there is no window and no snapshot_dir (plain ``--view`` on a headless
    # machine); None: nothing is shown then.
    headless_dir: str | None = None

    def _write_png(self, out: Path, message: Message, written: list[Path]) -> None:
        path = write_image(out / f"{file_stem(message.header['stream'])}_{message.header['seq']:08d}.png", compose(message))
        written.append(path)
        while len(written) > self.keep_snapshots:
            written.pop(0).unlink(missing_ok=True)

    def _show(self, draw: Any, counters: Counters) -> bool:
        """One result drawn; one that cannot be (a result the protocol accepts but OpenCV cannot draw)
        is counted and skipped, never the viewer."""
        try:
            draw()
        except OSError:
            raise  # a full disk or a removed folder: not this result's fault
        except Exception as exc:  # noqa: BLE001 - cv2.error and friends; never log the pixels
            counters.drops["undrawable"] += 1
            log.warning("%s: a result could not be drawn (%s): skipped", self.name, type(exc).__name__)
            return False
        return True

    def run(self, ctx: zmq.Context, stop: threading.Event) -> int:
        s = self.settings
        counters = Counters(self.name)
        use_window = has_display() if self.window is None else self.window
        out = Path(self.snapshot_dir) if self.snapshot_dir else None
        if not use_window and out is None:
            if self.headless_dir:
                out = Path(self.headless_dir)
                log.info("%s: no display: writing PNG snapshots to %s", self.name, out.absolute())
            else:
                log.warning("%s: no display and no snapshot folder: nothing to show", self.name)
        if out is not None:
            private_dir(out)
        sub = open_socket(ctx, zmq.SUB, s, connect=self.endpoint)
        sub.rcvhwm = 8
        sub.setsockopt(zmq.SUBSCRIBE, b"result/")
        sub.setsockopt(zmq.SUBSCRIBE, b"event")
        # A thread of its own reads the socket all the time, keeping only the newest result per stream:
        # drained between draws, a draw slower than the frame interval let the queues fill with results
        # from the start of the draw (PUB drops the new ones when full), so the next draw showed those.
        latest: dict[str, Message] = {}
        shown: dict[str, Position] = {}
        lock = threading.Lock()
        news, ended, quit_reader = threading.Event(), threading.Event(), threading.Event()
        failed: list[BaseException] = []

        def receive() -> None:
            try:
                while not (stop.is_set() or quit_reader.is_set() or ended.is_set()):
                    if not sub.poll(100):
                        continue
                    while True:
                        try:
                            parts = sub.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        try:
                            m = protocol.decode(parts[1:], s.limits)
                        except BadMessage as exc:
                            counters.reject(exc, self.endpoint)
                            continue
                        if m.type == "event" and m.header.get("event") == "end":
                            ended.set()
                        if m.type != "result":
                            continue
                        stream, pos = m.header["stream"], position(m.header)
                        with lock:
                            if is_late(pos, shown.get(stream)) or is_late(
                                    pos, position(latest[stream].header) if stream in latest else None):
                                counters.drops["late"] += 1
                                continue
                            if stream in latest:
                                counters.drops["superseded_at_viewer"] += 1
                            latest[stream] = m
                        news.set()
            except BaseException as exc:  # noqa: BLE001 - raised in the node's own thread below
                failed.append(exc)
            finally:
                news.set()  # wake the drawing loop to see why the reader stopped

        def take() -> dict[str, Message]:
            """The newest result per stream, for drawing; from now on the floor for lateness (a result
            older than one taken arriving while it is drawn would be drawn after it)."""
            with lock:
                batch = dict(latest)
                latest.clear()
                news.clear()
                for stream, m in batch.items():
                    shown[stream] = position(m.header)  # only ever forward: older ones never enter latest
            return batch

        reader = threading.Thread(target=receive, name=f"{self.name}-reader", daemon=True)
        next_snapshot = time.monotonic()
        written: list[Path] = []
        try:
            reader.start()
            while not stop.is_set():
                news.wait(0.1)
                if use_window:
                    import cv2

                    for stream, m in take().items():
                        self._show(lambda m=m, stream=stream: cv2.imshow(f"edge-runtime {stream}", compose(m)),
                                   counters)
                    cv2.waitKey(1)
                elif out is not None and latest and (time.monotonic() >= next_snapshot or not reader.is_alive()):
                    # (a bare truth test of ``latest``: the reader only adds under the lock; due at once after
                    # the end event, or a long interval would keep the node up that long)
                    next_snapshot = time.monotonic() + self.snapshot_interval_s
                    for m in take().values():
                        self._show(lambda m=m: self._write_png(out, m, written), counters)
                elif out is None:
                    take()  # nothing to show: results are only counted
                else:
                    news.clear()  # between snapshots: the newest stays for the next one
                alive = reader.is_alive()  # read before ``failed``: a reader failing in between is seen
                if failed:
                    raise failed[0]
                if not alive and not latest:  # the end event (or stop) and all shown
                    break
        finally:
            quit_reader.set()
            if reader.is_alive() or reader.ident is not None:
                reader.join()
            sub.close(linger=0)
            if use_window:
                import cv2

                cv2.destroyAllWindows()
        return EXIT_OK
