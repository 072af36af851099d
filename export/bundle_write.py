"""Write a bundle's manifest.json: hash every file in the directory and record it.

The caller provides everything but ``files`` and the format fields; this module fills those in,
writes atomically, then re-reads the bundle through the same verifier the runtime uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, Bundle, sha256_file
from edge_runtime.errors import BundleError, EdgeRuntimeError, expected


def toolchain_versions() -> dict[str, str]:
    """Versions of the libraries that shaped the artefacts (recorded in every manifest)."""
    import importlib.metadata as md

    out = {}
    for pkg in ("onnx", "onnxruntime", "numpy", "opencv-python-headless", "opencv-python", "torch", "tensorrt"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def write_bundle(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> Bundle:
    root = Path(directory)
    body = {k: v for k, v in manifest.items() if k not in ("files", "format", "format_version")}
    links = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_symlink()]
    if links:  # its target could change under the hash, or lie outside the bundle
        raise BundleError(f"bundle {root}: " + expected("plain files only", f"symbolic links {links}"))
    files = {rel: sha256_file(p) for p in sorted(root.rglob("*"))
             if p.is_file() and (rel := p.relative_to(root).as_posix()) != MANIFEST}
    out = {"format": FORMAT, "format_version": FORMAT_VERSION, **body,
           "toolchain": body.get("toolchain") or toolchain_versions(),
           "created": body.get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "files": files}
    candidate = Bundle(root, out, "")
    candidate._check_schema()  # refuse before the old manifest is replaced
    candidate._check_gate_report()
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".manifest-", suffix=".json")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600: a bundle is read by other users (the runtime's service)
        with os.fdopen(fd, "w") as f:
            json.dump(out, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, root / MANIFEST)
    finally:  # a value json cannot write must not leave a stray file that the next write would hash
        if os.path.exists(tmp):
            os.unlink(tmp)
    return Bundle.load(root, verify=True)


@contextlib.contextmanager
def named_as(stage: Path, root: Path) -> Iterator[None]:
    """Errors about a working copy name the bundle the user gave (not a hidden folder beside it)."""
    try:
        yield
    except EdgeRuntimeError as exc:
        if str(stage) not in str(exc):
            raise
        raise type(exc)(str(exc).replace(str(stage), str(root))) from None


@contextlib.contextmanager
def staged(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """A copy of bundle ``directory`` to rewrite, swapped in whole (after verification) when the block
    ends without an error; on an error the old bundle is left as it was. A runtime loading the bundle
    meanwhile sees the old one, or briefly none, never a mix of old and new files."""
    root = Path(directory)
    stage = root.parent / f".{root.name}.stage-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(root, stage)
    try:
        with named_as(stage, root):
            yield stage
            Bundle.load(stage, verify=True)
        backup = root.parent / f".{root.name}.old-{os.getpid()}"
        os.rename(root, backup)
        os.rename(stage, root)
        shutil.rmtree(backup)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_archive(directory: str | os.PathLike[str], archive: str | os.PathLike[str]) -> Path:
    """Pack a verified bundle into one uncompressed .tar (members under ``<name>/``, sorted,
    owner 0, mtime = the manifest's creation time): the same bundle gives the same bytes."""
    import tarfile

    bundle = Bundle.load(directory, verify=True)
    created = str(bundle.manifest.get("created") or "1970-01-01T00:00:00+00:00")
    mtime = int(datetime.fromisoformat(created).timestamp())
    out = Path(archive)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}-", suffix=".tmp")
    os.close(fd)
    rels = [MANIFEST] + sorted(bundle.manifest["files"])
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for rel in rels:
                info = tar.gettarinfo(str(bundle.path / rel), arcname=f"{bundle.name}/{rel}")
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = mtime
                info.mode = 0o644
                with open(bundle.path / rel, "rb") as f:
                    tar.addfile(info, f)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def unpack_archive(archive: str | os.PathLike[str], into: str | os.PathLike[str]) -> Path:
    """Extract a bundle archive with tarfile's "data" filter (no links out, no absolute paths,
    no devices) and return the bundle directory; verify it with ``Bundle.load``."""
    import tarfile

    from edge_runtime.errors import BundleError, expected

    try:
        with tarfile.open(archive, "r:*") as tar:
            tops = {Path(m.name).parts[0] for m in tar.getmembers() if m.name not in ("", ".")}
            if len(tops) != 1:
                raise BundleError(f"{archive}: " + expected("one top-level bundle directory", sorted(tops)))
            tar.extractall(into, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"{archive}: not a readable bundle archive ({exc})") from None
    return Path(into) / tops.pop()
