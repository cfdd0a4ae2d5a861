"""Reading a log's records without opening it for writing: nothing is repaired or removed.

    for record in read_records(run_dir / "wal"):   # stops quietly at a torn tail
        ...
    report = verify_settled(run_dir / "wal", run_dir / "blobs")

For tools that inspect a run while its supervisor is down (or running): ``status``,
``runs``, ``checkpoints``, ``verify`` and the choice of what ``start --boot`` resumes.

A reader racing a live writer can see a moment that never existed on disk as a whole:
an append half copied into the page cache with the next one already complete after it
("a valid frame follows"), or a segment or blob that retention unlinks between the
listing and the read. Real damage stays where it is; a race moves on. So these readers
read again, for up to ``BUDGET`` seconds, and report a problem only when two reads in a
row agree on it. A log nobody writes to gives the same answer twice, at the cost of one
more read where it is damaged. (``verify`` also lists the blobs before and after its scan,
so retention during one read is rarely a problem at all: see recovery.check_blobs.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import TypeVar

from .errors import WalCorrupted
from .fileio import FileIO, RealIO
from .format import RecordType, RunIdentity
from .reader import scan_log, segment_records
from .verify import VerifyReport, verify
from .wal import Record

#: Seconds of reading again before a problem that keeps moving is reported anyway: many
#: reads, even on a loaded machine with a writer checkpointing every 10 ms.
BUDGET = 2.0
#: Seconds between two reads: a writer's append takes well under this.
PAUSE = 0.02

T = TypeVar("T")


def settled(read: Callable[[], T], problem_of: Callable[[T], Hashable | None], *,
            budget: float = BUDGET, pause: float = PAUSE,
            clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep) -> T:
    """``read()`` until it finds no problem or two reads in a row find the same one; the
    last result once ``budget`` seconds have passed otherwise (at least two reads)."""
    deadline = clock() + budget
    previous: Hashable | None = None
    result = read()
    while (problem := problem_of(result)) is not None and problem != previous:
        if previous is not None and clock() >= deadline:
            break
        previous = problem
        sleep(pause)
        result = read()
    return result


def read_records(wal_dir: Path, io: FileIO | None = None) -> Iterator[Record]:
    """Every readable record in seq order, past any damage; then WalCorrupted for the
    first damage if there is any (a torn tail just ends the iteration, as recovery would
    cut it). A caller that judges a run by what it could read keeps what came first."""
    io = io if io is not None else RealIO()
    records, error = settled(lambda: _read_once(io, Path(wal_dir)), _problem_of_read)
    yield from records
    if error is not None:
        raise error


def verify_settled(wal_dir: Path, blob_dir: Path, io: FileIO | None = None, *,
                   identity: RunIdentity | None = None) -> VerifyReport:
    """``verify`` of a log that may be live: a problem is reported once it holds still.
    ``identity``: the run's, so that another run's log is a problem (verify)."""
    def problem_of(report: VerifyReport) -> Hashable | None:
        p = report.problem
        return None if p is None else (str(p.segment), p.offset, p.reason)
    return settled(lambda: verify(wal_dir, blob_dir, io=io, identity=identity), problem_of)


def _read_once(io: FileIO, wal_dir: Path) -> tuple[list[Record], Exception | None]:
    records: list[Record] = []
    try:
        scan = scan_log(io, wal_dir)
        for seg in scan.segments:
            for frame, payload in segment_records(io, seg):
                records.append(Record(frame.seq, RecordType(frame.rtype), payload))
        damage = [d for d in scan.damage if d.kind != "stray"]
        if damage:
            return records, WalCorrupted(damage[0].path, damage[0].offset, damage[0].reason)
    except (WalCorrupted, FileNotFoundError) as exc:
        return records, exc
    return records, None


def _problem_of_read(result: tuple[list[Record], Exception | None]) -> Hashable | None:
    _, error = result
    return None if error is None else (type(error).__name__, str(error))
