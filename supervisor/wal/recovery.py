"""What the log needs to resume, and what opening it does about what the scan found.

``assess`` (used by open and by verify) finds the checkpoint each shard resumes from: the
newest one whose record and state verify. Damage older than the oldest of those is not
needed by a resume: open goes on and says so (``Recovery.warnings``). Damage after it,
a deleted or truncated newest segment included, stops the open (WalCorrupted, or its
WalTruncated) unless the operator asked to salvage. A log naming another run is refused
(WalForeign), salvage or not.

Open repairs what a crash leaves without asking: a torn tail is copied aside and zeroed,
and a roll that installed the next segment but did not seal the one before is finished.
Salvage keeps every record that verifies: it sets aside only what cannot be appended
after (unreadable segments past the end, the short tail of a truncated segment), then
appends a copy of each shard's resume checkpoint, so that the newest checkpoint of the
log lies after all damage and later opens need no salvage. With no intact checkpoint at
all, it cuts the log at the damage instead, as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from .blobs import BlobMissing
from .checkpoints import CheckpointEntry, by_shard
from .errors import WalCorrupted, WalForeign, WalTruncated
from .fileio import CHUNK, ZEROS, FileIO
from .format import BROKEN_SUFFIX, SEGMENT_SUFFIX, RecordType, RunIdentity, encode_frame
from .reader import (
    Damage,
    LogScan,
    SegmentFile,
    SegmentScan,
    check_state,
    list_segments,
    scan_after,
    scan_log,
    seal_payload,
)

#: Passes of repair and scan one open may make: each pass repairs one thing.
MAX_PASSES = 64


@dataclass(frozen=True)
class Recovery:
    """What ``Wal.open`` found and did."""

    records: int = 0  # records read back from disk
    torn_tail_repaired: bool = False
    broken_copy: Path | None = None  # where damaged or cut-off bytes were moved
    salvaged: bool = False  # salvage worked around damage a resume needed
    problem: str | None = None  # the damage that salvage worked around
    #: Damage the open went on despite, each as "<file>: offset <n>: <reason> (...)":
    #: older than the checkpoint the run resumes from (or, after salvage, worked
    #: around). Empty for a clean log. Print each on the terminal and log it.
    warnings: tuple[str, ...] = ()
    roll_finished: bool = False  # a roll stopped by a crash before its seal was finished
    #: ckpt_seq of each checkpoint salvage appended again (one per shard), oldest first.
    reappended: tuple[int, ...] = ()


@dataclass
class Assessment:
    """A scan weighed: every damage, each shard's resume checkpoint, whose log it is."""

    scan: LogScan
    damage: list[Damage]
    resume: dict[int, CheckpointEntry]  # shard -> the checkpoint it resumes from
    verified: list[CheckpointEntry]  # entries whose state was checked and verified
    foreign: list[tuple[Path, RunIdentity]]
    reference: RunIdentity  # whose log it should be
    pruned: int = 0  # checkpoints whose blob retention removed
    notes: list[str] = field(default_factory=list)

    @property
    def resume_at(self) -> tuple[int, int] | None:
        """Where the oldest of the shards' resume checkpoints stands; None: no shard has
        one, and all of the log is needed."""
        if not self.resume:
            return None
        return min((e.segment, e.offset) for e in self.resume.values())

    def needed(self, damage: Damage) -> bool:
        """Whether a resume needs what ``damage`` hit: it lies after the oldest resume
        checkpoint (or there is none). A stray file is never needed."""
        at = self.resume_at
        return damage.kind != "stray" and (at is None or damage.position > at)

    def describe(self, damage: Damage) -> str:
        if damage.kind == "stray":
            return str(damage)
        if not self.needed(damage):
            return f"{damage} (older than {self._resume_text()}: not needed)"
        return str(damage)

    def _resume_text(self) -> str:
        parts = [f"checkpoint {e.meta['ckpt_seq']}" + (f" of shard {s}" if s else "")
                 for s, e in sorted(self.resume.items())]
        return ", ".join(parts) + (" the run resumes from" if parts else "")


def assess(io: FileIO, wal_dir: Path, blob_dir: Path, *, backup: int | None = None,
           identity: RunIdentity | None = None, listed_before: frozenset[str] = frozenset(),
           decode_all: bool = False) -> Assessment:
    """Scan the log, check blobs and checkpoint states, and find each shard's resume
    checkpoint. With ``backup``, the states of each shard's newest ``backup`` checkpoints
    are read (and older ones only until one verifies); without, every state still there.
    ``listed_before``: the blob dir as a reader listed it before its scan (check_blobs)."""
    scan = scan_log(io, wal_dir, decode_all=decode_all)
    damage = list(scan.damage)
    pruned = check_blobs(io, scan, blob_dir, listed_before)
    resume: dict[int, CheckpointEntry] = {}
    verified: list[CheckpointEntry] = []
    for shard, entries in by_shard(scan.checkpoints).items():
        live = [e for e in entries if not e.pruned]
        window = {id(e) for e in (live[-backup:] if backup is not None else live)}
        for entry in reversed(live):
            if id(entry) not in window and shard in resume:
                break  # older than the window and not needed: not read
            if entry.broken is None:
                seg = scan.segment(entry.segment)
                try:
                    check_state(io, seg.path, entry, blob_dir, seg.salt)
                except (BlobMissing, FileNotFoundError):
                    # Present when the blobs were listed: a live writer's retention removed
                    # it since (a log nobody writes to never gets here).
                    entry.pruned = True
                    pruned += 1
                    continue
                except ValueError as exc:
                    entry.broken = str(exc)
                else:
                    verified.append(entry)
                    resume.setdefault(shard, entry)
    for entry in scan.checkpoints:
        if entry.broken is not None:
            damage.append(Damage(entry.segment, entry.offset, scan.path_of(entry.segment),
                                 entry.broken, "state"))
    damage.sort(key=lambda d: d.position)
    verified.sort(key=lambda e: e.seq)
    reference, foreign = _identities(scan, identity or RunIdentity())
    notes = [f"{pruned} older checkpoints' states were removed by retention"] if pruned else []
    return Assessment(scan, damage, resume, verified, foreign, reference, pruned, notes)


def _identities(scan: LogScan,
                expected: RunIdentity) -> tuple[RunIdentity, list[tuple[Path, RunIdentity]]]:
    """Whose log it should be (``expected``, else what its newest segment or run record
    says) and every segment or run record that names another run."""
    reference = expected
    if not reference.known:
        named = [s.identity for s in scan.segments if s.identity.known]
        reference = named[-1] if named else RunIdentity.of_run(scan.run)
    foreign = [(s.path, s.identity) for s in scan.segments if s.identity.conflicts(reference)]
    stored = RunIdentity.of_run(scan.run)
    if not foreign and scan.segments and stored.conflicts(reference):
        foreign.append((scan.segments[-1].path, stored))
    return reference, foreign


def check_blobs(io: FileIO, scan: LogScan, blob_dir: Path,
                listed_before: frozenset[str] = frozenset()) -> int:
    """Check blob files against the ckpt_ref records: mark those retention removed
    (``pruned``) and those missing or of the wrong size (``broken``); returns how many
    were pruned.

    Retention unlinks each shard's blobs oldest first, each durably before the next, so
    the missing ones are always the oldest of their shard; a missing blob newer than a
    present one of its shard, or the newest checkpoint's, is damage.

    ``listed_before``: the blob dir as a reader listed it before its scan of a log that a
    live writer may be pruning. A blob there that is gone now was removed by retention
    while the log was read (the scan may not have reached the newer checkpoints that
    let it go), so it is taken as pruned, not missing.
    """
    present = set(io.listdir(blob_dir)) if io.exists(blob_dir) else set()
    pruned = 0
    for entries in by_shard(scan.checkpoints).values():
        seen_present = False
        for entry in entries:
            if entry.blob is None:
                continue
            if entry.blob not in present:
                if entry.blob in listed_before or (not seen_present and entry is not entries[-1]):
                    entry.pruned = True
                    pruned += 1
                    continue
                entry.broken = f"blob {entry.blob} is missing"
            elif (size := _size_or_none(io, blob_dir / entry.blob)) is None:
                entry.pruned = True  # listed a moment ago, gone now: retention, as above
                pruned += 1
                continue
            elif size != entry.size:
                entry.broken = f"blob {entry.blob} has {size} bytes, expected {entry.size}"
            seen_present = True
    return pruned


def _size_or_none(io: FileIO, path: Path) -> int | None:
    try:
        return io.size(path)
    except FileNotFoundError:
        return None


def recover(io: FileIO, wal_dir: Path, blob_dir: Path, *, salvage: bool, backup: int,
            identity: RunIdentity, create: bool = True, fresh: bool = True
            ) -> tuple[LogScan, Recovery, list[CheckpointEntry]]:
    """Scan the log and leave it ready to append to, or raise WalForeign, WalTruncated
    or WalCorrupted. Returns the scan, the report and, after a salvage, the checkpoints
    to append again (each shard's resume checkpoint, oldest first). ``fresh``: the
    caller has a run record, so salvage may leave no record at all."""
    report = Recovery()
    for _ in range(MAX_PASSES + len(list_segments(io, wal_dir))):
        found = assess(io, wal_dir, blob_dir, backup=backup, identity=identity)
        scan = found.scan
        if found.foreign:
            path, whose = found.foreign[0]
            raise WalForeign(path, str(whose), str(found.reference))
        needed = [d for d in found.damage if found.needed(d)]
        if not create and not scan.segments and not needed:
            needed = [Damage(0, 0, wal_dir, "the log has no segment, though its run was "
                             "started before (were its segments deleted?)", "missing")]
            if salvage:
                report = replace(report, salvaged=True, problem=str(needed[0]))
                create, needed = True, []
        if needed and not salvage:
            first = needed[0]
            error = WalTruncated if first.kind in ("missing", "truncated") else WalCorrupted
            raise error(first.path, first.offset, first.reason)
        # From here on files change: what a crash left, and what salvage was asked for.
        if scan.roll is not None:
            finish_roll(io, scan.roll)
            report = replace(report, roll_finished=True)
            continue
        if scan.torn is not None:
            # The scan stays true: only zeros after the end it found.
            broken = repair_torn_tail(io, scan.segments[-1])
            scan.torn = None
            report = replace(report, torn_tail_repaired=True,
                             broken_copy=report.broken_copy or broken)
        if not needed:
            return scan, replace(report, records=scan.records, warnings=report.warnings + tuple(
                found.describe(d) for d in found.damage)), []
        report = replace(report, salvaged=True, problem=report.problem or str(needed[0]))
        moved = _set_aside(io, scan, needed)
        if moved is not None:
            report = replace(report, broken_copy=report.broken_copy or moved)
            continue
        if found.resume:
            kept = sorted(found.resume.values(), key=lambda e: e.seq)
            around = tuple(f"{found.describe(d)} (salvaged: appended checkpoint "
                           f"{', '.join(str(e.meta['ckpt_seq']) for e in kept)} again)"
                           if found.needed(d) else found.describe(d) for d in found.damage)
            return scan, replace(report, records=scan.records, warnings=around,
                                 reappended=tuple(e.meta["ckpt_seq"] for e in kept)), kept
        if needed[0].kind == "missing":
            # Nothing to cut: the log goes on in a new segment after its sealed newest.
            return scan, replace(report, records=scan.records,
                                 warnings=tuple(found.describe(d) for d in found.damage)), []
        first = needed[0]
        if not fresh and not any(s.extents and (s.number, s.extents[0].start) < first.position
                                 for s in scan.segments):
            raise WalCorrupted(first.path, first.offset, f"{first.reason}; nothing to salvage "
                               "(no record before the damage, and no run record to start anew)")
        moved = cut_back(io, scan, first)
        report = replace(report, broken_copy=report.broken_copy or moved)
    raise WalCorrupted(wal_dir, 0, "recovery did not settle; inspect the log with verify")


def _set_aside(io: FileIO, scan: LogScan, needed: list[Damage]) -> Path | None:
    """Salvage's one repair that moves bytes, if one applies: an unreadable segment file
    past the newest readable one is renamed aside; a truncated newest segment gets its
    short tail copied aside and its zeros back. Returns where the bytes went."""
    newest = scan.segments[-1] if scan.segments else None
    for damage in needed:
        past_the_end = newest is None or damage.segment > newest.number
        if damage.kind in ("header", "truncated") and past_the_end and damage.offset == 0 \
                and damage.path.name.endswith(SEGMENT_SUFFIX):
            aside = _aside_name(io, damage.path)
            io.rename(damage.path, aside)
            io.fsync_dir(damage.path.parent)
            return aside
        if damage.kind == "truncated" and newest is not None and damage.segment == newest.number:
            moved = None
            if newest.content_end > newest.end:
                moved = copy_aside(io, newest.path, newest.end, newest.content_end)
            zero_range(io, newest.path, newest.end, newest.size)
            return moved or newest.path
    return None


def finish_roll(io: FileIO, seg: SegmentScan) -> None:
    """Write the seal a roll did not get to: the next segment is installed and its
    header names this seal's crc (reader.expected_seal_crc checked it). Torn bytes of a
    first try are the same bytes or zeros; anything else there is copied aside first."""
    assert seg.last_seq is not None
    frame = encode_frame(RecordType.SEAL, seg.salt, seg.last_seq + 1, seal_payload(seg.number))
    if seg.content_end > seg.end:
        old = SegmentFile.open(io, seg.path).read(seg.end, seg.content_end - seg.end)
        if seg.content_end > seg.end + len(frame) or any(
                b and b != f for b, f in zip(old, frame, strict=False)):
            repair_torn_tail(io, seg)
    fd = io.open(seg.path, os.O_RDWR)
    try:
        io.pwrite(fd, frame, seg.end)
        io.fdatasync(fd)
    finally:
        io.close(fd)


def repair_torn_tail(io: FileIO, seg: SegmentScan) -> Path:
    """Copy the bytes after the last good frame aside, then zero them durably, so that
    the next append lands on the zeros that mark the end of the log."""
    broken = copy_aside(io, seg.path, seg.end, seg.content_end)
    zero_range(io, seg.path, seg.end, seg.content_end)
    seg.content_end = seg.end
    seg.tail = None
    return broken


def cut_back(io: FileIO, scan: LogScan, damage: Damage) -> Path | None:
    """Salvage of a log with no intact checkpoint: keep the records before ``damage``,
    move what follows aside (the rest of its segment copied, later segments renamed).
    A damaged header or a missing segment cuts at the end of the segment before it,
    seal included, so that segment takes the appends. Returns where the first moved
    bytes went."""
    readable = {s.number: s for s in scan.segments}
    seg = readable.get(damage.segment)
    if seg is not None and damage.offset >= seg.start:
        number, offset = seg.number, damage.offset
    else:
        before = [s for s in scan.segments if s.number < damage.segment]
        if not before:
            number, offset = -1, 0  # nothing before it: everything goes aside
        else:
            prev = before[-1]
            number = prev.number
            offset = prev.seal_offset if prev.seal_offset is not None else prev.end
    broken = None
    if number >= 0:
        path = readable[number].path
        end, _ = scan_after(SegmentFile.open(io, path), offset, None)
        if end > offset:
            broken = copy_aside(io, path, offset, end)
            zero_range(io, path, offset, end)
    wal_dir = scan.segments[0].path.parent if scan.segments else damage.path.parent
    later = [p for n, p in list_segments(io, wal_dir) if n > number]
    for p in later:
        aside = _aside_name(io, p)
        io.rename(p, aside)
        broken = broken or aside
    if later:
        io.fsync_dir(wal_dir)
    return broken


def copy_aside(io: FileIO, path: Path, start: int, end: int) -> Path:
    """Keep the bytes ``start..end`` of a segment for the operator in a new
    ``<segment>.broken`` file, durably; copied a chunk at a time."""
    aside = _aside_name(io, path)
    fd = io.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        for offset, piece in SegmentFile.open(io, path).pieces(start, end):
            io.pwrite(fd, piece, offset - start)
        io.fsync(fd)
    finally:
        io.close(fd)
    io.fsync_dir(path.parent)
    return aside


def zero_range(io: FileIO, path: Path, start: int, end: int) -> None:
    """Overwrite (or extend the file with) zeros from ``start`` to ``end``, durably."""
    fd = io.open(path, os.O_RDWR)
    try:
        for offset in range(start, end, CHUNK):
            io.pwrite(fd, ZEROS[:end - offset], offset)
        io.fdatasync(fd)
    finally:
        io.close(fd)


def _aside_name(io: FileIO, path: Path) -> Path:
    aside = path.with_name(path.name + BROKEN_SUFFIX)
    n = 0
    while io.exists(aside):
        n += 1
        aside = path.with_name(f"{path.name}.{n}{BROKEN_SUFFIX}")
    return aside
