"""A crash mid-append leaves a torn last frame: recovery keeps every earlier record,
moves the tail aside, zeroes it, and the log takes new appends, crash after crash."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nkat.supervisor.wal import RecordType, Wal, WalTruncated
from nkat.supervisor.wal.format import FRAME_HEADER_SIZE, frame_size, pack_payload
from nkat.supervisor.wal.reader import scan_log
from nkat.supervisor.wal.testing.crashcheck import BLOB_DIR, RUN, WAL_DIR
from nkat.supervisor.wal.testing.recording import Image, RecordingIO

SEGMENT = WAL_DIR / "0000000000000000.wal"
SIZE = 1 << 16
LAST = {"kind": "last", "pad": b"L" * 700}


def payload(i: int) -> dict[str, object]:
    return {"kind": "progress", "i": i, "pad": random.Random(i).randbytes(20 + 37 * i % 300)}


def build(kept: int) -> tuple[Image, int, int]:
    """A log of ``kept`` records and LAST, whose frame spans sectors; returns the image
    and that frame's start and end (after padding)."""
    io = RecordingIO()
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, segment_size=SIZE) as wal:
        for i in range(kept - 1):
            wal.append(RecordType.EVENT, payload(i))
        wal.append(RecordType.EVENT, LAST)
    end = scan_log(io, WAL_DIR).segments[-1].end
    return io.image(), end - frame_size(len(pack_payload(LAST))), end


def recover(image: Image, **kwargs: object) -> tuple[Wal, RecordingIO]:
    io = RecordingIO(image)
    return Wal.open(WAL_DIR, BLOB_DIR, io=io, segment_size=SIZE, **kwargs), io  # type: ignore[arg-type]


def assert_recovers(image: Image, n: int, torn: bool) -> RecordingIO:
    """Recovery keeps records 1..n, reports the torn tail, and the log takes a new
    record that a reopen finds."""
    wal, io = recover(image)
    with wal:
        assert [r.seq for r in wal.records()] == list(range(1, n + 1))
        assert wal.recovery.torn_tail_repaired == torn
        assert wal.append(RecordType.EVENT, {"kind": "after"}) == n + 1
    again, _ = recover(io.image())
    with again:
        assert again.last_seq == n + 1 and not again.recovery.torn_tail_repaired
    return io


KEPT = 20  # records before the last one
IMAGE, START, END = build(KEPT)
DATA = IMAGE.read(SEGMENT)
PAYLOAD_END = START + FRAME_HEADER_SIZE + len(pack_payload(LAST))


def cut_at(cut: int, data: bytes = DATA) -> bytes:
    """The segment as a crash at byte ``cut`` of its last write leaves it: the zeros it
    was prepared with after that (a crash never makes a segment shorter)."""
    return data[:cut] + bytes(len(data) - cut)


def test_every_truncation_of_the_last_frame() -> None:
    for cut in range(START, END):
        image = IMAGE.replace(SEGMENT, cut_at(cut))
        # A cut in the zero padding after the payload loses nothing (it reads as zeros).
        whole = cut >= PAYLOAD_END
        assert_recovers(image, KEPT + whole, torn=START < cut < PAYLOAD_END)


def test_the_tail_is_copied_aside_then_zeroed() -> None:
    cut = (START + END) // 2
    wal, io = recover(IMAGE.replace(SEGMENT, DATA[:cut] + bytes(SIZE - cut)))
    wal.close()
    assert wal.recovery.broken_copy == SEGMENT.with_name(SEGMENT.name + ".broken")
    assert io.read_file(wal.recovery.broken_copy) == DATA[START:cut]
    assert io.read_file(SEGMENT)[START:] == bytes(SIZE - START)
    # A segment cut short is no crash (segments are zero-filled to full size first).
    with pytest.raises(WalTruncated, match="truncated"):
        recover(IMAGE.replace(SEGMENT, DATA[:cut]))


def test_every_sector_of_the_last_frame_lost() -> None:
    first, last = START // 512, (END - 1) // 512
    for sector in range(first, last + 1):
        lo, hi = max(START, sector * 512), min(END, (sector + 1) * 512)
        image = IMAGE.replace(SEGMENT, DATA[:lo] + bytes(hi - lo) + DATA[hi:])
        assert_recovers(image, KEPT, torn=True)


@pytest.mark.parametrize("extra", [bytes(4096), b"\x01", os.urandom(700), b"\xff" * 24])
def test_zeros_or_garbage_after_the_last_frame(extra: bytes) -> None:
    image = IMAGE.replace(SEGMENT, DATA[:END] + extra + DATA[END + len(extra):])
    assert_recovers(image, KEPT + 1, torn=any(extra))


@settings(max_examples=40, deadline=None)
@given(cut=st.integers(START, END - 1), garbage=st.binary(min_size=1, max_size=900))
def test_garbage_in_place_of_a_torn_frame(cut: int, garbage: bytes) -> None:
    data = DATA[:cut] + garbage + DATA[cut + len(garbage):]
    intact = data[:PAYLOAD_END] == DATA[:PAYLOAD_END]  # the padding after it is never read
    assert_recovers(IMAGE.replace(SEGMENT, data), KEPT + intact,
                    torn=any(data[END:]) if intact else any(data[START:]))


def test_a_second_crash_after_recovery() -> None:
    cut = START + 100
    io = assert_recovers(IMAGE.replace(SEGMENT, cut_at(cut)), KEPT, torn=True)
    image = io.image()
    data = image.read(SEGMENT)
    after = len(pack_payload({"kind": "after"}))
    new_start = scan_log(io, WAL_DIR).segments[-1].end - frame_size(after)
    assert new_start == START
    for cut2 in range(new_start + 1, new_start + FRAME_HEADER_SIZE + after):
        wal, _ = recover(image.replace(SEGMENT, data[:cut2] + bytes(SIZE - cut2)))
        with wal:
            assert wal.last_seq == KEPT and wal.recovery.torn_tail_repaired
            assert wal.append(RecordType.EVENT, {"kind": "third life"}) == KEPT + 1


def test_torn_tails_on_a_real_file(tmp_path: Path) -> None:
    wal_dir, blob_dir = tmp_path / "wal", tmp_path / "blobs"
    with Wal.open(wal_dir, blob_dir, run=RUN, segment_size=SIZE) as wal:
        for i in range(5):
            wal.append(RecordType.EVENT, payload(i))
        last = wal.last_seq
    path = wal_dir / SEGMENT.name
    full = path.read_bytes()
    end = len(full.rstrip(b"\0"))
    for cut in (end - 1, end - 9, end - 100):
        path.write_bytes(cut_at(cut, full))
        with Wal.open(wal_dir, blob_dir, segment_size=SIZE) as wal:
            assert wal.recovery.torn_tail_repaired and wal.last_seq == last - 1
            assert wal.append(RecordType.EVENT, payload(99)) == last
        with Wal.open(wal_dir, blob_dir, segment_size=SIZE) as wal:
            assert wal.last_seq == last and not wal.recovery.torn_tail_repaired
        path.write_bytes(full)
