"""The watchdog: is the worker alive (messages arrive) and progressing (progress_seq moves)?

    dog = Watchdog(WatchdogSettings.from_config(config), clock())   # per epoch, at spawn
    dog.on_message(clock())                              # hello, ckpt, log, done, fail …
    dog.on_beat(clock(), beat.progress_seq, beat.stage, beat.metrics.get("batch_seconds"))
    dog.on_extend(clock(), extend.seconds)
    if (verdict := dog.check(clock())) is not None:      # kill for verdict.kill_reason
        ...

Pure: every time is a monotonic ``now`` passed in. The rules:

- Liveness. Once the worker has sent anything, no message of any kind for
  ``heartbeat_timeout`` → ``unresponsive``. Before its first message only the start-up
  deadline applies (imports and CUDA initialisation may legitimately be silent).
- Start-up. Until the first progress, ``progress_seq`` must advance within
  ``startup_timeout`` of the spawn → else ``startup_timeout``.
- Progress. ``progress_seq`` counts this epoch's completed batches and starts at 0;
  progress means a value above the highest seen. A counter that does not start at 0
  only ends start-up early, which errs on the lenient side. Without progress for the
  stall deadline → ``stalled``, even while beats arrive. The deadline is
  clamp(stall_factor × p99 of recent batch times, stall_timeout_min, stall_timeout_max);
  batch times come from ``batch_seconds`` of the beats that show progress (one sample
  per advance, over the last :data:`BATCH_WINDOW`), and with no sample yet it is
  ``stall_timeout_max``. A slow worker that keeps progressing is never flagged: each
  advance restarts the clock and the deadline is never below ``stall_timeout_min``.
- Pause. While the last beat's stage is ``paused`` the progress deadline does not run;
  leaving the pause restarts it from that moment. Liveness still applies.
- Extend. ``extend{seconds}`` at time t makes the current progress deadline (start-up or
  stall) at least t + seconds, with seconds capped at ``stall_timeout_max``. Extensions
  never add up: each counts from its own arrival, so a second extend before progress
  lengthens the deadline only to its own t + seconds, if that is later. Progress clears
  them. Extend does not touch liveness: beats come from another thread and must go on.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections import deque

from nkat.protocol.settings import Role, setting
from nkat.supervisor.policies.kill_sequence import KillReason
from nkat.supervisor.policies.settings import FromConfig

_S = Role.SUPERVISOR

#: How many recent batch times the adaptive stall deadline looks at.
BATCH_WINDOW = 256

#: The beat stage of a paused worker (its frozen progress_seq is not a stall).
STAGE_PAUSED = "paused"


@dataclasses.dataclass(frozen=True)
class WatchdogSettings(FromConfig):
    """Watchdog deadlines, in seconds.

    heartbeat_timeout: longest silence (no message of any kind) → unresponsive.
    stall_timeout_min: floor of the adaptive stall deadline.
    stall_timeout_max: cap of the adaptive stall deadline, the deadline before any batch
        time is known, and the most one ``extend`` can ask for.
    stall_factor: the stall deadline is this many times the p99 batch time.
    startup_timeout: from spawn to the first progress (handshake, restore, first batch).
    """

    heartbeat_timeout: float = setting(10.0, "no message this long: unresponsive", role=_S,
                                       low=0.5, high=3600)
    stall_timeout_min: float = setting(30.0, "floor of the adaptive stall deadline", role=_S,
                                       low=0.5, high=86400)
    stall_timeout_max: float = setting(600.0, "cap of the adaptive stall deadline", role=_S,
                                       low=0.5, high=86400)
    stall_factor: float = setting(10.0, "stall deadline = factor x p99 batch time", role=_S,
                                  low=1, high=1000)
    startup_timeout: float = setting(120.0, "start-up and first batch deadline", role=_S,
                                     low=1, high=86400)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"{f.name} must be > 0, got {getattr(self, f.name)!r}")
        if self.stall_timeout_min > self.stall_timeout_max:
            raise ValueError("stall_timeout_min must not exceed stall_timeout_max")


class VerdictKind(enum.StrEnum):
    UNRESPONSIVE = "unresponsive"
    STALLED = "stalled"
    STARTUP_TIMEOUT = "startup_timeout"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Why the worker should be killed; ``details`` go into the log and the WAL event."""

    kind: VerdictKind
    deadline: float
    overdue_by: float
    details: dict[str, float | int | None]

    @property
    def kill_reason(self) -> KillReason:
        return KillReason(self.kind.value)


class ProgressPhase(enum.StrEnum):
    STARTUP = "startup"
    STALL = "stall"
    PAUSED = "paused"


@dataclasses.dataclass(frozen=True)
class Deadlines:
    """The watchdog's current deadlines (absolute monotonic seconds), for status."""

    liveness: float | None  # None before the first message
    progress: float | None  # None while paused
    phase: ProgressPhase
    stall_seconds: float  # the adaptive stall deadline, measured from the last progress

    @property
    def earliest(self) -> float | None:
        """When :meth:`Watchdog.check` can next return a verdict (None: nothing is due)."""
        times = [t for t in (self.liveness, self.progress) if t is not None]
        return min(times) if times else None


class Watchdog:
    """Liveness and progress deadlines of one worker epoch."""

    def __init__(self, settings: WatchdogSettings, now: float) -> None:
        self._s = settings
        self._spawned_at = now
        self._last_message_at: float | None = None
        self._highest_seq = 0
        self._progressed = False
        # The progress clock: spawn time during start-up, else the last progress (or the
        # end of a pause).
        self._clock_from = now
        self._extended_until: float | None = None
        self._paused = False
        self._batch_times: deque[float] = deque(maxlen=BATCH_WINDOW)

    def on_message(self, now: float) -> None:
        """Any message from the worker (beats and extends call this themselves)."""
        if self._last_message_at is None or now > self._last_message_at:
            self._last_message_at = now

    def on_beat(
        self, now: float, progress_seq: int, stage: str, batch_seconds: float | None = None
    ) -> None:
        """A beat; ``batch_seconds`` from its metrics, None when absent."""
        self.on_message(now)
        paused = stage == STAGE_PAUSED
        if self._paused and not paused:
            self._clock_from = now
        self._paused = paused
        if progress_seq > self._highest_seq:
            self._highest_seq = progress_seq
            self._progressed = True
            self._clock_from = now
            self._extended_until = None
            if batch_seconds is not None and batch_seconds > 0:
                self._batch_times.append(batch_seconds)

    def on_extend(self, now: float, seconds: float) -> None:
        """``extend{seconds}``: see the rule in the module docstring."""
        self.on_message(now)
        until = now + min(max(seconds, 0.0), self._s.stall_timeout_max)
        if self._extended_until is None or until > self._extended_until:
            self._extended_until = until

    def p99_batch_seconds(self) -> float | None:
        if not self._batch_times:
            return None
        ordered = sorted(self._batch_times)
        # Nearest-rank percentile: with fewer than 100 samples this is the maximum.
        return ordered[math.ceil(0.99 * len(ordered)) - 1]

    def stall_seconds(self) -> float:
        """The adaptive stall deadline, in seconds after the last progress."""
        p99 = self.p99_batch_seconds()
        if p99 is None:
            return self._s.stall_timeout_max
        return min(max(self._s.stall_factor * p99, self._s.stall_timeout_min),
                   self._s.stall_timeout_max)

    def deadlines(self) -> Deadlines:
        liveness = (None if self._last_message_at is None
                    else self._last_message_at + self._s.heartbeat_timeout)
        stall = self.stall_seconds()
        if self._paused:
            return Deadlines(liveness, None, ProgressPhase.PAUSED, stall)
        phase = ProgressPhase.STALL if self._progressed else ProgressPhase.STARTUP
        span = stall if self._progressed else self._s.startup_timeout
        progress = self._clock_from + span
        if self._extended_until is not None:
            progress = max(progress, self._extended_until)
        return Deadlines(liveness, progress, phase, stall)

    def check(self, now: float) -> Verdict | None:
        """The verdict if a deadline has passed (unresponsive first), else None.

        A deadline passes when ``now`` is strictly after it.
        """
        d = self.deadlines()
        if d.liveness is not None and now > d.liveness:
            assert self._last_message_at is not None  # liveness is set from it
            return Verdict(VerdictKind.UNRESPONSIVE, d.liveness, now - d.liveness, {
                "since_message": now - self._last_message_at,
                "heartbeat_timeout": self._s.heartbeat_timeout,
                "progress_seq": self._highest_seq,
            })
        if d.progress is None or now <= d.progress:
            return None
        if d.phase is ProgressPhase.STARTUP:
            return Verdict(VerdictKind.STARTUP_TIMEOUT, d.progress, now - d.progress, {
                "since_spawn": now - self._spawned_at,
                "startup_timeout": self._s.startup_timeout,
                "messages_seen": int(self._last_message_at is not None),
                "extended_until": self._extended_until,
            })
        return Verdict(VerdictKind.STALLED, d.progress, now - d.progress, {
            "progress_seq": self._highest_seq,
            "since_progress": now - self._clock_from,
            "stall_seconds": d.stall_seconds,
            "p99_batch_seconds": self.p99_batch_seconds(),
            "batch_samples": len(self._batch_times),
            "extended_until": self._extended_until,
        })
