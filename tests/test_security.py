"""Security: loopback by default, CURVE + allow-list off the box, keys on disk with the right modes."""

from __future__ import annotations

import argparse
import logging
import stat
import time
from pathlib import Path

import pytest

from edge_runtime.errors import ConfigError
from edge_runtime.pipeline import security
from edge_runtime.pipeline.builtins import BuiltinProcessor, SyntheticSource
from edge_runtime.pipeline.client import Subscriber
from edge_runtime.pipeline.nodes import NodeSettings, free_tcp_ports
from edge_runtime.pipeline.security import SecurityConfig
from edge_runtime.pipeline.supervisor import PipelineConfig, Supervisor


@pytest.mark.parametrize("endpoint, local", [
    ("inproc://x", True), ("ipc:///tmp/x", True), ("tcp://127.0.0.1:5555", True), ("tcp://127.8.9.1:1", True),
    ("tcp://localhost:5555", True), ("tcp://[::1]:5555", True), ("tcp://0.0.0.0:5555", False),
    ("tcp://*:5555", False), ("tcp://eth0:5555", False), ("tcp://192.168.1.20:5555", False),
    ("tcp://[::]:5555", False), ("tcp://10.0.0.5;127.0.0.1:5555", True), ("ws://127.0.0.1:80", False),
])
def test_which_endpoints_leave_the_box(endpoint: str, local: bool) -> None:
    assert security.is_local_endpoint(endpoint) is local


def test_malformed_endpoints_are_config_errors() -> None:
    for bad in ("127.0.0.1:5555", "http://x:1"):
        with pytest.raises(ConfigError):
            security.is_local_endpoint(bad)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    security.generate_keys(d, "server")
    security.generate_keys(d, "client", allow=True)
    security.generate_keys(d, "stranger")  # a valid key pair that nobody allowed
    return d


def test_network_bind_without_curve_is_refused_unless_insecure(keys: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The policy check runs before any bind, so nothing binds a non-loopback address here.
    for endpoint in ("tcp://0.0.0.0:5555", "tcp://*:7000", "tcp://192.168.1.20:5555"):
        with pytest.raises(ConfigError, match="--insecure"):
            security.wants_curve(endpoint, None)
        with pytest.raises(ConfigError):
            security.wants_curve(endpoint, SecurityConfig(client_secret=keys / "client.key_secret"))
        with caplog.at_level(logging.WARNING, logger="edge_runtime.pipeline.security"):
            caplog.clear()
            assert security.wants_curve(endpoint, SecurityConfig(insecure=True)) is False
        assert "INSECURE" in caplog.text and endpoint in caplog.text
        assert security.wants_curve(endpoint, SecurityConfig.from_keys_dir(keys)) is True
    assert security.wants_curve("tcp://127.0.0.1:5555", None) is False
    assert security.wants_curve("ipc:///tmp/x", SecurityConfig.from_keys_dir(keys, curve_on_loopback=True)) is False
    assert security.wants_curve("tcp://127.0.0.1:1", SecurityConfig.from_keys_dir(keys, curve_on_loopback=True))
    with pytest.raises(ConfigError):
        security.wants_curve("tcp://127.0.0.1:1", SecurityConfig(curve_on_loopback=True))


def test_an_abstract_ipc_socket_needs_insecure(keys: Path, caplog: pytest.LogCaptureFixture) -> None:
    """ipc://@name has no file, hence no permissions: every local user could read the results."""
    for config in (None, SecurityConfig.from_keys_dir(keys)):
        with pytest.raises(ConfigError, match="abstract socket ipc://@edge-results"):
            security.wants_curve("ipc://@edge-results", config)
    with caplog.at_level(logging.WARNING, logger="edge_runtime.pipeline.security"):
        assert security.wants_curve("ipc://@edge-results", SecurityConfig(insecure=True)) is False
    assert "any local user" in caplog.text


def test_pipeline_refuses_an_open_network_bind_before_starting(tmp_path: Path) -> None:
    config = PipelineConfig(public_endpoint="tcp://0.0.0.0:5999")
    sup = Supervisor(SyntheticSource(count=1), BuiltinProcessor(), config)
    with pytest.raises(ConfigError, match="non-loopback"):
        sup.start()
    assert sup.handles == []  # nothing was started


def test_generated_keys_have_safe_modes(keys: Path) -> None:
    for name in ("server", "client", "stranger"):
        assert stat.S_IMODE((keys / f"{name}.key_secret").stat().st_mode) == 0o600
        assert (keys / f"{name}.key").is_file()
    assert sorted(p.name for p in (keys / "allowed").iterdir()) == ["client.key"]
    with pytest.raises(ConfigError, match="PUBLIC"):
        security.allow_key(keys, keys / "stranger.key_secret")
    with pytest.raises(ConfigError):
        security.generate_keys(keys, "../escape")


def test_keys_cli_generates_and_allows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    security.configure(parser)
    assert security.run(parser.parse_args(["generate", str(tmp_path), "--name", "cart7", "--allow"])) == 0
    assert (tmp_path / "allowed" / "cart7.key").is_file()
    assert stat.S_IMODE((tmp_path / "cart7.key_secret").stat().st_mode) == 0o600
    security.generate_keys(tmp_path, "viewer")
    assert security.run(parser.parse_args(["allow", str(tmp_path), str(tmp_path / "viewer.key")])) == 0
    assert (tmp_path / "allowed" / "viewer.key").is_file()
    assert "0600" in capsys.readouterr().out


@pytest.mark.slow
def test_curve_allowed_client_receives_and_unknown_key_gets_nothing(keys: Path) -> None:
    port = free_tcp_ports(1)[0]
    endpoint = f"tcp://127.0.0.1:{port}"
    settings = NodeSettings(security=SecurityConfig.from_keys_dir(keys, curve_on_loopback=True))
    config = PipelineConfig(public_endpoint=endpoint, settings=settings)
    sup = Supervisor(SyntheticSource(count=None, fps=100), BuiltinProcessor("detect"), config)
    sup.start()
    try:
        with Subscriber(endpoint, curve_server_key=keys / "server.key",
                        curve_client_secret=keys / "client.key_secret") as allowed, \
             Subscriber(endpoint, curve_server_key=keys / "server.key",
                        curve_client_secret=keys / "stranger.key_secret") as stranger, \
             Subscriber(endpoint) as plain:
            got = None
            deadline = time.monotonic() + 10
            while got is None and time.monotonic() < deadline:
                m = allowed.receive(0.5)
                got = m.result if m is not None else None
            assert got is not None and got.detections and got.detections[0].label == "blob"
            assert stranger.receive(1.0) is None  # handshake refused by ZAP: no message at all
            assert plain.receive(0.2) is None  # a NULL-mechanism client cannot talk to a CURVE server
        deadline = time.monotonic() + 5
        while sup.hub.snapshot()["transport"].get("auth_failed", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sup.hub.snapshot()["transport"].get("auth_failed", 0) >= 1
    finally:
        report = sup.stop()
    assert report.results > 0


def test_ipv6_loopback_binds_and_a_failed_bind_names_its_endpoint(tmp_path: Path) -> None:
    """libzmq refuses IPv6 literals unless the socket's IPV6 option is set: tcp://[::1] failed with a
    raw 'No such device' traceback. Now it binds (where the machine has IPv6 loopback), and any bind
    or connect libzmq refuses is a ConfigError naming the endpoint."""
    import socket

    import zmq

    try:  # does this machine have IPv6 loopback at all? (only then must the bind succeed)
        with socket.socket(socket.AF_INET6) as s6:
            s6.bind(("::1", 0))
        has_ipv6 = True
    except OSError:
        has_ipv6 = False
    ctx = zmq.Context()
    try:
        with ctx.socket(zmq.PULL) as pull, ctx.socket(zmq.PUSH) as push:
            port = free_tcp_ports(1)[0]
            if has_ipv6:
                security.bind(pull, f"tcp://[::1]:{port}", None)
                security.connect(push, f"tcp://[::1]:{port}", None)
                push.send(b"over ipv6")
                assert pull.poll(5000) and pull.recv() == b"over ipv6"
            else:
                with pytest.raises(ConfigError, match=rf"bind tcp://\[::1\]:{port}"):
                    security.bind(pull, f"tcp://[::1]:{port}", None)
        with ctx.socket(zmq.PULL) as pull:
            where = f"ipc://{tmp_path}/no/such/dir/sock"
            with pytest.raises(ConfigError, match=f"bind {where}: expected an address of this machine"):
                security.bind(pull, where, None)
    finally:
        ctx.term()


def test_internal_tcp_channels_use_curve_so_a_plain_local_peer_gets_no_frame() -> None:
    """--transport tcp: a loopback port is open to every local user (a review posed as a worker from
    another uid and was sent the frames, and injected results). The channels now speak CURVE with a
    key pair made for the run; a plain-text peer completes no handshake and receives nothing."""
    import zmq

    from edge_runtime.pipeline import protocol

    cfg = PipelineConfig(mode="process", transport="tcp", log_level=logging.ERROR)
    sup = Supervisor(SyntheticSource(count=None, fps=30), BuiltinProcessor("detect"), cfg)
    sup.start()
    ctx = zmq.Context()
    try:
        deadline = time.monotonic() + 30
        while sup.hub.snapshot()["results"] < 5:
            assert time.monotonic() < deadline, "no results over the encrypted channels"
            time.sleep(0.1)
        keys = Path(sup.config.settings.security.server_secret).parent if sup.config.settings.security else None
        assert keys is None  # the user gave no keys: the run's own are in the supervisor's private folder
        intruder = ctx.socket(zmq.DEALER)
        intruder.linger = 0
        intruder.connect(sup.endpoints.frames)
        intruder.send_multipart(protocol.encode_control("credit", worker="intruder", done=0, window=1))
        assert intruder.poll(1500) == 0  # no frame for a peer without the run's keys
        sub = ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(sup.endpoints.results)
        assert sub.poll(1500) == 0
    finally:
        ctx.destroy(linger=0)
        sup.stop()


def test_keys_given_encrypt_a_loopback_bind_too(keys: Path) -> None:
    from edge_runtime.pipeline.cli import _settings

    settings = _settings({"keys": str(keys), "insecure": False, "settings": {}})
    assert security.wants_curve("tcp://127.0.0.1:5555", settings.security)


def test_a_tcp_port_outside_1_65535_is_refused_not_wrapped() -> None:
    """libzmq binds a port modulo 65536: tcp://127.0.0.1:99999 listened on 34463, where no client looks."""
    import zmq

    from edge_runtime.pipeline import security

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUB)
    try:
        for endpoint in ("tcp://127.0.0.1:99999", "tcp://127.0.0.1:0", "tcp://127.0.0.1:", "tcp://127.0.0.1:5x"):
            with pytest.raises(ConfigError, match=r"expected a tcp port in 1\.\.65535"):
                security.bind(sock, endpoint, None)
        security.bind(sock, "tcp://127.0.0.1:*", None)  # a wildcard port is libzmq's to choose
        assert sock.last_endpoint.decode().startswith("tcp://127.0.0.1:")
    finally:
        sock.close(linger=0)


def test_a_send_only_socket_refuses_a_huge_subscription() -> None:
    """A PUB keeps its subscriptions in a trie of about 50x their size and set no MAXMSGSIZE: one
    20 MiB SUBSCRIBE from any local account took a loopback-bound hub from 61 MiB to 1 GiB (a privacy
    review). A subscription beyond SEND_ONLY_MAX_BYTES now drops that peer; short topics work."""
    import zmq

    from edge_runtime.pipeline.nodes import SEND_ONLY_MAX_BYTES, open_socket

    ctx = zmq.Context()
    try:
        endpoint = f"tcp://127.0.0.1:{free_tcp_ports(1)[0]}"
        pub = open_socket(ctx, zmq.PUB, NodeSettings(), bind=endpoint, receives=False)
        subs = {}
        for name, topics in (("huge", [b"r" * (4 * SEND_ONLY_MAX_BYTES), b""]), ("plain", [b"result/"])):
            sub = subs[name] = ctx.socket(zmq.SUB)
            sub.linger = 0
            for topic in topics:
                sub.setsockopt(zmq.SUBSCRIBE, topic)
            sub.connect(endpoint)
        got = dict.fromkeys(subs, 0)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            pub.send(b"result/s1 payload")
            for name, sub in subs.items():
                while sub.poll(0):
                    sub.recv()
                    got[name] += 1
            time.sleep(0.01)
        assert got["plain"] > 0 and got["huge"] == 0, got
    finally:
        ctx.destroy(linger=0)


def test_each_allow_list_has_its_own_zap_domain(tmp_path: Path) -> None:
    """One ZAP authenticator serves every socket of a context, and it was configured for domain "*":
    the last allow-list loaded served all of them, so the public endpoint's integrator keys opened
    the internal channels (or the run's own keys replaced the integrators' and they were refused)."""
    import zmq

    ours, theirs = tmp_path / "run", tmp_path / "public"
    for d, client in ((ours, "client"), (theirs, "viewer")):
        security.generate_keys(d, "server")
        security.generate_keys(d, client, allow=True)
    ctx = zmq.Context()
    try:
        servers = {}
        for d in (ours, theirs):
            servers[d] = ctx.socket(zmq.PULL)
            servers[d].linger = 0
            security.bind(servers[d], "tcp://127.0.0.1:*", SecurityConfig.from_keys_dir(d, curve_on_loopback=True))

        def delivered(server: Path, client: Path) -> bool:
            with ctx.socket(zmq.PUSH) as push:
                push.linger = 0
                security.configure_client(push, client, server / "server.key")
                push.connect(servers[server].last_endpoint.decode())
                push.send(b"hello")
                return servers[server].poll(1000) != 0 and servers[server].recv() == b"hello"

        assert delivered(theirs, theirs / "viewer.key_secret")
        assert delivered(ours, ours / "client.key_secret")
        # the other list's key, even with the right server key: refused by that socket's own domain
        assert not delivered(ours, theirs / "viewer.key_secret")
        assert not delivered(theirs, ours / "client.key_secret")
    finally:
        security.stop_authenticator(ctx)
        ctx.destroy(linger=0)
