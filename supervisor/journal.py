"""The supervisor's records in a run's WAL, as types (the wire has ``protocol/messages.py``).

The WAL (``nkat.supervisor.wal``) stores msgpack maps under a record type; this module is
the one place that knows what those maps hold. Every record is written through
:func:`write`, which stamps the injected wall time, and read back through :func:`read`,
which returns the same types (old logs included: see :func:`read`).

    seq = write(wal, Event.gave_up("crash loop: ..."), wall=time.time)
    for record in wal.records():
        entry = read(record)            # Epoch | CheckpointMeta | Event | Done | Stop | ...
        if isinstance(entry, Event) and entry.kind is EventKind.GAVE_UP: ...

Event kinds (docs/architecture.md lists the same):

- ``kill``: the supervisor began ending a worker (``reason``: the kill reason).
- ``kill_failed``: a worker outlived SIGKILL or kept its GPU context; the run gave up.
- ``restart_scheduled``: a worker exited and another starts after ``delay_s``.
- ``xid_restart``: an Xid that needs a new worker (the device memory is suspect).
- ``gpu_reset``: an Xid or a lost GPU that needs a reset or a reboot.
- ``thermal_stop``, ``thermal_kill``: the thermal ladder stopped or killed the worker.
- ``leak``: worker RSS grew too fast; a planned restart.
- ``gave_up``: the run gave up (exit 3, resumable).
- ``backend``: the array backend the run is pinned to (first start, or a switch).
- ``shard_done``: a shard of a sharded run is done (its final checkpoint is its state).
- ``retired``: one GPU's worker slot gave up, or a Ray node was lost; its shard went to
  the others.
- ``assigned``: the Ray engine gave a shard to a node agent (``attempt``: the shard's
  attempt number, which fences every earlier one; ``epoch_base``, ``epoch_limit``: the
  epochs that node may start, a block no other attempt shares).
- ``preempted``: the cloud announced the instance's end; the run was checkpointed.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from nkat.supervisor.wal import Checkpoint, Record, RecordType


class EventKind(enum.StrEnum):
    KILL = "kill"
    KILL_FAILED = "kill_failed"
    RESTART_SCHEDULED = "restart_scheduled"
    XID_RESTART = "xid_restart"
    GPU_RESET = "gpu_reset"
    THERMAL_STOP = "thermal_stop"
    THERMAL_KILL = "thermal_kill"
    LEAK = "leak"
    GAVE_UP = "gave_up"
    BACKEND = "backend"
    SHARD_DONE = "shard_done"
    RETIRED = "retired"
    ASSIGNED = "assigned"
    PREEMPTED = "preempted"


#: The kind old logs wrote for both a scheduled restart and an Xid restart.
_LEGACY_RESTART = "restart"


class SpawnReason(enum.StrEnum):
    """Why a worker incarnation (epoch) began."""

    START = "start"
    RESUME = "resume"
    RESTART = "restart"
    THERMAL_RESUME = "thermal_resume"


class Desired(enum.StrEnum):
    """What a ``stop`` record asks of the next boot."""

    STOPPED = "stopped"  # an operator's stop: stays stopped until started again
    RUNNING = "running"  # SIGTERM, a shutdown, a preemption: ``start --boot`` resumes it


@dataclasses.dataclass(frozen=True)
class Epoch:
    """A worker incarnation began."""

    TYPE: ClassVar[RecordType] = RecordType.EPOCH
    epoch: int
    reason: SpawnReason
    resume_ckpt_seq: int = 0
    worker: str | None = None  # the worker slot (several workers per run)
    shard: int | None = None  # the shard it computes (a sharded run)
    restarts: int = 0  # the run's restarts so far (``status``, ``report`` and the result)
    t_wall: float = 0.0


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """A durable checkpoint's metadata (its state travels beside it)."""

    TYPE: ClassVar[RecordType] = RecordType.CKPT
    ckpt_seq: int
    epoch: int
    units_done: int
    digest: str
    restarts: int = 0  # kept with every checkpoint: retention never drops the newest
    shard: int | None = None  # a sharded run's shard (None: the run is one piece)
    t_wall: float = 0.0


@dataclasses.dataclass(frozen=True)
class Event:
    """The durable audit trail: why a worker was ended, restarted, or the run gave up.

    ``reason`` says why in words; ``fields`` holds what a kind adds (``exit_class``,
    ``delay_s``, ``pid``, ``detail``, ``backend`` …), all plain msgpack values."""

    TYPE: ClassVar[RecordType] = RecordType.EVENT
    kind: EventKind
    reason: str = ""
    epoch: int | None = None
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    t_wall: float = 0.0

    @classmethod
    def gave_up(cls, reason: str) -> Event:
        return cls(EventKind.GAVE_UP, reason)


@dataclasses.dataclass(frozen=True)
class Done:
    """The final result is durable."""

    TYPE: ClassVar[RecordType] = RecordType.DONE
    result: Any
    digest: str
    t_wall: float = 0.0


@dataclasses.dataclass(frozen=True)
class Stop:
    """The run stopped cleanly; ``desired`` says whether a boot resumes it."""

    TYPE: ClassVar[RecordType] = RecordType.STOP
    reason: str
    desired: Desired
    ckpt_seq: int = 0
    t_wall: float = 0.0


@dataclasses.dataclass(frozen=True)
class RunHeader:
    """The run's identity, repeated at the start of every segment (written by the WAL)."""

    TYPE: ClassVar[RecordType] = RecordType.RUN
    run_id: str
    spec: dict[str, Any]
    spec_hash: str
    created: float | None = None


@dataclasses.dataclass(frozen=True)
class Unknown:
    """A record this version does not know (a seal, or a kind from a newer version)."""

    type: RecordType
    payload: dict[str, Any]


Entry = Epoch | CheckpointMeta | Event | Done | Stop | RunHeader | Unknown
Writable = Epoch | Event | Done | Stop


class Appender(Protocol):
    def append(self, rtype: RecordType, payload: dict[str, Any]) -> int: ...


class RunLog(Appender, Protocol):
    """What the shell needs of the log: appends, and each shard's newest checkpoint. The
    run's ``Wal``; on a Ray node, the driver's journal at the other end of the network."""

    def append_checkpoint(self, payload: dict[str, Any], state: bytes) -> int: ...

    def latest_checkpoint(self, shard: int = 0) -> Checkpoint | None: ...


def record_type(entry: Entry) -> RecordType:
    """The WAL record type an entry is stored under."""
    return entry.type if isinstance(entry, Unknown) else entry.TYPE


def describe(entry: Entry) -> str:
    """An entry in a few words, for the operator: "checkpoint 7 of epoch 2", "event kill"."""
    if isinstance(entry, CheckpointMeta):
        return f"checkpoint {entry.ckpt_seq} of epoch {entry.epoch}"
    if isinstance(entry, Epoch):
        return f"epoch {entry.epoch} began ({entry.reason.value})"
    if isinstance(entry, Event):
        return f"event {entry.kind.value}" + (f" of epoch {entry.epoch}" if entry.epoch else "")
    if isinstance(entry, Unknown):
        return f"record of type {entry.type.name.lower()}"
    return type(entry).__name__.lower()


def restarts_of(entry: Entry) -> int:
    """The restart count an entry carries (0 when it carries none)."""
    if isinstance(entry, Epoch | CheckpointMeta):
        return entry.restarts
    if isinstance(entry, Event):
        value = entry.fields.get("restarts", 0)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0
    return 0


def payload_of(entry: Writable | CheckpointMeta, t_wall: float) -> dict[str, Any]:
    """The msgpack map a record is stored as, stamped with ``t_wall``."""
    if isinstance(entry, Event):
        body: dict[str, Any] = {"kind": entry.kind.value, "reason": entry.reason,
                                **entry.fields}
        if entry.epoch is not None:
            body["epoch"] = entry.epoch
    else:
        body = {f.name: _plain(getattr(entry, f.name)) for f in dataclasses.fields(entry)
                if getattr(entry, f.name) is not None}
    body["t_wall"] = t_wall
    return body


def write(wal: Appender, entry: Writable, wall: Callable[[], float]) -> int:
    """Append ``entry`` (durable when this returns), stamped with ``wall()``; its seq."""
    return wal.append(entry.TYPE, payload_of(entry, wall()))


def read(record: Record) -> Entry:
    """The typed form of a stored record. Old logs read too: the ``restart`` kind that
    meant both a scheduled restart and an Xid restart becomes ``restart_scheduled`` when
    it carries an ``exit_class``, else ``xid_restart``. Anything unreadable is Unknown."""
    p = record.payload
    try:
        if record.type is RecordType.EPOCH:
            return Epoch(epoch=int(p["epoch"]), reason=SpawnReason(p.get("reason", "start")),
                         resume_ckpt_seq=int(p.get("resume_ckpt_seq", 0)),
                         worker=p.get("worker"), restarts=int(p.get("restarts", 0)),
                         shard=p.get("shard"),
                         t_wall=float(p.get("t_wall", 0.0)))
        if record.type in (RecordType.CKPT, RecordType.CKPT_REF):
            return CheckpointMeta(ckpt_seq=int(p["ckpt_seq"]), epoch=int(p["epoch"]),
                                  units_done=int(p["units_done"]), digest=str(p["digest"]),
                                  restarts=int(p.get("restarts", 0)),
                                  shard=p.get("shard"),
                                  t_wall=float(p.get("t_wall", 0.0)))
        if record.type is RecordType.EVENT:
            return _read_event(p)
        if record.type is RecordType.DONE:
            return Done(result=p["result"], digest=str(p["digest"]),
                        t_wall=float(p.get("t_wall", 0.0)))
        if record.type is RecordType.STOP:
            return Stop(reason=str(p.get("reason", "")), desired=Desired(p["desired"]),
                        ckpt_seq=int(p.get("ckpt_seq", 0)), t_wall=float(p.get("t_wall", 0.0)))
        if record.type is RecordType.RUN:
            created = p.get("created")
            return RunHeader(run_id=str(p["run_id"]), spec=dict(p["spec"]),
                             spec_hash=str(p["spec_hash"]),
                             created=float(created) if created is not None else None)
    except (KeyError, ValueError, TypeError):
        pass
    return Unknown(record.type, p)


_EVENT_KEYS = frozenset({"kind", "reason", "epoch", "t_wall"})


def _read_event(p: dict[str, Any]) -> Entry:
    kind = str(p.get("kind"))
    if kind == _LEGACY_RESTART:
        kind = EventKind.RESTART_SCHEDULED if "exit_class" in p else EventKind.XID_RESTART
    epoch = p.get("epoch")
    return Event(kind=EventKind(kind), reason=str(p.get("reason", "")),
                 epoch=epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
                 fields={k: v for k, v in p.items() if k not in _EVENT_KEYS},
                 t_wall=float(p.get("t_wall", 0.0)))


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value
