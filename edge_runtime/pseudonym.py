"""Pseudonyms for file and folder names: a keyed hash, so that a stream id cannot be turned back into
the name it came from (names are often an MRN or accession number: an unkeyed SHA-256 of six digits
is reversed by trying all 10^6 in about a second).

The key is 32 random bytes per install, in ``$EDGE_RUNTIME_PSEUDONYM_KEY`` (a file path), else
``$XDG_CONFIG_HOME/edge-runtime/pseudonym.key`` (default ``~/.config/...``), created mode 0600 on
first use. The same name gives the same pseudonym on one install (results of one cart can be joined
across runs) and a different one on another. Where the key cannot be created (read-only home on a
cart: point the variable at a writable partition) a random key is used for this process only, with
a warning: ids then differ from run to run.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import tempfile
import threading
from pathlib import Path

from .errors import ConfigError, expected

log = logging.getLogger(__name__)

ENV_VAR = "EDGE_RUNTIME_PSEUDONYM_KEY"
KEY_BYTES = 32

_lock = threading.Lock()
_cached: tuple[Path, bytes] | None = None


def key_path() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "edge-runtime" / "pseudonym.key"


def _create(path: Path) -> bytes:
    """Write a new key where none is, atomically: a temporary file linked into place, so a process
    racing this one reads either nothing yet (and links its own, which fails) or a whole key."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".pseudonym-")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(KEY_BYTES))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use that one
    finally:
        os.unlink(tmp)
    return path.read_bytes()


def key() -> bytes:
    """This install's pseudonym key (read once per process and path)."""
    global _cached
    path = key_path()
    with _lock:
        if _cached is not None and _cached[0] == path:
            return _cached[1]
        try:
            data = path.read_bytes() if path.is_file() else _create(path)
        except OSError as exc:
            log.warning("pseudonym key: cannot read or create %s (%s); using a key for this process only, "
                        "so stream ids will differ from run to run (set %s to a writable path)",
                        path, exc.strerror or type(exc).__name__, ENV_VAR)
            data = os.urandom(KEY_BYTES)
        if len(data) < 16:
            raise ConfigError(f"pseudonym key {path}: " + expected("at least 16 bytes", f"{len(data)} bytes"))
        _cached = (path, data)
        return data


def pseudonym(name: str, digits: int = 12) -> str:
    """``digits`` hex digits of HMAC-SHA256(install key, name)."""
    return hmac.new(key(), name.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:digits]
