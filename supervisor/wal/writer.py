"""Appending: frames into the newest segment, one write and one fdatasync each, and the
roll to a new segment (header, rename, directory fsync, then the seal, then the run
record).

The writer raises OSError as it comes; the Wal turns it into fail-stop. It keeps the
list of segments, the newest last, and each one's end, extents and seq range up to date.
Segment files come from a Preparer (prepare.py): zero-filled ahead, in the background
or inline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .fileio import FileIO
from .format import (
    HEADER_SIZE,
    RecordType,
    RunIdentity,
    SegmentHeader,
    encode_frame,
    frame_size,
    pack_payload,
    segment_name,
)
from .prepare import Prepared, Preparer
from .reader import SegmentScan, seal_payload

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
                 segments: list[SegmentScan], next_seq: int, run: bytes, *,
                 identity: RunIdentity, preparer: Preparer) -> None:
        """Continue the newest of ``segments`` at its end; ``run`` is the payload of
        the newest run record, repeated at the start of each new segment, ``identity``
        what new segment headers name."""
        self.io, self.wal_dir, self.segment_size = io, wal_dir, segment_size
        self.segments = segments
        self.next_seq = next_seq
        self.run = run
        self.identity = identity
        self.preparer = preparer
        self._fd = io.open(segments[-1].path, os.O_RDWR)

    @classmethod
    def create(cls, io: FileIO, wal_dir: Path, segment_size: int, segments: list[SegmentScan],
               next_seq: int, run: bytes, *, identity: RunIdentity,
               preparer: Preparer) -> SegmentWriter:
        """Start a new segment after ``segments`` (which may be empty or end sealed)."""
        prev = segments[-1] if segments else None
        number, prev_tail, prev_salt = 0, 0, 0
        if prev is not None:
            assert prev.seal_crc is not None
            number, prev_tail, prev_salt = prev.number + 1, prev.seal_crc, prev.salt
        prepared = preparer.take(number)
        try:
            seg = _install(io, wal_dir, number, prepared, prev_tail, prev_salt, identity)
        finally:
            io.close(prepared.fd)
        return cls(io, wal_dir, segment_size, segments + [seg], next_seq, run,
                   identity=identity, preparer=preparer)

    @property
    def active(self) -> SegmentScan:
        return self.segments[-1]

    def append(self, rtype: RecordType, payload: bytes) -> Written:
        """Write one record durably, rolling to a new segment first if it does not fit."""
        seg = self.active
        limit = seg.size or self.segment_size
        # Invariant: a segment keeps room for its seal; one that holds only its run
        # record takes any record whole, so a record larger than a segment still fits.
        if seg.end + frame_size(len(payload)) + SEAL_RESERVE > limit \
                and seg.first_seq != seg.last_seq:
            self._roll()
        elif seg.end > limit // 2:
            # Ahead of the roll, and before this record is written, so that a failure
            # here (inline) leaves nothing half done.
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
        """Begin preparing the next segment's file (once), so that a roll only has to
        write its header."""
        self.preparer.start(self.active.number + 1)

    def close(self) -> None:
        try:
            self.preparer.close()
        finally:
            self.io.close(self._fd)

    def _write(self, rtype: RecordType, payload: bytes) -> Written:
        seg = self.active
        return self._write_frame(seg, self._fd, encode_frame(rtype, seg.salt, self.next_seq,
                                                             payload))

    def _write_frame(self, seg: SegmentScan, fd: int, frame: bytes) -> Written:
        self.io.pwrite(fd, frame, seg.end)
        self.io.fdatasync(fd)
        # Invariant: a frame is synced before the next one is written, so at most one
        # frame is ever in flight; recovery's torn-tail rule depends on it.
        written = Written(self.next_seq, seg.number, seg.end, seg.end + len(frame),
                          int.from_bytes(frame[:4], "little"))
        seg.note_frame(written.seq, written.offset, written.end)
        self.next_seq += 1
        return written

    def _roll(self) -> None:
        old = self.active
        seal = encode_frame(RecordType.SEAL, old.salt, self.next_seq, seal_payload(old.number))
        seal_crc = int.from_bytes(seal[:4], "little")
        prepared = self.preparer.take(old.number + 1)
        try:
            new = _install(self.io, self.wal_dir, old.number + 1, prepared, seal_crc, old.salt,
                           self.identity)
            # Invariant: a segment is sealed only once its successor is durable under its
            # name, so a sealed newest segment means the newest one was lost. A crash
            # between the two leaves the successor empty, its header naming this seal's
            # crc: the next open writes the seal (recovery.finish_roll).
            written = self._write_frame(old, self._fd, seal)
        except BaseException:
            self.io.close(prepared.fd)
            raise
        old.seal_crc, old.seal_offset = seal_crc, written.offset
        self.io.close(self._fd)
        self._fd = prepared.fd
        self.segments.append(new)
        self.start_segment()


def _install(io: FileIO, wal_dir: Path, number: int, prepared: Prepared, prev_tail: int,
             prev_salt: int, identity: RunIdentity) -> SegmentScan:
    """Give a prepared file its header and its final name, durably."""
    salt = _new_salt(prev_salt)
    header = SegmentHeader(salt, number, prev_tail, prepared.size, identity)
    io.pwrite(prepared.fd, header.encode(), 0)
    io.fdatasync(prepared.fd)
    path = wal_dir / segment_name(number)
    io.rename(prepared.path, path)
    io.fsync_dir(wal_dir)
    return SegmentScan(number, path, salt, HEADER_SIZE, content_end=HEADER_SIZE,
                       start=HEADER_SIZE, size=prepared.size, file_size=prepared.size,
                       prev_tail=prev_tail, identity=identity)


def _new_salt(avoid: int) -> int:
    # No zero byte: the reader searches for the salt, and zeros are what preallocated
    # space is made of.
    while True:
        salt = int.from_bytes(os.urandom(4), "little")
        if salt != avoid and 0 not in salt.to_bytes(4, "little"):
            return salt
