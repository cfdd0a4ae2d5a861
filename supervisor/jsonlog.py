"""The run's structured log: one JSON object per line in ``logs/supervisor.jsonl``.

Only the supervisor writes it (worker ``log`` messages and captured output are forwarded
here). Built on structlog; every line has ``ts`` (UTC ISO-8601), ``level``, ``event`` (a
stable dotted name), ``run_id``, ``component`` and, where it applies, ``epoch``.

    log, sink = open_run_log(run.log_file, run_id="r1", max_bytes=16 << 20, backups=5)
    log.info("worker.spawned", epoch=3, pid=4242)

Rotation is by size: ``supervisor.jsonl`` → ``.1`` → ``.2`` …; a line is never split
across files, and a reader following the log sees each line exactly once.

Durability, as journald does it: a line at warning or above is synced (fdatasync) before
the call returns, so the account of what went wrong survives a power cut; other lines
are synced within ``sync_interval`` seconds (2 by default) by a small thread that sleeps
otherwise. Urgent syncs closer together than ``URGENT_GAP`` are left to that thread,
which then syncs at once: a flood of warnings costs at most one sync per gap.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")
#: Levels whose lines are synced before the call returns.
URGENT_LEVELS = frozenset({"warning", "error", "critical", "exception"})
#: Seconds within which every line is synced.
SYNC_INTERVAL = 2.0
#: Least seconds between two syncs made by the caller of an urgent line.
URGENT_GAP = 0.05


class RotatingLineFile:
    """Appends whole lines to a file and rotates it by size. Thread-safe.

    ``sync`` is the call that makes the file's data durable (os.fdatasync); ``clock``
    measures the gap between urgent syncs (time.monotonic).
    """

    def __init__(self, path: Path, max_bytes: int, backups: int, *,
                 sync_interval: float = SYNC_INTERVAL,
                 sync: Callable[[int], None] = os.fdatasync,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._sync, self._clock = sync, clock
        self.dropped = 0
        self.syncs = 0
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = os.fstat(self._fd).st_size
        if self._size and not _ends_with_newline(path):
            # A crash tore the last line: end it, so the next line starts whole.
            self._size += os.write(self._fd, b"\n")
        self._dirty = False
        self._last_sync = float("-inf")
        self._closed = False
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
        if self.backups <= 0:
            os.unlink(self.path)
        else:
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = 0

    def close(self) -> None:
        """Sync and close; the sync thread ends."""
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


def open_run_log(path: Path, *, run_id: str, max_bytes: int, backups: int,
                 component: str = "supervisor") -> tuple[Any, RotatingLineFile]:
    """A structlog logger bound to the run, and the file it writes (close it at the end)."""
    sink = RotatingLineFile(path, max_bytes, backups)
    logger = structlog.wrap_logger(
        _LineLogger(sink),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(default=repr),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(0),
        cache_logger_on_first_use=False,
    )
    return logger.bind(run_id=run_id, component=component), sink
