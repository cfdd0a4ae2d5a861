"""A read-only check of a log and its blobs (fsck): what ``nkat-supervise verify`` runs.

It reads everything, changes nothing, and reports every problem with the file and
offset where it is (``problems``; ``problem`` is the first a resume needs, else the
first), whether a plain open would refuse the log (``needs_salvage``), and notes on
what a normal open tidies up. Any problem makes ``ok`` false, damage that a resume does
not need included: the open goes on then, with warnings, but the log is not whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoints import CheckpointInfo, by_shard
from .fileio import FileIO, RealIO
from .format import BLOB_SUFFIX, RunIdentity
from .reader import Damage
from .recovery import Assessment, assess


@dataclass(frozen=True)
class Problem:
    segment: Path  # the file that is wrong (for a blob, the segment of the record naming it)
    offset: int  # of the header or frame that does not verify
    reason: str
    #: Whether a resume needs what it hit (a plain open refuses the log for it); False:
    #: older than the checkpoint the run resumes from, or a stray file.
    needed: bool = True


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
    problems: list[Problem] = field(default_factory=list)  # every one, in log order
    #: A plain open refuses this log (a problem is needed); ``start --salvage`` resumes.
    needs_salvage: bool = False

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
           io: FileIO | None = None, identity: RunIdentity | None = None) -> VerifyReport:
    """Check every segment, record, blob and checkpoint state digest. With
    ``backup_checkpoints``, that many of each shard's newest checkpoints must have their
    state. With ``identity`` (the run's id and spec hash), a log naming another run is a
    problem; without, segments that disagree with each other are."""
    io = io if io is not None else RealIO()
    wal_dir, blob_dir = Path(wal_dir), Path(blob_dir)
    try:
        # Listed before the scan as well as after it: a live writer's retention may
        # remove blobs while the log is read (check_blobs).
        listed_before = frozenset(io.listdir(blob_dir)) if io.exists(blob_dir) else frozenset()
        found = assess(io, wal_dir, blob_dir, identity=identity, listed_before=listed_before,
                       decode_all=True)
        scan = found.scan
        notes = list(found.notes)
        if scan.torn is not None:
            notes.append(f"torn tail in {scan.torn.path} at offset {scan.torn.offset} "
                         f"({scan.torn.reason}); the next open repairs it")
        if scan.roll is not None:
            notes.append(f"a roll stopped before {scan.roll.path} was sealed; the next open "
                         "seals it")
        problems = [Problem(p, 0, f"belongs to {whose}, not to {found.reference}; another "
                            "run's write-ahead log was copied here") for p, whose in found.foreign]
        problems += [_problem(found.needed(d), d) for d in found.damage]
        problems += _window(found, backup_checkpoints)
        referenced = {c.blob for c in scan.checkpoints}
        notes += [f"unreferenced blob {blob_dir / n}" for n in io.listdir(blob_dir)
                  if n.endswith(BLOB_SUFFIX) and n not in referenced] \
            if io.exists(blob_dir) else []
    except OSError as exc:
        problem = Problem(wal_dir, 0, f"cannot read: {exc}")
        return VerifyReport(False, [], 0, [], problem, [], [problem], True)
    segments = [SegmentInfo(s.path, s.number, s.first_seq, s.last_seq, s.seal_crc is not None,
                            s.end) for s in scan.segments]
    needed = [p for p in problems if p.needed]
    first = needed[0] if needed else (problems[0] if problems else None)
    return VerifyReport(not problems, segments, scan.records,
                        [CheckpointInfo.of(e) for e in found.verified], first, notes, problems,
                        bool(needed))


def _problem(needed: bool, damage: Damage) -> Problem:
    return Problem(damage.path, damage.offset, damage.reason, needed)


def _window(found: Assessment, backup: int | None) -> list[Problem]:
    """Each shard's newest ``backup`` checkpoints must have their state."""
    if backup is None:
        return []
    out = []
    for entries in by_shard(found.scan.checkpoints).values():
        missing = [e for e in entries[-backup:] if e.pruned]
        if missing:
            newest = missing[-1]
            out.append(Problem(found.scan.path_of(newest.segment), newest.offset,
                               f"blob {newest.blob} of a retained checkpoint is missing", False))
    return out
