"""What a restarted supervisor learns from a real WAL before its controller starts: the
newest epoch (never reused, even when retention dropped its record), the restart count,
and the state a boot decides by. The records are written through ``journal`` exactly as
the shell writes them."""

from __future__ import annotations

from pathlib import Path

from nkat.protocol.messages import state_digest
from nkat.supervisor import journal
from nkat.supervisor.controller import RunFacts
from nkat.supervisor.ops.inspect import summarize
from nkat.supervisor.wal import RecordType, Wal
from tests.controller_script import SPEC, Script

RUN = {"run_id": "r1", "spec": SPEC, "spec_hash": "0" * 16, "created": 0.0}


def open_wal(tmp: Path, **kw: object) -> Wal:
    return Wal.open(tmp / "wal", tmp / "blobs", run=RUN, **kw)  # type: ignore[arg-type]


def wall() -> float:
    return 1.7e9


def test_epoch_is_not_reused_after_retention_dropped_its_record(tmp_path):
    with open_wal(tmp_path, segment_size=65536, backup_checkpoints=1) as wal:
        journal.write(wal, journal.Epoch(1, journal.SpawnReason.START), wall)
        seq = 0
        while any(r.type is RecordType.EPOCH for r in wal.records()):
            seq += 1
            state = b"s" * 2000
            meta = journal.CheckpointMeta(seq, 1, seq * 10, state_digest(state), restarts=4)
            wal.append_checkpoint(journal.payload_of(meta, wall()), state)
        assert seq > 1
    with open_wal(tmp_path) as wal:
        history = summarize(wal.records())
    assert history.epoch == 1 and history.restarts == 4
    s = Script(facts=RunFacts("r1", SPEC, epoch=history.epoch, restarts=history.restarts))
    s.start()
    assert s.of_type(journal.Epoch)[0].epoch == 2
    assert s.ctl.status()["restarts"] == 4


def test_the_state_a_boot_decides_by(tmp_path):
    cases = {
        "new": [],
        "interrupted": [journal.Epoch(1, journal.SpawnReason.START)],
        "stopped": [journal.Stop("operator", journal.Desired.STOPPED)],
        "gave_up": [journal.Event.gave_up("crash loop")],
    }
    for n, (state, entries) in enumerate(cases.items()):
        with open_wal(tmp_path / str(n)) as wal:
            for entry in entries:
                journal.write(wal, entry, wall)
            assert summarize(wal.records()).state == state
    with open_wal(tmp_path / "sigterm") as wal:
        journal.write(wal, journal.Stop("signal SIGTERM", journal.Desired.RUNNING), wall)
        assert summarize(wal.records()).state == "interrupted"  # a boot resumes it


def test_old_logs_read_their_restart_events_by_what_they_carry(tmp_path):
    with open_wal(tmp_path) as wal:
        wal.append(RecordType.EVENT, {"kind": "restart", "reason": "crashed: signal SIGKILL",
                                      "exit_class": "crashed", "delay_s": 0.2, "t_wall": 1.0})
        wal.append(RecordType.EVENT, {"kind": "restart", "reason": "Xid 13", "epoch": 2,
                                      "t_wall": 2.0})
        entries = [journal.read(r) for r in wal.records() if r.type is RecordType.EVENT]
    assert [e.kind for e in entries] == [journal.EventKind.RESTART_SCHEDULED,
                                        journal.EventKind.XID_RESTART]
    assert entries[0].fields == {"exit_class": "crashed", "delay_s": 0.2}
    assert entries[1].epoch == 2 and entries[1].t_wall == 2.0
