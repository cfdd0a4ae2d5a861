"""Checkpoint states too large to inline: blob file first, then the ckpt_ref record;
a damaged or missing newest blob fails closed, and salvage resumes from the newest
checkpoint that verifies, keeping every record."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nkat.protocol.messages import state_digest
from nkat.supervisor.wal import RecordType, Wal, WalCorrupted, verify
from nkat.supervisor.wal.testing.crashcheck import BLOB_DIR, RUN, WAL_DIR, checkpoint_meta
from nkat.supervisor.wal.testing.recording import Image, RecordingIO

SETTINGS = {"segment_size": 1 << 16, "inline_limit": 1000, "blob_chunk": 4096,
            "backup_checkpoints": 3}
BIG = [os.urandom(n) for n in (10_000, 20_000, 9_000)]


def build() -> tuple[Image, list[int]]:
    io = RecordingIO()
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, **SETTINGS) as wal:  # type: ignore[arg-type]
        seqs = [wal.append_checkpoint(checkpoint_meta(i, s), s) for i, s in enumerate(BIG, 1)]
        wal.append(RecordType.EVENT, {"kind": "after", "t_wall": 0.0})
    return io.image(), seqs


IMAGE, SEQS = build()


def blob(image: Image, ckpt_seq: int) -> str:
    names = [p.name for p, _ in image.walk() if p.parent == BLOB_DIR]
    return next(n for n in names if n.startswith(f"{ckpt_seq:016x}-"))


def open_image(image: Image, **kwargs: object) -> tuple[Wal, RecordingIO]:
    io = RecordingIO(image)
    return Wal.open(WAL_DIR, BLOB_DIR, io=io, **SETTINGS, **kwargs), io  # type: ignore[arg-type]


def test_a_large_state_goes_to_a_blob_named_by_a_ckpt_ref_record() -> None:
    wal, io = open_image(IMAGE)
    with wal:
        refs = [r for r in wal.records() if r.type == RecordType.CKPT_REF]
        assert [r.seq for r in refs] == SEQS
        ref = refs[1].payload
        assert ref["size"] == len(BIG[1]) and ref["chunk"] == 4096 and len(ref["crcs"]) == 5
        assert io.read_file(BLOB_DIR / ref["blob"]) == BIG[1]
        latest = wal.latest_checkpoint()
        assert latest is not None and latest.state == BIG[2]
        assert latest.digest == state_digest(BIG[2])
        assert [(c.inline, c.size) for c in wal.checkpoints()] == [(False, len(s)) for s in BIG]


def test_the_blob_is_durable_before_the_record_that_commits_it() -> None:
    io = RecordingIO()
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, **SETTINGS) as wal:  # type: ignore[arg-type]
        start = len(io.ops)
        wal.append_checkpoint(checkpoint_meta(1, BIG[0]), BIG[0])
    ops = [(op.kind, op.path.suffix) for op in io.ops[start:]]
    assert ops[:6] == [("link", ".tmp"), ("write", ".tmp"), ("fsync", ".tmp"),
                       ("rename", ".tmp"), ("fsync_dir", ""), ("write", ".wal")]
    assert ops[6] == ("fdatasync", ".wal")


def test_a_damaged_newest_blob_fails_the_open_and_verify_names_its_record() -> None:
    name = blob(IMAGE, 3)
    data = bytearray(IMAGE.read(BLOB_DIR / name))
    data[5000] ^= 0x40
    image = IMAGE.replace(BLOB_DIR / name, bytes(data))
    with pytest.raises(WalCorrupted, match="chunk 1 checksum mismatch") as exc:
        open_image(image)
    report = verify(WAL_DIR, BLOB_DIR, io=RecordingIO(image))
    assert not report.ok and report.problem is not None and report.needs_salvage
    assert report.problem.segment == exc.value.segment and report.problem.offset == exc.value.offset
    salvaged, io = open_image(image, salvage=True)
    with salvaged:
        latest = salvaged.latest_checkpoint()
        assert latest is not None and latest.ckpt_seq == 2 and latest.state == BIG[1]
        assert salvaged.recovery.salvaged and salvaged.recovery.reappended == (2,)
        # Every record that verifies is kept: the damaged checkpoint's and the event after.
        kinds = [r.type for r in salvaged.records()]
        assert kinds[-3:] == [RecordType.CKPT_REF, RecordType.EVENT, RecordType.CKPT_REF]
    with Wal.open(WAL_DIR, BLOB_DIR, io=io, **SETTINGS) as again:  # type: ignore[arg-type]
        assert not again.recovery.salvaged
        assert any(name in w and "not needed" in w for w in again.recovery.warnings)
        latest = again.latest_checkpoint()
        assert latest is not None and latest.ckpt_seq == 2


@pytest.mark.parametrize("damage", ["missing", "short"])
def test_a_missing_or_short_newest_blob_fails_the_open(damage: str) -> None:
    io = RecordingIO(IMAGE)
    path = BLOB_DIR / blob(IMAGE, 3)
    if damage == "missing":
        io.unlink(path)
    else:
        fd = io.open(path, os.O_WRONLY | os.O_TRUNC)
        io.pwrite(fd, BIG[2][:100], 0)
        io.close(fd)
    with pytest.raises(WalCorrupted, match=damage if damage == "missing" else "bytes"):
        Wal.open(WAL_DIR, BLOB_DIR, io=io, **SETTINGS)  # type: ignore[arg-type]
    with Wal.open(WAL_DIR, BLOB_DIR, io=io, salvage=True,
                  **SETTINGS) as wal:  # type: ignore[arg-type]
        latest = wal.latest_checkpoint()
        assert latest is not None and latest.ckpt_seq == 2 and latest.state == BIG[1]


@settings(max_examples=25, deadline=None)
@given(size=st.integers(0, 3 * 4096 + 1), chunk=st.sampled_from([1, 7, 4096]))
def test_any_size_round_trips(size: int, chunk: int) -> None:
    state = os.urandom(size)
    io = RecordingIO()
    kwargs = {**SETTINGS, "inline_limit": 100, "blob_chunk": chunk}
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, **kwargs) as wal:  # type: ignore[arg-type]
        wal.append_checkpoint(checkpoint_meta(1, state), state)
    with Wal.open(WAL_DIR, BLOB_DIR, io=io, **kwargs) as wal:  # type: ignore[arg-type]
        latest = wal.latest_checkpoint()
        assert latest is not None and latest.state == state
        assert latest.seq == wal.checkpoints()[0].seq
    assert verify(WAL_DIR, BLOB_DIR, io=io).ok
