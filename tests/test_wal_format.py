"""The byte layout: headers and frames encode, decode and reject damage."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nkat.supervisor.wal import RecordType, Wal
from nkat.supervisor.wal.format import (
    ALIGN,
    FRAME_HEADER_SIZE,
    HEADER_SIZE,
    HEADER_SIZE_V1,
    RunIdentity,
    SegmentHeader,
    encode_frame,
    frame_size,
    mask,
    pack_payload,
    parse_segment_name,
    segment_name,
)
from nkat.supervisor.wal.reader import FrameReader
from nkat.supervisor.wal.testing.crashcheck import BLOB_DIR, RUN, WAL_DIR
from nkat.supervisor.wal.testing.recording import RecordingIO

SALT = 0x11223344


def test_layout_matches_the_documented_diagram() -> None:
    assert HEADER_SIZE == 176 and HEADER_SIZE_V1 == 32 and FRAME_HEADER_SIZE == 24
    data = SegmentHeader(SALT, 5, 0xDEADBEEF, 1 << 26, RunIdentity("r1", "abc")).encode()
    magic, version, algo, salt, segment, prev_tail, zero, size = struct.unpack_from(
        "<8sHHIQIIQ", data)
    assert (magic, version, algo, salt, segment, prev_tail, zero, size) == (
        b"NKATWAL\n", 2, 1, SALT, 5, 0xDEADBEEF, 0, 1 << 26)
    assert data[40:104] == b"r1".ljust(64, b"\0") and data[104:168] == b"abc".ljust(64, b"\0")
    assert data[172:] == bytes(4)
    frame = encode_frame(RecordType.EVENT, SALT, 7, b"\x81\xa1k\x01")
    crc, length, rtype, salt, seq = struct.unpack_from("<IIB3xIQ", frame)
    assert (length, rtype, salt, seq) == (4, RecordType.EVENT, SALT, 7)
    assert len(frame) == frame_size(4) == 32 and frame[28:] == bytes(4)


@pytest.mark.parametrize("length", range(1, 17))
def test_frames_are_padded_to_eight_bytes(length: int) -> None:
    assert len(encode_frame(RecordType.EVENT, SALT, 1, b"x" * length)) % ALIGN == 0


@pytest.mark.parametrize("header", [
    SegmentHeader(SALT, 5, 0xDEADBEEF, 4096, RunIdentity("run-1", "0123456789abcdef")),
    SegmentHeader(SALT, 5, 0xDEADBEEF, version=1),
], ids=["version 2", "version 1"])
def test_segment_header_round_trips_and_every_bit_flip_is_caught(header: SegmentHeader) -> None:
    data = header.encode()
    assert len(data) == header.length and SegmentHeader.decode(data) == header
    for bit in range(len(data) * 8):
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ValueError):
            SegmentHeader.decode(bytes(damaged))


def test_an_identity_that_does_not_fit_the_header_is_refused() -> None:
    with pytest.raises(ValueError, match="run_id"):
        SegmentHeader(SALT, 0, 0, identity=RunIdentity("x" * 65, "")).encode()
    with pytest.raises(ValueError, match="run_id"):
        Wal.open(WAL_DIR, BLOB_DIR, run={**RUN, "run_id": "x" * 65}, io=RecordingIO())


def test_frame_reader_stops_at_a_zero_header_and_at_each_kind_of_damage() -> None:
    frames = [encode_frame(RecordType.EVENT, SALT, seq, b"\x80") for seq in (1, 2)]
    buf = b"".join(frames) + bytes(64)
    reader = FrameReader(buf, SALT, 0, 1)
    assert [f.seq for f in reader] == [1, 2] and reader.reason is None
    assert reader.end == 2 * len(frames[0])
    cases = {
        "salt mismatch": FrameReader(buf, SALT + 1, 0, 1),
        "record seq 1, expected 5": FrameReader(buf, SALT, 0, 5),
    }
    for reason, reader in cases.items():
        assert list(reader) == [] and reader.reason == reason
    flipped = bytearray(buf)
    flipped[FRAME_HEADER_SIZE] ^= 1
    reader = FrameReader(bytes(flipped), SALT, 0, 1)
    assert list(reader) == [] and reader.reason == "checksum mismatch"


def test_mask_moves_the_crc() -> None:
    assert mask(0) != 0 and mask(0x12345678) != 0x12345678


def test_segment_names() -> None:
    assert segment_name(26) == "000000000000001a.wal"
    assert parse_segment_name("000000000000001a.wal") == 26
    for other in ("1a.wal", "000000000000001a.wal.tmp", "00000000000000zz.wal", "x.blob"):
        assert parse_segment_name(other) is None


def test_payloads_must_be_string_keyed_maps() -> None:
    with pytest.raises(TypeError):
        pack_payload({1: "x"})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        pack_payload(["x"])  # type: ignore[arg-type]


plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(payloads=st.lists(st.dictionaries(st.text(max_size=8), plain, max_size=5), min_size=1,
                         max_size=8))
def test_any_payload_comes_back_as_written(payloads: list[dict[str, object]]) -> None:
    io = RecordingIO()
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, segment_size=2048) as wal:
        seqs = [wal.append(RecordType.EVENT, p) for p in payloads]
    with Wal.open(WAL_DIR, BLOB_DIR, io=RecordingIO(io.image()), segment_size=2048) as wal:
        got = {r.seq: r.payload for r in wal.records()}
    assert [got[s] for s in seqs] == payloads
