"""The crash campaign: run a workload on RecordingIO, rebuild the disk a power loss
after each operation could leave, recover each one and check what was promised.

Used by tests/test_wal_power_loss.py and ``tools/bench.py wal``:

    result = run_campaign(max_states=600, seed=1)
    assert result.violations == []

Promises checked on every crash state: open succeeds without salvage; every record
acknowledged before the crash is recovered (unless retention removed its segment);
recovered seqs are contiguous and each record is byte-for-byte what was written under
that seq; the newest acknowledged checkpoint (or a newer durable one) is recovered with
the digest that was sent; verify passes; the log takes a new append and reopens with it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nkat.protocol.messages import state_digest
from nkat.supervisor.wal.errors import WalError, WalIOError
from nkat.supervisor.wal.format import (
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    RecordType,
    frame_crc,
    unpack_payload,
)
from nkat.supervisor.wal.testing.recording import CrashState, RecordingIO
from nkat.supervisor.wal.verify import verify
from nkat.supervisor.wal.wal import Wal

WAL_DIR = Path("/run/wal")
BLOB_DIR = Path("/run/blobs")
RUN = {"run_id": "crash", "spec": {"job": "nkat-highdim", "params": {"max_dimension": 500}},
       "spec_hash": "0" * 64, "config": {"backup_checkpoints": 2}, "created": 0.0}
#: Sizes small enough that a short workload rolls segments, writes blobs and prunes:
#: (Wal.open settings, record note sizes, state sizes). The second profile's records
#: and states cross 4 KiB boundaries, so writes tear there too.
PROFILES: tuple[tuple[dict[str, Any], tuple[int, ...], tuple[int, ...]], ...] = (
    ({"segment_size": 1024, "inline_limit": 96, "blob_chunk": 128, "backup_checkpoints": 2},
     (0, 40, 160), (16, 80, 200, 700)),
    ({"segment_size": 16384, "inline_limit": 2048, "blob_chunk": 4096, "backup_checkpoints": 2},
     (10, 1500, 5000), (100, 3000, 9000)),
)


def checkpoint_meta(ckpt_seq: int, state: bytes, *, epoch: int = 1,
                    t_wall: float = 0.0) -> dict[str, Any]:
    """A checkpoint payload for ``state``, as the supervisor builds one."""
    return {"ckpt_seq": ckpt_seq, "epoch": epoch, "units_done": ckpt_seq * 10,
            "digest": state_digest(state), "t_wall": t_wall}


@dataclass
class Workload:
    """What a workload did: the operations it recorded, what was acknowledged after how
    many of them, and what was written under each seq."""

    io: RecordingIO
    profile: int  # index into PROFILES
    acks: list[tuple[int, int]] = field(default_factory=list)  # (ops done, seq)
    ckpt_acks: list[tuple[int, int]] = field(default_factory=list)  # (ops done, seq)
    digests: dict[int, str] = field(default_factory=dict)  # ckpt_seq -> digest sent
    reference: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # seq -> record
    failure: WalIOError | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more Wal.open settings

    @property
    def settings(self) -> dict[str, Any]:
        return {**PROFILES[self.profile][0], **self.extra}

    def writes(self) -> dict[int, tuple[int, bytes]]:
        """The records (type, payload) in this workload's recorded writes, by seq: each
        frame is written whole by one write, and a workload writes each seq once."""
        out = {}
        for op in self.io.ops:
            data = op.data
            if op.kind != "write" or len(data) < FRAME_HEADER_SIZE or not any(data[:4]):
                continue
            crc, length, rtype, _, seq = FRAME_HEADER.unpack_from(data)
            payload = data[FRAME_HEADER_SIZE:FRAME_HEADER_SIZE + length]
            if len(payload) == length and frame_crc(data[4:FRAME_HEADER_SIZE], payload) == crc:
                out[seq] = (rtype, payload)
        return out


def run_workload(seed: int, steps: int = 24, io: RecordingIO | None = None,
                 extra: dict[str, Any] | None = None) -> Workload:
    """Records, inline and blob checkpoints, rolls, retention and a reopen midway, with
    the sizes of profile ``seed % len(PROFILES)`` (and ``extra`` Wal.open settings). On
    ``io`` armed with a fault, the workload stops at the WalIOError, as a supervisor
    would, and keeps it in ``failure``."""
    work = Workload(io or RecordingIO(), seed % len(PROFILES), extra=dict(extra or {}))
    try:
        wal = Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=work.io, **work.settings)
        _append_some(work, wal, random.Random(seed), steps, reopen_at=steps // 2)
    except WalIOError as exc:
        work.failure = exc
    work.reference = work.writes()
    return work


def second_life(work: Workload, state: CrashState, seed: int, steps: int = 6) -> Workload:
    """Recover a crash state of ``work`` under recording and append some more: the
    crash states of this run are crashes during and after recovery."""
    life = Workload(RecordingIO(state.image), work.profile,
                    acks=[(0, s) for done, s in work.acks if done <= state.point],
                    ckpt_acks=[(0, s) for done, s in work.ckpt_acks if done <= state.point],
                    digests=dict(work.digests), extra=dict(work.extra))
    wal = Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=life.io, **life.settings)
    recovered = [r.seq for r in wal.records()]
    _append_some(life, wal, random.Random(seed), steps, reopen_at=None)
    new = life.writes()
    life.reference = {s: work.reference[s] for s in recovered if s not in new} | new
    return life


def _append_some(work: Workload, wal: Wal, rng: random.Random, steps: int,
                 reopen_at: int | None) -> None:
    _, notes, sizes = PROFILES[work.profile]

    def ack(seq: int) -> int:
        work.acks.append((len(work.io.ops), seq))
        return seq

    ckpt_seq = max(work.digests, default=0)
    try:
        for step in range(steps):
            if step == reopen_at:
                wal.close()
                wal = Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=work.io, **work.settings)
            if step % 8 == 0:
                ack(wal.append(RecordType.EPOCH, {"epoch": step // 8 + 1, "reason": "start",
                                                  "t_wall": float(step)}))
            ack(wal.append(RecordType.EVENT, {"kind": "progress", "t_wall": float(step),
                                              "note": "x" * rng.choice(notes)}))
            if rng.random() < 0.6:
                ckpt_seq += 1
                state = rng.randbytes(rng.choice(sizes))
                meta = checkpoint_meta(ckpt_seq, state, epoch=step // 8 + 1,
                                       t_wall=float(step))
                work.digests[ckpt_seq] = meta["digest"]  # sent, durable or not
                seq = ack(wal.append_checkpoint(meta, state))
                work.ckpt_acks.append((len(work.io.ops), seq))
        ack(wal.append(RecordType.STOP, {"reason": "operator", "desired": "stopped",
                                         "t_wall": float(steps)}))
    finally:
        wal.close()


@dataclass
class CampaignResult:
    states_total: int = 0  # distinct crash states the workloads produced
    states_checked: int = 0
    violations: list[str] = field(default_factory=list)


def run_campaign(max_states: int | None, seed: int = 0, workloads: int = 4,
                 second_lives: int = 8, *, stop_at_violation: bool = False) -> CampaignResult:
    """Check up to ``max_states`` crash states (None: all), sampled from those of
    ``workloads`` runs (seeds ``seed``, ``seed + 1``, ...) and of ``second_lives`` runs
    that recover one of their torn states and go on appending. ``stop_at_violation``:
    stop after the first state that breaks a promise (enough to show that the checker
    catches a broken log; ``states_checked`` then says how far it went)."""
    rng = random.Random(seed)
    states = [(work, state) for work in (run_workload(seed + i) for i in range(workloads))
              for state in work.io.crash_states()]
    torn = [(work, state) for work, state in states if "torn" in state.label]
    result = CampaignResult()
    for work, state in rng.sample(torn, min(second_lives, len(torn))):
        try:
            life = second_life(work, state, seed)
        except (WalError, ValueError):
            continue  # checking this state itself reports it
        states += [(life, s) for s in life.io.crash_states()]
    result.states_total = len(states)
    if max_states is not None and len(states) > max_states:
        states = [states[i] for i in sorted(rng.sample(range(len(states)), max_states))]
    for work, state in states:
        result.states_checked += 1
        result.violations += [f"point {state.point} ({state.label}): {p}"
                              for p in check_state(work, state)]
        if stop_at_violation and result.violations:
            break
    return result


def check_state(work: Workload, state: CrashState) -> list[str]:
    """The promises broken by recovering this crash state (empty if none)."""
    try:
        return _check(work, state)
    except (WalError, ValueError) as exc:
        return [f"{type(exc).__name__}: {exc}"]


def _check(work: Workload, state: CrashState) -> list[str]:
    written = work.reference
    io = RecordingIO(state.image)
    wal = Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, **work.settings)
    problems = []
    records = list(wal.records())
    seqs = [r.seq for r in records]
    if seqs != list(range(seqs[0], seqs[0] + len(seqs))) or seqs[-1] != wal.last_seq:
        problems.append(f"recovered seqs are not a contiguous prefix: {seqs}")
    for r in records:
        # Open itself writes only what a roll the crash stopped did not get to: the seal
        # of the segment before, or the run record that starts the new one.
        if r.seq in written:
            ok = (r.type, r.payload) == (written[r.seq][0], unpack_payload(written[r.seq][1]))
        else:
            ok = (r.type, r.payload) == (RecordType.RUN, RUN) or (
                r.type == RecordType.SEAL and set(r.payload) == {"segment"})
        if not ok:
            problems.append(f"record {r.seq} differs from what was written")
    acked = [seq for done, seq in work.acks if done <= state.point]
    lost = sorted(set(s for s in acked if s >= seqs[0]) - set(seqs))
    if lost or (acked and max(acked) > wal.last_seq):
        problems.append(f"acknowledged records lost: {lost or max(acked)}")
    acked_ckpts = [seq for done, seq in work.ckpt_acks if done <= state.point]
    latest = wal.latest_checkpoint()
    if acked_ckpts and (latest is None or latest.seq < acked_ckpts[-1]):
        problems.append(f"acknowledged checkpoint {acked_ckpts[-1]} lost")
    backup = work.settings["backup_checkpoints"]
    if len(wal.checkpoints()) < min(backup, len(acked_ckpts)):
        problems.append(f"only {len(wal.checkpoints())} checkpoints retained")
    if latest is not None and not (latest.digest == work.digests.get(latest.ckpt_seq)
                                   == state_digest(latest.state)):
        problems.append(f"checkpoint {latest.ckpt_seq} digest differs from what was sent")
    report = verify(WAL_DIR, BLOB_DIR, io=io, backup_checkpoints=backup)
    if not report.ok:
        problems.append(f"verify: {report.problem}")
    seq = wal.append(RecordType.EVENT, {"kind": "after_crash", "t_wall": 0.0})
    wal.close()
    with Wal.open(WAL_DIR, BLOB_DIR, run=RUN, io=io, **work.settings) as again:
        if again.last_seq != seq or list(again.records())[-1].payload["kind"] != "after_crash":
            problems.append("the append after recovery did not survive a reopen")
    return problems
