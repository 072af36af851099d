"""Output files that hold pixels or results: readable by the owner and the group only.

Recordings, snapshots and annotated PNGs are patient images: with the usual umask 022 OpenCV would
leave them (and their folders) readable by every local user. Directories are made at most 0750 and
files at most 0640, like results.jsonl (a stricter umask stays stricter); atomic where a reader may
look at the file while it is written.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from .errors import ConfigError, InputError, expected

DIR_MODE = 0o750
FILE_MODE = 0o640


def file_stem(stream: str) -> str:
    """A stream id as a file name on every filesystem ("phantom:us" -> "phantom_us"): ':' is not
    allowed on FAT/exFAT media or Windows shares, where recordings are often copied."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stream)


def private_dir(path: str | os.PathLike[str], what: str = "an output folder") -> Path:
    """``path`` (and missing parents) created 0750; an existing directory (the caller's, or one another
    process made meanwhile) is left as it is. ``what``: the folder's role, for the message."""
    out = Path(path)
    try:
        out.mkdir(parents=True, mode=DIR_MODE)
    except FileExistsError:
        if not out.is_dir():  # named without its path: a file name can identify a patient
            raise ConfigError(expected(what, "a file of that name")) from None
        return out
    os.chmod(out, os.stat(out).st_mode & DIR_MODE)  # at most 0750, whatever the umask let through
    return out


def private_file(path: str | os.PathLike[str]) -> Path:
    """Restrict a file to at most 0640: nothing for others, read-only for the group (a stricter umask
    stays stricter)."""
    os.chmod(path, os.stat(path).st_mode & FILE_MODE)
    return Path(path)


def _create(tmp: Path) -> int:
    """A new temporary file, never through a link planted in a shared folder (O_EXCL refuses one,
    O_NOFOLLOW too); a regular file of that name is what a write killed midway left: replaced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        return os.open(tmp, flags, FILE_MODE)
    except FileExistsError:
        if tmp.is_symlink() or not tmp.is_file():  # the message names no file: a name can identify a patient
            raise ConfigError(expected("an output's temporary file (.NAME.partial) absent or a regular file",
                                       "a symbolic link or a special file (refused: the file would go wherever "
                                       "it points)")) from None
        tmp.unlink()
        return os.open(tmp, flags, FILE_MODE)


def write_image(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Encode ``image`` by its suffix and write it 0640, through a temporary file and a rename, so a
    reader never sees half a PNG."""
    out = Path(path)
    ok, data = cv2.imencode(out.suffix or ".png", image)
    if not ok:
        raise InputError(expected(f"an image OpenCV can encode as {out.suffix}", f"{image.dtype} {image.shape}"))
    return write_file(out, data.tobytes())


def write_file(path: str | os.PathLike[str], data: bytes) -> Path:
    """``data`` to ``path``, 0640, through a temporary file and a rename: a reader never sees half a file,
    and a symbolic link planted at ``path`` is replaced, never written through."""
    out = Path(path)
    tmp = out.with_name(f".{out.name}.partial")
    fd = _create(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        private_file(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
