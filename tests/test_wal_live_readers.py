"""Read-only tools (status, runs, checkpoints, verify) read a log a live supervisor is
appending to and pruning. What they see mid-append or mid-retention is not damage: they
read again and report only a problem that holds still; real damage is still reported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nkat.supervisor.wal import RecordType, Wal, WalCorrupted, verify
from nkat.supervisor.wal.fileio import RealIO
from nkat.supervisor.wal.readonly import read_records, settled, verify_settled
from nkat.supervisor.wal.testing.crashcheck import checkpoint_meta

RUN = {"v": 1, "run_id": "live", "spec": {}, "spec_hash": "0" * 64, "config": {},
       "created": 0.0}


# settled(), with a scripted sequence of reads ------------------------------------------------
def _script(results: list[str | None], budget: float = 10.0) -> tuple[list[float], object]:
    """What settled() returns for reads giving ``results``; each read takes one second."""
    pauses: list[float] = []
    reads = iter(results)
    now = [0.0]

    def read() -> str | None:
        now[0] += 1.0
        return next(reads)
    value = settled(read, lambda r: r, budget=budget, pause=0.5, clock=lambda: now[0],
                    sleep=pauses.append)
    return pauses, value


def test_a_clean_first_read_is_taken_at_once() -> None:
    assert _script([None]) == ([], None)


def test_a_moving_problem_is_read_again_until_it_is_gone() -> None:
    assert _script(["torn at 100", "torn at 300", None]) == ([0.5, 0.5], None)


def test_a_problem_seen_twice_in_a_row_is_reported() -> None:
    assert _script(["damage at 40", "damage at 40", None]) == ([0.5], "damage at 40")


def test_a_problem_that_never_holds_still_is_reported_when_the_budget_is_spent() -> None:
    pauses, value = _script(["a", "b", "c", "d", "e", None], budget=3.5)
    assert pauses == [0.5, 0.5, 0.5] and value == "d"  # reads end at 1, 2, 3, 4 s
    pauses, value = _script(["a", "b", None], budget=0.0)
    assert pauses == [0.5] and value == "b"  # two reads, however small the budget


# A reader that catches a writer mid-append ---------------------------------------------------
class TornOnceIO(RealIO):
    """Real files, but during the first ``torn_scans`` scans of the log (a scan starts by
    listing the wal dir) the segment's bytes of one frame read as a reader racing its
    write(2) could see them: half copied (zeros after its first 16 bytes), with the
    frame after it already complete."""

    def __init__(self, segment: Path, frame: tuple[int, int], torn_scans: int) -> None:
        self.segment, self.frame, self.torn_scans = segment, frame, torn_scans
        self.scans = 0

    def listdir(self, path: Path) -> list[str]:
        if path == self.segment.parent:
            self.scans += 1
        return super().listdir(path)

    def read_range(self, path: Path, offset: int, length: int) -> bytes:
        data = super().read_range(path, offset, length)
        if path != self.segment or self.scans > self.torn_scans:
            return data
        start, end = self.frame
        lo, hi = max(start + 16, offset), min(end, offset + len(data))
        if lo >= hi:
            return data
        return data[:lo - offset] + bytes(hi - lo) + data[hi - offset:]


def _small_log(tmp_path: Path) -> tuple[Path, Path, tuple[int, int]]:
    """A log whose single segment holds a run record, three events and a checkpoint;
    returns the wal dir, blob dir and the (start, end) of the second event's frame."""
    wal_dir, blob_dir = tmp_path / "wal", tmp_path / "blobs"
    with Wal.open(wal_dir, blob_dir, run=RUN, segment_size=1 << 16) as wal:
        for i in range(3):
            wal.append(RecordType.EVENT, {"kind": "progress", "i": i, "pad": b"x" * 300})
        wal.append_checkpoint(checkpoint_meta(1, b"state"), b"state")
    from nkat.supervisor.wal.reader import scan_log
    scan = scan_log(RealIO(), wal_dir)
    (segment,) = scan.segments
    frames = _frame_bounds(segment.path, segment.salt, segment.end)
    return wal_dir, blob_dir, frames[2]  # run record, event 0, event 1 ...


def _frame_bounds(path: Path, salt: int, end: int) -> list[tuple[int, int]]:
    from nkat.supervisor.wal.format import HEADER_SIZE
    from nkat.supervisor.wal.reader import FrameReader, SegmentFile
    reader = FrameReader(SegmentFile.open(RealIO(), path, end), salt, HEADER_SIZE, None)
    return [(f.offset, f.end) for f in reader]


def test_a_frame_caught_mid_write_is_not_reported_as_damage(tmp_path: Path) -> None:
    wal_dir, blob_dir, frame = _small_log(tmp_path)
    segment = next(wal_dir.glob("*.wal"))
    # Without reading again, the torn frame followed by a valid one reads as corruption.
    io = TornOnceIO(segment, frame, torn_scans=10**6)
    with pytest.raises(WalCorrupted, match="a valid frame follows"):
        list(read_records(wal_dir, io=io))
    assert io.scans == 2  # the same problem twice in a row: reported
    io = TornOnceIO(segment, frame, torn_scans=1)
    records = list(read_records(wal_dir, io=io))
    assert [r.type for r in records] == [RecordType.RUN] + [RecordType.EVENT] * 3 + \
        [RecordType.CKPT]
    assert io.scans == 2  # the first scan saw the torn frame, the second did not
    io = TornOnceIO(segment, frame, torn_scans=1)
    report = verify_settled(wal_dir, blob_dir, io=io)
    assert report.ok and report.problem is None and io.scans == 2


def test_real_damage_is_still_reported(tmp_path: Path) -> None:
    wal_dir, blob_dir, (start, end) = _small_log(tmp_path)
    segment = next(wal_dir.glob("*.wal"))
    with open(segment, "r+b") as f:
        f.seek(start + 20)
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(WalCorrupted, match="checksum mismatch, and a valid frame follows"):
        list(read_records(wal_dir))
    report = verify_settled(wal_dir, blob_dir)
    assert not report.ok and report.problem is not None
    assert report.problem.offset == start and "checksum mismatch" in report.problem.reason


# Retention removing a blob while verify reads -------------------------------------------------
def _blob_log(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """Four blob checkpoints, all retained; returns the dirs and the blob names, oldest
    first."""
    wal_dir, blob_dir = tmp_path / "wal", tmp_path / "blobs"
    with Wal.open(wal_dir, blob_dir, run=RUN, segment_size=1 << 16, inline_limit=16,
                  backup_checkpoints=4) as wal:
        for i in range(1, 5):
            state = bytes([i]) * 200
            wal.append_checkpoint(checkpoint_meta(i, state), state)
    return wal_dir, blob_dir, sorted(p.name for p in blob_dir.iterdir())


class RetentionDuringReadIO(RealIO):
    """Real files; the blob ``victim`` is unlinked (as retention would) at the moment a
    reader first does ``when``: lists the blob dir the second time, or reads the blob."""

    def __init__(self, blob_dir: Path, victim: str, when: str) -> None:
        self.victim, self.when = blob_dir / victim, when
        self.blob_listings = 0

    def _remove(self) -> None:
        if self.victim.exists():
            self.victim.unlink()

    def listdir(self, path: Path) -> list[str]:
        if path == self.victim.parent:
            self.blob_listings += 1
            if self.when == "second listing" and self.blob_listings == 2:
                self._remove()
        return super().listdir(path)

    def read_file(self, path: Path) -> bytes:
        if self.when == "state read" and path == self.victim:
            self._remove()
        return super().read_file(path)

    def read_range(self, path: Path, offset: int, length: int) -> bytes:
        # verify checks a blob a chunk at a time
        if self.when == "state read" and path == self.victim:
            self._remove()
        return super().read_range(path, offset, length)


@pytest.mark.parametrize("when", ["second listing", "state read"])
def test_a_blob_retention_removes_during_verify_is_pruned_not_damage(tmp_path, when) -> None:
    wal_dir, blob_dir, blobs = _blob_log(tmp_path)
    io = RetentionDuringReadIO(blob_dir, blobs[0], when)
    report = verify(wal_dir, blob_dir, io=io)
    assert report.ok, report.problem
    assert [c.ckpt_seq for c in report.checkpoints] == [2, 3, 4]
    assert any("removed by retention" in note for note in report.notes)


def test_a_blob_missing_before_verify_starts_is_still_damage(tmp_path) -> None:
    wal_dir, blob_dir, blobs = _blob_log(tmp_path)
    (blob_dir / blobs[-1]).unlink()  # the newest checkpoint's: never pruned
    report = verify(wal_dir, blob_dir)
    assert not report.ok and report.problem is not None
    assert f"blob {blobs[-1]} is missing" in report.problem.reason


# A real writer process, appending and pruning, and readers racing it --------------------------
WRITER = textwrap.dedent("""
    import sys
    import time
    from pathlib import Path
    from nkat.supervisor.wal import RecordType, Wal
    from nkat.supervisor.wal.testing.crashcheck import checkpoint_meta
    wal_dir, blob_dir, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    run = {"v": 1, "run_id": "live", "spec": {}, "spec_hash": "0" * 64, "config": {},
           "created": 0.0}
    with Wal.open(wal_dir, blob_dir, run=run, segment_size=65536, inline_limit=512,
                  blob_chunk=1024, backup_checkpoints=2) as wal:
        print("open", flush=True)
        for i in range(1, count + 1):
            wal.append(RecordType.EVENT, {"kind": "progress", "i": i, "pad": b"e" * (i % 900)})
            state = bytes([i % 251]) * (100 + (i * 37) % 3000)  # inline and blob states
            wal.append_checkpoint(checkpoint_meta(i, state), state)
            time.sleep(0.01)  # the fastest checkpoint_interval a run may set
""")


def test_readers_racing_a_live_writer_never_see_damage(tmp_path: Path) -> None:
    wal_dir, blob_dir = tmp_path / "wal", tmp_path / "blobs"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(wal_dir), str(blob_dir),
                               "300"], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "open"
        reads = 0
        deadline = time.monotonic() + 60
        while writer.poll() is None and time.monotonic() < deadline:
            records = list(read_records(wal_dir))
            seqs = [r.seq for r in records]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "records skipped"
            report = verify_settled(wal_dir, blob_dir)
            assert report.ok, report.problem
            reads += 1
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
        writer.wait()
    assert reads >= 10, reads  # the readers really did run while the writer wrote
    report = verify_settled(wal_dir, blob_dir)
    assert report.ok and [c.ckpt_seq for c in report.checkpoints] == [299, 300]
