"""Device configs (device_configs/*.yaml) and detection of the device we run on.

One YAML file per device class, read by the export toolchain and the runtime alike. Every field
is required (null where allowed); unknown fields are rejected so a typo never passes silently.
Files are read with ``yaml.safe_load`` only.

Fields
  name                str    the file's stem, lowercase letters, digits and dashes ("jetson-orin-nano-8gb")
  description         str    one line for people: the hardware and its software stack
  kind                str    "jetson" (integrated GPU, shared memory), "dgpu" (discrete NVIDIA GPU) or "cpu"
  backend             str    preferred inference backend: "tensorrt", "onnxruntime", or "auto"
                             (TensorRT when it is installed and the engine builds, else ONNX Runtime)
  precisions          list   allowed precisions, a non-empty subset of fp32, fp16, int8 (no duplicates);
                             int8 needs compute capability 6.1 or >= 7.0 when one is given
  dla_cores           int    NVIDIA Deep Learning Accelerator cores usable by TensorRT (0 = none)
  trt_workspace_mb    int    cap on TensorRT's builder workspace in MiB; null = TensorRT's default
                             (null required when the backend can never be TensorRT)
  trt_cuda_graphs     bool   replay TensorRT runs as CUDA graphs (backends/tensorrt.py; each capture is
                             checked against a normal run, failures fall back); false for kind cpu.
                             Never run on a GPU here, so every shipped config has it off
  memory_budget_mb    int    memory the runtime may use for models, engines and frame buffers, in MiB
                             (on a Jetson this is shared with the OS and the CPU side); informational:
                             nothing enforces it yet (the TensorRT workspace cap is trt_workspace_mb)
  cpu_threads         int    threads for ONNX Runtime's CPU provider and pre/post-processing; 0 = all cores
  cpu_spinning        str    ONNX Runtime's intra-op threads: "off" (false) sleep whenever they wait;
                             "run" spin during a run and sleep after it; "always" (true) keep spinning
                             (ONNX Runtime's default). Lower latency vs time stolen from the source,
                             sinks and other models (edge_runtime/backends/onnxruntime.py has figures)
  target_fps          float  frame rate the device class is expected to sustain for a 512x512 stream
                             (informational: shown by `edge-runtime devices`, not used to pace anything)
  tensorrt_version    str    TensorRT the device ships with ("10.3" on JetPack 6), quoted; null = none or
                             whatever is installed (a TensorRT engine is tied to this version);
                             informational: engines are keyed on the TensorRT actually installed
  compute_capability  str    CUDA compute capability ("8.7" for Orin), quoted; null = no GPU or any GPU
  match               list   case-insensitive substrings of /proc/device-tree/model that identify the
                             device; the longest matching pattern across all configs wins; [] = never
                             matched that way (CPU and discrete GPU classes are chosen by architecture
                             and GPU presence)

Detection (``detect``): a device-tree model matching a config's ``match`` picks that config;
otherwise a discrete NVIDIA GPU (nvidia-smi on PATH, /dev/nvidia0 or /proc/driver/nvidia/gpus)
picks x86-dgpu; otherwise the architecture picks cpu-x86 or cpu-arm64.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, expected

log = logging.getLogger(__name__)

ENV_CONFIG_DIR = "EDGE_RUNTIME_DEVICE_CONFIGS"
KINDS = ("jetson", "dgpu", "cpu")
BACKENDS = ("onnxruntime", "tensorrt", "auto")
PRECISIONS = ("fp32", "fp16", "int8")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_VERSION = re.compile(r"^\d+(\.\d+)*$")


SPINNING = ("off", "run", "always")  # ONNX Runtime intra-op spinning: see backends/onnxruntime.py
SPINNING_VALUES = 'true, false, "off", "run" or "always"'


def spinning_mode(value: object) -> str:
    """``off`` / ``run`` / ``always``; YAML's false and true (also unquoted off / on) mean off and always."""
    if isinstance(value, bool):
        return "always" if value else "off"
    if not isinstance(value, str) or value not in SPINNING:
        raise ConfigError(f"spinning: {expected(SPINNING_VALUES, value)}")
    return value


@dataclass(frozen=True)
class DeviceConfig:
    """One device class; see the module docstring for what each field means."""

    name: str
    description: str
    kind: str
    backend: str
    precisions: tuple[str, ...]
    dla_cores: int
    trt_workspace_mb: int | None
    trt_cuda_graphs: bool
    memory_budget_mb: int
    cpu_threads: int
    cpu_spinning: str  # off | run | always
    target_fps: float
    tensorrt_version: str | None
    compute_capability: str | None
    match: tuple[str, ...] = ()
    source: str = field(default="", compare=False)  # the file it came from (not a YAML field)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["precisions"] = list(self.precisions)
        out["match"] = list(self.match)
        return out


YAML_FIELDS = tuple(f.name for f in fields(DeviceConfig) if f.name != "source")


def config_dir() -> Path:
    """$EDGE_RUNTIME_DEVICE_CONFIGS, else the repository's device_configs/ next to the package."""
    override = os.environ.get(ENV_CONFIG_DIR)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1] / "device_configs"


# --- validation ----------------------------------------------------------------------------


class _Checker:
    """Field checks that name the file and the field in every message."""

    def __init__(self, origin: str, raw: dict[str, Any]) -> None:
        self.origin = origin
        self.raw = raw

    def fail(self, key: str, what: str, found: object) -> ConfigError:
        return ConfigError(f"{self.origin}: field {key!r}: {expected(what, found)}")

    def string(self, key: str, *, choices: tuple[str, ...] = (), pattern: re.Pattern[str] | None = None,
               nullable: bool = False, hint: str = "") -> str | None:
        value = self.raw[key]
        if value is None and nullable:
            return None
        what = f"one of {', '.join(choices)}" if choices else f"a string{hint}"
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, what + (" or null" if nullable else ""), value)
        if choices and value not in choices:
            raise self.fail(key, what, value)
        if pattern is not None and not pattern.match(value):
            raise self.fail(key, f"a string matching {pattern.pattern}{hint}", value)
        return value

    def boolean(self, key: str) -> bool:
        value = self.raw[key]
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def integer(self, key: str, *, minimum: int, nullable: bool = False) -> int | None:
        value = self.raw[key]
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, f"an integer >= {minimum}" + (" or null" if nullable else ""), value)
        return value

    def spinning(self, key: str) -> str:
        try:
            return spinning_mode(self.raw[key])
        except ConfigError:
            raise self.fail(key, SPINNING_VALUES, self.raw[key]) from None

    def number(self, key: str, *, above: float) -> float:
        value = self.raw[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > above:
            raise self.fail(key, f"a number > {above}", value)
        return float(value)

    def strings(self, key: str, *, choices: tuple[str, ...] = (), non_empty: bool = False) -> tuple[str, ...]:
        value = self.raw[key]
        what = f"a list of {', '.join(choices)}" if choices else "a list of non-empty strings"
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise self.fail(key, what, value)
        if non_empty and not value:
            raise self.fail(key, f"a non-empty {what[2:]}", value)
        if choices and (bad := [v for v in value if v not in choices]):
            raise self.fail(key, what, bad)
        if len(set(value)) != len(value):
            raise self.fail(key, "no duplicates", value)
        return tuple(value)


def validate(raw: object, origin: str, *, stem: str | None = None) -> DeviceConfig:
    """A parsed YAML mapping -> DeviceConfig, or ConfigError naming ``origin`` and the field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: {expected('a mapping of device config fields', type(raw).__name__)}")
    unknown = sorted(str(k) for k in raw if k not in YAML_FIELDS)
    if unknown:
        raise ConfigError(f"{origin}: unknown field(s) {', '.join(map(repr, unknown))}: "
                          f"{expected('only ' + ', '.join(YAML_FIELDS), unknown)}")
    missing = [k for k in YAML_FIELDS if k not in raw]
    if missing:
        raise ConfigError(f"{origin}: missing field(s) {', '.join(map(repr, missing))}: "
                          f"{expected('every field present (null where allowed)', sorted(map(str, raw)))}")
    c = _Checker(origin, raw)
    quote = " (quote it: \"10.3\", YAML reads 10.3 as a number)"
    cfg = DeviceConfig(
        name=str(c.string("name", pattern=_NAME)),
        description=str(c.string("description")),
        kind=str(c.string("kind", choices=KINDS)),
        backend=str(c.string("backend", choices=BACKENDS)),
        precisions=c.strings("precisions", choices=PRECISIONS, non_empty=True),
        dla_cores=int(c.integer("dla_cores", minimum=0) or 0),
        trt_workspace_mb=c.integer("trt_workspace_mb", minimum=1, nullable=True),
        trt_cuda_graphs=c.boolean("trt_cuda_graphs"),
        memory_budget_mb=int(c.integer("memory_budget_mb", minimum=1) or 0),
        cpu_threads=int(c.integer("cpu_threads", minimum=0) or 0),
        cpu_spinning=c.spinning("cpu_spinning"),
        target_fps=c.number("target_fps", above=0.0),
        tensorrt_version=c.string("tensorrt_version", pattern=_VERSION, nullable=True, hint=quote),
        compute_capability=c.string("compute_capability", pattern=_VERSION, nullable=True, hint=quote),
        match=c.strings("match"),
        source=origin,
    )
    # Cross-field rules: each one a mistake that would otherwise surface late, on the device.
    if stem is not None and cfg.name != stem:
        raise c.fail("name", f"the file name {stem!r}", cfg.name)
    if cfg.kind == "cpu":
        if cfg.backend != "onnxruntime":
            raise c.fail("backend", "onnxruntime for kind cpu", cfg.backend)
        if cfg.tensorrt_version is not None or cfg.trt_workspace_mb is not None:
            raise c.fail("tensorrt_version" if cfg.tensorrt_version else "trt_workspace_mb",
                         "null for kind cpu", cfg.tensorrt_version or cfg.trt_workspace_mb)
        if cfg.trt_cuda_graphs:
            raise c.fail("trt_cuda_graphs", "false for kind cpu", cfg.trt_cuda_graphs)
    if cfg.dla_cores and cfg.kind != "jetson":
        raise c.fail("dla_cores", "0 unless kind is jetson (DLA exists only on Jetson SoCs)", cfg.dla_cores)
    if cfg.dla_cores and cfg.backend == "onnxruntime":
        raise c.fail("backend", "tensorrt or auto when dla_cores > 0 (only TensorRT drives the DLA)", cfg.backend)
    if "int8" in cfg.precisions and cfg.compute_capability is not None:
        major, minor = (int(p) for p in (cfg.compute_capability.split(".") + ["0"])[:2])
        if (major, minor) < (6, 1) or (major, minor) == (6, 2):  # dp4a: 6.1 and 7.0+; not the TX2's 6.2
            raise c.fail("precisions", f"no int8 at compute capability {cfg.compute_capability} (int8 needs 6.1 "
                         "or >= 7.0)", list(cfg.precisions))
    return cfg


def _load_file(path: Path) -> DeviceConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(expected("a readable device config file", f"{path}: {exc.strerror}")) from None
    except UnicodeDecodeError:  # a DICOM or an image given as --device
        raise ConfigError(expected("a UTF-8 YAML device config", "a binary file (not named: it may be a patient's)")) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path}: {expected('valid YAML', f'{problem}{where}')}") from None
    return validate(raw, str(path), stem=path.stem)


def list_configs() -> list[DeviceConfig]:
    """Every config in config_dir(), sorted by name; a broken file is an error, not skipped."""
    directory = config_dir()
    if not directory.is_dir():
        raise ConfigError(expected(f"a device config folder (set {ENV_CONFIG_DIR} to override)", str(directory)))
    configs = [_load_file(p) for p in sorted(directory.glob("*.yaml"))]
    if not configs:
        raise ConfigError(expected(f"*.yaml device configs in {directory}", "none"))
    return configs


def load_config(name_or_path: str | Path) -> DeviceConfig:
    """A config by name ("jetson-orin-nano-8gb") from config_dir(), or by path to a YAML file."""
    text = str(name_or_path)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(expected("an existing device config file", text))
        return _load_file(path)
    candidate = config_dir() / f"{text}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in config_dir().glob("*.yaml")) if config_dir().is_dir() else []
        raise ConfigError(expected(f"a device config name ({', '.join(known) or 'none found'})", text))
    return _load_file(candidate)


# --- detection -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Detected:
    """The chosen config and the facts that chose it."""

    config: str
    reason: str
    machine: str
    device_tree_model: str | None
    cpu_model: str | None
    cpu_cores: int | None
    gpu: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


def probe_gpu(root: Path) -> str | None:
    """A discrete NVIDIA GPU's name (or how it was seen), else None.

    nvidia-smi is only asked when ``root`` is the real "/" (a faked root must not see the host).
    """
    if root == Path("/") and (smi := shutil.which("nvidia-smi")):
        try:
            out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10, check=False)
            names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
            if out.returncode == 0 and names:
                return names[0]
        except (OSError, subprocess.SubprocessError):
            pass
    gpus = root / "proc" / "driver" / "nvidia" / "gpus"
    if gpus.is_dir() and any(gpus.iterdir()):
        for info in sorted(gpus.glob("*/information")):
            for line in (_read_text(info) or "").splitlines():
                if line.startswith("Model:"):
                    return line.split(":", 1)[1].strip()
        return "NVIDIA GPU (/proc/driver/nvidia)"
    if (root / "dev" / "nvidia0").exists():
        return "NVIDIA GPU (/dev/nvidia0)"
    return None


def _cpuinfo(root: Path) -> tuple[str | None, int | None]:
    text = _read_text(root / "proc" / "cpuinfo")
    if text is None:
        return None, None
    found: dict[str, str] = {}
    cores = 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "processor" and value.isdigit():
            cores += 1
        elif value and not value.isdigit():  # x86 "model : 167" is a number, Arm "Model : Raspberry Pi 5"
            found.setdefault(key, value)
    model = found.get("model name") or found.get("hardware") or found.get("model")
    return model, cores or None


# x86 instructions that add u8 x s8 products straight into 32-bit sums (VNNI). Without them ONNX
# Runtime's x86 int8 kernels (AVX2, AVX-512 without VNNI) first add pairs of products in saturating
# 16-bit lanes (vpmaddubsw): with 8-bit weights 2 x 255 x 127 overflows and the convolution is wrong
# (measured on an AMD EPYC without VNNI: us-despeckle's symmetric INT8 lost 8 dB, its CPU form 0.9 dB);
# weights within +-64 (7 bits) cannot overflow (2 x 255 x 64 = 32640). Arm's int8 kernels widen first.
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni")
X86 = ("x86_64", "amd64", "i386", "i686")


@dataclass(frozen=True)
class CpuInt8:
    """What this CPU's int8 kernels can be trusted with (see INT8_DOT_FLAGS)."""

    model: str | None
    machine: str
    dot_flags: tuple[str, ...]  # the INT8_DOT_FLAGS present
    exact: bool  # False: 8-bit weights can saturate ONNX Runtime's int8 sums here
    flags_read: bool = True  # False: no CPU flags to read (x86 is then treated as without VNNI)

    def describe(self) -> str:
        if self.machine.lower() not in X86:
            return f"{self.machine}: int8 sums widen before adding (exact)"
        if self.exact:
            return f"x86 with {'/'.join(self.dot_flags)}: int8 sums in 32 bits (exact)"
        if not self.flags_read:
            return "x86, CPU flags unreadable: treated as without VNNI (exact only for int8 weights within +-64)"
        return "x86 without VNNI: u8 x s8 pairs summed in saturating 16 bits (exact only for weights within +-64)"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "machine": self.machine, "int8_dot_flags": list(self.dot_flags),
                "int8_exact_with_8bit_weights": self.exact, "int8_kernels": self.describe()}


def _cpuinfo_words(root: Path, keys: tuple[str, ...]) -> list[str] | None:
    """The words of the first /proc/cpuinfo line whose key is one of ``keys``, or None if there is none."""
    for line in (_read_text(root / "proc" / "cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in keys:
            return value.split()
    return None


def cpu_flags(root: Path = Path("/")) -> set[str] | None:
    """The first CPU's feature flags from /proc/cpuinfo (x86 "flags"), or None where there are none to read."""
    words = _cpuinfo_words(root, ("flags",))
    return None if words is None else set(words)


def cpu_family(root: Path = Path("/")) -> str | None:
    """The x86 "cpu family" number of /proc/cpuinfo (AMD Zen 3 and Zen 4: 25, Zen 5: 26), or None."""
    words = _cpuinfo_words(root, ("cpu family",))
    return words[0] if words else None


def cpu_name(root: Path = Path("/"), model: str | None = None) -> str | None:
    """The CPU model name (``model``, else /proc/cpuinfo's), with its x86 family when it is an AMD name
    without a number: VMs report "AMD EPYC" for Zen 3, Zen 4 and Zen 5 alike (families 25, 25, 26), and
    figures from each must stay apart. Intel's family (6 for nearly every core) would tell nothing."""
    model = model or _cpuinfo(root)[0]
    if model is None or re.search(r"\d", model) or not model.lower().startswith("amd"):
        return model
    family = cpu_family(root)
    return f"{model} family {family}" if family else model


def cpu_identity(root: Path = Path("/"), *, machine: str | None = None) -> str:
    """What a CPU-tuned artefact depends on: architecture, CPU model and its feature flags (x86 "flags",
    Arm "Features"). ONNX Runtime's fully optimised graphs are laid out for the vector width they were
    made on (NCHWc blocks of 8 floats with AVX2, 16 with AVX-512), so a cache of them keys on this."""
    model, _ = _cpuinfo(root)
    features = " ".join(sorted(_cpuinfo_words(root, ("flags", "features")) or []))
    return f"{machine or platform.machine()}|{model}|{features}"


def cpu_int8(root: Path = Path("/"), *, machine: str | None = None) -> CpuInt8:
    """This CPU's int8 arithmetic class, from /proc/cpuinfo's flags (``root`` faked in tests)."""
    machine = machine or platform.machine()
    model, _ = _cpuinfo(root)
    flags = cpu_flags(root)
    dots = tuple(f for f in INT8_DOT_FLAGS if f in (flags or ()))
    return CpuInt8(model, machine, dots, machine.lower() not in X86 or bool(dots), flags is not None)


# Jetson modules (/proc/device-tree/compatible part numbers, as jetson-stats reads them) whose dev kit
# reports the same model string as a module we ship a config for, but with other memory or DLA cores.
MODULES_WITHOUT_CONFIG = {
    "p3767-0001": "Jetson Orin NX 8GB (1 NVDLA, 8 GB)",
    "p3767-0004": "Jetson Orin Nano 4GB (4 GB)",
    "p3701-0000": "Jetson AGX Orin 32GB (32 GB)",
    "p3701-0004": "Jetson AGX Orin 32GB (32 GB)",
}


def _module_without_config(root: Path) -> str | None:
    raw = _read_text(root / "proc" / "device-tree" / "compatible")  # NUL-separated strings
    parts = " ".join((raw or "").split("\x00"))
    return next((name for part, name in MODULES_WITHOUT_CONFIG.items() if part in parts), None)


def detect(root: Path = Path("/"), *, machine: str | None = None,
           gpu_probe: Callable[[Path], str | None] = probe_gpu,
           configs: list[DeviceConfig] | None = None) -> Detected:
    """Pick the config for the device under ``root`` (faked /proc in tests).

    ``machine`` (platform.machine() by default) and ``gpu_probe`` are injectable for tests.
    """
    root = Path(root)
    arch = (machine or platform.machine() or "unknown").lower()
    configs = list_configs() if configs is None else configs
    names = {c.name for c in configs}
    dt_raw = _read_text(root / "proc" / "device-tree" / "model")
    dt_model = dt_raw.replace("\x00", "").strip() if dt_raw else None
    cpu_model, cores = _cpuinfo(root)
    gpu = gpu_probe(root)
    facts: dict[str, Any] = {"machine": arch, "device_tree_model": dt_model, "cpu_model": cpu_model,
                             "cpu_cores": cores, "gpu": gpu}

    if dt_model:
        hits = [(len(p), c.name, p) for c in configs for p in c.match if p.lower() in dt_model.lower()]
        if hits:
            _, name, pattern = max(hits)
            reason = f"device-tree model {dt_model!r} matches {pattern!r}"
            variant = _module_without_config(root)
            if variant is not None:  # the dev-kit string is shared with the module the config describes
                reason += (f"; but the module is {variant} ({name}'s settings may not fit it: memory, DLA "
                           "cores; pass --device with a config of its own)")
                log.warning("device: %s", reason)
            return Detected(name, reason, **facts)

    def fallback(name: str, why: str) -> Detected:
        if name not in names:
            raise ConfigError(expected(f"a {name!r} config in {config_dir()} for {why}", sorted(names)))
        return Detected(name, why, **facts)

    jetson_note = f"device-tree model {dt_model!r} matches no config; " if dt_model and "jetson" in dt_model.lower() else ""
    if gpu and not jetson_note:
        return fallback("x86-dgpu", f"discrete NVIDIA GPU found ({gpu}) on {arch}")
    if arch in ("aarch64", "arm64", "armv8l"):
        return fallback("cpu-arm64", f"{jetson_note}no matching Jetson and no discrete GPU on {arch}: CPU only")
    if arch not in ("x86_64", "amd64", "i686", "i386"):
        return fallback("cpu-x86", f"unknown architecture {arch}: generic CPU settings")
    return fallback("cpu-x86", f"no Jetson device tree and no NVIDIA GPU on {arch}: CPU only")


# --- CLI: edge-runtime devices -------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print configs and detection as JSON")
    parser.add_argument("--config", metavar="NAME_OR_PATH", help="show one config (name or YAML path) in full")


def _table(configs: list[DeviceConfig]) -> str:
    head = ("name", "kind", "backend", "precisions", "DLA", "threads", "fps")
    rows = [head] + [
        (c.name, c.kind, c.backend, ",".join(c.precisions), str(c.dla_cores),
         "all" if c.cpu_threads == 0 else str(c.cpu_threads), f"{c.target_fps:g}")
        for c in configs
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "config", None):
        cfg = load_config(args.config)
        if args.json:
            print(json.dumps(cfg.to_dict(), indent=2))
        else:
            for key, value in cfg.to_dict().items():
                print(f"{key:<20} {value}")
        return 0
    configs = list_configs()
    found = detect(configs=configs)
    if args.json:
        print(json.dumps({"configs": [c.to_dict() for c in configs], "detected": found.to_dict(),
                          "cpu_int8": cpu_int8().to_dict()}, indent=2))
        return 0
    print(_table(configs))
    print()
    print(f"detected: {found.config}  ({found.reason})")
    cpu = f"{found.cpu_model or 'unknown CPU'}, {found.cpu_cores or '?'} cores, {found.machine}"
    print(f"  cpu: {cpu}; gpu: {found.gpu or 'none'}")
    print(f"  int8 kernels: {cpu_int8().describe()}")
    return 0
