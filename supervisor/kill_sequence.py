"""How the supervisor ends a worker: cmd stop, stack dump, SIGTERM, SIGKILL, confirm.

    seq = KillSequence(KillSettings(), KillReason.STALLED)
    while (action := seq.next_action(clock(), alive=worker_alive())) is not Action.DONE:
        if action is Action.KILL_FAILED: ...             # never relaunch over it
        do(action)                                       # the shell sends; seq only decides
        poll_until(seq.deadline)                         # wake at the step's deadline

A pure state machine: the shell records the reason durably first, performs each action
(``send_stop`` = ``cmd stop{deadline_s: stop_deadline}``; signals go to the whole process
group), reaps, and reports ``alive``. ``alive`` means the worker is not yet reaped or (with
NVML) its pid still holds the GPU, so ``done`` is only answered once both are false.

Where the sequence starts depends on the reason (:func:`first_step`):

- graceful (operator, thermal stop, leak, stalled): ``cmd stop`` first, so the worker can
  send a final checkpoint; if it is still alive after ``stop_deadline``: dump, SIGTERM …
- unresponsive, start-up timeout, Xid: skip ``cmd stop``. An unresponsive worker reads no
  commands (typically a hang with the GIL held); before its first progress there is
  nothing to save; after an Xid the device memory behind a checkpoint is suspect.
- thermal emergency: SIGKILL at once, no dump, no grace.

Every path that signals dumps the stacks first (SIGUSR1 → faulthandler, which runs in
C and so works with the GIL held) and waits ``dump_grace`` for the dump to be written.
"""

from __future__ import annotations

import dataclasses
import enum


class KillReason(enum.Enum):
    """Why the supervisor ends a worker; also tells the restart policy what the exit was.

    The three watchdog reasons share their values with ``watchdog.VerdictKind``.
    """

    OPERATOR = "operator"
    THERMAL_STOP = "thermal_stop"
    THERMAL_EMERGENCY = "thermal_emergency"
    UNRESPONSIVE = "unresponsive"
    STALLED = "stalled"
    STARTUP_TIMEOUT = "startup_timeout"
    LEAK = "leak"
    XID_RESTART = "xid_restart"
    GPU_RESET = "gpu_reset"


class Action(enum.Enum):
    """What the shell does next."""

    SEND_STOP = "send_stop"  # cmd stop{deadline_s: settings.stop_deadline}
    SEND_DUMP = "send_dump"  # SIGUSR1 to the worker pid (faulthandler dump)
    SEND_SIGTERM = "send_sigterm"  # to the process group
    SEND_SIGKILL = "send_sigkill"  # to the process group
    WAIT = "wait"  # nothing to do before seq.deadline
    DONE = "done"  # gone: reaped and off the GPU; safe to relaunch
    KILL_FAILED = "kill_failed"  # still there after SIGKILL + kill_confirm; never relaunch


class Step(enum.Enum):
    """Where a sequence begins (see :func:`first_step`)."""

    STOP = "stop"
    TERM = "term"
    KILL = "kill"


@dataclasses.dataclass(frozen=True)
class KillSettings:
    """Deadlines of the kill sequence, in seconds.

    stop_deadline: after ``cmd stop``, how long the worker has to send its final
        checkpoint, have it acknowledged and exit (also sent as ``deadline_s``).
    term_grace: after SIGTERM, how long before SIGKILL.
    dump_grace: after SIGUSR1, how long the faulthandler dump gets to reach the log.
    kill_confirm: after SIGKILL, how long the process may take to be reaped and release
        the GPU before the supervisor declares ``kill_failed``.
    """

    stop_deadline: float = 10.0
    term_grace: float = 5.0
    dump_grace: float = 1.0
    kill_confirm: float = 5.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"{f.name} must be > 0, got {getattr(self, f.name)!r}")


_FIRST_STEP = {
    KillReason.OPERATOR: Step.STOP,
    KillReason.THERMAL_STOP: Step.STOP,
    KillReason.LEAK: Step.STOP,
    # Beats still arrive, so the process reads its socket; the main loop may yet come
    # back from a long kernel in time to save its progress.
    KillReason.STALLED: Step.STOP,
    KillReason.UNRESPONSIVE: Step.TERM,
    KillReason.STARTUP_TIMEOUT: Step.TERM,
    KillReason.XID_RESTART: Step.TERM,
    KillReason.GPU_RESET: Step.TERM,
    KillReason.THERMAL_EMERGENCY: Step.KILL,
}


def first_step(reason: KillReason) -> Step:
    """The step a sequence for ``reason`` begins with (rules in the module docstring)."""
    return _FIRST_STEP[reason]


class KillSequence:
    """One worker's way out; a new sequence for every kill."""

    def __init__(self, settings: KillSettings, reason: KillReason) -> None:
        self.reason = reason
        s = settings
        signal_steps = [
            (Action.SEND_DUMP, s.dump_grace),
            (Action.SEND_SIGTERM, s.term_grace),
            (Action.SEND_SIGKILL, s.kill_confirm),
        ]
        step = first_step(reason)
        if step is Step.STOP:
            self._plan = [(Action.SEND_STOP, s.stop_deadline), *signal_steps]
        elif step is Step.TERM:
            self._plan = signal_steps
        else:
            self._plan = [(Action.SEND_SIGKILL, s.kill_confirm)]
        self._next = 0
        self._deadline: float | None = None
        self._outcome: Action | None = None
        self.last_sent: Action | None = None

    @property
    def deadline(self) -> float | None:
        """When to call :meth:`next_action` again at the latest; None once finished."""
        return None if self._outcome is not None else self._deadline

    @property
    def finished(self) -> bool:
        return self._outcome is not None

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
