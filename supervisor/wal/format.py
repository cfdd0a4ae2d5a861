"""The on-disk format: constants, segment header, frames, checksums, payload codec.

Every byte's meaning is decided here; the writer, reader and verify only call these
functions (docs/wal.md is the same layout in prose). All integers are little-endian.

A segment ``wal/<segment:016x>.wal`` (format version 2; version 1, below, is still read)::

    0        8         10         12      16         24          28     32     40
    +--------+---------+----------+-------+----------+-----------+------+------+
    | magic  | version | checksum | salt  | segment  | prev_tail | 0    | size |
    +--------+---------+----------+-------+----------+-----------+------+------+
    40            104             168          172   176
    +-------------+---------------+------------+-----+
    | run_id      | spec_hash     | header_crc | 0   | frame | frame | ... | seal frame | zeros
    +-------------+---------------+------------+-----+

    magic       b"NKATWAL\n"
    version     FORMAT_VERSION (2)
    checksum    CHECKSUM_CRC32C (the only algorithm so far)
    salt        random, no zero byte; every frame of this segment repeats it, so frames
                of any other segment (or older data) never pass as this one's
    segment     the segment's number, equal to the one in its file name
    prev_tail   the crc field of the previous segment's seal frame (0 for segment 0):
                a chain that shows no segment went missing or was swapped
    size        the file's size when it was prepared: a newest segment that is shorter
                was truncated, which a crash never does
    run_id      the run's id, UTF-8, zero padded (empty: no identity)
    spec_hash   the run's spec hash, zero padded: with run_id, whose log this is
    header_crc  masked CRC32C of bytes 0..168

Version 1 segments have a 32-byte header: the first 28 bytes as above, then header_crc
(masked CRC32C of bytes 0..28). No size and no identity; frames start at byte 32.

A frame, 8-byte aligned::

    0       4        8      9       12     16      24
    +-------+--------+------+-------+------+-------+------------------+----------+
    | crc   | length | type | 0 0 0 | salt | seq   | payload (length) | zero pad |
    +-------+--------+------+-------+------+-------+------------------+----------+

    crc         masked CRC32C of bytes 4..24 of the frame and the payload
    length      payload bytes, 1..MAX_PAYLOAD (the pad to 8 bytes is not counted)
    type        a RecordType
    seq         the record's number: exactly one more than the previous record's,
                across segments
    payload     a msgpack map with string keys
    zero pad    to the next multiple of 8; not covered by the crc, and never read

A frame header of 24 zero bytes marks the end of the log: that is what preallocated
space reads as. The first frame of every segment is a ``run`` record and a sealed
segment's last frame is a ``seal`` record. A version 2 segment is sealed only once its
successor is durable, so a sealed newest segment means the newest one was lost.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import google_crc32c
import msgpack

MAGIC = b"NKATWAL\n"
#: The version new segments are written in; READ_VERSIONS are read.
FORMAT_VERSION = 2
READ_VERSIONS = frozenset({1, 2})
CHECKSUM_CRC32C = 1

SEGMENT_HEADER_V1 = struct.Struct("<8sHHIQII")
SEGMENT_HEADER = struct.Struct("<8sHHIQIIQ64s64sI4x")
HEADER_SIZE_V1 = SEGMENT_HEADER_V1.size
#: The size of a version 2 header: where the first frame of a new segment starts.
HEADER_SIZE = SEGMENT_HEADER.size
#: Bytes to read to be sure to hold any version's header.
MAX_HEADER_SIZE = HEADER_SIZE
#: Longest run_id and spec_hash a header holds (UTF-8 bytes).
IDENTITY_FIELD = 64
FRAME_HEADER = struct.Struct("<IIB3xIQ")
FRAME_HEADER_SIZE = FRAME_HEADER.size
ZERO_FRAME_HEADER = bytes(FRAME_HEADER_SIZE)
ALIGN = 8
#: Offset of the salt inside a frame header (the reader searches for it).
SALT_OFFSET = 12
#: Largest payload a frame may carry; bigger states go to blob files.
MAX_PAYLOAD = 1 << 30

SEGMENT_SUFFIX = ".wal"
TMP_SUFFIX = ".tmp"
BROKEN_SUFFIX = ".broken"
BLOB_SUFFIX = ".blob"

_CRC_MASK_DELTA = 0xA282EAD8

assert HEADER_SIZE_V1 == 32 and HEADER_SIZE == 176 and FRAME_HEADER_SIZE == 24  # diagram


class RecordType(enum.IntEnum):
    """What a record says (payloads in docs/architecture.md). 0 is never a type, so a
    zero frame header cannot be mistaken for a record."""

    RUN = 1
    EPOCH = 2
    CKPT = 3
    CKPT_REF = 4
    EVENT = 5
    DONE = 6
    STOP = 7
    SEAL = 8


RECORD_TYPES = frozenset(int(t) for t in RecordType)


def segment_name(segment: int) -> str:
    return f"{segment:016x}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """The segment number of a segment file name, or None for any other file."""
    stem = name[: -len(SEGMENT_SUFFIX)]
    if not name.endswith(SEGMENT_SUFFIX) or len(stem) != 16:
        return None
    try:
        return int(stem, 16)
    except ValueError:
        return None


def mask(crc: int) -> int:
    """Rotate and offset a CRC before storing it. The CRC of data that itself holds
    CRCs (a blob of frames checkpointed as a state, say) is then not a plain CRC."""
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def checksum(data: bytes) -> int:
    """Masked CRC32C of ``data``."""
    return mask(google_crc32c.value(data))


def padded(length: int) -> int:
    return length + (-length % ALIGN)


def frame_size(payload_length: int) -> int:
    return FRAME_HEADER_SIZE + padded(payload_length)


@dataclass(frozen=True)
class RunIdentity:
    """Whose log this is: the run id and spec hash its segment headers name. Empty
    strings name nobody (a log written without them), and match any identity."""

    run_id: str = ""
    spec_hash: str = ""

    @classmethod
    def of_run(cls, run: dict[str, Any] | None) -> RunIdentity:
        """The identity a run record's payload gives (its run_id and spec_hash)."""
        run = run or {}
        run_id, spec_hash = run.get("run_id", ""), run.get("spec_hash", "")
        return cls(run_id if isinstance(run_id, str) else "",
                   spec_hash if isinstance(spec_hash, str) else "")

    @property
    def known(self) -> bool:
        return bool(self.run_id or self.spec_hash)

    def conflicts(self, other: RunIdentity) -> bool:
        """Whether both name a run and not the same one."""
        return self.known and other.known and self != other

    def __str__(self) -> str:
        return f"run {self.run_id or '?'} (spec {self.spec_hash or '?'})"


class ShortHeader(ValueError):
    """The file ends before its header does."""


@dataclass(frozen=True)
class SegmentHeader:
    salt: int
    segment: int
    prev_tail: int
    size: int = 0  # the size the file was prepared with (0: unknown, version 1)
    identity: RunIdentity = RunIdentity()
    version: int = FORMAT_VERSION

    @property
    def length(self) -> int:
        """Bytes the header takes: where the segment's first frame starts."""
        return HEADER_SIZE_V1 if self.version == 1 else HEADER_SIZE

    def encode(self) -> bytes:
        if self.version == 1:  # only tests write it: logs written before version 2
            body = SEGMENT_HEADER_V1.pack(MAGIC, 1, CHECKSUM_CRC32C, self.salt, self.segment,
                                          self.prev_tail, 0)[:-4]
            return body + struct.pack("<I", checksum(body))
        run_id, spec_hash = (_field(v, name) for v, name in (
            (self.identity.run_id, "run_id"), (self.identity.spec_hash, "spec_hash")))
        data = bytearray(SEGMENT_HEADER.pack(MAGIC, FORMAT_VERSION, CHECKSUM_CRC32C, self.salt,
                                             self.segment, self.prev_tail, 0, self.size,
                                             run_id, spec_hash, 0))
        struct.pack_into("<I", data, _CRC_AT, checksum(bytes(data[:_CRC_AT])))
        return bytes(data)

    @classmethod
    def decode(cls, data: bytes) -> SegmentHeader:
        """Parse a segment header of any version read, or raise ValueError saying what
        is wrong."""
        if len(data) < HEADER_SIZE_V1:
            raise ShortHeader("segment shorter than its header")
        if data[:len(MAGIC)] != MAGIC:
            raise ValueError("bad segment magic")
        version = struct.unpack_from("<H", data, 8)[0]
        if version == 1:
            _, _, algo, salt, segment, prev_tail, crc = SEGMENT_HEADER_V1.unpack_from(data)
            if crc != checksum(bytes(data[:HEADER_SIZE_V1 - 4])):
                raise ValueError("segment header checksum mismatch")
            size, identity = 0, RunIdentity()
        elif version == FORMAT_VERSION:
            if len(data) < HEADER_SIZE:
                raise ShortHeader("segment shorter than its header")
            (_, _, algo, salt, segment, prev_tail, reserved, size, run_id, spec_hash,
             crc) = SEGMENT_HEADER.unpack_from(data)
            if crc != checksum(bytes(data[:_CRC_AT])):
                raise ValueError("segment header checksum mismatch")
            if reserved or any(data[_CRC_AT + 4:HEADER_SIZE]):
                raise ValueError("reserved segment header bytes are not zero")
            identity = RunIdentity(_unfield(run_id), _unfield(spec_hash))
        else:
            raise ValueError(f"segment format version {version}, expected one of "
                             f"{sorted(READ_VERSIONS)} (a newer nkat-supervise wrote it?)")
        if algo != CHECKSUM_CRC32C:
            raise ValueError(f"unknown checksum algorithm {algo}")
        return cls(salt, segment, prev_tail, size, identity, version)


_CRC_AT = HEADER_SIZE - 8  # header_crc's offset in a version 2 header


def _field(value: str, name: str) -> bytes:
    data = value.encode()
    if len(data) > IDENTITY_FIELD or b"\0" in data:
        raise ValueError(f"{name} {value!r} does not fit a segment header "
                         f"(at most {IDENTITY_FIELD} bytes, no NUL)")
    return data


def _unfield(data: bytes) -> str:
    return data.rstrip(b"\0").decode("utf-8", "replace")


def encode_frame(rtype: int, salt: int, seq: int, payload: bytes) -> bytes:
    """One frame, padded to ALIGN bytes, ready to be written at an aligned offset."""
    length = len(payload)
    if not 0 < length <= MAX_PAYLOAD:
        raise ValueError(f"record payload of {length} bytes is outside 1..{MAX_PAYLOAD}")
    rest = FRAME_HEADER.pack(0, length, rtype, salt, seq)[4:]
    crc = frame_crc(rest, payload)
    return b"".join((struct.pack("<I", crc), rest, payload, bytes(-length % ALIGN)))


def frame_crc(header_rest: bytes, payload: bytes) -> int:
    """The crc a frame with these header bytes 4..24 and this payload must carry."""
    return mask(google_crc32c.extend(google_crc32c.value(header_rest), payload))


def frame_crc_of(header_rest: bytes, pieces: Iterable[bytes]) -> int:
    """frame_crc of the payload that ``pieces`` make up, one piece in memory at a time."""
    crc = google_crc32c.value(header_rest)
    for piece in pieces:
        crc = google_crc32c.extend(crc, piece)
    return mask(crc)


def pack_payload(payload: dict[str, Any]) -> bytes:
    """msgpack bytes of a record payload; TypeError for anything but a str-keyed map of
    plain values (bytes allowed)."""
    if not isinstance(payload, dict) or not all(isinstance(k, str) for k in payload):
        raise TypeError("a record payload must be a dict with str keys")
    data: bytes = msgpack.packb(payload, use_bin_type=True)
    return data


def unpack_payload(data: bytes) -> dict[str, Any]:
    """Decode a payload whose frame checksum already matched; ValueError if it is not
    a msgpack map (which a matching checksum makes a writer bug, not disk damage)."""
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except Exception as exc:  # msgpack raises many types for malformed input
        raise ValueError(f"undecodable payload: {type(exc).__name__}: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("payload is not a map")
    return value


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"ext type {code} in a payload")
