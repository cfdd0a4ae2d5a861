"""The Ray engine's journal: the run's WAL on the driver's machine, written for every node.

    journal = RunJournal(state_dir, run_id, created)   # Ray runs it as an actor there
    journal.open()                                      # waits for journal.lock, reads
    task = journal.begin(shard=3, node="a1b2c3d4")      # a new attempt: fences older ones
    seq, why = journal.append(3, task.attempt, RecordType.CKPT_REF, payload, state)
    result, why = journal.finish(provenance)             # every shard done: merge, done

One plain class, one writer: Ray runs it as an actor pinned to the driver's node, so a
record a node sends is acknowledged only once it is in this WAL, on this disk, and outlives
the node that made it. Each assignment of a shard is an *attempt*, journaled before the
node starts: a node whose attempt is no longer the shard's newest (Ray declared it lost
while it still ran, or its driver died) is refused, and stops its worker. Each attempt also
gets its own block of epochs, so epochs stay unique in the log although nodes start
workers at once. A journal opens only once the previous one let go of the WAL
(``journal.lock`` in the run directory): a killed driver's actor may outlive it briefly.
docs/architecture.md ("Many machines: the Ray engine") draws how the pieces talk.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nkat.protocol import messages as m
from nkat.supervisor import journal
from nkat.supervisor.journal import EventKind
from nkat.supervisor.ops.inspect import summarize
from nkat.supervisor.rundir import WAL_LOCK_WAIT_S, RunDir, RunDirError, RunLocked
from nkat.supervisor.spawn import merge_shards
from nkat.supervisor.wal import RecordType, Wal, WalError

#: Epochs each attempt may start: a node's restarts stay inside its block (more than
#: this many in one attempt, and the journal refuses it: the driver gives the shard anew).
EPOCH_BLOCK = 100
#: How a refusal begins when the WAL itself failed (not the node's record).
WAL_FAILED = "the write-ahead log could not be written"
#: How long a new journal waits for the previous one to let go of the WAL.
LOCK_WAIT_S = WAL_LOCK_WAIT_S
#: What a node may write: a node's stop is its own affair (the driver records the run's),
#: and its giving up is the driver's to judge (it moves the shard), so neither is here.
_NODE_EVENTS = frozenset(EventKind) - {EventKind.GAVE_UP, EventKind.ASSIGNED,
                                       EventKind.RETIRED, EventKind.PREEMPTED}


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One attempt at one shard, as a node agent gets it."""

    shard: int
    attempt: int
    span: tuple[int, int]
    #: The node's controller starts its epochs after ``epoch_base``, below ``epoch_limit``.
    epoch_base: int
    epoch_limit: int
    restarts: int
    backend: str
    backends: tuple[str, ...]
    #: Every shard's span: the node computes only ``shard``.
    spans: tuple[tuple[int, int], ...]
    #: The shard's newest durable checkpoint when the attempt began.
    ckpt_seq: int = 0
    units_done: int = 0


@dataclasses.dataclass
class ShardRecord:
    """What the journal knows of one shard."""

    span: tuple[int, int]
    ckpt_seq: int = 0
    units_done: int = 0
    t_wall: float | None = None
    done: bool = False
    attempt: int = 0
    epoch_base: int = 0  # the current attempt's epochs: (epoch_base, + EPOCH_BLOCK]
    node: str | None = None

    @property
    def size(self) -> int:
        return self.span[1] - self.span[0]


class Fenced(Exception):
    """A node wrote for an attempt that is no longer its shard's newest."""


class JournalRefused(Exception):
    """The journal cannot take the run (``locked``: another writer still holds its WAL).
    Plain arguments, so that it reaches the driver through Ray as itself."""

    def __init__(self, message: str, locked: bool = False) -> None:
        super().__init__(message, locked)
        self.message, self.locked = message, locked

    def __str__(self) -> str:
        return self.message


class RunJournal:
    """The run's one WAL writer for the Ray engine (see the module docstring)."""

    def __init__(self, state_dir: str, run_id: str, created: str, backend: str = "auto",
                 lock_wait_s: float = LOCK_WAIT_S,
                 wal_options: Mapping[str, int] | None = None) -> None:
        """``backend``: what workers are asked for (the run's pinned backend, or an
        operator's switch; ``auto`` until a worker resolves it). ``wal_options``: the
        driver's ``backup_checkpoints`` and ``segment_size`` (default: the run's stored
        config)."""
        self._where = (Path(state_dir), run_id, created)
        self._lock_wait_s, self._wal_options = lock_wait_s, dict(wal_options or {})
        self.backend = backend

    def open(self) -> None:
        """Take the WAL (waiting for a previous writer to let go) and read the run from it.
        A separate call, so that its refusal (RunLocked, RunDirError, WalError) reaches
        the driver as itself, not as an actor that died."""
        try:
            self._open()
        except RunLocked as exc:
            raise JournalRefused(str(exc), locked=True) from None
        except (RunDirError, WalError, OSError) as exc:
            raise JournalRefused(str(exc)) from None

    def _open(self) -> None:
        state_dir, run_id, created = self._where
        self.run = RunDir.open(state_dir, run_id)
        if self.run.info.created != created:  # same path, another machine's directory
            raise RunDirError(
                f"the run directory {self.run.path} on this node is not the driver's (created "
                f"{self.run.info.created}, not {created}): with ray:// the journal runs on the "
                "head node, so the state dir must be one both machines share")
        if not self.run.info.shards:
            raise RunDirError(f"run {run_id} has no shards: the Ray engine plans them first")
        self._lock = self.run.take_wal_lock(self._lock_wait_s)
        config = {**self.run.info.config, **self._wal_options}
        info = self.run.info
        try:
            self.wal = Wal.open(self.run.wal_dir, self.run.blob_dir, create=False,
                                run={"run_id": info.run_id, "spec": info.spec,
                                     "spec_hash": info.spec_hash, "created": info.created},
                                backup_checkpoints=int(config.get("backup_checkpoints", 3)),
                                segment_size=int(config.get("segment_size", 64 << 20)))
        except BaseException:
            self._lock.release()
            raise
        history = summarize(self.wal.records())
        self.restarts = history.restarts
        self.epoch = history.epoch  # the newest epoch a worker started with
        self.next_epoch = history.epoch + 1
        #: Workers started (epochs are numbered in blocks, one per attempt: not a count).
        self.started = sum(1 for r in self.wal.records() if r.type is RecordType.EPOCH)
        self.shards = [ShardRecord(span) for span in info.shards]
        for rec in self.wal.records():
            entry = journal.read(rec)
            if isinstance(entry, journal.Event) and entry.kind is EventKind.ASSIGNED:
                shard = self.shards[int(entry.fields["shard"])]
                if int(entry.fields["attempt"]) > shard.attempt:
                    shard.attempt = int(entry.fields["attempt"])
                    shard.epoch_base = int(entry.fields["epoch_base"])
                self.next_epoch = max(self.next_epoch, int(entry.fields["epoch_limit"]) + 1)
        for index, shard in enumerate(self.shards):
            latest = self.wal.checkpoints(shard=index)
            if latest:
                shard.ckpt_seq, shard.units_done = latest[-1].ckpt_seq, latest[-1].units_done
                shard.t_wall = latest[-1].t_wall
                shard.done = shard.units_done == shard.size
        self.backends = info.backends
        self.stop: str | None = None  # what the driver asked: stopped | running
        self.failed: str | None = None  # why the WAL takes no more records
        self.progress: dict[int, dict[str, Any]] = {}  # each shard's node's latest status

    # The driver's calls ---------------------------------------------------------------
    def begin(self, shard: int, node: str) -> ShardTask | None:
        """A new attempt at ``shard`` by ``node``: durably journaled before the node starts,
        so a later journal fences every older attempt too. None when the shard is done
        (its node finished it just before Ray lost the node)."""
        record = self.shards[shard]
        if record.done:
            return None
        record.attempt += 1
        record.node = node
        base = record.epoch_base = self.next_epoch - 1
        limit = base + EPOCH_BLOCK
        self.next_epoch = limit + 1
        self._write(journal.Event(EventKind.ASSIGNED, f"shard {shard} to node {node}",
                                  fields={"shard": shard, "attempt": record.attempt,
                                          "node": node, "epoch_base": base,
                                          "epoch_limit": limit}))
        self.progress.pop(shard, None)
        return ShardTask(shard, record.attempt, record.span, base, limit, self.restarts,
                         self.backend, self.backends,
                         tuple(s.span for s in self.shards), record.ckpt_seq,
                         record.units_done)

    def record(self, entry: journal.Event | journal.Stop) -> int:
        """The driver's own record (a node lost, a stop, giving up)."""
        return self._write(entry)

    def request_stop(self, desired: str) -> None:
        """Nodes learn it with their next progress report and stop with a checkpoint."""
        self.stop = self.stop or desired

    def snapshot(self) -> dict[str, Any]:
        return {"shards": [dataclasses.asdict(s) for s in self.shards],
                "progress": dict(self.progress), "restarts": self.restarts,
                "epoch": self.epoch, "workers_started": self.started,
                "backends": list(self.backends),
                "durable_ckpt_seq": max(s.ckpt_seq for s in self.shards),
                "failed": self.failed}

    def finish(self, provenance: Mapping[str, Any]) -> tuple[Any, str | None]:
        """Every shard done: merge their states as the job does, record ``done`` and write
        the result; (the result, None) or (None, why not)."""
        missing = [k for k, s in enumerate(self.shards) if not s.done]
        if missing:
            return None, f"shards {missing} are not done"
        result, error = merge_shards(self.wal, self.run, list(enumerate(
            s.span for s in self.shards)), {**provenance, "backends": list(self.backends)})
        if error is not None:
            return None, error
        self._write(journal.Done(result=result, digest=m.result_digest(result)))
        self.run.write_result(result)
        return result, None

    def close(self) -> None:
        self.wal.close()
        self._lock.release()

    # The nodes' calls -----------------------------------------------------------------
    def append(self, shard: int, attempt: int, rtype: int, payload: dict[str, Any],
               state: bytes | None = None) -> tuple[int | None, str | None]:
        """A node's record, made durable: (its seq, None), or (None, why it was refused:
        the node must stop its worker)."""
        if self.failed is not None:
            return None, self.failed
        try:
            self._check(shard, attempt, RecordType(rtype), payload)
        except Fenced as exc:
            return None, str(exc)
        except (ValueError, KeyError, TypeError) as exc:
            return None, f"a malformed record: {exc}"
        record = self.shards[shard]
        if RecordType(rtype) in (RecordType.EPOCH, RecordType.CKPT, RecordType.CKPT_REF):
            payload = {**payload, "restarts": self.restarts}  # the run's count, not a node's
        if RecordType(rtype) is RecordType.EVENT:
            kind = EventKind(payload["kind"])
            if kind is EventKind.RESTART_SCHEDULED:
                self.restarts += 1
                payload = {**payload, "restarts": self.restarts}
            elif kind is EventKind.BACKEND:
                self.run.pin_backend(str(payload["backend"]))
                self.backends, self.backend = self.run.info.backends, str(payload["backend"])
        if RecordType(rtype) is RecordType.EPOCH:
            self.epoch, self.started = max(self.epoch, int(payload["epoch"])), self.started + 1
        try:
            if state is not None:
                seq = self.wal.append_checkpoint(payload, state)
                record.ckpt_seq, record.units_done = int(payload["ckpt_seq"]), \
                    int(payload["units_done"])
                record.t_wall = float(payload["t_wall"])
            else:
                seq = self.wal.append(RecordType(rtype), payload)
        except (ValueError, KeyError, TypeError) as exc:  # a malformed record: refused
            return None, f"a malformed record: {exc}"
        except (WalError, OSError) as exc:  # the driver's disk: the run gives up
            self.failed = f"{WAL_FAILED}: {exc}"
            return None, self.failed
        if RecordType(rtype) is RecordType.EVENT and payload["kind"] == EventKind.SHARD_DONE:
            record.done = True
        return seq, None

    def latest(self, shard: int, attempt: int) -> tuple[tuple[int, int, bytes] | None,
                                                      str | None]:
        """The shard's newest durable checkpoint, (ckpt_seq, units_done, state) or None;
        or (None, why) when the attempt is no longer the shard's."""
        if self.shards[shard].attempt != attempt:
            return None, f"shard {shard}: attempt {attempt} was superseded"
        latest = self.wal.latest_checkpoint(shard=shard)
        found = None if latest is None else (latest.ckpt_seq, latest.units_done, latest.state)
        return found, None

    def report(self, shard: int, attempt: int, status: Mapping[str, Any]) -> str | None:
        """A node's progress (not journaled); the answer is the driver's stop request, if
        any (or ``fenced`` when the attempt is no longer the shard's)."""
        if self.shards[shard].attempt != attempt:
            return "fenced"
        self.progress[shard] = {**status, "reported_wall": time.time()}
        return self.stop

    def _check(self, shard: int, attempt: int, rtype: RecordType,
               payload: Mapping[str, Any]) -> None:
        record = self.shards[shard]
        if attempt != record.attempt:
            raise Fenced(f"shard {shard}: attempt {attempt} was superseded by attempt "
                         f"{record.attempt}")
        if record.done:
            raise Fenced(f"shard {shard} is done")
        if rtype is RecordType.EPOCH:
            base = record.epoch_base
            if not base < int(payload["epoch"]) <= base + EPOCH_BLOCK:
                raise Fenced(f"shard {shard}: epoch {payload['epoch']} is outside the "
                             f"attempt's block ({base}, {base + EPOCH_BLOCK}]")
        if rtype in (RecordType.EPOCH, RecordType.CKPT, RecordType.CKPT_REF) \
                and payload.get("shard") != shard:
            raise Fenced(f"a record of shard {payload.get('shard')} sent as shard {shard}'s")
        if rtype in (RecordType.CKPT, RecordType.CKPT_REF) \
                and int(payload["ckpt_seq"]) != record.ckpt_seq + 1:
            raise Fenced(f"shard {shard}: checkpoint {payload['ckpt_seq']} does not follow "
                         f"the durable {record.ckpt_seq}")
        if rtype is RecordType.EVENT and payload.get("kind") not in _NODE_EVENTS:
            raise Fenced(f"a node may not write a {payload.get('kind')!r} event")
        if rtype not in (RecordType.EPOCH, RecordType.CKPT, RecordType.CKPT_REF,
                         RecordType.EVENT):
            raise Fenced(f"a node may not write a {rtype.name} record")

    def _write(self, entry: journal.Writable) -> int:
        """The driver's own records; a failed write fails the journal for the nodes too."""
        if self.failed is not None:
            raise WalError(self.failed)
        try:
            return journal.write(self.wal, entry, time.time)
        except (WalError, OSError) as exc:
            self.failed = f"{WAL_FAILED}: {exc}"
            raise WalError(self.failed) from exc

