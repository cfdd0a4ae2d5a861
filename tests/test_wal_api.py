"""The Wal's contract with the supervisor: open, append, read back, roll, reopen."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nkat.supervisor.wal import (
    RealIO,
    RecordType,
    Wal,
    WalCorrupted,
    WalError,
    verify,
)
from nkat.supervisor.wal.format import HEADER_SIZE, SegmentHeader
from nkat.supervisor.wal.reader import FrameReader
from nkat.supervisor.wal.readonly import read_records
from nkat.supervisor.wal.testing.crashcheck import BLOB_DIR, RUN, WAL_DIR, checkpoint_meta
from nkat.supervisor.wal.testing.recording import RecordingIO

RT = RecordType


SMALL = 1 << 16  # segment size: an in-memory segment is a bytearray this big


def event(i: int, size: int = 10) -> dict[str, object]:
    return {"kind": "progress", "i": i, "pad": b"p" * size, "t_wall": 1.5}


def segments(io: RecordingIO) -> list[str]:
    return [n for n in io.listdir(WAL_DIR) if n.endswith(".wal")]


def test_an_empty_wal_needs_the_run_record() -> None:
    with pytest.raises(ValueError, match="run"):
        Wal.open(WAL_DIR, BLOB_DIR, io=RecordingIO(), segment_size=SMALL)


def test_the_run_record_comes_first_and_seqs_count_from_one() -> None:
    io = RecordingIO()
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, segment_size=SMALL) as wal:
        assert wal.last_seq == 1 and wal.run_payload == RUN
        assert [wal.append(RecordType.EVENT, event(i)) for i in range(3)] == [2, 3, 4]
        records = list(wal.records())
    assert [(r.seq, r.type) for r in records] == [(1, RT.RUN)] + [(s, RT.EVENT) for s in (2, 3, 4)]
    assert records[1].payload == event(0)


def test_reopen_continues_where_the_log_ends() -> None:
    io = RecordingIO()
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, segment_size=SMALL) as wal:
        wal.append(RecordType.EPOCH, {"epoch": 1, "reason": "start", "t_wall": 0.0})
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, segment_size=SMALL) as wal:
        assert wal.recovery.records == 2 and not wal.recovery.torn_tail_repaired
        assert wal.last_seq == 2 and wal.run_payload == RUN
        assert wal.append(RecordType.EVENT, event(1)) == 3


def test_a_changed_run_is_appended_once() -> None:
    io = RecordingIO()
    Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, segment_size=SMALL).close()
    changed = {**RUN, "config": {"backup_checkpoints": 5}}
    with Wal.open(WAL_DIR, BLOB_DIR, run=changed, io=io, segment_size=SMALL) as wal:
        assert wal.last_seq == 2 and wal.run_payload == changed
    with Wal.open(WAL_DIR, BLOB_DIR, run=changed, io=io, segment_size=SMALL) as wal:
        assert wal.last_seq == 2
        assert [r.payload for r in wal.records()] == [RUN, changed]


def test_callers_cannot_append_what_the_wal_writes_itself() -> None:
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=RecordingIO(), segment_size=SMALL) as wal:
        for rtype in (RecordType.SEAL, RecordType.CKPT, RecordType.CKPT_REF):
            with pytest.raises(ValueError):
                wal.append(rtype, {"x": 1})
        with pytest.raises(TypeError):
            wal.append(RecordType.EVENT, {"bad": object()})
        assert wal.last_seq == 1


def test_a_checkpoint_needs_its_fields_and_a_matching_digest() -> None:
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=RecordingIO(), segment_size=SMALL) as wal:
        meta = checkpoint_meta(1, b"state")
        with pytest.raises(ValueError, match="digest"):
            wal.append_checkpoint(meta, b"other")
        with pytest.raises(ValueError, match="units_done"):
            wal.append_checkpoint({k: v for k, v in meta.items() if k != "units_done"}, b"state")
        with pytest.raises(ValueError, match="keys"):
            wal.append_checkpoint({**meta, "state": b""}, b"state")
        seq = wal.append_checkpoint(meta, b"state")
        latest = wal.latest_checkpoint()
    assert latest is not None and (latest.seq, latest.ckpt_seq, latest.state) == (seq, 1, b"state")
    assert (latest.epoch, latest.units_done, latest.digest) == (1, 10, meta["digest"])


def test_segments_roll_sealed_chained_and_each_starting_with_the_run_record() -> None:
    io = RecordingIO()
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, segment_size=1024) as wal:
        seqs = [wal.append(RecordType.EVENT, event(i, 100)) for i in range(30)]
        records = list(wal.records())
    names = sorted(segments(io))
    assert len(names) >= 4
    assert [r.seq for r in records] == list(range(1, records[-1].seq + 1))
    assert set(seqs) <= {r.seq for r in records}
    runs = [i for i, r in enumerate(records) if r.type == RT.RUN]
    seals = [i for i, r in enumerate(records) if r.type == RT.SEAL]
    assert len(runs) == len(names) and len(seals) == len(names) - 1
    assert all(records[i + 1].type == RT.RUN for i in seals)
    prev_tail = 0
    for i, name in enumerate(names):
        data = io.read_file(WAL_DIR / name)
        assert len(data) <= 1024
        header = SegmentHeader.decode(data[:HEADER_SIZE])
        assert header.segment == i and header.prev_tail == prev_tail
        frames = list(FrameReader(data, header.salt, HEADER_SIZE, None))
        if i < len(names) - 1:
            assert frames[-1].rtype == RT.SEAL and records[seals[i]].payload == {"segment": i}
            prev_tail = frames[-1].crc
    assert verify(WAL_DIR, BLOB_DIR, io=io).ok


def test_the_next_segment_is_prepared_ahead_and_used_by_the_roll() -> None:
    io = RecordingIO()
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, segment_size=2048) as wal:
        while "0000000000000001.wal.tmp" not in io.listdir(WAL_DIR):
            wal.append(RecordType.EVENT, event(0, 100))
        prepared = len(io.ops)
        while len(segments(io)) == 1:
            wal.append(RecordType.EVENT, event(0, 100))
    roll = [op.kind for op in io.ops[prepared:]]
    assert "extend" not in roll[:roll.index("rename")]  # preallocated before, not at the roll
    assert roll[roll.index("rename") + 1] == "fsync_dir"


def test_a_record_larger_than_a_segment_gets_a_segment_of_its_own() -> None:
    io = RecordingIO()
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, segment_size=1024) as wal:
        wal.append(RecordType.EVENT, event(0))
        big = wal.append(RecordType.EVENT, event(1, 5000))
        after = wal.append(RecordType.EVENT, event(2))
    with Wal.open(WAL_DIR, BLOB_DIR, io=io, segment_size=1024) as wal:
        got = {r.seq: r.payload for r in wal.records()}
    assert got[big] == event(1, 5000) and got[after] == event(2)


def test_leftover_tmp_files_are_removed_at_open() -> None:
    io = RecordingIO()
    Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, segment_size=SMALL).close()
    for path in (WAL_DIR / "0000000000000007.wal.tmp", BLOB_DIR / "x.blob.tmp"):
        io.close(io.open(path, os.O_WRONLY | os.O_CREAT))
    keep = BLOB_DIR / "notes.txt"
    io.close(io.open(keep, os.O_WRONLY | os.O_CREAT))
    Wal.open(WAL_DIR, BLOB_DIR, io=io, segment_size=SMALL).close()
    assert not [n for n in io.listdir(WAL_DIR) + io.listdir(BLOB_DIR) if n.endswith(".tmp")]
    assert io.exists(keep)


def test_a_closed_wal_refuses_appends() -> None:
    wal = Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=RecordingIO(), segment_size=SMALL)
    wal.close()
    wal.close()
    with pytest.raises(WalError, match="closed"):
        wal.append(RecordType.EVENT, event(0))


@pytest.mark.parametrize("kwargs", [{"backup_checkpoints": 0}, {"segment_size": 100},
                                    {"inline_limit": -1}, {"blob_chunk": 0}])
def test_bad_settings_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=RecordingIO(), **kwargs)


def test_on_a_real_file_system(tmp_path: Path) -> None:
    wal_dir, blob_dir = tmp_path / "run" / "wal", tmp_path / "run" / "blobs"
    states = [os.urandom(n) for n in (100, 5000, 300, 9000)]
    with Wal.open(wal_dir, blob_dir, run=RUN, segment_size=4096, inline_limit=1000,
                  blob_chunk=1024) as wal:
        for i, state in enumerate(states, 1):
            wal.append(RecordType.EVENT, event(i, 500))
            wal.append_checkpoint(checkpoint_meta(i, state), state)
        last = wal.last_seq
    assert sorted(os.listdir(blob_dir)) and all(n.endswith(".blob") for n in os.listdir(blob_dir))
    assert os.stat(tmp_path / "run").st_mode & 0o777 == 0o700
    with Wal.open(wal_dir, blob_dir, run=RUN, io=RealIO(), segment_size=4096) as wal:
        assert wal.last_seq == last
        latest = wal.latest_checkpoint()
        assert latest is not None and latest.state == states[-1]
        assert [c.ckpt_seq for c in wal.checkpoints()] == [2, 3, 4]
    report = verify(wal_dir, blob_dir)
    assert report.ok and report.records > 0


def test_read_records_reads_without_repairing() -> None:
    io = RecordingIO()
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, segment_size=1024) as wal:
        seqs = [wal.append(RecordType.EVENT, event(i, 100)) for i in range(12)]
    segment = sorted(segments(io))[-1]
    data = io.read_file(WAL_DIR / segment)
    end = len(data.rstrip(b"\0"))  # the last frame loses its last 5 bytes: a torn write
    torn = RecordingIO(io.image().replace(WAL_DIR / segment,
                                          data[:end - 5] + bytes(len(data) - end + 5)))
    got = [r.seq for r in read_records(WAL_DIR, io=torn)]
    assert got == list(range(1, seqs[-1])) and torn.ops == []
    damaged = bytearray(data)
    damaged[HEADER_SIZE + 30] ^= 1
    with pytest.raises(WalCorrupted):
        list(read_records(WAL_DIR, io=RecordingIO(io.image().replace(WAL_DIR / segment,
                                                                     bytes(damaged)))))
