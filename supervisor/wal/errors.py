"""Typed errors of the WAL: what a caller can catch and what each one means.

``WalCorrupted`` says durable data is damaged (fail closed), and its ``WalTruncated``
that a newer part of the log is gone as a whole (a deleted or truncated newest segment);
both can be salvaged. ``WalForeign`` says the log belongs to another run, which salvage
does not change. ``WalIOError`` says the operating system refused an operation and the
log stopped (fail-stop, never retried).
"""

from __future__ import annotations

from pathlib import Path


class WalError(Exception):
    """Base of every error the WAL raises on purpose."""


class WalCorrupted(WalError):
    """Sealed or acknowledged data does not verify.

    ``segment`` is the file where the damage was found (a segment, or for a checkpoint
    blob the segment holding the record that references it), ``offset`` the byte offset
    of the frame or header that failed, ``reason`` what failed.
    """

    def __init__(self, segment: Path, offset: int, reason: str) -> None:
        super().__init__(f"{segment}: offset {offset}: {reason}")
        self.segment = segment
        self.offset = offset
        self.reason = reason


class WalTruncated(WalCorrupted):
    """The newest part of the log is missing: its newest segment was deleted (the one
    before it is sealed, which happens only once its successor is durable), a segment is
    shorter than it was prepared (segments are zero-filled to full size before use, so a
    crash never leaves one short), or, with ``Wal.open(create=False)``, no segment is
    left at all. Acknowledged records, a stop record among them, may be gone."""


class WalForeign(WalError):
    """The log belongs to another run: a segment header or the run record names another
    run id or spec hash than the run opening it. Salvage does not apply; move the files
    back where they belong. ``segment`` is the file, ``found`` and ``expected`` say whose
    (as "run <id> (spec <hash>)")."""

    def __init__(self, segment: Path, found: str, expected: str) -> None:
        super().__init__(f"{segment}: belongs to {found}, not to {expected}; another run's "
                         "write-ahead log was copied here (move it back to its own run)")
        self.segment = segment
        self.found = found
        self.expected = expected


class WalIOError(WalError):
    """An I/O operation failed and the log stopped (fail-stop): no further appends.

    After a failed fsync the kernel may already have dropped the dirty pages, so a retry
    could report success for data that is gone (PostgreSQL's "fsyncgate"). What was
    acknowledged before the failure stays durable; reopen to continue. ``errno`` is the
    operating system's error number, or None when the log had already stopped.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno
