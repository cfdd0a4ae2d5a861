"""Checkpoints of several workers (shards) in one log: retention keeps the newest
``backup_checkpoints`` of every shard, each shard resumes from its own newest one, and
a run of one worker (no ``shard`` in its payloads) behaves as before."""

from __future__ import annotations

import pytest

from nkat.supervisor.wal import RecordType, Wal, WalCorrupted, verify
from nkat.supervisor.wal.testing.crashcheck import BLOB_DIR, RUN, WAL_DIR, checkpoint_meta
from nkat.supervisor.wal.testing.recording import RecordingIO

SETTINGS = {"segment_size": 2048, "inline_limit": 64, "blob_chunk": 64, "backup_checkpoints": 2}


def state(shard: int, i: int, size: int = 100) -> bytes:
    return bytes([shard * 50 + i % 50 + 1]) * size


def meta(shard: int, i: int, size: int = 100) -> dict[str, object]:
    return {**checkpoint_meta(i, state(shard, i, size)), "shard": shard}


def fill(io: RecordingIO, plan: list[tuple[int, int]], size: int = 100) -> Wal:
    """Checkpoint (shard, ckpt_seq) in the order of ``plan``, an event before each."""
    wal = Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, **SETTINGS)  # type: ignore[arg-type]
    for shard, i in plan:
        wal.append(RecordType.EVENT, {"kind": "progress", "pad": b"e" * 100})
        wal.append_checkpoint(meta(shard, i, size), state(shard, i, size))
    return wal


def test_retention_keeps_the_newest_checkpoints_of_every_shard() -> None:
    io = RecordingIO()
    # Shard 1 checkpoints rarely: its two newest are far older than shard 0's.
    plan = [(1, 1), (1, 2)] + [(0, i) for i in range(1, 13)]
    with fill(io, plan) as wal:
        assert wal.shards() == [0, 1]
        assert [c.ckpt_seq for c in wal.checkpoints(shard=0)] == [11, 12]
        assert [c.ckpt_seq for c in wal.checkpoints(shard=1)] == [1, 2]
        assert [(c.shard, c.ckpt_seq) for c in wal.checkpoints()] == [(1, 1), (1, 2), (0, 11),
                                                                     (0, 12)]
        assert len(io.listdir(BLOB_DIR)) == 4
    with Wal.open(WAL_DIR, BLOB_DIR, io=io, **SETTINGS) as wal:  # type: ignore[arg-type]
        for shard, newest in ((0, 12), (1, 2)):
            latest = wal.latest_checkpoint(shard=shard)
            assert latest is not None and (latest.shard, latest.ckpt_seq) == (shard, newest)
            assert latest.state == state(shard, newest)
        assert wal.recovery.warnings == ()
    assert verify(WAL_DIR, BLOB_DIR, io=io, backup_checkpoints=2).ok


def test_each_shards_blobs_go_oldest_first_and_are_not_taken_for_damage() -> None:
    io = RecordingIO()
    plan = [(0, 1), (1, 1), (0, 2), (1, 2), (1, 3), (1, 4), (1, 5)]
    fill(io, plan).close()
    with Wal.open(WAL_DIR, BLOB_DIR, io=io, **SETTINGS) as wal:  # type: ignore[arg-type]
        # Shard 1 pruned its blobs 1..3 while shard 0's older ones stay.
        assert [(c.shard, c.ckpt_seq) for c in wal.checkpoints()] == [(0, 1), (0, 2), (1, 4),
                                                                     (1, 5)]
        assert wal.recovery.warnings == ()
    assert verify(WAL_DIR, BLOB_DIR, io=io).ok


def test_a_shards_newest_checkpoint_damaged_fails_the_open() -> None:
    io = RecordingIO()
    plan = [(0, 1), (1, 1), (0, 2), (1, 2), (0, 3)]
    with fill(io, plan) as wal:
        shard1 = [c for c in wal.checkpoints(shard=1)][-1].blob
    assert shard1 is not None
    fd = io.open(BLOB_DIR / shard1, 2)
    io.pwrite(fd, b"\xff", 10)
    io.close(fd)
    with pytest.raises(WalCorrupted, match="checksum mismatch"):
        Wal.open(WAL_DIR, BLOB_DIR, io=io, **SETTINGS)  # type: ignore[arg-type]
    with Wal.open(WAL_DIR, BLOB_DIR, io=io, salvage=True,
                  **SETTINGS) as wal:  # type: ignore[arg-type]
        assert wal.recovery.reappended == (1, 3)  # shard 1 from 1, shard 0 from 3, log order
        assert wal.latest_checkpoint(shard=1).ckpt_seq == 1  # type: ignore[union-attr]
        assert wal.latest_checkpoint(shard=0).ckpt_seq == 3  # type: ignore[union-attr]
    with Wal.open(WAL_DIR, BLOB_DIR, io=io, **SETTINGS) as wal:  # type: ignore[arg-type]
        assert wal.latest_checkpoint(shard=1).ckpt_seq == 1  # type: ignore[union-attr]
        assert any(shard1 in w for w in wal.recovery.warnings)


def test_segments_stay_while_any_shard_needs_them() -> None:
    io = RecordingIO()
    plan = [(1, 1), (1, 2)] + [(0, i) for i in range(1, 30)]
    with fill(io, plan, size=30) as wal:  # inline: the states live in the segments
        first = wal.checkpoints(shard=1)[0]
        assert any(r.seq == first.seq for r in wal.records())
        latest = wal.latest_checkpoint(shard=1)
        assert latest is not None and latest.state == state(1, 2, 30)
        assert len([n for n in io.listdir(WAL_DIR) if n.endswith(".wal")]) > 3


def test_one_worker_writes_no_shard_and_reads_as_shard_0() -> None:
    io = RecordingIO()
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, **SETTINGS) as wal:  # type: ignore[arg-type]
        for i in range(1, 5):
            wal.append_checkpoint(checkpoint_meta(i, state(0, i)), state(0, i))
        assert wal.shards() == [0]
        assert [c.ckpt_seq for c in wal.checkpoints()] == [3, 4]
        assert wal.checkpoints() == wal.checkpoints(shard=0) and wal.checkpoints(shard=1) == []
        assert all("shard" not in r.payload for r in wal.records())
        assert wal.latest_checkpoint().shard == 0  # type: ignore[union-attr]
        assert wal.latest_checkpoint(shard=1) is None


@pytest.mark.parametrize("bad", [-1, "1", True, 1.0])
def test_a_shard_must_be_a_non_negative_int(bad: object) -> None:
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=RecordingIO(), **SETTINGS) as wal:  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="shard"):
            wal.append_checkpoint({**checkpoint_meta(1, b"s"), "shard": bad}, b"s")
