"""Device configs: shipped YAMLs validate, bad ones fail clearly, detection on faked /proc trees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from edge_runtime import cli
from edge_runtime.devices import (
    YAML_FIELDS,
    CpuInt8,
    DeviceConfig,
    config_dir,
    cpu_int8,
    detect,
    list_configs,
    load_config,
)
from edge_runtime.errors import ConfigError

SHIPPED = {
    "jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb", "jetson-xavier-nx",
    "jetson-nano", "x86-dgpu", "cpu-x86", "cpu-arm64",
}
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "device_configs"


def NO_GPU(root: Path) -> None:
    return None


def test_every_shipped_config_validates_with_published_specs() -> None:
    configs = {c.name: c for c in list_configs()}
    assert set(configs) == SHIPPED
    nano, orin_nano = configs["jetson-nano"], configs["jetson-orin-nano-8gb"]
    assert nano.precisions == ("fp32", "fp16") and nano.tensorrt_version == "8.2"
    assert nano.compute_capability == "5.3" and nano.dla_cores == 0
    assert (orin_nano.compute_capability, orin_nano.dla_cores, orin_nano.tensorrt_version) == ("8.7", 0, "10.3")
    assert configs["jetson-orin-nx-16gb"].dla_cores == 2 and configs["jetson-agx-orin-64gb"].dla_cores == 2
    xavier = configs["jetson-xavier-nx"]
    assert (xavier.compute_capability, xavier.dla_cores, xavier.tensorrt_version) == ("7.2", 2, "8.5")
    for cfg in configs.values():
        assert isinstance(cfg, DeviceConfig) and cfg.target_fps > 0 and cfg.memory_budget_mb > 0
        if cfg.kind == "cpu":
            assert cfg.backend == "onnxruntime" and cfg.tensorrt_version is None
    assert load_config("cpu-x86") == configs["cpu-x86"]
    assert load_config(config_dir() / "cpu-x86.yaml") == configs["cpu-x86"]


def write_config(folder: Path, name: str = "edge-box", **changes: object) -> Path:
    raw = load_config(SHIPPED_DIR / "jetson-orin-nano-8gb.yaml").to_dict()
    del raw["source"]
    raw["name"] = name
    for key, value in changes.items():
        if value is ...:
            del raw[key]
        else:
            raw[key] = value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("changes", "field", "found"),
    [
        ({"precisoins": ["fp32"]}, "precisoins", "unknown"),  # a typo is rejected, not ignored
        ({"backend": "tensorflow"}, "backend", "tensorflow"),
        ({"precisions": ["fp32", "bf16"]}, "precisions", "bf16"),
        ({"precisions": []}, "precisions", "[]"),
        ({"dla_cores": "two"}, "dla_cores", "two"),
        ({"dla_cores": True}, "dla_cores", "True"),
        ({"memory_budget_mb": 0}, "memory_budget_mb", "0"),
        ({"target_fps": -1}, "target_fps", "-1"),
        ({"tensorrt_version": 10.3}, "tensorrt_version", "quote it"),  # YAML's float trap
        ({"kind": "cpu", "backend": "tensorrt"}, "backend", "tensorrt"),
        ({"trt_cuda_graphs": "yes"}, "trt_cuda_graphs", "yes"),
        ({"kind": "cpu", "backend": "onnxruntime", "dla_cores": 0, "tensorrt_version": None, "trt_workspace_mb": None,
          "compute_capability": None, "trt_cuda_graphs": True}, "trt_cuda_graphs", "false for kind cpu"),
        ({"compute_capability": "5.3"}, "precisions", "int8"),  # no INT8 below 6.1
        ({"match": "Orin"}, "match", "Orin"),
        ({"cpu_threads": ...}, "cpu_threads", "missing"),
        ({"cpu_spinning": "yes"}, "cpu_spinning", "yes"),  # a bool or off/run/always, not a truthy string
    ],
)
def test_bad_config_names_the_file_and_field(tmp_path: Path, changes: dict, field: str, found: str) -> None:
    path = write_config(tmp_path, **changes)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and repr(field) in message and found in message


def test_name_must_match_file_and_yaml_must_parse(tmp_path: Path) -> None:
    path = write_config(tmp_path, "edge-box")
    path.rename(tmp_path / "other.yaml")
    with pytest.raises(ConfigError, match="'name'.*other"):
        load_config(tmp_path / "other.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\nkind: [cpu\n")
    with pytest.raises(ConfigError, match="broken.yaml.*line"):
        load_config(broken)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="cpu-x86"):  # an unknown name lists the known ones
        load_config("jetson-tx2")


def test_config_dir_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(tmp_path, "edge-box")
    monkeypatch.setenv("EDGE_RUNTIME_DEVICE_CONFIGS", str(tmp_path))
    assert config_dir() == tmp_path and [c.name for c in list_configs()] == ["edge-box"]
    write_config(tmp_path, "bad-box", kind="fpga")
    with pytest.raises(ConfigError, match="bad-box.yaml.*'kind'"):
        list_configs()  # a broken file is reported, never skipped


# --- detection -----------------------------------------------------------------------------


def fake_root(tmp_path: Path, *, model: str | None = None, cpuinfo: str = "", nvidia: bool = False) -> Path:
    proc = tmp_path / "proc"
    (proc / "device-tree").mkdir(parents=True)
    if model is not None:
        (proc / "device-tree" / "model").write_bytes(model.encode() + b"\x00")  # NUL-terminated as on a Jetson
    (proc / "cpuinfo").write_text(cpuinfo)
    if nvidia:
        (tmp_path / "dev").mkdir()
        (tmp_path / "dev" / "nvidia0").touch()
    return tmp_path


ARM_CPUINFO = "".join(f"processor\t: {i}\nBogoMIPS\t: 62.50\nCPU part\t: 0xd42\n\n" for i in range(6))
X86_CPUINFO = "".join(
    f"processor\t: {i}\nvendor_id\t: GenuineIntel\nmodel\t\t: 142\nmodel name\t: Intel(R) Core(TM) i5-8250U\n\n"
    for i in range(4)
)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("NVIDIA Jetson Orin Nano Developer Kit", "jetson-orin-nano-8gb"),
        ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "jetson-orin-nx-16gb"),
        ("Jetson AGX Orin", "jetson-agx-orin-64gb"),
        ("NVIDIA Jetson Xavier NX Developer Kit", "jetson-xavier-nx"),
        ("NVIDIA Jetson Nano Developer Kit", "jetson-nano"),
    ],
)
def test_jetson_detected_from_device_tree(tmp_path: Path, model: str, expected: str) -> None:
    found = detect(fake_root(tmp_path, model=model, cpuinfo=ARM_CPUINFO), machine="aarch64", gpu_probe=NO_GPU)
    assert found.config == expected
    assert found.device_tree_model == model and model in found.reason
    assert found.cpu_cores == 6


@pytest.mark.parametrize(("compatible", "variant"), [
    (b"nvidia,p3768-0000+p3767-0001\x00nvidia,p3767-0001\x00nvidia,tegra234\x00", "Orin NX 8GB"),
    (b"nvidia,p3768-0000+p3767-0000\x00nvidia,p3767-0000\x00nvidia,tegra234\x00", None),
])
def test_a_module_variant_without_a_config_of_its_own_is_named(tmp_path: Path, compatible: bytes,
                                                               variant: str | None) -> None:
    """The Orin NX 8 GB dev kit reports the 16 GB module's model string: the device tree's compatible
    part number (p3767-0001) tells them apart, and detection says the 16 GB settings may not fit."""
    root = fake_root(tmp_path, model="NVIDIA Jetson Orin NX Engineering Reference Developer Kit", cpuinfo=ARM_CPUINFO)
    (root / "proc" / "device-tree" / "compatible").write_bytes(compatible)
    found = detect(root, machine="aarch64", gpu_probe=NO_GPU)
    assert found.config == "jetson-orin-nx-16gb"
    assert (variant in found.reason and "--device" in found.reason) if variant else "but the module" not in found.reason


def test_cpu_only_machines_by_architecture(tmp_path: Path) -> None:
    root = fake_root(tmp_path, cpuinfo=X86_CPUINFO)
    x86 = detect(root, machine="x86_64", gpu_probe=NO_GPU)
    assert x86.config == "cpu-x86" and x86.cpu_model == "Intel(R) Core(TM) i5-8250U" and x86.cpu_cores == 4
    assert "no NVIDIA GPU" in x86.reason and x86.gpu is None
    arm = detect(root, machine="aarch64", gpu_probe=NO_GPU)
    assert arm.config == "cpu-arm64"
    # an unknown Jetson falls back to the CPU config and says so
    old = detect(fake_root(tmp_path / "tx2", model="NVIDIA Jetson TX2"), machine="aarch64", gpu_probe=NO_GPU)
    assert old.config == "cpu-arm64" and "matches no config" in old.reason


def test_discrete_gpu_detected(tmp_path: Path) -> None:
    root = fake_root(tmp_path, cpuinfo=X86_CPUINFO, nvidia=True)
    found = detect(root, machine="x86_64")  # the default probe sees root/dev/nvidia0 (nvidia-smi only on "/")
    assert found.config == "x86-dgpu" and "nvidia0" in (found.gpu or "")
    assert detect(fake_root(tmp_path / "b"), machine="x86_64", gpu_probe=lambda r: "NVIDIA H100").config == "x86-dgpu"


def test_cli_lists_configs_and_detection(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["devices", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {c["name"] for c in data["configs"]} == SHIPPED
    assert data["detected"]["config"] in SHIPPED and data["detected"]["reason"]
    assert set(data["configs"][0]) >= set(YAML_FIELDS)
    assert data["cpu_int8"]["int8_kernels"] == cpu_int8().describe()
    assert cli.main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "jetson-orin-nano-8gb" in out and "detected:" in out and "precisions" in out
    assert f"int8 kernels: {cpu_int8().describe()}" in out
    assert cli.main(["devices", "--config", "no-such-device"]) == 1
    assert "ConfigError" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "mode"), [("false", "off"), ("off", "off"), ("true", "always"), ("on", "always"),
                                            ("run", "run"), ('"always"', "always"), ('"off"', "off")])
def test_cpu_spinning_as_written_in_yaml(tmp_path: Path, text: str, mode: str) -> None:
    """Unquoted off / on are YAML booleans; run needs no quotes; the value reaches the config as a mode."""
    path = write_config(tmp_path)
    raw = path.read_text()
    assert "cpu_spinning: " in raw
    path.write_text("\n".join(f"cpu_spinning: {text}" if line.startswith("cpu_spinning:") else line
                              for line in raw.splitlines()) + "\n")
    assert load_config(path).cpu_spinning == mode


def test_cpu_int8_class_follows_the_vnni_flags(tmp_path: Path) -> None:
    """x86 without VNNI (an i5-8250U, AMD Zen 3): 8-bit int8 weights are not exact; with avx512_vnni or
    avx_vnni they are; Arm widens before adding."""
    def cpu(flags: str, machine: str = "x86_64", info: str = X86_CPUINFO) -> CpuInt8:
        root = fake_root(tmp_path / f"{machine}-{flags or 'none'}", cpuinfo=info.replace("\n\n", f"\nflags\t\t: {flags}\n\n"))
        return cpu_int8(root, machine=machine)

    plain = cpu("fpu sse2 avx2 fma")
    assert plain.exact is False and plain.dot_flags == () and plain.model == "Intel(R) Core(TM) i5-8250U"
    assert "saturating" in plain.describe()
    assert cpu("avx2 avx512f avx512_vnni").exact is True
    assert cpu("avx2 avx_vnni").dot_flags == ("avx_vnni",)
    assert cpu("fp asimd", machine="aarch64", info=ARM_CPUINFO).exact is True
    unread = cpu_int8(fake_root(tmp_path / "noflags", cpuinfo=X86_CPUINFO), machine="x86_64")
    assert unread.exact is False and unread.flags_read is False and "unreadable" in unread.describe()


def test_cpu_family_is_read_from_cpuinfo(tmp_path: Path) -> None:
    """The x86 "cpu family" number (what tells Zen 3/4 (25) from Zen 5 (26) when a VM calls each "AMD EPYC")."""
    from edge_runtime.devices import cpu_family

    info = X86_CPUINFO.replace("model\t\t: 142", "cpu family\t: 25\nmodel\t\t: 17")
    assert cpu_family(fake_root(tmp_path / "x86", cpuinfo=info)) == "25"
    assert cpu_family(fake_root(tmp_path / "arm", cpuinfo=ARM_CPUINFO)) is None


@pytest.mark.slow
def test_a_non_editable_install_carries_the_device_configs(tmp_path: Path) -> None:
    """`pip install .` (the Jetson instructions) installed no configs: every command failed with
    "expected a device config folder". Built as a wheel, installed without dependencies into a folder
    that comes first on the path, run from elsewhere."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(tmp_path / "wheel"), str(root)], check=True)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "EDGE_RUNTIME_DEVICE_CONFIGS"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    code = "import edge_runtime, edge_runtime.devices as d; print(edge_runtime.__file__); print(d.load_config('cpu-x86').name)"
    out = subprocess.run([sys.executable, "-c", code],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(tmp_path / "site" / "edge_runtime" / "__init__.py"), "cpu-x86"]
