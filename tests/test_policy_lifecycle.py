"""Worker lifecycle: the transition table and the invariants it must keep."""

from __future__ import annotations

import itertools

import pytest

from nkat.supervisor.policies.lifecycle import (
    TRANSITIONS,
    IllegalTransition,
    WorkerState,
    can_transition,
    check_transition,
)
from nkat.supervisor.policies.restart_policy import Decision, ExitClass, RestartAction

W = WorkerState
FINAL = {W.KILL_FAILED, W.COMPLETED, W.STOPPED, W.GAVE_UP}


def reachable(start: WorkerState) -> set[WorkerState]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_state_has_a_row() -> None:
    assert set(TRANSITIONS) == set(WorkerState)


def test_final_states_are_exactly_the_outcomes() -> None:
    assert {s for s in WorkerState if s.is_final} == FINAL


def test_every_state_is_reachable_from_idle_and_can_finish() -> None:
    assert reachable(W.IDLE) == set(WorkerState)
    for state in WorkerState:
        assert reachable(state) & FINAL, state


def test_a_live_worker_only_leaves_through_exited_or_kill_failed() -> None:
    """Never relaunch over a worker that may still exist."""
    for src, dst in itertools.product(WorkerState, WorkerState):
        if can_transition(src, dst) and src.has_process and not dst.has_process:
            assert dst is W.EXITED, (src, dst)
        if can_transition(src, dst) and dst is W.STARTING:
            assert not src.has_process, src


def test_kill_failed_only_after_signals() -> None:
    assert [s for s in WorkerState if can_transition(s, W.KILL_FAILED)] == [W.KILLING]


@pytest.mark.parametrize("path", [
    [W.IDLE, W.STARTING, W.RUNNING, W.EXITED, W.COMPLETED],
    [W.IDLE, W.STARTING, W.RUNNING, W.PAUSED, W.RUNNING, W.STOPPING, W.EXITED, W.STOPPED],
    [W.IDLE, W.STARTING, W.RUNNING, W.KILLING, W.EXITED, W.BACKOFF, W.STARTING],
    [W.RUNNING, W.STOPPING, W.KILLING, W.EXITED, W.COOLING, W.STARTING],
    [W.RUNNING, W.KILLING, W.KILL_FAILED],
    [W.STARTING, W.KILLING, W.EXITED, W.GAVE_UP],
    [W.IDLE, W.COOLING, W.STARTING],
    [W.BACKOFF, W.COOLING, W.STOPPED],
])
def test_supervisor_paths_are_legal(path: list[WorkerState]) -> None:
    for src, dst in itertools.pairwise(path):
        assert can_transition(src, dst), f"{src} -> {dst}"
        check_transition(src, dst)


@pytest.mark.parametrize(("src", "dst"), [
    (W.RUNNING, W.STARTING),
    (W.RUNNING, W.BACKOFF),
    (W.STOPPING, W.KILL_FAILED),
    (W.KILLING, W.BACKOFF),
    (W.EXITED, W.STARTING),
    (W.COMPLETED, W.STARTING),
    (W.RUNNING, W.RUNNING),
])
def test_illegal_moves_raise_naming_both_states(src: WorkerState, dst: WorkerState) -> None:
    with pytest.raises(IllegalTransition, match=f"{src.value} -> {dst.value}"):
        check_transition(src, dst)


@pytest.mark.parametrize("action", list(RestartAction))
def test_every_restart_decision_is_a_legal_move_from_exited(action: RestartAction) -> None:
    target = Decision(action, 0.0, "", ExitClass.CRASHED).next_state
    assert can_transition(W.EXITED, target), target
