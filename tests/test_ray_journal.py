"""The Ray engine's journal, without Ray: the run's real WAL on disk, written for nodes.
Each attempt at a shard fences the earlier ones, epochs stay unique in blocks, checkpoints
must follow the durable one, a node cannot write the run's own records, a done shard is
never begun again, a failed WAL refuses everything after, and a second journal (or a local
start) waits for the first to let go of the WAL."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import msgpack
import pytest

from nkat.protocol.messages import state_digest
from nkat.supervisor import journal
from nkat.supervisor.cluster.board import ray_status
from nkat.supervisor.cluster.journal import EPOCH_BLOCK, JournalRefused, RunJournal
from nkat.supervisor.ops.inspect import summarize
from nkat.supervisor.rundir import RunDir
from nkat.supervisor.wal import RecordType, Wal, WalError
from nkat.supervisor.wal.readonly import read_records
from tests.e2e import SupervisedRun, reap_processes, wait_for  # noqa: F401 - autouse

SPEC = {"job": "nkat-highdim", "params": {"max_dimension": 1000, "unit_dims": 100}}
SHARDS = ((0, 4), (4, 8), (8, 10))


def make_run(tmp_path: Path) -> RunDir:
    run = RunDir.create(tmp_path, "r1", SPEC, {"segment_size": 1 << 20}, shards=SHARDS)
    Wal.open(run.wal_dir, run.blob_dir, run={"run_id": "r1", "spec": SPEC,
                                             "spec_hash": run.info.spec_hash,
                                             "created": run.info.created}).close()
    return run


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    return make_run(tmp_path)


def open_journal(run: RunDir, **kw: object) -> RunJournal:
    opened = RunJournal(str(run.path.parent.parent), run.run_id, run.info.created, "numpy",
                        **kw)  # type: ignore[arg-type]
    opened.open()
    return opened


def epoch(task, n: int = 1) -> dict:
    return {"epoch": task.epoch_base + n, "reason": "start", "resume_ckpt_seq": 0,
            "shard": task.shard, "restarts": 0, "t_wall": time.time()}


def ckpt(task, seq: int, units: int, n: int = 1) -> dict:
    return {"ckpt_seq": seq, "epoch": task.epoch_base + n, "units_done": units,
            "digest": state_digest(state(units)), "restarts": 0, "shard": task.shard,
            "t_wall": time.time()}


def state(units: int) -> bytes:
    return msgpack.packb({"units": units})


def test_a_newer_attempt_fences_the_older_one_on_disk(run):
    j = open_journal(run)
    first = j.begin(1, "node-a")
    assert j.append(1, first.attempt, RecordType.EPOCH, epoch(first))[1] is None
    assert j.append(1, first.attempt, RecordType.CKPT_REF, ckpt(first, 1, 2), state(2))[1] is None
    second = j.begin(1, "node-b")  # Ray said node-a was lost, but it still computes
    assert second.attempt == first.attempt + 1
    assert (second.ckpt_seq, second.units_done) == (1, 2)  # it resumes what is durable
    seq, why = j.append(1, first.attempt, RecordType.CKPT_REF, ckpt(first, 2, 3), state(3))
    assert seq is None and "superseded" in why
    found, why = j.latest(1, first.attempt)
    assert found is None and "superseded" in why
    found, why = j.latest(1, second.attempt)
    assert why is None and found == (1, 2, state(2))
    j.close()
    # Nothing of the fenced attempt reached the disk, and a new journal fences it too.
    ckpts = [r for r in read_records(run.wal_dir) if r.type is RecordType.CKPT]
    assert [r.payload["ckpt_seq"] for r in ckpts] == [1]
    j = open_journal(run)
    assert j.append(1, second.attempt, RecordType.CKPT_REF, ckpt(second, 2, 3),
                    state(3))[1] is None
    assert j.append(1, first.attempt, RecordType.EPOCH, epoch(first, 2))[0] is None
    j.close()


def test_each_attempt_has_its_own_epochs_and_they_are_never_reused(run):
    j = open_journal(run)
    a, b = j.begin(0, "n1"), j.begin(1, "n2")
    assert a.epoch_limit <= b.epoch_base and a.epoch_limit - a.epoch_base == EPOCH_BLOCK
    assert j.append(0, a.attempt, RecordType.EPOCH, epoch(a))[1] is None
    assert j.append(1, b.attempt, RecordType.EPOCH, epoch(b))[1] is None
    outside = dict(epoch(a), epoch=b.epoch_base + 1)  # b's epoch, claimed by a
    seq, why = j.append(0, a.attempt, RecordType.EPOCH, outside)
    assert seq is None and "outside the attempt's block" in why
    j.close()
    j = open_journal(run)  # after a driver restart, blocks go on above every one handed out
    c = j.begin(2, "n3")
    assert c.epoch_base >= b.epoch_limit
    epochs = [r.payload["epoch"] for r in read_records(run.wal_dir)
              if r.type is RecordType.EPOCH]
    assert len(epochs) == len(set(epochs)) == 2
    j.close()


def test_checkpoints_must_follow_the_durable_one_and_be_the_shards_own(run):
    j = open_journal(run)
    t = j.begin(0, "n1")
    j.append(0, t.attempt, RecordType.EPOCH, epoch(t))
    seq, why = j.append(0, t.attempt, RecordType.CKPT_REF, ckpt(t, 2, 2), state(2))
    assert seq is None and "does not follow the durable 0" in why
    wrong_shard = dict(ckpt(t, 1, 2), shard=1)
    seq, why = j.append(0, t.attempt, RecordType.CKPT_REF, wrong_shard, state(2))
    assert seq is None and "sent as shard 0's" in why
    assert j.append(0, t.attempt, RecordType.CKPT_REF, ckpt(t, 1, 2), state(2))[1] is None
    assert j.snapshot()["shards"][0]["units_done"] == 2
    j.close()


def test_a_node_cannot_write_the_runs_own_records(run):
    j = open_journal(run)
    t = j.begin(0, "n1")
    gave_up = journal.payload_of(journal.Event.gave_up("node gave up"), time.time())
    assert "may not write" in j.append(0, t.attempt, RecordType.EVENT, gave_up)[1]
    done = {"result": {}, "digest": "x", "t_wall": time.time()}
    assert "may not write" in j.append(0, t.attempt, RecordType.DONE, done)[1]
    j.close()
    assert summarize(read_records(run.wal_dir)).state != "gave_up"


def test_restarts_are_counted_for_the_run_and_the_backend_is_pinned(run):
    j = open_journal(run)
    a, b = j.begin(0, "n1"), j.begin(1, "n2")
    for task in (a, b):  # two nodes each restart their worker once, both from count 0
        event = journal.Event(journal.EventKind.RESTART_SCHEDULED, "crashed",
                              epoch=task.epoch_base + 1,
                              fields={"exit_class": "crash", "delay_s": 1, "restarts": 1})
        j.append(task.shard, task.attempt, RecordType.EVENT,
                 journal.payload_of(event, time.time()))
    pin = journal.Event(journal.EventKind.BACKEND, "resolved", epoch=a.epoch_base + 1,
                        fields={"backend": "numpy", "was": None})
    j.append(0, a.attempt, RecordType.EVENT, journal.payload_of(pin, time.time()))
    assert j.snapshot()["restarts"] == 2
    j.close()
    assert summarize(read_records(run.wal_dir)).restarts == 2
    assert RunDir.open(run.path.parent.parent, "r1").info.backends == ("numpy",)


def test_a_second_journal_waits_for_the_first_to_let_go(run):
    first = open_journal(run)
    with pytest.raises(JournalRefused, match="still held") as refused:
        open_journal(run, lock_wait_s=0.3)
    assert refused.value.locked
    threading.Timer(0.5, first.close).start()  # the killed driver's actor goes away
    second = open_journal(run, lock_wait_s=30)
    assert second.begin(0, "n1").attempt == 1
    second.close()


def test_a_directory_that_is_not_the_drivers_is_refused(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(JournalRefused, match="not the driver's"):
        RunJournal(str(tmp_path), run.run_id, "1999-01-01T00:00:00+0000").open()


def test_the_status_adds_durable_and_live_progress_with_one_row_per_agent(run):
    j = open_journal(run)
    a = j.begin(0, "n1")
    j.append(0, a.attempt, RecordType.EPOCH, epoch(a))
    j.append(0, a.attempt, RecordType.CKPT_REF, ckpt(a, 1, 1), state(1))
    assert j.report(0, a.attempt, {"progress": 0.75, "units_per_s": 2.0, "state": "running",
                                   "temperature": 61.0}) is None
    status = ray_status("r1", SPEC, j.snapshot(), [
        ("a0", a, {"node": "n1aaaaaaaaaa", "host": "h1", "gpu": 0}), ("a1", None, None)],
        state="running", outcome=None, supervisor_pid=1, started_wall=0.0)
    assert status["units_total"] == 10 and status["durable_units"] == 1
    assert status["units_done"] == 3 and status["units_per_s"] == 2.0  # live: 75% of 4
    assert status["shards"] == {"total": 3, "done": 0}
    first, second = status["gpus"]
    assert (first["shard"], first["shard_range"], first["node"]) == (0, [0, 4], "n1aaaaaa")
    assert first["temperature"] == 61.0 and first["state"] == "running"
    assert second["state"] == "placing" and second["shard"] is None
    # The driver's stop rides on the answer to a node's report; a fenced node learns it.
    j.request_stop("stopped")
    assert j.report(0, a.attempt, {}) == "stopped"
    assert j.report(0, a.attempt - 1, {}) == "fenced"
    j.close()


def test_a_done_shard_is_never_begun_again_even_after_a_driver_restart(run):
    j = open_journal(run)
    t = j.begin(2, "n1")
    j.append(2, t.attempt, RecordType.EPOCH, epoch(t))
    j.append(2, t.attempt, RecordType.CKPT_REF, ckpt(t, 1, 2), state(2))
    done = journal.Event(journal.EventKind.SHARD_DONE, "shard 2 done", epoch=t.epoch_base + 1,
                         fields={"shard": 2, "range": [8, 10], "ckpt_seq": 1})
    assert j.append(2, t.attempt, RecordType.EVENT, journal.payload_of(done, time.time()))[1] \
        is None
    # The node finished it, then Ray lost the node before its call returned: the driver
    # asks for a new attempt, and gets none.
    assert j.begin(2, "n2") is None
    j.close()
    j = open_journal(run)
    assert j.snapshot()["shards"][2]["done"] and j.begin(2, "n2") is None
    assigned = [journal.read(r) for r in read_records(run.wal_dir)
                if r.type is RecordType.EVENT and r.payload["kind"] == "assigned"]
    assert len(assigned) == 1
    j.close()


def test_a_journal_whose_wal_failed_refuses_everything_after(run):
    j = open_journal(run)
    t = j.begin(0, "n1")
    assert j.append(0, t.attempt, RecordType.EPOCH, epoch(t))[1] is None
    j.wal.close()  # the log stops taking records (as after a failed fsync)
    seq, why = j.append(0, t.attempt, RecordType.CKPT_REF, ckpt(t, 1, 2), state(2))
    assert seq is None and "could not be written" in why
    assert j.snapshot()["failed"] == why  # the driver's next look gives the run up
    with pytest.raises(WalError, match="could not be written"):
        j.begin(1, "n2")
    with pytest.raises(WalError, match="could not be written"):
        j.record(journal.Event.gave_up("the journal failed"))
    assert j.append(0, t.attempt, RecordType.EPOCH, epoch(t, 2))[1] == why
    j.close()
    assert [r.payload["epoch"] for r in read_records(run.wal_dir)
            if r.type is RecordType.EPOCH] == [t.epoch_base + 1]


def test_a_local_start_waits_for_the_previous_wal_writer_to_let_go(tmp_path):
    first = SupervisedRun(tmp_path, "w1", ["max_dimension=2000000", "unit_dims=100000"])
    first.start()
    assert first.wait(120) == 0, first.err
    before = [r.seq for r in first.records()]
    opened = len(first.events("wal.recovered"))
    # What a killed Ray driver leaves for a moment: its journal actor, holding the WAL.
    held = os.open(first.path / "journal.lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    again = SupervisedRun(tmp_path, "w1", ["max_dimension=2000000", "unit_dims=100000"])
    try:
        again.start()
        wait_for(lambda: again.events("wal.lock_wait"), 60, "the start to wait for the lock")
        time.sleep(0.5)
        assert again.proc is not None and again.proc.poll() is None  # it waits...
        assert len(again.events("wal.recovered")) == opened  # ...before it opens the WAL
    finally:
        os.close(held)
    assert again.wait(60) == 0, again.err
    assert [r.seq for r in again.records()] == before  # it found the run done: no record
