"""The run's structured log: one JSON object per line in ``logs/supervisor.jsonl``.

Only the supervisor writes it (worker ``log`` messages and captured output are forwarded
here). Built on structlog; every line has ``ts`` (UTC ISO-8601), ``level``, ``event`` (a
stable dotted name), ``run_id``, ``component`` and, where it applies, ``epoch``.

    log, sink = open_run_log(run.log_file, run_id="r1", max_bytes=16 << 20, backups=5)
    log.info("worker.spawned", epoch=3, pid=4242)

Rotation is by size: ``supervisor.jsonl`` → ``.1`` → ``.2`` …; a line is never split
across files, and a reader following the log sees each line exactly once. The run's first
rotated files are not deleted but set aside as the log's head (``supervisor.head-000.jsonl``
…, see :mod:`nkat.supervisor.loghead`), so ``run.started`` stays readable.

Floods are bounded: repeated events whose rate comes from outside the supervisor (a
worker's output and forwarded events, protocol errors, socket floods …) pass through
:mod:`nkat.supervisor.log_rate`; past a burst per window they are counted, and each count
becomes one ``log.suppressed`` line (fields ``suppressed_event``, ``suppressed_component``,
``count``, ``window_s``, ``first_ts``, ``last_ts``, and ``epoch`` where the events had
one) once the window has ended: at the next line, within ``sync_interval`` when the log is
quiet, or at close. Nothing is limited that the run's history is read from.

Durability, as journald does it: a line at warning or above is synced (fdatasync) before
the call returns, so the account of what went wrong survives a power cut; other lines
are synced within ``sync_interval`` seconds (2 by default) by a small thread that sleeps
otherwise. Urgent syncs closer together than ``URGENT_GAP`` are left to that thread,
which then syncs at once: a flood of warnings costs at most one sync per gap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from nkat.supervisor import loghead
from nkat.supervisor.log_rate import LogRateLimiter, LogRateSettings, Suppressed

LEVELS = ("debug", "info", "warning", "error", "critical")
#: Levels whose lines are synced before the call returns.
URGENT_LEVELS = frozenset({"warning", "error", "critical", "exception"})
#: Seconds within which every line is synced.
SYNC_INTERVAL = 2.0
#: Least seconds between two syncs made by the caller of an urgent line.
URGENT_GAP = 0.05
#: structlog's level numbers are the standard library's.
_LEVEL_NUMBERS = logging.getLevelNamesMapping()


class RotatingLineFile:
    """Appends whole lines to a file and rotates it by size. Thread-safe.

    ``sync`` is the call that makes the file's data durable (os.fdatasync); ``clock``
    measures the gap between urgent syncs (time.monotonic). The file that rotation would
    delete goes to the log's head instead while the head holds fewer than ``head_bytes``
    in fewer than ``head_files`` files (:mod:`nkat.supervisor.loghead`).
    """

    def __init__(self, path: Path, max_bytes: int, backups: int, *,
                 sync_interval: float = SYNC_INTERVAL,
                 sync: Callable[[int], None] = os.fdatasync,
                 clock: Callable[[], float] = time.monotonic,
                 head_bytes: int = loghead.HEAD_BYTES,
                 head_files: int = loghead.HEAD_FILES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._sync, self._clock = sync, clock
        self._housekeepers: list[Callable[[bool], None]] = []
        self.dropped = 0
        self.syncs = 0
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._head_limits = (head_bytes, head_files)
        self._head_sizes = [p.stat().st_size for p in loghead.head_files(path)]
        self._head_next = loghead.next_head_index(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = os.fstat(self._fd).st_size
        if self._size and not _ends_with_newline(path):
            # A crash tore the last line: end it, so the next line starts whole.
            self._size += os.write(self._fd, b"\n")
        self._dirty = False
        self._last_sync = float("-inf")
        self._closed = self._closing = False
        self._wake = threading.Event()
        self._syncer = threading.Thread(target=self._sync_loop, args=(sync_interval,),
                                        name="log-sync", daemon=True)
        self._syncer.start()

    def write_line(self, line: str, *, urgent: bool = False) -> None:
        """Append one line; ``urgent`` (warning and above): synced before returning.
        A failing disk loses log lines, never the run: the WAL, not the log, is what
        must be durable, and it has its own fail-stop."""
        data = (line.rstrip("\n") + "\n").encode("utf-8", "replace")
        with self._lock:
            try:
                if self._closed:
                    raise OSError(9, "the log is closed")
                if self._size and self._size + len(data) > self.max_bytes:
                    self._rotate()
                os.write(self._fd, data)  # O_APPEND: one write per line keeps lines whole
                self._size += len(data)
                self._dirty = True
                if urgent:
                    if self._clock() - self._last_sync >= URGENT_GAP:
                        self._sync_now()
                    else:
                        self._wake.set()  # the thread syncs once the gap has passed
            except OSError as exc:
                self._dropped(exc)

    def add_housekeeper(self, work: Callable[[bool], None]) -> None:
        """Run ``work(False)`` on the sync thread at every wake (at least every
        ``sync_interval``), and ``work(True)`` once at close before the file closes. It
        runs outside the file's lock, so it may write lines."""
        self._housekeepers.append(work)

    def flush(self) -> None:
        """Sync what was written (close does it too)."""
        with self._lock:
            if self._dirty and not self._closed:
                try:
                    self._sync_now()
                except OSError as exc:
                    self._dropped(exc)

    def _sync_now(self) -> None:
        self._sync(self._fd)
        self.syncs += 1
        self._dirty = False
        self._last_sync = self._clock()

    def _sync_loop(self, interval: float) -> None:
        while True:
            urgent = self._wake.wait(interval)
            self._wake.clear()
            if self._closed:
                return
            for work in self._housekeepers:
                work(False)
            if urgent:
                gap = URGENT_GAP - (self._clock() - self._last_sync)
                if gap > 0:
                    time.sleep(gap)
            self.flush()

    def _dropped(self, exc: OSError) -> None:
        self.dropped += 1
        if self.dropped == 1:
            with contextlib.suppress(OSError):
                sys.stderr.write(f"nkat-supervise: cannot write the log {self.path}: "
                                 f"{exc.strerror}; lines are being dropped\n")

    def _rotate(self) -> None:
        if self._dirty:
            self._sync_now()  # the rotated file keeps what it holds
        os.close(self._fd)
        oldest = self.path if self.backups <= 0 else \
            self.path.with_name(f"{self.path.name}.{self.backups}")
        # Invariant: the head is the log's first files, in order. Only the file about to
        # be deleted can join it, and rotation deletes oldest first, so each one that
        # joins is the one after the last; once full, it never takes another.
        if self._head_wants_more() and os.path.exists(oldest):
            with contextlib.suppress(OSError):  # the head is a kindness; rotation must go on
                size = os.stat(oldest).st_size
                os.replace(oldest, loghead.head_path(self.path, self._head_next))
                self._head_next += 1
                self._head_sizes.append(size)
        if self.backups <= 0:
            with contextlib.suppress(FileNotFoundError):  # gone to the head
                os.unlink(self.path)
        else:
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = 0

    def _head_wants_more(self) -> bool:
        most_bytes, most_files = self._head_limits
        return sum(self._head_sizes) < most_bytes and len(self._head_sizes) < most_files

    def close(self) -> None:
        """Sync and close; the sync thread ends. Housekeepers run first (once)."""
        with self._lock:
            closing = not self._closed and not self._closing
            self._closing = True
        if closing:
            for work in self._housekeepers:
                work(True)
        with self._lock:
            if self._closed:
                return
            try:
                if self._dirty:
                    self._sync_now()
            except OSError as exc:
                self._dropped(exc)
            finally:
                self._closed = True
                os.close(self._fd)
        self._wake.set()
        if self._syncer is not threading.current_thread():
            self._syncer.join()


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


class _LineLogger:
    """The structlog "logger" at the end of the pipeline: writes the rendered line,
    synced at once for warning and above."""

    def __init__(self, sink: RotatingLineFile) -> None:
        self._sink = sink

    def msg(self, message: str) -> None:
        self._sink.write_line(message)

    def urgent(self, message: str) -> None:
        self._sink.write_line(message, urgent=True)

    debug = info = log = msg
    warning = error = critical = exception = urgent


class RateLimit:
    """The structlog processor that applies :class:`~nkat.supervisor.log_rate.
    LogRateLimiter` to every line: a line it holds back raises ``DropEvent``; the
    summaries of ended windows are written first, through ``summaries`` (a logger that
    is not limited). Thread-safe; ``housekeep`` is the sink's housekeeper."""

    def __init__(self, limiter: LogRateLimiter, summaries: Any,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limiter = limiter
        self._summaries = summaries
        self._clock = clock
        self._lock = threading.Lock()

    def __call__(self, _logger: Any, _method: str, event_dict: dict[str, Any]) -> Any:
        epoch = event_dict.get("epoch")
        with self._lock:
            now = self._clock()
            self._write(self.limiter.due(now))
            if self.limiter.admit(now, str(event_dict.get("event")),
                                  str(event_dict.get("component")),
                                  epoch if isinstance(epoch, int) else None,
                                  str(event_dict.get("level")), str(event_dict.get("ts"))):
                return event_dict
        raise structlog.DropEvent

    def housekeep(self, closing: bool) -> None:
        """Write the counts of ended windows; at close, every count left."""
        with self._lock:
            self._write(self.limiter.drain() if closing else self.limiter.due(self._clock()))

    def _write(self, ended: list[Suppressed]) -> None:
        for s in ended:
            fields: dict[str, Any] = {
                "suppressed_event": s.event, "suppressed_component": s.component,
                "count": s.count, "window_s": s.window_s, "first_ts": s.first,
                "last_ts": s.last}
            if s.epoch is not None:
                fields["epoch"] = s.epoch
            level = _LEVEL_NUMBERS[s.level.upper()]
            self._summaries.log(level, "log.suppressed", **fields)


def open_run_log(path: Path, *, run_id: str, max_bytes: int, backups: int,
                 component: str = "supervisor", rate: LogRateSettings | None = None,
                 clock: Callable[[], float] = time.monotonic) -> tuple[Any, RotatingLineFile]:
    """A structlog logger bound to the run, and the file it writes (close it at the end).
    ``rate``: the flood limits (:class:`~nkat.supervisor.log_rate.LogRateSettings`);
    ``clock``: the monotonic clock their windows run on."""
    sink = RotatingLineFile(path, max_bytes, backups)
    line_logger = _LineLogger(sink)
    summaries = _wrap(line_logger, []).bind(run_id=run_id, component=component)
    limit = RateLimit(LogRateLimiter(rate), summaries, clock)
    sink.add_housekeeper(limit.housekeep)
    logger = _wrap(line_logger, [limit])
    return logger.bind(run_id=run_id, component=component), sink


def _wrap(line_logger: _LineLogger, middle: list[Any]) -> Any:
    return structlog.wrap_logger(
        line_logger,
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            *middle,  # after the stamp: a held-back line's ts is what its summary reports
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(default=repr),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(0),
        cache_logger_on_first_use=False,
    )
