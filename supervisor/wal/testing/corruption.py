"""The damage campaign: a stopped run's log (two segments, 40 checkpoints) damaged one
way at a time, each open checked against what was written.

    result = run_damage_campaign()
    result.cases, result.wrong        # wrong must be empty

The damage: a bit flip in the header and in the payload of every frame (every record
type: run, epoch, ckpt, ckpt_ref, event, stop, seal, and done in a completed variant),
in every byte of both segment headers and in every chunk of each blob; a blob missing;
the newest segment deleted or truncated; stray files in the log directory; another
run's log, whole or one segment of it. The oracle knows each checkpoint's record, place
and state, and allows exactly three outcomes:

- a correct resume: a plain open resumes from the newest checkpoint whose record and
  state are intact, its state byte for byte, and names the damage in a warning (the
  damage is older than that checkpoint, or the last frame of the log reads as a torn
  tail, which a crash leaves too);
- a clear refusal: the damage hits that checkpoint or what follows it, and the plain
  open raises the typed error naming the damaged file and offset (WalTruncated for a
  lost newest segment, WalForeign for another run's log);
- a salvage that keeps the newest intact checkpoint: ``salvage=True`` then resumes from
  it and keeps every record that verifies.

Every resume must then take an append and reopen without salvage at the same
checkpoint, and verify must report the damage (``needs_salvage`` exactly when the plain
open refuses). Used by tests/test_wal_damage.py and ``tools/bench.py hardening``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from nkat.supervisor.wal.errors import WalCorrupted, WalError, WalForeign, WalTruncated
from nkat.supervisor.wal.format import (
    FRAME_HEADER_SIZE,
    RecordType,
    RunIdentity,
    SegmentHeader,
)
from nkat.supervisor.wal.reader import Frame, FrameReader
from nkat.supervisor.wal.testing.crashcheck import BLOB_DIR, RUN, WAL_DIR, checkpoint_meta
from nkat.supervisor.wal.testing.recording import DIR, Image, RecordingIO
from nkat.supervisor.wal.verify import verify
from nkat.supervisor.wal.wal import Wal

#: Two segments: the first holds checkpoints 1..39, the second checkpoint 40 and the
#: stop record; the newest three (38, 39, 40) are retained, 38 and 39 in blobs.
SETTINGS: dict[str, Any] = {"segment_size": 11100, "inline_limit": 64, "blob_chunk": 64,
                            "backup_checkpoints": 3}
CHECKPOINTS = 40
SEG0, SEG1 = WAL_DIR / "0000000000000000.wal", WAL_DIR / "0000000000000001.wal"
OTHER_RUN = {**RUN, "run_id": "another-run"}


@dataclass
class Base:
    """A built log and what the oracle knows about it."""

    image: Image
    states: dict[int, bytes]  # ckpt_seq -> state sent
    records: dict[int, tuple[Path, Frame]]  # seq -> (segment, frame), every frame
    ckpt_seqs: dict[int, int]  # record seq -> ckpt_seq
    blobs: dict[int, str]  # ckpt_seq -> blob file name, those still on disk

    def frames(self) -> list[tuple[Path, Frame]]:
        return [self.records[s] for s in sorted(self.records)]

    def position(self, seq: int) -> tuple[int, int]:
        path, frame = self.records[seq]
        return int(path.stem, 16), frame.offset

    def available(self) -> dict[int, int]:
        """ckpt_seq -> record seq of every checkpoint whose state is on disk."""
        return {c: s for s, c in self.ckpt_seqs.items()
                if c in self.blobs or len(self.states[c]) <= SETTINGS["inline_limit"]}


def build_base(*, done: bool = False, run: dict[str, Any] | None = None) -> Base:
    """The stopped run (or, ``done``, a completed one whose last record is an event
    after its done record)."""
    io = RecordingIO()
    rng = random.Random(1)
    states: dict[int, bytes] = {}
    with Wal.open(WAL_DIR, BLOB_DIR, run=run or RUN, io=io, **SETTINGS) as wal:
        wal.append(RecordType.EPOCH, {"epoch": 1, "reason": "start", "t_wall": 0.0})
        for i in range(1, CHECKPOINTS + 1):
            wal.append(RecordType.EVENT, {"kind": "progress", "i": i, "t_wall": float(i)})
            states[i] = rng.randbytes(30 if i % 4 == 0 else 100)  # inline or blob
            wal.append_checkpoint(checkpoint_meta(i, states[i], t_wall=float(i)), states[i])
        if done:
            wal.append(RecordType.DONE, {"result": {"ok": True}, "digest": "0" * 64,
                                         "t_wall": 41.0})
            wal.append(RecordType.EVENT, {"kind": "kill_lingering", "t_wall": 42.0})
        else:
            wal.append(RecordType.STOP, {"reason": "operator", "desired": "stopped",
                                         "t_wall": 41.0})
    image = io.image()
    records: dict[int, tuple[Path, Frame]] = {}
    ckpt_seqs: dict[int, int] = {}
    for path in (SEG0, SEG1):
        data = image.read(path)
        header = SegmentHeader.decode(data)
        for frame in FrameReader(data, header.salt, header.length, None):
            records[frame.seq] = (path, frame)
    for seq, (_, frame) in records.items():
        if frame.rtype in (RecordType.CKPT, RecordType.CKPT_REF):
            ckpt_seqs[seq] = len(ckpt_seqs) + 1
    blobs = {int(p.name[:16], 16): p.name for p, ino in image.walk()
             if str(p.parent) == str(BLOB_DIR) and ino != DIR}
    return Base(image, states, records, ckpt_seqs, blobs)


@dataclass
class Case:
    """One damaged log and the oracle's expectations."""

    name: str
    image: Image
    blame: tuple[Path, int] | None  # where the damage is, as open and verify name it
    lost: set[int] = field(default_factory=set)  # record seqs the damage destroys
    needed: bool | None = None  # None: from the place of the damage
    refusal: type[WalError] = WalCorrupted
    torn: bool = False  # the damage is the last frame of the log: a torn tail
    verify_ok: bool = False  # nothing for verify to report


@dataclass
class DamageResult:
    cases: int = 0
    wrong: list[str] = field(default_factory=list)


def run_damage_campaign(*, sample: int | None = None, seed: int = 0,
                        stop_at_wrong: bool = False) -> DamageResult:
    """Run every case (``sample``: that many, chosen at random, for a quick look;
    ``stop_at_wrong``: stop after the first case the log gets wrong, enough to show that
    the oracle catches a broken log, ``cases`` then says how far it went)."""
    stopped, completed = build_base(), build_base(done=True)
    cases = list(cases_of(stopped))
    cases += [c for c in frame_cases(completed, "completed")
              if c.blame is not None and c.blame[0] == SEG1]
    if sample is not None and sample < len(cases):
        cases = random.Random(seed).sample(cases, sample)
    result = DamageResult()
    for case in cases:
        base = completed if case.name.startswith("completed") else stopped
        result.cases += 1
        result.wrong += [f"{case.name}: {p}" for p in check_case(base, case)]
        if stop_at_wrong and result.wrong:
            break
    return result


def cases_of(base: Base) -> Iterator[Case]:
    yield from frame_cases(base, "stopped")
    yield from header_cases(base)
    yield from blob_cases(base)
    yield from loss_cases(base)
    yield from stray_cases(base)
    yield from foreign_cases(base)


def flip(image: Image, path: Path | PurePosixPath, offset: int, bit: int = 0) -> Image:
    data = bytearray(image.read(path))
    data[offset] ^= 1 << bit
    return image.replace(path, bytes(data))


def frame_cases(base: Base, label: str) -> Iterator[Case]:
    """A flip in the header (crc, length, type, salt or seq) and in the payload of every
    frame."""
    last_seq = max(base.records)
    for seq, (path, frame) in sorted(base.records.items()):
        kind = RecordType(frame.rtype).name.lower()
        for where, offset in (("header", frame.offset + 4 + seq % 20),
                              ("payload", frame.offset + FRAME_HEADER_SIZE
                               + seq % len(frame.payload))):
            yield Case(f"{label}: {kind} record {seq}, {where} bit", flip(
                base.image, path, offset, seq % 8), (path, frame.offset), {seq},
                torn=seq == last_seq)


def header_cases(base: Base) -> Iterator[Case]:
    """Every byte of both segment headers. The first holds checkpoints a resume does not
    need; the second is the newest, and unreadable it is a refusal."""
    for path in (SEG0, SEG1):
        length = SegmentHeader.decode(base.image.read(path)).length
        lost = {s for s, (p, _) in base.records.items() if p == path}
        for offset in range(length):
            yield Case(f"header of {path.name} byte {offset}", flip(
                base.image, path, offset, offset % 8), (path, 0), lost)


def blob_cases(base: Base) -> Iterator[Case]:
    """A flip in every chunk of every blob left, and each blob missing."""
    for ckpt_seq, name in sorted(base.blobs.items()):
        path = BLOB_DIR / name
        size = len(base.image.read(path))
        seq = next(s for s, c in base.ckpt_seqs.items() if c == ckpt_seq)
        place = (base.records[seq][0], base.records[seq][1].offset)
        for chunk in range(0, size, SETTINGS["blob_chunk"]):
            yield Case(f"blob of checkpoint {ckpt_seq} chunk {chunk}", flip(
                base.image, path, chunk + 7, 3), place, {seq})
        io = RecordingIO(base.image)
        io.unlink(path)
        # Retention removes each shard's oldest blobs first, so a missing oldest one is
        # taken as pruned: nothing to report, and nothing lost that a resume needs.
        oldest = ckpt_seq == min(base.blobs)
        yield Case(f"blob of checkpoint {ckpt_seq} missing", io.image(),
                   None if oldest else place, {seq}, needed=False if oldest else None,
                   verify_ok=oldest)


def loss_cases(base: Base) -> Iterator[Case]:
    """The newest segment deleted, or truncated to each of a spread of sizes."""
    io = RecordingIO(base.image)
    io.unlink(SEG1)
    lost = {s for s, (p, _) in base.records.items() if p == SEG1}
    yield Case("newest segment deleted", io.image(), (SEG1, 0), lost, needed=True,
               refusal=WalTruncated)
    data = base.image.read(SEG1)
    frames = [f for p, f in base.frames() if p == SEG1]
    cuts = {0, 100, 176, len(data) - 1, frames[-1].end, frames[-1].offset + 10}
    cuts |= {f.offset for f in frames} | {f.end - 3 for f in frames}
    for cut in sorted(cuts):
        gone = {f.seq for f in frames if f.end > cut}
        yield Case(f"newest segment truncated to {cut} bytes", base.image.replace(
            SEG1, data[:cut]), (SEG1, cut if cut >= 176 else 0), gone, needed=True,
            refusal=WalTruncated)


def stray_cases(base: Base) -> Iterator[Case]:
    """Files that are no segment: named for themselves, never for a segment."""
    io = RecordingIO(base.image)
    io.mkdir(WAL_DIR / "0000000000000007.wal")
    yield Case("a directory named like a segment", io.image(),
               (WAL_DIR / "0000000000000007.wal", 0), set(), needed=False)
    io = RecordingIO(base.image)
    _write(io, WAL_DIR / "09.wal", os.urandom(300))
    yield Case("a stray 09.wal", io.image(), (WAL_DIR / "09.wal", 0), set(), needed=False)
    io = RecordingIO(base.image)
    _write(io, WAL_DIR / "0000000000000009.wal", os.urandom(300))
    yield Case("garbage named like a newer segment", io.image(),
               (WAL_DIR / "0000000000000009.wal", 0), set(), needed=True)


def foreign_cases(base: Base) -> Iterator[Case]:
    other = build_base(run=OTHER_RUN)
    yield Case("another run's log", other.image, (SEG0, 0), set(), needed=True,
               refusal=WalForeign)
    yield Case("another run's newest segment", base.image.replace(SEG1, other.image.read(SEG1)),
               (SEG1, 0), set(), needed=True, refusal=WalForeign)


def _write(io: RecordingIO, path: Path, data: bytes) -> None:
    fd = io.open(path, os.O_WRONLY | os.O_CREAT)
    io.pwrite(fd, data, 0)
    io.close(fd)


def check_case(base: Base, case: Case) -> list[str]:
    """What the open, the salvage and verify did wrong with this case (empty: nothing)."""
    try:
        return _check(base, case)
    except Exception as exc:  # any exception the oracle did not expect is a wrong state
        return [f"unexpected {type(exc).__name__}: {exc}"]


def _check(base: Base, case: Case) -> list[str]:
    wrong: list[str] = []
    available = {c: s for c, s in base.available().items() if s not in case.lost}
    if case.refusal is WalForeign:
        for salvage in (False, True):
            try:
                _open(case.image, salvage)[0].close()
                wrong.append(f"another run's log opened (salvage={salvage})")
            except WalForeign as exc:
                if case.blame is None or exc.segment != case.blame[0]:
                    wrong.append(f"blamed {exc.segment}, not {case.blame}")
        report = verify(WAL_DIR, BLOB_DIR, io=RecordingIO(case.image),
                        identity=RunIdentity.of_run(RUN))
        if report.ok or not report.needs_salvage:
            wrong.append("verify did not report another run's log")
        return wrong
    expected = max(available) if available else None
    needed = case.needed
    if needed is None:
        assert case.blame is not None
        at = (int(case.blame[0].stem, 16), case.blame[1])
        needed = not case.torn and (expected is None or at > base.position(available[expected]))
    try:
        wal, io = _open(case.image, salvage=False)
    except WalError as exc:
        if not needed:
            return [f"refused though a resume from checkpoint {expected} needs none of it: "
                    f"{type(exc).__name__}: {exc}"]
        if type(exc) is not case.refusal:
            wrong.append(f"refused with {type(exc).__name__}, not {case.refusal.__name__}")
        if isinstance(exc, WalCorrupted) and case.blame is not None \
                and (exc.segment, exc.offset) != case.blame:
            wrong.append(f"blamed {exc.segment} offset {exc.offset}, not {case.blame}")
        wal, io = _open(case.image, salvage=True)
        wrong += _resumed(base, case, wal, io, expected, salvaged=True)
    else:
        if needed:
            wal.close()
            return [f"opened though checkpoint {expected} or what follows it is damaged"]
        wrong += _resumed(base, case, wal, io, expected, salvaged=False)
    report = verify(WAL_DIR, BLOB_DIR, io=RecordingIO(case.image))
    if report.ok != (case.torn or case.verify_ok):
        wrong.append(f"verify ok={report.ok}: {report.problem}")
    elif not report.ok and report.needs_salvage != needed:
        wrong.append(f"verify needs_salvage={report.needs_salvage}, the open says {needed}")
    elif case.blame is not None and not case.torn and not any(
            (p.segment, p.offset) == case.blame for p in report.problems):
        wrong.append(f"verify did not name {case.blame}: {report.problems}")
    return wrong


def _open(image: Image, salvage: bool) -> tuple[Wal, RecordingIO]:
    io = RecordingIO(image)
    return Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, salvage=salvage, **SETTINGS), io


def _resumed(base: Base, case: Case, wal: Wal, io: RecordingIO, expected: int | None,
             salvaged: bool) -> list[str]:
    wrong: list[str] = []
    with wal:
        latest = wal.latest_checkpoint()
        got = latest.ckpt_seq if latest is not None else None
        if got != expected:
            wrong.append(f"resumed from checkpoint {got}, not {expected}")
        elif latest is not None and latest.state != base.states[latest.ckpt_seq]:
            wrong.append(f"checkpoint {got}'s state differs from what was sent")
        kept = {r.seq for r in wal.records()}
        intact = set(base.records) - case.lost
        if salvaged and not intact <= kept:
            wrong.append(f"salvage dropped intact records {sorted(intact - kept)[:5]}")
        said = wal.recovery.warnings + ((wal.recovery.problem,) if wal.recovery.problem else ())
        if case.torn:
            if not wal.recovery.torn_tail_repaired:
                wrong.append("the damaged last frame was not taken as a torn tail")
        elif case.blame is not None and not case.verify_ok and not any(
                w.startswith(f"{case.blame[0]}: offset {case.blame[1]}:") for w in said):
            wrong.append(f"no warning names {case.blame}: {said}")
        seq = wal.append(RecordType.EVENT, {"kind": "after", "t_wall": 0.0})
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, **SETTINGS) as again:
        latest = again.latest_checkpoint()
        if again.last_seq != seq or (latest.ckpt_seq if latest else None) != expected:
            wrong.append("the log did not reopen without salvage at the same checkpoint")
    return wrong

