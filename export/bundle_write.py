"""Write a bundle's manifest.json: hash every file in the directory and record it.

The caller provides everything but ``files`` and the format fields; this module fills those in,
writes atomically, then re-reads the bundle through the same verifier the runtime uses.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, Bundle, sha256_file


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
    files = {p.relative_to(root).as_posix(): sha256_file(p)
             for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}
    out = {"format": FORMAT, "format_version": FORMAT_VERSION, **body,
           "toolchain": body.get("toolchain") or toolchain_versions(),
           "created": body.get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "files": files}
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".manifest-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(out, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, root / MANIFEST)
    return Bundle.load(root, verify=True)
