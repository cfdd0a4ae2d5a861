"""Watchdog: liveness, start-up, adaptive stall deadline, extend, pause (no clocks, no sleeps)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nkat.supervisor.policies.kill_sequence import KillReason
from nkat.supervisor.policies.watchdog import (
    BATCH_WINDOW,
    ProgressPhase,
    VerdictKind,
    Watchdog,
    WatchdogSettings,
)

S = WatchdogSettings()  # heartbeat 10, stall 30..600, factor 10, startup 120


def running(batch_seconds: float | None = 1.0, at: float = 5.0) -> Watchdog:
    """A watchdog spawned at 0 whose worker made its first progress at ``at``."""
    dog = Watchdog(S, 0.0)
    dog.on_beat(at - 1, 0, "startup")
    dog.on_beat(at, 1, "compute", batch_seconds)
    return dog


def test_defaults_are_the_documented_ones() -> None:
    assert (S.heartbeat_timeout, S.stall_timeout_min, S.stall_timeout_max, S.stall_factor,
            S.startup_timeout) == (10.0, 30.0, 600.0, 10.0, 120.0)


def test_settings_from_flat_config_by_name() -> None:
    got = WatchdogSettings.from_config({"heartbeat_timeout": 3.0, "stall_factor": 4.0,
                                        "max_temperature": 83.0})
    assert got == WatchdogSettings(heartbeat_timeout=3.0, stall_factor=4.0)


@pytest.mark.parametrize("bad", [{"heartbeat_timeout": 0}, {"stall_factor": -1},
                                 {"stall_timeout_min": 700.0}])
def test_invalid_settings_name_the_key(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        WatchdogSettings(**bad)


# Liveness ------------------------------------------------------------------------------


def test_silence_after_a_message_is_unresponsive() -> None:
    dog = running()
    dog.on_message(20.0)
    assert dog.check(30.0) is None  # exactly at the deadline: not yet past it
    verdict = dog.check(30.5)
    assert verdict is not None
    assert verdict.kind is VerdictKind.UNRESPONSIVE
    assert verdict.kill_reason is KillReason.UNRESPONSIVE
    assert verdict.deadline == 30.0
    assert verdict.overdue_by == pytest.approx(0.5)
    assert verdict.details["since_message"] == pytest.approx(10.5)


def test_any_message_counts_for_liveness() -> None:
    dog = running(batch_seconds=None)  # stall deadline 600 s: only liveness matters here
    for t in range(6, 500, 9):
        dog.on_message(float(t))  # ckpt, log …: no beats at all
        assert dog.check(t + 8.9) is None


def test_unresponsive_wins_over_stalled() -> None:
    dog = running()
    verdict = dog.check(100.0)  # both deadlines passed
    assert verdict is not None and verdict.kind is VerdictKind.UNRESPONSIVE


def test_silence_before_the_first_message_is_only_a_startup_matter() -> None:
    dog = Watchdog(S, 0.0)
    assert dog.check(119.0) is None  # long silent import / CUDA init is fine
    verdict = dog.check(121.0)
    assert verdict is not None and verdict.kind is VerdictKind.STARTUP_TIMEOUT
    assert verdict.details["messages_seen"] == 0


# Start-up ------------------------------------------------------------------------------


def test_startup_timeout_while_beating_without_progress() -> None:
    dog = Watchdog(S, 0.0)
    for t in range(1, 121):
        dog.on_beat(float(t), 0, "startup")
        assert dog.check(float(t)) is None
    dog.on_beat(121.0, 0, "startup")
    verdict = dog.check(121.0)
    assert verdict is not None and verdict.kind is VerdictKind.STARTUP_TIMEOUT
    assert verdict.kill_reason is KillReason.STARTUP_TIMEOUT
    assert verdict.deadline == 120.0


def test_first_progress_ends_startup_and_starts_the_stall_clock() -> None:
    dog = Watchdog(S, 0.0)
    dog.on_beat(100.0, 1, "compute", 2.0)
    d = dog.deadlines()
    assert d.phase is ProgressPhase.STALL
    assert d.progress == 100.0 + 30.0  # 10 x 2 s, raised to the floor


def test_progress_means_above_the_highest_seen() -> None:
    dog = running(at=5.0)
    dog.on_beat(6.0, 1, "compute", 1.0)
    dog.on_beat(7.0, 0, "compute", 1.0)  # a counter going back is not progress
    assert dog.deadlines().progress == 35.0


# Adaptive stall deadline ---------------------------------------------------------------


@pytest.mark.parametrize(("batch", "expected"), [
    (0.01, 30.0),   # floor
    (2.0, 30.0),    # 20 s raised to the floor
    (10.0, 100.0),  # 10 x p99
    (59.0, 590.0),
    (100.0, 600.0),  # cap
    (None, 600.0),  # no batch time known yet: the cap
])
def test_stall_deadline_is_clamped_factor_times_p99(batch: float | None,
                                                    expected: float) -> None:
    dog = running(batch_seconds=batch)  # progress at 5
    assert dog.stall_seconds() == expected
    dog.on_message(5.0 + expected)  # alive, so only the stall deadline can pass
    assert dog.check(5.0 + expected) is None
    verdict = dog.check(5.0 + expected + 0.1)
    assert verdict is not None and verdict.kind is VerdictKind.STALLED
    assert verdict.details["stall_seconds"] == expected


def test_stalled_even_while_beats_arrive() -> None:
    dog = running(batch_seconds=1.0)  # first progress at 5, deadline 35
    for t in range(6, 36):
        dog.on_beat(float(t), 1, "compute", 1.0)
        assert dog.check(float(t)) is None
    dog.on_beat(35.5, 1, "compute", 1.0)
    verdict = dog.check(35.5)
    assert verdict is not None and verdict.kind is VerdictKind.STALLED
    assert verdict.kill_reason is KillReason.STALLED
    assert verdict.details["progress_seq"] == 1
    assert verdict.details["since_progress"] == pytest.approx(30.5)


def test_p99_ignores_a_single_outlier_in_a_hundred() -> None:
    dog = running(batch_seconds=1.0, at=1.0)
    for seq in range(2, 100):
        dog.on_beat(float(seq), seq, "compute", 1.0)
    dog.on_beat(100.0, 100, "compute", 50.0)  # 1 outlier among 100 samples
    assert dog.p99_batch_seconds() == 1.0
    dog.on_beat(101.0, 101, "compute", 50.0)  # 2 of 101: now the p99
    assert dog.p99_batch_seconds() == 50.0
    assert dog.stall_seconds() == 500.0


def test_batch_window_is_bounded() -> None:
    dog = running(batch_seconds=40.0, at=1.0)  # 400 s deadline
    assert dog.stall_seconds() == 400.0
    for seq in range(2, BATCH_WINDOW + 2):
        dog.on_beat(float(seq), seq, "compute", 1.0)
    assert dog.stall_seconds() == 30.0  # the slow batch has left the window


def test_one_sample_per_advance_not_per_beat() -> None:
    dog = running(batch_seconds=1.0, at=1.0)
    for t in range(2, 600):
        dog.on_beat(float(t) / 100 + 2, 1, "compute", 90.0)  # no progress: not a sample
    assert dog.stall_seconds() == 30.0


def test_slow_but_progressing_worker_is_never_flagged() -> None:
    dog = Watchdog(S, 0.0)
    dog.on_extend(0.5, 500.0)  # the first batch is known to be long: past startup_timeout
    t, seq = 0.0, 0
    while t < 6 * 3600:  # six hours of 500 s batches, beats every second
        t += 1.0
        if t % 500 == 0:
            seq += 1
        dog.on_beat(t, seq, "compute", 500.0 if seq else None)
        assert dog.check(t) is None, t


# Extend --------------------------------------------------------------------------------


def test_extend_lengthens_the_stall_deadline() -> None:
    dog = running(batch_seconds=1.0)  # deadline 35
    dog.on_extend(30.0, 60.0)
    assert dog.deadlines().progress == 90.0
    dog.on_message(85.0)
    assert dog.check(90.0) is None
    verdict = dog.check(90.5)
    assert verdict is not None and verdict.kind is VerdictKind.STALLED


def test_a_second_extend_does_not_stack_beyond_its_own_seconds() -> None:
    dog = running(batch_seconds=1.0)
    dog.on_extend(30.0, 60.0)  # until 90
    dog.on_extend(40.0, 30.0)  # until 70: earlier, changes nothing
    assert dog.deadlines().progress == 90.0
    dog.on_extend(50.0, 60.0)  # until 110: its own arrival + seconds, not 90 + 60
    assert dog.deadlines().progress == 110.0


def test_extend_never_shortens_and_is_capped() -> None:
    dog = running(batch_seconds=1.0)
    dog.on_extend(6.0, 1.0)
    assert dog.deadlines().progress == 35.0
    dog.on_extend(6.0, 1e9)
    assert dog.deadlines().progress == 6.0 + S.stall_timeout_max


def test_progress_clears_the_extension() -> None:
    dog = running(batch_seconds=1.0)
    dog.on_extend(10.0, 300.0)
    dog.on_beat(20.0, 2, "compute", 1.0)
    assert dog.deadlines().progress == 50.0


def test_extend_lengthens_startup_too_but_not_liveness() -> None:
    dog = Watchdog(S, 0.0)
    dog.on_extend(100.0, 200.0)
    assert dog.deadlines().progress == 300.0
    assert dog.deadlines().liveness == 110.0
    verdict = dog.check(111.0)
    assert verdict is not None and verdict.kind is VerdictKind.UNRESPONSIVE


# Pause ---------------------------------------------------------------------------------


def test_paused_worker_is_not_stalled_and_the_clock_restarts_on_resume() -> None:
    dog = running(batch_seconds=1.0)
    for t in range(6, 2000):
        dog.on_beat(float(t), 1, "paused")
        assert dog.check(float(t)) is None
    assert dog.deadlines().phase is ProgressPhase.PAUSED
    assert dog.deadlines().progress is None
    dog.on_beat(2000.0, 1, "compute", None)
    assert dog.deadlines().progress == 2030.0
    dog.on_message(2029.0)
    assert dog.check(2030.0) is None
    assert dog.check(2030.5) is not None


def test_paused_but_silent_is_unresponsive() -> None:
    dog = running()
    dog.on_beat(6.0, 1, "paused")
    verdict = dog.check(16.5)
    assert verdict is not None and verdict.kind is VerdictKind.UNRESPONSIVE


def test_deadlines_for_status() -> None:
    dog = Watchdog(S, 0.0)
    d = dog.deadlines()
    assert (d.liveness, d.progress, d.phase, d.earliest) == (None, 120.0,
                                                              ProgressPhase.STARTUP, 120.0)
    dog.on_beat(3.0, 0, "startup")
    assert dog.deadlines().earliest == 13.0


# Property ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    intervals=st.lists(st.floats(0.01, S.stall_timeout_min), min_size=1, max_size=40),
    fillers=st.lists(st.integers(0, 6), min_size=40, max_size=40),
    batches=st.lists(st.one_of(st.none(), st.floats(1e-4, 1e4)), min_size=40, max_size=40),
    stages=st.lists(st.sampled_from(["compute", "checkpoint", "paused", "finalize"]),
                    min_size=40, max_size=40),
)
def test_progress_at_least_every_stall_timeout_min_is_never_stalled(
    intervals: list[float], fillers: list[int], batches: list[float | None],
    stages: list[str],
) -> None:
    """Whatever the batch times, pauses and beats in between, a worker whose progress_seq
    advances at least every stall_timeout_min seconds is never flagged stalled."""
    dog = Watchdog(S, 0.0)
    t, seq = 0.0, 0
    for i, gap in enumerate(intervals):
        # Non-advancing beats inside the gap, then the advancing one at its end.
        for k in range(1, fillers[i] + 1):
            at = t + gap * k / (fillers[i] + 1)
            dog.on_beat(at, seq, stages[i], batches[i])
            verdict = dog.check(at)
            assert verdict is None or verdict.kind is not VerdictKind.STALLED
        verdict = dog.check(t + gap)  # just before the advancing beat lands
        assert verdict is None or verdict.kind is VerdictKind.UNRESPONSIVE
        t += gap
        seq += 1
        dog.on_beat(t, seq, "compute", batches[i])
        verdict = dog.check(t)
        assert verdict is None or verdict.kind is VerdictKind.UNRESPONSIVE
