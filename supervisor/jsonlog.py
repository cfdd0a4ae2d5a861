"""The run's structured log: one JSON object per line in ``logs/supervisor.jsonl``.

Only the supervisor writes it (worker ``log`` messages and captured output are forwarded
here). Built on structlog; every line has ``ts`` (UTC ISO-8601), ``level``, ``event`` (a
stable dotted name), ``run_id``, ``component`` and, where it applies, ``epoch``.

    log, sink = open_run_log(run.log_file, run_id="r1", max_bytes=16 << 20, backups=5)
    log.info("worker.spawned", epoch=3, pid=4242)

Rotation is by size: ``supervisor.jsonl`` → ``.1`` → ``.2`` …; a line is never split
across files, and a reader following the log sees each line exactly once.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Any

import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")


class RotatingLineFile:
    """Appends whole lines to a file and rotates it by size. Thread-safe."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self.dropped = 0
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = os.fstat(self._fd).st_size
        if self._size and not _ends_with_newline(path):
            # A crash tore the last line: end it, so the next line starts whole.
            self._size += os.write(self._fd, b"\n")

    def write_line(self, line: str) -> None:
        """Append one line. A failing disk loses log lines, never the run: the WAL, not
        the log, is what must be durable, and it has its own fail-stop."""
        data = (line.rstrip("\n") + "\n").encode("utf-8", "replace")
        with self._lock:
            try:
                if self._size and self._size + len(data) > self.max_bytes:
                    self._rotate()
                os.write(self._fd, data)  # O_APPEND: one write per line keeps lines whole
                self._size += len(data)
            except OSError as exc:
                self.dropped += 1
                if self.dropped == 1:
                    with contextlib.suppress(OSError):
                        sys.stderr.write(f"nkat-supervise: cannot write the log {self.path}: "
                                         f"{exc.strerror}; lines are being dropped\n")

    def _rotate(self) -> None:
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
        with self._lock:
            os.close(self._fd)


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


class _LineLogger:
    """The structlog "logger" at the end of the pipeline: writes the rendered line."""

    def __init__(self, sink: RotatingLineFile) -> None:
        self._sink = sink

    def msg(self, message: str) -> None:
        self._sink.write_line(message)

    debug = info = warning = error = critical = exception = log = msg


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
