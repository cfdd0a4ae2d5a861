"""ScriptedSensor: keyframes, Xid events and errors at their times, bad profiles refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from nkat.supervisor.gpu.scripted import (
    ProfileError,
    ScriptedSensor,
    Trace,
    load_profile,
    parse_profile,
    shipped_profiles,
)
from nkat.supervisor.gpu.sensor import FIELDS, ClockEventReason, XidEvent


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def played(text: str, clock: Clock, **kwargs) -> ScriptedSensor:
    sensor = ScriptedSensor(parse_profile(text, source="test.toml"), clock=clock, **kwargs)
    sensor.open()
    return sensor


def shipped(name: str, clock: Clock, **kwargs) -> ScriptedSensor:
    sensor = ScriptedSensor.from_profile(name, clock=clock, **kwargs)
    sensor.open()
    return sensor


MINIMAL = """
[[device]]
[device.trace]
temperature = [[0, 50]]
"""

# -- keyframes -----------------------------------------------------------------------


def test_linear_trace_interpolates_and_holds_the_ends() -> None:
    trace = Trace((2.0, 4.0, 8.0), (10.0, 20.0, 0.0))
    assert [trace.at(t) for t in (0, 2, 3, 4, 6, 8, 100)] == [10, 10, 15, 20, 10, 0, 0]


def test_step_trace_holds_each_value_until_the_next_keyframe() -> None:
    trace = Trace((0.0, 4.0), (10.0, 20.0), step=True)
    assert [trace.at(t) for t in (0, 3.99, 4, 5)] == [10, 10, 20, 20]


def test_two_keyframes_at_one_time_make_a_jump() -> None:
    trace = Trace((0.0, 3.0, 3.0, 6.0), (70.0, 74.0, 90.0, 90.0))
    assert (trace.at(1.5), trace.at(2.25), trace.at(3.0), trace.at(4.0)) == (72, 73, 90, 90)


def test_heat_wave_follows_its_keyframes_on_the_injected_clock() -> None:
    clock = Clock()
    sensor = shipped("heat_wave", clock)
    temps = {}
    for t in (0, 2.5, 5, 8, 10, 16, 18, 20, 60):
        clock.now = 1000.0 + t
        temps[t] = sensor.read(0, clock.now).temperature
    assert temps == {0: 70, 2.5: 75, 5: 80, 8: 84, 10: 84, 16: 75, 18: 72.5, 20: 70, 60: 70}
    r = sensor.read(0, 1006.0)
    assert r.clock_event_reasons == ClockEventReason.SW_THERMAL_SLOWDOWN
    assert r.t_mono == 1006.0 and r.thermal_margin == pytest.approx(90 - r.temperature)
    assert sensor.read(0, 1015.0).clock_event_reasons == 0


def test_time_scale_stretches_the_profile() -> None:
    clock = Clock()
    sensor = shipped("heat_wave", clock, time_scale=6.0)  # the wave over two minutes
    assert sensor.read(0, 1000.0 + 48.0).temperature == 84  # profile time 8 s
    assert sensor.read(0, 1000.0 + 30.0).temperature == 80  # profile time 5 s


def test_profile_time_scale_multiplies_the_sensor_one() -> None:
    text = "time_scale = 2.0\n" + MINIMAL.replace("[[0, 50]]", "[[0, 50], [10, 60]]")
    sensor = played(text, Clock(0.0), time_scale=0.5)
    assert sensor.read(0, 5.0).temperature == 55


def test_start_at_opens_the_profile_midway() -> None:
    clock = Clock()
    sensor = shipped("heat_wave", clock, start_at=8.0)
    assert sensor.read(0, clock.now).temperature == 84


def test_memory_squeeze_reaches_97_percent() -> None:
    sensor = shipped("memory_squeeze", Clock(0.0))
    r = sensor.read(0, 10.0)
    assert r.memory_total == 24576 << 20
    assert r.memory_fraction == pytest.approx(0.97, abs=1e-6)
    assert sensor.read(0, 0.0).memory_fraction == pytest.approx(0.40, abs=1e-6)


def test_reason_bits_may_be_names_or_an_integer() -> None:
    text = MINIMAL + 'clock_event_reasons = [[0, 4], [1, ["hw_slowdown", "sw_power_cap"]]]\n'
    sensor = played(text, Clock(0.0))
    assert sensor.read(0, 0.5).clock_event_reasons == 4
    assert sensor.read(0, 1.0).clock_event_reasons == 0x8 | 0x4


def test_a_step_table_holds_a_numeric_trace() -> None:
    text = MINIMAL.replace("[[0, 50]]", "{ step = true, points = [[0, 50], [4, 90]] }")
    sensor = played(text, Clock(0.0))
    assert (sensor.read(0, 3.9).temperature, sensor.read(0, 4.0).temperature) == (50, 90)


# -- what is and is not reported -----------------------------------------------------


def test_absent_traces_are_unsupported_fields() -> None:
    r = played(MINIMAL, Clock(0.0)).read(0, 0.0)
    assert r.temperature == 50
    assert r.unsupported == frozenset(FIELDS) - {"temperature"}
    assert r.power_w is None and r.pids is None and r.errors == {}


def test_processes_are_listed_every_nth_poll() -> None:
    sensor = played(MINIMAL + "[[device]]\npids = [7, 9]\n", Clock(0.0), pids_every=2)
    assert [sensor.read(1, float(n)).pids for n in range(4)] == [(7, 9), None, (7, 9), None]


def test_processes_lists_pids_at_once_until_the_gpu_is_lost() -> None:
    clock = Clock(0.0)
    text = "[[device]]\npids = [5]\n[[device.error]]\nat = 2\nerror = 'GpuIsLost'\n"
    sensor = played(text, clock, pids_every=10)
    sensor.read(0, 0.0)
    assert sensor.read(0, 1.0).pids is None
    assert sensor.processes(0) == (5,)
    clock.now = 2.0
    assert sensor.processes(0) is None


def test_thresholds_and_identity_come_from_the_profile() -> None:
    sensor = shipped("heat_wave", Clock())
    t = sensor.thresholds(0)
    assert (t.shutdown, t.slowdown, t.gpu_max, t.mem_max) == (96, 93, 90, None)
    assert t.enforced_power_limit_w == 450
    device = sensor.devices()[0]
    assert device.index == 0 and device.name == "Simulated GPU (heat wave)"
    assert device.uuid.startswith("GPU-")
    assert sensor.take_notes() == ["simulated GPU: profile heat_wave (shipped), time scale 1"]
    assert sensor.take_notes() == []


# -- Xid events and errors at their times --------------------------------------------


def test_xid79_arrives_at_three_seconds_then_the_gpu_is_lost() -> None:
    clock = Clock()
    sensor = shipped("xid79", clock)
    clock.now = 1002.9
    assert sensor.events() == []
    assert not sensor.read(0, clock.now).lost
    clock.now = 1003.2
    events = sensor.events()
    assert events == [XidEvent(t_mono=1003.0, index=0, xid=79, kind="xid")]
    assert sensor.events() == []  # delivered once
    assert not sensor.read(0, 1003.4).lost
    lost = sensor.read(0, 1003.5)
    assert lost.lost and lost.temperature is None and lost.errors == {}
    assert sensor.read(0, 1100.0).lost  # for good


def test_xid_times_follow_the_time_scale() -> None:
    clock = Clock()
    sensor = shipped("xid79", clock, time_scale=0.1)
    clock.now = 1000.31
    assert [e.t_mono for e in sensor.events()] == [pytest.approx(1000.3)]


def test_xids_before_start_at_are_not_reported() -> None:
    clock = Clock()
    sensor = shipped("xid79", clock, start_at=4.0)
    assert sensor.events() == []


def test_event_kinds_without_a_code() -> None:
    text = MINIMAL + '[[device.xid]]\nat = 1\nkind = "ecc_double_bit"\n'
    clock = Clock(0.0)
    sensor = played(text, clock)
    clock.now = 1.0
    assert sensor.events() == [XidEvent(1.0, 0, None, "ecc_double_bit")]


def test_transient_error_is_named_between_at_and_until() -> None:
    text = MINIMAL + (
        'power_w = [[0, 200]]\n[[device.error]]\nat = 2\nuntil = 4\nerror = "Unknown"\n'
        'fields = ["power_w"]\n'
    )
    sensor = played(text, Clock(0.0))
    assert sensor.read(0, 1.9).errors == {}
    r = sensor.read(0, 2.0)
    assert r.errors == {"power_w": "Unknown Error (scripted)"} and r.power_w is None
    assert r.temperature == 50 and "power_w" not in r.unsupported
    assert sensor.read(0, 4.0).power_w == 200


def test_error_without_fields_hits_every_reported_field() -> None:
    text = MINIMAL + '[[device.error]]\nat = 1\nerror = "Timeout"\n'
    r = played(text, Clock(0.0)).read(0, 1.0)
    assert r.errors == {"temperature": "Timeout (scripted)"} and r.temperature is None


def test_not_supported_at_a_time_makes_fields_unsupported_for_good() -> None:
    text = MINIMAL + '[[device.error]]\nat = 2\nerror = "NotSupported"\nfields = ["temperature"]\n'
    sensor = played(text, Clock(0.0))
    assert sensor.read(0, 1.0).temperature == 50
    r = sensor.read(0, 2.0)
    assert r.temperature is None and "temperature" in r.unsupported and r.errors == {}


def test_reset_required_loses_the_gpu() -> None:
    text = MINIMAL + '[[device.error]]\nat = 1\nerror = "ResetRequired"\n'
    assert played(text, Clock(0.0)).read(0, 1.0).lost


# -- profiles ------------------------------------------------------------------------


def test_the_promised_profiles_are_shipped() -> None:
    assert {"calm", "heat_wave", "emergency_spike", "memory_squeeze", "xid79"} <= set(
        shipped_profiles()
    )


@pytest.mark.parametrize("name", shipped_profiles())
def test_every_shipped_profile_loads_and_plays(name: str) -> None:
    clock = Clock(0.0)
    sensor = shipped(name, clock)
    assert sensor.profile.description
    for step in range(0, 121):
        clock.now = step * 0.25
        sensor.events()
        for device in sensor.devices():
            r = sensor.read(device.index, clock.now)
            assert r.lost or r.temperature is not None


def test_emergency_spike_reaches_90() -> None:
    sensor = shipped("emergency_spike", Clock(0.0))
    assert sensor.read(0, 3.0).temperature == 74
    assert sensor.read(0, 4.0).temperature == 90


def test_profile_is_loaded_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(MINIMAL)
    profile = load_profile(path)
    assert (profile.name, profile.source, len(profile.devices)) == ("mine", str(path), 1)


def test_unknown_profile_name_lists_the_shipped_ones() -> None:
    with pytest.raises(ProfileError, match="heat_wave") as err:
        load_profile("no_such_profile")
    assert err.value.key == "profile"


BAD = [
    ("colour = 1\n" + MINIMAL, "colour", "unknown key"),
    ("time_scale = 0\n" + MINIMAL, "time_scale", "outside"),
    ("description = 'x'\n", "device", "at least one"),
    ("[[device]]\nspeed = 3\n", "device[0].speed", "unknown key"),
    (
        "[[device]]\n[device.trace]\ntemprature = [[0, 1]]\n",
        "device[0].trace.temprature",
        "unknown key",
    ),
    (
        "[[device]]\n[device.trace]\ntemperature = []\n",
        "device[0].trace.temperature",
        "at least one keyframe",
    ),
    (
        "[[device]]\n[device.trace]\ntemperature = [[0, 1], [5, 2], [4, 3]]\n",
        "device[0].trace.temperature[2]",
        "goes back",
    ),
    (
        "[[device]]\n[device.trace]\ntemperature = [[0, 'hot']]\n",
        "device[0].trace.temperature[0]",
        "must be a number",
    ),
    (
        "[[device]]\n[device.trace]\ntemperature = [[0, 1, 2]]\n",
        "device[0].trace.temperature[0]",
        "[seconds, value]",
    ),
    (
        "[[device]]\n[device.trace]\nutilization_pct = [[0, 120]]\n",
        "device[0].trace.utilization_pct[0]",
        "outside",
    ),
    (
        "[[device]]\n[device.trace]\nmemory_used_pct = [[0, 50]]\n",
        "device[0].trace.memory_used_pct",
        "memory_total_mib",
    ),
    (
        "[[device]]\n[device.trace]\nclock_event_reasons = [[0, ['too_hot']]]\n",
        "device[0].trace.clock_event_reasons[0]",
        "unknown reason",
    ),
    (
        "[[device]]\n[device.trace]\ntemperature = { step = 'yes', points = [[0, 1]] }\n",
        "device[0].trace.temperature.step",
        "true or false",
    ),
    (
        "[[device]]\n[device.thresholds]\nslowdown = 'hot'\n",
        "device[0].thresholds.slowdown",
        "must be a number",
    ),
    (
        "[[device]]\n[device.thresholds]\ncritical = 90\n",
        "device[0].thresholds.critical",
        "unknown key",
    ),
    ("[[device]]\npids = [0]\n", "device[0].pids[0]", "integer"),
    ("[[device]]\n[[device.xid]]\nat = 1\n", "device[0].xid[0].xid", "needs its code"),
    (
        "[[device]]\n[[device.xid]]\nat = 1\nxid = 79\nkind = 'boom'\n",
        "device[0].xid[0].kind",
        "must be one of",
    ),
    ("[[device]]\n[[device.xid]]\nxid = 79\n", "device[0].xid[0].at", "must be a number"),
    (
        "[[device]]\n[[device.error]]\nat = 1\nerror = 'Meltdown'\n",
        "device[0].error[0].error",
        "unknown error",
    ),
    (
        "[[device]]\n[[device.error]]\nat = 1\nerror = 'GpuIsLost'\nuntil = 2\n",
        "device[0].error[0].until",
        "takes no until",
    ),
    (
        "[[device]]\n[[device.error]]\nat = 3\nerror = 'Unknown'\nuntil = 2\n",
        "device[0].error[0].until",
        "outside",
    ),
    (
        "[[device]]\n[[device.error]]\nat = 1\nerror = 'GpuIsLost'\nfields = ['power_w']\n",
        "device[0].error[0].fields",
        "whole GPU",
    ),
    (
        "[[device]]\n[[device.error]]\nat = 1\nerror = 'Unknown'\nfields = ['fan']\n",
        "device[0].error[0].fields",
        "unknown field",
    ),
    ("[[device\n", "toml", ""),
]


@pytest.mark.parametrize("text, key, words", BAD)
def test_bad_profile_is_refused_naming_the_file_and_key(
    tmp_path: Path, text: str, key: str, words: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert err.value.key == key
    assert err.value.source == str(path)
    assert str(err.value).startswith(f"{path}: {key}: ")
    assert words in str(err.value)


def test_sensor_arguments_are_checked() -> None:
    profile = parse_profile(MINIMAL)
    with pytest.raises(ValueError, match="time_scale"):
        ScriptedSensor(profile, time_scale=0)
    with pytest.raises(ValueError, match="pids_every"):
        ScriptedSensor(profile, pids_every=0)
