"""What happens after a worker exits: classify the exit, then restart, wait, stop or give up.

    policy = RestartPolicy(RestartSettings.from_config(config), random.Random())
    policy.on_spawn(clock(), resumed_ckpt_seq=7)      # each epoch; 0 = fresh start
    policy.on_durable_checkpoint(8)                    # after each fdatasync'd checkpoint
    decision = policy.decide(clock(), ExitInfo(returncode=-9,
                                               killed_for=KillReason.STALLED))
    decision.action, decision.delay, decision.reason, decision.exit_class, decision.next_state

Rules:

- Exit classes, first match wins: ``completed`` (the done record is durable);
  ``gpu_reset`` (killed for Xid 48/79/95 or a lost GPU); ``fatal`` (a ``fail`` with
  fatal=True or exit code FATAL: restarting would fail the same way); then what the
  supervisor killed it for: ``stopped`` (operator, WAL failure), ``thermal``, ``planned``
  (leak restart at a durable checkpoint), ``hung`` (watchdog), ``crashed`` (Xid 13/31/43,
  a protocol violation); then ``oom`` (exit code OOM or a ``fail`` of kind "oom");
  everything else ``crashed`` (signals, GPU_STICKY, ORPHANED, STARTUP, a STOPPED nobody
  asked for, DONE without a durable done record). A kill for a lingering group
  classifies by the exit itself.
- Durable progress: a durable checkpoint newer than the one the worker resumed.
  Only ``hung``, ``oom`` and ``crashed`` count as crashes.
- Backoff: the k-th consecutive crash restarts after a delay drawn uniformly from
  [base/2, base], base = min(restart_delay · 2^k, restart_delay_max), never below
  restart_delay. k returns to 0 only when a worker made durable progress and stayed up
  ``stable_after`` seconds (judged when it exits, whatever the class).
- Crash loop: crashes are remembered for ``restart_window`` seconds and forgotten when a
  worker makes durable progress; a crash that makes more than ``max_restarts`` of them
  gives up. The run stays resumable.
- Poison checkpoint: ``poison_after`` crashes of workers that resumed the same checkpoint
  and never got past it give up, naming its ckpt_seq. A fresh start has no checkpoint to
  blame; the crash loop covers it.
- Thermal exits wait for the thermal ladder's resume; operator stops stay stopped;
  planned restarts restart at once. None of these count as crashes.
"""

from __future__ import annotations

import dataclasses
import enum
import random
import signal
from collections import deque

from nkat.protocol import exitcodes
from nkat.protocol.settings import Role, setting
from nkat.supervisor.policies.kill_sequence import KillReason
from nkat.supervisor.policies.lifecycle import WorkerState
from nkat.supervisor.policies.settings import FromConfig
from nkat.supervisor.policies.xid import GPU_RESET_ADVICE

_S = Role.SUPERVISOR


@dataclasses.dataclass(frozen=True)
class RestartSettings(FromConfig):
    """Restart policy knobs.

    restart_delay: first backoff delay (s), and the floor of every delay (0: no backoff).
    restart_delay_max: cap of the backoff delay (s).
    max_restarts: crash restarts allowed within restart_window without durable progress.
    restart_window: how long (s) a crash counts toward max_restarts.
    stable_after: uptime (s), with durable progress, after which backoff starts over.
    poison_after: crashes before passing the same resumed checkpoint that condemn it.
    """

    restart_delay: float = setting(0.25, "first restart backoff (s)", role=_S, low=0, high=3600)
    restart_delay_max: float = setting(60.0, "largest restart backoff (s)", role=_S, low=0,
                                       high=86400)
    max_restarts: int = setting(
        5, "crash restarts allowed in restart_window; durable progress forgives them", role=_S,
        low=0, high=10000)
    restart_window: float = setting(600.0, "crash-loop window (s)", role=_S, low=1, high=864000)
    stable_after: float = setting(60.0, "uptime after which backoff resets (s)", role=_S, low=0,
                                  high=86400)
    poison_after: int = setting(3, "deaths before passing one checkpoint = poison", role=_S,
                                low=1, high=1000)

    def __post_init__(self) -> None:
        if not 0 <= self.restart_delay <= self.restart_delay_max:
            raise ValueError("need 0 <= restart_delay <= restart_delay_max")
        if self.max_restarts < 0:
            raise ValueError("max_restarts must be >= 0")
        if not self.restart_window > 0:
            raise ValueError("restart_window must be > 0")
        if self.stable_after < 0:
            raise ValueError("stable_after must be >= 0")
        if self.poison_after < 1:
            raise ValueError("poison_after must be >= 1")


class ExitClass(enum.StrEnum):
    COMPLETED = "completed"
    STOPPED = "stopped"
    CRASHED = "crashed"
    HUNG = "hung"
    THERMAL = "thermal"
    OOM = "oom"
    FATAL = "fatal"
    GPU_RESET = "gpu_reset"
    PLANNED = "planned"

    @property
    def is_crash(self) -> bool:
        return self in (ExitClass.CRASHED, ExitClass.HUNG, ExitClass.OOM)


@dataclasses.dataclass(frozen=True)
class ExitInfo:
    """What the supervisor knows about an ended worker.

    returncode: as ``Popen.returncode``: the exit status (``nkat.protocol.exitcodes``),
        or minus the signal that ended it.
    killed_for: why the supervisor ended it (the kill sequence's first reason), None if
        it ended on its own.
    completed: the ``done`` record is durable.
    fatal, fail_kind: from the last ``fail`` message of this epoch, if any.
    """

    returncode: int
    killed_for: KillReason | None = None
    completed: bool = False
    fatal: bool = False
    fail_kind: str | None = None

    def describe(self) -> str:
        """``exit 12 (oom)`` or ``signal SIGKILL``, for reasons and logs."""
        if self.returncode < 0:
            try:
                return f"signal {signal.Signals(-self.returncode).name}"
            except ValueError:
                return f"signal {-self.returncode}"
        name = exitcodes.NAMES.get(self.returncode)
        return f"exit {self.returncode}" + (f" ({name})" if name else "")


_KILLED_CLASS = {
    KillReason.OPERATOR: ExitClass.STOPPED,
    KillReason.OPERATOR_NOW: ExitClass.STOPPED,
    KillReason.WAL_FAILED: ExitClass.STOPPED,
    KillReason.THERMAL_STOP: ExitClass.THERMAL,
    KillReason.THERMAL_EMERGENCY: ExitClass.THERMAL,
    KillReason.LEAK: ExitClass.PLANNED,
    KillReason.UNRESPONSIVE: ExitClass.HUNG,
    KillReason.STALLED: ExitClass.HUNG,
    KillReason.STARTUP_TIMEOUT: ExitClass.HUNG,
    KillReason.XID_RESTART: ExitClass.CRASHED,
    KillReason.PROTOCOL_VIOLATION: ExitClass.CRASHED,
}


def classify_exit(info: ExitInfo) -> ExitClass:
    """The exit class; the precedence is listed in the module docstring."""
    if info.completed:
        return ExitClass.COMPLETED
    if info.killed_for is KillReason.GPU_RESET:
        return ExitClass.GPU_RESET
    if info.fatal or info.returncode == exitcodes.FATAL:
        return ExitClass.FATAL
    if info.killed_for in _KILLED_CLASS:
        return _KILLED_CLASS[info.killed_for]
    if info.returncode == exitcodes.OOM or info.fail_kind == "oom":
        return ExitClass.OOM
    return ExitClass.CRASHED


class RestartAction(enum.StrEnum):
    RESTART = "restart"
    GIVE_UP = "give_up"
    COMPLETE = "complete"
    STOP = "stop"
    WAIT_COOLDOWN = "wait_cooldown"


_NEXT_STATE = {
    RestartAction.RESTART: WorkerState.BACKOFF,
    RestartAction.GIVE_UP: WorkerState.GAVE_UP,
    RestartAction.COMPLETE: WorkerState.COMPLETED,
    RestartAction.STOP: WorkerState.STOPPED,
    RestartAction.WAIT_COOLDOWN: WorkerState.COOLING,
}


@dataclasses.dataclass(frozen=True)
class Decision:
    """The outcome of an exit. ``delay`` (s) is the backoff before a restart, else 0."""

    action: RestartAction
    delay: float
    reason: str
    exit_class: ExitClass

    @property
    def next_state(self) -> WorkerState:
        """The lifecycle state the supervisor moves to from EXITED."""
        return _NEXT_STATE[self.action]


def backoff_delay(settings: RestartSettings, attempt: int, rng: random.Random) -> float:
    """Delay before the ``attempt``-th consecutive crash restart (0-based)."""
    # Past 2^64 the cap has long been reached; the bound keeps the float finite.
    base = min(settings.restart_delay * 2.0 ** min(attempt, 64), settings.restart_delay_max)
    return max(settings.restart_delay, rng.uniform(base / 2, base))


class RestartPolicy:
    """Backoff, crash-loop budget and poison-checkpoint memory across worker epochs."""

    def __init__(self, settings: RestartSettings, rng: random.Random) -> None:
        self._s = settings
        self._rng = rng
        self._attempt = 0
        self._crashes: deque[float] = deque()
        self._poison_seq = 0
        self._poison_count = 0
        self._spawned_at: float | None = None
        self._resumed = 0
        self._progressed = False

    def on_spawn(self, now: float, resumed_ckpt_seq: int) -> None:
        """A worker was spawned, resuming this checkpoint (0 for a fresh start: checkpoint
        seqs begin at 1)."""
        self._spawned_at = now
        self._resumed = resumed_ckpt_seq
        self._progressed = False

    def on_durable_checkpoint(self, ckpt_seq: int) -> None:
        """A checkpoint of the current worker became durable (resends of older ones
        change nothing)."""
        if ckpt_seq > self._resumed:
            self._progressed = True

    def decide(self, now: float, info: ExitInfo) -> Decision:
        """The decision for the current worker's exit (call once per :meth:`on_spawn`)."""
        if self._spawned_at is None:
            raise RuntimeError("decide() without on_spawn()")
        cls = classify_exit(info)
        uptime = now - self._spawned_at
        self._spawned_at = None
        if self._progressed:
            self._crashes.clear()
            self._poison_seq = self._poison_count = 0
            if uptime >= self._s.stable_after:
                self._attempt = 0
        if cls is ExitClass.COMPLETED:
            return Decision(RestartAction.COMPLETE, 0.0, "completed", cls)
        if cls is ExitClass.GPU_RESET:
            return Decision(RestartAction.GIVE_UP, 0.0, GPU_RESET_ADVICE, cls)
        if cls is ExitClass.FATAL:
            kind = info.fail_kind or exitcodes.NAMES[exitcodes.FATAL]
            return Decision(RestartAction.GIVE_UP, 0.0, f"fatal job error ({kind})", cls)
        if cls is ExitClass.STOPPED:
            why = "WAL write failed" if info.killed_for is KillReason.WAL_FAILED \
                else "stopped by the operator"
            return Decision(RestartAction.STOP, 0.0, why, cls)
        if cls is ExitClass.THERMAL:
            return Decision(RestartAction.WAIT_COOLDOWN, 0.0, "thermal stop: cooling down",
                            cls)
        if cls is ExitClass.PLANNED:
            return Decision(RestartAction.RESTART, 0.0, "planned restart (leak suspected)",
                            cls)
        return self._after_crash(now, cls, info)

    def _after_crash(self, now: float, cls: ExitClass, info: ExitInfo) -> Decision:
        if self._resumed and not self._progressed:
            if self._poison_seq == self._resumed:
                self._poison_count += 1
            else:
                self._poison_seq, self._poison_count = self._resumed, 1
            if self._poison_count >= self._s.poison_after:
                return Decision(
                    RestartAction.GIVE_UP, 0.0,
                    f"poison checkpoint: ckpt_seq {self._resumed} was resumed"
                    f" {self._poison_count} times and every worker died before passing it",
                    cls)
        while self._crashes and self._crashes[0] <= now - self._s.restart_window:
            self._crashes.popleft()
        self._crashes.append(now)
        if len(self._crashes) > self._s.max_restarts:
            return Decision(
                RestartAction.GIVE_UP, 0.0,
                f"crash loop: {len(self._crashes)} crashes within {self._s.restart_window:g}"
                f" s without durable progress (max_restarts {self._s.max_restarts})", cls)
        delay = backoff_delay(self._s, self._attempt, self._rng)
        self._attempt += 1
        return Decision(RestartAction.RESTART, delay, f"{cls}: {info.describe()}", cls)
