"""A Ray node's log: the shell's appends go to the driver's journal and count as durable
only once the journal says they are.

    log = RemoteLog(ray, journal_handle, task, lease_s=15.0)
    Shell(scratch_run, log, ...)      # the node's shell, unchanged: append, then ack

Each call waits at most ``lease_s`` for the journal. No answer raises JournalUnreachable,
a refusal of the record (a newer attempt owns the shard) JournalRefusedRecord, a failure of
the driver's WAL itself JournalWalFailed: WalErrors with their own advice. The node's
controller then stops its worker as it would on a failing disk, so a node cut off from its
driver does not compute on. A node's clean stop and its giving up
are its own affair (the driver records the run's, and moves the shard), so ``stop`` and
``gave_up`` records are kept here, not sent.
"""

from __future__ import annotations

import time
from typing import Any

from nkat.supervisor.cluster.journal import WAL_FAILED, ShardTask
from nkat.supervisor.journal import EventKind
from nkat.supervisor.wal import Checkpoint, RecordType, WalError


class JournalUnreachable(WalError):
    """The driver's journal did not answer within the lease, or is gone."""

    advice = ("the driver resumes the shard on another node from its last durable "
              "checkpoint; if the driver is gone, start the run again")


class JournalRefusedRecord(WalError):
    """The driver's journal refused the record: another attempt owns the shard now (or
    the record was malformed)."""

    advice = ("nothing to do here: the driver resumes the shard from its last durable "
              "checkpoint (see the driver's log)")


class JournalWalFailed(WalError):
    """The driver's WAL could not take the record: the driver gives the run up."""

    advice = "fix the driver's disk (see the driver's log), then start the run again"


class RemoteLog:
    """``journal.RunLog`` for a node agent (see the module docstring)."""

    def __init__(self, ray: Any, journal: Any, task: ShardTask, lease_s: float) -> None:
        self.ray, self.journal, self.task, self.lease_s = ray, journal, task, lease_s
        self.local_seq = 0
        #: Round trips of the appends the journal acknowledged, in seconds.
        self.round_trips: list[float] = []

    def append(self, rtype: RecordType, payload: dict[str, Any]) -> int:
        if rtype is RecordType.STOP or (rtype is RecordType.EVENT
                                        and payload.get("kind") == EventKind.GAVE_UP):
            self.local_seq += 1
            return self.local_seq
        return self._call(self.journal.append.remote(
            self.task.shard, self.task.attempt, int(rtype), payload))

    def append_checkpoint(self, payload: dict[str, Any], state: bytes) -> int:
        return self._call(self.journal.append.remote(
            self.task.shard, self.task.attempt, int(RecordType.CKPT_REF), payload, state))

    def latest_checkpoint(self, shard: int = 0) -> Checkpoint | None:
        if shard != self.task.shard:
            raise WalError(f"this node computes shard {self.task.shard}, not {shard}")
        found, refused = self._get(self.journal.latest.remote(self.task.shard,
                                                              self.task.attempt))
        if refused is not None:
            raise _refusal(f"the driver's journal refused: {refused}", refused)
        if found is None:
            return None
        ckpt_seq, units_done, state = found
        return Checkpoint(0, ckpt_seq, 0, units_done, "", 0.0, state, shard)

    def _call(self, ref: Any) -> int:
        started = time.perf_counter()
        seq, refused = self._get(ref)
        if refused is not None:
            raise _refusal(f"the driver's journal refused the record: {refused}", refused)
        self.round_trips.append(time.perf_counter() - started)
        return int(seq)

    def _get(self, ref: Any) -> Any:
        from ray.exceptions import GetTimeoutError, RayError

        try:
            return self.ray.get(ref, timeout=self.lease_s)
        except GetTimeoutError:
            raise JournalUnreachable(f"the driver's journal did not answer in "
                                     f"{self.lease_s:g} s (ray_lease): this node stops "
                                     "computing") from None
        except RayError as exc:
            raise JournalUnreachable(f"the driver's journal is gone: "
                                     f"{type(exc).__name__}") from None


def _refusal(message: str, refused: str) -> WalError:
    if refused.startswith(WAL_FAILED):
        return JournalWalFailed(message)
    return JournalRefusedRecord(message)
