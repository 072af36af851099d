"""Read and verify a model bundle: a directory with manifest.json and the files it hashes.

The manifest format is specified in docs/BUNDLE.md. Verification is strict: every listed file
must exist with its sha256, and no unlisted file may sit in the bundle, so a swapped or added
model is refused rather than run on a patient. The bundle's identity in provenance is the
sha256 of manifest.json, which itself pins every file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine_cache import EngineKey
from .errors import BackendError, BundleError, ConfigError, expected

MANIFEST = "manifest.json"
FORMAT = "edge-runtime-bundle"
FORMAT_VERSION = 1
TASKS = ("detection", "enhancement", "segmentation")
PRECISIONS = ("fp32", "fp16", "int8")
ARTIFACT_KINDS = ("onnx", "engine")
# Where an artefact may run (its optional "targets"; none listed = every backend). A general target serves
# its specialisations: "onnxruntime" serves "onnxruntime-cpu".
TARGETS = ("tensorrt", "onnxruntime", "onnxruntime-cpu")
DEFAULT_TARGETS = ("tensorrt", "onnxruntime")  # what artifact(target=None) must serve: every backend
HEX64 = re.compile(r"[0-9a-f]{64}")
BUNDLE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
REQUIRED = ("format", "format_version", "name", "task", "modality", "inputs", "outputs",
            "preprocess", "postprocess", "artifacts", "files")
OPTIONAL = ("bits_stored", "photometric", "description", "metrics", "tolerances", "calibration", "validation",
            "training", "baselines", "toolchain", "created")
PHOTOMETRICS = ("MONOCHROME2", "MONOCHROME1", "RGB")


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """One runnable file of the bundle: an ONNX variant or a TensorRT engine."""

    file: str
    kind: str
    precision: str
    sha256: str
    metrics: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. quantisation options, engine key
    targets: tuple[str, ...] = ()  # empty: every backend (docs/BUNDLE.md, "targets")

    def serves(self, target: str) -> bool:
        """True when this artefact may run on ``target`` ("tensorrt", "onnxruntime", "onnxruntime-cpu")."""
        return not self.targets or any(target == t or target.startswith(t + "-") for t in self.targets)


TRUSTED_ENV = "EDGE_RUNTIME_TRUSTED_BUNDLES"  # a file of manifest sha256s, one a line: the only bundles served


def check_trusted(bundle: Bundle) -> None:
    """With $EDGE_RUNTIME_TRUSTED_BUNDLES set, a BundleError unless ``bundle``'s manifest sha256 is
    listed there. Verification catches a changed file, not a rewritten manifest (a raised threshold
    hides every finding, swapped class names mislabel them, a swapped model with its hashes rewritten
    verifies): a cart pins the bundles it was validated with, in a file on its read-only partition."""
    listed = os.environ.get(TRUSTED_ENV)
    if not listed:
        return
    try:
        text = Path(listed).read_text()
    except OSError as exc:  # set but unreadable: serving anything would defeat it
        raise ConfigError(f"${TRUSTED_ENV}: " + expected("a readable file of manifest sha256s",
                                                         exc.strerror or type(exc).__name__)) from None
    trusted = {w.lower() for line in text.splitlines() for w in line.split("#")[0].split()}
    if bundle.sha256 not in trusted:
        raise BundleError(f"bundle {bundle.name!r}: " + expected(
            f"a manifest sha256 listed in ${TRUSTED_ENV} ({len(trusted)} listed)", bundle.sha256))


def gate_results(report: dict[str, Any], file: str, digest: str | None) -> list[dict[str, Any]]:
    """A validation report's results for one file: by sha256 where the report records them, else by
    file name (reports before per-candidate hashes). Shared by `export bundle` and bundle loading."""
    cands = [c for c in report.get("candidates") or [] if isinstance(c, dict)]
    return [c for c in cands if c.get("sha256") == digest] or \
           [c for c in cands if not c.get("sha256") and c.get("file") == file]


def judged_fp32(report: dict[str, Any]) -> str | None:
    """The sha256 of the FP32 model a validation report judged against (reports since 2026-12-03)."""
    fp32 = report.get("fp32")
    return fp32.get("sha256") if isinstance(fp32, dict) else None


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    sha256: str  # of manifest.json: what results cite as provenance

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, verify: bool = True) -> Bundle:
        root = Path(path)
        if not root.is_dir():
            raise BundleError(expected("a bundle directory containing manifest.json", str(root)))
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise BundleError(expected(f"{MANIFEST} in the bundle", f"no such file in {root}"))
        raw = mpath.read_bytes()
        try:
            manifest = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{mpath}: not valid JSON ({exc})") from None
        bundle = cls(root, manifest, hashlib.sha256(raw).hexdigest())
        bundle._check_schema()
        if verify:
            bundle.verify()
        return bundle

    # -- manifest accessors -------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def task(self) -> str:
        return str(self.manifest["task"])

    @property
    def preprocess(self) -> dict[str, Any]:
        return dict(self.manifest["preprocess"])

    @property
    def postprocess(self) -> dict[str, Any]:
        return dict(self.manifest["postprocess"])

    @property
    def artifacts(self) -> list[Artifact]:
        return [Artifact(a["file"], a["kind"], a["precision"], self.manifest["files"][a["file"]],
                         dict(a.get("metrics", {})), dict(a.get("info", {})), tuple(a.get("targets") or ()))
                for a in self.manifest["artifacts"]]

    def artifact(self, precision: str = "fp32", kind: str = "onnx", target: str | None = None) -> Artifact:
        """The artefact to run in ``precision``: for ``target`` (e.g. "onnxruntime-cpu") one that names it
        in its ``targets``, else one that serves it (no targets, or a general target such as
        "onnxruntime"); without a target, one that serves every backend (TensorRT and ONNX Runtime)."""
        match = [a for a in self.artifacts if a.precision == precision and a.kind == kind]
        if target is not None:
            ranked = [a for a in match if target in a.targets] + [a for a in match if a.serves(target)]
        else:
            ranked = [a for a in match if all(a.serves(t) for t in DEFAULT_TARGETS)]
        if ranked:
            return ranked[0]
        have = [f"{a.kind}/{a.precision}" + (f" {list(a.targets)}" if a.targets else "") for a in self.artifacts]
        want = f"a {kind} artifact in {precision}" + (f" for {target}" if target else " for every backend")
        raise BundleError(f"bundle {self.name!r}: " + expected(want, have))

    def file(self, rel: str) -> Path:
        return self.path / rel

    # -- checks -------------------------------------------------------------------------
    def _check_schema(self) -> None:
        m = self.manifest
        where = f"{self.path / MANIFEST}"
        if not isinstance(m, dict):
            raise BundleError(f"{where}: " + expected("a JSON object", type(m).__name__))
        missing = [k for k in REQUIRED if k not in m]
        if missing:
            raise BundleError(f"{where}: " + expected(f"fields {list(REQUIRED)}", f"missing {missing}"))
        unknown = sorted(set(m) - set(REQUIRED) - set(OPTIONAL))
        if unknown:  # a misspelt "bits_stord" turned the bit-depth check off; "tolerences" the gate's own
            raise BundleError(f"{where}: unknown field(s) {unknown}; " + expected(
                f"fields among {sorted(REQUIRED + OPTIONAL)}", unknown))
        if m["format"] != FORMAT:
            raise BundleError(f"{where}: " + expected(f"format {FORMAT!r}", m["format"]))
        if type(m["format_version"]) is not int or m["format_version"] != FORMAT_VERSION:  # true == 1 in Python
            raise BundleError(f"{where}: " + expected(f"format_version {FORMAT_VERSION}", m["format_version"]))
        if m["task"] not in TASKS:
            raise BundleError(f"{where}: " + expected(f"task in {TASKS}", m["task"]))
        if not (isinstance(m["name"], str) and BUNDLE_NAME.fullmatch(m["name"])):
            # it names the archive's top folder and cache entries: "lab/yolo" made an archive only the reader refused
            raise BundleError(f"{where}: " + expected("name of 1-64 of A-Z a-z 0-9 . _ - (no '/')", str(m["name"])[:80]))
        files = m["files"]
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise BundleError(f"{where}: " + expected("files as an object {path: sha256 hex string}",
                                                      type(files).__name__ if not isinstance(files, dict) else
                                                      sorted({type(v).__name__ for v in files.values()})))
        bad_hash = [k for k, v in files.items() if not HEX64.fullmatch(v)]
        if bad_hash:
            raise BundleError(f"{where}: " + expected("each file's sha256 as 64 lower-case hex digits",
                                                      f"{bad_hash[0]}: {files[bad_hash[0]][:70]!r}"))
        for key in ("inputs", "outputs"):
            tensors = m[key]
            if not (isinstance(tensors, list) and tensors and all(
                    isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("shape"), list)
                    for t in tensors)):
                raise BundleError(f"{where}: " + expected(f"{key} as a non-empty list of {{name, dtype, shape}}",
                                                          str(tensors)[:80]))
        if not (isinstance(m["modality"], list) and m["modality"] and all(isinstance(v, str) for v in m["modality"])):
            raise BundleError(f"{where}: " + expected('modality as a list of DICOM codes, e.g. ["US"]', m["modality"]))
        if m.get("bits_stored") is not None and (type(m["bits_stored"]) is not int or not 0 <= m["bits_stored"] <= 16):
            raise BundleError(f"{where}: " + expected("bits_stored as an integer 0..16 (0: all bits) or null",
                                                      m["bits_stored"]))
        if m.get("photometric") is not None and m["photometric"] not in PHOTOMETRICS:
            raise BundleError(f"{where}: " + expected(f"photometric in {list(PHOTOMETRICS)} or null", m["photometric"]))
        arts = m["artifacts"]
        if not isinstance(arts, list):
            raise BundleError(f"{where}: " + expected("artifacts as a list of objects", type(arts).__name__))
        for i, a in enumerate(arts):
            if not (isinstance(a, dict) and all(isinstance(a.get(k, {}), dict) for k in ("info", "metrics"))):
                raise BundleError(f"{where}: artifacts[{i}]: " + expected(
                    "an object (with optional info and metrics objects)",
                    str(a)[:80] if not isinstance(a, dict) else {k: type(a.get(k)).__name__ for k in ("info", "metrics")}))
        if not any(a.get("kind") == "onnx" and a.get("precision") == "fp32" for a in arts):
            raise BundleError(f"{where}: artifacts: " + expected("an fp32 onnx artefact (the model the others derive from)",
                                                      [(a.get("kind"), a.get("precision")) for a in arts]))
        for key in ("preprocess", "postprocess"):
            if not isinstance(m[key], dict):
                raise BundleError(f"{where}: " + expected(f"{key} as an object", type(m[key]).__name__))
        validation = m.get("validation")
        if validation is not None and not (isinstance(validation, dict)
                                           and isinstance(validation.get("passed"), bool)
                                           and isinstance(validation.get("file"), str)
                                           and validation["file"] in files):
            raise BundleError(f"{where}: " + expected(
                "validation as an object with a boolean 'passed' and a 'file' listed in files",
                validation if not isinstance(validation, dict)
                else {k: validation.get(k) for k in ("passed", "file")}))
        seen: dict[tuple[Any, Any], list[set[str]]] = {}  # (kind, precision) -> targets of each artefact
        for a in arts:
            if a.get("kind") not in ARTIFACT_KINDS or a.get("precision") not in PRECISIONS:
                raise BundleError(f"{where}: artifact {a.get('file')!r}: " + expected(
                    f"kind in {ARTIFACT_KINDS} and precision in {PRECISIONS}", (a.get("kind"), a.get("precision"))))
            targets = a.get("targets")
            if targets is not None and (not isinstance(targets, list) or not targets
                                        or any(t not in TARGETS for t in targets)):
                raise BundleError(f"{where}: artifact {a.get('file')!r}: " + expected(
                    f"targets as a non-empty list of {TARGETS} (or no targets: every backend)", targets))
            if not isinstance(a.get("file"), str) or a["file"] not in files:
                raise BundleError(f"{where}: " + expected(f"artifact {a.get('file')!r} listed in files", "not listed"))
            if a["kind"] == "engine":  # several may share a precision: each names the GPU it was built for
                self._check_engine(a, files, where)
                continue
            # Two artefacts of one kind and precision must not both serve a target: which would run?
            mine = set(targets or TARGETS)
            if any(mine & other for other in seen.get((a["kind"], a["precision"]), [])):
                raise BundleError(f"{where}: artifact {a.get('file')!r}: " + expected(
                    f"targets disjoint from the other {a['kind']} {a['precision']} artefact's", sorted(mine)))
            seen.setdefault((a["kind"], a["precision"]), []).append(mine)
        for rel in files:
            p = Path(rel)
            if p.is_absolute() or ".." in p.parts:
                raise BundleError(f"{where}: " + expected("file paths inside the bundle", rel))
        # An FP16/INT8 file made from another FP32 model (the fp32 re-trained or swapped, the rest left
        # behind) is stale: it would run a different model under this bundle's name.
        fp32 = [files.get(a.get("file")) for a in arts if a.get("kind") == "onnx" and a.get("precision") == "fp32"]
        for a in arts:
            source = a.get("info", {}).get("source_fp32_sha256")
            if source and fp32 and source not in fp32:
                raise BundleError(f"{where}: artifact {a.get('file')!r}: " + expected(
                    f"made from this bundle's fp32 model (sha256 {str(fp32[0])[:12]}...)",
                    f"made from fp32 sha256 {str(source)[:12]}... (stale: export it again from this fp32)"))

    def _check_engine(self, a: dict[str, Any], files: dict[str, Any], where: str) -> None:
        """An engine artefact: targets ["tensorrt"] and info.engine_key, the cache key it was built under
        (docs/BUNDLE.md), naming its precision and the hash of an ONNX artefact of this bundle."""
        info = a.get("info")
        name = f"{where}: engine artifact {a['file']!r}"
        if a.get("targets") != ["tensorrt"]:
            raise BundleError(f"{name}: " + expected('targets ["tensorrt"]', a.get("targets")))
        want = "info.engine_key, the engine cache key it was built under"
        data = info.get("engine_key") if isinstance(info, dict) else None
        if not isinstance(data, dict):
            raise BundleError(f"{name}: " + expected(want, data))
        try:
            key = EngineKey.from_dict(data)
        except (BackendError, ConfigError) as exc:
            raise BundleError(f"{name}: " + expected(want, str(exc))) from None
        # what TensorRT builds from: an ONNX artefact that serves it (not the CPU-only int8_cpu.onnx)
        onnx = {files.get(str(o.get("file"))) for o in self.manifest["artifacts"]
                if isinstance(o, dict) and o.get("kind") == "onnx" and o.get("precision") == key.precision
                and (o.get("targets") is None or "tensorrt" in o["targets"])}
        if key.precision != a["precision"] or key.model_sha256 not in onnx:
            raise BundleError(f"{name}: " + expected(
                f"an engine built from this bundle's {a['precision']} ONNX artefact",
                f"one built from {key.model_sha256[:12]}... in {key.precision}"))

    def engines(self, precision: str) -> list[tuple[Path, EngineKey]]:
        """The TensorRT engines the bundle carries in ``precision``, with the keys they were built under."""
        return [(self.file(a.file), EngineKey.from_dict(a.info["engine_key"])) for a in self.artifacts
                if a.kind == "engine" and a.precision == precision]

    def verify(self) -> None:
        """Raise BundleError naming every file whose hash differs, is missing, or is unlisted."""
        problems = []
        listed = self.manifest["files"]
        for rel, digest in listed.items():
            p = self.path / rel
            if not p.is_file():
                problems.append(f"{rel}: missing")
            elif (found := sha256_file(p)) != digest:
                problems.append(f"{rel}: sha256 {found[:16]}..., manifest says {digest[:16]}...")
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path).as_posix()
            if p.is_symlink():  # rglob does not enter a linked directory; a linked file can change under its hash
                problems.append(f"{rel}: a symbolic link (a bundle holds plain files only)")
            elif p.is_file() and rel != MANIFEST and rel not in listed:
                problems.append(f"{rel}: present but not listed in the manifest")
        if problems:
            raise BundleError(f"bundle {self.path} failed verification, refusing it: " + "; ".join(problems))
        self._check_gate_report()

    def _check_gate_report(self) -> None:
        """A gate record that says passed is backed by its (hashed) report: every FP16/INT8 ONNX file of
        the bundle has a passing result there (matched by sha256 where the report records it, else by
        file name, as `export bundle` matched them), and the report judged this bundle's fp32 model
        (where it records its sha256). Without this, editing manifest.json alone could serve an INT8
        file whose gate failed, or a file judged on another model. A record that says failed serves
        only FP32 and needs no report."""
        record = self.manifest.get("validation")
        if not isinstance(record, dict) or record.get("passed") is not True:
            return
        where = f"{self.path / MANIFEST}: validation"
        try:
            report = json.loads((self.path / record["file"]).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BundleError(f"{where}: " + expected("a readable JSON report", type(exc).__name__)) from None
        if not isinstance(report, dict):
            raise BundleError(f"{where}: " + expected("a JSON object report", type(report).__name__))
        files = self.manifest["files"]
        for a in self.manifest["artifacts"]:
            if a.get("kind") != "onnx" or a.get("precision") == "fp32":
                continue
            match = gate_results(report, a["file"], files.get(a["file"]))
            if not match or not all(c.get("passed") is True for c in match):
                raise BundleError(f"{where}: " + expected(
                    f"a passing result for {a['file']} in {record['file']} (the record says passed)",
                    "a failed one" if match else "none"))
        judged = judged_fp32(report)
        fp32 = [files.get(a.get("file")) for a in self.manifest["artifacts"]
                if a.get("kind") == "onnx" and a.get("precision") == "fp32"]
        if judged and judged not in fp32:
            raise BundleError(f"{where}: " + expected(f"a report on this bundle's fp32 model ({str(fp32[0])[:12]}...)",
                                                      f"one judged against {str(judged)[:12]}... (another model)"))
