"""Reading a log's records without opening it for writing: nothing is repaired or removed.

    for record in read_records(run_dir / "wal"):   # stops quietly at a torn tail
        ...

For tools that inspect a run while its supervisor is down (or running): ``status``,
``runs`` and the choice of what ``start --boot`` resumes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .errors import WalCorrupted
from .fileio import FileIO, RealIO
from .format import RecordType
from .reader import scan_log, segment_records
from .wal import Record


def read_records(wal_dir: Path, io: FileIO | None = None) -> Iterator[Record]:
    """Every readable record in seq order; WalCorrupted where acknowledged data is damaged
    (a torn tail just ends the iteration, as recovery would cut it)."""
    io = io if io is not None else RealIO()
    scan = scan_log(io, Path(wal_dir))
    for seg in scan.segments:
        for frame, payload in segment_records(io, seg):
            yield Record(frame.seq, RecordType(frame.rtype), payload)
    if scan.stop is not None and not scan.stop.torn:
        raise WalCorrupted(scan.stop.path, scan.stop.offset, scan.stop.reason)
