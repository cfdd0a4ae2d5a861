"""The Wal: one writer's handle on a log directory and its blob directory.

It joins the pieces: recovery at open, appends through the segment writer, checkpoint
states inline or in blobs, per-shard retention, and fail-stop on any I/O error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from nkat.protocol.messages import state_digest

from .blobs import blob_name, chunk_crcs, write_blob
from .checkpoints import (
    STATE_FIELDS,
    Checkpoint,
    CheckpointEntry,
    CheckpointInfo,
    by_shard,
    check_meta,
    newest_of_each_shard,
)
from .errors import WalCorrupted, WalError, WalIOError
from .fileio import FileIO, RealIO
from .format import (
    BLOB_SUFFIX,
    MAX_PAYLOAD,
    TMP_SUFFIX,
    RecordType,
    RunIdentity,
    SegmentHeader,
    pack_payload,
    unpack_payload,
)
from .prepare import Preparer
from .reader import load_state, segment_records
from .recovery import Recovery, recover
from .writer import SegmentWriter

MIN_SEGMENT_SIZE = 1024
#: Seconds a roll (or a new log's first segment) waits for the background preparation
#: before it takes a quick, sparse file instead (prepare.py).
PREPARE_WAIT = 1.0
#: Record types callers append directly; checkpoints go through append_checkpoint and
#: seals are the writer's own.
APPENDABLE = frozenset({RecordType.RUN, RecordType.EPOCH, RecordType.EVENT, RecordType.DONE,
                        RecordType.STOP})


@dataclass(frozen=True)
class Record:
    seq: int
    type: RecordType
    payload: dict[str, Any]


class Wal:
    """The write-ahead log of one run. Not thread-safe: one thread uses it."""

    def __init__(self, io: FileIO, wal_dir: Path, blob_dir: Path, writer: SegmentWriter,
                 checkpoints: list[CheckpointEntry], run: dict[str, Any], recovery: Recovery,
                 *, salvage: bool, backup_checkpoints: int, inline_limit: int,
                 blob_chunk: int, stale: list[tuple[int, Path]] | None = None) -> None:
        """Use Wal.open."""
        self._io, self.wal_dir, self.blob_dir = io, wal_dir, blob_dir
        self._writer = writer
        self._ckpts = checkpoints  # every checkpoint record in the retained segments
        self._run = run
        self.recovery = recovery
        self._salvage = salvage
        self._backup = backup_checkpoints
        self._inline_limit = inline_limit
        self._blob_chunk = blob_chunk
        self._stale = stale or []  # unreadable segment files retention may remove
        self._failed: str | None = None
        self._closed = False

    @classmethod
    def open(cls, wal_dir: Path, blob_dir: Path, *, run: dict[str, Any] | None = None,
             salvage: bool = False, backup_checkpoints: int = 3, segment_size: int = 64 << 20,
             inline_limit: int = 1 << 20, blob_chunk: int = 1 << 20,
             io: FileIO | None = None, create: bool = True,
             background_prepare: bool | None = None,
             prepare_wait: float = PREPARE_WAIT) -> Wal:
        """Open (creating if absent) the log in ``wal_dir`` with blobs in ``blob_dir``.

        An empty log needs ``run``, which becomes its first record; its ``run_id`` and
        ``spec_hash`` are the identity every segment header names. An existing log is
        recovered first (see Wal.recovery, whose ``warnings`` list damage the open went
        on despite: older than the checkpoint the run resumes from). A ``run`` that
        differs from the stored one is appended as a new run record.

        Raises WalForeign if the log names another run than ``run``; WalTruncated if its
        newest segment was deleted or truncated, or (``create=False``: the log must
        exist) it has no segment; WalCorrupted if damage hits what a resume needs: the
        newest checkpoint that verifies of any shard, or anything after it. With
        ``salvage`` the last two do not stop the open: it keeps every record that
        verifies and resumes from each shard's newest checkpoint that does (appended
        again, so later opens need no salvage). WalIOError if the file system fails.

        ``background_prepare``: prepare segment files in a thread (None: when ``io`` is
        the real file system); a roll waits ``prepare_wait`` seconds for one at most.
        """
        if backup_checkpoints < 1:
            raise ValueError("backup_checkpoints must be at least 1")
        if segment_size < MIN_SEGMENT_SIZE:
            raise ValueError(f"segment_size must be at least {MIN_SEGMENT_SIZE}")
        if not 0 <= inline_limit <= MAX_PAYLOAD // 2 or blob_chunk < 1:
            raise ValueError("inline_limit or blob_chunk out of range")
        run_bytes = pack_payload(run) if run is not None else None
        expected = RunIdentity.of_run(run)
        SegmentHeader(0, 0, 0, identity=expected).encode()  # ValueError if it cannot fit
        io = io if io is not None else RealIO()
        if background_prepare is None:
            background_prepare = isinstance(io, RealIO)
        wal_dir, blob_dir = Path(wal_dir), Path(blob_dir)
        preparer = Preparer(io, wal_dir, segment_size, background=background_prepare,
                            wait=prepare_wait)
        try:
            for directory in (wal_dir, blob_dir):
                _ensure_dir(io, directory)
                _remove_tmp(io, directory)
            scan, recovery, reappend = recover(io, wal_dir, blob_dir, salvage=salvage,
                                               backup=backup_checkpoints, identity=expected,
                                               create=create, fresh=run is not None)
            if scan.run is not None:
                stored, next_seq = pack_payload(scan.run), scan.last_seq + 1
            elif run_bytes is not None:
                stored, next_seq = run_bytes, scan.last_seq + 1
            else:
                raise ValueError("an empty WAL needs the run record")
            identity = expected if expected.known else RunIdentity.of_run(scan.run)
            if not scan.segments or scan.segments[-1].seal_crc is not None:
                writer = SegmentWriter.create(io, wal_dir, segment_size, scan.segments,
                                              next_seq, stored, identity=identity,
                                              preparer=preparer)
            else:
                writer = SegmentWriter(io, wal_dir, segment_size, scan.segments, next_seq,
                                       stored, identity=identity, preparer=preparer)
        except OSError as exc:
            preparer.close()
            raise WalIOError(f"WAL open failed: {exc}", exc.errno) from exc
        except BaseException:
            preparer.close()
            raise
        stale = [(d.segment, d.path) for d in scan.damage if d.kind == "header"]
        wal = cls(io, wal_dir, blob_dir, writer, scan.checkpoints, unpack_payload(stored),
                  recovery, salvage=salvage, backup_checkpoints=backup_checkpoints,
                  inline_limit=inline_limit, blob_chunk=blob_chunk, stale=stale)
        try:
            with wal._failstop("open"):
                if writer.active.first_seq is None:
                    writer.start_segment()
                wal._retain(orphans=True)
            for entry in reappend:
                # Salvage: each shard's resume checkpoint again, after all the damage.
                state = wal._load(entry)
                wal.append_checkpoint({**entry.meta, "salvaged_from": entry.seq}, state)
            if run is not None and unpack_payload(pack_payload(run)) != wal._run:
                wal.append(RecordType.RUN, run)
        except BaseException:
            wal._abandon()
            raise
        return wal

    # Reading --------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self._writer.next_seq - 1

    @property
    def run_payload(self) -> dict[str, Any]:
        """The newest run record's payload."""
        return self._run

    def records(self) -> Iterator[Record]:
        """Every retained record in seq order, read back from disk and checked again."""
        try:
            for seg in list(self._writer.segments):
                for frame, payload in segment_records(self._io, seg):
                    yield Record(frame.seq, RecordType(frame.rtype), payload)
        except OSError as exc:
            raise WalIOError(f"reading the WAL failed: {exc}", exc.errno) from exc

    def shards(self) -> list[int]:
        """The shards that have a retained checkpoint ([0] for a run of one worker)."""
        return sorted({e.shard for e in self._retained() if not e.pruned})

    def checkpoints(self, shard: int | None = None) -> list[CheckpointInfo]:
        """The retained checkpoints (each shard's newest ``backup_checkpoints`` that still
        have their state), oldest first, without loading their states; with ``shard``,
        that shard's only."""
        return [CheckpointInfo.of(e) for e in self._retained()
                if not e.pruned and (shard is None or e.shard == shard)]

    def latest_checkpoint(self, shard: int = 0) -> Checkpoint | None:
        """The newest durable checkpoint of ``shard`` with its state verified, or None if
        it has none. WalCorrupted if its state does not verify (it did at open), unless
        the log was opened with salvage: then the newest retained one that verifies."""
        candidates = [e for e in self._retained() if not e.pruned and e.shard == shard]
        for entry in reversed(candidates):
            try:
                state = self._load(entry)
            except WalCorrupted:
                if self._salvage:
                    continue
                raise
            m = entry.meta
            return Checkpoint(entry.seq, m["ckpt_seq"], m["epoch"], m["units_done"],
                              m["digest"], float(m["t_wall"]), state, entry.shard)
        return None

    def _load(self, entry: CheckpointEntry) -> bytes:
        seg = next(s for s in self._writer.segments if s.number == entry.segment)
        path = seg.path
        try:
            return load_state(self._io, path, entry, self.blob_dir, seg.salt)
        except ValueError as exc:
            raise WalCorrupted(path, entry.offset, str(exc)) from None
        except OSError as exc:
            raise WalIOError(f"reading checkpoint {entry.seq} failed: {exc}",
                             exc.errno) from exc

    # Writing --------------------------------------------------------------------------

    def append(self, rtype: RecordType, payload: dict[str, Any]) -> int:
        """Append a record; return its seq once it is durable (written and fdatasynced).

        WalIOError if the file system fails: the record is not acknowledged (it may or
        may not be on disk) and the log takes no more appends until reopened."""
        if rtype not in APPENDABLE:
            raise ValueError(f"cannot append a {RecordType(rtype).name} record directly")
        data = pack_payload(payload)
        with self._failstop("append"):
            seq = self._writer.append(rtype, data).seq
        if rtype == RecordType.RUN:
            self._run = unpack_payload(data)
        return seq

    def append_checkpoint(self, payload: dict[str, Any], state: bytes) -> int:
        """Append a checkpoint; return its record's seq once it and its state are durable.

        ``payload`` holds ckpt_seq, epoch, units_done, digest (state_digest of ``state``,
        checked here), t_wall and, for a run of several workers, ``shard`` (an int;
        absent means 0). A state up to ``inline_limit`` bytes goes into a ckpt
        record; a larger one into a blob file, made durable before the ckpt_ref record
        that commits it. Older checkpoints of its shard beyond ``backup_checkpoints`` are then
        removed.
        Errors as for append; a WalIOError from the removal comes after the checkpoint
        is durable, so a checkpoint resent after reopening may already be in the log.
        """
        check_meta(payload)
        if any(k in payload for k in STATE_FIELDS):
            raise ValueError(f"checkpoint payload may not use the keys {STATE_FIELDS}")
        if not isinstance(state, bytes) or state_digest(state) != payload["digest"]:
            raise ValueError("checkpoint digest does not match its state")
        meta = unpack_payload(pack_payload(payload))
        with self._failstop("checkpoint"):
            if len(state) <= self._inline_limit:
                written = self._writer.append(RecordType.CKPT,
                                              pack_payload({**payload, "state": state}))
                entry = CheckpointEntry(written.seq, written.segment, written.offset,
                                        written.end, meta, len(state))
            else:
                name = blob_name(payload["ckpt_seq"])
                crcs = chunk_crcs(state, self._blob_chunk)
                write_blob(self._io, self.blob_dir, name, state)
                ref = {"blob": name, "size": len(state), "chunk": self._blob_chunk, "crcs": crcs}
                written = self._writer.append(RecordType.CKPT_REF,
                                              pack_payload({**payload, **ref}))
                entry = CheckpointEntry(written.seq, written.segment, written.offset,
                                        written.end, meta, len(state), name,
                                        self._blob_chunk, crcs)
            self._ckpts.append(entry)
            self._retain(orphans=False)
        return written.seq

    def close(self) -> None:
        """Release the files. Everything appended is already durable."""
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.close()
        except OSError as exc:
            raise WalIOError(f"WAL close failed: {exc}", exc.errno) from exc

    def _abandon(self) -> None:
        """Close after a failed open, keeping the error that made it fail."""
        self._closed = True
        with suppress(OSError):
            self._writer.close()

    def __enter__(self) -> Wal:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # Internals ------------------------------------------------------------------------

    @contextmanager
    def _failstop(self, what: str) -> Iterator[None]:
        if self._closed:
            raise WalError("the WAL is closed")
        if self._failed is not None:
            raise WalIOError(f"the WAL stopped after an I/O error ({self._failed}); "
                             "reopen it to continue")
        try:
            yield
        except OSError as exc:
            # No retry, ever: after a failed fsync the page cache may hold data the
            # disk does not, and a second fsync would report success for it.
            self._failed = f"{what}: {exc}"
            raise WalIOError(f"WAL {what} failed: {exc}", exc.errno) from exc

    def _retained(self) -> list[CheckpointEntry]:
        """Each shard's newest ``backup_checkpoints`` whose state is not known broken."""
        return newest_of_each_shard([e for e in self._ckpts if e.broken is None], self._backup)

    def _segment_path(self, number: int) -> Path:
        return next(s.path for s in self._writer.segments if s.number == number)

    def _retain(self, *, orphans: bool) -> None:
        """Remove blobs and sealed segments that only older checkpoints need.

        Unlinks go oldest first, each made durable before the next, so a crash leaves
        each shard's removed blobs as a prefix of its ckpt_ref records (check_blobs
        relies on it) and never a hole in the segment sequence.
        """
        io = self._io
        kept = self._retained()
        oldest_kept = {shard: group[0].seq for shard, group in by_shard(kept).items()}
        for entry in self._ckpts:
            cutoff = oldest_kept.get(entry.shard)
            if cutoff is None or entry.seq >= cutoff:
                continue
            if entry.blob is not None and not entry.pruned:
                with suppress(FileNotFoundError):
                    io.unlink(self.blob_dir / entry.blob)
                io.fsync_dir(self.blob_dir)
                entry.pruned = True
        segments = self._writer.segments
        # Invariant: the segment holding the oldest retained checkpoint of any shard
        # stays, and so does every later one, the active one included.
        first_needed = min((e.segment for e in kept), default=None)
        while first_needed is not None and segments[0].number < first_needed:
            io.unlink(segments.pop(0).path)
            io.fsync_dir(self.wal_dir)
        first = segments[0].number
        # Unreadable segment files older than that are damage no resume needs: they
        # go as an intact one would (the open's warnings named them).
        for _, path in [s for s in self._stale if s[0] < first]:
            with suppress(FileNotFoundError, IsADirectoryError):
                io.unlink(path)
            io.fsync_dir(self.wal_dir)
        self._stale = [s for s in self._stale if s[0] >= first]
        self._ckpts[:] = [e for e in self._ckpts if e.segment >= first]
        if orphans:
            wanted = {e.blob for e in self._ckpts if e.blob is not None and not e.pruned}
            stale = [name for name in io.listdir(self.blob_dir)
                     if name.endswith(BLOB_SUFFIX) and name not in wanted]
            for name in stale:
                io.unlink(self.blob_dir / name)
            if stale:
                io.fsync_dir(self.blob_dir)


def _ensure_dir(io: FileIO, path: Path) -> None:
    if io.exists(path):
        return
    _ensure_dir(io, path.parent)
    io.mkdir(path)
    io.fsync_dir(path.parent)


def _remove_tmp(io: FileIO, directory: Path) -> None:
    """Leftovers of a crash mid-write; nothing refers to a *.tmp file."""
    stale = [name for name in io.listdir(directory) if name.endswith(TMP_SUFFIX)]
    for name in stale:
        io.unlink(directory / name)
    if stale:
        io.fsync_dir(directory)

