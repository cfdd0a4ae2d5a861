"""Damage to sealed segments or acknowledged records, found at the exact place: damage
older than the newest checkpoint that verifies is a warning and the log resumes from
it; damage to that checkpoint or after it fails the open closed; salvage resumes from
the newest intact checkpoint and keeps every record that verifies."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nkat.supervisor.wal import RecordType, Wal, WalCorrupted, verify
from nkat.supervisor.wal.format import FRAME_HEADER_SIZE, SegmentHeader
from nkat.supervisor.wal.reader import Frame, FrameReader
from nkat.supervisor.wal.testing.crashcheck import BLOB_DIR, RUN, WAL_DIR, checkpoint_meta
from nkat.supervisor.wal.testing.recording import Image, RecordingIO

SETTINGS = {"segment_size": 1024, "backup_checkpoints": 20}


def build(tail_events: int = 3) -> tuple[Image, dict[int, int]]:
    """A log of several sealed segments and an active one, with a checkpoint every
    third event and ``tail_events`` events after the last; returns its image and
    {ckpt_seq: record seq}."""
    io = RecordingIO()
    ckpts = {}
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, **SETTINGS) as wal:  # type: ignore[arg-type]
        for i in range(1, 31 + tail_events):
            wal.append(RecordType.EVENT, {"kind": "progress", "i": i, "pad": b"x" * (i % 7 * 9)})
            if i % 3 == 0 and i <= 30:
                state = bytes([i]) * 20
                ckpts[i // 3] = wal.append_checkpoint(checkpoint_meta(i // 3, state), state)
    return io.image(), ckpts


IMAGE, CKPTS = build()
SEGMENTS = sorted(p for p, ino in IMAGE.walk() if p.suffix == ".wal")
NEWEST = CKPTS[max(CKPTS)]  # the record seq of the newest checkpoint


def frames(path: Path) -> list[Frame]:
    data = IMAGE.read(path)
    header = SegmentHeader.decode(data)
    return list(FrameReader(data, header.salt, header.length, None))


def flip(path: Path, offset: int, bit: int = 0) -> Image:
    data = bytearray(IMAGE.read(path))
    data[offset] ^= 1 << bit
    return IMAGE.replace(path, bytes(data))


def open_image(image: Image, **kwargs: object) -> tuple[Wal, RecordingIO]:
    io = RecordingIO(image)
    return Wal.open(WAL_DIR, BLOB_DIR, io=io, **SETTINGS, **kwargs), io  # type: ignore[arg-type]


def expected_offset(path: Path, offset: int) -> int | None:
    """Where a flip at ``offset`` of a sealed segment is found (None: nowhere, the byte
    is frame padding, which no checksum covers and nothing reads)."""
    if offset < SegmentHeader.decode(IMAGE.read(path)).length:
        return 0
    for f in frames(path):
        if f.offset <= offset < f.end:
            return f.offset if offset < f.offset + FRAME_HEADER_SIZE + len(f.payload) else None
    return frames(path)[-1].end  # after the seal


#: Sealed segments that end before the newest checkpoint, and the frames after it.
OLDER = [p for p in SEGMENTS if frames(p)[-1].seq < NEWEST]
AFTER = [f for p in SEGMENTS for f in frames(p) if f.seq > NEWEST]
AFTER_PATHS = {f.seq: p for p in SEGMENTS for f in frames(p) if f.seq > NEWEST}


def warning_at(wal: Wal, path: Path, offset: int) -> bool:
    return any(w.startswith(f"{path}: offset {offset}:") for w in wal.recovery.warnings)


def test_the_log_has_sealed_segments_and_an_active_one() -> None:
    assert len(SEGMENTS) >= 4
    assert all(frames(p)[-1].rtype == RecordType.SEAL for p in SEGMENTS[:-1])
    assert len(OLDER) >= 3  # sealed segments wholly before the newest checkpoint
    assert len([f for f in AFTER if f.rtype == RecordType.EVENT]) >= 3


def test_every_byte_of_a_sealed_segment() -> None:
    """A sealed segment before the newest checkpoint: each damaged byte is named, at its
    frame or header, and the log resumes from the newest checkpoint."""
    path = SEGMENTS[1]
    for offset in range(len(IMAGE.read(path))):
        want = expected_offset(path, offset)
        wal, _ = open_image(flip(path, offset, offset % 8))
        with wal:
            latest = wal.latest_checkpoint()
            assert latest is not None and latest.seq == NEWEST, offset
            if want is None:
                assert wal.recovery.warnings == (), offset
            else:
                assert warning_at(wal, path, want), (offset, wal.recovery.warnings)
        report = verify(WAL_DIR, BLOB_DIR, io=RecordingIO(flip(path, offset, offset % 8)))
        assert report.ok == (want is None) and not report.needs_salvage, offset


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_bit_flip_in_any_sealed_segment(data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(OLDER))
    offset = data.draw(st.integers(0, len(IMAGE.read(path)) - 1))
    image = flip(path, offset, data.draw(st.integers(0, 7)))
    wal, _ = open_image(image)
    with wal:
        assert wal.latest_checkpoint().seq == NEWEST  # type: ignore[union-attr]
    report = verify(WAL_DIR, BLOB_DIR, io=RecordingIO(image))
    assert report.ok == (expected_offset(path, offset) is None)


def test_damage_to_an_acknowledged_record_after_the_newest_checkpoint_fails_closed() -> None:
    for f in AFTER[:-1]:  # the last frame reads as a torn tail
        path = AFTER_PATHS[f.seq]
        with pytest.raises(WalCorrupted) as exc:
            open_image(flip(path, f.offset + FRAME_HEADER_SIZE))
        assert (exc.value.segment, exc.value.offset) == (path, f.offset)


def test_damage_to_an_acknowledged_record_before_the_newest_checkpoint_is_a_warning() -> None:
    newest = next(p for p in SEGMENTS if any(f.seq == NEWEST for f in frames(p)))
    for f in [f for f in frames(newest) if f.seq < NEWEST]:
        wal, _ = open_image(flip(newest, f.offset + FRAME_HEADER_SIZE))
        with wal:
            assert wal.latest_checkpoint().seq == NEWEST  # type: ignore[union-attr]
            assert warning_at(wal, newest, f.offset)


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


def test_salvage_resumes_from_the_newest_checkpoint_and_keeps_every_intact_record() -> None:
    damaged = [f for f in AFTER if f.rtype == RecordType.EVENT][-2]
    active = AFTER_PATHS[damaged.seq]
    wal, io = open_image(flip(active, damaged.offset + 30), salvage=True)
    with wal:
        assert wal.recovery.salvaged and f"offset {damaged.offset}" in str(wal.recovery.problem)
        latest = wal.latest_checkpoint()
        assert latest is not None and latest.ckpt_seq == max(CKPTS)
        assert wal.recovery.reappended == (max(CKPTS),) and latest.seq > damaged.seq
        seqs = [r.seq for r in wal.records()]
        assert set(range(1, damaged.seq)) | set(range(damaged.seq + 1, IMAGE_LAST + 1)) <= set(seqs)
        after = wal.append(RecordType.EVENT, {"kind": "after salvage"})
    with Wal.open(WAL_DIR, BLOB_DIR, io=io, **SETTINGS) as again:  # type: ignore[arg-type]
        assert again.last_seq == after and not again.recovery.salvaged
        assert warning_at(again, active, damaged.offset)  # still there, no longer needed
    report = verify(WAL_DIR, BLOB_DIR, io=io)
    assert not report.ok and not report.needs_salvage


IMAGE_LAST = frames(SEGMENTS[-1])[-1].seq


def test_damage_in_a_sealed_segment_keeps_every_later_segment() -> None:
    path = OLDER[1]
    damaged = frames(path)[len(frames(path)) // 2]
    for salvage in (False, True):
        wal, io = open_image(flip(path, damaged.offset + 5), salvage=salvage)
        with wal:
            assert not wal.recovery.salvaged and wal.last_seq == IMAGE_LAST
            assert {r.seq for r in wal.records()} == set(range(1, IMAGE_LAST + 1)) - {damaged.seq}
        assert not [n for n in io.listdir(WAL_DIR) if n.endswith(".broken")]


def events_only() -> Image:
    io = RecordingIO()
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, **SETTINGS) as wal:  # type: ignore[arg-type]
        for i in range(30):
            wal.append(RecordType.EVENT, {"kind": "progress", "i": i, "pad": b"x" * 40})
    return io.image()


def test_salvage_without_any_checkpoint_keeps_the_records_before_the_damage() -> None:
    image = events_only()
    first = sorted(p for p, ino in image.walk() if p.suffix == ".wal")[0]
    data = image.read(first)
    header = SegmentHeader.decode(data)
    damaged = list(FrameReader(data, header.salt, header.length, None))[3]
    broken = bytearray(data)
    broken[damaged.offset + FRAME_HEADER_SIZE] ^= 1
    image = image.replace(first, bytes(broken))
    with pytest.raises(WalCorrupted):
        Wal.open(WAL_DIR, BLOB_DIR, io=RecordingIO(image), **SETTINGS)  # type: ignore[arg-type]
    with Wal.open(WAL_DIR, BLOB_DIR, io=RecordingIO(image), salvage=True,
                  **SETTINGS) as wal:  # type: ignore[arg-type]
        assert wal.last_seq == damaged.seq - 1 and wal.latest_checkpoint() is None


def test_salvage_gives_up_when_nothing_is_left() -> None:
    image = events_only()
    first = sorted(p for p, ino in image.walk() if p.suffix == ".wal")[0]
    data = bytearray(image.read(first))
    data[3] ^= 1
    with pytest.raises(WalCorrupted, match="nothing to salvage"):
        Wal.open(WAL_DIR, BLOB_DIR, io=RecordingIO(image.replace(first, bytes(data))),
                 salvage=True, **SETTINGS)  # type: ignore[arg-type]


def test_a_missing_segment_is_named() -> None:
    io = RecordingIO(IMAGE)
    io.unlink(OLDER[1])
    report = verify(WAL_DIR, BLOB_DIR, io=RecordingIO(io.image()))
    assert not report.ok and report.problem is not None
    assert report.problem.segment == OLDER[1] and "is missing" in report.problem.reason
    with Wal.open(WAL_DIR, BLOB_DIR, io=io, **SETTINGS) as wal:  # type: ignore[arg-type]
        assert any(f"segment {OLDER[1].stem} is missing" in w for w in wal.recovery.warnings)
        assert wal.latest_checkpoint().seq == NEWEST  # type: ignore[union-attr]


def test_a_segment_from_elsewhere_does_not_follow() -> None:
    other, _ = build()
    image = IMAGE.replace(SEGMENTS[2], other.read(SEGMENTS[2]))
    wal, _ = open_image(image)
    with wal:
        assert warning_at(wal, SEGMENTS[2], 0)
        assert any("does not follow" in w for w in wal.recovery.warnings)
    image = IMAGE.replace(SEGMENTS[-1], other.read(SEGMENTS[-1]))
    with pytest.raises(WalCorrupted, match="does not follow") as exc:
        open_image(image)
    assert (exc.value.segment, exc.value.offset) == (SEGMENTS[-1], 0)


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
