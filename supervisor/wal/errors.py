"""Typed errors of the WAL: what a caller can catch and what each one means.

``WalCorrupted`` says durable data is damaged (fail closed); ``WalIOError`` says the
operating system refused an operation and the log stopped (fail-stop, never retried).
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
