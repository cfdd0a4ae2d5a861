"""I/O errors: an append that fails is never acknowledged, the log stops (fail-stop,
no retry), and a reopen finds everything acknowledged before the failure."""

from __future__ import annotations

import errno
import functools
import os

import pytest

from nkat.supervisor.wal import RecordType, Wal, WalIOError
from nkat.supervisor.wal.testing.crashcheck import (
    BLOB_DIR,
    RUN,
    WAL_DIR,
    check_state,
    checkpoint_meta,
    run_workload,
)
from nkat.supervisor.wal.testing.recording import CrashState, Op, RecordingIO


def event(i: int) -> dict[str, object]:
    return {"kind": "progress", "i": i, "t_wall": 0.0}


SMALL = 1 << 16  # segment size: an in-memory segment is a bytearray this big


def reopened(io: RecordingIO, segment_size: int = SMALL, **kwargs: object) -> Wal:
    """The log as the next process finds it (no power loss)."""
    return Wal.open(WAL_DIR, BLOB_DIR, io=RecordingIO(io.image()), segment_size=segment_size,
                    **kwargs)  # type: ignore[arg-type]


def test_eio_from_fdatasync_stops_the_log() -> None:
    io = RecordingIO()
    wal = Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, segment_size=SMALL)
    acked = [wal.append(RecordType.EVENT, event(i)) for i in range(3)]
    io.fail_next("fdatasync", errno.EIO, ".wal")
    with pytest.raises(WalIOError) as exc:
        wal.append(RecordType.EVENT, event(3))
    assert exc.value.errno == errno.EIO
    syncs = [op for op in io.ops if op.kind == "fdatasync"]
    assert syncs[-1].failed  # and no second try
    for attempt in (lambda: wal.append(RecordType.EVENT, event(4)),
                    lambda: wal.append_checkpoint(checkpoint_meta(1, b"s"), b"s")):
        with pytest.raises(WalIOError, match="stopped") as exc:
            attempt()
        assert exc.value.errno is None
    ops = len(io.ops)
    wal.close()
    assert not [op for op in io.ops[ops:] if op.kind in ("write", "fdatasync", "fsync")]
    with reopened(io) as again:
        assert {r.seq for r in again.records()} >= set(acked)
        assert again.append(RecordType.EVENT, event(5)) == again.last_seq


def test_enospc_on_write_acknowledges_nothing() -> None:
    io = RecordingIO()
    wal = Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, segment_size=SMALL)
    last = wal.append(RecordType.EVENT, event(0))
    io.fail_next("write", errno.ENOSPC, ".wal")
    with pytest.raises(WalIOError) as exc:
        wal.append(RecordType.EVENT, event(1))
    assert exc.value.errno == errno.ENOSPC
    wal.close()
    with reopened(io) as again:
        assert again.last_seq == last and not again.recovery.torn_tail_repaired


def test_a_failed_blob_leaves_the_previous_checkpoint_and_no_leftovers() -> None:
    io = RecordingIO()
    wal = Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, inline_limit=100, segment_size=SMALL)
    wal.append_checkpoint(checkpoint_meta(1, b"a" * 500), b"a" * 500)
    io.fail_next("fsync", errno.EIO, ".blob.tmp")
    with pytest.raises(WalIOError):
        wal.append_checkpoint(checkpoint_meta(2, b"b" * 500), b"b" * 500)
    wal.close()
    after = RecordingIO(io.image())
    assert any(n.endswith(".tmp") for n in after.listdir(BLOB_DIR))
    with Wal.open(WAL_DIR, BLOB_DIR, io=after, inline_limit=100, segment_size=SMALL) as again:
        latest = again.latest_checkpoint()
        assert latest is not None and latest.ckpt_seq == 1
    assert len(after.listdir(BLOB_DIR)) == 1


def test_no_space_to_prepare_a_segment_stops_before_the_record_is_written() -> None:
    io = RecordingIO()
    wal = Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, segment_size=4096)
    io.fail_next("fallocate", errno.ENOSPC, ".wal.tmp")
    with pytest.raises(WalIOError):
        while True:
            last = wal.append(RecordType.EVENT, {"pad": b"x" * 100})
    wal.close()
    with reopened(io, segment_size=4096) as again:
        assert again.last_seq == last


def test_an_error_while_repairing_fails_the_open() -> None:
    io = RecordingIO()
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, segment_size=SMALL) as wal:
        wal.append(RecordType.EVENT, event(0))
    segment = WAL_DIR / "0000000000000000.wal"
    data = io.read_file(segment)
    end = len(data.rstrip(b"\0"))
    broken = RecordingIO(io.image().replace(segment, data[:end - 3] + bytes(len(data) - end + 3)))
    broken.fail_next("fdatasync", errno.EIO, ".wal")
    with pytest.raises(WalIOError):
        Wal.open(WAL_DIR, BLOB_DIR, io=broken, segment_size=SMALL)


FAULTS = [
    ("fdatasync", errno.EIO, ".wal"),
    ("write", errno.ENOSPC, ".wal"),
    ("write", errno.EIO, ".wal.tmp"),
    ("fallocate", errno.ENOSPC, ".wal.tmp"),
    ("rename", errno.EIO, ".wal.tmp"),
    ("fsync_dir", errno.EIO, "/wal"),
    ("write", errno.ENOSPC, ".blob.tmp"),
    ("fsync", errno.EIO, ".blob.tmp"),
    ("fsync_dir", errno.EIO, "/blobs"),
    ("unlink", errno.EIO, ""),
]


@functools.cache
def clean_ops(seed: int) -> tuple[Op, ...]:
    """The operations of the crash workload ``seed`` run without a fault: the same for
    every fault below, so run once."""
    return tuple(run_workload(seed).io.ops)


@pytest.mark.parametrize(("kind", "err", "suffix"), FAULTS)
def test_a_fault_at_any_operation_loses_nothing_acknowledged(kind: str, err: int,
                                                              suffix: str) -> None:
    """Fail the n-th matching operation of the crash workload for a spread of n; check
    the disk as the next process finds it and every crash state after the failure."""
    for seed in (0, 1):
        count = sum(1 for op in clean_ops(seed)
                    if (op.kind == kind or (kind, op.kind) == ("fallocate", "extend"))
                    and str(op.path).endswith(suffix))
        assert count, (kind, suffix)
        for after in sorted({0, count // 3, count // 2, count - 1}):
            io = RecordingIO()
            io.fail_next(kind, err, suffix, after=after)
            work = run_workload(seed, io=io)
            assert work.failure is not None and work.failure.errno == err
            states = [CrashState(len(io.ops), "clean exit", io.image())]
            states += io.crash_states(since=len(io.ops) - 4)
            for state in states:
                assert check_state(work, state) == [], (kind, after, state.label)


def test_real_io_reports_enospc_from_a_full_device(tmp_path: os.PathLike[str]) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    from nkat.supervisor.wal import RealIO

    io = RealIO()
    fd = io.open("/dev/full", os.O_WRONLY)  # type: ignore[arg-type]
    try:
        with pytest.raises(OSError) as exc:
            io.pwrite(fd, b"x" * 4096, 0)
        assert exc.value.errno == errno.ENOSPC
    finally:
        io.close(fd)
