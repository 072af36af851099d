"""Faults: malformed and oversized messages, a failing model, a SIGKILLed worker, a SIGTERMed recorder,
a SIGTERMed pipeline. Real sockets and real processes; every wait has a deadline."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from edge_runtime.errors import BundleError
from edge_runtime.frames import Frame
from edge_runtime.pipeline import protocol
from edge_runtime.pipeline.builtins import BuiltinProcessor, SyntheticSource
from edge_runtime.pipeline.client import Subscriber
from edge_runtime.pipeline.nodes import NodeSettings
from edge_runtime.pipeline.protocol import Limits
from edge_runtime.pipeline.recorder import RESULTS_FILE, read_records
from edge_runtime.pipeline.supervisor import PipelineConfig, Supervisor, run_pipeline
from edge_runtime.results import Result

ROOT = Path(__file__).resolve().parents[1]


def _kill_after(sup: Supervisor, node: str, results: int) -> Any:
    """Start ``sup``, SIGKILL ``node`` once ``results`` results are in, let the run end (60 s at most)."""
    sup.start()
    try:
        wait_for(lambda: sup.hub.snapshot()["results"] >= results, 30, f"{results} results")
        os.kill(sup.handle(node).pid, signal.SIGKILL)
        assert sup.wait(60)
    finally:
        report = sup.report() if sup.wait(0) else sup.stop()
    return report


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


_RUN_CLI = ("import argparse, sys; from edge_runtime.pipeline import cli; p = argparse.ArgumentParser(); "
            "cli.configure(p); sys.exit(cli.run(p.parse_args(sys.argv[1:])))")


def start_cli(args: list[str], **popen: object) -> subprocess.Popen:
    """`edge-runtime run ARGS` as a process of its own (the supervisor), from the repo root."""
    return subprocess.Popen([sys.executable, "-c", _RUN_CLI, *args], cwd=ROOT, **popen)  # type: ignore[call-overload]


def _strict_lines(path: Path) -> list[dict]:
    """Every line of the file must be complete JSON (no torn or partial line anywhere)."""
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_malformed_and_oversized_messages_are_counted_and_the_stream_goes_on(tmp_path: Path) -> None:
    settings = NodeSettings(limits=Limits(max_message_bytes=1 << 20), stats_interval_s=0.2)
    config = PipelineConfig(transport="ipc", work_dir=str(tmp_path), settings=settings)
    sup = Supervisor(SyntheticSource(count=None, fps=100), BuiltinProcessor("detect"), config)
    sup.start()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    dealer = ctx.socket(zmq.DEALER)
    try:
        wait_for(lambda: sup.hub.snapshot()["results"] >= 5, 10, "first results")
        push.connect(sup.endpoints.collect)
        dealer.connect(sup.endpoints.frames)
        good = protocol.encode_result(Result(stream_id="x", seq=1, capture_ns=1, enhanced=np.zeros((4, 4), np.uint8)))
        h = json.loads(good[0])
        payload = good[1].tobytes()
        bad = [
            [json.dumps({**h, "v": 99}).encode(), payload],  # bad_version
            [json.dumps({**h, "parts": [{**h["parts"][0], "dtype": "int64"}]}).encode(), payload],  # bad_dtype
            [good[0], payload[:-1]],  # payload_size
            [json.dumps({**h, "parts": [{**h["parts"][0], "shape": [90000, 90000]}]}).encode(), payload],  # dims
            [b"\x00\x01 not json"],  # bad_header
        ]
        for parts in bad:
            push.send_multipart(parts)
        push.send_multipart([good[0], b"\0" * (2 << 20)])  # > ZMQ_MAXMSGSIZE: libzmq drops the connection
        dealer.send_multipart([b"credit? no"])
        dealer.send_multipart(protocol.encode_control("event", node="rogue", event="hello"))
        before = sup.hub.snapshot()["results"]

        def counted() -> bool:
            snap = sup.hub.snapshot()
            return (all(snap["rejected"].get(r, 0) >= 1 for r in ("bad_version", "bad_dtype", "payload_size",
                                                                   "dims_too_large", "bad_header", "unexpected_type"))
                    and snap["transport"].get("peer_disconnected", 0) >= 1)

        wait_for(counted, 10, "every bad message to be counted")
        wait_for(lambda: sup.hub.snapshot()["results"] >= before + 10, 10, "the stream to go on")
    finally:
        push.close(linger=0)
        dealer.close(linger=0)
        ctx.term()
        report = sup.stop()
    assert report.exit_codes["w0"] == 0 and report.exit_codes["source"] == 0
    assert report.rejected["bad_header"] >= 2  # the hub's garbage and the source's "credit? no"
    assert report.restarts == 0


def test_worker_rejects_a_bad_frame_hands_back_the_credit_and_serves_the_next(lone_worker) -> None:
    """Drive one WorkerNode from a hand-made source: the credit protocol as a client in another language sees it."""
    w = lone_worker(BuiltinProcessor("detect"), name="wx")
    router, pull, stop, thread = w.router, w.pull, w.stop, w.thread

    def ready(done: int) -> tuple[bytes, dict]:
        """The worker's next credit (or idle heartbeat, which repeats it) reporting ``done`` frames."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if router.poll(200):
                ident, header = router.recv_multipart()
                m = protocol.decode([header])
                if m.header["done"] == done and (m.type == "credit" or m.header["state"] == "idle"):
                    return ident, m.header
        raise AssertionError(f"the worker never reported done={done}")

    try:
        ident, hello = ready(0)
        assert hello["window"] == 1 and hello["worker"].startswith("wx.0.")
        frame = Frame(pixels=np.zeros((32, 32), np.uint8), seq=7, stream_id="s")
        header, pixels = protocol.encode_frame(frame)
        router.send_multipart([ident, json.dumps({**json.loads(header), "dtype": "complex64"}).encode(),
                               pixels.tobytes()])
        ready(1)  # the bad frame counts as handled: the worker hands its credit back
        frame.pixels[8:12, 8:12] = 255
        router.send_multipart([ident, *protocol.encode_frame(frame)], copy=False)
        assert pull.poll(5000)
        while True:
            m = protocol.decode(pull.recv_multipart())
            if m.type == "result":
                break
            assert pull.poll(5000)
        assert m.result is not None and m.result.seq == 7 and m.result.detections
        ready(2)
        stop.set()
        thread.join(5)
        assert not thread.is_alive()
        stats = []
        while pull.poll(300):  # the worker's last messages, flushed at stop
            m = protocol.decode(pull.recv_multipart())
            if m.type == "stats":
                stats.append(m.header)
        assert stats and stats[-1]["rejected"] == {"bad_dtype": 1}
    finally:
        stop.set()
        thread.join(5)


def test_a_model_failing_on_one_frame_is_an_error_event_not_a_crash() -> None:
    report = run_pipeline(SyntheticSource(count=20), BuiltinProcessor("detect+raise:5"), mode="thread", policy="all")
    assert report.results == 19
    assert report.drops["processor_error"] == 1
    errors = [e for e in report.events if e["type"] == "error"]
    assert len(errors) == 1 and errors[0]["seq"] == 5 and "RuntimeError" in errors[0]["detail"]
    assert report.restarts == 0


@pytest.mark.slow
def test_sigkilled_worker_is_restarted_and_the_gap_is_recorded(tmp_path: Path) -> None:
    config = PipelineConfig(mode="process", record_dir=str(tmp_path), restart_backoff_s=(0.2, 1.0),
                            settings=NodeSettings(heartbeat_s=0.2, liveness_s=1.0))
    # A 150 ms model on a 30 fps stream: the worker is busy almost all the time, so the kill lands mid-frame.
    sup = Supervisor(SyntheticSource(count=None, fps=30), BuiltinProcessor("slow:150"), config)
    sup.start()
    try:
        wait_for(lambda: sup.hub.snapshot()["results"] >= 2, 20, "first results")
        victim = sup.handle("w0").pid
        os.kill(victim, signal.SIGKILL)
        killed_at = sup.hub.snapshot()["results"]
        wait_for(lambda: sup.handle("w0").restarts == 1, 10, "the supervisor to restart w0")
        wait_for(lambda: sup.hub.snapshot()["results"] >= killed_at + 3, 20, "results from the restarted worker")
        assert sup.handle("w0").pid != victim
        assert sup.handle("source").alive() and sup.handle("recorder").alive()
    finally:
        report = sup.stop()
    by_event = {e.get("event"): e for e in report.events}
    assert by_event["node_exit"]["node_name"] == "w0" and by_event["node_exit"]["exitcode"] == -signal.SIGKILL
    assert by_event["node_restarted"]["down_ms"] > 0 and by_event["node_restarted"]["incarnation"] == 1
    assert by_event["worker_lost"]["worker"].startswith("w0.0.")  # the source forgot the dead worker's credit
    assert report.drops.get("worker_lost", 0) == len(by_event["worker_lost"]["frames_lost"])
    assert {r["worker"].split(".")[1] for r in report.records} == {"0", "1"}  # both incarnations served
    lines = _strict_lines(tmp_path / RESULTS_FILE)
    assert {"node_exit", "node_restarted", "worker_lost"} <= {r.get("event") for r in lines}


def test_a_restarted_source_is_shown_at_once(tmp_path: Path) -> None:
    """SIGKILL the source: the supervisor restarts it, its seq starts at 0 again, and a display
    subscriber shows those frames at once (captured later), not after seq passes the old count."""
    config = PipelineConfig(mode="process", restart_backoff_s=(0.2, 1.0),
                            settings=NodeSettings(heartbeat_s=0.2, liveness_s=1.0))
    sup = Supervisor(SyntheticSource(count=None, fps=30), BuiltinProcessor("identity"), config)
    sup.start()
    try:
        with Subscriber(sup.endpoints.results, latest_only=True, idle_timeout_s=20) as sub:
            seen: list[Result] = []
            for result in sub:
                seen.append(result)
                if result.seq >= 30:
                    break
            os.kill(sup.handle("source").pid, signal.SIGKILL)
            deadline = time.monotonic() + 15
            for result in sub:
                seen.append(result)
                if result.seq < 20 or time.monotonic() > deadline:  # < 20: the restarted source's
                    break
        assert sup.handle("source").restarts == 1
        before = max(r.capture_ns for r in seen[:-1])
        assert seen[-1].capture_ns > before and seen[-1].seq < 20
    finally:
        sup.stop()


@pytest.mark.slow
def test_a_finite_source_that_dies_is_not_restarted_to_replay_its_input(tmp_path: Path) -> None:
    """A restarted file source starts from its first frame: under --fast every frame it had sent came
    back twice (a review: 394 results of 365 frames read, 94 seqs recorded twice). A finite source is not
    restarted: the run fails, saying so, without a duplicate; frames read is a lower bound then."""
    config = PipelineConfig(mode="process", policy="all", restart_backoff_s=(0.2, 1.0), work_dir=str(tmp_path / "ipc"))
    sup = Supervisor(SyntheticSource(count=300), BuiltinProcessor("slow:20"), config)
    report = _kill_after(sup, "source", 20)
    seqs = [r["seq"] for r in report.records]
    assert len(seqs) == len(set(seqs)) and len(seqs) < 300 and sup.handle("source").restarts == 0
    assert report.failure is not None and "a finite source (a file read once) is not restarted" in report.failure
    assert "frames read (a source process was lost" in report.summary() or not report.frames_read


@pytest.mark.slow
def test_recorder_sigterm_and_sigkill_keep_every_written_line(tmp_path: Path) -> None:
    config = PipelineConfig(mode="process", record_dir=str(tmp_path), restart_backoff_s=(0.2, 1.0))
    sup = Supervisor(SyntheticSource(count=None, fps=100, shape=(32, 32)), BuiltinProcessor("detect"), config)
    path = tmp_path / RESULTS_FILE
    sup.start()
    try:
        wait_for(lambda: path.exists() and path.read_text().count('"type":"result"') >= 30, 20, "30 recorded results")
        os.kill(sup.handle("recorder").pid, signal.SIGTERM)
        before = {r["seq"] for r in read_records(path) if r["type"] == "result"}
        wait_for(lambda: sup.handle("recorder").restarts == 1, 10, "the recorder to be restarted")
        lines = _strict_lines(path)
        stopped = [r for r in lines if r.get("event") == "recorder_stopped"]
        assert stopped and stopped[0]["clean_end"] is False  # it flushed on SIGTERM and said so
        assert before <= {r["seq"] for r in lines if r["type"] == "result"}
        # (after SIGTERM a recorder records on until the hub's end or drain_s + 2 s: count only what
        # its restarted incarnation wrote)
        wait_for(lambda: path.read_text().count('"recorder_started"') == 2
                 and path.read_text().rsplit('"recorder_started"', 1)[1].count('"type":"result"') >= 30, 20,
                 "the restarted recorder to record")
        os.kill(sup.handle("recorder").pid, signal.SIGKILL)  # no chance to flush: lines already written survive
        wait_for(lambda: sup.handle("recorder").restarts == 2, 10, "the second restart")
        _strict_lines(path)
    finally:
        report = sup.stop()
    lines = _strict_lines(path)
    assert sum(1 for r in lines if r.get("event") == "recorder_started") == 3
    if lines[-1].get("event") == "recorder_lost":  # the SIGKILL lost results queued for it: said after the end
        assert lines[-1]["results_lost"] == report.drops.get("recorder_lost"), (lines[-1], report.drops)
        lines = lines[:-1]
    assert lines[-1]["event"] == "recorder_stopped" and lines[-1]["clean_end"] is True
    assert report.exit_codes["recorder"] == 0


@pytest.mark.slow
def test_sigterm_stops_the_whole_pipeline_cleanly(tmp_path: Path) -> None:
    code = ("import argparse, sys; from edge_runtime.pipeline import cli; p = argparse.ArgumentParser(); "
            "cli.configure(p); sys.exit(cli.run(p.parse_args(sys.argv[1:])))")
    proc = subprocess.Popen([sys.executable, "-c", code, "--source", "synthetic:64x64", "--loop", "--processor",
                             "detect+slow:20", "--workers", "2", "--record", str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = tmp_path / RESULTS_FILE
    try:
        wait_for(lambda: path.exists() and path.read_text().count('"type":"result"') >= 10, 30, "results")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert "frames read in" in out
    lines = _strict_lines(path)
    assert lines[-1]["event"] == "recorder_stopped" and lines[-1]["clean_end"] is True
    assert (tmp_path / "latency.json").is_file()


def test_a_hung_model_call_is_timed_out_and_the_worker_restarted() -> None:
    config = PipelineConfig(frame_timeout_s=0.5, restart_backoff_s=(0.05, 0.1),
                            settings=NodeSettings(heartbeat_s=0.2, liveness_s=1.0))
    sup = Supervisor(SyntheticSource(count=None, fps=50), BuiltinProcessor("hang:3"), config)
    sup.start()
    try:
        wait_for(lambda: sup.handle("w0").restarts == 1, 10, "the hung worker to be restarted")
        wait_for(lambda: any(r["seq"] > 3 for r in sup.hub.summaries), 10, "results after the restart")
    finally:
        report = sup.stop()
    exits = [e for e in report.events if e.get("event") == "node_exit"]
    assert exits and exits[0]["exitcode"] == 4 and exits[0]["node_name"] == "w0"
    assert report.drops["frame_timeout"] == 1
    assert 3 not in {r["seq"] for r in report.records}


def _broken_model() -> None:
    raise BundleError("expected a bundle at /nowhere, found nothing")


def test_a_worker_that_cannot_load_stops_the_pipeline_instead_of_crash_looping() -> None:
    report = run_pipeline(SyntheticSource(count=None, fps=50), _broken_model, mode="thread",
                          restart_backoff_s=(0.02, 0.05), max_quick_failures=3, duration=30)  # fails, not hangs
    assert report.failure is not None and "w0 failed 3 times" in report.failure
    assert sum(1 for e in report.events if e.get("event") == "node_exit") == 3
    assert report.results == 0


def test_restart_backoff_doubles_between_quick_failures() -> None:
    """A review's mutation (a constant backoff) passed every test: the delays must grow."""
    report = run_pipeline(SyntheticSource(count=None, fps=50), _broken_model, mode="thread",
                          restart_backoff_s=(0.05, 1.0), max_quick_failures=5, duration=30)
    downs = [e["down_ms"] for e in report.events if e.get("event") == "node_restarted"]
    assert len(downs) == 4 and all(b > 1.5 * a for a, b in itertools.pairwise(downs)), downs


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.slow
def test_nodes_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    proc = start_cli(["--source", "synthetic:32x32", "--loop", "--processor", "identity", "--record", str(tmp_path)],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = tmp_path / RESULTS_FILE
    children: list[int] = []
    try:
        wait_for(lambda: path.exists() and path.read_text().count('"type":"result"') >= 5, 30, "results")
        children = _children(proc.pid)
        assert len(children) >= 3  # recorder, worker, source (and multiprocessing's resource tracker)
        proc.kill()
        proc.wait(5)
        wait_for(lambda: not any(_running(c) for c in children), 10, "the orphaned nodes to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for c in children:  # only if the test failed: never leave our own processes behind
            if _running(c):
                os.kill(c, signal.SIGKILL)


def test_a_result_a_sink_cannot_draw_costs_that_frame_not_the_sink(tmp_path: Path) -> None:
    """A result the protocol accepts but OpenCV refuses to draw (cv2.error) used to escape the recorder
    with --video and the viewer; the supervisor restarted them until it stopped the pipeline. Now the
    recorder writes the line and leaves the frame out of the video, the viewer skips it; both count it."""
    import cv2

    from edge_runtime.pipeline.nodes import Counters, Endpoints
    from edge_runtime.pipeline.recorder import JsonlWriter, RecorderNode, VideoSink
    from edge_runtime.pipeline.viewer import ViewerNode

    result = Result(stream_id="s", seq=1, capture_ns=1, enhanced=np.zeros((8, 8), np.uint8))
    m = protocol.decode(protocol.encode_result(result))

    class Undrawable(VideoSink):
        def add(self, message: protocol.Message) -> bool:
            raise cv2.error("rectangle: Can't parse 'pt2'")

    node = RecorderNode(Endpoints.inproc(), str(tmp_path))
    counters, writer = Counters("recorder"), JsonlWriter(tmp_path / RESULTS_FILE)
    videos = Undrawable(tmp_path, 30.0)
    node._record(m, writer, videos, counters)
    node._record(m, writer, videos, counters)
    writer.close()
    assert counters.drops["video_frame"] == 2 and not videos.failed
    assert [r["seq"] for r in read_records(tmp_path / RESULTS_FILE)] == [1, 1]
    viewer, seen = ViewerNode("ipc://unused"), Counters("viewer")

    def draw() -> None:
        raise cv2.error("bad")

    assert viewer._show(draw, seen) is False and seen.drops["undrawable"] == 1
    assert viewer._show(lambda: None, seen) is True


@pytest.mark.slow
def test_results_lost_with_a_killed_recorder_are_counted(tmp_path: Path) -> None:
    """What ZeroMQ had queued for a recorder that is SIGKILLed dies with it (no acknowledgements on the
    record channel): the loss must be counted, not silent (a review lost 52 results with no drop shown)."""
    rec = tmp_path / "rec"
    cfg = PipelineConfig(mode="process", record_dir=str(rec), work_dir=str(tmp_path / "ipc"))
    sup = Supervisor(SyntheticSource(count=None, fps=30, shape=(64, 64)), BuiltinProcessor("detect"), cfg)
    sup.start()
    path = rec / RESULTS_FILE
    try:
        wait_for(lambda: path.exists() and path.read_text().count('"type":"result"') >= 30, 30, "30 recorded")
        h = sup.handle("recorder")
        os.kill(h.pid, signal.SIGSTOP)  # results pile up in the queues towards it
        time.sleep(2.0)
        os.kill(h.pid, signal.SIGKILL)
        os.kill(h.pid, signal.SIGCONT)
        wait_for(lambda: h.restarts == 1, 20, "the recorder's restart")
        time.sleep(1.0)
    finally:
        report = sup.stop()
    recorded = {r["seq"] for r in read_records(path) if r["type"] == "result"}
    missing = len({r["seq"] for r in report.records} - recorded)
    assert missing > 0 and report.drops.get("recorder_lost") == missing, (missing, report.drops)
    last = read_records(path)[-1]  # the recording says so too (its last stats line showed no loss)
    assert (last["event"], last["results_lost"], last["results_recorded"]) == ("recorder_lost", missing,
                                                                                len(recorded)), last


@pytest.mark.slow
def test_policy_all_sends_a_killed_workers_frames_again(tmp_path: Path) -> None:
    """--fast promises every frame: the frames a SIGKILLed worker held were counted as lost and never
    processed (a review: 118 results of 120), and the end-of-stream drain gave a slow model 2 s."""
    n = 60
    cfg = PipelineConfig(mode="process", policy="all", window=2, work_dir=str(tmp_path / "ipc"))
    report = _kill_after(Supervisor(SyntheticSource(count=n), BuiltinProcessor("slow:50"), cfg), "w0", 15)
    assert sorted({r["seq"] for r in report.records}) == list(range(n))
    assert "worker_lost" not in report.drops and report.transport.get("frames_resent", 0) >= 1


@pytest.mark.slow
def test_policy_all_sends_a_frame_again_once_then_counts_it_lost(tmp_path: Path) -> None:
    """A frame on which the model process dies (os._exit, as a native crash would) was sent to every
    restarted worker, which died on it, until the supervisor gave up on the whole replay (a review:
    56 results of 59 frames read, 3 frames in no counter). Now a frame is sent again once; in flight
    at a second death it is counted worker_lost, and the replay goes on to the end. A frame sent again
    goes alone to a worker, so the frame that shared the crashing one's window (window 2) is not lost
    with it on the second death (it was: 2 counted lost)."""
    n = 60
    cfg = PipelineConfig(mode="process", policy="all", window=2, work_dir=str(tmp_path / "ipc"))
    sup = Supervisor(SyntheticSource(count=n), BuiltinProcessor("slow:10+exit:20"), cfg)
    sup.start()
    try:
        assert sup.wait(90)
    finally:
        report = sup.stop()
    assert report.failure is None, report.failure
    seqs = sorted(r["seq"] for r in report.records)
    lost = report.drops.get("worker_lost", 0)
    assert 20 not in seqs and lost == 1 and len(seqs) + lost == n, (seqs, report.drops)
    assert seqs[-1] == n - 1 and len(set(seqs)) == len(seqs)


def _pause_w0(sup: Supervisor, until: Callable[[dict[str, Any]], bool], what: str) -> None:
    """SIGSTOP worker w0 once results flow, until the hub's live snapshot satisfies ``until``, then SIGCONT."""
    wait_for(lambda: sup.hub.snapshot()["results"] >= 5, 30, "results")
    pid = sup.handle("w0").pid
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: until(sup.hub.snapshot()), 20, what)
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.slow
def test_policy_all_never_delivers_a_frame_twice(tmp_path: Path) -> None:
    """--fast sends a silent worker's frames again; when that worker was only paused (SIGSTOP past the
    liveness timeout, then SIGCONT) it delivers them too. The hub passes on the first result of a frame
    and counts the second (transport ``duplicate_results``): sinks got the same seq twice before.
    Whether the resumed worker's result still reaches the hub depends on timing (its connection may have
    been dropped while it was stopped), so up to three runs are made until one has the duplicate."""
    n = 40
    for attempt in range(3):
        cfg = PipelineConfig(mode="process", policy="all", work_dir=str(tmp_path / f"ipc{attempt}"))
        sup = Supervisor(SyntheticSource(count=n, fps=20), BuiltinProcessor("detect+slow:150"), cfg)
        sup.start()
        try:
            _pause_w0(sup, lambda snap: snap["transport"].get("frames_resent", 0) >= 1, "its frames sent again")
            assert sup.wait(60)
        finally:
            report = sup.stop()
        seqs = [r["seq"] for r in report.records]
        assert sorted(seqs) == list(range(n)), sorted(seqs)  # every frame, once
        assert report.results == n and "duplicate_results" not in report.drops  # a duplicate is not a lost frame
        if report.transport.get("duplicate_results", 0) >= 1:
            return
    pytest.skip("in 3 runs the resumed worker's result never reached the hub: no duplicate to refuse")


@pytest.mark.slow
def test_a_worker_only_paused_is_not_counted_lost_for_frames_it_finishes(tmp_path: Path) -> None:
    """SIGSTOP past the liveness timeout, then SIGCONT: the worker is declared lost with a frame in hand,
    then delivers it. That frame was counted both as a result and as worker_lost (sent 150, 152 counted)."""
    cfg = PipelineConfig(mode="process", work_dir=str(tmp_path / "ipc"))
    sup = Supervisor(SyntheticSource(count=None, fps=30), BuiltinProcessor("detect+slow:150"), cfg)
    sup.start()
    try:
        _pause_w0(sup, lambda snap: snap["drops"].get("worker_lost", 0) >= 1, "the worker declared lost")
        time.sleep(2.0)
    finally:
        report = sup.stop()
    sent = report.nodes["source"]["frames_sent"]
    # One frame may still be in transit when the stop cuts the run (seen once in eight runs).
    assert report.drops.get("worker_lost", 0) == 0 and report.results >= sent - 1, (report.results, sent, report.drops)


@pytest.mark.slow
def test_a_stalled_recorder_gets_everything_from_the_hub_backlog(tmp_path: Path) -> None:
    """4 s of SIGSTOP at 60 fps is more than ZeroMQ's queues hold (64 messages each side): the hub's
    backlog must keep and resend the rest (a mutation dropping them instead passed every test)."""
    rec = tmp_path / "rec"
    cfg = PipelineConfig(mode="process", record_dir=str(rec), work_dir=str(tmp_path / "ipc"))
    sup = Supervisor(SyntheticSource(count=None, fps=60, shape=(32, 32)), BuiltinProcessor("detect"), cfg)
    sup.start()
    path = rec / RESULTS_FILE
    try:
        wait_for(lambda: path.exists() and path.read_text().count('"type":"result"') >= 10, 30, "10 recorded")
        pid = sup.handle("recorder").pid
        os.kill(pid, signal.SIGSTOP)
        time.sleep(4.0)
        os.kill(pid, signal.SIGCONT)
        time.sleep(1.0)
    finally:
        report = sup.stop()
    recorded = {r["seq"] for r in read_records(path) if r["type"] == "result"}
    assert {r["seq"] for r in report.records} <= recorded and "recorder_backlog" not in report.drops
    assert report.results > 240 and sup.handle("recorder").restarts == 0


def test_a_frame_timed_out_is_not_also_counted_worker_lost() -> None:
    """A worker past frame_timeout counts the frame (frame_timeout) and exits; the source counted the same
    frame again as worker_lost when the worker went (a review: 730 exits, 730 of each), and later the
    frame it sent on the exiting worker's credit."""
    cfg = PipelineConfig(mode="thread", n_workers=2, frame_timeout_s=0.05, restart_backoff_s=(0.001, 0.001),
                         stable_after_s=0.0, settings=NodeSettings(heartbeat_s=0.05))
    sup = Supervisor(SyntheticSource(count=None, fps=200, shape=(16, 16)), BuiltinProcessor("slow:200"), cfg)
    sup.start()
    try:
        wait_for(lambda: sum(h.restarts for h in sup.handles) >= 12, 60, "a dozen worker restarts")
    finally:
        report = sup.stop()
    assert report.drops["frame_timeout"] >= 12
    # At first one worker_lost per timed-out frame (73 of 76); then 2-7 a run here: the exiting worker's
    # credit invited a new frame, lost with it. Its last credit now says window 0: none (0 of 40 in
    # three runs; one is allowed for a worker the source found silent under load).
    assert report.drops.get("worker_lost", 0) <= 1, report.drops


@pytest.mark.slow
def test_a_stopped_run_accounts_for_every_frame_read(tmp_path: Path) -> None:
    """Stopped by --duration (or SIGTERM), a run usually left one frame read but neither processed nor
    counted (a review: 8 of 12 runs, e.g. read 30, results 29, drops none): the frame waiting for a
    worker, a frame queued on a worker's socket, or one still in the source's send queue."""
    from edge_runtime.pipeline import run_pipeline

    for policy, runs in (("all", 4), ("latest", 2)):
        for _ in range(runs):
            rep = run_pipeline(SyntheticSource(count=None, fps=30 if policy == "latest" else None),
                               BuiltinProcessor("detect+slow:70"), n_workers=1, mode="process", duration=2.0,
                               policy=policy, window=1 if policy == "latest" else 2,
                               work_dir=str(tmp_path / "ipc"))
            accounted = rep.results + sum(rep.drops.values()) + sum(rep.rejected.values())
            assert rep.frames_read > 10 and rep.frames_read == accounted, (policy, rep.frames_read, rep.results,
                                                                           rep.drops)
