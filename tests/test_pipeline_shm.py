"""The optional shared-memory payload path (docs/PROTOCOL.md 3.1): ring, references, slot reuse guard."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.errors import ConfigError, ProtocolError
from edge_runtime.frames import Frame
from edge_runtime.pipeline import protocol
from edge_runtime.pipeline.builtins import BuiltinProcessor, SyntheticSource, pixel_crc
from edge_runtime.pipeline.nodes import Endpoints
from edge_runtime.pipeline.protocol import BadMessage, ShmMap, ShmRing
from edge_runtime.pipeline.recorder import RESULTS_FILE, read_records
from edge_runtime.pipeline.supervisor import PipelineConfig, run_pipeline

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs POSIX shared memory at /dev/shm")


def _pixels(seed: int, shape: tuple[int, int] = (48, 64)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4096, size=shape, dtype=np.uint16)


def test_ring_hands_out_each_slot_once_until_released() -> None:
    ring = ShmRing(100, 2)
    try:
        assert ring.slot_bytes % 4096 == 0 and ring.free == 2
        a, b = ring.alloc(), ring.alloc()
        assert {a, b} == {0, 1}
        assert ring.alloc() is None  # full: the source sends inline rather than overwrite a held slot
        with pytest.raises(ProtocolError):
            ring.release(7)
        ring.release(a)
        with pytest.raises(ProtocolError):
            ring.release(a)  # twice
        assert ring.alloc() == a
        with pytest.raises(ProtocolError):
            ring.write(a, np.zeros(8192, np.uint8))  # larger than a slot
    finally:
        ring.close()
    assert not Path("/dev/shm", ring.name).exists()  # unlinked


def test_shm_frame_round_trip_is_a_read_only_view_and_a_rewrite_is_detected() -> None:
    ring, shm = ShmRing(_pixels(0).nbytes, 2), ShmMap()
    try:
        pixels = _pixels(1)
        slot = ring.alloc()
        assert slot is not None
        ref = ring.write(slot, pixels)
        parts = protocol.encode_frame(Frame(pixels=pixels, bits_stored=12, seq=3), ref)
        assert len(parts) == 1 and json.loads(parts[0])["shm"] == ref  # no pixel part on the wire
        m = protocol.decode(parts, shm=shm)
        assert m.frame is not None and m.shm == ref
        np.testing.assert_array_equal(m.frame.pixels, pixels)
        assert not m.frame.pixels.flags.writeable
        assert shm.intact(ref)
        ring.write(slot, _pixels(2))  # what a source would do had it reused the slot too early
        assert not shm.intact(ref)
        with pytest.raises(BadMessage) as err:  # a stale reference is refused on arrival too
            protocol.decode(parts, shm=shm)
        assert err.value.reason == "bad_shm"
        with pytest.raises(BadMessage) as err:  # a receiver without shm support
            protocol.decode(parts)
        assert err.value.reason == "shm_unavailable"
        with pytest.raises(BadMessage) as err:  # a pixel part as well: the header says there is none
            protocol.decode([parts[0], pixels.tobytes()], shm=shm)
        assert err.value.reason == "bad_parts"
        del m
    finally:
        shm.close()
        ring.close()


@pytest.mark.parametrize("change, reason", [
    ({"name": "../etc/passwd"}, "bad_shm"),
    ({"name": ".."}, "bad_shm"),
    ({"name": 5}, "bad_shm"),
    ({"name": "PostgreSQL.1234"}, "bad_shm"),  # another program's segment: not ours by name
    ({"offset": -1}, "bad_shm"),
    ({"offset": True}, "bad_shm"),
    ({"offset": 1 << 40}, "bad_shm"),
    ({"gen_offset": 3}, "bad_shm"),
    ({"gen": 0}, "bad_shm"),
    ({"name": "edge-1-000000000000"}, "shm_unavailable"),
])
def test_bad_shm_references_are_rejected(change: dict, reason: str) -> None:
    ring, shm = ShmRing(_pixels(0).nbytes, 1), ShmMap()
    try:
        pixels = _pixels(0)
        ref = {**ring.write(0, pixels), **change}
        header = json.loads(protocol.encode_frame(Frame(pixels=pixels, bits_stored=12))[0])
        header["shm"] = ref
        with pytest.raises(BadMessage) as err:
            protocol.decode([json.dumps(header).encode()], shm=shm)
        assert err.value.reason == reason
    finally:
        shm.close()
        ring.close()


def test_worker_drops_a_result_whose_slot_was_rewritten_while_it_worked(lone_worker) -> None:
    """The generation check: a slot rewritten during processing (only possible for a worker the
    source declared lost) costs a counted drop, never a result computed from mixed pixels."""
    w = lone_worker(BuiltinProcessor("hold:300"), name="wx", shm=True)
    router, pull, stop, thread = w.router, w.pull, w.stop, w.thread
    ring = ShmRing(_pixels(0).nbytes, 1)

    def credit(done: int) -> bytes:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if router.poll(200):
                ident, header = router.recv_multipart()
                h = protocol.decode([header]).header
                if h["done"] == done:
                    assert h.get("shm") is True  # it announces that it maps shared memory
                    return ident
        raise AssertionError(f"no credit with done={done}")

    def result() -> protocol.Message:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if pull.poll(200):
                m = protocol.decode(pull.recv_multipart())
                if m.type == "result":
                    return m
        raise AssertionError("no result")

    try:
        ident = credit(0)
        good = _pixels(1)
        router.send_multipart([ident, *protocol.encode_frame(Frame(pixels=good, bits_stored=12, seq=1),
                                                             ring.write(0, good))])
        m = result()
        assert m.result is not None and m.result.seq == 1
        assert m.result.detections[0].label == f"crc:{pixel_crc(good):08x}:intact"
        ident = credit(1)
        router.send_multipart([ident, *protocol.encode_frame(Frame(pixels=good, bits_stored=12, seq=2),
                                                             ring.write(0, good))])
        time.sleep(0.1)  # the worker holds frame 2 for 300 ms: rewrite its slot under it
        ring.write(0, _pixels(2))
        credit(2)  # the frame is still handed back (credit), but its result is dropped
        assert not pull.poll(300) or protocol.decode(pull.recv_multipart()).type != "result"
        stop.set()
        thread.join(5)
        stats = [m.header for m in (protocol.decode(pull.recv_multipart()) for _ in range(20) if pull.poll(300))
                 if m.type == "stats"]
        assert stats and stats[-1]["drops"].get("shm_overwritten") == 1
    finally:
        stop.set()
        thread.join(5)
        ring.close()


def _hold_labels(record_dir: Path) -> list[tuple[int, str]]:
    """(seq, label) of every result the recorder wrote (the ``hold`` processor's checksum verdict)."""
    return [(r["seq"], r["detections"][0]["label"]) for r in read_records(record_dir / RESULTS_FILE)
            if r.get("type") == "result"]


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_process_pipeline_over_shared_memory_delivers_every_frame_intact(transport: str, tmp_path: Path) -> None:
    source = SyntheticSource(count=60, shape=(96, 128), dtype="uint16")
    crcs = [pixel_crc(img) for img in source._images()]
    report = run_pipeline(source, BuiltinProcessor("hold:1"), n_workers=2, mode="process", transport=transport,
                          policy="all", window=2, shared_memory=True, record_dir=tmp_path)
    assert report.results == 60 and report.failure is None
    assert not {k: v for k, v in report.drops.items() if v} and not report.rejected
    src = next(h for name, h in report.nodes.items() if name.startswith("source"))
    assert src["frames_shm"] == 60  # every frame went through the ring, none inline
    labels = _hold_labels(tmp_path)
    assert sorted(seq for seq, _ in labels) == list(range(60))
    # Each result's checksum is the one of the image the source sent with that seq: right slot, intact.
    assert all(lbl == f"crc:{crcs[seq % len(crcs)]:08x}:intact" for seq, lbl in labels)


def test_a_slot_is_not_reused_while_a_slow_worker_still_reads_it(tmp_path: Path) -> None:
    """Latest-frame-wins, two workers, two slots: the source reads far faster than the workers (each
    holds its frame 40 ms and checksums it before and after), and while one worker reads a slot the
    other worker's next frame must go to the other slot, never over the one in use."""
    source = SyntheticSource(count=None, shape=(256, 256), dtype="uint16")
    crcs = [pixel_crc(img) for img in source._images()]
    report = run_pipeline(source, BuiltinProcessor("hold:40"), n_workers=2, mode="process", policy="latest",
                          shared_memory=True, shm_slots=2, duration=2.0, record_dir=tmp_path)
    assert report.results >= 10 and report.drops.get("superseded", 0) > report.results  # really outpaced
    assert not report.drops.get("shm_overwritten") and not report.rejected
    src = next(h for name, h in report.nodes.items() if name.startswith("source"))
    assert src["frames_shm"] >= report.results
    labels = _hold_labels(tmp_path)
    assert len(labels) == report.results
    assert all(lbl == f"crc:{crcs[seq % len(crcs)]:08x}:intact" for seq, lbl in labels)


def test_shared_memory_is_refused_where_it_cannot_work() -> None:
    with pytest.raises(ConfigError):
        PipelineConfig(mode="thread", shared_memory=True).validate()
    with pytest.raises(ConfigError):
        PipelineConfig(mode="process", shared_memory=True,
                       endpoints=Endpoints.tcp("10.1.2.3", (5001, 5002, 5003, 5004))).validate()
    PipelineConfig(mode="process", transport="tcp", shared_memory=True).validate()


def test_run_command_turns_shared_memory_on(capsys: pytest.CaptureFixture[str]) -> None:
    """`edge-runtime run --shared-memory` reaches the pipeline: accepted in process mode, and the
    same flag with --mode thread is refused by the pipeline's own check."""
    from edge_runtime.cli import main

    base = ["run", "--source", "synthetic:64x64", "--processor", "identity", "--fast", "--duration", "3"]
    assert main([*base, "--shared-memory"]) == 0
    assert "results" in capsys.readouterr().out
    assert main([*base, "--shared-memory", "--mode", "thread"]) != 0
    assert "shared_memory" in capsys.readouterr().err


def test_a_rejected_frame_does_not_credit_an_earlier_frame_still_in_the_model(lone_worker) -> None:
    """Credits are cumulative and the source frees slots oldest first, so a frame rejected while an
    earlier one is still being processed must be credited only after that one: otherwise its slot
    would be released (and could be rewritten) under the model."""
    w = lone_worker(BuiltinProcessor("hold:400"), heartbeat_s=0.1, name="w", window=2, shm=True)
    router, stop, thread = w.router, w.stop, w.thread
    px = _pixels(1)
    ring = ShmRing(px.nbytes, 2)
    try:
        assert router.poll(5000)
        ident, _ = router.recv_multipart()
        t0 = time.monotonic()
        router.send_multipart([ident, *protocol.encode_frame(Frame(pixels=px, bits_stored=12, seq=1),
                                                             ring.write(0, px))])
        time.sleep(0.05)
        bad = json.loads(protocol.encode_frame(Frame(pixels=px, bits_stored=12, seq=2), ring.write(1, px))[0])
        bad["shape"] = [9000, 2]  # dims the worker rejects
        router.send_multipart([ident, json.dumps(bad).encode()])
        credits = []  # (seconds since frame 1, done)
        while time.monotonic() - t0 < 1.5:
            if router.poll(20):
                h = json.loads(router.recv_multipart()[1])
                if "done" in h:
                    credits.append((time.monotonic() - t0, h["done"]))
        # Frame 1 is held 400 ms: no credit may cover anything before that, then both at once.
        assert all(done == 0 for t, done in credits if t < 0.35), credits
        assert credits and credits[-1][1] == 2, credits
    finally:
        stop.set()
        thread.join(5)
        ring.close()


def test_supervisor_unlinks_the_ring_of_a_killed_source(tmp_path: Path) -> None:
    """A source killed with SIGKILL cannot unlink its segment; the supervisor does, by its pid."""
    import signal

    from edge_runtime.pipeline.supervisor import Supervisor

    before = set(os.listdir("/dev/shm"))
    config = PipelineConfig(mode="process", policy="latest", shared_memory=True, shm_slots=2, duration_s=5.0)
    sup = Supervisor(SyntheticSource(count=None, shape=(64, 64), dtype="uint16"), BuiltinProcessor("hold:5"), config)
    sup.start()
    killed: list[str] = []
    try:
        deadline = time.monotonic() + 4
        while not killed and time.monotonic() < deadline:
            pid = sup.handle("source").pid
            ours = [n for n in os.listdir("/dev/shm") if pid is not None and n.startswith(f"edge-{pid}-")]
            if ours:
                killed.extend(ours)
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        while not sup.wait(0.2):
            pass
    finally:
        report = sup.report() if sup.wait(0) else sup.stop()
    assert killed, "the source never created its ring"
    assert report.restarts >= 1
    leftover = set(os.listdir("/dev/shm")) - before
    assert not any(n in leftover for n in killed), leftover


def test_transport_benchmark_shared_memory_row_delivers_every_frame(tmp_path: Path) -> None:
    """The benchmark's bare transport over shared memory (a real receiver process) delivers all frames,
    reusing its window's slots only after the receiver's credit (it raises when no slot is free)."""
    from benchmarks.bench_transport import credit_throughput

    images = [np.full((64, 64), i, np.uint16) for i in range(5)]
    out = credit_throughput(images, f"ipc://{tmp_path}/credit", 60, 3, shm=True)
    assert out["frames"] == 60 and out["shared_memory"] and out["fps"] > 0
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(f"edge-{os.getpid()}-")]  # ring unlinked


def test_a_start_sweeps_segments_whose_source_is_dead() -> None:
    """A whole pipeline SIGKILLed leaves its segments (no supervisor is left to unlink them): the next
    start with shared memory removes this user's segments whose owner pid no longer exists."""
    import os
    import subprocess
    import sys

    from edge_runtime.pipeline import protocol

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = f"/dev/shm/{protocol.SHM_PREFIX}{dead}-0123456789ab"
    alive = f"/dev/shm/{protocol.SHM_PREFIX}{os.getpid()}-ba9876543210"
    for path in (stale, alive):
        with open(path, "wb") as f:
            f.write(b"\0" * 64)
    try:
        gone = protocol.sweep_dead_owners()
        assert os.path.basename(stale) in gone and not os.path.exists(stale)
        assert os.path.exists(alive)  # its owner (this process) lives
    finally:
        for path in (stale, alive):
            if os.path.exists(path):
                os.unlink(path)
