"""`nkat-supervise gpu`: text and JSON, with a scripted profile, a fake NVML and no driver."""

from __future__ import annotations

import io
import json

import pynvml as real
import pytest

from nkat.supervisor.gpu.show import EXIT_BAD_PROFILE, EXIT_NO_GPU, EXIT_OK, gpu_command
from nkat.supervisor.testing.fake_nvml import FakeGpu, FakePynvml

READING_KEYS = {
    "temperature", "thermal_margin", "power_w", "utilization_pct", "memory_used",
    "memory_total", "memory_reserved", "clock_event_reasons", "clock_event_reason_names",
    "ecc_uncorrected_volatile", "pids", "lost", "unsupported", "errors",
}  # fmt: skip
THRESHOLD_KEYS = {"shutdown", "slowdown", "gpu_max", "mem_max", "enforced_power_limit_w"}


def run(**kwargs) -> tuple[int, str]:
    out = io.StringIO()
    status = gpu_command(out=out, **kwargs)
    return status, out.getvalue()


def test_scripted_profile_as_text() -> None:
    status, text = run(sim_gpu="heat_wave", sim_at=8.0)
    assert status == EXIT_OK
    assert "simulated GPU from profile heat_wave (shipped) at t=8 s" in text
    assert "temperature  84 C (margin 6 C)" in text
    assert "shutdown 96 C, slowdown 93 C, gpu_max 90 C, mem_max n/a, power limit 450 W" in text
    assert "clock events sw_thermal_slowdown" in text
    assert "12.0 of 24.0 GiB (50 %)" in text


def test_scripted_profile_as_json() -> None:
    status, text = run(json_output=True, sim_gpu="memory_squeeze", sim_at=10.0)
    assert status == EXIT_OK
    report = json.loads(text)
    assert set(report) == {"source", "message", "devices", "notes", "platform"}
    assert report["source"] == "scripted"
    [device] = report["devices"]
    assert set(device) == {"index", "uuid", "name", "thresholds", "reading"}
    assert set(device["thresholds"]) == THRESHOLD_KEYS
    assert set(device["reading"]) == READING_KEYS
    reading = device["reading"]
    assert reading["memory_used"] / reading["memory_total"] == pytest.approx(0.97)
    assert reading["pids"] == [] and reading["lost"] is False
    assert reading["clock_event_reason_names"] == [] and reading["unsupported"] == []


def test_lost_gpu_is_shown_as_lost() -> None:
    status, text = run(sim_gpu="xid79", sim_at=5.0)
    assert status == EXIT_OK and "LOST" in text
    status, text = run(json_output=True, sim_gpu="xid79", sim_at=5.0)
    assert json.loads(text)["devices"][0]["reading"]["lost"] is True


def test_fake_nvml_as_json_and_text() -> None:
    fake = FakePynvml([FakeGpu(), FakeGpu(uuid="GPU-fake-1", margin=None, reasons=0x24)])
    status, text = run(json_output=True, nvml=fake)
    assert status == EXIT_OK
    report = json.loads(text)
    assert report["source"] == "nvml" and report["message"] == "2 GPUs through NVML"
    first, second = report["devices"]
    assert first["thresholds"]["slowdown"] == 92.0  # from the T.Limit offsets
    assert second["thresholds"]["slowdown"] == 93.0  # legacy call: no margin on this GPU
    assert second["reading"]["unsupported"] == ["thermal_margin"]
    assert second["reading"]["clock_event_reason_names"] == ["sw_power_cap", "sw_thermal_slowdown"]
    assert report["notes"] == [
        "GPU 1: thermal_margin not reported (nvmlDeviceGetMarginTemperature: Not Supported)"
    ]
    assert fake.calls["nvmlEventSetCreate"] == 0  # one reading needs no event thread
    assert not fake.initialized  # closed
    status, text = run(nvml=FakePynvml())
    assert status == EXIT_OK and "GPU 0  NVIDIA Fake GPU  GPU-fake-0" in text
    assert "processes    4242" in text


def test_transient_error_is_shown() -> None:
    fake = FakePynvml()
    fake.fail("nvmlDeviceGetPowerUsage", real.NVML_ERROR_UNKNOWN)
    status, text = run(nvml=fake)
    assert "power        error" in text
    assert "error        power_w: nvmlDeviceGetPowerUsage: Unknown Error" in text


@pytest.mark.parametrize(
    "code, words",
    [
        (real.NVML_ERROR_DRIVER_NOT_LOADED, "the NVIDIA driver is not loaded"),
        (real.NVML_ERROR_LIBRARY_NOT_FOUND, "no NVIDIA driver is installed"),
    ],
)
def test_no_driver_exits_1_with_a_clear_message(
    capsys: pytest.CaptureFixture[str], code: int, words: str
) -> None:
    fake = FakePynvml()
    fake.init_error = code
    status, text = run(nvml=fake)
    assert (status, text) == (EXIT_NO_GPU, "")
    err = capsys.readouterr().err
    assert words in err and "GPU checks are off" in err and "--sim-gpu" in err

    status, text = run(json_output=True, nvml=fake)
    report = json.loads(text)
    assert status == EXIT_NO_GPU
    assert report["source"] == "none" and report["devices"] == []
    assert words in report["message"]


def test_no_gpu_at_all_exits_1() -> None:
    status, text = run(json_output=True, nvml=FakePynvml(gpus=[]))
    assert status == EXIT_NO_GPU and "no NVIDIA GPU found" in json.loads(text)["message"]


def test_bad_profile_exits_2(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[[device]]\n[device.trace]\ntemperature = [[0, 'hot']]\n")
    status, _ = run(sim_gpu=str(path))
    assert status == EXIT_BAD_PROFILE
    assert f"{path}: device[0].trace.temperature[0]" in capsys.readouterr().err
    status, text = run(json_output=True, sim_gpu="no_such_profile")
    assert status == EXIT_BAD_PROFILE
    assert json.loads(text)["message"].startswith("bad GPU profile: no_such_profile: profile:")
