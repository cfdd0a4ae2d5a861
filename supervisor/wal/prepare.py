"""Preparing the next segment file, zero-filled and synced, before a roll needs it.

    prep = Preparer(io, wal_dir, segment_size, background=True, wait=1.0)
    prep.start(number)          # begin preparing the next file, once
    ready = prep.take(number)   # the prepared file; or, after ``wait`` s, a quick one
    prep.close()                # stop a preparation in flight

Preparing reserves the space (posix_fallocate) and writes the whole segment's zeros,
then syncs it: 0.14 s for 64 MiB on ext4, but seconds on a file system without
fallocate (FUSE, some network file systems), where the zeros cost what they weigh. In
the background (a thread, as etcd's file pipeline does it) nothing waits for that
unless a roll, or the first segment of a new log, needs the file first. Then it waits
at most ``wait`` seconds and takes a *quick* file instead: extended to its full size
without writing it (sparse) and synced, which costs about one append. Either way the
file is durable at its full size, under a ``*.tmp`` name, before the roll gives it a
header and its segment name (writer._install).

Inline (``background=False``, the default for an in-memory FileIO) prepares at
``start``, in the caller's thread, and raises its error there: operation orders stay
deterministic for the crash tests.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .fileio import CHUNK, ZEROS, FileIO
from .format import TMP_SUFFIX, segment_name


@dataclass(frozen=True)
class Prepared:
    """A durable file of ``size`` zeros, open read-write, still named ``path``."""

    fd: int
    path: Path
    size: int


class _Cancelled(Exception):
    pass


@dataclass
class _Job:
    number: int
    done: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    result: Prepared | None = None
    error: OSError | None = None


class Preparer:
    def __init__(self, io: FileIO, wal_dir: Path, size: int, *, background: bool,
                 wait: float) -> None:
        self.io, self.wal_dir, self.size = io, wal_dir, size
        self.background, self.wait = background, wait
        self._job: _Job | None = None
        #: How many quick files were taken because a preparation was not ready in time.
        self.quick_files = 0

    def start(self, number: int) -> None:
        """Begin preparing a file for segment ``number`` unless one is on its way. Inline,
        prepare it now and raise OSError if that fails."""
        if self._job is not None:
            return
        job = self._job = _Job(number)
        if self.background:
            job.thread = threading.Thread(target=self._run, args=(job,), daemon=True,
                                          name=f"wal-prepare-{number:x}")
            job.thread.start()
            return
        self._run(job)
        if job.error is not None:
            self._job = None
            raise job.error

    def take(self, number: int) -> Prepared:
        """A prepared file for segment ``number`` (whatever number it was started for);
        OSError if its preparation failed. In the background, if none is ready within
        ``wait`` seconds, a quick file, and the preparation goes on for the next roll."""
        self.start(number)
        job = self._job
        assert job is not None
        if not job.done.wait(self.wait if self.background else None):
            self.quick_files += 1
            return quick_file(self.io, self.wal_dir, number, self.size)
        self._job = None
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def close(self) -> None:
        """Stop a preparation in flight and close a prepared file nobody took (its
        ``*.tmp`` is removed at the next open)."""
        job, self._job = self._job, None
        if job is None:
            return
        job.cancel.set()
        if job.thread is not None:
            job.thread.join()
        if job.result is not None:
            self.io.close(job.result.fd)

    def _run(self, job: _Job) -> None:
        try:
            job.result = _prepare(self.io, self.wal_dir, job.number, self.size, job.cancel)
        except _Cancelled:
            pass
        except OSError as exc:
            job.error = exc
        finally:
            job.done.set()


def _prepare(io: FileIO, wal_dir: Path, number: int, size: int,
             cancel: threading.Event) -> Prepared:
    """A ``*.wal.tmp`` file of ``size`` zeros, durable, without a header yet (the header
    names the previous segment's seal, which the roll has not written yet)."""
    path = wal_dir / (segment_name(number) + TMP_SUFFIX)
    fd = io.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        # fallocate reserves the space (ENOSPC now, not mid-append); writing the zeros
        # as well leaves blocks that appends overwrite, so each append's fdatasync has
        # data to flush but no extent to convert: on ext4 about 1.4x the appends per
        # second of fallocate alone (tools/bench.py wal). PostgreSQL zero-fills its WAL
        # segments for the same reason. Without fallocate, the zeros do it all.
        try:
            io.fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
        for offset in range(0, size, CHUNK):
            if cancel.is_set():
                raise _Cancelled
            io.pwrite(fd, ZEROS[:size - offset], offset)
        io.fdatasync(fd)
    except BaseException:
        io.close(fd)
        raise
    return Prepared(fd, path, size)


def quick_file(io: FileIO, wal_dir: Path, number: int, size: int) -> Prepared:
    """A ``*.wal.tmp`` file of ``size`` bytes that reads as zeros, made by writing its
    last byte (sparse where the file system allows), and synced: as durable as a
    prepared file, without the wait. Appends to it allocate blocks as they go."""
    path = wal_dir / (segment_name(number)[:-len(".wal")] + ".quick.wal" + TMP_SUFFIX)
    fd = io.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        io.pwrite(fd, b"\0", size - 1)
        io.fdatasync(fd)
    except BaseException:
        io.close(fd)
        raise
    return Prepared(fd, path, size)
