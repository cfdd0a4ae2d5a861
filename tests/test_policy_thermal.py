"""Thermal ladder: transitions, debounce, dwell, duty, no flapping, NVML tightening."""

from __future__ import annotations

import pytest

from nkat.supervisor.gpu.sensor import Thresholds
from nkat.supervisor.policies.thermal import (
    HW_POWER_BRAKE_SLOWDOWN,
    HW_SLOWDOWN,
    HW_THERMAL_SLOWDOWN,
    SW_THERMAL_SLOWDOWN,
    ThermalAction,
    ThermalActionKind,
    ThermalLadder,
    ThermalSettings,
    ThermalState,
    effective_limits,
)
from tests.thermal_feed import Feed, S

K = ThermalActionKind


def kinds(actions: list[ThermalAction]) -> list[ThermalActionKind]:
    return [a.kind for a in actions]


def throttled() -> Feed:
    feed = Feed()
    feed(81, 81, 81)
    assert feed.state is ThermalState.THROTTLED
    return feed


def cooling() -> Feed:
    feed = Feed()
    feed(84, 84, 84)
    assert feed.state is ThermalState.COOLING
    return feed


# Settings and limits ---------------------------------------------------------------------


def test_defaults_and_from_config() -> None:
    assert (S.target_temperature, S.thermal_throttle_temp, S.max_temperature,
            S.emergency_temp, S.thermal_samples, S.thermal_dwell) == (75, 80, 83, 85, 3, 60)
    assert ThermalSettings.from_config({"max_temperature": 82.0, "thermal_samples": 5}) == \
        ThermalSettings(max_temperature=82.0, thermal_samples=5)


@pytest.mark.parametrize("bad", [
    {"target_temperature": 80.0},  # no hysteresis left
    {"max_temperature": 79.0},
    {"emergency_temp": 82.0},
    {"thermal_samples": 0},
])
def test_invalid_settings(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ThermalSettings(**bad)  # type: ignore[arg-type]


def test_limits_without_nvml_are_the_configured_ones() -> None:
    lim = effective_limits(S, None)
    assert (lim.target, lim.throttle, lim.maximum, lim.emergency, lim.tightened) == \
        (75, 80, 83, 85, ())
    assert effective_limits(S, Thresholds()) == lim


def test_nvml_thresholds_tighten_every_limit() -> None:
    # A hot-running laptop GPU: slows down at 82, shuts down at 86.
    lim = effective_limits(S, Thresholds(slowdown=82.0, shutdown=86.0))
    assert lim.emergency == 84.0  # shutdown - 2
    assert lim.maximum == 80.0  # slowdown - 2
    assert lim.throttle == 80.0
    assert lim.target == 75.0
    assert lim.tightened == ("max_temperature", "emergency_temp")
    lim = effective_limits(S, Thresholds(gpu_max=78.0))
    assert (lim.maximum, lim.throttle, lim.target) == (78.0, 78.0, 73.0)  # gap of 5 kept
    assert lim.target < lim.throttle <= lim.maximum <= lim.emergency


def test_nvml_thresholds_never_loosen() -> None:
    lim = effective_limits(S, Thresholds(slowdown=100.0, shutdown=105.0, gpu_max=95.0))
    assert (lim.target, lim.throttle, lim.maximum, lim.emergency, lim.tightened) == \
        (75, 80, 83, 85, ())


def test_tightened_limits_drive_the_ladder() -> None:
    feed = Feed(ThermalLadder(S, Thresholds(slowdown=82.0)))  # maximum 80
    assert kinds(feed(80.5, 80.5, 80.5)) == [K.STOP]


# Escalation ------------------------------------------------------------------------------


def test_normal_below_throttle() -> None:
    feed = Feed()
    assert feed(70, 79, 79.9, 79, 79, 79) == []
    assert feed.state is ThermalState.NORMAL and feed.ladder.may_run


def test_throttle_after_thermal_samples_consecutive_readings() -> None:
    feed = Feed()
    assert feed(80, 80) == []
    actions = feed(80)
    assert kinds(actions) == [K.THROTTLE]
    assert actions[0].duty == 0.9  # at the threshold: the mildest throttle, 1 - step
    assert feed.ladder.duty == 0.9 and feed.ladder.may_run


def test_a_reading_below_breaks_the_run() -> None:
    feed = Feed()
    assert feed(81, 81, 79, 81, 81) == []
    assert kinds(feed(81)) == [K.THROTTLE]


def test_missing_readings_count_neither_way() -> None:
    feed = Feed()
    assert feed(81, None, 81, None, None) == []
    assert kinds(feed(81)) == [K.THROTTLE]
    feed = throttled()
    assert feed(70, None, 70) == []
    assert kinds(feed(70)) == [K.UNTHROTTLE]


def test_software_thermal_slowdown_throttles_below_the_threshold() -> None:
    feed = Feed()
    actions = feed(70, 70, 70, reasons=SW_THERMAL_SLOWDOWN)
    assert kinds(actions) == [K.THROTTLE]
    assert "software thermal slowdown" in actions[0].reason
    assert feed(70, 70, 70, reasons=SW_THERMAL_SLOWDOWN) == []  # not cool while it is set


def test_stop_after_thermal_samples_readings_at_max() -> None:
    feed = throttled()
    actions = feed(83, 83)  # while the stop is debounced, the duty drops to the floor
    assert [(a.kind, a.duty) for a in actions] == [(K.THROTTLE, S.duty_floor)]
    assert kinds(feed(83)) == [K.STOP]
    assert feed.state is ThermalState.COOLING and not feed.ladder.may_run


def test_stop_straight_from_normal() -> None:
    feed = Feed()
    assert kinds(feed(84, 84, 84)) == [K.STOP]  # the stop wins over the throttle


@pytest.mark.parametrize(("reasons", "margin", "why"), [
    (HW_THERMAL_SLOWDOWN, None, "hardware thermal slowdown"),
    (HW_SLOWDOWN, None, "hardware slowdown"),
    (HW_SLOWDOWN | HW_THERMAL_SLOWDOWN | HW_POWER_BRAKE_SLOWDOWN, None,
     "hardware thermal slowdown"),
    (0, 0.0, "no thermal margin left"),
    (None, -3.0, "no thermal margin left"),
])
def test_stop_on_hardware_signals_at_any_temperature(reasons: int | None,
                                                     margin: float | None, why: str) -> None:
    feed = Feed()
    actions = feed(70, 70, 70, reasons=reasons, margin=margin)
    assert kinds(actions) == [K.STOP]
    assert why in actions[0].reason


def test_hardware_bits_without_a_temperature_still_count() -> None:
    feed = Feed()
    assert kinds(feed(None, None, None, reasons=HW_THERMAL_SLOWDOWN)) == [K.STOP]


def test_power_brake_alone_is_not_a_thermal_matter() -> None:
    feed = Feed()
    assert feed(70, 70, 70, 70, reasons=HW_SLOWDOWN | HW_POWER_BRAKE_SLOWDOWN) == []


@pytest.mark.parametrize("make", [Feed, throttled, cooling])
def test_emergency_after_one_reading_from_any_state(make: object) -> None:
    feed = make()  # type: ignore[operator]
    actions = feed(85)
    assert kinds(actions) == [K.KILL_NOW]
    assert feed.state is ThermalState.EMERGENCY
    assert feed(86, 90, 85) == []  # no repeated kill


# De-escalation ---------------------------------------------------------------------------


def test_unthrottle_after_thermal_samples_cool_readings() -> None:
    feed = throttled()
    assert feed(79, 76) == []  # not cool
    eased = feed(75, 74)  # cool; 81 has left the window, so the throttle eases first
    assert [(a.kind, a.duty) for a in eased] == [(K.THROTTLE, 0.9)]
    actions = feed(75)
    assert kinds(actions) == [K.UNTHROTTLE] and actions[0].duty == 1.0
    assert feed.state is ThermalState.NORMAL and feed.ladder.duty == 1.0


def test_resume_after_dwell_at_or_below_target() -> None:
    feed = cooling()
    assert feed(*[75.0] * 60) == []  # cool from the first: 59 s dwelt at the 60th
    actions = feed(75)
    assert kinds(actions) == [K.RESUME]
    assert feed.state is ThermalState.NORMAL and feed.ladder.may_run


def test_a_warm_reading_restarts_the_dwell() -> None:
    feed = cooling()
    feed(*[70.0] * 50)
    assert feed(76) == []
    assert feed(*[70.0] * 60) == []
    assert kinds(feed(70)) == [K.RESUME]


def test_missing_readings_neither_break_nor_make_the_dwell() -> None:
    feed = cooling()
    feed(70)
    feed(*[None] * 30)
    assert feed(*[70.0] * 29) == []
    assert kinds(feed(70)) == [K.RESUME]  # 60 s since the first cool reading


def test_emergency_resumes_after_the_same_dwell() -> None:
    feed = Feed()
    feed(88)
    assert feed(*[74.0] * 60) == []
    assert kinds(feed(74)) == [K.RESUME]


# Duty ------------------------------------------------------------------------------------


def test_duty_falls_as_the_temperature_rises() -> None:
    feed = Feed()
    duties = [a.duty for a in feed(81, 81, 81, 81.5, 82, 82.5, 82.9)]
    assert duties == [0.75, 0.62, 0.5, 0.38, 0.27]


def test_duty_rises_only_after_the_heat_left_the_window() -> None:
    feed = Feed()
    feed(82, 82, 82)
    assert feed.ladder.duty == 0.5
    assert feed(80.5, 80.5) == []  # 82 is still among the last 3 readings
    assert [a.duty for a in feed(80.5)] == [0.88]


def test_small_duty_changes_are_not_sent() -> None:
    feed = Feed()
    feed(81, 81, 81)  # 0.75
    assert feed(81.2, 81.3, 81.1) == []  # wanted 0.70, 0.68: less than a step


# No flapping: a ±1 °C sawtooth around each threshold --------------------------------------


def sawtooth(center: float, n: int = 600) -> list[float]:
    return [center + (1.0 if i % 2 else -1.0) for i in range(n)]


def test_sawtooth_at_the_throttle_threshold_from_normal() -> None:
    feed = Feed()
    assert feed(*sawtooth(80)) == []  # 79, 81, 79 …: never three in a row


def test_sawtooth_at_the_throttle_threshold_while_throttled() -> None:
    feed = throttled()
    assert feed(*sawtooth(80)) == []  # stays throttled at one duty, never unthrottles
    assert feed.state is ThermalState.THROTTLED


def test_sawtooth_at_the_target_while_throttled() -> None:
    feed = throttled()
    actions = feed(*sawtooth(75))
    assert kinds(actions) == [K.THROTTLE]  # eases once to the mildest duty, then nothing
    assert feed.state is ThermalState.THROTTLED


def test_sawtooth_at_the_target_while_cooling() -> None:
    feed = cooling()
    assert feed(*sawtooth(75)) == []  # never a full dwell at or below target


def test_sawtooth_at_max_while_throttled() -> None:
    feed = throttled()
    assert [a.duty for a in feed(82, 84)] == [0.5, S.duty_floor]  # down, never back up
    assert feed(*sawtooth(83)) == []  # no stop, no chatter
    assert feed.state is ThermalState.THROTTLED


def test_sawtooth_at_max_from_normal() -> None:
    feed = Feed()
    assert kinds(feed(*sawtooth(83))) == [K.THROTTLE]  # above throttle every time


def test_sawtooth_at_emergency_kills_once() -> None:
    feed = throttled()
    assert kinds(feed(84, 86)) == [K.THROTTLE, K.KILL_NOW]
    assert feed(*sawtooth(85)) == []


def test_sawtooth_of_readings_and_gaps_does_not_flap() -> None:
    feed = throttled()
    assert feed(*[r for t in sawtooth(80, 300) for r in (t, None)]) == []


def test_power_brake_does_not_hold_back_unthrottle_or_resume() -> None:
    feed = throttled()
    brake = HW_SLOWDOWN | HW_POWER_BRAKE_SLOWDOWN
    assert kinds(feed(70, 70, 70, reasons=brake)) == [K.UNTHROTTLE]
    feed = cooling()
    assert kinds(feed(*[70.0] * 61, reasons=brake)) == [K.RESUME]
