"""Segment files are prepared ahead, in a thread: a start or a roll never waits for a
whole segment to be zero-filled (a file system without fallocate writes every zero),
and every file is durable at full size before it gets its segment name."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from nkat.supervisor.wal import RealIO, RecordType, Wal, WalIOError, verify
from nkat.supervisor.wal.format import SegmentHeader
from nkat.supervisor.wal.testing.crashcheck import (
    BLOB_DIR,
    RUN,
    WAL_DIR,
    check_state,
    run_workload,
)
from nkat.supervisor.wal.testing.recording import RecordingIO

SEGMENT = 16 << 20


class NoFallocateIO(RealIO):
    """A file system without fallocate whose writes of a segment's zeros are slow: each
    waits for ``gate`` (a preparation that takes as long as the test wants)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.zero_writes = 0

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        if len(data) > 4096 and not any(data):  # a chunk of a segment's zeros
            self.zero_writes += 1
            self.gate.wait()
        super().pwrite(fd, data, offset)


def test_the_first_append_does_not_wait_for_a_whole_segment_without_fallocate(
        tmp_path: Path) -> None:
    io = NoFallocateIO()
    appended = threading.Event()
    box: dict[str, object] = {}

    def start() -> None:
        try:
            wal = Wal.open(tmp_path / "wal", tmp_path / "blobs", run=RUN, io=io,
                           segment_size=SEGMENT, prepare_wait=0.2)
            box["seq"] = wal.append(RecordType.EVENT, {"kind": "first"})
            box["wal"] = wal
        except BaseException as exc:  # reported below, in the test's thread
            box["error"] = exc
        finally:
            appended.set()

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    try:
        # The preparation is stuck on its first chunk of zeros; the append is not.
        assert appended.wait(60), "the first append waited for the segment's zeros"
        assert "error" not in box, box.get("error")
        assert box["seq"] == 2 and io.zero_writes == 1
    finally:
        io.gate.set()
        thread.join(60)
    wal = box["wal"]
    assert isinstance(wal, Wal)
    wal.close()
    first = tmp_path / "wal" / "0000000000000000.wal"
    assert first.stat().st_size == SEGMENT  # full size: a short one would read as truncated
    assert SegmentHeader.decode(first.read_bytes()[:200]).size == SEGMENT
    assert verify(tmp_path / "wal", tmp_path / "blobs").ok
    with Wal.open(tmp_path / "wal", tmp_path / "blobs", segment_size=SEGMENT) as again:
        assert again.last_seq == 2


def test_a_roll_takes_the_prepared_file_and_it_was_filled_before_use(tmp_path: Path) -> None:
    zero_files: list[str] = []

    class Watching(RealIO):
        def rename(self, src: Path, dst: Path) -> None:
            if dst.suffix == ".wal":
                data = src.read_bytes()
                zero_files.append(src.name)
                assert len(data) == 64 << 10 and not any(data[200:])
            super().rename(src, dst)

    with Wal.open(tmp_path / "wal", tmp_path / "blobs", run=RUN, io=Watching(),
                  segment_size=64 << 10, prepare_wait=60) as wal:
        for _ in range(400):
            wal.append(RecordType.EVENT, {"kind": "progress", "pad": b"x" * 400})
        quick = wal._writer.preparer.quick_files
    assert len(zero_files) >= 3 and quick == 0
    assert all(name.endswith(".wal.tmp") and ".quick." not in name for name in zero_files)
    assert verify(tmp_path / "wal", tmp_path / "blobs").ok


def test_a_roll_that_comes_first_takes_a_quick_full_size_file(tmp_path: Path) -> None:
    io = NoFallocateIO()
    try:
        with Wal.open(tmp_path / "wal", tmp_path / "blobs", run=RUN, io=io,
                      segment_size=64 << 10, prepare_wait=0) as wal:
            while len(list((tmp_path / "wal").glob("*.wal"))) < 3:
                wal.append(RecordType.EVENT, {"kind": "progress", "pad": b"x" * 400})
            assert wal._writer.preparer.quick_files >= 3
            last = wal.last_seq
            io.gate.set()
    finally:
        io.gate.set()
    for path in (tmp_path / "wal").glob("*.wal"):
        assert path.stat().st_size == 64 << 10
    assert verify(tmp_path / "wal", tmp_path / "blobs").ok
    with Wal.open(tmp_path / "wal", tmp_path / "blobs", segment_size=64 << 10) as again:
        assert again.last_seq == last


def test_a_preparation_that_fails_in_the_background_stops_the_log_at_the_roll(
        tmp_path: Path) -> None:
    class Full(RealIO):
        def fallocate(self, fd: int, offset: int, length: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with Wal.open(tmp_path / "wal", tmp_path / "blobs", run=RUN, segment_size=64 << 10) as wal:
        wal.append(RecordType.EVENT, {"kind": "before"})
    wal = Wal.open(tmp_path / "wal", tmp_path / "blobs", io=Full(), segment_size=64 << 10,
                   prepare_wait=60)
    acked = []
    with pytest.raises(WalIOError) as exc:
        for _ in range(400):
            acked.append(wal.append(RecordType.EVENT, {"kind": "progress", "pad": b"x" * 400}))
    assert exc.value.errno == errno.ENOSPC
    wal.close()
    with Wal.open(tmp_path / "wal", tmp_path / "blobs", segment_size=64 << 10) as again:
        assert again.last_seq == acked[-1]  # nothing half done, nothing acknowledged lost


def test_close_stops_a_preparation_in_flight(tmp_path: Path) -> None:
    class Slow(RealIO):
        def pwrite(self, fd: int, data: bytes, offset: int) -> None:
            if len(data) > 4096 and not any(data):
                time.sleep(0.05)
            super().pwrite(fd, data, offset)

    start = time.monotonic()
    wal = Wal.open(tmp_path / "wal", tmp_path / "blobs", run=RUN, io=Slow(),
                   segment_size=256 << 20, prepare_wait=0)
    wal.close()  # 256 chunks of 50 ms would be 13 s
    assert time.monotonic() - start < 10
    assert not any(t.name.startswith("wal-prepare") for t in threading.enumerate())


def test_crash_states_with_a_background_preparer_recover() -> None:
    for seed in (0, 1):
        work = run_workload(seed, extra={"background_prepare": True, "prepare_wait": 60})
        states = work.io.crash_states()
        assert len(states) > 200
        for state in states[::7]:
            assert check_state(work, state) == [], state.label


def test_a_crash_between_installing_a_segment_and_sealing_the_one_before() -> None:
    io = RecordingIO()
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, segment_size=2048) as wal:
        acked = []
        while "0000000000000001.wal" not in io.listdir(WAL_DIR):
            acked.append(wal.append(RecordType.EVENT, {"kind": "x", "pad": b"p" * 100}))
    install = next(i for i, op in enumerate(io.ops) if op.kind == "rename"
                   and op.dst is not None and op.dst.name == "0000000000000001.wal")
    synced = next(i for i in range(install, len(io.ops)) if io.ops[i].kind == "fsync_dir")
    seal = io.ops[synced + 1]
    assert seal.kind == "write" and seal.path.name == "0000000000000000.wal"
    # The disk after the new segment's name is durable, before the seal reaches it.
    between = [s for s in io.crash_states() if synced < s.point <= synced + 2]
    assert between
    for state in between:
        report = verify(WAL_DIR, BLOB_DIR, io=RecordingIO(state.image))
        assert report.ok, (state.label, report.problem)
        with Wal.open(WAL_DIR, BLOB_DIR, io=RecordingIO(state.image), segment_size=2048) as wal:
            assert not wal.recovery.warnings
            assert set(acked[:-1]) <= {r.seq for r in wal.records()}
            if wal.recovery.roll_finished:
                assert any("roll stopped" in n for n in report.notes)
                types = [r.type for r in wal.records()]
                assert types[-2:] == [RecordType.SEAL, RecordType.RUN]
    assert any(Wal.open(WAL_DIR, BLOB_DIR, io=RecordingIO(s.image),
                        segment_size=2048).recovery.roll_finished for s in between)
