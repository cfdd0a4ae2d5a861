"""Kill sequence: cmd stop → dump → SIGTERM → SIGKILL → kill_failed, entry points, escalation."""

from __future__ import annotations

import pytest

from nkat.supervisor.policies.kill_sequence import (
    Action,
    KillReason,
    KillSequence,
    KillSettings,
    Step,
    first_step,
)

S = KillSettings()  # stop 10, term 5, dump 1, confirm 5


def drive(seq: KillSequence, times: list[float], alive: bool = True) -> list[Action]:
    return [seq.next_action(t, alive) for t in times]


def test_defaults_and_from_config() -> None:
    assert (S.stop_deadline, S.term_grace, S.dump_grace, S.kill_confirm) == (10, 5, 1, 5)
    assert KillSettings.from_config({"stop_deadline": 3.0, "term_grace": 2.0}) == \
        KillSettings(stop_deadline=3.0, term_grace=2.0)
    with pytest.raises(ValueError, match="term_grace"):
        KillSettings(term_grace=0)


def test_worker_that_ignores_everything_ends_in_kill_failed() -> None:
    seq = KillSequence(S, KillReason.OPERATOR)
    assert seq.deadline is None
    assert drive(seq, [0.0, 5.0, 9.9]) == [Action.SEND_STOP, Action.WAIT, Action.WAIT]
    assert seq.deadline == 10.0 and not seq.signalled
    assert drive(seq, [10.0, 10.5]) == [Action.SEND_DUMP, Action.WAIT]
    assert seq.signalled
    assert drive(seq, [11.0, 15.9, 16.0]) == [Action.SEND_SIGTERM, Action.WAIT,
                                              Action.SEND_SIGKILL]
    assert drive(seq, [20.9, 21.0]) == [Action.WAIT, Action.KILL_FAILED]
    assert seq.deadline is None
    assert drive(seq, [99.0], alive=False) == [Action.KILL_FAILED]  # final


def test_worker_that_obeys_cmd_stop_is_done_without_signals() -> None:
    seq = KillSequence(S, KillReason.THERMAL_STOP)
    assert seq.next_action(0.0, True) is Action.SEND_STOP
    assert seq.next_action(4.0, False) is Action.DONE
    assert seq.last_sent is Action.SEND_STOP and not seq.signalled
    assert seq.next_action(50.0, True) is Action.DONE  # final


def test_worker_already_gone_needs_nothing() -> None:
    seq = KillSequence(S, KillReason.STALLED)
    assert seq.next_action(0.0, False) is Action.DONE
    assert seq.last_sent is None


def test_unresponsive_skips_cmd_stop() -> None:
    seq = KillSequence(S, KillReason.UNRESPONSIVE)
    assert drive(seq, [0.0, 1.0, 6.0]) == [Action.SEND_DUMP, Action.SEND_SIGTERM,
                                          Action.SEND_SIGKILL]
    assert seq.next_action(7.0, False) is Action.DONE


def test_emergency_is_sigkill_at_once() -> None:
    seq = KillSequence(S, KillReason.THERMAL_EMERGENCY)
    assert seq.next_action(0.0, True) is Action.SEND_SIGKILL
    assert seq.next_action(4.0, True) is Action.WAIT
    assert seq.next_action(5.0, True) is Action.KILL_FAILED


@pytest.mark.parametrize(("reason", "step"), [
    (KillReason.OPERATOR, Step.STOP),
    (KillReason.THERMAL_STOP, Step.STOP),
    (KillReason.LEAK, Step.STOP),
    (KillReason.STALLED, Step.STOP),
    (KillReason.OPERATOR_NOW, Step.TERM),
    (KillReason.UNRESPONSIVE, Step.TERM),
    (KillReason.STARTUP_TIMEOUT, Step.TERM),
    (KillReason.XID_RESTART, Step.TERM),
    (KillReason.GPU_RESET, Step.TERM),
    (KillReason.WAL_FAILED, Step.TERM),
    (KillReason.THERMAL_EMERGENCY, Step.KILL),
    (KillReason.LINGERING, Step.KILL),
])
def test_first_step_of_every_reason(reason: KillReason, step: Step) -> None:
    assert first_step(reason) is step
    first = {Step.STOP: Action.SEND_STOP, Step.TERM: Action.SEND_DUMP,
             Step.KILL: Action.SEND_SIGKILL}[step]
    assert KillSequence(S, reason).next_action(0.0, True) is first


def test_escalation_cuts_the_stop_deadline_short() -> None:
    seq = KillSequence(S, KillReason.OPERATOR)
    seq.next_action(0.0, True)  # cmd stop, waiting until 10
    assert seq.escalate(KillReason.THERMAL_EMERGENCY)
    assert seq.deadline is None
    assert seq.next_action(2.0, True) is Action.SEND_SIGKILL
    assert seq.reason is KillReason.OPERATOR  # the exit is still classified as a stop


def test_operator_asking_twice_goes_to_signals_now() -> None:
    seq = KillSequence(S, KillReason.OPERATOR)
    seq.next_action(0.0, True)
    assert seq.escalate(KillReason.OPERATOR_NOW)
    assert drive(seq, [1.0, 2.0]) == [Action.SEND_DUMP, Action.SEND_SIGTERM]


def test_escalation_never_goes_back_or_repeats() -> None:
    seq = KillSequence(S, KillReason.UNRESPONSIVE)
    assert not seq.escalate(KillReason.OPERATOR)  # before the first action: same place
    assert not seq.escalate(KillReason.UNRESPONSIVE)
    seq.next_action(0.0, True)  # dump
    assert not seq.escalate(KillReason.OPERATOR)
    assert not seq.escalate(KillReason.STARTUP_TIMEOUT)
    assert seq.escalate(KillReason.THERMAL_EMERGENCY)
    seq.next_action(0.1, True)  # SIGKILL
    assert not seq.escalate(KillReason.THERMAL_EMERGENCY)
    assert seq.next_action(5.1, False) is Action.DONE
    assert not seq.escalate(KillReason.THERMAL_EMERGENCY)


def test_actions_compare_as_strings() -> None:
    # The shell and the JSON log use the plain values.
    assert Action.SEND_SIGKILL == "send_sigkill"
    assert f"{KillReason.STALLED}" == "stalled"
