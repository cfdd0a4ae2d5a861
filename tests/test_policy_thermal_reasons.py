"""Thermal ladder reasons: each action names the rule that fired and the readings that
made it fire, never just the last reading (a throttle once said "83.17 °C at or above max
83 °C for 3 readings" when one reading of three was at max)."""

from __future__ import annotations

import pytest

from nkat.supervisor.gpu.sensor import Thresholds
from nkat.supervisor.policies.thermal import (
    HW_THERMAL_SLOWDOWN,
    SW_THERMAL_SLOWDOWN,
    ThermalAction,
    ThermalActionKind,
    ThermalLadder,
)
from tests.thermal_feed import Feed, S

K = ThermalActionKind


def one(actions: list[ThermalAction], kind: ThermalActionKind) -> ThermalAction:
    assert [a.kind for a in actions] == [kind], actions
    return actions[0]


# Throttle ----------------------------------------------------------------------------------


def test_throttle_into_the_max_names_the_three_readings_and_the_floor() -> None:
    # The heat wave's readings: only the last is at max, and it sets the duty to the floor.
    action = one(Feed()(80.5, 81.83, 83.17), K.THROTTLE)
    assert action.duty == 0.25
    assert action.reason == (
        "3 readings at or above the throttle threshold 80 °C (80.5, 81.83, 83.17 °C): "
        "duty 0.25, the floor, for 83.17 °C at or above the max temperature 83 °C")


def test_throttle_in_the_band_names_the_hottest_reading() -> None:
    action = one(Feed()(82, 81, 81), K.THROTTLE)
    assert action.duty == 0.5
    assert action.reason == (
        "3 readings at or above the throttle threshold 80 °C (82, 81, 81 °C): duty 0.5, "
        "for 82 °C, the hottest of the last 3 readings, in the band 80–83 °C")


def test_throttle_on_the_software_slowdown_bit_alone() -> None:
    action = one(Feed()(*[(70.0, SW_THERMAL_SLOWDOWN)] * 3), K.THROTTLE)
    assert action.reason == (
        "software thermal slowdown in 3 readings (70, 70, 70 °C): duty 0.9, "
        "the mildest: none of the last 3 readings reached 80 °C")


def test_throttle_on_mixed_causes_names_each_readings_cause() -> None:
    action = one(Feed()((79.0, SW_THERMAL_SLOWDOWN), 81, (None, HW_THERMAL_SLOWDOWN)),
                 K.THROTTLE)
    assert action.reason == (
        "3 readings at or above the throttle threshold 80 °C, or with a thermal signal "
        "(software thermal slowdown at 79 °C, 81 °C, hardware thermal slowdown): duty 0.25, "
        "the floor, for hardware thermal slowdown")


def test_missing_readings_are_not_among_those_named() -> None:
    action = one(Feed()(81, None, 82, None, 81), K.THROTTLE)
    assert "(81, 82, 81 °C)" in action.reason


def test_duty_changes_say_which_reading_moved_them() -> None:
    feed = Feed()
    feed(81, 81, 81)  # 0.75
    hotter = one(feed(82), K.THROTTLE)
    assert hotter.reason == ("hotter: duty 0.75 → 0.5, for 82 °C, the hottest of the last 3 "
                             "readings, in the band 80–83 °C")
    assert feed(76, 76) == []  # 82 is still among the last 3
    eased = one(feed(76), K.THROTTLE)
    assert eased.reason == ("cooler: duty 0.5 → 0.9, the mildest: none of the last 3 "
                            "readings reached 80 °C")


def test_a_cooler_band_reading_eases_the_duty_and_is_named() -> None:
    feed = Feed()
    feed(82, 82, 82)  # 0.5
    assert feed(80.5, 80.5) == []
    cooler = one(feed(80.5), K.THROTTLE)
    assert cooler.reason == ("cooler: duty 0.5 → 0.88, for 80.5 °C, the hottest of the last 3 "
                             "readings, in the band 80–83 °C")


def test_unthrottle_names_the_cool_readings() -> None:
    feed = Feed()
    feed(81, 81, 81, 76, 74, 75)
    action = one(feed(73), K.UNTHROTTLE)
    assert action.duty == 1.0
    assert action.reason == "3 readings at or below the target 75 °C (74, 75, 73 °C): duty 1"


# Stop, kill, resume ------------------------------------------------------------------------


def test_stop_names_the_readings_at_max() -> None:
    feed = Feed()
    feed(81, 81, 81)
    actions = feed(83.5, 84, 83)  # the duty drops to the floor first
    assert [a.kind for a in actions] == [K.THROTTLE, K.STOP]
    assert actions[-1].reason == ("3 readings at or above the max temperature 83 °C "
                                  "(83.5, 84, 83 °C)")


def test_stop_on_mixed_causes_names_each() -> None:
    feed = Feed()
    actions = feed((79.0, HW_THERMAL_SLOWDOWN), 84, 83.5)
    assert actions[-1].kind is K.STOP
    assert actions[-1].reason == (
        "3 readings at or above the max temperature 83 °C, or with a thermal signal "
        "(hardware thermal slowdown at 79 °C, 84 °C, 83.5 °C)")


@pytest.mark.parametrize(("temps", "margin", "bits", "reason"), [
    ((None, None, None), None, HW_THERMAL_SLOWDOWN, "hardware thermal slowdown in 3 readings"),
    ((70.0, 71.0, 70.0), -2.0, None, "no thermal margin left in 3 readings (70, 71, 70 °C)"),
])
def test_stop_on_one_signal(temps: tuple[float | None, ...], margin: float | None,
                            bits: int | None, reason: str) -> None:
    readings = [t if bits is None else (t, bits) for t in temps]
    action = one(Feed()(*readings, margin=margin), K.STOP)
    assert action.reason == reason


def test_kill_now_says_one_reading_is_enough() -> None:
    action = one(Feed()(86), K.KILL_NOW)
    assert action.reason == ("86 °C at or above the emergency temperature 85 °C: "
                             "one reading is enough")


def test_resume_counts_the_dwell_readings_and_names_the_hottest() -> None:
    feed = Feed()
    feed(84, 84, 84)
    assert feed(*[70.0] * 30, 74.5, *[71.0] * 29) == []
    action = one(feed(72), K.RESUME)
    assert action.reason == ("61 readings over 60 s, none above the target 75 °C "
                             "(hottest 74.5 °C, last 72 °C): the dwell of 60 s is over")


def test_reasons_name_the_limits_in_force_after_nvml_tightening() -> None:
    feed = Feed(ThermalLadder(S, Thresholds(slowdown=82.0)))  # max and throttle 80
    action = one(feed(80.5, 80.5, 80.5), K.STOP)
    assert action.reason == ("3 readings at or above the max temperature 80 °C "
                             "(80.5, 80.5, 80.5 °C)")


def test_every_duty_in_a_reason_is_the_duty_sent() -> None:
    feed = Feed()
    temps = [79, 80.2, 81, 81.6, 82.4, 82.9, 81, 80.1, 79, 76, 74, 74, 74, 80, 81, 83, 82]
    for action in feed(*temps):
        if action.kind in (K.THROTTLE, K.UNTHROTTLE):
            assert action.duty is not None
            assert (f"duty {action.duty:g}," in action.reason
                    or f"→ {action.duty:g}," in action.reason
                    or action.reason.endswith(f"duty {action.duty:g}")), action
