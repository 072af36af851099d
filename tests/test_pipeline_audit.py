"""Fixes from the pipeline audit, each over real sockets: stream ids receivers refuse, a run that gets no
result back, a credit with a huge ``done``, the hub's bounded event list, several runs in one record
directory, the headless viewer's default folder, the recorder under a process-group SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from test_pipeline_faults import start_cli, wait_for

from edge_runtime.errors import ConfigError, InputError, ProtocolError
from edge_runtime.frames import Frame
from edge_runtime.pipeline import cli, protocol
from edge_runtime.pipeline.builtins import BuiltinProcessor, SyntheticSource
from edge_runtime.pipeline.nodes import MAX_EVENTS, Endpoints, NodeSettings, SourceNode
from edge_runtime.pipeline.protocol import Limits
from edge_runtime.pipeline.recorder import RESULTS_FILE, read_records, runs
from edge_runtime.pipeline.supervisor import PipelineConfig, Supervisor, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
DICOM_UID = "1.2.826.0.1.3680043.8.498.10227395345216453462712835438290457262.dcm"  # 68 characters


# --------------------------------------------------------------------------- 1: stream ids


@pytest.mark.parametrize("stream", ["IM 0001", "Doe^John", DICOM_UID, "", "caf\u00e9", "a/b"])
def test_encode_frame_refuses_a_stream_id_every_receiver_would_reject(stream: str) -> None:
    frame = Frame(pixels=np.zeros((2, 2), np.uint8), stream_id=stream, seq=1)
    with pytest.raises(ProtocolError) as info:
        protocol.encode_frame(frame)
    text = str(info.value)
    assert "1-64 characters from [A-Za-z0-9_.:-]" in text  # the rule
    assert repr(stream[:64] + ("..." if len(stream) > 64 else "")) in text  # the value, repr'd and cut
    assert DICOM_UID not in text  # never more than 64 characters of it


def test_encode_frame_accepts_every_id_receivers_accept() -> None:
    for stream in ("0", "probe0", "a:b-c.d_e", "x" * 64):
        h, _ = protocol.encode_frame(Frame(pixels=np.zeros((2, 2), np.uint8), stream_id=stream, seq=1))
        assert protocol.decode([h, np.zeros((2, 2), np.uint8)]).frame.stream_id == stream  # type: ignore[union-attr]


def test_a_source_with_an_unsendable_stream_id_fails_with_a_clear_error() -> None:
    report = run_pipeline(SyntheticSource(count=20, streams=("IM 0001",)), BuiltinProcessor("detect"), mode="thread",
                          policy="all")
    assert report.results == 0
    assert report.source_error is not None and "stream id of 1-64 characters" in report.source_error
    assert report.exit_codes["source"] == 3
    assert not report.rejected  # nothing rejectable was sent: the workers refused nothing


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return parser.parse_args(argv)


def test_cli_fails_when_frames_were_read_but_every_one_was_rejected(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # Receivers that accept no frame of this size: every frame is rejected by the worker (dims_too_large).
    monkeypatch.setattr(cli, "_settings", lambda options: NodeSettings(limits=Limits(max_dim=16)))
    code = cli.run(_cli(["--source", "synthetic:32x32", "--processor", "identity", "--mode", "thread", "--fast",
                         "--duration", "20"]))
    out = capsys.readouterr().out
    assert code == 1, out
    assert "0 results" in out and "no result came back" in out and "dims_too_large" in out


# --------------------------------------------------------------------------- 2: a credit with a huge done


def _endless_source(tmp_path: Path) -> tuple[Endpoints, zmq.Context, zmq.Socket, threading.Event, threading.Thread]:
    """A SourceNode running in a thread over ipc (an endless 100 fps stream of 8x8 frames), and a PULL
    bound where the hub would be; the test plays the workers."""
    ep = Endpoints.ipc(tmp_path)
    ctx = zmq.Context()
    hub = ctx.socket(zmq.PULL)
    hub.bind(ep.collect)

    def frames() -> Iterator[Frame]:
        for seq in itertools.count():
            yield Frame(pixels=np.zeros((8, 8), np.uint8), seq=seq, stream_id="s")
            time.sleep(0.01)

    stop = threading.Event()
    source = threading.Thread(target=SourceNode(frames, ep, NodeSettings(stats_interval_s=0.2)).run, args=(ctx, stop),
                              daemon=True)
    source.start()
    return ep, ctx, hub, stop, source


def test_a_credit_with_a_huge_done_is_counted_and_the_source_serves_on(tmp_path: Path) -> None:
    ep, ctx, hub, stop, source = _endless_source(tmp_path)
    evil, good = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        for sock, name in ((evil, b"evil"), (good, b"good")):
            sock.setsockopt(zmq.ROUTING_ID, name)
            sock.connect(ep.frames)
        evil.send_multipart(protocol.encode_control("credit", worker="evil", done=0, window=1))
        assert evil.poll(5000), "the source sent the first worker nothing"
        evil.recv_multipart()
        evil.send_multipart(protocol.encode_control("credit", worker="evil", done=2**62, window=1))
        # A well-behaved worker: one credit per frame received, for 1.5 s.
        done = got = 0
        good.send_multipart(protocol.encode_control("credit", worker="good", done=0, window=1))
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            if good.poll(100) and protocol.decode(good.recv_multipart()).type == "frame":
                got += 1
                done += 1
                good.send_multipart(protocol.encode_control("credit", worker="good", done=done, window=1))
        assert got >= 10, f"the good worker got {got} frames in 1.5 s"
        stop.set()
        source.join(3)
        assert not source.is_alive(), "the source did not stop"
        rejected: dict = {}
        while hub.poll(500):
            m = protocol.decode(hub.recv_multipart())
            if m.type == "stats":
                rejected = m.header["rejected"]
        assert rejected.get("bad_credit") == 1
    finally:
        stop.set()
        source.join(3)
        for sock in (evil, good, hub):
            sock.close(linger=0)
        if not source.is_alive():  # a frozen source still holds its sockets: term() would block
            ctx.term()


def test_a_leaving_workers_window_0_credit_gets_it_no_more_frames(tmp_path: Path) -> None:
    """A worker past --frame-timeout credits its frame as done and exits. With window 1 that credit made
    it ready, the source sent it the next frame, and that frame was lost with it (worker_lost, 2-7 per
    14 timeouts on a loaded machine). Its last credit says window 0: the source sends nothing more and
    counts nothing when it goes."""
    ep, ctx, hub, stop, source = _endless_source(tmp_path)
    leaving = ctx.socket(zmq.DEALER)
    try:
        leaving.setsockopt(zmq.ROUTING_ID, b"leaving")
        leaving.connect(ep.frames)
        leaving.send_multipart(protocol.encode_control("credit", worker="leaving", done=0, window=1))
        assert leaving.poll(5000), "the source sent the worker nothing"
        while protocol.decode(leaving.recv_multipart()).type != "frame":  # probes ("serving" heartbeats)
            assert leaving.poll(5000), "the source sent the worker no frame"
        leaving.send_multipart(protocol.encode_control("credit", worker="leaving", done=1, window=0))
        deadline, kinds = time.monotonic() + 0.7, []
        while time.monotonic() < deadline:
            if leaving.poll(50):
                kinds.append(protocol.decode(leaving.recv_multipart()).type)
        assert "frame" not in kinds, f"a frame was sent to a worker that said window 0: {kinds}"
        leaving.close(linger=0)
        time.sleep(1.0)  # the source finds it gone (probes every 0.25 s)
        stop.set()
        source.join(3)
        stats: dict = {}
        while hub.poll(500):
            m = protocol.decode(hub.recv_multipart())
            if m.type == "stats":
                stats = m.header
        assert stats["rejected"] == {} and stats["drops"].get("worker_lost", 0) == 0, stats
    finally:
        stop.set()
        source.join(3)
        for sock in (leaving, hub):
            sock.close(linger=0)
        if not source.is_alive():
            ctx.term()


# --------------------------------------------------------------------------- 3: the hub's events are bounded


def _always_fails():
    def process(frame: Frame):
        raise InputError("expected a frame of modality ['US'], found XR")
    return process


def test_a_model_failing_on_every_frame_leaves_a_bounded_event_list_and_exact_counts() -> None:
    n = 2 * MAX_EVENTS
    report = run_pipeline(SyntheticSource(count=n, shape=(16, 16)), _always_fails, mode="thread", policy="all",
                          window=2)
    assert report.results == 0 and report.drops["processor_error"] == n
    assert len(report.events) == MAX_EVENTS  # the newest ones
    assert report.event_counts["error/processor_error"] == n
    assert report.event_counts["event/end_of_stream"] == 1
    assert report.source_error is None
    assert report.no_results() is not None and f"{n} frame(s) read" in report.no_results()  # type: ignore[operator]


# --------------------------------------------------------------------------- 4: runs in one record directory


def test_a_reused_record_directory_keeps_runs_apart(tmp_path: Path) -> None:
    reports = [run_pipeline(SyntheticSource(count=12), BuiltinProcessor("detect"), mode="thread", policy="all",
                            record_dir=tmp_path) for _ in range(2)]
    path = tmp_path / RESULTS_FILE
    assert runs(path) == [r.run_id for r in reports] and reports[0].run_id != reports[1].run_id
    latest = [r for r in read_records(path, sort=True) if r["type"] == "result"]
    assert [r["seq"] for r in latest] == list(range(12))  # one run, not two interleaved
    assert {r["run_id"] for r in read_records(path)} == {reports[1].run_id}
    first = [r["seq"] for r in read_records(path, sort=True, run=reports[0].run_id) if r["type"] == "result"]
    assert first == list(range(12))
    both = [(r["run_id"], r["seq"]) for r in read_records(path, sort=True, run="all") if r["type"] == "result"]
    assert both == [(rid, seq) for rid in runs(path) for seq in range(12)]


def test_a_restarted_recorder_appends_to_its_run(tmp_path: Path) -> None:
    config = PipelineConfig(record_dir=str(tmp_path), restart_backoff_s=(0.05, 0.1),
                            settings=NodeSettings(drain_s=0.5))
    sup = Supervisor(SyntheticSource(count=None, fps=50, shape=(16, 16)), BuiltinProcessor("detect"), config)
    path = tmp_path / RESULTS_FILE
    sup.start()
    try:
        wait_for(lambda: path.exists() and path.read_text().count('"type":"result"') >= 5, 10, "results")
        sup.handle("recorder").request_stop()
        wait_for(lambda: sup.handle("recorder").restarts == 1, 10, "the recorder to be restarted")
        wait_for(lambda: path.read_text().count('"recorder_started"') == 2 and
                 path.read_text().rsplit('"recorder_started"', 1)[1].count('"type":"result"') >= 5, 10,
                 "results from the restarted recorder")
    finally:
        report = sup.stop()
    records = read_records(path)
    assert len(records) == len(path.read_text().splitlines())  # the latest run is the whole file
    assert {r["run_id"] for r in records} == {report.run_id}
    assert sum(1 for r in records if r.get("event") == "recorder_started") == 2


# --------------------------------------------------------------------------- 5: headless --view


def test_plain_view_without_a_display_writes_snapshots_under_the_record_dir(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    report = run_pipeline(SyntheticSource(count=20, shape=(64, 80)), BuiltinProcessor("identity+detect"),
                          mode="thread", record_dir=tmp_path / "rec", view=True, policy="all")
    assert report.results == 20
    assert list((tmp_path / "rec" / "view").glob("*.png")), "plain --view on a headless machine showed nothing"


# --------------------------------------------------------------------------- 6: PROTOCOL.md matches the code


def test_protocol_doc_states_the_shared_memory_names_and_backends_the_code_uses() -> None:
    doc = (ROOT / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    assert "`edge-[0-9]{1,10}-[0-9a-f]{12}`" in doc and "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}" not in doc
    assert protocol.SHM_NAME_RE.match("edge-4711-0123456789ab") and not protocol.SHM_NAME_RE.match("my-segment")
    backends = (ROOT / "edge_runtime" / "backends" / "onnxruntime.py").read_text(encoding="utf-8")
    assert 'name = "onnxruntime"' in backends
    assert '"backend":"onnxruntime-cpu"' not in doc and "`backend` (`onnxruntime`, `tensorrt`" in doc


# --------------------------------------------------------------------------- 7: SIGTERM to the process group


@pytest.mark.slow
def test_sigterm_to_the_process_group_still_records_the_end(tmp_path: Path) -> None:
    proc = start_cli(["--source", "synthetic:64x64", "--loop", "--processor", "detect+slow:100", "--record",
                      str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    path = tmp_path / RESULTS_FILE
    try:
        wait_for(lambda: path.exists() and path.read_text().count('"type":"result"') >= 5, 30, "results")
        os.killpg(proc.pid, signal.SIGTERM)  # what a service manager or `kill -- -PGID` does
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[-1]["event"] == "recorder_stopped" and lines[-1]["clean_end"] is True
    assert lines[-2]["event"] == "end"  # the hub's last message, after its final stats
    assert not lines[-1]["drops"] and "recorder_backlog" not in out


def test_realtime_over_a_source_without_a_frame_rate_replays_every_frame(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """An image folder has no frame rate: "latest frame wins" would re-read it as fast as it decodes
    and drop most frames as superseded; the run replays every frame at the pipeline's pace instead."""
    import cv2

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(12):
        cv2.imwrite(str(folder / f"f{i:02d}.png"), np.full((32, 32), i * 10, np.uint8))
    code = cli.run(_cli(["--source", str(folder), "--processor", "identity", "--mode", "thread",
                         "--duration", "20"]))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "no frame rate" in out and "12 results" in out and "drops: none" in out


# --------------------------------------------------------------------------- second audit (2026-12-03)


def test_null_where_an_object_belongs_reads_as_absent_and_the_hub_serves_on() -> None:
    """A result header with "stamps": null (or parts/detections null) passed the checks but crashed the
    hub's h.setdefault("stamps", {}) and the recorder: the hub died and the pipeline with it."""
    import orjson

    from edge_runtime.pipeline.nodes import HubNode

    h = {"v": 1, "type": "result", "stream": "s0", "seq": 1, "capture_ns": 5, "stamps": None, "parts": None,
         "detections": None, "timings_ms": None}
    m = protocol.decode([orjson.dumps(h)])
    assert m.result is not None and m.result.stamps == {} and m.result.detections == []
    assert not {"stamps", "parts", "detections", "timings_ms"} & set(m.header)
    ctx = zmq.Context()
    ep = Endpoints.inproc()
    hub = HubNode(ep, NodeSettings())
    stop = threading.Event()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            hub.run(ctx, stop)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    push = ctx.socket(zmq.PUSH)
    try:
        assert hub.ready.wait(5)
        push.linger = 0
        push.connect(ep.collect)
        push.send_multipart([orjson.dumps(h)])
        push.send_multipart([orjson.dumps({**h, "seq": 2, "stamps": {"capture": 1}})])
        wait_for(lambda: len(hub.summaries) == 2, 5, "both results summarised by the hub")
        assert t.is_alive() and not errors
    finally:
        stop.set()
        t.join(5)
        push.close()
        ctx.term()


def test_a_second_video_of_a_stream_never_overwrites_the_first(tmp_path: Path) -> None:
    """A restarted recorder (or a reused record directory) opened <stream>.mp4 again: VideoWriter
    truncated the earlier recording."""
    from edge_runtime.pipeline.recorder import VideoSink
    from edge_runtime.results import Result

    def message(seq: int) -> protocol.Message:
        f = Frame(np.full((64, 64), seq % 255, np.uint8), stream_id="s0", seq=seq)
        parts = protocol.encode_result(Result("s0", seq, 1), frame=f, attach_input=True)
        return protocol.decode([bytes(memoryview(p)) for p in parts])

    first = VideoSink(tmp_path, 30.0)
    for s in range(20):
        first.add(message(s))
    first.close()
    size = first.paths[0].stat().st_size
    second = VideoSink(tmp_path, 30.0)
    second.add(message(100))
    second.close()
    assert first.paths[0].stat().st_size == size and second.paths[0] != first.paths[0]
    assert second.paths[0].name.startswith("s0-2.")


def test_a_line_cut_by_a_power_cut_does_not_spoil_the_next_run(tmp_path: Path) -> None:
    from edge_runtime.pipeline.recorder import JsonlWriter

    path = tmp_path / RESULTS_FILE
    w = JsonlWriter(path)
    w.write({"type": "result", "stream": "s0", "seq": 1, "run_id": "a"})
    w.close()
    with open(path, "ab") as f:
        f.write(b'{"type":"result","stream":"s0","se')  # the power cut
    assert len(read_records(path, run="all")) == 1
    w = JsonlWriter(path)  # the next run, same directory
    w.write({"type": "event", "event": "recorder_started", "run_id": "b"})
    w.close()
    assert [r["run_id"] for r in read_records(path, run="all")] == ["a", "b"]
    assert runs(path) == ["a", "b"]


def test_latest_only_subscriber_ends_cleanly_and_keeps_its_idle_rule() -> None:
    """The receiver thread (Subscriber(latest_only=True)) must not change how iteration ends: stats keep
    an idle display alive (the first version counted only results), the 'end' event ends the thread
    too (it went on decoding for ever), and a terminated shared context ends the iteration with
    ContextTerminated (it spun for ever)."""
    import threading

    from edge_runtime.pipeline.client import Subscriber
    from edge_runtime.results import Result

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{port}"
    try:
        sub = Subscriber(endpoint, latest_only=True, idle_timeout_s=0.6, context=ctx)
        time.sleep(0.3)
        stop_stats = threading.Event()

        def stats() -> None:
            while not stop_stats.wait(0.1):
                pub.send_multipart([b"stats", *protocol.encode_control("stats", node="pipeline", stats={})])

        sender = threading.Thread(target=stats, daemon=True)
        sender.start()
        t0 = time.monotonic()
        threading.Timer(1.5, stop_stats.set).start()  # stats for 1.5 s, then silence
        got = list(sub)  # no results, only stats ...
        waited = time.monotonic() - t0
        sender.join()
        assert got == []
        assert waited > 1.8, waited  # ... ended 0.6 s after the stats stopped, not 0.6 s after the start
        sub.close()
        with Subscriber(endpoint, latest_only=True, idle_timeout_s=10, context=ctx) as sub:
            time.sleep(0.3)
            pub.send_multipart([b"result/s", *protocol.encode_result(Result("s", 1, 1000))])
            pub.send_multipart([b"event", *protocol.encode_control("event", node="hub", event="end")])
            assert [r.seq for r in sub] == [1]
            assert sub._receiver is not None
            sub._receiver.join(2)
            assert not sub._receiver.is_alive()  # the thread ended with the stream
        shared = Subscriber(endpoint, latest_only=True, context=ctx)  # no idle timeout
        caught: list[BaseException] = []

        def consume() -> None:
            try:
                list(shared)
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                caught.append(exc)

        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        time.sleep(0.3)
    finally:
        pub.close()
    ctx.term()  # the receiver closes its socket on ContextTerminated, so term() returns
    consumer.join(5)
    assert not consumer.is_alive() and caught and isinstance(caught[0], zmq.ContextTerminated), caught


def test_latest_only_never_hands_out_an_older_result_than_it_did() -> None:
    """Two workers' results out of order: the newest queued wins, and one older than the last handed out
    is dropped (docs/PROTOCOL.md section 6), not returned."""
    from edge_runtime.pipeline.client import Subscriber
    from edge_runtime.results import Result

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub = Subscriber(f"tcp://127.0.0.1:{port}", latest_only=True, idle_timeout_s=1.0, context=ctx)
    try:
        time.sleep(0.3)  # the subscription reaches the publisher

        def send(seq: int) -> None:
            pub.send_multipart([b"result/s0", *protocol.encode_result(Result("s0", seq, 1000 + seq))])

        send(10)
        send(7)
        time.sleep(0.2)
        it = iter(sub)
        assert next(it).seq == 10
        send(15)
        send(12)  # late: older than 15 in the same burst
        time.sleep(0.2)
        assert next(it).seq == 15
        send(14)  # late: older than the 15 handed out
        send(16)
        time.sleep(0.2)
        assert next(it).seq == 16
        assert sub.dropped == 3
    finally:
        sub.close()
        pub.close()
        ctx.term()


def test_run_over_an_image_folder_takes_modality_and_bit_depth_flags(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`run` had no --modality / --bits-stored: a folder of radiograph PNGs reached the model as "OT"
    frames and every one was refused (0 results). Now the flags exist, and without --modality the run is
    refused up front, as `infer` does."""
    import cv2

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(2):
        cv2.imwrite(str(folder / f"f{i}.png"), np.full((64, 64), 1000 + i, np.uint16))
    common = ["--source", str(folder), "--bundle", "xr-denoise", "--mode", "thread", "--fast", "--duration", "30"]
    with pytest.raises(ConfigError, match="--modality for a folder of images"):
        cli.run(_cli(common))
    record = tmp_path / "rec"
    code = cli.run(_cli([*common, "--modality", "DX", "--bits-stored", "12", "--stream-id", "cart-1",
                         "--record", str(record)]))
    out = capsys.readouterr().out
    assert code == 0 and "2 results of 2 frames" in out, out
    assert {r["stream"] for r in read_records(record / RESULTS_FILE) if r.get("type") == "result"} == {"cart-1"}
    # A file of the folder that cannot be read was logged and nothing more: 'drops: none', exit 0.
    (folder / "f1.png").write_bytes(b"not a png")
    code = cli.run(_cli([*common, "--modality", "DX", "--bits-stored", "12"]))
    out = capsys.readouterr().out
    assert code == 1 and "1 results of 1 frames" in out and "'unreadable_file': 1" in out, out


def test_the_recorder_backlog_is_bounded_in_bytes() -> None:
    """With --video each record message carries ~1 MiB of pixels, so a count bound let a stalled recorder
    grow the supervisor without bound (1.4 GiB in 45 s in a review). Here: no recorder at all, a
    backlog of 4 KiB, 200 events of ~150 bytes: most are dropped and counted, the hub keeps going."""
    from edge_runtime.pipeline.nodes import HubNode

    hub = HubNode(Endpoints.inproc(), NodeSettings(), record=True, backlog_bytes=4096)
    with _hub_running(hub) as push:
        for i in range(200):
            push.send_multipart(protocol.encode_control("event", node="w0", event=f"note{i % 3}",
                                                        t_ns=time.monotonic_ns()))
        deadline = time.monotonic() + 10
        while hub.counters.drops["recorder_backlog"] < 150:
            assert time.monotonic() < deadline, dict(hub.counters.drops)
            time.sleep(0.02)


@contextlib.contextmanager
def _hub_running(hub: Any) -> Iterator[zmq.Socket]:
    """A HubNode in a thread on its inproc endpoints; yields a PUSH socket connected to its COLLECT."""
    ctx = zmq.Context()
    stop = threading.Event()
    thread = threading.Thread(target=hub.run, args=(ctx, stop), daemon=True)
    thread.start()
    try:
        assert hub.ready.wait(10)
        push = ctx.socket(zmq.PUSH)
        push.linger = 0
        push.connect(hub.endpoints.collect)
        yield push
        push.close(linger=0)
    finally:
        stop.set()
        thread.join(20)
        ctx.destroy(linger=0)
    assert not thread.is_alive()


def test_stats_keep_a_bounded_number_of_timing_names_and_counters() -> None:
    """A review's results with ever new timings_ms names grew Stats by 192001 keys and a 13 MB stats
    header (which every sink then refused as too large)."""
    from edge_runtime.telemetry import MAX_COUNTER_KEYS, MAX_TIMING_KEYS, Stats

    stats = Stats()
    for i in range(500):
        stats.add("s", i, {}, timings_ms={f"stage{i}": 1.0, "infer": 2.0})
    assert len(stats.timings) == MAX_TIMING_KEYS and len(stats.timings["infer"]) == 500
    with pytest.raises(ValueError, match="at most"):
        stats.set_node_counters("w0", "drops", {f"cause{i}": 1 for i in range(MAX_COUNTER_KEYS + 1)})


def test_a_restarted_source_adds_to_the_totals_instead_of_replacing_them() -> None:
    """The source is always named "source" and counts from 0 again after a restart: its predecessor's
    frames read and drops vanished from the report (85 read, then 83 after the restart)."""
    from edge_runtime.pipeline.nodes import HubNode

    hub = HubNode(Endpoints.inproc(), NodeSettings())
    stats = {"node": "source", "frames_read": 85, "frames_sent": 80}
    assert hub._with_earlier_incarnations(stats)["frames_read"] == 85
    assert hub._with_earlier_incarnations({**stats, "frames_read": 90, "frames_sent": 86})["frames_read"] == 90
    restarted = hub._with_earlier_incarnations({"node": "source", "frames_read": 3, "frames_sent": 2})
    assert (restarted["frames_read"], restarted["frames_sent"]) == (93, 88)
    later = hub._with_earlier_incarnations({"node": "source", "frames_read": 10, "frames_sent": 9})
    assert (later["frames_read"], later["frames_sent"]) == (100, 95)
    hub.stats.set_node_counters("source", "drops", {"superseded": 56})
    hub._with_earlier_incarnations({"node": "source", "frames_read": 1, "frames_sent": 1})  # restarted again
    hub.stats.set_node_counters("source", "drops", {"superseded": 2})  # the new incarnation's first
    assert hub.stats.totals("drops") == {"superseded": 58}


def test_dead_node_ids_leave_the_table_and_keep_their_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every worker restart is a new node id: after 512 the hub refused later workers' stats
    (too_many_nodes) and their drops went uncounted. Silent nodes now make room, counts kept."""
    from edge_runtime.pipeline import nodes

    monkeypatch.setattr(nodes, "MAX_NODES", 3)
    monkeypatch.setattr(nodes, "RETIRE_AFTER_S", 0.0)
    hub = nodes.HubNode(Endpoints.inproc(), NodeSettings())
    with _hub_running(hub) as push:
        for i in range(8):
            push.send_multipart(protocol.encode_control("stats", node=f"w0.{i}.1.abcd", drops={"frame_timeout": 1}))
        deadline = time.monotonic() + 10
        while hub.snapshot()["drops"].get("frame_timeout", 0) < 8:
            assert time.monotonic() < deadline, hub.snapshot()["drops"]
            time.sleep(0.02)
        assert "too_many_nodes" not in hub.snapshot()["rejected"] and len(hub.nodes) <= 3
