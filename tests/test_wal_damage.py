"""Damage to a stopped run's log (two segments, 40 checkpoints): the run resumes from
the newest checkpoint that verifies wherever the damage is; a deleted or truncated
newest segment fails closed; salvage keeps every intact record; a stray file is blamed
by its own name; another run's log is refused; a log of format version 1 still reads.
Then the whole damage campaign, every record type included."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from nkat.supervisor.wal import (
    RecordType,
    RunIdentity,
    Wal,
    WalCorrupted,
    WalForeign,
    WalTruncated,
    verify,
)
from nkat.supervisor.wal.format import HEADER_SIZE, SegmentHeader
from nkat.supervisor.wal.testing.corruption import (
    OTHER_RUN,
    SEG0,
    SEG1,
    SETTINGS,
    build_base,
    flip,
    run_damage_campaign,
)
from nkat.supervisor.wal.testing.crashcheck import BLOB_DIR, RUN, WAL_DIR, checkpoint_meta
from nkat.supervisor.wal.testing.recording import Image, RecordingIO

BASE = build_base()
IMAGE = BASE.image
FIXTURE_V1 = Path(__file__).parent / "fixtures" / "wal_v1"


def resume(image: Image, **kwargs: object) -> tuple[Wal, RecordingIO]:
    io = RecordingIO(image)
    return Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, **SETTINGS, **kwargs), io  # type: ignore[arg-type]


def assert_resumes_from(wal: Wal, ckpt_seq: int) -> None:
    latest = wal.latest_checkpoint()
    assert latest is not None and latest.ckpt_seq == ckpt_seq
    assert latest.state == BASE.states[ckpt_seq]


def warned(wal: Wal, path: Path, offset: int | None = None) -> bool:
    head = f"{path}: offset {offset}:" if offset is not None else f"{path}:"
    return any(w.startswith(head) for w in wal.recovery.warnings)


def last_type(wal: Wal) -> RecordType:
    return list(wal.records())[-1].type


def test_the_base_is_a_stopped_run_with_two_segments_and_40_checkpoints() -> None:
    names = sorted(p.name for p, _ in IMAGE.walk() if p.suffix == ".wal")
    assert names == [SEG0.name, SEG1.name]
    wal, _ = resume(IMAGE)
    with wal:
        assert [c.ckpt_seq for c in wal.checkpoints()] == [38, 39, 40]
        assert [c.inline for c in wal.checkpoints()] == [False, False, True]
        assert wal.checkpoints()[0].seq < BASE.records[list(BASE.records)[0]][1].seq + 100
        assert {c.seq for c in wal.checkpoints()[:2]} <= {
            s for s, (p, _) in BASE.records.items() if p == SEG0}
        assert last_type(wal) == RecordType.STOP and wal.recovery.warnings == ()
        assert_resumes_from(wal, 40)


# One bit flip in the oldest segment's header ------------------------------------------

@pytest.mark.parametrize("byte", range(HEADER_SIZE))
def test_a_bit_flip_in_the_oldest_segment_header_resumes_from_checkpoint_40(byte: int) -> None:
    image = flip(IMAGE, SEG0, byte, byte % 8)
    report = verify(WAL_DIR, BLOB_DIR, io=RecordingIO(image))
    assert not report.ok and not report.needs_salvage
    assert report.problem is not None and (report.problem.segment, report.problem.offset) == \
        (SEG0, 0)
    for salvage in (False, True):
        wal, _ = resume(image, salvage=salvage)
        with wal:
            assert_resumes_from(wal, 40)
            assert warned(wal, SEG0, 0) and not wal.recovery.salvaged
            assert last_type(wal) == RecordType.STOP  # the operator's stop is still there


# Deleting or truncating the newest segment ----------------------------------------------

def test_deleting_the_newest_segment_is_refused_with_the_reason() -> None:
    io = RecordingIO(IMAGE)
    io.unlink(SEG1)
    with pytest.raises(WalTruncated, match="0000000000000001 is missing") as exc:
        Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, **SETTINGS)
    assert exc.value.segment == SEG1 and io.exists(SEG0) and not io.exists(SEG1)
    report = verify(WAL_DIR, BLOB_DIR, io=io)
    assert not report.ok and report.needs_salvage and report.problem is not None
    assert report.problem.segment == SEG1
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, salvage=True, **SETTINGS) as wal:
        assert wal.recovery.salvaged and str(SEG1) in str(wal.recovery.problem)
        assert_resumes_from(wal, 39)  # 40 was in the deleted segment
        assert wal.recovery.reappended == (39,)
        kept = {r.seq for r in wal.records()}
        assert {s for s, (p, _) in BASE.records.items() if p == SEG0} <= kept
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, **SETTINGS) as again:
        assert not again.recovery.salvaged and again.recovery.warnings == ()
        assert_resumes_from(again, 39)


def test_the_only_segment_deleted_is_refused_when_the_log_must_exist() -> None:
    io = RecordingIO()
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, **SETTINGS) as wal:
        wal.append_checkpoint(checkpoint_meta(1, b"s"), b"s")
    io.unlink(SEG0)
    with pytest.raises(WalTruncated, match="no segment"):
        Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, create=False, **SETTINGS)
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, create=False, salvage=True,
                  **SETTINGS) as wal:
        assert wal.recovery.salvaged and wal.latest_checkpoint() is None


SEG1_FRAMES = [f for p, f in BASE.frames() if p == SEG1]
CKPT40 = next(f for f in SEG1_FRAMES if f.rtype == RecordType.CKPT)
CUTS = {"to nothing": 0, "inside the header": 100, "to its header": HEADER_SIZE,
        "before checkpoint 40": CKPT40.offset + 5, "after checkpoint 40": CKPT40.end,
        "after its last record": SEG1_FRAMES[-1].end, "by one byte": SETTINGS["segment_size"] - 1,
        "to 15000 bytes of a bigger one": None}


@pytest.mark.parametrize("cut", CUTS.values(), ids=CUTS.keys())
def test_truncating_the_newest_segment_is_refused_with_the_reason(cut: int | None) -> None:
    data = IMAGE.read(SEG1)
    if cut is None:  # the case: a 64 MiB segment cut to 15,000 bytes
        data, cut = data + bytes(60_000), 15_000
        header = SegmentHeader.decode(data)
        data = SegmentHeader(header.salt, 1, header.prev_tail, len(data),
                             header.identity).encode() + data[HEADER_SIZE:]
    image = IMAGE.replace(SEG1, data[:cut])
    with pytest.raises(WalTruncated, match="truncated") as exc:
        resume(image)
    assert exc.value.segment == SEG1
    report = verify(WAL_DIR, BLOB_DIR, io=RecordingIO(image))
    assert not report.ok and report.needs_salvage and "truncated" in report.problem.reason  # type: ignore[union-attr]
    wal, io = resume(image, salvage=True)
    with wal:
        assert_resumes_from(wal, 40 if cut >= CKPT40.end else 39)
        assert wal.recovery.salvaged
        kept = {r.seq for r in wal.records()}
        assert {f.seq for f in SEG1_FRAMES if f.end <= cut} <= kept
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, **SETTINGS) as again:
        assert not again.recovery.salvaged  # the segment is whole again


# Salvage keeps every intact record and the newest intact checkpoint -------------------------

def test_a_flip_in_the_middle_of_segment_0_keeps_segment_1() -> None:
    seg0 = [f for p, f in BASE.frames() if p == SEG0]
    middle = seg0[len(seg0) // 2]
    image = flip(IMAGE, SEG0, middle.offset + 30)
    for salvage in (False, True):
        wal, _ = resume(image, salvage=salvage)
        with wal:
            assert_resumes_from(wal, 40)
            assert warned(wal, SEG0, middle.offset)
            kept = {r.seq for r in wal.records()}
            assert set(BASE.records) - {middle.seq} <= kept
            assert last_type(wal) == RecordType.STOP


def test_a_missing_middle_blob_does_not_fall_back_past_newer_checkpoints() -> None:
    io = RecordingIO(IMAGE)
    io.unlink(BLOB_DIR / BASE.blobs[39])
    image = io.image()
    for salvage in (False, True):
        wal, _ = resume(image, salvage=salvage)
        with wal:
            assert_resumes_from(wal, 40)
            assert any(BASE.blobs[39] in w and "missing" in w for w in wal.recovery.warnings)
    report = verify(WAL_DIR, BLOB_DIR, io=RecordingIO(image))
    assert not report.ok and not report.needs_salvage


def test_a_corrupt_older_blob_is_a_warning_at_open_and_a_problem_for_verify() -> None:
    image = flip(IMAGE, BLOB_DIR / BASE.blobs[38], 70)
    wal, _ = resume(image)
    with wal:
        assert_resumes_from(wal, 40)
        assert any("chunk 1 checksum mismatch" in w for w in wal.recovery.warnings)
    report = verify(WAL_DIR, BLOB_DIR, io=RecordingIO(image))
    assert not report.ok and not report.needs_salvage
    assert "chunk 1 checksum mismatch" in report.problem.reason  # type: ignore[union-attr]


# Wrong blame ------------------------------------------------------------------------------

REAL = {"segment_size": 4096, "backup_checkpoints": 40}


def real_log(tmp_path: Path) -> tuple[Path, Path]:
    wal_dir, blob_dir = tmp_path / "wal", tmp_path / "blobs"
    with Wal.open(wal_dir, blob_dir, run=RUN, **REAL) as wal:  # type: ignore[arg-type]
        for i in range(1, 30):
            wal.append(RecordType.EVENT, {"kind": "progress", "pad": b"x" * 100})
            wal.append_checkpoint(checkpoint_meta(i, b"s%d" % i), b"s%d" % i)
    assert len(list(wal_dir.glob("*.wal"))) >= 2
    return wal_dir, blob_dir


def test_a_stray_segment_directory_is_blamed_by_its_own_name(tmp_path: Path) -> None:
    wal_dir, blob_dir = real_log(tmp_path)
    (wal_dir / "0000000000000007.wal").mkdir()
    report = verify(wal_dir, blob_dir)
    assert not report.ok and not report.needs_salvage
    assert [p.segment.name for p in report.problems] == ["0000000000000007.wal"]
    with Wal.open(wal_dir, blob_dir, run=RUN, **REAL) as wal:  # type: ignore[arg-type]
        assert wal.latest_checkpoint().ckpt_seq == 29  # type: ignore[union-attr]
        assert warned(wal, wal_dir / "0000000000000007.wal")
        assert not any("not sealed" in w for w in wal.recovery.warnings)


def test_a_garbage_segment_file_is_blamed_by_its_own_name(tmp_path: Path) -> None:
    wal_dir, blob_dir = real_log(tmp_path)
    garbage = wal_dir / "0000000000000009.wal"
    garbage.write_bytes(os.urandom(5000))
    with pytest.raises(WalCorrupted, match="bad segment magic") as exc:
        Wal.open(wal_dir, blob_dir, run=RUN, **REAL)  # type: ignore[arg-type]
    assert exc.value.segment == garbage
    report = verify(wal_dir, blob_dir)
    assert [p.segment for p in report.problems] == [garbage] and report.needs_salvage
    with Wal.open(wal_dir, blob_dir, run=RUN, salvage=True, **REAL) as wal:  # type: ignore[arg-type]
        assert wal.latest_checkpoint().ckpt_seq == 29  # type: ignore[union-attr]
        assert wal.recovery.broken_copy == garbage.with_name(garbage.name + ".broken")


def test_a_stray_wal_file_of_another_name_is_reported_by_its_name(tmp_path: Path) -> None:
    wal_dir, blob_dir = real_log(tmp_path)
    (wal_dir / "09.wal").write_bytes(os.urandom(100))
    report = verify(wal_dir, blob_dir)
    assert [p.segment.name for p in report.problems] == ["09.wal"] and not report.needs_salvage
    with Wal.open(wal_dir, blob_dir, run=RUN, **REAL) as wal:  # type: ignore[arg-type]
        assert warned(wal, wal_dir / "09.wal")


# Another run's log -----------------------------------------------------------------------

OTHER = build_base(run=OTHER_RUN).image


def test_another_runs_log_copied_into_the_run_is_refused() -> None:
    for salvage in (False, True):
        with pytest.raises(WalForeign, match="another-run") as exc:
            resume(OTHER, salvage=salvage)
        assert exc.value.segment == SEG0
    report = verify(WAL_DIR, BLOB_DIR, io=RecordingIO(OTHER), identity=RunIdentity.of_run(RUN))
    assert not report.ok and "belongs to run another-run" in report.problem.reason  # type: ignore[union-attr]
    assert verify(WAL_DIR, BLOB_DIR, io=RecordingIO(OTHER)).ok  # whole, for its own run


def test_one_segment_of_another_run_is_refused_and_verify_sees_the_mix() -> None:
    image = IMAGE.replace(SEG1, OTHER.read(SEG1))
    with pytest.raises(WalForeign) as exc:
        resume(image)
    assert exc.value.segment == SEG1
    report = verify(WAL_DIR, BLOB_DIR, io=RecordingIO(image))  # no identity given
    assert not report.ok and any("belongs to run" in p.reason for p in report.problems)


def copy_fixture(tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(FIXTURE_V1, tmp_path / "run")
    return tmp_path / "run" / "wal", tmp_path / "run" / "blobs"


def test_a_log_of_format_1_of_another_run_is_refused(tmp_path: Path) -> None:
    wal_dir, blob_dir = copy_fixture(tmp_path)
    with pytest.raises(WalForeign, match="v1-fixture"):
        Wal.open(wal_dir, blob_dir, run=RUN, segment_size=1024)


# Logs written in format version 1 -----------------------------------------------------------

V1_RUN = {"run_id": "v1-fixture", "spec": {"job": "nkat-highdim", "params": {"max_dimension": 10}},
          "spec_hash": "0123456789abcdef", "created": "2024-01-01T00:00:00+0000"}
V1_DIGESTS = {
    3: "85453e666375f939a4e8ff57f1084e09647c55e7e57233e3fa55aa4508067077",
    4: "1788ea5c66503c3a7979a8f8607443fd17867dd22caa441da6bfb1dcfcbf9c70",
    5: "fbe8bc2f634a9880a272ca10600bed2b0a2a66e3516f83ea8535d9c4c7548d9b",
    6: "1158efad65c807f278340c3db28e7061537d9fe8769b05f0a86c1dae00e4ce4a",
}


def test_a_log_written_in_format_1_still_reads_and_goes_on_in_format_2(tmp_path: Path) -> None:
    wal_dir, blob_dir = copy_fixture(tmp_path)
    assert verify(wal_dir, blob_dir, identity=RunIdentity.of_run(V1_RUN)).ok
    with Wal.open(wal_dir, blob_dir, run=V1_RUN, segment_size=1024, inline_limit=200,
                  backup_checkpoints=4) as wal:
        assert [r.seq for r in wal.records()] == list(range(9, 20))
        assert list(wal.records())[-1].type == RecordType.STOP
        assert {c.ckpt_seq: c.digest for c in wal.checkpoints()} == V1_DIGESTS
        latest = wal.latest_checkpoint()
        assert latest is not None and latest.ckpt_seq == 6 and latest.digest == V1_DIGESTS[6]
        while len(list(wal_dir.glob("*.wal"))) < 3:
            wal.append(RecordType.EVENT, {"kind": "progress", "pad": b"x" * 100})
    headers = [SegmentHeader.decode((wal_dir / f"{n:016x}.wal").read_bytes()) for n in (1, 2, 3)]
    assert [h.version for h in headers] == [1, 1, 2]
    assert headers[2].identity == RunIdentity("v1-fixture", "0123456789abcdef")
    assert verify(wal_dir, blob_dir).ok
    with Wal.open(wal_dir, blob_dir, run=V1_RUN, segment_size=1024) as again:
        assert again.latest_checkpoint().ckpt_seq == 6  # type: ignore[union-attr]


def test_a_format_1_log_whose_newest_segment_is_sealed_still_opens(tmp_path: Path) -> None:
    # Version 1 sealed a segment before its successor existed, so a crash could leave
    # the newest sealed; such a log still opens (it cannot tell a deleted segment).
    wal_dir, blob_dir = copy_fixture(tmp_path)
    (wal_dir / "0000000000000002.wal").unlink()
    for name in os.listdir(blob_dir):
        if name.startswith("0000000000000006"):
            os.unlink(blob_dir / name)
    with Wal.open(wal_dir, blob_dir, run=V1_RUN, segment_size=1024, inline_limit=200,
                  backup_checkpoints=4) as wal:
        assert wal.recovery.warnings == ()
        assert wal.latest_checkpoint().ckpt_seq == 4  # type: ignore[union-attr]


# Bit flips in every record type, and the rest of the campaign --------------------------------

def test_damage_of_every_kind_ends_in_a_resume_a_refusal_or_a_salvage() -> None:
    result = run_damage_campaign()
    assert result.cases > 500
    assert result.wrong == []


def test_the_campaign_catches_a_wrong_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle is not vacuous: a log that resumes from its oldest checkpoint fails."""
    monkeypatch.setattr(Wal, "latest_checkpoint", lambda self, shard=0: None)
    result = run_damage_campaign(sample=40)
    assert len(result.wrong) >= 30


def test_the_campaign_catches_a_log_that_never_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nor vacuous the other way: a log that takes every damage as not needed fails."""
    from nkat.supervisor.wal.recovery import Assessment

    monkeypatch.setattr(Assessment, "needed", lambda self, damage: False)
    result = run_damage_campaign(stop_at_wrong=True)
    assert any("opened though" in w for w in result.wrong)
