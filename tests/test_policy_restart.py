"""Restart policy: exit classes, backoff with jitter, stability reset, crash loop, poison."""

from __future__ import annotations

import random
import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nkat.protocol import exitcodes
from nkat.supervisor.policies.kill_sequence import KillReason
from nkat.supervisor.policies.lifecycle import WorkerState
from nkat.supervisor.policies.restart_policy import (
    ExitClass,
    ExitInfo,
    RestartAction,
    RestartPolicy,
    RestartSettings,
    backoff_delay,
    classify_exit,
)

SIGKILLED = -signal.SIGKILL
CRASH = ExitInfo(returncode=-signal.SIGSEGV)


def policy(**overrides: float) -> RestartPolicy:
    overrides.setdefault("restart_delay", 1.0)  # the figures below assume a 1 s first delay
    return RestartPolicy(RestartSettings(**overrides), random.Random(7))  # type: ignore[arg-type]


def test_defaults_and_from_config() -> None:
    s = RestartSettings()
    assert (s.restart_delay, s.restart_delay_max, s.max_restarts, s.restart_window,
            s.stable_after, s.poison_after) == (0.25, 60.0, 5, 600.0, 60.0, 3)
    assert RestartSettings.from_config({"max_restarts": 2, "poison_after": 4,
                                        "heartbeat_timeout": 1.0}) == \
        RestartSettings(max_restarts=2, poison_after=4)
    with pytest.raises(ValueError, match="restart_delay"):
        RestartSettings(restart_delay=90.0)


# Exit classes ----------------------------------------------------------------------------


@pytest.mark.parametrize(("info", "expected"), [
    (ExitInfo(exitcodes.DONE, completed=True), ExitClass.COMPLETED),
    (ExitInfo(SIGKILLED, KillReason.OPERATOR, completed=True), ExitClass.COMPLETED),
    (ExitInfo(exitcodes.DONE), ExitClass.CRASHED),  # exit 0 without a durable done
    (ExitInfo(exitcodes.STOPPED, KillReason.OPERATOR), ExitClass.STOPPED),
    (ExitInfo(SIGKILLED, KillReason.OPERATOR_NOW), ExitClass.STOPPED),
    (ExitInfo(SIGKILLED, KillReason.WAL_FAILED), ExitClass.STOPPED),
    (ExitInfo(exitcodes.STOPPED), ExitClass.CRASHED),  # a stop nobody asked for
    (ExitInfo(exitcodes.STOPPED, KillReason.THERMAL_STOP), ExitClass.THERMAL),
    (ExitInfo(SIGKILLED, KillReason.THERMAL_EMERGENCY), ExitClass.THERMAL),
    (ExitInfo(SIGKILLED, KillReason.STALLED), ExitClass.HUNG),
    (ExitInfo(SIGKILLED, KillReason.UNRESPONSIVE), ExitClass.HUNG),
    (ExitInfo(-signal.SIGTERM, KillReason.STARTUP_TIMEOUT), ExitClass.HUNG),
    (ExitInfo(exitcodes.STOPPED, KillReason.LEAK), ExitClass.PLANNED),
    (ExitInfo(exitcodes.GPU_STICKY, KillReason.XID_RESTART), ExitClass.CRASHED),
    (ExitInfo(SIGKILLED, KillReason.GPU_RESET), ExitClass.GPU_RESET),
    (ExitInfo(exitcodes.FATAL, KillReason.GPU_RESET), ExitClass.GPU_RESET),
    (ExitInfo(exitcodes.FATAL), ExitClass.FATAL),
    (ExitInfo(exitcodes.FATAL, KillReason.OPERATOR), ExitClass.FATAL),
    (ExitInfo(SIGKILLED, KillReason.STALLED, fatal=True, fail_kind="params"), ExitClass.FATAL),
    (ExitInfo(exitcodes.OOM), ExitClass.OOM),
    (ExitInfo(-signal.SIGTERM, fail_kind="oom"), ExitClass.OOM),
    (ExitInfo(exitcodes.OOM, KillReason.LINGERING), ExitClass.OOM),  # judged by the exit
    (ExitInfo(exitcodes.GPU_STICKY), ExitClass.CRASHED),
    (ExitInfo(exitcodes.ORPHANED), ExitClass.CRASHED),
    (ExitInfo(exitcodes.STARTUP), ExitClass.CRASHED),
    (ExitInfo(-signal.SIGSEGV), ExitClass.CRASHED),
    (ExitInfo(1), ExitClass.CRASHED),
])
def test_exit_classification(info: ExitInfo, expected: ExitClass) -> None:
    assert classify_exit(info) is expected


def test_exit_description() -> None:
    assert ExitInfo(-signal.SIGKILL).describe() == "signal SIGKILL"
    assert ExitInfo(exitcodes.OOM).describe() == "exit 12 (oom)"
    assert ExitInfo(3).describe() == "exit 3"


@pytest.mark.parametrize(("info", "action", "state"), [
    (ExitInfo(exitcodes.DONE, completed=True), RestartAction.COMPLETE, WorkerState.COMPLETED),
    (ExitInfo(exitcodes.STOPPED, KillReason.OPERATOR), RestartAction.STOP,
     WorkerState.STOPPED),
    (ExitInfo(exitcodes.FATAL, fail_kind="params"), RestartAction.GIVE_UP,
     WorkerState.GAVE_UP),
    (ExitInfo(SIGKILLED, KillReason.GPU_RESET), RestartAction.GIVE_UP, WorkerState.GAVE_UP),
    (ExitInfo(SIGKILLED, KillReason.THERMAL_EMERGENCY), RestartAction.WAIT_COOLDOWN,
     WorkerState.COOLING),
    (ExitInfo(exitcodes.STOPPED, KillReason.LEAK), RestartAction.RESTART,
     WorkerState.BACKOFF),
    (CRASH, RestartAction.RESTART, WorkerState.BACKOFF),
])
def test_decision_per_class(info: ExitInfo, action: RestartAction, state: WorkerState) -> None:
    p = policy()
    p.on_spawn(0.0, 0)
    decision = p.decide(10.0, info)
    assert decision.action is action
    assert decision.next_state is state
    assert decision.exit_class is classify_exit(info)


def test_fatal_and_gpu_reset_reasons_say_why() -> None:
    p = policy()
    p.on_spawn(0.0, 0)
    assert p.decide(1.0, ExitInfo(exitcodes.FATAL, fatal=True, fail_kind="params")).reason \
        == "fatal job error (params)"
    p.on_spawn(2.0, 0)
    reason = p.decide(3.0, ExitInfo(SIGKILLED, KillReason.GPU_RESET)).reason
    assert "reset" in reason and "reboot" in reason


def test_decide_needs_a_spawn() -> None:
    p = policy()
    with pytest.raises(RuntimeError):
        p.decide(0.0, CRASH)
    p.on_spawn(0.0, 0)
    p.decide(1.0, CRASH)
    with pytest.raises(RuntimeError):
        p.decide(2.0, CRASH)  # the same exit twice


# Backoff ---------------------------------------------------------------------------------


@given(attempt=st.integers(0, 200), seed=st.integers(0, 2**32),
       first=st.floats(0.0, 10.0), cap_over=st.floats(0.0, 100.0))
def test_backoff_stays_within_its_jitter_bounds(attempt: int, seed: int, first: float,
                                                cap_over: float) -> None:
    s = RestartSettings(restart_delay=first, restart_delay_max=first + cap_over)
    base = min(first * 2.0 ** min(attempt, 64), s.restart_delay_max)
    delay = backoff_delay(s, attempt, random.Random(seed))
    assert max(first, base / 2) <= delay <= max(first, base)
    assert first <= delay <= s.restart_delay_max


def test_backoff_grows_with_consecutive_crashes_then_caps() -> None:
    p = policy(max_restarts=100)
    delays = []
    for i in range(10):
        p.on_spawn(i * 100.0, 0)
        decision = p.decide(i * 100.0 + 1, CRASH)
        assert decision.action is RestartAction.RESTART
        delays.append(decision.delay)
    bases = [min(2.0**k, 60.0) for k in range(10)]
    for delay, base in zip(delays, bases, strict=True):
        assert max(1.0, base / 2) <= delay <= base
    assert delays[-1] >= 30.0  # capped at 60, jittered down at most by half


def test_jitter_comes_from_the_injected_rng() -> None:
    def run(seed: int) -> list[float]:
        p = RestartPolicy(RestartSettings(max_restarts=100), random.Random(seed))
        out = []
        for i in range(6):
            p.on_spawn(float(i), 0)
            out.append(p.decide(float(i), CRASH).delay)
        return out
    assert run(1) == run(1)
    assert run(1) != run(2)


def crash_after(p: RestartPolicy, start: float, up: float, resumed: int,
                durable: list[int]) -> float:
    p.on_spawn(start, resumed)
    for seq in durable:
        p.on_durable_checkpoint(seq)
    decision = p.decide(start + up, CRASH)
    assert decision.action is RestartAction.RESTART, decision.reason
    return decision.delay


def test_backoff_resets_only_after_durable_progress_and_stable_uptime() -> None:
    p = policy(max_restarts=100, poison_after=100)
    for i in range(4):  # grow the backoff: base 1, 2, 4, 8
        crash_after(p, i * 10.0, 1.0, 5, [])
    # Up long enough but no durable progress (a resend of the resumed one): no reset.
    assert crash_after(p, 100.0, 120.0, 5, [5]) >= 8.0
    # Durable progress but not up stable_after: no reset.
    assert crash_after(p, 300.0, 30.0, 5, [6]) >= 16.0
    # Both: the next crash starts over at restart_delay.
    assert crash_after(p, 400.0, 61.0, 6, [7]) == 1.0


def test_a_thermal_stop_after_stable_progress_also_resets_backoff() -> None:
    p = policy(max_restarts=100, poison_after=100)
    for i in range(4):
        crash_after(p, i * 10.0, 1.0, 5, [])
    p.on_spawn(100.0, 5)
    p.on_durable_checkpoint(6)
    assert p.decide(200.0, ExitInfo(exitcodes.STOPPED, KillReason.THERMAL_STOP)).action \
        is RestartAction.WAIT_COOLDOWN
    assert crash_after(p, 300.0, 1.0, 6, []) == 1.0


# Crash loop ------------------------------------------------------------------------------


def test_more_than_max_restarts_in_the_window_gives_up_resumable() -> None:
    p = policy()  # 5 in 600 s
    for i in range(5):
        p.on_spawn(i * 10.0, 0)
        assert p.decide(i * 10.0 + 1, CRASH).action is RestartAction.RESTART
    p.on_spawn(60.0, 0)
    decision = p.decide(61.0, CRASH)
    assert decision.action is RestartAction.GIVE_UP
    assert "crash loop" in decision.reason and "6 crashes" in decision.reason


def test_crashes_older_than_the_window_are_forgotten() -> None:
    p = policy()
    for i in range(20):  # one crash every 150 s: at most 4 in any 600 s
        p.on_spawn(i * 150.0, 0)
        assert p.decide(i * 150.0 + 1, CRASH).action is RestartAction.RESTART


def test_durable_progress_clears_the_crash_count() -> None:
    p = policy()
    seq = 0
    for i in range(30):  # crashes fast, but every worker gets one checkpoint further
        p.on_spawn(i * 2.0, seq)
        seq += 1
        p.on_durable_checkpoint(seq)
        assert p.decide(i * 2.0 + 1, CRASH).action is RestartAction.RESTART


@pytest.mark.parametrize("info", [
    ExitInfo(exitcodes.STOPPED, KillReason.THERMAL_STOP),
    ExitInfo(SIGKILLED, KillReason.THERMAL_EMERGENCY),
    ExitInfo(exitcodes.STOPPED, KillReason.LEAK),
])
def test_thermal_and_planned_exits_are_not_crashes(info: ExitInfo) -> None:
    p = policy()
    for i in range(50):  # never progressing, far beyond max_restarts and poison_after
        p.on_spawn(float(i), 3)
        assert p.decide(i + 0.5, info).action is not RestartAction.GIVE_UP
    assert crash_after(p, 100.0, 1.0, 3, []) == 1.0  # backoff untouched


def test_planned_restart_has_no_delay() -> None:
    p = policy()
    p.on_spawn(0.0, 2)
    assert p.decide(500.0, ExitInfo(exitcodes.STOPPED, KillReason.LEAK)).delay == 0.0


# Poison checkpoint -----------------------------------------------------------------------


def test_dying_repeatedly_before_passing_a_checkpoint_is_poison() -> None:
    p = policy(max_restarts=100)
    for i in range(2):
        p.on_spawn(i * 100.0, 7)
        assert p.decide(i * 100.0 + 5, CRASH).action is RestartAction.RESTART
    p.on_spawn(300.0, 7)
    decision = p.decide(305.0, ExitInfo(SIGKILLED, KillReason.STALLED))
    assert decision.action is RestartAction.GIVE_UP
    assert decision.reason.startswith("poison checkpoint: ckpt_seq 7")
    assert decision.exit_class is ExitClass.HUNG


def test_passing_the_checkpoint_clears_the_suspicion() -> None:
    p = policy(max_restarts=100)
    crash_after(p, 0.0, 5.0, 7, [])
    crash_after(p, 100.0, 5.0, 7, [])
    crash_after(p, 200.0, 5.0, 7, [8])  # got past 7: durable 8
    crash_after(p, 300.0, 5.0, 8, [])
    p.on_spawn(400.0, 8)
    assert p.decide(405.0, CRASH).action is RestartAction.RESTART  # 2 deaths at 8


def test_poison_counts_ignore_thermal_stops_in_between() -> None:
    p = policy(max_restarts=100)
    crash_after(p, 0.0, 5.0, 7, [])
    p.on_spawn(100.0, 7)
    p.decide(105.0, ExitInfo(exitcodes.STOPPED, KillReason.THERMAL_STOP))
    crash_after(p, 200.0, 5.0, 7, [])
    p.on_spawn(300.0, 7)
    assert p.decide(305.0, CRASH).action is RestartAction.GIVE_UP


def test_a_fresh_start_is_never_poison() -> None:
    p = policy(max_restarts=100)
    for i in range(10):
        p.on_spawn(i * 100.0, 0)
        assert p.decide(i * 100.0 + 1, CRASH).action is RestartAction.RESTART


def test_poison_after_is_configurable() -> None:
    p = policy(max_restarts=100, poison_after=1)
    p.on_spawn(0.0, 4)
    assert "ckpt_seq 4" in p.decide(1.0, CRASH).reason
