"""Reading a run without supervising it: its state, status, checkpoints and WAL check.

Used by ``status``, ``runs``, ``checkpoints``, ``verify`` and by ``start`` to decide what
to resume. The WAL is only read (never repaired), so these commands are safe while a
supervisor runs and after a power cut alike.

A run's state on disk: ``completed`` (a result or a ``done`` record), ``stopped`` (the last
record is a ``stop`` an operator asked for), ``gave_up``, ``interrupted`` (it was running
when the machine went down, was stopped by SIGTERM as at a shutdown, or its supervisor
was killed), ``new`` (never ran a worker), or ``running`` (a supervisor holds its lock).
Reading takes no lock and repairs nothing; only ``RunDir.open`` may create missing
subdirectories.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from nkat.protocol.wal import Record, RecordType, WalError
from nkat.protocol.wal.readonly import read_records, verify_settled
from nkat.supervisor import control
from nkat.supervisor.rundir import RunDir


@dataclasses.dataclass(frozen=True)
class History:
    """What a log says about its run, from one pass over its records."""

    state: str  # new | interrupted | stopped | gave_up | completed
    last: Record | None  # the last record that is not run or seal
    done: Record | None  # the done record, wherever it stands
    epoch: int  # the newest epoch any record names


def summarize(records: Iterable[Record]) -> History:
    """The run's state from its records. The epoch is taken from checkpoints and events
    too, not only ``epoch`` records: retention may have removed the segment holding the
    newest ``epoch`` record, and an epoch number must never be reused (fencing)."""
    last = done = None
    epoch = 0
    for rec in records:
        if rec.type in (RecordType.RUN, RecordType.SEAL):
            continue
        last = rec
        if rec.type is RecordType.DONE:
            done = rec
        value = rec.payload.get("epoch")
        if isinstance(value, int) and not isinstance(value, bool):
            epoch = max(epoch, value)
    if done is not None:
        state = "completed"  # events may follow done (a lingering kill): still complete
    elif last is None:
        state = "new"
    elif last.type is RecordType.STOP:
        state = "stopped" if last.payload.get("desired") == "stopped" else "interrupted"
    elif last.type is RecordType.EVENT and last.payload.get("kind") == "gave_up":
        state = "gave_up"
    else:
        state = "interrupted"
    return History(state, last, done, epoch)


def run_state_from_disk(run: RunDir) -> str:
    """The run's state; ``interrupted`` is what ``start --boot`` resumes."""
    if run.result_file.exists():
        return "completed"
    if run.holder_pid():
        return "running"
    return summarize(_readable_records(run)).state


def _readable_records(run: RunDir) -> list[Record]:
    records: list[Record] = []
    try:
        records.extend(read_records(run.wal_dir))
    except (WalError, OSError):
        pass  # damage: judge by what could be read (verify names the problem)
    return records


def run_status(run: RunDir) -> dict[str, Any]:
    """Live status from the control socket when a supervisor is up, else from disk."""
    if run.holder_pid():
        try:
            reply = control.request(run.endpoint("control"), "status", timeout=2.0)
            if reply.get("ok"):
                return {**reply["status"], "source": "supervisor"}
        except control.ControlUnavailable:
            pass
    status = run.read_status() or {"run_id": run.run_id}
    status = {k: v for k, v in status.items() if k not in ("supervisor_pid", "worker_pid")}
    state = run_state_from_disk(run)
    checkpoints = _checkpoints(run)
    latest = checkpoints[-1] if checkpoints else None
    status.update({
        "run_id": run.run_id,
        "state": state,
        "source": "disk",
        "supervisor_pid": None,
        "worker_pid": None,
        "durable_ckpt_seq": latest["ckpt_seq"] if latest else 0,
        "durable_units": latest["units_done"] if latest else 0,
    })
    total = status.get("units_total")
    if isinstance(total, int) and total and latest:
        status["units_done"] = latest["units_done"]
        status["progress"] = latest["units_done"] / total
    if state == "completed":
        status["progress"] = 1.0
        if isinstance(total, int):
            status["units_done"] = total
    return status


def _checkpoints(run: RunDir) -> list[dict[str, Any]]:
    report = verify_settled(run.wal_dir, run.blob_dir)
    return [{"ckpt_seq": c.ckpt_seq, "epoch": c.epoch, "units_done": c.units_done,
             "t_wall": c.t_wall, "size": c.size, "inline": c.inline, "digest": c.digest,
             "verified": True} for c in report.checkpoints]


def list_checkpoints(run: RunDir) -> list[dict[str, Any]]:
    """Retained checkpoints whose state verified (seq, epoch, units, time, size)."""
    return _checkpoints(run)


def verify_run(run: RunDir) -> dict[str, Any]:
    report = verify_settled(run.wal_dir, run.blob_dir)
    problem = report.problem
    return {
        "run_id": run.run_id,
        "ok": report.ok,
        "segments": len(report.segments),
        "records": report.records,
        "checkpoints": len(report.checkpoints),
        "problem": None if problem is None else {
            "file": str(problem.segment), "offset": problem.offset, "reason": problem.reason},
        "notes": list(report.notes),
    }
