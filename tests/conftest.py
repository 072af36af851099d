"""Shared test set-up: the repo root on sys.path so tests run before `pip install -e .`, and a
harness that drives one pipeline worker from a hand-made source."""

import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# File sources make a per-install pseudonym key on first use (edge_runtime.pseudonym): the suite's
# goes to a temporary folder, not the home directory of whoever runs it (inherited by subprocesses).
os.environ.setdefault("EDGE_RUNTIME_PSEUDONYM_KEY", os.path.join(tempfile.mkdtemp(prefix="edge-tests-"), "pseudonym.key"))


@dataclass
class LoneWorker:
    """One WorkerNode thread driven by a hand-made source: the test sends frames on ``router`` and
    reads results, events and stats on ``pull``; ``stop`` + ``thread`` end it."""

    router: Any
    pull: Any
    stop: threading.Event
    thread: threading.Thread


@pytest.fixture
def lone_worker(tmp_path: Path) -> Iterator[Callable[..., LoneWorker]]:
    """``start(processor, **WorkerNode options)``: a WorkerNode on ipc endpoints under tmp_path, its
    source (ROUTER) and collector (PULL) sockets bound here; stopped and closed after the test."""
    import zmq

    from edge_runtime.pipeline.nodes import Endpoints, NodeSettings, WorkerNode

    ctx = zmq.Context()
    started: list[LoneWorker] = []

    def start(processor: Any, *, heartbeat_s: float = 0.2, **options: Any) -> LoneWorker:
        ep = Endpoints.ipc(tmp_path)
        router, pull = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PULL)
        router.bind(ep.frames)
        pull.bind(ep.collect)
        stop = threading.Event()
        worker = WorkerNode(processor, ep, NodeSettings(heartbeat_s=heartbeat_s), **options)
        thread = threading.Thread(target=worker.run, args=(ctx, stop), daemon=True)
        thread.start()
        started.append(LoneWorker(router, pull, stop, thread))
        return started[-1]

    yield start
    for w in started:
        w.stop.set()
        w.thread.join(5)
        w.router.close(linger=0)
        w.pull.close(linger=0)
    ctx.term()
