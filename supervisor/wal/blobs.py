"""Checkpoint states too large to inline: one blob file each, checked by chunk CRCs.

A blob is written to ``<name>.tmp``, fsynced, renamed and its directory fsynced before
the ``ckpt_ref`` record that names it is appended: that record is the commit point, so
a blob without a record is an orphan from a crash and is removed at the next open.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from .fileio import CHUNK as READ_BYTES
from .fileio import FileIO
from .format import BLOB_SUFFIX, TMP_SUFFIX, checksum


def blob_name(ckpt_seq: int) -> str:
    # The random part keeps a checkpoint resent after a crash from reusing the name of
    # an orphan blob that may still be on disk.
    return f"{ckpt_seq:016x}-{secrets.token_hex(4)}{BLOB_SUFFIX}"


def chunk_crcs(state: bytes, chunk: int) -> list[int]:
    return [checksum(state[i:i + chunk]) for i in range(0, len(state), chunk)]


def write_blob(io: FileIO, blob_dir: Path, name: str, state: bytes) -> None:
    """Make ``blob_dir/name`` hold ``state`` durably (file and directory entry)."""
    tmp = blob_dir / (name + TMP_SUFFIX)
    fd = io.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        io.pwrite(fd, state, 0)
        io.fsync(fd)
    finally:
        io.close(fd)
    io.rename(tmp, blob_dir / name)
    io.fsync_dir(blob_dir)


class BlobMissing(ValueError):
    """The blob file is not there (damage, or retention racing a read-only reader)."""


def read_blob(io: FileIO, path: Path, size: int, chunk: int, crcs: list[int]) -> bytes:
    """The blob's bytes after checking size and every chunk; ValueError says what is
    wrong (BlobMissing for a missing file; other OSErrors go to the caller)."""
    try:
        data = io.read_file(path)
    except FileNotFoundError:
        raise BlobMissing(f"blob {path.name} is missing") from None
    if len(data) != size:
        raise ValueError(f"blob {path.name} has {len(data)} bytes, expected {size}")
    for i, (want, got) in enumerate(zip(crcs, chunk_crcs(data, chunk), strict=True)):
        if want != got:
            raise ValueError(f"blob {path.name} chunk {i} checksum mismatch")
    return data


def check_blob(io: FileIO, path: Path, size: int, chunk: int, crcs: list[int]) -> str:
    """What read_blob checks, a chunk in memory at a time; returns the state's digest
    (SHA-256, hex, as state_digest) for the caller to compare."""
    try:
        actual = io.size(path)
    except FileNotFoundError:
        raise BlobMissing(f"blob {path.name} is missing") from None
    if actual != size:
        raise ValueError(f"blob {path.name} has {actual} bytes, expected {size}")
    digest = hashlib.sha256()
    per_read = max(1, READ_BYTES // chunk)  # chunks per read: about 1 MiB at a time
    for first in range(0, len(crcs), per_read):
        data = io.read_range(path, first * chunk, per_read * chunk)
        for i, want in enumerate(crcs[first:first + per_read], first):
            piece = data[(i - first) * chunk:(i - first + 1) * chunk]
            if checksum(piece) != want:
                raise ValueError(f"blob {path.name} chunk {i} checksum mismatch")
        digest.update(data)
    return digest.hexdigest()
