"""Reading the log: list segments, parse and check frames, scan the whole log.

Read-only. ``scan_log`` says what is on disk and where the first problem is, telling a
torn tail (a crash mid-append) from corruption (damage to acknowledged data); recovery
decides what to do about it and verify reports it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..messages import state_digest
from .blobs import read_blob
from .checkpoints import CheckpointEntry, parse_entry
from .errors import WalCorrupted
from .fileio import FileIO
from .format import (
    ALIGN,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    HEADER_SIZE,
    MAX_PAYLOAD,
    RECORD_TYPES,
    SALT_OFFSET,
    ZERO_FRAME_HEADER,
    RecordType,
    SegmentHeader,
    frame_crc,
    padded,
    parse_segment_name,
    unpack_payload,
)

_ZERO_CHUNK = bytes(1 << 16)


@dataclass(frozen=True)
class Frame:
    offset: int
    end: int
    rtype: int
    seq: int
    crc: int
    payload: bytes


@dataclass
class SegmentScan:
    number: int
    path: Path
    salt: int
    end: int  # just past the last good frame: where the next frame goes
    first_seq: int | None = None
    last_seq: int | None = None
    seal_crc: int | None = None  # the seal frame's crc field, once sealed
    content_end: int = 0  # just past the last non-zero byte


@dataclass(frozen=True)
class Stop:
    """Where reading stopped early. ``torn``: no valid frame follows, so it is the tail
    of an append that a crash interrupted; otherwise acknowledged data is damaged."""

    segment: int
    path: Path
    offset: int
    reason: str
    torn: bool


@dataclass
class LogScan:
    segments: list[SegmentScan]  # readable segments, the last possibly up to ``stop``
    records: int
    run: dict[str, Any] | None  # the newest run record's payload
    checkpoints: list[CheckpointEntry]
    stop: Stop | None = None

    def path_of(self, segment: int) -> Path:
        return next(s.path for s in self.segments if s.number == segment)

    @property
    def last_seq(self) -> int:
        return max((s.last_seq for s in self.segments if s.last_seq is not None), default=0)


def list_segments(io: FileIO, wal_dir: Path) -> list[tuple[int, Path]]:
    numbered = ((parse_segment_name(name), name) for name in io.listdir(wal_dir))
    return sorted((n, wal_dir / name) for n, name in numbered if n is not None)


class FrameReader:
    """Reads frames from ``start`` and stops at the first that is not the next record
    of this segment. Afterwards ``end`` is just past the last good frame and ``reason``
    says why it stopped (None: a zero header or the end of the file)."""

    def __init__(self, buf: bytes, salt: int, start: int, next_seq: int | None) -> None:
        self.buf, self.salt, self.end, self.next_seq = buf, salt, start, next_seq
        self.reason: str | None = None

    def __iter__(self) -> Iterator[Frame]:
        buf, size = self.buf, len(self.buf)
        offset = self.end
        while offset + FRAME_HEADER_SIZE <= size:
            header = buf[offset:offset + FRAME_HEADER_SIZE]
            if header == ZERO_FRAME_HEADER:
                return
            crc, length, rtype, salt, seq = FRAME_HEADER.unpack(header)
            body = offset + FRAME_HEADER_SIZE
            frame_end = body + padded(length)
            if rtype not in RECORD_TYPES:
                self.reason = f"bad record type {rtype}"
            elif not 0 < length <= MAX_PAYLOAD or frame_end > size:
                self.reason = f"bad frame length {length}"
            elif salt != self.salt:
                self.reason = "salt mismatch"
            else:
                payload = buf[body:body + length]
                if frame_crc(header[4:], payload) != crc:
                    self.reason = "checksum mismatch"
                elif self.next_seq is not None and seq != self.next_seq:
                    self.reason = f"record seq {seq}, expected {self.next_seq}"
                else:
                    # Advance before yielding: the caller may stop at a seal.
                    self.end, self.next_seq = frame_end, seq + 1
                    yield Frame(offset, frame_end, rtype, seq, crc, payload)
                    offset = frame_end
                    continue
            return
        if any(buf[offset:]):  # fewer bytes than a frame header, and not all zero
            self.reason = "frame header cut short by the end of the file"


def find_valid_frame(buf: bytes, salt: int, start: int) -> int | None:
    """Offset of the first frame at or after ``start`` that carries this segment's salt
    and a matching checksum (whatever its seq), or None."""
    needle = salt.to_bytes(4, "little")
    pos = buf.find(needle, start + SALT_OFFSET)
    while pos >= 0:
        offset = pos - SALT_OFFSET
        if offset % ALIGN == 0 and offset + FRAME_HEADER_SIZE <= len(buf):
            crc, length, rtype, _, _ = FRAME_HEADER.unpack_from(buf, offset)
            body = offset + FRAME_HEADER_SIZE
            if (rtype in RECORD_TYPES and 0 < length <= MAX_PAYLOAD
                    and body + padded(length) <= len(buf)
                    and frame_crc(buf[offset + 4:body], buf[body:body + length]) == crc):
                return offset
        pos = buf.find(needle, pos + 1)
    return None


def content_end(buf: bytes, start: int) -> int:
    """Just past the last non-zero byte at or after ``start`` (``start`` if none)."""
    end = len(buf)
    while end > start:
        lo = max(start, end - len(_ZERO_CHUNK))
        chunk = buf[lo:end]
        if chunk != _ZERO_CHUNK[:end - lo]:
            return lo + len(chunk.rstrip(b"\0"))
        end = lo
    return start


def scan_log(io: FileIO, wal_dir: Path, *, decode_all: bool = False) -> LogScan:
    """Read every segment and check it. Sealed segments must verify completely (every
    frame, and zeros after the seal); the newest may end in a torn tail. ``decode_all``
    also decodes payloads that recovery does not need (verify asks for it)."""
    scan = LogScan([], 0, None, [])
    listed = list_segments(io, wal_dir)
    prev: SegmentScan | None = None
    for i, (number, path) in enumerate(listed):
        last = i == len(listed) - 1
        stop = _scan_segment(scan, io.read_file(path), number, path, prev, last, decode_all)
        if stop is not None:
            scan.stop = stop
            break
        prev = scan.segments[-1]
    return scan


def _scan_segment(scan: LogScan, buf: bytes, number: int, path: Path,
                  prev: SegmentScan | None, last: bool, decode_all: bool) -> Stop | None:
    def corrupt(offset: int, reason: str) -> Stop:
        return Stop(number, path, offset, reason, torn=False)

    try:
        header = SegmentHeader.decode(buf)
    except ValueError as exc:
        return corrupt(0, str(exc))
    if header.segment != number:
        return corrupt(0, f"header names segment {header.segment}")
    if prev is not None:
        if number != prev.number + 1:
            return corrupt(0, f"segment {prev.number + 1:016x} is missing")
        if header.prev_tail != prev.seal_crc:
            return corrupt(0, f"does not follow segment {prev.number:016x}")
    seg = SegmentScan(number, path, header.salt, HEADER_SIZE)
    scan.segments.append(seg)
    next_seq = prev.last_seq + 1 if prev is not None and prev.last_seq is not None else None
    reader = FrameReader(buf, header.salt, HEADER_SIZE, next_seq)
    for frame in reader:
        if seg.first_seq is None:
            if frame.rtype != RecordType.RUN:
                return corrupt(frame.offset, "segment does not start with a run record")
            seg.first_seq = frame.seq
        seg.last_seq = frame.seq
        scan.records += 1
        try:
            if frame.rtype == RecordType.RUN:
                scan.run = unpack_payload(frame.payload)
            elif frame.rtype in (RecordType.CKPT, RecordType.CKPT_REF):
                scan.checkpoints.append(parse_entry(frame.rtype, frame.seq, number, frame.offset,
                                                    frame.end, frame.payload))
            elif decode_all:
                unpack_payload(frame.payload)
        except ValueError as exc:
            return corrupt(frame.offset, str(exc))
        if frame.rtype == RecordType.SEAL:
            seg.seal_crc = frame.crc
            break
    seg.end = reader.end
    seg.content_end = content_end(buf, seg.end)
    if seg.seal_crc is not None or not last:
        # Invariant: nothing is ever written after a seal, and only the newest segment
        # is appended to, so any other difference is damage.
        if seg.seal_crc is None:
            return corrupt(seg.end, reader.reason or "segment is not sealed")
        if seg.content_end > seg.end:
            return corrupt(seg.end, "data after the seal")
        return None
    if reader.reason is None and seg.content_end == seg.end:
        return None
    # The newest segment stopped early. Its appends are one frame per write+fdatasync,
    # so at most its last frame was in flight when a crash came: if a verified frame
    # still follows, what stopped us was written and synced before it.
    reason = reader.reason or "data after the end of the log"
    follows = find_valid_frame(buf, header.salt, seg.end)
    if follows is not None:
        return corrupt(seg.end, f"{reason}, and a valid frame follows at {follows}")
    return Stop(number, path, seg.end, reason, torn=True)


def segment_records(io: FileIO, seg: SegmentScan) -> Iterator[tuple[Frame, dict[str, Any]]]:
    """The frames of a scanned segment with their payloads, read and checked again;
    WalCorrupted if they no longer reach as far as the scan found."""
    reader = FrameReader(io.read_file(seg.path), seg.salt, HEADER_SIZE, seg.first_seq)
    for frame in reader:
        try:
            payload = unpack_payload(frame.payload)
        except ValueError as exc:
            raise WalCorrupted(seg.path, frame.offset, str(exc)) from None
        yield frame, payload
    if reader.end < seg.end:
        raise WalCorrupted(seg.path, reader.end, reader.reason or "records vanished")


def read_frame(io: FileIO, path: Path, offset: int) -> Frame:
    """The frame at ``offset`` of a segment, checked again (a checkpoint's state is read
    long after the scan that indexed it). ValueError if it no longer verifies."""
    fd = io.open(path, os.O_RDONLY)
    try:
        salt = SegmentHeader.decode(io.pread(fd, HEADER_SIZE, 0)).salt
        header = io.pread(fd, FRAME_HEADER_SIZE, offset)
        if len(header) < FRAME_HEADER_SIZE:
            raise ValueError("frame beyond the end of the segment")
        crc, length, rtype, frame_salt, seq = FRAME_HEADER.unpack(header)
        payload = io.pread(fd, length, offset + FRAME_HEADER_SIZE) if length <= MAX_PAYLOAD \
            else b""
    finally:
        io.close(fd)
    if frame_salt != salt or len(payload) != length or frame_crc(header[4:], payload) != crc:
        raise ValueError("frame no longer verifies")
    return Frame(offset, offset + FRAME_HEADER_SIZE + padded(length), rtype, seq, crc, payload)


def load_state(io: FileIO, segment: Path, entry: CheckpointEntry, blob_dir: Path) -> bytes:
    """A checkpoint's state, checked by frame CRC or blob chunk CRCs, then by digest.
    ValueError says what does not verify; other I/O errors go to the caller."""
    if entry.blob is None:
        frame = read_frame(io, segment, entry.offset)
        state = unpack_payload(frame.payload).get("state") if frame.seq == entry.seq else None
        if not isinstance(state, bytes):
            raise ValueError(f"checkpoint record {entry.seq} no longer found")
    else:
        state = read_blob(io, blob_dir / entry.blob, entry.size, entry.chunk, entry.crcs)
    if state_digest(state) != entry.meta["digest"]:
        raise ValueError(f"checkpoint {entry.meta['ckpt_seq']} state digest mismatch")
    return state
