"""Retention: the newest ``backup_checkpoints`` checkpoints stay; older sealed segments
and blobs go, oldest first, each unlink made durable before the next."""

from __future__ import annotations

import os

import pytest

from nkat.supervisor.wal import RecordType, Wal, WalCorrupted, verify
from nkat.supervisor.wal.testing.crashcheck import BLOB_DIR, RUN, WAL_DIR, checkpoint_meta
from nkat.supervisor.wal.testing.recording import RecordingIO

SETTINGS = {"segment_size": 1024, "inline_limit": 64, "blob_chunk": 64}


def state(i: int, size: int) -> bytes:
    return bytes([i % 251 + 1]) * size


def fill(io: RecordingIO, checkpoints: int, backup: int, size: int = 200) -> Wal:
    """A log with ``checkpoints`` checkpoints (blobs when ``size`` > 64), events between."""
    wal = Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, backup_checkpoints=backup,
                   **SETTINGS)  # type: ignore[arg-type]
    for i in range(1, checkpoints + 1):
        wal.append(RecordType.EVENT, {"kind": "progress", "pad": b"e" * 150})
        wal.append_checkpoint(checkpoint_meta(i, state(i, size)), state(i, size))
    return wal


def segments(io: RecordingIO) -> list[str]:
    return sorted(n for n in io.listdir(WAL_DIR) if n.endswith(".wal"))


def test_only_the_newest_checkpoints_and_what_they_need_stay() -> None:
    io = RecordingIO()
    with fill(io, 12, backup=3) as wal:
        infos = wal.checkpoints()
        assert [c.ckpt_seq for c in infos] == [10, 11, 12]
        assert all(not c.inline and c.blob for c in infos)
        assert sorted(io.listdir(BLOB_DIR)) == sorted(c.blob for c in infos)  # type: ignore[misc]
        records = list(wal.records())
        oldest = infos[0].seq
        assert records[0].type == RecordType.RUN and records[0].seq <= oldest
        first_segment = int(segments(io)[0][:16], 16)
        assert first_segment > 0
    # The segment holding the oldest retained checkpoint is the first one kept.
    with Wal.open(WAL_DIR, BLOB_DIR, io=io, backup_checkpoints=3,
                  **SETTINGS) as again:  # type: ignore[arg-type]
        assert [c.ckpt_seq for c in again.checkpoints()] == [10, 11, 12]
        assert int(segments(io)[0][:16], 16) == first_segment
    assert verify(WAL_DIR, BLOB_DIR, io=io, backup_checkpoints=3).ok


def test_the_active_segment_is_never_removed() -> None:
    io = RecordingIO()
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, backup_checkpoints=1,
                  segment_size=1 << 16) as wal:
        for i in range(1, 6):
            wal.append_checkpoint(checkpoint_meta(i, state(i, 10)), state(i, 10))
        assert segments(io) == ["0000000000000000.wal"]
        assert [c.ckpt_seq for c in wal.checkpoints()] == [5]
        assert len(list(wal.records())) == 6


def test_unlinks_go_oldest_first_each_durable_before_the_next() -> None:
    io = RecordingIO()
    fill(io, 12, backup=2).close()
    kinds = [(op.kind, op.path) for op in io.ops if op.kind in ("unlink", "fsync_dir")]
    unlinks = [(i, path) for i, (kind, path) in enumerate(kinds) if kind == "unlink"
               and not path.name.endswith(".tmp")]
    assert len(unlinks) > 4
    for i, path in unlinks:
        assert kinds[i + 1] == ("fsync_dir", path.parent)
    removed = [path.name for _, path in unlinks if path.suffix == ".wal"]
    assert removed == sorted(removed)


def test_reopening_with_more_backups_keeps_what_is_left() -> None:
    io = RecordingIO()
    fill(io, 8, backup=2).close()
    with Wal.open(WAL_DIR, BLOB_DIR, io=io, backup_checkpoints=5,
                  **SETTINGS) as wal:  # type: ignore[arg-type]
        kept = [c.ckpt_seq for c in wal.checkpoints()]
        assert kept[-2:] == [7, 8] and len(kept) <= 5
        latest = wal.latest_checkpoint()
        assert latest is not None and latest.state == state(8, 200)


def test_reopening_with_fewer_backups_prunes_at_once() -> None:
    io = RecordingIO()
    fill(io, 8, backup=4).close()
    assert len(io.listdir(BLOB_DIR)) == 4
    with Wal.open(WAL_DIR, BLOB_DIR, io=io, backup_checkpoints=1,
                  **SETTINGS) as wal:  # type: ignore[arg-type]
        assert [c.ckpt_seq for c in wal.checkpoints()] == [8]
    assert len(io.listdir(BLOB_DIR)) == 1


def test_orphan_blobs_are_removed_and_other_files_left_alone() -> None:
    io = RecordingIO()
    fill(io, 3, backup=3).close()
    for name in ("0000000000000009-deadbeef.blob", "README"):
        io.close(io.open(BLOB_DIR / name, os.O_WRONLY | os.O_CREAT))
    Wal.open(WAL_DIR, BLOB_DIR, io=io, **SETTINGS).close()  # type: ignore[arg-type]
    names = io.listdir(BLOB_DIR)
    assert "README" in names and "0000000000000009-deadbeef.blob" not in names
    assert len(names) == 4


def test_a_blob_missing_inside_the_retained_window_is_damage() -> None:
    io = RecordingIO()
    with fill(io, 6, backup=3) as wal:
        middle = wal.checkpoints()[1].blob
    assert middle is not None
    io.unlink(BLOB_DIR / middle)
    report = verify(WAL_DIR, BLOB_DIR, io=io)
    assert not report.ok and not report.needs_salvage
    # Older than the newest checkpoint: the log resumes from that one, and says so.
    with Wal.open(WAL_DIR, BLOB_DIR, io=io, backup_checkpoints=3,
                  **SETTINGS) as wal:  # type: ignore[arg-type]
        assert any(middle in w and "missing" in w for w in wal.recovery.warnings)
        assert [c.ckpt_seq for c in wal.checkpoints()] == [4, 6]
        assert wal.latest_checkpoint().ckpt_seq == 6  # type: ignore[union-attr]
    newest = sorted(io.listdir(BLOB_DIR))[-1]
    io.unlink(BLOB_DIR / newest)
    with pytest.raises(WalCorrupted, match="missing"):
        Wal.open(WAL_DIR, BLOB_DIR, io=io, backup_checkpoints=3, **SETTINGS)  # type: ignore[arg-type]


def test_inline_checkpoints_keep_their_segments() -> None:
    io = RecordingIO()
    with fill(io, 10, backup=2, size=20) as wal:
        assert [c.ckpt_seq for c in wal.checkpoints()] == [9, 10]
        assert all(c.inline for c in wal.checkpoints())
        first = list(wal.records())[0].seq
        assert first <= wal.checkpoints()[0].seq
    assert io.listdir(BLOB_DIR) == []
