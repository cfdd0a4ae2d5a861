"""Reading the log: list segments, parse and check frames, scan the whole log.

Read-only. ``scan_log`` says what is on disk and where the first problem is, telling a
torn tail (a crash mid-append) from corruption (damage to acknowledged data); recovery
decides what to do about it and verify reports it. Segments are read in ranged reads of
a chunk (fileio.CHUNK) at a time, never whole: a preallocated segment is mostly zeros,
and reading it costs memory for the records it holds, not for its size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from nkat.protocol.messages import state_digest

from .blobs import read_blob
from .checkpoints import CheckpointEntry, parse_entry
from .errors import WalCorrupted
from .fileio import CHUNK, ZEROS, FileIO
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
    frame_crc_of,
    padded,
    parse_segment_name,
    unpack_payload,
)


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


class SegmentFile:
    """A segment's bytes, fetched on demand in ranged reads of at most CHUNK bytes (or
    one record, if larger). The last read is kept (the window), so frames read one after
    another cost one read per chunk; one that straddles the window's end makes the next
    read start inside it.

    ``size`` is the file's real size, zeros past the last record included: frame lengths
    are checked against it, never against where the non-zero bytes end (a frame's zero
    padding may lie past them).
    """

    def __init__(self, size: int, fetch: Callable[[int, int], bytes]) -> None:
        self.size = size
        self._fetch = fetch  # (offset, length) -> up to length bytes
        self._start, self._buf = 0, b""

    @classmethod
    def open(cls, io: FileIO, path: Path, end: int | None = None) -> SegmentFile:
        """The file at ``path``, or only its bytes before ``end`` (a segment's known end:
        reading its records then never touches the zeros after them)."""
        size = io.size(path)
        return cls(size if end is None else min(end, size), partial(io.read_range, path))

    @classmethod
    def of_bytes(cls, data: bytes) -> SegmentFile:
        return cls(len(data), lambda offset, length: data[offset:offset + length])

    def read(self, offset: int, length: int) -> bytes:
        """The bytes from ``offset``, ``length`` of them or fewer at the end of the file."""
        end = min(offset + length, self.size)
        if end <= offset:
            return b""
        if self._start <= offset and end <= self._start + len(self._buf):
            return self._buf[offset - self._start:end - self._start]
        if end - offset >= CHUNK:
            return self._fetch(offset, end - offset)  # one large record: not kept
        self._start, self._buf = offset, self._fetch(offset, min(CHUNK, self.size - offset))
        return self._buf[:end - offset]

    def pieces(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        """The bytes from ``start`` to ``end`` (or the end of the file) as consecutive
        (offset, piece), split at multiples of CHUNK and at the window's end, the
        window's bytes served from it."""
        end = min(end, self.size)
        while start < end:
            stop = min(end, (start // CHUNK + 1) * CHUNK)
            if self._start <= start < self._start + len(self._buf):
                stop = min(stop, self._start + len(self._buf))
                piece = self._buf[start - self._start:stop - self._start]
            else:
                piece = self._fetch(start, stop - start)
            if not piece:
                return  # the file shrank under a concurrent reader
            yield start, piece
            start += len(piece)


class FrameReader:
    """Reads frames from ``start`` of a segment (a SegmentFile, or bytes in memory) and
    stops at the first that is not the next record of this segment. Afterwards ``end``
    is just past the last good frame and ``reason`` says why it stopped (None: a zero
    header or the end of the file)."""

    def __init__(self, data: bytes | SegmentFile, salt: int, start: int,
                 next_seq: int | None) -> None:
        self.src = data if isinstance(data, SegmentFile) else SegmentFile.of_bytes(data)
        self.salt, self.end, self.next_seq = salt, start, next_seq
        self.reason: str | None = None

    def __iter__(self) -> Iterator[Frame]:
        src, size = self.src, self.src.size
        offset = self.end
        while offset + FRAME_HEADER_SIZE <= size:
            header = src.read(offset, FRAME_HEADER_SIZE)
            if header == ZERO_FRAME_HEADER:
                return
            if len(header) < FRAME_HEADER_SIZE:
                self.reason = "the file shrank while it was read"
                return
            crc, length, rtype, salt, seq = FRAME_HEADER.unpack(header)
            body = offset + FRAME_HEADER_SIZE
            frame_end = body + padded(length)
            payload = None
            if rtype not in RECORD_TYPES:
                self.reason = f"bad record type {rtype}"
            elif not 0 < length <= MAX_PAYLOAD or frame_end > size:
                self.reason = f"bad frame length {length}"
            elif salt != self.salt:
                self.reason = "salt mismatch"
            elif (payload := _checked_payload(src, header, crc, body, length)) is None:
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
        if any(src.read(offset, FRAME_HEADER_SIZE)):  # fewer bytes than a header, not all 0
            self.reason = "frame header cut short by the end of the file"


def _checked_payload(src: SegmentFile, header: bytes, crc: int, body: int,
                     length: int) -> bytes | None:
    """The payload of the frame with this header if its crc matches, else None."""
    if length > CHUNK:
        # Checked piece by piece before it is read whole: a damaged length field must
        # not make the reader hold a segment's worth of bytes.
        if frame_crc_of(header[4:], (p for _, p in src.pieces(body, body + length))) != crc:
            return None
    payload = src.read(body, length)
    return payload if frame_crc(header[4:], payload) == crc else None


def scan_after(src: SegmentFile, start: int, salt: int | None) -> tuple[int, int | None]:
    """One forward pass over the bytes from ``start`` to the end of the file, a chunk at
    a time: just past the last non-zero byte (``start`` if none), and with ``salt`` the
    offset of the first frame there that carries it and a matching crc, whatever its
    seq (else None). An all-zero chunk, most of a preallocated segment, costs a compare.

    Forward only, like one read of the whole file: a reader racing the writer (status
    on a live log) meets appends in the order they were made.
    """
    end, follows = start, None
    carry = b""  # the previous piece's last 3 bytes: a 4-byte salt may straddle two
    for lo, piece in src.pieces(start, src.size):
        if not ZEROS.startswith(piece):  # a piece is at most CHUNK bytes
            end = lo + len(piece.rstrip(b"\0"))
            if salt is not None and follows is None:
                follows = _find_frame(src, salt, start, lo - len(carry), carry + piece)
        carry = piece[-3:]
    return end, follows


def _find_frame(src: SegmentFile, salt: int, start: int, base: int, data: bytes) -> int | None:
    """The first frame at or after ``start`` whose salt field lies in ``data`` (the bytes
    from ``base``) and that verifies, or None."""
    needle = salt.to_bytes(4, "little")
    pos = data.find(needle, max(0, start + SALT_OFFSET - base))
    while pos >= 0:
        offset = base + pos - SALT_OFFSET
        if offset % ALIGN == 0 and _verifies(src, salt, offset):
            return offset
        pos = data.find(needle, pos + 1)
    return None


def _verifies(src: SegmentFile, salt: int, offset: int) -> bool:
    """Whether a frame with this salt and a matching crc (any seq) starts at ``offset``."""
    header = src.read(offset, FRAME_HEADER_SIZE)
    if len(header) < FRAME_HEADER_SIZE:
        return False
    crc, length, rtype, frame_salt, _ = FRAME_HEADER.unpack(header)
    body = offset + FRAME_HEADER_SIZE
    return (rtype in RECORD_TYPES and frame_salt == salt and 0 < length <= MAX_PAYLOAD
            and body + padded(length) <= src.size
            and _checked_payload(src, header, crc, body, length) is not None)


def scan_log(io: FileIO, wal_dir: Path, *, decode_all: bool = False) -> LogScan:
    """Read every segment and check it. Sealed segments must verify completely (every
    frame, and zeros after the seal); the newest may end in a torn tail. ``decode_all``
    also decodes payloads that recovery does not need (verify asks for it)."""
    scan = LogScan([], 0, None, [])
    listed = list_segments(io, wal_dir)
    prev: SegmentScan | None = None
    for i, (number, path) in enumerate(listed):
        last = i == len(listed) - 1
        stop = _scan_segment(scan, SegmentFile.open(io, path), number, path, prev, last,
                             decode_all)
        if stop is not None:
            scan.stop = stop
            break
        prev = scan.segments[-1]
    return scan


def _scan_segment(scan: LogScan, src: SegmentFile, number: int, path: Path,
                  prev: SegmentScan | None, last: bool, decode_all: bool) -> Stop | None:
    def corrupt(offset: int, reason: str) -> Stop:
        return Stop(number, path, offset, reason, torn=False)

    try:
        header = SegmentHeader.decode(src.read(0, HEADER_SIZE))
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
    reader = FrameReader(src, header.salt, HEADER_SIZE, next_seq)
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
    if seg.seal_crc is not None or not last:
        # Invariant: nothing is ever written after a seal, and only the newest segment
        # is appended to, so any other difference is damage.
        if seg.seal_crc is None:
            return corrupt(seg.end, reader.reason or "segment is not sealed")
        seg.content_end, _ = scan_after(src, seg.end, None)
        if seg.content_end > seg.end:
            return corrupt(seg.end, "data after the seal")
        return None
    # The newest segment may have stopped early. Its appends are one frame per
    # write+fdatasync, so at most its last frame was in flight when a crash came: if a
    # verified frame still follows, what stopped us was written and synced before it.
    # The search runs over every non-zero chunk after the stop, to the end of the file.
    seg.content_end, follows = scan_after(src, seg.end, header.salt)
    if reader.reason is None and seg.content_end == seg.end:
        return None
    reason = reader.reason or "data after the end of the log"
    if follows is not None:
        return corrupt(seg.end, f"{reason}, and a valid frame follows at {follows}")
    return Stop(number, path, seg.end, reason, torn=True)


def segment_records(io: FileIO, seg: SegmentScan) -> Iterator[tuple[Frame, dict[str, Any]]]:
    """The frames of a scanned segment with their payloads, read and checked again up
    to the end the scan (or the writer) knows, never into the zeros after it;
    WalCorrupted if they no longer reach that far."""
    end = seg.end
    reader = FrameReader(SegmentFile.open(io, seg.path, end), seg.salt, HEADER_SIZE,
                         seg.first_seq)
    for frame in reader:
        try:
            payload = unpack_payload(frame.payload)
        except ValueError as exc:
            raise WalCorrupted(seg.path, frame.offset, str(exc)) from None
        yield frame, payload
    if reader.end < end:
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
