"""NvmlSensor against the fake pynvml, which raises the real pynvml exception classes."""

from __future__ import annotations

import sys
import time

import pynvml as real
import pytest

from nkat.supervisor.gpu import xid_events
from nkat.supervisor.gpu.nvml import NvmlSensor
from nkat.supervisor.gpu.sensor import FIELDS, GpuUnavailable, XidEvent
from nkat.supervisor.testing.fake_nvml import GIB, MIB, FakeGpu, FakePynvml


def open_sensor(fake: FakePynvml, **kwargs) -> NvmlSensor:
    kwargs.setdefault("xid_events", False)
    sensor = NvmlSensor(nvml=fake, **kwargs)
    sensor.open()
    return sensor


@pytest.fixture
def fake() -> FakePynvml:
    return FakePynvml()


# -- opening --------------------------------------------------------------------------


def test_open_lists_devices_and_reads_every_field(fake: FakePynvml) -> None:
    fake.gpus.append(FakeGpu(name="NVIDIA Other", uuid="GPU-fake-1", temperature=70))
    sensor = open_sensor(fake)
    assert [(d.index, d.uuid, d.name) for d in sensor.devices()] == [
        (0, "GPU-fake-0", "NVIDIA Fake GPU"),
        (1, "GPU-fake-1", "NVIDIA Other"),
    ]
    r = sensor.read(0, 12.5)
    assert (r.t_mono, r.index, r.temperature, r.thermal_margin) == (12.5, 0, 60.0, 25.0)
    assert (r.power_w, r.utilization_pct) == (250.0, 90.0)
    assert (r.memory_used, r.memory_total, r.memory_reserved) == (8 * GIB, 24 * GIB, 400 * MIB)
    assert r.memory_fraction == pytest.approx(1 / 3)
    assert (r.clock_event_reasons, r.ecc_uncorrected_volatile, r.pids) == (0, 0, (4242,))
    assert (r.lost, r.unsupported, r.errors) == (False, frozenset(), {})
    assert sensor.read(1, 13.0).temperature == 70.0
    assert sensor.take_notes() == []


def test_names_returned_as_bytes_by_old_bindings_are_decoded(fake: FakePynvml) -> None:
    fake.gpus[0].name = b"Tesla V100"  # type: ignore[assignment]
    fake.gpus[0].uuid = b"GPU-old"  # type: ignore[assignment]
    assert open_sensor(fake).devices()[0].name == "Tesla V100"


def test_newer_apis_are_preferred(fake: FakePynvml) -> None:
    sensor = open_sensor(fake)
    sensor.read(0, 0.0)
    assert fake.calls["nvmlDeviceGetTemperatureV"] > 0
    assert fake.calls["nvmlDeviceGetMemoryInfo_v2"] > 0
    assert fake.calls["nvmlDeviceGetCurrentClocksEventReasons"] > 0
    for legacy in (
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetCurrentClocksThrottleReasons",
        "nvmlDeviceGetComputeRunningProcesses_v2",
    ):
        assert fake.calls[legacy] == 0, legacy


@pytest.mark.parametrize(
    "code, words",
    [
        (real.NVML_ERROR_LIBRARY_NOT_FOUND, "no NVIDIA driver is installed"),
        (real.NVML_ERROR_DRIVER_NOT_LOADED, "driver is not loaded"),
        (real.NVML_ERROR_NO_PERMISSION, "Insufficient Permissions"),
    ],
)
def test_no_driver_raises_gpu_unavailable(fake: FakePynvml, code: int, words: str) -> None:
    fake.init_error = code
    with pytest.raises(GpuUnavailable, match=words):
        open_sensor(fake)


def test_pynvml_not_importable_raises_gpu_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    with pytest.raises(GpuUnavailable, match="pynvml"):
        NvmlSensor().open()


def test_no_device_raises_gpu_unavailable_and_shuts_nvml_down() -> None:
    fake = FakePynvml(gpus=[])
    with pytest.raises(GpuUnavailable, match="no NVIDIA GPU"):
        open_sensor(fake)
    assert fake.calls["nvmlShutdown"] == 1 and not fake.initialized


def test_close_shuts_down_once(fake: FakePynvml) -> None:
    sensor = open_sensor(fake)
    sensor.close()
    sensor.close()
    assert fake.calls["nvmlShutdown"] == 1 and not fake.initialized
    assert sensor.devices() == []


# -- version fallbacks, decided at open ----------------------------------------------

FALLBACKS = [
    # (newer function as the fake counts it, older function, field, value it reads)
    ("nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature", "temperature", 60.0),
    (
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetCurrentClocksThrottleReasons",
        "clock_event_reasons",
        0x20,
    ),
    (
        "nvmlDeviceGetComputeRunningProcesses",
        "nvmlDeviceGetComputeRunningProcesses_v2",
        "pids",
        (4242,),
    ),
    ("nvmlDeviceGetMemoryInfo_v2", "nvmlDeviceGetMemoryInfo", "memory_used", 8 * GIB + 400 * MIB),
]


@pytest.mark.parametrize("how", ["driver lacks it", "bindings lack it"])
@pytest.mark.parametrize("newer, older, field, value", FALLBACKS)
def test_older_api_is_used_when_the_newer_is_missing(
    fake: FakePynvml, how: str, newer: str, older: str, field: str, value: object
) -> None:
    fake.gpus[0].reasons = 0x20
    if how == "driver lacks it":
        fake.fail(newer, real.NVML_ERROR_FUNCTION_NOT_FOUND)
    elif newer == "nvmlDeviceGetMemoryInfo_v2":
        fake.hide("nvmlMemory_v2")  # old bindings have no v2 struct version
    else:
        fake.hide(newer)
    sensor = open_sensor(fake, pids_every=1)
    tried = fake.calls[newer]
    for n in range(3):
        reading = sensor.read(0, float(n))
        assert getattr(reading, field) == value
        assert field not in reading.unsupported
    assert fake.calls[newer] == tried  # decided once at open, never asked again
    assert fake.calls[older] >= 3
    if tried:  # a fallback from an API that was tried is told once
        assert any(older in note for note in sensor.take_notes())


def test_memory_v1_fallback_marks_reserved_unsupported(fake: FakePynvml) -> None:
    fake.fail("nvmlDeviceGetMemoryInfo_v2", real.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
    r = open_sensor(fake).read(0, 0.0)
    assert r.memory_total == 24 * GIB
    assert r.memory_reserved is None and r.unsupported == {"memory_reserved"}


def test_memory_v2_is_kept_when_v1_is_not_supported(fake: FakePynvml) -> None:
    # Unified-memory GPUs answer only the v2 call.
    fake.fail("nvmlDeviceGetMemoryInfo", real.NVML_ERROR_NOT_SUPPORTED)
    assert open_sensor(fake).read(0, 0.0).memory_used == 8 * GIB


def test_newer_api_failing_at_open_is_passed_over_for_one_that_answers(
    fake: FakePynvml,
) -> None:
    # WSL answers memory v2 with Unknown Error, every time.
    fake.fail("nvmlDeviceGetMemoryInfo_v2", real.NVML_ERROR_UNKNOWN)
    sensor = open_sensor(fake)
    r = sensor.read(0, 0.0)
    assert r.memory_total == 24 * GIB and r.errors == {}
    assert fake.calls["nvmlDeviceGetMemoryInfo_v2"] == 1
    assert any("nvmlDeviceGetMemoryInfo(v1)" in n for n in sensor.take_notes())


def test_api_failing_at_open_with_no_alternative_is_kept_and_polled(fake: FakePynvml) -> None:
    fake.fail("nvmlDeviceGetPowerUsage", real.NVML_ERROR_UNKNOWN, times=1)
    sensor = open_sensor(fake)
    assert sensor.read(0, 0.0).power_w == 250.0
    assert sensor.take_notes() == []


def test_thresholds_from_field_values_are_converted_from_t_limit_offsets(
    fake: FakePynvml,
) -> None:
    # T.Limit = 60 °C + 25 °C margin = 85 °C; offsets -10, -7, -4 put the limits above it.
    t = open_sensor(fake).thresholds(0)
    assert (t.shutdown, t.slowdown, t.gpu_max) == (95.0, 92.0, 89.0)
    assert t.mem_max is None  # neither API reports it on this GPU
    assert t.enforced_power_limit_w == 450.0
    assert fake.calls["nvmlDeviceGetFieldValues"] == 1


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param(lambda f: setattr(f.gpus[0], "margin", None), id="no thermal margin"),
        pytest.param(lambda f: setattr(f.gpus[0], "field_values", {}), id="fields unsupported"),
        pytest.param(
            lambda f: f.fail("nvmlDeviceGetFieldValues", real.NVML_ERROR_FUNCTION_NOT_FOUND),
            id="field values function not found",
        ),
        pytest.param(
            lambda f: f.hide("NVML_FI_DEV_TEMPERATURE_SHUTDOWN_TLIMIT"), id="old bindings"
        ),
    ],
)
def test_thresholds_fall_back_to_the_legacy_call(fake: FakePynvml, setup) -> None:
    setup(fake)
    t = open_sensor(fake).thresholds(0)
    assert (t.shutdown, t.slowdown, t.gpu_max, t.mem_max) == (96.0, 93.0, 90.0, None)


def test_implausible_field_values_fall_back_to_the_legacy_call(fake: FakePynvml) -> None:
    fake.gpus[0].field_values = {real.NVML_FI_DEV_TEMPERATURE_SHUTDOWN_TLIMIT: -400}
    assert open_sensor(fake).thresholds(0).shutdown == 96.0


def test_unknown_thresholds_are_none_and_noted(fake: FakePynvml) -> None:
    fake.gpus[0].field_values = {}
    fake.gpus[0].legacy_thresholds = {}
    fake.gpus[0].enforced_power_mw = None
    sensor = open_sensor(fake)
    t = sensor.thresholds(0)
    assert (t.shutdown, t.slowdown, t.gpu_max, t.mem_max, t.enforced_power_limit_w) == (None,) * 5
    assert any("no temperature thresholds" in n for n in sensor.take_notes())


# -- NotSupported: marked unsupported and never polled again -------------------------

UNSUPPORTED = [
    # (FakeGpu attribute, the fields it feeds, the function(s) the sensor would call)
    ("temperature", {"temperature"}, ["nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature"]),
    ("margin", {"thermal_margin"}, ["nvmlDeviceGetMarginTemperature"]),
    ("power_mw", {"power_w"}, ["nvmlDeviceGetPowerUsage"]),
    ("utilization", {"utilization_pct"}, ["nvmlDeviceGetUtilizationRates"]),
    (
        "reasons",
        {"clock_event_reasons"},
        ["nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"],
    ),
    ("ecc_uncorrected", {"ecc_uncorrected_volatile"}, ["nvmlDeviceGetTotalEccErrors"]),
    (
        "pids",
        {"pids"},
        ["nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v2"],
    ),
]


@pytest.mark.parametrize("attr, fields, funcs", UNSUPPORTED)
def test_field_not_supported_at_open_is_never_polled(
    fake: FakePynvml, attr: str, fields: set[str], funcs: list[str]
) -> None:
    setattr(fake.gpus[0], attr, None)
    sensor = open_sensor(fake, pids_every=1)
    after_open = {f: fake.calls[f] for f in funcs}
    for n in range(5):
        r = sensor.read(0, float(n))
        assert r.unsupported == fields and r.errors == {}
        assert all(getattr(r, f) is None for f in fields)
    assert {f: fake.calls[f] for f in funcs} == after_open
    assert r.temperature is not None or attr == "temperature"


@pytest.mark.parametrize("attr, fields, funcs", UNSUPPORTED)
def test_field_not_supported_mid_run_stops_being_polled(
    fake: FakePynvml, attr: str, fields: set[str], funcs: list[str]
) -> None:
    sensor = open_sensor(fake, pids_every=1)
    assert sensor.read(0, 0.0).unsupported == frozenset()
    func = next(f for f in funcs if fake.calls[f])  # the one chosen at open
    fake.fail(func, real.NVML_ERROR_NOT_SUPPORTED)
    r = sensor.read(0, 1.0)
    assert r.unsupported == fields and r.errors == {}
    calls = fake.calls[func]
    for n in range(3):
        assert sensor.read(0, 2.0 + n).unsupported == fields
    assert fake.calls[func] == calls
    assert any("no longer reported" in note for note in sensor.take_notes())


# -- transient errors and lost GPUs --------------------------------------------------


@pytest.mark.parametrize(
    "code, text",
    [
        (real.NVML_ERROR_UNKNOWN, "Unknown Error"),
        (real.NVML_ERROR_TIMEOUT, "Timeout"),
        (real.NVML_ERROR_NO_PERMISSION, "Insufficient Permissions"),
    ],
)
def test_transient_error_is_named_and_the_field_polled_again(
    fake: FakePynvml, code: int, text: str
) -> None:
    sensor = open_sensor(fake)
    fake.fail("nvmlDeviceGetPowerUsage", code, times=1)
    r = sensor.read(0, 0.0)
    assert r.power_w is None
    assert r.errors == {"power_w": f"nvmlDeviceGetPowerUsage: {text}"}
    assert r.unsupported == frozenset() and not r.lost
    assert r.temperature == 60.0  # the other fields are still read
    assert sensor.read(0, 1.0).power_w == 250.0


def test_transient_error_on_memory_names_each_memory_field(fake: FakePynvml) -> None:
    sensor = open_sensor(fake)
    fake.fail("nvmlDeviceGetMemoryInfo_v2", real.NVML_ERROR_UNKNOWN, times=1)
    r = sensor.read(0, 0.0)
    assert set(r.errors) == {"memory_used", "memory_total", "memory_reserved"}


@pytest.mark.parametrize("code", [real.NVML_ERROR_GPU_IS_LOST, real.NVML_ERROR_RESET_REQUIRED])
def test_gpu_lost_mid_run_sets_lost_and_stops_asking(fake: FakePynvml, code: int) -> None:
    fake.gpus.append(FakeGpu(uuid="GPU-fake-1"))
    sensor = open_sensor(fake)
    assert not sensor.read(0, 0.0).lost
    fake.fail("nvmlDeviceGetPowerUsage", code, index=0)
    r = sensor.read(0, 1.0)
    assert r.lost
    assert all(getattr(r, f) is None for f in FIELDS)
    calls = sum(fake.calls.values())
    assert sensor.read(0, 2.0).lost
    assert sum(fake.calls.values()) == calls  # a lost GPU is never asked again
    assert not sensor.read(1, 3.0).lost  # the other GPU carries on
    assert any("GPU 0: lost" in note for note in sensor.take_notes())


def test_gpu_lost_at_open_is_listed_as_lost(fake: FakePynvml) -> None:
    fake.fail("nvmlDeviceGetTemperatureV", real.NVML_ERROR_GPU_IS_LOST)
    sensor = open_sensor(fake)
    assert [d.index for d in sensor.devices()] == [0]
    assert sensor.read(0, 0.0).lost


def test_device_without_handle_is_skipped(fake: FakePynvml) -> None:
    fake.gpus.append(FakeGpu(uuid="GPU-fake-1"))
    fake.fail("nvmlDeviceGetHandleByIndex", real.NVML_ERROR_NO_PERMISSION, index=0)
    sensor = open_sensor(fake)
    assert [d.index for d in sensor.devices()] == [1]
    assert any("GPU 0: skipped" in n for n in sensor.take_notes())


# -- process lists, only every few polls ---------------------------------------------


def test_processes_are_listed_every_nth_poll(fake: FakePynvml) -> None:
    sensor = open_sensor(fake, pids_every=3)
    at_open = fake.calls["nvmlDeviceGetComputeRunningProcesses"]
    pids = [sensor.read(0, float(n)).pids for n in range(7)]
    assert pids == [(4242,), None, None, (4242,), None, None, (4242,)]
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses"] - at_open == 3


def test_processes_lists_pids_at_once_off_the_cadence(fake: FakePynvml) -> None:
    sensor = open_sensor(fake, pids_every=5)
    sensor.read(0, 0.0)
    fake.gpus[0].pids = ()
    assert sensor.read(0, 1.0).pids is None  # not this poll
    assert sensor.processes(0) == ()  # the worker let go of the GPU
    fake.fail("nvmlDeviceGetComputeRunningProcesses", real.NVML_ERROR_UNKNOWN, times=1)
    assert sensor.processes(0) is None
    fake.fail("nvmlDeviceGetComputeRunningProcesses", real.NVML_ERROR_GPU_IS_LOST)
    assert sensor.processes(0) is None and sensor.read(0, 2.0).lost


def test_a_gpu_that_cannot_list_processes_falls_back_to_the_process_table(
    fake: FakePynvml,
) -> None:
    fake.gpus[0].pids = None
    sensor = open_sensor(fake, process_table=lambda: (777,))
    sensor.take_notes()
    calls = sum(fake.calls.values())
    assert sensor.processes(0) == (777,)
    assert sensor.processes(0) == (777,)
    assert sum(fake.calls.values()) == calls  # NVML is not asked again
    [note] = sensor.take_notes()  # said once
    assert "NVML does not list its processes" in note and "process table" in note


def test_pids_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="pids_every"):
        NvmlSensor(pids_every=0)


# -- Xid events ----------------------------------------------------------------------


def wait_for_events(sensor: NvmlSensor, count: int, timeout: float = 2.0) -> list[XidEvent]:
    got: list[XidEvent] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += sensor.events()
        time.sleep(0.005)
    return got


def test_xid_events_are_delivered(fake: FakePynvml) -> None:
    fake.gpus.append(FakeGpu(uuid="GPU-fake-1"))
    sensor = open_sensor(fake, xid_events=True, event_timeout_ms=20, clock=lambda: 42.0)
    fake.push_event(1, real.nvmlEventTypeXidCriticalError, 79)
    fake.push_event(0, real.nvmlEventTypeDoubleBitEccError)
    fake.push_event(0, real.nvmlEventTypeXidCriticalError, 13)
    events = wait_for_events(sensor, 3)
    assert events == [
        XidEvent(t_mono=42.0, index=1, xid=79, kind="xid"),
        XidEvent(t_mono=42.0, index=0, xid=None, kind="ecc_double_bit"),
        XidEvent(t_mono=42.0, index=0, xid=13, kind="xid"),
    ]
    assert sensor.events() == []  # drained
    sensor.close()


def test_event_wait_timeouts_keep_the_thread_waiting_and_close_is_prompt(
    fake: FakePynvml,
) -> None:
    sensor = open_sensor(fake, xid_events=True, event_timeout_ms=10)
    deadline = time.monotonic() + 2.0
    while fake.calls["nvmlEventSetWait_v2"] < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert fake.calls["nvmlEventSetWait_v2"] >= 3  # each timeout came back and waited again
    assert sensor.events() == [] and sensor.take_notes() == []
    started = time.monotonic()
    sensor.close()
    assert time.monotonic() - started < 1.0
    assert fake.calls["nvmlEventSetFree"] == 1


def test_only_supported_event_types_are_registered(fake: FakePynvml) -> None:
    open_sensor(fake, xid_events=True, event_timeout_ms=10).close()
    assert fake.registered == {
        0: real.nvmlEventTypeXidCriticalError | real.nvmlEventTypeDoubleBitEccError
    }


def test_no_event_support_means_no_thread_and_a_note(fake: FakePynvml) -> None:
    fake.gpus[0].supported_events = 0
    sensor = open_sensor(fake, xid_events=True, event_timeout_ms=10)
    assert any("no Xid" in n for n in sensor.take_notes())
    assert fake.calls["nvmlEventSetWait_v2"] == 0 and sensor.events() == []
    sensor.close()


def test_event_set_not_supported_leaves_polling_working(fake: FakePynvml) -> None:
    fake.fail("nvmlEventSetCreate", real.NVML_ERROR_NOT_SUPPORTED)
    sensor = open_sensor(fake, xid_events=True)
    assert any("Xid events off" in n for n in sensor.take_notes())
    assert sensor.read(0, 0.0).temperature == 60.0
    sensor.close()


def test_old_bindings_wait_without_v2(fake: FakePynvml) -> None:
    fake.hide("nvmlEventSetWait_v2")
    sensor = open_sensor(fake, xid_events=True, event_timeout_ms=10)
    fake.push_event(0, real.nvmlEventTypeXidCriticalError, 48)
    assert [e.xid for e in wait_for_events(sensor, 1)] == [48]
    sensor.close()


def test_event_wait_error_is_noted_once_and_waiting_goes_on(
    fake: FakePynvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(xid_events, "ERROR_BACKOFF_S", 0.01)
    fake.fail("nvmlEventSetWait_v2", real.NVML_ERROR_UNKNOWN, times=2)
    sensor = open_sensor(fake, xid_events=True, event_timeout_ms=10)
    fake.push_event(0, real.nvmlEventTypeXidCriticalError, 79)
    assert [e.xid for e in wait_for_events(sensor, 1)] == [79]
    notes = sensor.take_notes()
    assert notes == ["Xid event wait failed: nvmlEventSetWait_v2: Unknown Error"]
    assert sensor.take_notes() == []
    sensor.close()


def test_event_from_an_unidentifiable_device_has_index_minus_one(fake: FakePynvml) -> None:
    sensor = open_sensor(fake, xid_events=True, event_timeout_ms=10)
    fake.fail("nvmlDeviceGetIndex", real.NVML_ERROR_UNKNOWN)
    fake.push_event(0, real.nvmlEventTypeXidCriticalError, 31)
    assert wait_for_events(sensor, 1)[0].index == -1
    sensor.close()
