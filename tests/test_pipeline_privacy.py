"""Privacy review findings 2, 3 and 8 (2026-12): what reaches a subscriber, which keys open the
internal channels, and output files that must not follow a planted link."""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth

from edge_runtime.errors import ConfigError
from edge_runtime.outputs import write_image
from edge_runtime.pipeline import protocol, security
from edge_runtime.pipeline.builtins import BuiltinProcessor, SyntheticSource
from edge_runtime.pipeline.client import Subscriber
from edge_runtime.pipeline.nodes import NodeSettings, free_tcp_ports
from edge_runtime.pipeline.recorder import RESULTS_FILE, JsonlWriter, read_records
from edge_runtime.pipeline.security import SecurityConfig
from edge_runtime.pipeline.supervisor import PipelineConfig, Supervisor


def _first_result(sub: Subscriber, within_s: float = 15.0) -> protocol.Message:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        m = sub.receive(0.5)
        if m is not None and m.result is not None:
            return m
    raise AssertionError("no result on the public endpoint")


def _curve(sock: zmq.Socket, server_public: Path, client: Path) -> zmq.Socket:
    sock.linger = 0
    sock.curve_serverkey = security.load_public_key(server_public)
    sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(str(client))
    return sock


def test_an_integrators_key_opens_the_public_endpoint_only(tmp_path: Path) -> None:
    """Finding 3: with --transport tcp --keys DIR the internal channels took DIR's keys and allow-list,
    so a subscriber key given to an integrator could pose as a worker (and be sent the raw frames) or
    push forged results into the recording. They now use the run's own key pair, and each allow-list
    has its own ZAP domain (one authenticator serves every socket of a context)."""
    keys = tmp_path / "keys"
    security.generate_keys(keys, "server")
    security.generate_keys(keys, "client", allow=True)  # what --transport tcp with --keys used to require
    security.generate_keys(keys, "viewer", allow=True)  # the documented way to let an integrator subscribe
    public = f"tcp://127.0.0.1:{free_tcp_ports(1)[0]}"
    cfg = PipelineConfig(mode="thread", transport="tcp", public_endpoint=public, record_dir=str(tmp_path / "rec"),
                         settings=NodeSettings(security=SecurityConfig.from_keys_dir(keys, curve_on_loopback=True)))
    sup = Supervisor(SyntheticSource(count=None, fps=30), BuiltinProcessor("detect"), cfg)
    sup.start()
    ctx = zmq.Context()
    try:
        with Subscriber(public, curve_server_key=keys / "server.key",
                        curve_client_secret=keys / "viewer.key_secret") as sub:
            assert _first_result(sub).result.detections  # the integrator's key still subscribes
        run_server = Path(sup.hub.settings.security.server_public)  # what a thief would need, at best
        forged = protocol.encode_control("result", stream="synthetic", seq=999999, capture_ns=time.monotonic_ns(),
                                         worker="w0", detections=[{"box": [1, 1, 50, 50], "score": 0.99,
                                                                   "label": "FORGED"}], parts=[],
                                         provenance={}, timings_ms={}, stamps={"capture": time.monotonic_ns()})
        for server_public in (keys / "server.key", run_server):
            thief = _curve(ctx.socket(zmq.DEALER), server_public, keys / "viewer.key_secret")
            thief.connect(sup.endpoints.frames)
            thief.send_multipart(protocol.encode_control("credit", worker="thief", done=0, window=1))
            assert thief.poll(1500) == 0, "a subscriber key was sent frames"
            push = _curve(ctx.socket(zmq.PUSH), server_public, keys / "viewer.key_secret")
            push.connect(sup.endpoints.collect)
            push.send_multipart(forged)
        time.sleep(1.0)
    finally:
        ctx.destroy(linger=0)
        report = sup.stop()
    assert report.results > 0
    assert not [r for r in report.records if r["seq"] == 999999]
    assert "FORGED" not in (tmp_path / "rec" / RESULTS_FILE).read_text()


def test_a_keyless_loopback_bind_gets_no_input_frames_and_says_who_can_read_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Finding 2: with --video or --view every result carried the raw input frame, and the hub sent
    it to the --bind PUB too, which on loopback without keys any local account can read, unwarned.
    The public endpoint now gets results without their input part (the recorder still gets it),
    and such a bind logs one warning."""
    public = f"tcp://127.0.0.1:{free_tcp_ports(1)[0]}"
    cfg = PipelineConfig(mode="thread", public_endpoint=public, record_dir=str(tmp_path / "rec"), attach_input=True)
    sup = Supervisor(SyntheticSource(count=None, fps=30), BuiltinProcessor("detect"), cfg)
    with caplog.at_level(logging.WARNING, logger="edge_runtime.pipeline.security"):
        sup.start()
        try:
            with Subscriber(public) as sub:
                m = _first_result(sub)
        finally:
            sup.stop()
    assert m.result.detections and "input" not in m.arrays
    assert [p["name"] for p in m.header["parts"]] == [name for name in m.arrays]
    recorded = [r for r in read_records(tmp_path / "rec" / RESULTS_FILE) if r.get("type") == "result"]
    assert recorded and all("input" in r["parts"] for r in recorded)  # internal sinks keep the frame
    said = [r.getMessage() for r in caplog.records if "any local account" in r.getMessage()]
    assert len(said) == 1 and public in said[0] and "ipc://" in said[0] and "--keys" in said[0]


def test_keys_or_ipc_binds_do_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys = tmp_path / "keys"
    security.generate_keys(keys, "server")
    security.generate_keys(keys, "client", allow=True)
    ctx = zmq.Context()
    try:
        with caplog.at_level(logging.WARNING, logger="edge_runtime.pipeline.security"), \
                ctx.socket(zmq.PUB) as a, ctx.socket(zmq.PUB) as b:
            a.linger = b.linger = 0
            security.bind(a, "tcp://127.0.0.1:*", SecurityConfig.from_keys_dir(keys, curve_on_loopback=True))
            security.bind(b, f"ipc://{tmp_path}/pub", None)
        assert "any local account" not in caplog.text
    finally:
        security.stop_authenticator(ctx)
        ctx.term()


def test_an_ipc_bind_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    """Finding 8: the socket file took its mode from the umask; under umask 000 (a service started so)
    it was srwxrwxrwx and another account received every result."""
    ctx = zmq.Context()
    old = os.umask(0)
    try:
        with ctx.socket(zmq.PUB) as pub:
            pub.linger = 0
            security.bind(pub, f"ipc://{tmp_path}/results", None)
            assert stat.S_IMODE(os.stat(tmp_path / "results").st_mode) == 0o600
        # Owner-only from its creation: a chmod after the bind left a gap another account connected in
        # (a review: 2 binds of 20); without that chmod the file is still closed to others.
        with ctx.socket(zmq.PUB) as pub, pytest.MonkeyPatch.context() as mp:
            pub.linger = 0
            mp.setattr(security.os, "chmod", lambda *a: None)
            security.bind(pub, f"ipc://{tmp_path}/results2", None)
            assert stat.S_IMODE(os.stat(tmp_path / "results2").st_mode) & 0o077 == 0
        assert os.umask(0) == 0  # the process's umask restored
    finally:
        os.umask(old)
        ctx.term()


def test_a_planted_link_is_refused_not_written_through(tmp_path: Path) -> None:
    """Finding 8: results.jsonl and an image's .NAME.partial were opened following symlinks: in a
    shared output folder a planted link took every record (or image) wherever it pointed."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("")
    rec = tmp_path / "rec"
    rec.mkdir()
    (rec / RESULTS_FILE).symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="symbolic link"):
        JsonlWriter(rec / RESULTS_FILE)
    sup = Supervisor(SyntheticSource(count=1), BuiltinProcessor(), PipelineConfig(record_dir=str(rec)))
    with pytest.raises(ConfigError, match="symbolic link"):
        sup.start()  # said before any node starts
    assert sup.handles == []

    out = tmp_path / "img"
    out.mkdir()
    (out / ".a.png.partial").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="symbolic link"):
        write_image(out / "a.png", np.zeros((4, 4), np.uint8))
    assert elsewhere.read_text() == "" and not (out / "a.png").exists()
    (out / ".b.png.partial").write_bytes(b"half a png")  # what a write killed midway leaves: replaced
    write_image(out / "b.png", np.zeros((4, 4), np.uint8))
    assert (out / "b.png").read_bytes().startswith(b"\x89PNG") and not (out / ".b.png.partial").exists()


def test_the_latency_report_and_videos_never_go_through_a_planted_link(tmp_path: Path) -> None:
    """A review planted latency.json / latency.png links in a --record folder: the report was written
    where they pointed; a dangling link named as the video crashed the recorder (FileExistsError,
    3 restarts, 45 of 88 results lost, no video). The links are now replaced, or their name skipped."""
    from edge_runtime.pipeline.recorder import VideoSink
    from edge_runtime.telemetry import Stats, write_latency_report

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    rec = tmp_path / "rec"
    rec.mkdir()
    for name in ("latency.json", "latency.png"):
        (rec / name).symlink_to(victim)
    json_path, png_path = write_latency_report(Stats(), rec)
    assert victim.read_text() == "keep me"
    assert not json_path.is_symlink() and not png_path.is_symlink() and json_path.read_text().startswith("{")
    (rec / "s1.mp4").symlink_to(tmp_path / "nowhere.mp4")  # dangling
    sink = VideoSink(rec, 10.0)
    writer = sink._open("s1", (32, 32))
    writer.release()
    assert sink.paths and sink.paths[0].name != "s1.mp4" and not (tmp_path / "nowhere.mp4").exists()
