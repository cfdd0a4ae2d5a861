"""A read-only check of a log and its blobs (fsck): what ``nkat-supervise verify`` runs.

It reads everything, changes nothing, and reports the first problem with the file and
offset where it is, plus notes on what a normal open would tidy up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .blobs import BlobMissing
from .checkpoints import CheckpointInfo
from .fileio import FileIO, RealIO
from .format import BLOB_SUFFIX
from .reader import LogScan, load_state, scan_log
from .recovery import check_blobs


@dataclass(frozen=True)
class Problem:
    segment: Path  # the segment (for a blob, the segment of the record naming it)
    offset: int  # of the header or frame that does not verify
    reason: str


@dataclass(frozen=True)
class SegmentInfo:
    path: Path
    segment: int
    first_seq: int | None
    last_seq: int | None
    sealed: bool
    end: int  # just past the last good frame


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    segments: list[SegmentInfo]
    records: int
    checkpoints: list[CheckpointInfo]  # those whose state verified, oldest first
    problem: Problem | None = None
    notes: list[str] = field(default_factory=list)  # harmless findings

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready values."""
        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, list):
                return [plain(v) for v in value]
            if hasattr(value, "__dataclass_fields__"):
                return {k: plain(getattr(value, k)) for k in value.__dataclass_fields__}
            return value
        result: dict[str, Any] = plain(self)
        return result


def verify(wal_dir: Path, blob_dir: Path, *, backup_checkpoints: int | None = None,
           io: FileIO | None = None) -> VerifyReport:
    """Check every segment, record, blob and checkpoint state digest. With
    ``backup_checkpoints``, that many of the newest checkpoints must have their state."""
    io = io if io is not None else RealIO()
    wal_dir, blob_dir = Path(wal_dir), Path(blob_dir)
    notes: list[str] = []
    try:
        # Listed before the scan as well as after it: a live writer's retention may
        # remove blobs while the log is read (check_blobs).
        listed_before = frozenset(io.listdir(blob_dir)) if io.exists(blob_dir) else frozenset()
        scan = scan_log(io, wal_dir, decode_all=True)
        stop = scan.stop
        if stop is not None and stop.torn:
            notes.append(f"torn tail in {stop.path} at offset {stop.offset} ({stop.reason}); "
                         "the next open repairs it")
            stop = None
        if stop is None:
            stop = check_blobs(io, scan, blob_dir, listed_before)
        problem = Problem(stop.path, stop.offset, stop.reason) if stop is not None else None
        verified: list[CheckpointInfo] = []
        if problem is None:
            problem = _check_states(io, scan, blob_dir, backup_checkpoints, verified, notes)
        referenced = {c.blob for c in scan.checkpoints}
        notes += [f"unreferenced blob {blob_dir / n}" for n in io.listdir(blob_dir)
                  if n.endswith(BLOB_SUFFIX) and n not in referenced]
    except OSError as exc:
        return VerifyReport(False, [], 0, [], Problem(wal_dir, 0, f"cannot read: {exc}"), notes)
    segments = [SegmentInfo(s.path, s.number, s.first_seq, s.last_seq, s.seal_crc is not None,
                            s.end) for s in scan.segments]
    return VerifyReport(problem is None, segments, scan.records, verified, problem, notes)


def _check_states(io: FileIO, scan: LogScan, blob_dir: Path, backup: int | None,
                  verified: list[CheckpointInfo], notes: list[str]) -> Problem | None:
    """Load every checkpoint state still present; collect those that verify."""
    for entry in scan.checkpoints:
        if entry.pruned:
            continue
        path = scan.path_of(entry.segment)
        try:
            load_state(io, path, entry, blob_dir)
        except (BlobMissing, FileNotFoundError):
            # Its blob or segment was there when the log was scanned and the blobs were
            # listed: a live writer's retention removed it since (a log nobody writes to
            # never gets here).
            entry.pruned = True
            continue
        except ValueError as exc:
            return Problem(path, entry.offset, str(exc))
        verified.append(CheckpointInfo.of(entry))
    pruned = [e for e in scan.checkpoints if e.pruned]
    if pruned:
        notes.append(f"{len(pruned)} older checkpoints' states were removed by retention")
    window = scan.checkpoints[-backup:] if backup is not None else []
    missing = [e for e in window if e.pruned]
    if missing:
        newest = missing[-1]
        return Problem(scan.path_of(newest.segment), newest.offset,
                       f"blob {newest.blob} of a retained checkpoint is missing")
    return None
