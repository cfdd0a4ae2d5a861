"""How the supervisor ends a worker: cmd stop, stack dump, SIGTERM, SIGKILL, confirm.

    seq = KillSequence(KillSettings.from_config(config), KillReason.STALLED)
    action = seq.next_action(clock(), alive=worker_alive())   # each loop turn
    # send_stop | send_dump | send_sigterm | send_sigkill: do it; wait: nothing to do
    # before seq.deadline; done: gone, relaunch is safe; kill_failed: never relaunch
    seq.escalate(KillReason.THERMAL_EMERGENCY)                # a more urgent reason came

A pure state machine. The shell records the reason durably before the first action,
performs each action (``send_stop`` = ``cmd stop{deadline_s: stop_deadline}``;
``send_dump`` = SIGUSR1 to the worker; SIGTERM and SIGKILL go to the whole process group),
reaps, and reports ``alive``: the worker's group is not yet reaped, or (with NVML) its
pid still holds the GPU. ``done`` is answered only once ``alive`` is false.

Where a sequence starts depends on the reason (:func:`first_step`):

- STOP (operator, thermal stop, leak restart, stalled): ``cmd stop`` first, so the worker
  can send a final checkpoint; still alive after ``stop_deadline`` → dump, SIGTERM, …
  A stalled worker still beats, so it reads its socket, and its main loop may yet come
  back from a long kernel in time to save its progress.
- TERM (unresponsive, start-up timeout, Xid, GPU reset, operator "stop now", WAL
  failure, a protocol violation): skip ``cmd stop``. An unresponsive worker reads no
  commands (typically a hang with the GIL held); before the first progress there is
  nothing to save; after an Xid the device memory behind a checkpoint is suspect; after
  a WAL failure no checkpoint can be made durable; an operator asking twice does not
  want to wait; a worker that broke the protocol is not trusted with a final checkpoint.
- KILL (thermal emergency; a leader that exited while its group or GPU context lingers):
  SIGKILL at once, no dump, no grace.

Every path that signals dumps the stacks first (SIGUSR1 → faulthandler, which runs in C
and so works with the GIL held) and waits ``dump_grace`` for the dump to be written.
"""

from __future__ import annotations

import dataclasses
import enum

from nkat.protocol.settings import Role, setting
from nkat.supervisor.policies.settings import FromConfig

_S = Role.SUPERVISOR


class KillReason(enum.StrEnum):
    """Why the supervisor ends a worker; the restart policy classifies the exit by it.

    The three watchdog reasons share their values with ``watchdog.VerdictKind``.
    """

    OPERATOR = "operator"
    OPERATOR_NOW = "operator_now"
    THERMAL_STOP = "thermal_stop"
    THERMAL_EMERGENCY = "thermal_emergency"
    UNRESPONSIVE = "unresponsive"
    STALLED = "stalled"
    STARTUP_TIMEOUT = "startup_timeout"
    LEAK = "leak"
    XID_RESTART = "xid_restart"
    GPU_RESET = "gpu_reset"
    WAL_FAILED = "wal_failed"
    LINGERING = "lingering"
    PROTOCOL_VIOLATION = "protocol_violation"


class Action(enum.StrEnum):
    """What the shell does next."""

    SEND_STOP = "send_stop"
    SEND_DUMP = "send_dump"
    SEND_SIGTERM = "send_sigterm"
    SEND_SIGKILL = "send_sigkill"
    WAIT = "wait"
    DONE = "done"
    KILL_FAILED = "kill_failed"


class Step(enum.StrEnum):
    """Where a sequence begins (see :func:`first_step`)."""

    STOP = "stop"
    TERM = "term"
    KILL = "kill"


@dataclasses.dataclass(frozen=True)
class KillSettings(FromConfig):
    """Deadlines of the kill sequence, in seconds.

    stop_deadline: after ``cmd stop``, how long the worker has to send its final
        checkpoint, have it acknowledged and exit (also sent as ``deadline_s``).
    term_grace: after SIGTERM, how long before SIGKILL.
    dump_grace: after SIGUSR1, how long the faulthandler dump gets to reach the log.
    kill_confirm: after SIGKILL, how long the group may take to be reaped and release
        the GPU before the supervisor declares ``kill_failed``.
    """

    stop_deadline: float = setting(10.0, "seconds a worker has to obey cmd stop", role=_S,
                                   low=0.1, high=3600)
    term_grace: float = setting(5.0, "seconds between SIGTERM and SIGKILL", role=_S, low=0.1,
                                high=3600)
    dump_grace: float = 1.0
    kill_confirm: float = setting(
        5.0, "seconds after SIGKILL for the worker and its GPU context to be gone (else "
        "kill_failed)", role=_S, low=0.1, high=3600)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"{f.name} must be > 0, got {getattr(self, f.name)!r}")


_FIRST_STEP = {
    KillReason.OPERATOR: Step.STOP,
    KillReason.THERMAL_STOP: Step.STOP,
    KillReason.LEAK: Step.STOP,
    KillReason.STALLED: Step.STOP,
    KillReason.OPERATOR_NOW: Step.TERM,
    KillReason.UNRESPONSIVE: Step.TERM,
    KillReason.STARTUP_TIMEOUT: Step.TERM,
    KillReason.XID_RESTART: Step.TERM,
    KillReason.GPU_RESET: Step.TERM,
    KillReason.WAL_FAILED: Step.TERM,
    KillReason.PROTOCOL_VIOLATION: Step.TERM,
    KillReason.THERMAL_EMERGENCY: Step.KILL,
    KillReason.LINGERING: Step.KILL,
}

# The action each step begins with.
_ENTRY = {Step.STOP: Action.SEND_STOP, Step.TERM: Action.SEND_DUMP, Step.KILL: Action.SEND_SIGKILL}


def first_step(reason: KillReason) -> Step:
    """The step a sequence for ``reason`` begins with (rules in the module docstring)."""
    return _FIRST_STEP[reason]


class KillSequence:
    """One worker's way out. ``reason`` stays the first reason, even after escalation."""

    def __init__(self, settings: KillSettings, reason: KillReason) -> None:
        self.reason = reason
        s = settings
        self._plan = [
            (Action.SEND_STOP, s.stop_deadline),
            (Action.SEND_DUMP, s.dump_grace),
            (Action.SEND_SIGTERM, s.term_grace),
            (Action.SEND_SIGKILL, s.kill_confirm),
        ]
        self._next = self._index(_ENTRY[first_step(reason)])
        self._deadline: float | None = None
        self._outcome: Action | None = None
        self.last_sent: Action | None = None

    def _index(self, action: Action) -> int:
        return [a for a, _ in self._plan].index(action)

    @property
    def deadline(self) -> float | None:
        """When to call :meth:`next_action` again at the latest; None when it need not
        wait (before the first action, after an escalation, once finished)."""
        return None if self._outcome is not None else self._deadline

    @property
    def signalled(self) -> bool:
        """Past ``cmd stop``: a dump or a signal was sent (the worker is KILLING)."""
        return self.last_sent not in (None, Action.SEND_STOP)

    def escalate(self, reason: KillReason) -> bool:
        """Jump ahead to where ``reason`` would begin, if that is further on; the next
        call to :meth:`next_action` then acts at once. True if it jumped."""
        target = self._index(_ENTRY[first_step(reason)])
        if self._outcome is not None or target < self._next:
            return False
        if target == self._next and self._deadline is None:
            return False
        self._next = target
        self._deadline = None
        return True

    def next_action(self, now: float, alive: bool) -> Action:
        """The next thing to do; ``done`` and ``kill_failed`` are final and repeat."""
        if self._outcome is not None:
            return self._outcome
        if not alive:
            self._outcome = Action.DONE
            return self._outcome
        if self._deadline is not None and now < self._deadline:
            return Action.WAIT
        if self._next == len(self._plan):
            self._outcome = Action.KILL_FAILED
            return self._outcome
        action, wait = self._plan[self._next]
        self._next += 1
        self._deadline = now + wait
        self.last_sent = action
        return action
