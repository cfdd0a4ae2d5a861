"""Segments far larger than what they hold, read a chunk at a time: opening costs memory
for the records, not the segment, and damage past the first chunk or across a chunk
boundary is found as it is anywhere else."""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import pytest

from nkat.supervisor.wal import RealIO, RecordType, Wal, WalCorrupted, verify
from nkat.supervisor.wal.fileio import CHUNK
from nkat.supervisor.wal.format import (
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    HEADER_SIZE,
    SegmentHeader,
    encode_frame,
)
from nkat.supervisor.wal.reader import Frame, FrameReader, SegmentFile, scan_after, scan_log
from nkat.supervisor.wal.readonly import read_records
from nkat.supervisor.wal.testing.crashcheck import BLOB_DIR, RUN, WAL_DIR, checkpoint_meta
from nkat.supervisor.wal.testing.recording import Image, RecordingIO

SEGMENT = WAL_DIR / "0000000000000000.wal"


def event(i: int, pad: int = 40) -> dict[str, object]:
    return {"kind": "progress", "i": i, "pad": random.Random(i).randbytes(pad)}


def frames(data: bytes) -> list[Frame]:
    return list(FrameReader(data, SegmentHeader.decode(data).salt, HEADER_SIZE, None))


# Memory ------------------------------------------------------------------------------

DEFAULT_SEGMENT = 64 << 20
BOUND = 8 << 20


def damage_tail(path: Path, kind: str) -> None:
    """Leave the next frame of the log in ``path`` torn, the way ``kind`` says."""
    seg = scan_log(RealIO(), path.parent).segments[-1]
    frame = encode_frame(RecordType.EVENT, seg.salt, (seg.last_seq or 0) + 1,
                         b"\xa1x" * 300)
    if kind == "length claims the segment":
        # A header that verifies up to its crc, with a length reaching far into the zeros.
        frame = FRAME_HEADER.pack(1, 48 << 20, RecordType.EVENT, seg.salt, 1)
    with path.open("r+b") as f:
        f.seek(seg.end)
        f.write(frame[:len(frame) * 2 // 3] if kind == "torn frame" else frame)


@pytest.mark.parametrize("damage", ["none", "torn frame", "length claims the segment"])
def test_opening_a_64_mib_segment_holds_chunks_not_the_segment(tmp_path: Path,
                                                               damage: str) -> None:
    wal_dir, blob_dir = tmp_path / "wal", tmp_path / "blobs"
    with Wal.open(wal_dir, blob_dir, run=RUN, segment_size=DEFAULT_SEGMENT) as wal:
        for i in range(1, 31):
            wal.append(RecordType.EVENT, event(i))
            if i % 3 == 0:
                state = random.Random(i).randbytes(2000)
                wal.append_checkpoint(checkpoint_meta(i // 3, state), state)
        last = wal.last_seq
    assert (wal_dir / SEGMENT.name).stat().st_size == DEFAULT_SEGMENT
    if damage != "none":
        damage_tail(wal_dir / SEGMENT.name, damage)
    tracemalloc.start()
    try:
        with Wal.open(wal_dir, blob_dir, segment_size=DEFAULT_SEGMENT) as wal:
            seqs = [r.seq for r in wal.records()]
            latest = wal.latest_checkpoint()
            repaired = wal.recovery.torn_tail_repaired
        report = verify(wal_dir, blob_dir)
        readonly = [r.seq for r in read_records(wal_dir)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seqs == readonly == list(range(1, last + 1))
    assert latest is not None and latest.ckpt_seq == 10
    assert report.ok and repaired == (damage != "none")
    assert peak < BOUND, f"peak {peak} bytes"


def test_records_reads_up_to_the_known_end_only() -> None:
    reads: list[int] = []

    class CountingIO(RecordingIO):
        def read_range(self, path: Path, offset: int, length: int) -> bytes:
            data = super().read_range(path, offset, length)
            reads.append(len(data))
            return data

    io = RecordingIO()
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, segment_size=4 * CHUNK) as wal:
        for i in range(20):
            wal.append(RecordType.EVENT, event(i))
    with Wal.open(WAL_DIR, BLOB_DIR, io=CountingIO(io.image()), segment_size=4 * CHUNK) as wal:
        assert sum(reads) >= 4 * CHUNK  # the scan at open reads the zeros once
        reads.clear()
        assert len(list(wal.records())) == 21
        end = scan_log(io, WAL_DIR).segments[-1].end
        assert 0 < sum(reads) <= end
        wal.append(RecordType.EVENT, event(99))
        reads.clear()
        assert len(list(wal.records())) == 22 and sum(reads) <= end + 200


# Damage past the first chunk -----------------------------------------------------------

SIZE = 4 * CHUNK


def build() -> Image:
    io = RecordingIO()
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, segment_size=SIZE) as wal:
        for i in range(30):
            wal.append(RecordType.EVENT, event(i))
    return io.image()


IMAGE = build()
DATA = IMAGE.read(SEGMENT)
LAST = frames(DATA)[-1]
COPY = DATA[LAST.offset:LAST.end]


def open_image(image: Image, salvage: bool = False) -> tuple[Wal, RecordingIO]:
    io = RecordingIO(image)
    return Wal.open(WAL_DIR, BLOB_DIR, io=io, segment_size=SIZE, salvage=salvage), io


def damaged(copy_at: int | None) -> bytes:
    """The log with its last frame's payload damaged and, at ``copy_at``, an intact
    copy of that frame: acknowledged data followed by a valid frame."""
    data = bytearray(DATA)
    data[LAST.offset + FRAME_HEADER_SIZE] ^= 1
    if copy_at is not None:
        data[copy_at:copy_at + len(COPY)] = COPY
    return bytes(data)


PLACES = {
    "inside the second chunk": CHUNK + 4096,
    "payload across a chunk boundary": 2 * CHUNK - 32,
    "header across a chunk boundary": 3 * CHUNK - 8,
    "at the end of the file": SIZE - len(COPY),
}


@pytest.mark.parametrize("where", PLACES.values(), ids=PLACES.keys())
def test_a_valid_frame_beyond_the_first_chunk_makes_the_damage_corruption(where: int) -> None:
    assert where % 8 == 0 and where > CHUNK
    image = IMAGE.replace(SEGMENT, damaged(where))
    with pytest.raises(WalCorrupted, match=f"a valid frame follows at {where}") as exc:
        open_image(image)
    assert (exc.value.segment, exc.value.offset) == (SEGMENT, LAST.offset)
    report = verify(WAL_DIR, BLOB_DIR, io=RecordingIO(image))
    assert not report.ok and report.problem is not None
    assert (report.problem.segment, report.problem.offset) == (SEGMENT, LAST.offset)
    with pytest.raises(WalCorrupted):
        list(read_records(WAL_DIR, io=RecordingIO(image)))


def test_without_the_later_frame_the_same_damage_is_a_torn_tail() -> None:
    wal, _ = open_image(IMAGE.replace(SEGMENT, damaged(None)))
    with wal:
        assert wal.recovery.torn_tail_repaired and wal.last_seq == LAST.seq - 1


def test_salvage_moves_aside_and_zeroes_bytes_spanning_chunks() -> None:
    data = damaged(PLACES["header across a chunk boundary"])
    wal, io = open_image(IMAGE.replace(SEGMENT, data), salvage=True)
    with wal:
        assert wal.recovery.salvaged and wal.last_seq == LAST.seq - 1
        assert wal.recovery.broken_copy is not None
        assert io.read_file(wal.recovery.broken_copy) == data[LAST.offset:].rstrip(b"\0")
    assert io.read_file(SEGMENT)[LAST.offset:] == bytes(SIZE - LAST.offset)
    assert verify(WAL_DIR, BLOB_DIR, io=io).ok


def test_data_after_a_seal_beyond_the_first_chunk_is_corruption() -> None:
    io = RecordingIO()
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, segment_size=SIZE) as wal:
        wal.append(RecordType.EVENT, event(0))
        wal.append(RecordType.EVENT, event(1, SIZE))  # does not fit: a roll
    sealed = io.image().read(SEGMENT)
    seal = frames(sealed)[-1]
    assert seal.rtype == RecordType.SEAL and seal.end < CHUNK
    data = bytearray(sealed)
    data[SIZE - 1] = 1
    with pytest.raises(WalCorrupted, match="data after the seal") as exc:
        open_image(io.image().replace(SEGMENT, bytes(data)))
    assert exc.value.offset == seal.end


# Frames across chunk boundaries -------------------------------------------------------

def big_log() -> tuple[Image, list[dict[str, object]], bytes]:
    """Events that cross every chunk boundary of the first 3 MiB, then an inline
    checkpoint whose frame is larger than a chunk."""
    io = RecordingIO()
    rng = random.Random(7)
    payloads: list[dict[str, object]] = []
    state = rng.randbytes(CHUNK + CHUNK // 2)
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, segment_size=2 * SIZE,
                  inline_limit=2 * CHUNK) as wal:
        while wal.last_seq < 40:
            payloads.append({"kind": "x", "pad": rng.randbytes(rng.randrange(50_000, 150_000))})
            wal.append(RecordType.EVENT, payloads[-1])
        wal.append_checkpoint(checkpoint_meta(1, state), state)
    return io.image(), payloads, state


BIG_IMAGE, PAYLOADS, STATE = big_log()


def test_frames_across_chunk_boundaries_and_larger_than_a_chunk_read_back() -> None:
    found = frames(BIG_IMAGE.read(SEGMENT))
    assert sum(f.offset // CHUNK != (f.end - 1) // CHUNK for f in found) >= 3
    assert found[-1].end - found[-1].offset > CHUNK
    io = RecordingIO(BIG_IMAGE)
    with Wal.open(WAL_DIR, BLOB_DIR, io=io, segment_size=2 * SIZE) as wal:
        assert not wal.recovery.torn_tail_repaired
        assert [r.payload for r in wal.records()][1:-1] == PAYLOADS
        latest = wal.latest_checkpoint()
        assert latest is not None and latest.state == STATE
    assert verify(WAL_DIR, BLOB_DIR, io=io).ok
    assert len(list(read_records(WAL_DIR, io=io))) == len(found)


@pytest.mark.parametrize("at", [FRAME_HEADER_SIZE + 10, CHUNK + 100])
def test_a_torn_frame_larger_than_a_chunk_is_a_torn_tail(at: int) -> None:
    data = bytearray(BIG_IMAGE.read(SEGMENT))
    last = frames(bytes(data))[-1]
    data[last.offset + at] ^= 0x10
    with Wal.open(WAL_DIR, BLOB_DIR, io=RecordingIO(BIG_IMAGE.replace(SEGMENT, bytes(data))),
                  segment_size=2 * SIZE) as wal:
        assert wal.recovery.torn_tail_repaired and wal.last_seq == last.seq - 1


def test_a_salt_split_between_two_reads_is_found() -> None:
    # The window (the last read kept) can end anywhere; pieces after it then split
    # there, here in the middle of a later frame's salt field.
    salt = 0x11223344
    frame = encode_frame(RecordType.EVENT, salt, 9, b"\x80")
    at = CHUNK - 8  # the salt lies at CHUNK + 4 .. CHUNK + 8
    src = SegmentFile.of_bytes(bytes(at) + frame + bytes(64))
    src.read(6, 1)  # the window is now bytes 6 .. CHUNK + 6
    pieces = [lo for lo, _ in src.pieces(0, src.size)]
    assert CHUNK + 6 in pieces
    assert scan_after(src, 0, salt) == (at + FRAME_HEADER_SIZE + 1, at)
