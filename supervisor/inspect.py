"""Reading a run without supervising it: its state, status, checkpoints and WAL check.

Used by ``status``, ``runs``, ``checkpoints``, ``verify`` and by ``start`` to decide what
to resume. Nothing here writes: the WAL is only read (never repaired), so these commands
are safe while a supervisor runs and after a power cut alike.

A run's state on disk: ``completed`` (a result or a ``done`` record), ``stopped`` (the last
record is an operator ``stop``), ``gave_up``, ``interrupted`` (it was running when the
machine went down or the supervisor was killed), ``new`` (never ran a worker), or
``running`` (a supervisor holds its lock).
"""

from __future__ import annotations

from typing import Any

from nkat.protocol.wal import RecordType, WalError, verify
from nkat.protocol.wal.readonly import read_records
from nkat.supervisor import control
from nkat.supervisor.rundir import RunDir


def run_state_from_disk(run: RunDir) -> str:
    if run.result_file.exists():
        return "completed"
    if run.holder_pid():
        return "running"
    last = _last_record(run)
    if last is None:
        return "new"
    rtype, payload = last
    if rtype is RecordType.DONE:
        return "completed"
    if rtype is RecordType.STOP:
        return "stopped"
    if rtype is RecordType.EVENT and payload.get("kind") == "gave_up":
        return "gave_up"
    if rtype is RecordType.EPOCH or rtype is RecordType.CKPT or rtype is RecordType.CKPT_REF \
            or rtype is RecordType.EVENT:
        return "interrupted"
    return "new"


def _last_record(run: RunDir) -> tuple[RecordType, dict[str, Any]] | None:
    last = None
    try:
        for record in read_records(run.wal_dir):
            if record.type not in (RecordType.RUN, RecordType.SEAL):
                last = (record.type, record.payload)
    except (WalError, OSError):
        pass  # a damaged tail: judge by what could be read
    return last


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
    report = verify(run.wal_dir, run.blob_dir)
    return [{"ckpt_seq": c.ckpt_seq, "epoch": c.epoch, "units_done": c.units_done,
             "t_wall": c.t_wall, "size": c.size, "inline": c.inline, "digest": c.digest,
             "verified": True} for c in report.checkpoints]


def list_checkpoints(run: RunDir) -> list[dict[str, Any]]:
    """Retained checkpoints whose state verified (seq, epoch, units, time, size)."""
    return _checkpoints(run)


def verify_run(run: RunDir) -> dict[str, Any]:
    report = verify(run.wal_dir, run.blob_dir)
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
