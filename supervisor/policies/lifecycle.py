"""The worker's lifecycle as the supervisor sees it: states and the moves between them.

    check_transition(state, WorkerState.RUNNING)       # IllegalTransition if not allowed
    state = WorkerState.RUNNING

The shell holds the current state and moves it only after :func:`check_transition`, so a
bug in the loop shows up as an error naming both states rather than as a silent odd state.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class WorkerState(enum.StrEnum):
    """Where the current worker (or the wait for the next one) stands.

    IDLE         no worker: the supervisor has just started, or (a sharded run) this
                 slot's shard is done and no other is free for it yet.
    STARTING     spawned; until the handshake (hello → welcome).
    RUNNING      progressing. Throttling is not a state of its own: the thermal ladder
                 owns the duty, and a throttled worker is still RUNNING.
    PAUSED       the operator paused it; beats arrive, progress is frozen, not a stall.
    STOPPING     ``cmd stop`` sent; waiting for the final checkpoint and exit.
    KILLING      stack dump or signals sent (SIGTERM / SIGKILL to the process group);
                 waiting to reap. A sequence that starts past ``cmd stop`` enters it
                 directly; a graceful one moves here from STOPPING with its first signal.
    EXITED       reaped and confirmed off the GPU; the restart policy decides what next.
    BACKOFF      waiting the restart delay before the next worker.
    COOLING      stopped or killed for heat (or too hot to start); waiting for the
                 thermal ladder's resume.
    KILL_FAILED  still alive (or holding the GPU) after SIGKILL; nothing is relaunched
                 over it. The supervisor exits; the run stays resumable.
    COMPLETED    the result is durable.
    STOPPED      stopped by the operator; resumable, stays stopped until started again.
    GAVE_UP      crash loop, poison checkpoint, fatal job error or a GPU needing reset.

    Moves (everything else is illegal)::

        IDLE      -> STARTING | COOLING | STOPPED | GAVE_UP | COMPLETED
        STARTING  -> RUNNING | PAUSED | STOPPING | KILLING | EXITED
        RUNNING   -> PAUSED | STOPPING | KILLING | EXITED
        PAUSED    -> RUNNING | STOPPING | KILLING | EXITED
        STOPPING  -> KILLING | EXITED
        KILLING   -> EXITED | KILL_FAILED
        EXITED    -> BACKOFF | COOLING | COMPLETED | STOPPED | GAVE_UP | IDLE
        BACKOFF   -> STARTING | COOLING | STOPPED | GAVE_UP
        COOLING   -> STARTING | STOPPED | GAVE_UP | IDLE | COMPLETED
        KILL_FAILED, COMPLETED, STOPPED, GAVE_UP: final
    """

    IDLE = "idle"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    KILLING = "killing"
    EXITED = "exited"
    BACKOFF = "backoff"
    COOLING = "cooling"
    KILL_FAILED = "kill_failed"
    COMPLETED = "completed"
    STOPPED = "stopped"
    GAVE_UP = "gave_up"

    @property
    def is_final(self) -> bool:
        return not TRANSITIONS[self]

    @property
    def has_process(self) -> bool:
        """A worker process may exist (and must be ended before another starts)."""
        return self in _WITH_PROCESS


_S = WorkerState

TRANSITIONS: Mapping[WorkerState, frozenset[WorkerState]] = {
    _S.IDLE: frozenset({_S.STARTING, _S.COOLING, _S.STOPPED, _S.GAVE_UP, _S.COMPLETED}),
    _S.STARTING: frozenset({_S.RUNNING, _S.PAUSED, _S.STOPPING, _S.KILLING, _S.EXITED}),
    _S.RUNNING: frozenset({_S.PAUSED, _S.STOPPING, _S.KILLING, _S.EXITED}),
    _S.PAUSED: frozenset({_S.RUNNING, _S.STOPPING, _S.KILLING, _S.EXITED}),
    _S.STOPPING: frozenset({_S.KILLING, _S.EXITED}),
    _S.KILLING: frozenset({_S.EXITED, _S.KILL_FAILED}),
    _S.EXITED: frozenset({_S.BACKOFF, _S.COOLING, _S.COMPLETED, _S.STOPPED, _S.GAVE_UP,
                          _S.IDLE}),
    _S.BACKOFF: frozenset({_S.STARTING, _S.COOLING, _S.STOPPED, _S.GAVE_UP}),
    _S.COOLING: frozenset({_S.STARTING, _S.STOPPED, _S.GAVE_UP, _S.IDLE, _S.COMPLETED}),
    _S.KILL_FAILED: frozenset(),
    _S.COMPLETED: frozenset(),
    _S.STOPPED: frozenset(),
    _S.GAVE_UP: frozenset(),
}

_WITH_PROCESS = frozenset(
    {_S.STARTING, _S.RUNNING, _S.PAUSED, _S.STOPPING, _S.KILLING, _S.KILL_FAILED}
)


class IllegalTransition(ValueError):
    """A move the transition table does not allow."""

    def __init__(self, src: WorkerState, dst: WorkerState) -> None:
        super().__init__(f"illegal worker state transition {src.value} -> {dst.value}")
        self.src = src
        self.dst = dst


def can_transition(src: WorkerState, dst: WorkerState) -> bool:
    return dst in TRANSITIONS[src]


def check_transition(src: WorkerState, dst: WorkerState) -> None:
    """Raise :class:`IllegalTransition` unless the table allows ``src -> dst``."""
    if dst not in TRANSITIONS[src]:
        raise IllegalTransition(src, dst)
