"""How many lines of one repeated event the run's log takes: the first few in a window,
then a count, written as one ``log.suppressed`` line once the window has ended.

    limiter = LogRateLimiter(LogRateSettings())
    for summary in limiter.due(now):                  # windows that have ended: write these
        write_summary(summary)
    if limiter.admit(now, "protocol.error", "supervisor", epoch, "warning", ts):
        write_line(...)                               # else counted, summarized later
    for summary in limiter.drain():                   # at close: every count left
        write_summary(summary)

Pure: ``now`` is a monotonic time passed in, ``stamp`` an opaque mark of the occurrence
(the log line's ``ts``) kept only to report the first and last held back.
``jsonlog.open_run_log`` puts this in front of every line the supervisor writes.

What is limited, and why an allowlist rather than "all but a never-limit set": the
events a run's history is read from (:data:`NEVER_LIMITED`: ``run.*``, ``wal.*``,
``checkpoint.durable``, the worker's lifecycle, ``thermal.*``, ``gpu.reading``, whose
rate the operator sets and which ``report`` plots) must reach the log whole, since
``report``, ``status`` and an operator count them. A new event is of that kind until
shown otherwise, and an allowlist keeps it whole by default. The limited ones are those
whose rate something outside the supervisor sets: a worker's output
(:data:`OUTPUT_EVENTS`); a peer's messages, a hammered socket, a failing disk, a GPU
that repeats an Xid, control requests, signals (:data:`LIMITED_EVENTS`); and every event
a worker forwards (component ``worker``), since a worker may name any event it likes.
Keys include the worker epoch, so a sound worker's ``worker.started``, once per epoch,
always passes.

The rule, per key ``(component, event, epoch)``: a window opens at the key's first
occurrence and lasts ``log_rate_window`` (10 s). Its first ``log_rate_burst`` (20)
occurrences are written, or ``log_output_burst`` (200) for worker output, since a
traceback or stack dump comes as many lines at once; later ones are counted. Once the
window has ended, :meth:`~LogRateLimiter.due` returns one :class:`Suppressed` for a key
that counted any, and the key's next occurrence opens a new window. Nothing is dropped
in silence: warnings and errors are limited too, and every count is reported at the
highest level it counted, so ``logs --level warning`` shows a flood of warnings as one
line. A steady flood costs at most burst + 1 lines per key and window. At most
``max_keys`` keys are tracked (a worker may invent names without end); keys past that
share one key whose event is ``*``.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

from nkat.supervisor.policies.settings import FromConfig

#: The supervisor's events whose volume comes from outside it (besides worker output).
LIMITED_EVENTS = frozenset({
    "protocol.error", "protocol.foreign_epoch", "protocol.send_failed",  # a peer's messages
    "socket.flooded",  # connections by other processes
    "checkpoint.refused", "watchdog.extended",  # a worker's messages
    "gpu.xid", "gpu.memory_high", "gpu.power_high", "gpu.note",  # the GPU repeating itself
    "status.write_failed",  # a failing disk, every status write
    "operator.pause", "operator.resume", "operator.checkpoint_now",  # control requests
    "supervisor.sighup_ignored",  # signals from anyone
    "notify.retrying", "notify.dropped",  # a dead receiver
})
#: A worker's captured output: its own burst, since a traceback comes as many lines.
OUTPUT_EVENTS = frozenset({"worker.stdout", "worker.stderr"})
#: Events of these components are all limited: a worker can name any event it likes.
LIMITED_COMPONENTS = frozenset({"worker"})
#: The supervisor's events the run's history is read from: never limited. Documentation
#: and a guard: an event in both this set and the limited ones is a mistake (a test says
#: so); one in neither is not limited either.
NEVER_LIMITED = frozenset({
    "run.started", "run.resumed", "run.recovered_unclean", "run.completed", "run.stopping",
    "run.stopped", "run.gave_up", "run.backend_pinned", "run.preempted",
    "wal.recovered", "wal.foreign", "wal.truncated", "wal.damage", "wal.salvaged",
    "wal.corrupt", "wal.open_failed", "wal.write_failed", "wal.checkpoint_unreadable",
    "result.write_failed", "checkpoint.durable",
    "worker.spawned", "worker.spawn_failed", "worker.welcomed", "worker.failed",
    "worker.killing", "worker.kill_escalated", "worker.dump_requested", "worker.sigterm",
    "worker.sigkill", "worker.kill_failed", "worker.context_lingers", "worker.exited",
    "worker.restart_scheduled", "worker.leak_suspected", "worker.retired",
    "worker.respawn_after_cooling",
    "watchdog.unresponsive", "watchdog.stalled", "watchdog.startup_timeout",
    "thermal.throttle", "thermal.unthrottle", "thermal.stop", "thermal.kill_now",
    "thermal.resume", "thermal.cooling", "gpu.reading", "gpu.lost",
    "shard.completed", "shards.merging", "supervisor.failed", "supervisor.stop_now",
})
#: The event name under which keys past ``max_keys`` are counted together.
OVERFLOW_EVENT = "*"
#: Levels in rising order; a summary takes the highest it counted, at least ``info``.
LEVEL_ORDER = ("debug", "info", "warning", "error", "critical")


@dataclasses.dataclass(frozen=True)
class LogRateSettings(FromConfig):
    """Named like the config keys they would be (``from_config`` takes those there are).

    log_rate_window: seconds a window lasts; log_rate_burst: lines written per key and
    window; log_output_burst: the same for worker output; max_keys: keys tracked at once.
    """

    log_rate_window: float = 10.0
    log_rate_burst: int = 20
    log_output_burst: int = 200
    max_keys: int = 1024

    def __post_init__(self) -> None:
        if not self.log_rate_window > 0:
            raise ValueError(f"log_rate_window must be > 0, got {self.log_rate_window}")
        for name in ("log_rate_burst", "log_output_burst", "max_keys"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Suppressed:
    """``count`` occurrences of ``event`` not written in one window: the content of one
    ``log.suppressed`` line. ``first`` and ``last`` are the stamps of the first and last
    of them; ``level`` the highest level among them (at least ``info``)."""

    event: str
    component: str
    epoch: int | None
    count: int
    level: str
    window_s: float
    first: str
    last: str


_Key = tuple[str, str, int | None]  # (component, event, epoch)


@dataclasses.dataclass
class _Window:
    opened: float
    seen: int = 0
    suppressed: int = 0
    level: int = 1  # index in LEVEL_ORDER: info
    first: str = ""
    last: str = ""


class LogRateLimiter:
    """The windows of the keys seen lately, oldest first. Not thread-safe: the caller
    holds a lock around each call."""

    def __init__(self, settings: LogRateSettings | None = None) -> None:
        self.settings = settings or LogRateSettings()
        # Every window lasts as long, so opening order is ending order: the ended ones
        # are always at the front.
        self._windows: OrderedDict[_Key, _Window] = OrderedDict()

    def burst_of(self, event: str, component: str) -> int | None:
        """Lines per window for this event, or None when it is never limited."""
        if event in OUTPUT_EVENTS:
            return self.settings.log_output_burst
        if component in LIMITED_COMPONENTS or event in LIMITED_EVENTS:
            return self.settings.log_rate_burst
        return None

    def admit(self, now: float, event: str, component: str, epoch: int | None, level: str,
              stamp: str) -> bool:
        """True: write this occurrence. False: it was counted, to be summarized. Call
        :meth:`due` first, so that an ended window is reported before a new one opens."""
        burst = self.burst_of(event, component)
        if burst is None:
            return True
        key: _Key = (component, event, epoch)
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= self.settings.max_keys:
                key = (component, OVERFLOW_EVENT, None)
                window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _Window(opened=now)
        window.seen += 1
        if window.seen <= burst:
            return True
        window.suppressed += 1
        window.level = max(window.level, _rank(level))
        if window.suppressed == 1:
            window.first = stamp
        window.last = stamp
        return False

    def due(self, now: float) -> list[Suppressed]:
        """The counts of the windows that have ended by ``now``; those windows close."""
        ended: list[Suppressed] = []
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if now < window.opened + self.settings.log_rate_window:
                break
            del self._windows[key]
            if window.suppressed:
                ended.append(self._summary(key, window))
        return ended

    def drain(self) -> list[Suppressed]:
        """Every count not yet reported, window ended or not (at close)."""
        left = [self._summary(key, w) for key, w in self._windows.items() if w.suppressed]
        self._windows.clear()
        return left

    @property
    def tracked(self) -> int:
        """Keys with an open window."""
        return len(self._windows)

    def _summary(self, key: _Key, window: _Window) -> Suppressed:
        component, event, epoch = key
        return Suppressed(event, component, epoch, window.suppressed,
                          LEVEL_ORDER[window.level], self.settings.log_rate_window, window.first,
                          window.last)


def _rank(level: str) -> int:
    if level == "exception":
        return LEVEL_ORDER.index("error")
    return LEVEL_ORDER.index(level) if level in LEVEL_ORDER else 1
