"""Reading a run without supervising it: its state, status, checkpoints and WAL check.

Used by ``status``, ``runs``, ``checkpoints``, ``verify`` and by ``start`` to decide what
to resume. The WAL is only read (never repaired), so these commands are safe while a
supervisor runs and after a power cut alike.

A run's state on disk: ``completed`` (a result or a ``done`` record), ``stopped`` (the last
record is a ``stop`` an operator asked for), ``gave_up``, ``interrupted`` (it was running
when the machine went down, was stopped by SIGTERM as at a shutdown, or its supervisor
was killed), ``new`` (never ran a worker), or ``running`` (a supervisor holds its lock).
Reading takes no lock and repairs nothing; only ``RunDir.open`` may create missing
subdirectories. The WAL reader is imported by the functions that read the WAL: ``status``
of a live run asks its supervisor and starts without it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from nkat.supervisor import control
from nkat.supervisor.ops.logview import read_log
from nkat.supervisor.rundir import RunDir

if TYPE_CHECKING:
    from nkat.supervisor import journal
    from nkat.supervisor.wal import Problem, Record


@dataclasses.dataclass(frozen=True)
class History:
    """What a log says about its run, from one pass over its records."""

    state: str  # new | interrupted | stopped | gave_up | completed
    last: journal.Entry | None  # the last record that is not run or seal
    done: journal.Done | None  # the done record, wherever it stands
    epoch: int  # the newest epoch any record names
    restarts: int  # the run's restarts so far, as its records count them


def summarize(records: Iterable[Record]) -> History:
    """The run's state from its records. The epoch is taken from checkpoints and events
    too, not only ``epoch`` records: retention may have removed the segment holding the
    newest ``epoch`` record, and an epoch number must never be reused (fencing). The
    restart count likewise rides on epochs, checkpoints and restart events."""
    from nkat.supervisor import journal
    from nkat.supervisor.wal import RecordType

    last: journal.Entry | None = None
    done: journal.Done | None = None
    epoch = restarts = 0
    for rec in records:
        if rec.type in (RecordType.RUN, RecordType.SEAL):
            continue
        entry = last = journal.read(rec)
        if isinstance(entry, journal.Done):
            done = entry
        value = getattr(entry, "epoch", None)
        if isinstance(value, int) and not isinstance(value, bool):
            epoch = max(epoch, value)
        restarts = max(restarts, journal.restarts_of(entry))
    if done is not None:
        state = "completed"  # events may follow done (a lingering kill): still complete
    elif last is None:
        state = "new"
    elif isinstance(last, journal.Stop):
        state = "stopped" if last.desired is journal.Desired.STOPPED else "interrupted"
    elif isinstance(last, journal.Event) and last.kind is journal.EventKind.GAVE_UP:
        state = "gave_up"
    else:
        state = "interrupted"
    return History(state, last, done, epoch, restarts)


def run_state_from_disk(run: RunDir, history: History | None = None) -> str:
    """The run's state; ``interrupted`` is what ``start --boot`` resumes. ``history``: the
    summary of its records, when the caller has read them already."""
    if run.read_result() is not None:
        return "completed"
    if run.holder_pid():
        return "running"
    return (history if history is not None else summarize(_readable_records(run))).state


def _readable_records(run: RunDir) -> list[Record]:
    from nkat.supervisor.wal import WalError
    from nkat.supervisor.wal.readonly import read_records

    records: list[Record] = []
    try:
        records.extend(read_records(run.wal_dir))
    except (WalError, OSError):
        pass  # damage: judge by what could be read (verify names the problem)
    return records


#: The keys of ``status --json`` (README, "JSON outputs"). Read from disk, every one is
#: there too: null where the disk does not tell (no status.json was ever written).
STATUS_KEYS = ("run_id", "state", "source", "epoch", "restarts", "progress", "units_done",
               "units_total", "units_per_s", "dims_per_s", "durable_ckpt_seq", "durable_units",
               "last_checkpoint_wall", "worker_pid", "supervisor_pid", "gpu", "protocol_errors",
               "foreign_dropped", "outcome", "shards", "gpus")


def run_status(run: RunDir) -> dict[str, Any]:
    """Live status from the control socket when a supervisor is up, else from disk."""
    if run.holder_pid():
        try:
            reply = control.request(run.endpoint("control"), "status", timeout=2.0)
            if reply.get("ok"):
                return {**reply["status"], "source": "supervisor"}
        except control.ControlUnavailable:
            pass
    return _disk_status(run)


def _disk_status(run: RunDir) -> dict[str, Any]:
    """The last status.json, corrected by what is durable: the state, the checkpoints."""
    stored = run.read_status() or {}
    status: dict[str, Any] = dict.fromkeys(STATUS_KEYS)
    # What was live is not now: no pids, no per-GPU worker rows.
    status.update((k, v) for k, v in stored.items()
                  if k not in ("supervisor_pid", "worker_pid", "gpus"))
    history = summarize(_readable_records(run))
    state = run_state_from_disk(run, history)
    checkpoints = _checkpoints(run)
    latest = checkpoints[-1] if checkpoints else None
    status.update({
        "run_id": run.run_id,
        "state": state,
        "source": "disk",
        "durable_ckpt_seq": latest["ckpt_seq"] if latest else 0,
        "durable_units": latest["units_done"] if latest else 0,
    })
    if latest:
        status["last_checkpoint_wall"] = latest["t_wall"]
    if "epoch" not in stored:  # status.json lost or never written: the WAL knows
        status["epoch"] = history.epoch
    # The WAL counts restarts across supervisors; status.json may predate the last ones.
    status["restarts"] = max(history.restarts, _count(stored.get("restarts")))
    if state == "completed":
        _show_completed(run, status)
        return status
    if run.info.shards:  # a sharded run: what is durable of every shard
        newest: dict[int, int] = {int(c["shard"]): int(c["units_done"]) for c in checkpoints}
        units_done = sum(min(newest.get(k, 0), stop - first)
                         for k, (first, stop) in enumerate(run.info.shards))
        units_total = run.info.shards[-1][1]
        finished = sum(1 for k, (first, stop) in enumerate(run.info.shards)
                       if newest.get(k, 0) >= stop - first)
        status.update(units_done=units_done, units_total=units_total,
                      progress=units_done / units_total, durable_units=units_done,
                      shards={"total": len(run.info.shards), "done": finished},
                      gpus=None)  # per-GPU rows only while a supervisor runs them
        return status
    total = status.get("units_total")
    if isinstance(total, int) and total and latest:
        status["units_done"] = latest["units_done"]
        status["progress"] = latest["units_done"] / total
    return status


def _show_completed(run: RunDir, status: dict[str, Any]) -> None:
    """A completed run did all its units. status.json may not say how many: a run done
    before a beat carried the count (a first beat comes before the job is set up and says
    0) leaves 0 or nothing there, and no checkpoint either. The worker's
    ``worker.started`` event in the run's log names the count it ran."""
    total = status.get("units_total")
    if not _is_count(total) or not total:
        total = _logged_units_total(run)
    status.update({"units_total": total, "units_done": total, "progress": 1.0,
                   "outcome": "completed"})


def _logged_units_total(run: RunDir) -> int | None:
    """The unit count of the newest ``worker.started`` event (None without one)."""
    total: int | None = None
    try:
        for _line, record in read_log(run.log_file):
            value = record.get("units_total")
            if record.get("event") == "worker.started" and _is_count(value):
                total = value
    except OSError:
        pass  # an unreadable log: the count stays unknown, never a guess
    return total


def _count(value: Any) -> int:
    return value if _is_count(value) else 0


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checkpoints(run: RunDir) -> list[dict[str, Any]]:
    from nkat.supervisor.wal.readonly import verify_settled

    report = verify_settled(run.wal_dir, run.blob_dir)
    return [{"ckpt_seq": c.ckpt_seq, "epoch": c.epoch, "units_done": c.units_done,
             "t_wall": c.t_wall, "size": c.size, "inline": c.inline, "digest": c.digest,
             "verified": True, "shard": c.shard} for c in report.checkpoints]


def list_checkpoints(run: RunDir) -> list[dict[str, Any]]:
    """Retained checkpoints whose state verified (seq, epoch, units, time, size)."""
    return _checkpoints(run)


def verify_run(run: RunDir) -> dict[str, Any]:
    from nkat.supervisor.wal import RunIdentity
    from nkat.supervisor.wal.readonly import verify_settled

    report = verify_settled(run.wal_dir, run.blob_dir,
                            identity=RunIdentity(run.run_id, run.info.spec_hash))

    def shown(problem: Problem) -> dict[str, Any]:
        return {"file": str(problem.segment), "offset": problem.offset,
                "reason": problem.reason, "needed": problem.needed}

    return {
        "run_id": run.run_id,
        "ok": report.ok,
        "segments": len(report.segments),
        "records": report.records,
        "checkpoints": len(report.checkpoints),
        "problem": None if report.problem is None else shown(report.problem),
        "problems": [shown(p) for p in report.problems],
        "needs_salvage": report.needs_salvage,
        "notes": list(report.notes),
    }
