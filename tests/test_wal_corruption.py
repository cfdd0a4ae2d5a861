"""Damage to sealed segments or acknowledged records: open fails closed with the place
of the damage, verify reports it, and salvage cuts back to the newest intact checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nkat.supervisor.wal import RecordType, Wal, WalCorrupted, verify
from nkat.supervisor.wal.format import FRAME_HEADER_SIZE, HEADER_SIZE, SegmentHeader
from nkat.supervisor.wal.reader import Frame, FrameReader
from nkat.supervisor.wal.testing.crashcheck import BLOB_DIR, RUN, WAL_DIR, checkpoint_meta
from nkat.supervisor.wal.testing.recording import Image, RecordingIO

SETTINGS = {"segment_size": 1024, "backup_checkpoints": 20}


def build() -> tuple[Image, dict[int, int]]:
    """A log of several sealed segments and an active one, with a checkpoint every
    third event; returns its image and {ckpt_seq: record seq}."""
    io = RecordingIO()
    ckpts = {}
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, **SETTINGS) as wal:  # type: ignore[arg-type]
        for i in range(1, 31):
            wal.append(RecordType.EVENT, {"kind": "progress", "i": i, "pad": b"x" * (i % 7 * 9)})
            if i % 3 == 0:
                state = bytes([i]) * 20
                ckpts[i // 3] = wal.append_checkpoint(checkpoint_meta(i // 3, state), state)
    return io.image(), ckpts


IMAGE, CKPTS = build()
SEGMENTS = sorted(p for p, ino in IMAGE.walk() if p.suffix == ".wal")


def frames(path: Path) -> list[Frame]:
    data = IMAGE.read(path)
    return list(FrameReader(data, SegmentHeader.decode(data).salt, HEADER_SIZE, None))


def flip(path: Path, offset: int, bit: int = 0) -> Image:
    data = bytearray(IMAGE.read(path))
    data[offset] ^= 1 << bit
    return IMAGE.replace(path, bytes(data))


def open_image(image: Image, **kwargs: object) -> tuple[Wal, RecordingIO]:
    io = RecordingIO(image)
    return Wal.open(WAL_DIR, BLOB_DIR, io=io, **SETTINGS, **kwargs), io  # type: ignore[arg-type]


def expected_offset(path: Path, offset: int) -> int | None:
    """Where open must report a flip at ``offset`` of a sealed segment (None: nowhere,
    the byte is frame padding, which no checksum covers and nothing reads)."""
    if offset < HEADER_SIZE:
        return 0
    for f in frames(path):
        if f.offset <= offset < f.end:
            return f.offset if offset < f.offset + FRAME_HEADER_SIZE + len(f.payload) else None
    return frames(path)[-1].end  # after the seal


def test_the_log_has_sealed_segments_and_an_active_one() -> None:
    assert len(SEGMENTS) >= 4
    assert all(frames(p)[-1].rtype == RecordType.SEAL for p in SEGMENTS[:-1])


def test_every_byte_of_a_sealed_segment() -> None:
    path = SEGMENTS[1]
    for offset in range(len(IMAGE.read(path))):
        want = expected_offset(path, offset)
        if want is None:
            open_image(flip(path, offset, offset % 8))[0].close()
            continue
        with pytest.raises(WalCorrupted) as exc:
            open_image(flip(path, offset, offset % 8))
        assert (exc.value.segment, exc.value.offset) == (path, want), offset


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_bit_flip_in_any_sealed_segment(data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(SEGMENTS[:-1]))
    offset = data.draw(st.integers(0, len(IMAGE.read(path)) - 1))
    image = flip(path, offset, data.draw(st.integers(0, 7)))
    if expected_offset(path, offset) is None:
        open_image(image)[0].close()
    else:
        with pytest.raises(WalCorrupted):
            open_image(image)
        assert not verify(WAL_DIR, BLOB_DIR, io=RecordingIO(image)).ok


def test_damage_to_an_acknowledged_record_followed_by_others() -> None:
    active = SEGMENTS[-1]
    for f in frames(active)[:-1]:
        with pytest.raises(WalCorrupted, match="valid frame follows") as exc:
            open_image(flip(active, f.offset + FRAME_HEADER_SIZE))
        assert (exc.value.segment, exc.value.offset) == (active, f.offset)


def test_damage_to_the_last_record_reads_as_a_torn_tail() -> None:
    # Indistinguishable from a crash mid-append, as in every log of this design: the
    # record is moved aside (not lost: see broken_copy) and the log goes on.
    active = SEGMENTS[-1]
    last = frames(active)[-1]
    wal, io = open_image(flip(active, last.offset + FRAME_HEADER_SIZE))
    with wal:
        assert wal.recovery.torn_tail_repaired and wal.last_seq == last.seq - 1
        assert wal.recovery.broken_copy is not None
        kept = io.read_file(wal.recovery.broken_copy)  # up to the last non-zero byte
        assert kept[FRAME_HEADER_SIZE + 1:] == \
            IMAGE.read(active)[last.offset + FRAME_HEADER_SIZE + 1:last.end].rstrip(b"\0")


def test_salvage_cuts_back_to_the_newest_intact_checkpoint_before_the_damage() -> None:
    active = SEGMENTS[-1]
    damaged = [f for f in frames(active) if f.rtype == RecordType.EVENT][-2]
    wal, io = open_image(flip(active, damaged.offset + 30), salvage=True)
    newest = max(seq for seq in CKPTS.values() if seq < damaged.seq)
    with wal:
        assert wal.recovery.salvaged and f"offset {damaged.offset}" in str(wal.recovery.problem)
        assert wal.last_seq == newest
        latest = wal.latest_checkpoint()
        assert latest is not None and latest.seq == newest
        assert wal.recovery.broken_copy is not None and io.exists(wal.recovery.broken_copy)
        assert wal.append(RecordType.EVENT, {"kind": "after salvage"}) == newest + 1
    with Wal.open(WAL_DIR, BLOB_DIR, io=io, **SETTINGS) as again:  # type: ignore[arg-type]
        assert again.last_seq == newest + 1 and not again.recovery.salvaged
    assert verify(WAL_DIR, BLOB_DIR, io=io).ok


def test_salvage_of_a_sealed_segment_moves_later_segments_aside() -> None:
    path = SEGMENTS[2]
    damaged = frames(path)[len(frames(path)) // 2]
    wal, io = open_image(flip(path, damaged.offset + 5), salvage=True)
    newest = max(seq for seq in CKPTS.values() if seq < damaged.seq)
    with wal:
        assert wal.last_seq == newest
        assert [r.seq for r in wal.records()] == list(range(1, newest + 1))
    names = io.listdir(WAL_DIR)
    for later in SEGMENTS[3:]:
        assert later.name + ".broken" in names and later.name not in names
    assert wal.recovery.broken_copy == path.with_name(path.name + ".broken")


def test_salvage_without_an_earlier_checkpoint_keeps_the_records_before_the_damage() -> None:
    first = frames(SEGMENTS[0])
    damaged = next(f for f in first if f.seq < min(CKPTS.values()) and f.seq > 2)
    wal, _ = open_image(flip(SEGMENTS[0], damaged.offset + FRAME_HEADER_SIZE), salvage=True)
    with wal:
        assert wal.last_seq == damaged.seq - 1 and wal.latest_checkpoint() is None


def test_salvage_gives_up_when_nothing_is_left() -> None:
    with pytest.raises(WalCorrupted, match="nothing to salvage"):
        open_image(flip(SEGMENTS[0], 3), salvage=True)


def test_a_missing_segment_is_named() -> None:
    io = RecordingIO(IMAGE)
    io.unlink(SEGMENTS[2])
    with pytest.raises(WalCorrupted, match=f"segment {SEGMENTS[2].stem} is missing"):
        Wal.open(WAL_DIR, BLOB_DIR, io=io, **SETTINGS)  # type: ignore[arg-type]
    with Wal.open(WAL_DIR, BLOB_DIR, io=io, salvage=True,
                  **SETTINGS) as wal:  # type: ignore[arg-type]
        gap = frames(SEGMENTS[1])[-1].seq
        assert wal.last_seq == max(seq for seq in CKPTS.values() if seq < gap)


def test_a_segment_from_elsewhere_does_not_follow() -> None:
    other, _ = build()
    image = IMAGE.replace(SEGMENTS[2], other.read(SEGMENTS[2]))
    with pytest.raises(WalCorrupted, match="does not follow") as exc:
        open_image(image)
    assert (exc.value.segment, exc.value.offset) == (SEGMENTS[2], 0)


def test_verify_reports_segments_records_checkpoints_and_changes_nothing() -> None:
    io = RecordingIO(IMAGE)
    report = verify(WAL_DIR, BLOB_DIR, io=io)
    assert report.ok and report.problem is None and io.ops == []
    assert [s.path for s in report.segments] == SEGMENTS
    assert [s.sealed for s in report.segments] == [True] * (len(SEGMENTS) - 1) + [False]
    assert report.segments[0].first_seq == 1
    assert all(a.last_seq + 1 == b.first_seq  # type: ignore[operator]
               for a, b in zip(report.segments, report.segments[1:], strict=False))
    assert report.records == report.segments[-1].last_seq
    assert [c.ckpt_seq for c in report.checkpoints] == sorted(CKPTS)
    assert [c.seq for c in report.checkpoints] == [CKPTS[k] for k in sorted(CKPTS)]
    assert report.as_dict()["segments"][0]["path"] == str(SEGMENTS[0])


def test_verify_reports_the_place_of_damage() -> None:
    active = SEGMENTS[-1]
    damaged = frames(active)[1]
    io = RecordingIO(flip(active, damaged.offset + 27))
    report = verify(WAL_DIR, BLOB_DIR, io=io)
    assert not report.ok and report.problem is not None
    assert (report.problem.segment, report.problem.offset) == (active, damaged.offset)
    assert "checksum mismatch" in report.problem.reason and io.ops == []


def test_verify_notes_a_torn_tail_without_failing() -> None:
    active = SEGMENTS[-1]
    last = frames(active)[-1]
    data = IMAGE.read(active)
    report = verify(WAL_DIR, BLOB_DIR, io=RecordingIO(IMAGE.replace(
        active, data[:last.offset + 30] + bytes(len(data) - last.offset - 30))))
    assert report.ok and any("torn tail" in n for n in report.notes)
    assert report.records == last.seq - 1
