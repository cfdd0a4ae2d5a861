"""Reading the log: list segments, parse and check frames, scan the whole log.

Read-only. ``scan_log`` reads every segment to its end, past any damage: it says what is
on disk (the intact frames of each segment, in extents), every place that does not
verify (``Damage``, named by its own file and offset), and whether the newest segment
ends in a torn tail (a crash mid-append). What is done about it is decided elsewhere:
recovery.assess weighs the damage against the checkpoint a resume needs. Segments are
read in ranged reads of a chunk (fileio.CHUNK) at a time, never whole: a preallocated
segment is mostly zeros, and reading it costs memory for the records it holds, not for
its size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from nkat.protocol.messages import state_digest

from .blobs import check_blob, read_blob
from .checkpoints import CheckpointEntry, parse_entry
from .errors import WalCorrupted
from .fileio import CHUNK, ZEROS, FileIO
from .format import (
    ALIGN,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    HEADER_SIZE,
    MAX_HEADER_SIZE,
    MAX_PAYLOAD,
    RECORD_TYPES,
    SALT_OFFSET,
    SEGMENT_SUFFIX,
    ZERO_FRAME_HEADER,
    RecordType,
    RunIdentity,
    SegmentHeader,
    ShortHeader,
    encode_frame,
    frame_crc,
    frame_crc_of,
    pack_payload,
    padded,
    parse_segment_name,
    segment_name,
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
class Extent:
    """Consecutive verified frames of a segment, with consecutive seqs."""

    start: int
    end: int
    first_seq: int
    last_seq: int


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
    seal_offset: int | None = None  # where the seal frame starts
    start: int = HEADER_SIZE  # where the first frame begins (the header's length)
    version: int = 2
    size: int = 0  # the size the header says the file was prepared with (0: unknown)
    file_size: int = 0
    prev_tail: int = 0
    identity: RunIdentity = RunIdentity()
    extents: list[Extent] = field(default_factory=list)
    tail: Stop | None = None  # where its frames stop with no valid frame after them

    def note_frame(self, seq: int, offset: int, end: int) -> None:
        """Record a verified frame (read, or just written) in the segment's extents."""
        last = self.extents[-1] if self.extents else None
        if last is not None and last.end == offset and last.last_seq + 1 == seq:
            last.end, last.last_seq = end, seq
        else:
            self.extents.append(Extent(offset, end, seq, seq))
        if self.first_seq is None:
            self.first_seq = seq
        self.last_seq, self.end = seq, end
        self.content_end = max(self.content_end, end)


@dataclass(frozen=True)
class Stop:
    """Where the frames of a segment stop early with no valid frame after them: in the
    newest segment, the tail of an append that a crash interrupted (``torn``)."""

    segment: int
    path: Path
    offset: int
    reason: str
    torn: bool


@dataclass(frozen=True)
class Damage:
    """A place in the log that does not verify, named by the file that is wrong.

    ``segment`` and ``offset`` order it in the log (a checkpoint state's damage stands at
    its record); ``kind`` is one of KINDS."""

    segment: int
    offset: int
    path: Path
    reason: str
    kind: str

    @property
    def position(self) -> tuple[int, int]:
        return self.segment, self.offset

    def __str__(self) -> str:
        return f"{self.path}: offset {self.offset}: {self.reason}"


#: Kinds of damage. ``missing`` (a newest segment deleted) and ``truncated`` mean data
#: went away as a whole; ``stray`` is a file in the log directory that is no segment.
KINDS = ("header", "frame", "unsealed", "after_seal", "gap", "chain", "missing", "truncated",
         "state", "stray")


@dataclass
class LogScan:
    segments: list[SegmentScan]  # readable segments, oldest first
    records: int
    run: dict[str, Any] | None  # the newest intact run record's payload
    checkpoints: list[CheckpointEntry]
    damage: list[Damage] = field(default_factory=list)
    torn: Stop | None = None  # the newest segment ends in a torn tail
    roll: SegmentScan | None = None  # a roll stopped before this segment's seal

    def path_of(self, segment: int) -> Path:
        return self.segment(segment).path

    def segment(self, number: int) -> SegmentScan:
        return next(s for s in self.segments if s.number == number)

    @property
    def last_seq(self) -> int:
        return max((s.last_seq for s in self.segments if s.last_seq is not None), default=0)


def list_segments(io: FileIO, wal_dir: Path,
                  names: list[str] | None = None) -> list[tuple[int, Path]]:
    """(number, path) of each segment file, by number; ``names``: the listing, if read."""
    numbered = ((parse_segment_name(name), name) for name in names or io.listdir(wal_dir))
    return sorted((n, wal_dir / name) for n, name in numbered if n is not None)


def stray_names(names: list[str]) -> list[str]:
    """Names ending in .wal that are not segment names: nothing the log wrote."""
    return sorted(name for name in names
                  if name.endswith(SEGMENT_SUFFIX) and parse_segment_name(name) is None)


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


def scan_after(src: SegmentFile, start: int, salt: int | None,
               search_from: int | None = None) -> tuple[int, int | None]:
    """One forward pass over the bytes from ``start`` to the end of the file, a chunk at
    a time: just past the last non-zero byte (``start`` if none), and with ``salt`` the
    offset of the first frame at or after ``search_from`` (default ``start``) that
    carries it and a matching crc, whatever its seq (else None). An all-zero chunk, most
    of a preallocated segment, costs a compare.

    Forward only, like one read of the whole file: a reader racing the writer (status
    on a live log) meets appends in the order they were made.
    """
    end, follows = start, None
    first = start if search_from is None else search_from
    carry = b""  # the previous piece's last 3 bytes: a 4-byte salt may straddle two
    for lo, piece in src.pieces(start, src.size):
        if not ZEROS.startswith(piece):  # a piece is at most CHUNK bytes
            end = lo + len(piece.rstrip(b"\0"))
            if salt is not None and follows is None:
                follows = _find_frame(src, salt, first, lo - len(carry), carry + piece)
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
    """Read every segment to its end and check it, past any damage, which is collected
    in ``damage`` with the file and offset it is in. Sealed segments must verify
    completely (every frame, and zeros after the seal); the newest may end in a torn
    tail. ``decode_all`` also decodes payloads that recovery does not need (verify asks
    for it)."""
    scan = LogScan([], 0, None, [])
    names = io.listdir(wal_dir)
    for name in stray_names(names):
        scan.damage.append(Damage(-1, 0, wal_dir / name, "not a segment name: nothing the log "
                                  "wrote (move it out of the log directory)", "stray"))
    unreadable: set[int] = set()
    for number, path in list_segments(io, wal_dir, names):
        seg = _scan_segment(scan, io, number, path, decode_all)
        if seg is None:
            unreadable.add(number)
        else:
            scan.segments.append(seg)
    _check_sequence(scan, wal_dir, unreadable)
    scan.damage.sort(key=lambda d: d.position)
    return scan


def _scan_segment(scan: LogScan, io: FileIO, number: int, path: Path,
                  decode_all: bool) -> SegmentScan | None:
    """Scan one segment on its own, recording its damage; None if it has no readable
    header (then nothing in it can be trusted: its salt is unknown)."""
    def damage(offset: int, reason: str, kind: str) -> None:
        scan.damage.append(Damage(number, offset, path, reason, kind))

    try:
        src = SegmentFile.open(io, path)
        header = SegmentHeader.decode(src.read(0, MAX_HEADER_SIZE))
    except IsADirectoryError:
        scan.damage.append(Damage(-1, 0, path, "a directory, not a segment (move it out of "
                                  "the log directory)", "stray"))
        return None
    except ShortHeader:
        damage(0, f"the segment is {src.size} bytes, shorter than its header: it was "
               "truncated", "truncated")
        return None
    except ValueError as exc:
        damage(0, str(exc), "header")
        return None
    if header.segment != number:
        damage(0, f"header names segment {header.segment:016x}", "header")
        return None
    seg = SegmentScan(number, path, header.salt, header.length, content_end=header.length,
                      start=header.length, version=header.version, size=header.size,
                      file_size=src.size, prev_tail=header.prev_tail, identity=header.identity)
    start = offset = header.length
    next_seq = None
    while True:
        reader = FrameReader(src, header.salt, offset, next_seq)
        sealed = False
        extent: Extent | None = None
        for frame in reader:
            if extent is None:
                if frame.offset == start and frame.rtype != RecordType.RUN:
                    damage(frame.offset, "segment does not start with a run record", "frame")
                extent = Extent(frame.offset, frame.end, frame.seq, frame.seq)
                seg.extents.append(extent)
                if seg.first_seq is None:
                    seg.first_seq = frame.seq
            else:  # the reader checked the seq runs on
                extent.end, extent.last_seq = frame.end, frame.seq
            scan.records += 1
            try:
                if frame.rtype == RecordType.RUN:
                    scan.run = unpack_payload(frame.payload)
                elif frame.rtype in (RecordType.CKPT, RecordType.CKPT_REF):
                    scan.checkpoints.append(parse_entry(frame.rtype, frame.seq, number,
                                                        frame.offset, frame.end, frame.payload))
                elif decode_all:
                    unpack_payload(frame.payload)
            except ValueError as exc:
                damage(frame.offset, str(exc), "frame")
            if frame.rtype == RecordType.SEAL:
                seg.seal_crc, seg.seal_offset, sealed = frame.crc, frame.offset, True
                break
        if extent is not None:
            seg.last_seq, seg.end = extent.last_seq, extent.end
            seg.content_end = max(seg.content_end, extent.end)
        stop = reader.end
        if sealed:
            # Invariant: nothing is ever written after a seal.
            seg.content_end, _ = scan_after(src, stop, None)
            if seg.content_end > stop:
                damage(stop, "data after the seal", "after_seal")
            return seg
        # Appends are one frame per write+fdatasync, so at most the last frame of the
        # newest segment was in flight when a crash came: if a verified frame still
        # follows, what stopped us was written and synced before it, and is damage. The
        # search runs over every non-zero chunk after the stop, to the end of the file.
        content_end, follows = scan_after(src, stop, header.salt, stop + ALIGN)
        seg.content_end = max(seg.content_end, content_end)
        if reader.reason is None and content_end <= stop:
            return seg
        reason = reader.reason or "data after the end of the log"
        if follows is None:
            seg.tail = Stop(number, path, stop, reason, torn=True)
            return seg
        damage(stop, f"{reason}, and a valid frame follows at {follows}", "frame")
        offset, next_seq = follows, None


def expected_seal_crc(seg: SegmentScan) -> int | None:
    """The crc of the seal frame ``seg`` gets next: a seal is the same bytes whoever
    writes it (salt, seq and payload are known), so a roll that stopped after installing
    the next segment, whose header already names that crc, can be finished."""
    if seg.last_seq is None:
        return None
    frame = encode_frame(RecordType.SEAL, seg.salt, seg.last_seq + 1, seal_payload(seg.number))
    return int.from_bytes(frame[:4], "little")


def seal_payload(number: int) -> bytes:
    return pack_payload({"segment": number})


def _check_sequence(scan: LogScan, wal_dir: Path, unreadable: set[int]) -> None:
    """The checks between segments: consecutive numbers, each chained to the one before
    by ``prev_tail``, seqs running on, every segment but the newest sealed; and at the
    end of the log, that no newer segment was lost and the newest is whole."""
    segs = scan.segments

    def damage(number: int, offset: int, path: Path, reason: str, kind: str) -> None:
        scan.damage.append(Damage(number, offset, path, reason, kind))

    for a, b in zip(segs, segs[1:], strict=False):
        if b.number != a.number + 1:
            missing = [n for n in range(a.number + 1, b.number) if n not in unreadable]
            if missing:
                names = segment_name(missing[0])[:16] + (
                    f" .. {segment_name(missing[-1])[:16]} are" if len(missing) > 1 else " is")
                damage(missing[0], 0, wal_dir / segment_name(missing[0]),
                       f"segment {names} missing", "gap")
            continue
        if a.seal_crc is None:
            if b is segs[-1] and not b.extents and b.version >= 2 \
                    and b.prev_tail == expected_seal_crc(a):
                scan.roll = a  # installed, then the crash: not damage
                continue
            if a.tail is not None:
                damage(a.number, a.tail.offset, a.path,
                       f"{a.tail.reason}; the segment is not sealed", "unsealed")
            else:
                damage(a.number, a.end, a.path, "segment is not sealed", "unsealed")
            continue
        if b.prev_tail != a.seal_crc:
            damage(b.number, 0, b.path, f"does not follow segment {a.number:016x}", "chain")
        elif b.extents and b.extents[0].start == b.start and a.last_seq is not None \
                and b.extents[0].first_seq != a.last_seq + 1:
            damage(b.number, b.start, b.path,
                   f"record seq {b.extents[0].first_seq}, expected {a.last_seq + 1}", "frame")
    for seg in segs:
        if seg.size and seg.file_size < seg.size:
            damage(seg.number, seg.file_size, seg.path,
                   f"the segment is {seg.file_size} bytes but was prepared with {seg.size}: "
                   "it was truncated", "truncated")
    if not segs:
        return
    newest = segs[-1]
    if newest.seal_crc is not None and newest.version >= 2 \
            and not any(n > newest.number for n in unreadable):
        # A version 2 segment is sealed only after its successor is durable.
        n = newest.number + 1
        damage(n, 0, wal_dir / segment_name(n),
               f"segment {segment_name(n)[:16]} is missing: segment "
               f"{segment_name(newest.number)[:16]} is sealed, so a newer one was written",
               "missing")
    if newest.tail is not None and not (newest.size and newest.file_size < newest.size):
        scan.torn = newest.tail


def segment_records(io: FileIO, seg: SegmentScan) -> Iterator[tuple[Frame, dict[str, Any]]]:
    """The frames of a scanned segment with their payloads, extent by extent, read and
    checked again up to the end the scan (or the writer) knows, never into the zeros
    after it; WalCorrupted if they no longer reach that far."""
    src = SegmentFile.open(io, seg.path, seg.end)
    for extent in list(seg.extents):
        reader = FrameReader(src, seg.salt, extent.start, extent.first_seq)
        for frame in reader:
            if frame.end > extent.end:
                break
            try:
                payload = unpack_payload(frame.payload)
            except ValueError:
                continue  # a frame that verifies but does not decode: damage, skipped
            yield frame, payload
            if frame.end == extent.end:
                break
        if reader.end < extent.end:
            raise WalCorrupted(seg.path, reader.end, reader.reason or "records vanished")


def read_frame(io: FileIO, path: Path, offset: int, *, salt: int | None = None,
               end: int | None = None) -> Frame:
    """The frame at ``offset`` of a segment, checked again (a checkpoint's state is read
    long after the scan that indexed it). With the segment's ``salt`` and the frame's
    ``end`` from that scan, one read; without, the header is read for the salt. ValueError
    if it no longer verifies."""
    if salt is not None and end is not None:
        data = io.read_range(path, offset, end - offset)
        header = data[:FRAME_HEADER_SIZE]
        if len(header) < FRAME_HEADER_SIZE:
            raise ValueError("frame beyond the end of the segment")
        crc, length, rtype, frame_salt, seq = FRAME_HEADER.unpack(header)
        payload = data[FRAME_HEADER_SIZE:FRAME_HEADER_SIZE + length]
    else:
        fd = io.open(path, os.O_RDONLY)
        try:
            salt = SegmentHeader.decode(io.pread(fd, MAX_HEADER_SIZE, 0)).salt
            header = io.pread(fd, FRAME_HEADER_SIZE, offset)
            if len(header) < FRAME_HEADER_SIZE:
                raise ValueError("frame beyond the end of the segment")
            crc, length, rtype, frame_salt, seq = FRAME_HEADER.unpack(header)
            payload = io.pread(fd, length, offset + FRAME_HEADER_SIZE) \
                if length <= MAX_PAYLOAD else b""
        finally:
            io.close(fd)
    if frame_salt != salt or len(payload) != length or frame_crc(header[4:], payload) != crc:
        raise ValueError("frame no longer verifies")
    return Frame(offset, offset + FRAME_HEADER_SIZE + padded(length), rtype, seq, crc, payload)


def load_state(io: FileIO, segment: Path, entry: CheckpointEntry, blob_dir: Path,
               salt: int | None = None) -> bytes:
    """A checkpoint's state, checked by frame CRC or blob chunk CRCs, then by digest.
    ``salt``: its segment's, if known. ValueError says what does not verify; other I/O
    errors go to the caller."""
    if entry.blob is None:
        state = _inline_state(io, segment, entry, salt)
    else:
        state = read_blob(io, blob_dir / entry.blob, entry.size, entry.chunk, entry.crcs)
    if state_digest(state) != entry.meta["digest"]:
        raise ValueError(f"checkpoint {entry.meta['ckpt_seq']} state digest mismatch")
    return state


def check_state(io: FileIO, segment: Path, entry: CheckpointEntry, blob_dir: Path,
                salt: int | None = None) -> None:
    """What load_state checks, holding a chunk of a blob at a time, not the state."""
    if entry.blob is None:
        digest = state_digest(_inline_state(io, segment, entry, salt))
    else:
        digest = check_blob(io, blob_dir / entry.blob, entry.size, entry.chunk, entry.crcs)
    if digest != entry.meta["digest"]:
        raise ValueError(f"checkpoint {entry.meta['ckpt_seq']} state digest mismatch")


def _inline_state(io: FileIO, segment: Path, entry: CheckpointEntry,
                  salt: int | None) -> bytes:
    frame = read_frame(io, segment, entry.offset, salt=salt,
                       end=entry.end if salt is not None else None)
    state = unpack_payload(frame.payload).get("state") if frame.seq == entry.seq else None
    if not isinstance(state, bytes):
        raise ValueError(f"checkpoint record {entry.seq} no longer found")
    return state
