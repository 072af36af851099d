"""Pseudonyms for file and folder paths: a keyed hash, so that a stream id cannot be turned back into
the path it came from (names are often an MRN or accession number: an unkeyed SHA-256 of six digits
is reversed by trying all 10^6 in about a second).

The key is 32 random bytes per install, in ``$EDGE_RUNTIME_PSEUDONYM_KEY`` (a file path), else
``$XDG_CONFIG_HOME/edge-runtime/pseudonym.key`` (default ``~/.config/...``), created mode 0600 on
first use. The same path gives the same pseudonym on one install (results of one cart can be joined
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
_fallback: bytes | None = None  # where no key file can be had


def key_path() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "edge-runtime" / "pseudonym.key"


def _create(path: Path) -> bytes:
    """Write a new key where none is, atomically: a whole, synced temporary file linked into place, so
    a process racing this one finds either no key yet (and links its own, which fails) or a whole
    one, and a power cut leaves no empty key. Where the filesystem has no hard links (vfat, exFAT on
    a removable partition) the key is created exclusively in place instead."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = os.urandom(KEY_BYTES)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".pseudonym-")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use that one
        except OSError:  # no hard links here
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
        _sync_dir(path.parent)
    finally:
        os.unlink(tmp)
    return path.read_bytes()


def _sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory; the key file itself is synced
    finally:
        os.close(fd)


def key() -> bytes:
    """This install's pseudonym key (read once per process and path)."""
    global _cached
    with _lock:
        try:
            path = key_path()  # Path.home() raises RuntimeError without HOME and a passwd entry
        except RuntimeError as exc:
            return _process_key("one", str(exc))
        if _cached is not None and _cached[0] == path:
            return _cached[1]
        try:
            data = path.read_bytes() if path.is_file() else _create(path)
        except OSError as exc:
            return _process_key(path, exc.strerror or type(exc).__name__)
        if len(data) < 16:
            raise ConfigError(f"pseudonym key {path}: " + expected("at least 16 bytes", f"{len(data)} bytes"))
        _cached = (path, data)
        return data


def _process_key(where: object, reason: str) -> bytes:
    """Where no key file can be had: one random key for this process, so ids are stable within the run."""
    global _fallback
    if _fallback is None:
        log.warning("pseudonym key: cannot read or create %s (%s); using a key for this process only, "
                    "so stream ids will differ from run to run (set %s to a writable path)", where, reason, ENV_VAR)
        _fallback = os.urandom(KEY_BYTES)
    return _fallback


def pseudonym(name: str, digits: int = 12) -> str:
    """``digits`` hex digits of HMAC-SHA256(install key, name)."""
    return hmac.new(key(), name.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:digits]
