"""What opening a log does about what the scan found.

A torn tail is copied aside and zeroed; damage to sealed or acknowledged data stops
the open (WalCorrupted) unless the operator asked to salvage, which cuts the log back
to the newest checkpoint that still verifies and moves everything after it aside.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from .checkpoints import CheckpointEntry
from .errors import WalCorrupted
from .fileio import CHUNK, ZEROS, FileIO
from .format import BROKEN_SUFFIX, HEADER_SIZE
from .reader import (
    LogScan,
    SegmentFile,
    SegmentScan,
    Stop,
    list_segments,
    load_state,
    scan_after,
    scan_log,
)


@dataclass(frozen=True)
class Recovery:
    """What ``Wal.open`` found and did."""

    records: int = 0  # records read back from disk
    torn_tail_repaired: bool = False
    broken_copy: Path | None = None  # where damaged or cut-off bytes were moved
    salvaged: bool = False  # the log was cut back to its newest intact checkpoint
    problem: str | None = None  # the damage that salvage worked around


def recover(io: FileIO, wal_dir: Path, blob_dir: Path, salvage: bool) -> tuple[LogScan,
                                                                               Recovery]:
    """Scan the log and leave it ready to append to, or raise WalCorrupted."""
    report = Recovery()
    while True:
        scan = scan_log(io, wal_dir)
        stop = scan.stop
        if stop is not None and stop.torn:
            broken = repair_torn_tail(io, scan.segments[-1])
            report = replace(report, torn_tail_repaired=True,
                             broken_copy=report.broken_copy or broken)
            stop = None
        if stop is None:
            stop = check_blobs(io, scan, blob_dir)
        if stop is None and salvage and scan.checkpoints:
            stop = _unloadable(io, scan, scan.checkpoints[-1], blob_dir)
        if stop is None:
            return scan, replace(report, records=scan.records)
        if not salvage:
            raise WalCorrupted(stop.path, stop.offset, stop.reason)
        # Each cut leaves a strictly shorter log, so this loop ends.
        moved = cut_back(io, scan, blob_dir, stop)
        report = replace(report, salvaged=True, broken_copy=report.broken_copy or moved,
                         problem=report.problem
                         or f"{stop.path}: offset {stop.offset}: {stop.reason}")


def repair_torn_tail(io: FileIO, seg: SegmentScan) -> Path:
    """Copy the bytes after the last good frame aside, then zero them durably, so that
    the next append lands on the zeros that mark the end of the log."""
    broken = copy_aside(io, seg.path, seg.end, seg.content_end)
    zero_range(io, seg.path, seg.end, seg.content_end)
    seg.content_end = seg.end
    return broken


def check_blobs(io: FileIO, scan: LogScan, blob_dir: Path,
                listed_before: frozenset[str] = frozenset()) -> Stop | None:
    """Check blob files against the ckpt_ref records and mark those retention removed.

    Retention unlinks blobs oldest first, each durably before the next, so the missing
    ones are always the oldest; a missing blob newer than a present one, a missing
    newest checkpoint or a blob of the wrong size is damage.

    ``listed_before``: the blob dir as a reader listed it before its scan of a log that a
    live writer may be pruning. A blob there that is gone now was removed by retention
    while the log was read (the scan may not have reached the newer checkpoints that
    let it go), so it is taken as pruned, not missing.
    """
    present = set(io.listdir(blob_dir))
    seen_present = False
    for entry in scan.checkpoints:
        if entry.blob is None:
            continue
        reason = None
        if entry.blob not in present:
            if entry.blob in listed_before or (not seen_present
                                               and entry is not scan.checkpoints[-1]):
                entry.pruned = True
                continue
            reason = f"blob {entry.blob} is missing"
        elif (size := _size_or_none(io, blob_dir / entry.blob)) is None:
            entry.pruned = True  # listed a moment ago, gone now: retention, as above
            continue
        elif size != entry.size:
            reason = f"blob {entry.blob} has {size} bytes, expected {entry.size}"
        if reason is not None:
            return Stop(entry.segment, scan.path_of(entry.segment), entry.offset, reason,
                        torn=False)
        seen_present = True
    return None


def _size_or_none(io: FileIO, path: Path) -> int | None:
    try:
        return io.size(path)
    except FileNotFoundError:
        return None


def cut_back(io: FileIO, scan: LogScan, blob_dir: Path, stop: Stop) -> Path | None:
    """Point-in-time recovery: cut the log right after the newest checkpoint before
    ``stop`` whose state verifies (with none, at ``stop``) and move what follows aside.
    Returns where the first moved bytes went."""
    cut: tuple[int, int] | None = None
    for entry in reversed(scan.checkpoints):
        if (entry.segment, entry.offset) < (stop.segment, stop.offset) \
                and _unloadable(io, scan, entry, blob_dir) is None:
            cut = (entry.segment, entry.end)
            break
    if cut is None:
        kept = stop.offset > HEADER_SIZE or any(
            s.first_seq is not None and s.number < stop.segment for s in scan.segments)
        if not kept:
            raise WalCorrupted(stop.path, stop.offset, f"{stop.reason}; nothing to salvage")
        if stop.offset >= HEADER_SIZE:
            cut = (stop.segment, stop.offset)
        else:  # the segment's header is bad: keep the (sealed) segments before it
            prev = scan.segments[-1]
            cut = (prev.number, prev.end)
    number, offset = cut
    path = scan.path_of(number)
    end, _ = scan_after(SegmentFile.open(io, path), offset, None)
    broken = None
    if end > offset:
        broken = copy_aside(io, path, offset, end)
        zero_range(io, path, offset, end)
    later = [p for n, p in list_segments(io, path.parent) if n > number]
    for p in later:
        aside = _aside_name(io, p)
        io.rename(p, aside)
        broken = broken or aside
    if later:
        io.fsync_dir(path.parent)
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
    """Overwrite the bytes ``start..end`` of a segment with zeros, durably."""
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


def _unloadable(io: FileIO, scan: LogScan, entry: CheckpointEntry,
                blob_dir: Path) -> Stop | None:
    path = scan.path_of(entry.segment)
    try:
        load_state(io, path, entry, blob_dir)
    except ValueError as exc:
        return Stop(entry.segment, path, entry.offset, str(exc), torn=False)
    return None
