"""Transport security: loopback by default, CURVE + an allow-list of client keys off the box.

Frames carry patient data. On one box the pipeline uses ipc:// (or inproc://, or tcp://127.0.0.1),
which never leaves the machine. Binding anything else (``tcp://0.0.0.0``, ``tcp://*``, an interface or
a LAN address) requires CURVE encryption with a ZAP allow-list of client public keys, unless the
operator passes ``insecure=True`` explicitly, which logs a loud warning every time.

Key layout made by ``edge-runtime keys generate DIR``::

    DIR/server.key, DIR/server.key_secret     the server's pair (secret file mode 0600)
    DIR/<client>.key, DIR/<client>.key_secret a client's pair
    DIR/allowed/<client>.key                  public keys the server accepts (the allow-list)

This module is also the ``keys`` CLI group.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ..errors import ConfigError, expected

log = logging.getLogger(__name__)

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "lo", "ip6-localhost"}


def is_local_endpoint(endpoint: str) -> bool:
    """True when an endpoint cannot be reached from another machine (inproc, ipc, loopback TCP)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        raise ConfigError(expected("an endpoint like tcp://127.0.0.1:5555 or ipc:///path", endpoint))
    if scheme in ("inproc", "ipc"):
        return True
    if scheme not in ("tcp", "ws", "wss", "udp", "pgm", "epgm", "norm", "tipc", "vmci"):
        raise ConfigError(expected("an endpoint scheme inproc, ipc or tcp", scheme))
    if scheme != "tcp":
        return False
    host = _tcp_host(rest)  # "*" and interface names are not loopback
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class SecurityConfig:
    """Where keys live and what to do with a non-loopback endpoint.

    Server side (a node that binds): ``server_secret`` + ``allowed_dir``. Client side (a node or
    Subscriber that connects): ``client_secret`` + ``server_public``. ``curve_on_loopback`` forces
    CURVE on loopback endpoints too (tests, or a box shared with untrusted users).
    """

    server_secret: Path | None = None
    allowed_dir: Path | None = None
    client_secret: Path | None = None
    server_public: Path | None = None
    insecure: bool = False
    curve_on_loopback: bool = False

    @classmethod
    def from_keys_dir(cls, keys_dir: str | os.PathLike, client: str = "client", **kw: object) -> SecurityConfig:
        d = Path(keys_dir)
        if not d.is_dir():
            raise ConfigError(expected("a keys directory made by `edge-runtime keys generate`", str(d)))
        client_secret = d / f"{client}.key_secret"
        return cls(server_secret=d / "server.key_secret", allowed_dir=d / "allowed",
                   client_secret=client_secret if client_secret.exists() else None,
                   server_public=d / "server.key", **kw)  # type: ignore[arg-type]

    @property
    def can_serve_curve(self) -> bool:
        return self.server_secret is not None and self.allowed_dir is not None


def wants_curve(endpoint: str, security: SecurityConfig | None) -> bool:
    """Decide, for a bind, whether CURVE is used; refuse an open non-loopback bind.

    Raises ConfigError for a non-loopback endpoint without keys unless ``insecure`` is set; in that
    case logs a loud warning (every start) and returns False.
    """
    local = is_local_endpoint(endpoint)
    if endpoint.startswith("ipc://@"):
        # Linux abstract sockets have no file, so no permissions: any local user can connect and read
        # the results (patient data). Our clients speak CURVE over tcp only: a filesystem path it is.
        if security is not None and security.insecure:
            log.warning("!!! INSECURE: %s is an abstract socket any local user can connect to. !!!", endpoint)
            return False
        raise ConfigError(expected("an ipc path in a folder only this user can open (or tcp with --keys), "
                                   "or an explicit --insecure", f"the abstract socket {endpoint}"))
    if endpoint.startswith(("inproc://", "ipc://")):
        return False  # never leaves the box; ipc is guarded by file permissions
    if security is not None and security.can_serve_curve and (not local or security.curve_on_loopback):
        return True
    if security is not None and security.curve_on_loopback:
        raise ConfigError(expected("server_secret and allowed_dir for CURVE", "missing keys"))
    if local:
        return False
    if security is not None and security.insecure:
        log.warning("!!! INSECURE: %s is reachable from the network WITHOUT encryption or client "
                    "authentication; frames may carry patient data. Use --keys DIR instead of --insecure. !!!",
                    endpoint)
        return False
    raise ConfigError(expected(f"CURVE keys (--keys DIR) or an explicit --insecure to bind {endpoint}",
                               "a non-loopback endpoint without keys"))


def _load_pair(path: Path, what: str) -> tuple[bytes, bytes | None]:
    if not Path(path).is_file():
        raise ConfigError(expected(f"the {what} key file", str(path)))
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as exc:
        raise ConfigError(expected(f"a ZeroMQ certificate in {path}", str(exc))) from exc
    return public, secret


def load_public_key(key: str | os.PathLike | bytes) -> bytes:
    """A Z85 public key given as 40 characters, or a path to a ``.key`` file."""
    if isinstance(key, bytes) and len(key) == 40:
        return key
    if isinstance(key, str) and len(key) == 40 and not os.path.exists(key):
        return key.encode("ascii")
    public, _ = _load_pair(Path(os.fsdecode(key)), "server public")
    return public


# One ZAP authenticator per context (ZAP is a per-context inproc service).
_AUTH: dict[int, ThreadAuthenticator] = {}
_AUTH_LOCK = threading.Lock()


def zap_domain(allowed_dir: Path) -> str:
    """The ZAP domain of one allow-list. Sockets of a context share its authenticator: with a single
    domain the last allow-list configured served them all, and an integrator's subscriber key opened
    the internal channels (the run's own keys) too, or the reverse."""
    return "edge-" + hashlib.sha256(os.fsencode(Path(allowed_dir).resolve())).hexdigest()[:16]


def ensure_authenticator(ctx: zmq.Context, allowed_dir: Path) -> str:
    """Start the context's authenticator if needed, load ``allowed_dir``; returns its ZAP domain."""
    allowed = Path(allowed_dir)
    if not allowed.is_dir() or not any(allowed.glob("*.key")):
        raise ConfigError(expected(f"client public keys (*.key) in {allowed}", "none"))
    domain = zap_domain(allowed)
    with _AUTH_LOCK:
        auth = _AUTH.get(id(ctx))
        if auth is None:
            auth = ThreadAuthenticator(ctx, log=logging.getLogger("edge_runtime.pipeline.zap"))
            auth.start()
            _AUTH[id(ctx)] = auth
        auth.configure_curve(domain=domain, location=str(allowed))
    return domain


def stop_authenticator(ctx: zmq.Context) -> None:
    with _AUTH_LOCK:
        auth = _AUTH.pop(id(ctx), None)
    if auth is not None:
        auth.stop()


def configure_server(sock: zmq.Socket, security: SecurityConfig) -> None:
    if security.server_secret is None or security.allowed_dir is None:
        raise ConfigError(expected("server_secret and allowed_dir for a CURVE server", security))
    public, secret = _load_pair(security.server_secret, "server secret")
    if secret is None:
        raise ConfigError(expected("a secret key (.key_secret file)", str(security.server_secret)))
    sock.zap_domain = ensure_authenticator(sock.context, security.allowed_dir).encode()
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def configure_client(sock: zmq.Socket, client_secret: str | os.PathLike,
                     server_public: str | os.PathLike | bytes) -> None:
    public, secret = _load_pair(Path(os.fsdecode(client_secret)), "client secret")
    if secret is None:
        raise ConfigError(expected("a client secret key (.key_secret file)", str(client_secret)))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = load_public_key(server_public)


def _tcp_host(rest: str) -> str:
    """The host of a tcp endpoint after "tcp://": ``[source;]host:port``, brackets of ``[v6]`` removed."""
    return rest.split(";")[-1].rsplit(":", 1)[0].strip("[]")


def _ipv6_host(endpoint: str) -> bool:
    """tcp://[v6]:port (or a bare v6 literal): libzmq refuses it unless the socket's IPV6 option is set."""
    scheme, _, rest = endpoint.partition("://")
    try:
        return scheme == "tcp" and ipaddress.ip_address(_tcp_host(rest)).version == 6
    except ValueError:
        return False


def _check_port(endpoint: str) -> None:
    """libzmq takes a tcp port modulo 65536 (tcp://127.0.0.1:99999 bound port 34463): refused here."""
    scheme, _, rest = endpoint.partition("://")
    port = rest.rsplit(":", 1)[-1] if scheme == "tcp" and ":" in rest else "*"
    if port != "*" and not (port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(expected(f"a tcp port in 1..65535 (or *) in {endpoint}", port))


def _attach(sock: zmq.Socket, endpoint: str, how: str) -> None:
    _check_port(endpoint)
    if _ipv6_host(endpoint):
        sock.setsockopt(zmq.IPV6, 1)
    try:
        sock.bind(endpoint) if how == "bind" else sock.connect(endpoint)
    except zmq.ZMQError as exc:  # a clear error, not a traceback: the endpoint and what libzmq said
        raise ConfigError(f"{how} {endpoint}: " + expected(
            "an address of this machine, a free port and a reachable path" if how == "bind" else
            "an endpoint like tcp://HOST:PORT or ipc:///path", exc.strerror or str(exc))) from None


_UMASK_LOCK = threading.Lock()


def bind(sock: zmq.Socket, endpoint: str, security: SecurityConfig | None) -> None:
    """Bind after the loopback/CURVE policy check; CURVE server options are set before bind."""
    if wants_curve(endpoint, security):
        configure_server(sock, security)  # type: ignore[arg-type]
    elif endpoint.startswith("tcp://") and is_local_endpoint(endpoint):
        # Said here, once per bind (wants_curve also runs as an early check).
        log.warning("%s has no CURVE keys: any local account can connect to it (and subscribe to the results: "
                    "patient data). Bind ipc:///PATH in a folder only this user can open, or give --keys DIR.",
                    endpoint)
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
        # The socket file gets its mode from the umask (0777 under umask 000) and the mode is checked at
        # connect: a chmod after the bind left a gap another account connected in (2 binds of 20), so the
        # file is made owner-only as it is created. The umask is the process's: only narrowed, briefly.
        with _UMASK_LOCK:
            old = os.umask(0o077)
            try:
                _attach(sock, endpoint, "bind")
            finally:
                os.umask(old)
        bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)  # ipc://* binds a path libzmq picks
        os.chmod(bound[len("ipc://"):], 0o600)  # 0700 from the umask: no need to be executable
    else:
        _attach(sock, endpoint, "bind")


def connect(sock: zmq.Socket, endpoint: str, security: SecurityConfig | None) -> None:
    """Connect; as a CURVE client when keys are given and the endpoint is remote (or forced)."""
    if (security is not None and security.client_secret is not None and security.server_public is not None
            and endpoint.startswith("tcp://") and (not is_local_endpoint(endpoint) or security.curve_on_loopback)):
        configure_client(sock, security.client_secret, security.server_public)
    _attach(sock, endpoint, "connect")


# --------------------------------------------------------------------------- key generation + CLI


def generate_keys(keys_dir: str | os.PathLike, name: str = "server", allow: bool = False) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (mode 0600); with ``allow`` add it to allowed/."""
    if not zmq.has("curve"):
        raise ConfigError(expected("a libzmq built with CURVE (libsodium)", "no CURVE support"))
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(expected("a plain key name like 'server' or 'cart1'", name))
    d = Path(keys_dir)
    d.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)  # never let the secret exist world-readable, even for a moment
    try:
        public, secret = zmq.auth.create_certificates(str(d), name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    if allow:
        allowed = d / "allowed"
        allowed.mkdir(exist_ok=True)
        shutil.copyfile(public, allowed / f"{name}.key")
    return Path(public), Path(secret)


def allow_key(keys_dir: str | os.PathLike, public_key_file: str | os.PathLike) -> Path:
    """Add a client's public key file to DIR/allowed/ (checked to be a public key, not a secret)."""
    src = Path(public_key_file)
    _, secret = _load_pair(src, "client public")
    if secret is not None:
        raise ConfigError(expected("a PUBLIC key file (.key), never a secret", str(src)))
    allowed = Path(keys_dir) / "allowed"
    allowed.mkdir(parents=True, exist_ok=True)
    dst = allowed / (src.stem + ".key")
    shutil.copyfile(src, dst)
    return dst


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", required=True)
    gen = sub.add_parser("generate", help="write a CURVE key pair (server by default)")
    gen.add_argument("dir", type=Path)
    gen.add_argument("--name", default="server", help="key name: 'server' or a client name")
    gen.add_argument("--allow", action="store_true", help="also add this key to DIR/allowed/ (a client)")
    allow = sub.add_parser("allow", help="add a client's public key file to DIR/allowed/")
    allow.add_argument("dir", type=Path)
    allow.add_argument("public_key", type=Path)


def run(args: argparse.Namespace) -> int:
    if args.keys_command == "generate":
        public, secret = generate_keys(args.dir, args.name, allow=args.allow)
        print(f"public key: {public}\nsecret key: {secret} (mode 0600: keep it on this device)")
        if args.allow:
            print(f"allowed:    {args.dir / 'allowed' / public.name}")
        return 0
    print(f"allowed: {allow_key(args.dir, args.public_key)}")
    return 0
