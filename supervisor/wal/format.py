"""The on-disk format: constants, segment header, frames, checksums, payload codec.

Every byte's meaning is decided here; the writer, reader and verify only call these
functions (docs/wal.md is the same layout in prose). All integers are little-endian.

A segment ``wal/<segment:016x>.wal``::

    0        8         10         12      16         24          28           32
    +--------+---------+----------+-------+----------+-----------+------------+
    | magic  | version | checksum | salt  | segment  | prev_tail | header_crc |
    +--------+---------+----------+-------+----------+-----------+------------+
    | frame | frame | ... | seal frame | zeros (preallocated, never written) ...

    magic       b"NKATWAL\\n"
    version     FORMAT_VERSION
    checksum    CHECKSUM_CRC32C (the only algorithm so far)
    salt        random, no zero byte; every frame of this segment repeats it, so frames
                of any other segment (or older data) never pass as this one's
    segment     the segment's number, equal to the one in its file name
    prev_tail   the crc field of the previous segment's seal frame (0 for segment 0):
                a chain that shows no segment went missing or was swapped
    header_crc  masked CRC32C of bytes 0..28

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
segment's last frame is a ``seal`` record.
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
FORMAT_VERSION = 1
CHECKSUM_CRC32C = 1

SEGMENT_HEADER = struct.Struct("<8sHHIQII")
HEADER_SIZE = SEGMENT_HEADER.size
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

assert HEADER_SIZE == 32 and FRAME_HEADER_SIZE == 24  # the diagram above


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
class SegmentHeader:
    salt: int
    segment: int
    prev_tail: int

    def encode(self) -> bytes:
        body = SEGMENT_HEADER.pack(MAGIC, FORMAT_VERSION, CHECKSUM_CRC32C, self.salt,
                                   self.segment, self.prev_tail, 0)[:-4]
        return body + struct.pack("<I", checksum(body))

    @classmethod
    def decode(cls, data: bytes) -> SegmentHeader:
        """Parse a segment header or raise ValueError saying what is wrong."""
        if len(data) < HEADER_SIZE:
            raise ValueError("segment shorter than its header")
        magic, version, algo, salt, segment, prev_tail, crc = SEGMENT_HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ValueError("bad segment magic")
        if crc != checksum(bytes(data[: HEADER_SIZE - 4])):
            raise ValueError("segment header checksum mismatch")
        if version != FORMAT_VERSION:
            raise ValueError(f"segment format version {version}, expected {FORMAT_VERSION}")
        if algo != CHECKSUM_CRC32C:
            raise ValueError(f"unknown checksum algorithm {algo}")
        return cls(salt, segment, prev_tail)


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
