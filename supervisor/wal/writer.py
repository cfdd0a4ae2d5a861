"""Appending: frames into the newest segment, one write and one fdatasync each, and the
roll to a new segment (seal, header, rename, directory fsync, run record).

The writer raises OSError as it comes; the Wal turns it into fail-stop. It keeps the
list of segments, the newest last, and each one's end and seq range up to date.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .fileio import CHUNK, ZEROS, FileIO
from .format import (
    HEADER_SIZE,
    TMP_SUFFIX,
    RecordType,
    SegmentHeader,
    encode_frame,
    frame_size,
    pack_payload,
    segment_name,
)
from .reader import SegmentScan

#: Largest seal payload; every segment keeps room for its seal frame.
SEAL_RESERVE = frame_size(len(pack_payload({"segment": (1 << 64) - 1})))


@dataclass(frozen=True)
class Written:
    """Where a record went."""

    seq: int
    segment: int
    offset: int
    end: int
    crc: int


class SegmentWriter:
    def __init__(self, io: FileIO, wal_dir: Path, segment_size: int,
                 segments: list[SegmentScan], next_seq: int, run: bytes) -> None:
        """Continue the newest of ``segments`` at its end; ``run`` is the payload of
        the newest run record, repeated at the start of each new segment."""
        self.io, self.wal_dir, self.segment_size = io, wal_dir, segment_size
        self.segments = segments
        self.next_seq = next_seq
        self.run = run
        self._fd = io.open(segments[-1].path, os.O_RDWR)
        self._prepared: tuple[int, int] | None = None  # (segment number, fd) of a *.tmp

    @classmethod
    def create(cls, io: FileIO, wal_dir: Path, segment_size: int, segments: list[SegmentScan],
               next_seq: int, run: bytes) -> SegmentWriter:
        """Start a new segment after ``segments`` (which may be empty or end sealed)."""
        prev = segments[-1] if segments else None
        number, prev_tail, prev_salt = 0, 0, 0
        if prev is not None:
            assert prev.seal_crc is not None
            number, prev_tail, prev_salt = prev.number + 1, prev.seal_crc, prev.salt
        fd = _prepare(io, wal_dir, number, segment_size)
        try:
            seg = _install(io, wal_dir, number, fd, prev_tail, prev_salt)
        finally:
            io.close(fd)
        return cls(io, wal_dir, segment_size, segments + [seg], next_seq, run)

    @property
    def active(self) -> SegmentScan:
        return self.segments[-1]

    def append(self, rtype: RecordType, payload: bytes) -> Written:
        """Write one record durably, rolling to a new segment first if it does not fit."""
        seg = self.active
        # Invariant: a segment keeps room for its seal; one that holds only its run
        # record takes any record whole, so a record larger than a segment still fits.
        if seg.end + frame_size(len(payload)) + SEAL_RESERVE > self.segment_size \
                and seg.first_seq != seg.last_seq:
            self._roll()
        elif seg.end > self.segment_size // 2:
            # Ahead of the roll, and before this record is written, so that a failure
            # here leaves nothing half done.
            self.prepare_next()
        written = self._write(rtype, payload)
        if rtype == RecordType.RUN:
            self.run = payload
        return written

    def start_segment(self) -> None:
        """Write the run record a segment begins with (its first frame)."""
        assert self.active.first_seq is None
        self._write(RecordType.RUN, self.run)

    def prepare_next(self) -> None:
        """Create and preallocate the next segment's file (once), so that a roll only
        has to write its header."""
        number = self.active.number + 1
        if self._prepared is None:
            self._prepared = (number, _prepare(self.io, self.wal_dir, number,
                                               self.segment_size))

    def close(self) -> None:
        for fd in (self._fd, self._prepared[1] if self._prepared else None):
            if fd is not None:
                self.io.close(fd)
        self._prepared = None

    def _write(self, rtype: RecordType, payload: bytes) -> Written:
        seg = self.active
        frame = encode_frame(rtype, seg.salt, self.next_seq, payload)
        self.io.pwrite(self._fd, frame, seg.end)
        self.io.fdatasync(self._fd)
        # Invariant: a frame is synced before the next one is written, so at most one
        # frame is ever in flight; recovery's torn-tail rule depends on it.
        written = Written(self.next_seq, seg.number, seg.end, seg.end + len(frame),
                          int.from_bytes(frame[:4], "little"))
        if seg.first_seq is None:
            seg.first_seq = written.seq
        seg.last_seq, seg.end = written.seq, written.end
        seg.content_end = max(seg.content_end, written.end)
        self.next_seq += 1
        return written

    def _roll(self) -> None:
        old = self.active
        old.seal_crc = self._write(RecordType.SEAL, pack_payload({"segment": old.number})).crc
        self.prepare_next()
        assert self._prepared is not None
        number, fd = self._prepared
        new = _install(self.io, self.wal_dir, number, fd, old.seal_crc, old.salt)
        self._prepared = None
        self.io.close(self._fd)
        self._fd = fd
        self.segments.append(new)
        self.start_segment()


def _prepare(io: FileIO, wal_dir: Path, number: int, segment_size: int) -> int:
    """A ``*.tmp`` file of ``segment_size`` zeros, durable, without a header yet (the
    header names the previous segment's seal, which the roll has not written yet)."""
    fd = io.open(wal_dir / (segment_name(number) + TMP_SUFFIX),
                 os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        # fallocate reserves the space (ENOSPC now, not mid-append); writing the zeros
        # as well leaves blocks that appends overwrite, so each append's fdatasync has
        # data to flush but no extent to convert: on ext4 about 1.4x the appends per
        # second of fallocate alone (tools/bench.py wal). PostgreSQL zero-fills its WAL
        # segments for the same reason.
        io.fallocate(fd, 0, segment_size)
        for offset in range(0, segment_size, CHUNK):
            io.pwrite(fd, ZEROS[:segment_size - offset], offset)
        io.fdatasync(fd)
    except OSError:
        io.close(fd)
        raise
    return fd


def _install(io: FileIO, wal_dir: Path, number: int, fd: int, prev_tail: int,
             prev_salt: int) -> SegmentScan:
    """Give a prepared file its header and its final name, durably."""
    salt = _new_salt(prev_salt)
    io.pwrite(fd, SegmentHeader(salt, number, prev_tail).encode(), 0)
    io.fdatasync(fd)
    path = wal_dir / segment_name(number)
    io.rename(wal_dir / (segment_name(number) + TMP_SUFFIX), path)
    io.fsync_dir(wal_dir)
    return SegmentScan(number, path, salt, HEADER_SIZE, content_end=HEADER_SIZE)


def _new_salt(avoid: int) -> int:
    # No zero byte: the reader searches for the salt, and zeros are what preallocated
    # space is made of.
    while True:
        salt = int.from_bytes(os.urandom(4), "little")
        if salt != avoid and 0 not in salt.to_bytes(4, "little"):
            return salt
