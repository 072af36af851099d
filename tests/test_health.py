"""Device health: load / thermal zones everywhere, jetson-stats (jtop) readings on a Jetson.

jetson-stats needs a Jetson with its jtop service; here the client is a fake that returns a
``stats`` dict shaped like jetson-stats 4.x-7.x's (same keys and units), so what is tested is our
mapping and the switch-off behaviour, not jtop itself.
"""

from __future__ import annotations

import datetime
import logging
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from edge_runtime.telemetry import JetsonStats, Stats, device_health, jtop_health

ORIN_STATS: dict[str, Any] = {
    "time": datetime.datetime(2026, 11, 22), "uptime": datetime.timedelta(hours=3),
    "CPU1": 12, "CPU2": "OFF", "RAM": 0.415, "SWAP": 0.0, "EMC": 7, "GPU": 63.2, "APE": "OFF",
    "Fan pwmfan0": 30.0, "Temp cpu": 48.3, "Temp gpu": 51.06, "Temp tj": 50.0, "Temp cv0": -256,
    "Power VDD_IN": 5123, "Power TOT": 7012, "jetson_clocks": "ON", "nvp model": "MAXN",
}


class FakeJtop:
    instances: ClassVar[list[FakeJtop]] = []

    def __init__(self, interval: float = 0.5, *, stats: dict[str, Any] | None = None, fail_start: bool = False,
                 fail_read: bool = False) -> None:
        self.interval, self._stats, self.fail_start, self.fail_read = interval, stats, fail_start, fail_read
        self.started = self.closed = False
        FakeJtop.instances.append(self)

    def start(self) -> None:
        if self.fail_start:
            raise ConnectionRefusedError("jtop.service is not active")
        self.started = True

    def close(self) -> None:
        self.closed = True

    @property
    def stats(self) -> dict[str, Any]:
        if self.fail_read:
            raise BrokenPipeError("jtop service went away")
        return dict(self._stats or ORIN_STATS)


@pytest.fixture
def socket(tmp_path: Path) -> Path:
    path = tmp_path / "jtop.sock"
    path.touch()
    FakeJtop.instances.clear()
    return path


def test_jtop_stats_map_to_numeric_health() -> None:
    assert jtop_health(ORIN_STATS) == {"gpu_load_pct": 63.2, "emc_pct": 7.0, "ram_used_pct": 41.5,
                                       "power_w": 7.01, "temp_c_max": 51.1}
    assert jtop_health({"CPU1": 3, "GPU": "OFF", "Temp cv0": -256}) == {}


def test_one_client_is_opened_off_the_caller_thread_and_kept(socket: Path) -> None:
    """The first read starts the connection and returns at once (the hub reads under its lock)."""
    reader = JetsonStats(factory=lambda interval: FakeJtop(interval), socket=socket)
    assert reader.read() == {}  # connecting
    assert reader.wait_connected(5.0)
    first, second = reader.read(), reader.read()
    assert first == second and first["gpu_load_pct"] == 63.2
    assert len(FakeJtop.instances) == 1 and FakeJtop.instances[0].started and FakeJtop.instances[0].interval == 1.0
    reader.close()
    assert FakeJtop.instances[0].closed


def test_health_merges_jtop_over_thermal_zones(socket: Path) -> None:
    reader = JetsonStats(factory=lambda interval: FakeJtop(interval), socket=socket)
    device_health(reader)
    assert reader.wait_connected(5.0)
    health = device_health(reader)
    assert health["power_w"] == 7.01 and health["temp_c_max"] == 51.1 and "load1" in health
    reader.close()


def test_thermal_zones_skip_the_placeholder_and_offline_sensors(tmp_path: Path) -> None:
    """L4T 32's PMIC-Die zone always reads 100 C and an offline zone -256 C: neither is the hottest."""
    for i, (kind, milli) in enumerate((("CPU-therm", "45500"), ("PMIC-Die", "100000"), ("GPU-therm", "-256000"),
                                       ("AO-therm", "garbage"))):
        zone = tmp_path / f"thermal_zone{i}"
        zone.mkdir()
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(milli + "\n")
    off = JetsonStats(factory=lambda interval: FakeJtop(interval), socket=tmp_path / "absent.sock")
    assert device_health(off, thermal=tmp_path)["temp_c_max"] == 45.5
    assert "temp_c_max" not in device_health(off, thermal=tmp_path / "none")


def test_no_service_socket_means_no_client(tmp_path: Path) -> None:
    reader = JetsonStats(factory=lambda interval: FakeJtop(interval), socket=tmp_path / "absent.sock")
    FakeJtop.instances.clear()
    assert reader.read() == {} and not FakeJtop.instances and not reader.off


@pytest.mark.parametrize("failure", ["fail_start", "fail_read"])
def test_a_failing_client_switches_the_reader_off_once(socket: Path, failure: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    reader = JetsonStats(factory=lambda interval: FakeJtop(interval, **{failure: True}), socket=socket)
    with caplog.at_level(logging.WARNING, logger="edge_runtime.telemetry"):
        assert reader.read() == {}
        reader.wait_connected(5.0)
        assert reader.read() == {} and reader.read() == {}
    assert reader.off and len(FakeJtop.instances) == 1 and not reader.available()
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "jetson-stats readings switched off" in caplog.records[0].getMessage()
    if failure == "fail_read":
        assert FakeJtop.instances[0].closed


def test_missing_package_switches_off(socket: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jtop", None)  # import jtop -> ImportError
    reader = JetsonStats(socket=socket)
    assert reader.read() == {} and not reader.wait_connected(5.0) and reader.off


def test_stats_snapshot_carries_health() -> None:
    health = Stats().snapshot()["health"]
    assert isinstance(health, dict) and all(isinstance(v, float) for v in health.values())
