"""The recording file system's durability model, which the power-loss tests trust."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from nkat.supervisor.wal.testing.recording import Image, RecordingIO

D = Path("/d")
F = D / "f"


def fresh() -> RecordingIO:
    io = RecordingIO()
    io.mkdir(D)
    io.fsync_dir(Path("/"))
    return io


def contents(io: RecordingIO) -> set[bytes | None]:
    """What F holds across every crash state after the last operation (None: absent)."""
    out: set[bytes | None] = set()
    for state in io.crash_states():
        if state.point == len(io.ops):
            try:
                out.add(state.image.read(F))
            except FileNotFoundError:
                out.add(None)
    return out


def test_a_new_file_needs_its_directory_fsynced() -> None:
    io = fresh()
    fd = io.open(F, os.O_WRONLY | os.O_CREAT)
    io.pwrite(fd, b"data", 0)
    io.fsync(fd)
    assert contents(io) == {None, b"data"}
    io.fsync_dir(D)
    assert contents(io) == {b"data"}


def test_unsynced_writes_may_or_may_not_persist_and_tear_at_sectors() -> None:
    io = fresh()
    fd = io.open(F, os.O_WRONLY | os.O_CREAT)
    io.fsync_dir(D)
    io.pwrite(fd, b"a" * 1024, 0)
    got = contents(io)
    assert {b"", b"a" * 1024, b"a" * 512, bytes(512) + b"a" * 512} <= got
    io.fdatasync(fd)
    assert contents(io) == {b"a" * 1024}


def test_a_failed_fsync_never_makes_its_writes_durable() -> None:
    io = fresh()
    fd = io.open(F, os.O_WRONLY | os.O_CREAT)
    io.fsync_dir(D)
    io.pwrite(fd, b"lost?", 0)
    io.fail_next("fsync", errno.EIO)
    with pytest.raises(OSError) as exc:
        io.fsync(fd)
    assert exc.value.errno == errno.EIO
    assert io.read_file(F) == b"lost?"  # the page cache still has it
    io.fsync(fd)  # "succeeds", as Linux does after reporting the error once
    assert contents(io) == {b"", b"lost?"}


def test_a_rename_is_durable_only_after_a_directory_fsync() -> None:
    io = fresh()
    tmp = D / "f.tmp"
    fd = io.open(tmp, os.O_WRONLY | os.O_CREAT)
    io.pwrite(fd, b"new", 0)
    io.fsync(fd)
    io.rename(tmp, F)
    assert contents(io) == {None, b"new"}
    io.fsync_dir(D)
    assert contents(io) == {b"new"}


def test_an_unlink_may_be_undone_by_a_crash() -> None:
    io = fresh()
    fd = io.open(F, os.O_WRONLY | os.O_CREAT)
    io.pwrite(fd, b"x", 0)
    io.fsync(fd)
    io.fsync_dir(D)
    io.unlink(F)
    assert contents(io) == {None, b"x"}


def test_faults_fire_once_after_the_given_number_of_matches() -> None:
    io = fresh()
    fd = io.open(F, os.O_WRONLY | os.O_CREAT)
    io.fail_next("write", errno.ENOSPC, "/f", after=1)
    io.pwrite(fd, b"1", 0)
    with pytest.raises(OSError):
        io.pwrite(fd, b"2", 1)
    io.pwrite(fd, b"3", 1)
    assert io.read_file(F) == b"13"  # the failed write changed nothing


def test_images_round_trip_and_equal_states_keep_the_latest_point() -> None:
    io = fresh()
    fd = io.open(F, os.O_WRONLY | os.O_CREAT)
    io.pwrite(fd, b"abc", 0)
    io.fdatasync(fd)
    io.fsync_dir(D)
    image = io.image()
    assert RecordingIO(image).read_file(F) == b"abc"
    assert image.replace(F, b"xyz").read(F) == b"xyz"
    keys = [s.image.key() for s in io.crash_states()]
    assert len(keys) == len(set(keys))
    assert io.crash_states()[-1].point == len(io.ops)
    assert isinstance(image, Image)
