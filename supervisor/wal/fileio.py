"""The small file-system interface every WAL operation goes through.

``RealIO`` is the operating system. ``RecordingIO`` (recording.py) is an in-memory file
system with the same methods that records each operation, so tests can inject errors
and rebuild what a power loss at any point could have left on disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

#: The piece size in which the log reads and zeroes ranges of a segment: reading a
#: preallocated 64 MiB segment holds a chunk in memory at a time, not the file.
CHUNK = 1 << 20
ZEROS = bytes(CHUNK)


class FileIO(Protocol):
    """File operations with POSIX meaning. Errors are raised as OSError."""

    def open(self, path: Path, flags: int) -> int:
        """Open with ``os.O_*`` flags (O_RDONLY, O_RDWR, O_WRONLY, O_CREAT, O_EXCL,
        O_TRUNC); files are created with mode 0600."""
        ...

    def close(self, fd: int) -> None: ...

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        """Up to ``size`` bytes from ``offset``; fewer only at the end of the file."""
        ...

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        """Write all of ``data`` at ``offset`` (the file grows as needed)."""
        ...

    def fdatasync(self, fd: int) -> None: ...

    def fsync(self, fd: int) -> None: ...

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        """Reserve space so that the file is at least ``offset + length`` bytes, the new
        bytes reading as zeros. OSError EOPNOTSUPP (or EINVAL) where the file system
        cannot; the caller then writes zeros itself if it needs them."""
        ...

    def read_file(self, path: Path) -> bytes:
        """The whole file (a blob's state; segments are read with read_range)."""
        ...

    def read_range(self, path: Path, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of the file from ``offset``; fewer only at its end."""
        ...

    def size(self, path: Path) -> int: ...

    def exists(self, path: Path) -> bool: ...

    def listdir(self, path: Path) -> list[str]: ...

    def mkdir(self, path: Path) -> None: ...

    def rename(self, src: Path, dst: Path) -> None: ...

    def unlink(self, path: Path) -> None: ...

    def fsync_dir(self, path: Path) -> None:
        """Make the directory's entries (creates, renames, unlinks) durable."""
        ...


class RealIO:
    """FileIO on the operating system."""

    def open(self, path: Path, flags: int) -> int:
        return os.open(path, flags | os.O_CLOEXEC, 0o600)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        parts = []
        while size > 0:
            chunk = os.pread(fd, size, offset)
            if not chunk:
                break
            parts.append(chunk)
            size -= len(chunk)
            offset += len(chunk)
        return b"".join(parts)

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        # The one caller (prepare._prepare) writes the zeros itself after this, so an
        # unsupported fallocate is its to ignore: no fallback here that writes them twice.
        os.posix_fallocate(fd, offset, length)

    def read_file(self, path: Path) -> bytes:
        with open(path, "rb", buffering=0) as f:
            return f.readall()

    def read_range(self, path: Path, offset: int, length: int) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return self.pread(fd, length, offset)
        finally:
            os.close(fd)

    def size(self, path: Path) -> int:
        return os.stat(path).st_size

    def exists(self, path: Path) -> bool:
        return os.path.exists(path)

    def listdir(self, path: Path) -> list[str]:
        return os.listdir(path)

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o700)

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
