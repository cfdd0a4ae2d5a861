"""The run controller: every decision of a supervised run, and no I/O.

The shell (``supervise.py``) turns what happens into typed inputs and carries out the
typed effects this returns; the policies (``policies/``) are called from here and from
nowhere else in the product. docs/architecture.md draws the whole shape.

    ctl = RunController(config, RunFacts(run_id, spec, epoch=0, durable=None), gpus, rng)
    effects = ctl.handle(Start(mono=0.0))
    effects = ctl.handle(WorkerSpawned("w0", epoch=1, pid=4242, token="…", mono=0.01))
    effects = ctl.handle(WorkerMessage(b"…", Hello(…), mono=0.3))   # -> LoadCheckpoint
    effects = ctl.handle(Tick(mono=1.0, wall=1.7e9, processes={"w0": ProcessView(None)}))

Inputs: :class:`Start`, :class:`Tick` (both clocks and what the shell saw of each worker
process), :class:`WorkerMessage` / :class:`MalformedMessage`, :class:`WorkerSpawned` /
:class:`SpawnFailed`, :class:`CheckpointLoaded`, :class:`ControlRequest`,
:class:`SignalReceived`, :class:`HealthReading`, :class:`Appended` (a WAL append's result).

Effects: :class:`Append` / :class:`AppendCheckpoint` (the shell answers with Appended,
carrying the effect's ``then``), :class:`Send`, :class:`SignalWorker`, :class:`Spawn`,
:class:`LoadCheckpoint`, :class:`ReleaseWorker`, :class:`Reply`, :class:`WriteStatus`,
:class:`WriteResult`, :class:`Publish`, :class:`Log`, :class:`Count`, :class:`QuietDisplay`,
:class:`Finish`. The shell performs effects in order; an effect that produces an input
(an append, a spawn, a checkpoint load) has that input handled at once and its effects
performed before the rest.

The run's state is one record, :class:`RunState`, with one :class:`WorkerSlot` per worker
(keyed by id; the command line runs one, ``w0``). Time comes only from inputs.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import hashlib
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from nkat.protocol import messages as m
from nkat.protocol.settings import Role
from nkat.supervisor.config import Config
from nkat.supervisor.exitcode import ExitCode
from nkat.supervisor.journal import (
    CheckpointMeta,
    Desired,
    Done,
    Epoch,
    Event,
    EventKind,
    SpawnReason,
    Stop,
)
from nkat.supervisor.notify import CrashLoopAlarm
from nkat.supervisor.policies.kill_sequence import Action, KillReason, KillSequence, KillSettings
from nkat.supervisor.policies.lifecycle import WorkerState, can_transition, check_transition
from nkat.supervisor.policies.resources import LeakWatch, MemoryWatch, PowerWatch, ResourceSettings
from nkat.supervisor.policies.restart_policy import (
    Decision,
    ExitClass,
    ExitInfo,
    RestartAction,
    RestartPolicy,
    RestartSettings,
)
from nkat.supervisor.policies.thermal import (
    ThermalActionKind,
    ThermalLadder,
    ThermalSettings,
)
from nkat.supervisor.policies.watchdog import Watchdog, WatchdogSettings
from nkat.supervisor.policies.xid import XidAction, classify_event, classify_gpu_lost

if TYPE_CHECKING:  # the sensor's value types only: the controller never reads a GPU
    from nkat.supervisor.gpu.sensor import Reading, Thresholds, XidEvent

#: The backends a run can be pinned to (a worker that has none says "none").
PINNABLE = ("numpy", "cupy")
#: How often status is written (s).
STATUS_EVERY_S = 1.0
#: The id of the one worker the command line runs.
SOLE_WORKER = "w0"
#: Beats kept per worker for the log of a kill.
LAST_BEATS = 5
#: Checkpoint ack latencies kept for the status's median.
ACK_WINDOW = 256
NKAT_JOB = "nkat-highdim"


# Inputs ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Start:
    """Begin: spawn the first worker."""

    mono: float


@dataclasses.dataclass(frozen=True)
class ProcessView:
    """What the shell saw of one worker's processes this turn.

    returncode: None while the leader runs, else as ``Popen.returncode``. how: the exit in
    words ("killed by SIGKILL"). group_alive: a process of its group is not yet gone (the
    leader included). gpu_holds: the GPU still lists its pid as holding a context."""

    returncode: int | None
    how: str = "running"
    group_alive: bool = True
    gpu_holds: bool = False


@dataclasses.dataclass(frozen=True)
class Tick:
    """A turn of the loop: the clocks, and each spawned worker's processes."""

    mono: float
    wall: float
    processes: Mapping[str, ProcessView] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class WorkerMessage:
    """A decoded message from the worker socket, with the routing id it came under."""

    routing_id: bytes
    msg: m.Message
    mono: float


@dataclasses.dataclass(frozen=True)
class MalformedMessage:
    """A frame on the worker socket that did not decode."""

    routing_id: bytes
    reason: str
    mono: float


@dataclasses.dataclass(frozen=True)
class WorkerSpawned:
    worker: str
    epoch: int
    pid: int
    token: str  # the epoch's secret: hello carries it, and it is the routing id
    mono: float


@dataclasses.dataclass(frozen=True)
class SpawnFailed:
    worker: str
    epoch: int
    error: str
    mono: float


@dataclasses.dataclass(frozen=True)
class CheckpointLoaded:
    """The newest durable checkpoint, read for a worker's welcome (or why it could not
    be read)."""

    worker: str
    epoch: int
    resume: m.Resume | None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class ControlRequest:
    """A decoded request on the control socket; ``ref`` is the shell's, echoed in Reply."""

    ref: Any
    op: str
    mono: float


class RunSignal(enum.StrEnum):
    TERM = "SIGTERM"
    INT = "SIGINT"
    HUP = "SIGHUP"


@dataclasses.dataclass(frozen=True)
class SignalReceived:
    signal: RunSignal
    mono: float


@dataclasses.dataclass(frozen=True)
class HealthReading:
    """One poll of one GPU: the reading, Xid events and sensor notes since the last poll,
    and the resident memory of each worker pid computing on it."""

    gpu: int
    reading: Reading
    events: Sequence[XidEvent] = ()
    notes: Sequence[str] = ()
    worker_rss: Mapping[int, int] = dataclasses.field(default_factory=dict)
    mono: float = 0.0


@dataclasses.dataclass(frozen=True)
class PreemptionNoticed:
    """The cloud announced this instance's end (``deadline_wall``: when, if it said;
    ``wall``: the wall clock as the shell fed it)."""

    cloud: str
    deadline_wall: float | None
    detail: str
    mono: float
    wall: float


@dataclasses.dataclass(frozen=True)
class ShardsMerged:
    """The shards' states merged into the run's result (or why they could not be)."""

    result: Any
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Appended:
    """A WAL append's result; ``then`` is the effect's, handed back."""

    then: Any
    ok: bool
    t_wall: float
    seconds: float = 0.0
    error: str | None = None
    advice: str | None = None


Input = (Start | Tick | WorkerMessage | MalformedMessage | WorkerSpawned | SpawnFailed
         | CheckpointLoaded | ControlRequest | SignalReceived | HealthReading | Appended
         | PreemptionNoticed | ShardsMerged)


# Effects -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Append:
    """Append a record (durable before the shell goes on); answer with Appended."""

    record: Epoch | Event | Done | Stop
    then: Any = None


@dataclasses.dataclass(frozen=True)
class AppendCheckpoint:
    meta: CheckpointMeta
    state: bytes
    then: Any = None


@dataclasses.dataclass(frozen=True)
class Send:
    worker: str
    msg: m.Message


class Sig(enum.StrEnum):
    DUMP = "SIGUSR1"  # to the worker's pid: faulthandler dumps every thread's stack
    TERM = "SIGTERM"  # to its process group
    KILL = "SIGKILL"  # to its process group


@dataclasses.dataclass(frozen=True)
class SignalWorker:
    worker: str
    signal: Sig


@dataclasses.dataclass(frozen=True)
class Spawn:
    """Start a worker process; answer with WorkerSpawned or SpawnFailed."""

    worker: str
    epoch: int
    backend: str
    job: str
    gpu_index: int


@dataclasses.dataclass(frozen=True)
class LoadCheckpoint:
    """Read the newest durable checkpoint (of ``shard``, in a sharded run); answer with
    CheckpointLoaded."""

    worker: str
    epoch: int
    shard: int | None = None


@dataclasses.dataclass(frozen=True)
class ReleaseWorker:
    """The worker is gone: read its output to the end and close its pipes."""

    worker: str


@dataclasses.dataclass(frozen=True)
class Reply:
    ref: Any
    reply: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class WriteStatus:
    status: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class WriteResult:
    result: Any


@dataclasses.dataclass(frozen=True)
class Publish:
    """A line for ``sock/events`` subscribers."""

    payload: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Log:
    level: str
    event: str
    fields: dict[str, Any]


class Metric(enum.StrEnum):
    BEAT = "beat"
    RESTART = "restart"  # label: the exit class, or "thermal"
    CHECKPOINT_ACKED = "checkpoint_acked"  # value: seconds
    PROTOCOL_ERROR = "protocol_error"


@dataclasses.dataclass(frozen=True)
class Count:
    metric: Metric
    value: float = 1.0
    label: str = ""


@dataclasses.dataclass(frozen=True)
class MergeShards:
    """Merge the final states of these shards (the newest checkpoint of each) into the
    run's result, as the job would; answer with ShardsMerged."""

    shards: tuple[tuple[int, tuple[int, int]], ...]  # (index, [first, stop))
    provenance: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class PinBackend:
    """Record in the run's own settings the backend it computes on from now on."""

    backend: str


@dataclasses.dataclass(frozen=True)
class Notify:
    """Tell someone far away (``notify_url``, ``notify_command``): one of the kinds of
    ``nkat.supervisor.notify.KINDS``; delivery never holds up the loop."""

    kind: str
    fields: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class QuietDisplay:
    """The terminal went away: stop the progress line."""


@dataclasses.dataclass(frozen=True)
class Finish:
    code: ExitCode
    outcome: str
    reason: str | None


Effect = (Append | AppendCheckpoint | Send | SignalWorker | Spawn | LoadCheckpoint
          | ReleaseWorker | Reply | WriteStatus | WriteResult | Publish | Log | Count
          | Notify | PinBackend | MergeShards | QuietDisplay | Finish)


# Continuations of appends (what to do once a record is durable) ---------------------------
@dataclasses.dataclass(frozen=True)
class _SpawnAfterEpoch:
    worker: str
    epoch: int


@dataclasses.dataclass(frozen=True)
class _CheckpointDurable:
    worker: str
    epoch: int
    ckpt_seq: int
    units_done: int
    size: int
    shard: int


@dataclasses.dataclass(frozen=True)
class _ShardDurable:
    worker: str
    epoch: int
    shard: int


@dataclasses.dataclass(frozen=True)
class _DoneDurable:
    worker: str | None  # None: a sharded run's merge, no worker waits for an ack
    epoch: int
    result: Any


@dataclasses.dataclass(frozen=True)
class _StopDurable:
    reason: str
    desired: Desired


# The run's state ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Durable:
    """The newest durable checkpoint."""

    ckpt_seq: int = 0
    units_done: int = 0
    t_wall: float | None = None


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """A shard of a sharded run as the shell found it: its unit range, its newest durable
    checkpoint, and whether it is done."""

    span: tuple[int, int]
    durable: Durable = Durable()
    done: bool = False


@dataclasses.dataclass(frozen=True)
class RunFacts:
    """What the shell knows of the run when the controller starts: its id and spec, the
    newest epoch its WAL names (never reused), its newest durable checkpoint, and how
    many restarts it has had."""

    run_id: str
    spec: Mapping[str, Any]
    epoch: int = 0
    durable: Durable = Durable()
    restarts: int = 0
    result_path: str = ""  # where the shell writes the result (named in run.completed)
    supervisor_pid: int | None = None
    supervisor_started_wall: float | None = None
    #: Every backend the run's workers have computed on, the newest last.
    backends: tuple[str, ...] = ()
    #: What new workers are asked for: the run's pinned backend, an operator's switch, or
    #: ``auto`` before the first worker resolved it (the run is then pinned to its pick).
    backend: str = "auto"
    #: A sharded run's shards (its unit range cut in pieces, several per GPU); empty: the
    #: run is one piece, computed whole by one worker at a time (``durable`` is its).
    shards: tuple[ShardPlan, ...] = ()
    #: False for a node of the Ray engine: its controller computes the shards it is given
    #: (the others arrive marked done) and ends, completed, once they are done; the
    #: driver, which owns the run, merges every shard's state into the result.
    merge_when_done: bool = True


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    """A GPU the sensor opened: its NVML index, where readings come from, its limits, and
    what it is called (``uuid``: how CUDA_VISIBLE_DEVICES names it, when known)."""

    index: int
    source: str
    thresholds: Thresholds
    name: str | None = None
    uuid: str | None = None


@dataclasses.dataclass(frozen=True)
class StopRequest:
    why: str
    desired: Desired
    deadline: float | None = None  # seconds the final checkpoint may take, if sooner


@dataclasses.dataclass(frozen=True)
class Outcome:
    kind: str  # completed | stopped | gave_up | kill_failed | wal_failed
    code: ExitCode
    reason: str | None


class HealthActionKind(enum.StrEnum):
    """What a GPU reading asks of the worker on that GPU."""

    THROTTLE = "throttle"
    FREE_MEMORY = "free_memory"
    THERMAL_STOP = "thermal_stop"
    THERMAL_KILL = "thermal_kill"
    XID_RESTART = "xid_restart"
    GPU_RESET = "gpu_reset"
    LEAK = "leak"


@dataclasses.dataclass(frozen=True)
class HealthAction:
    kind: HealthActionKind
    reason: str
    duty: float = 1.0


#: The durable event and the kill reason of each health action that ends a worker.
_HEALTH_KILL: Mapping[HealthActionKind, tuple[EventKind, KillReason]] = {
    HealthActionKind.THERMAL_STOP: (EventKind.THERMAL_STOP, KillReason.THERMAL_STOP),
    HealthActionKind.THERMAL_KILL: (EventKind.THERMAL_KILL, KillReason.THERMAL_EMERGENCY),
    HealthActionKind.XID_RESTART: (EventKind.XID_RESTART, KillReason.XID_RESTART),
    HealthActionKind.GPU_RESET: (EventKind.GPU_RESET, KillReason.GPU_RESET),
    HealthActionKind.LEAK: (EventKind.LEAK, KillReason.LEAK),
}

#: Which kill reason wins when a second one arrives during a kill: the exit is classified
#: by the gravest (a GPU needing a reset must not be restarted as a mere hang).
_SEVERITY: Mapping[KillReason, int] = {
    KillReason.GPU_RESET: 5, KillReason.WAL_FAILED: 4, KillReason.XID_RESTART: 3,
    KillReason.THERMAL_EMERGENCY: 2, KillReason.THERMAL_STOP: 1}

#: How a stop reads in ``worker.exited``, by what asked for it.
_STOP_WORDS = {"operator": "stopped by the operator",
               "signal SIGINT": "stopped by the operator (SIGINT)",
               "signal SIGTERM": "stopped by SIGTERM, as at a shutdown: start --boot resumes it"}

_LEVELS = frozenset({"debug", "info", "warning", "error", "critical"})
_RESERVED = frozenset({"event", "level", "ts", "run_id", "component", "epoch"})


@dataclasses.dataclass
class GpuState:
    """One GPU's policies and last reading."""

    info: GpuInfo
    ladder: ThermalLadder
    memory: MemoryWatch
    power: PowerWatch
    next_log: float = 0.0
    last: Reading | None = None
    lost_reported: bool = False
    leaks: dict[int, LeakWatch] = dataclasses.field(default_factory=dict)  # by worker pid

    def snapshot(self) -> dict[str, Any]:
        r = self.last
        return {
            "index": self.info.index,
            "source": self.info.source,
            "thermal_state": self.ladder.state.value,
            "duty": self.ladder.duty,
            "temperature": r.temperature if r else None,
            "memory_fraction": r.memory_fraction if r else None,
            "power_w": r.power_w if r else None,
            "utilization_pct": r.utilization_pct if r else None,
            "lost": r.lost if r else None,
        }


@dataclasses.dataclass
class ShardState:
    """One piece of the run: what is durable of it, whether it is done, and which worker
    slot computes it now (None: free for the next slot that asks)."""

    index: int
    span: tuple[int, int] | None  # None: the whole job (a run that is not sharded)
    durable: Durable
    done: bool = False
    owner: str | None = None

    @property
    def size(self) -> int | None:
        return None if self.span is None else self.span[1] - self.span[0]


@dataclasses.dataclass
class WorkerSlot:
    """One worker position: the incarnation in it now (epoch, pid) and its policies."""

    id: str
    gpu_index: int
    policy: RestartPolicy
    state: WorkerState = WorkerState.IDLE
    shard: int | None = None  # the shard it computes (or resumes after a restart)
    spawning: bool = False  # an epoch was begun; its process is being started
    epoch: int = 0
    pid: int | None = None
    token: str = ""
    spawn_reason: SpawnReason = SpawnReason.START
    backend: str | None = None  # what the worker's hello said it computes with
    device: str | None = None
    watchdog: Watchdog | None = None
    kill: KillSequence | None = None
    kill_reason: KillReason | None = None
    resume_at: float | None = None
    last_beat: m.Beat | None = None
    last_fail: m.Fail | None = None
    last_beats: collections.deque[dict[str, Any]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=LAST_BEATS))

    @property
    def routing_id(self) -> bytes:
        return self.token.encode()


@dataclasses.dataclass
class RunState:
    """Everything the controller knows, in one record."""

    run_id: str
    spec: Mapping[str, Any]
    workers: dict[str, WorkerSlot]
    gpus: dict[int, GpuState]
    epoch: int  # the newest epoch ever started (epochs are never reused)
    shards: list[ShardState]
    restarts: int = 0
    done_recorded: bool = False
    wal_failed: bool = False
    wal_error: str | None = None  # why the log stopped taking writes
    stop: StopRequest | None = None
    outcome: Outcome | None = None
    protocol_errors: int = 0
    foreign_dropped: int = 0
    crash_alarm: CrashLoopAlarm | None = None
    preempted: PreemptionNoticed | None = None
    backends: tuple[str, ...] = ()  # what workers have computed on, the newest last
    backend: str = "auto"  # what new workers are asked for
    started: bool = False
    merging: bool = False  # every shard is done: their states are being merged
    stop_recorded: bool = False
    mono: float = 0.0
    wall: float | None = None
    next_status: float = 0.0
    ack_seconds: collections.deque[float] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=ACK_WINDOW))


class RunController:
    """Decides everything for one run; see the module docstring for the contract."""

    def __init__(self, config: Config, facts: RunFacts,
                 gpus: Sequence[GpuInfo] = (), rng: random.Random | None = None,
                 slots: Sequence[tuple[str, int]] | None = None) -> None:
        """``slots``: (worker id, GPU index) of each worker position; by default one,
        ``w0``, on ``gpu_index``."""
        self.config = config
        self.facts = facts
        self._rng = rng or random.Random()
        self._watchdog_settings = WatchdogSettings.from_config(config)
        self._kill_settings = KillSettings.from_config(config)
        self._restart_settings = RestartSettings.from_config(config)
        resources = ResourceSettings.from_config(config)
        self._resources = resources
        thermal = ThermalSettings.from_config(config)
        if slots is None:
            slots = ((SOLE_WORKER, int(config["gpu_index"])),)
        shards = [ShardState(k, plan.span, plan.durable, plan.done)
                  for k, plan in enumerate(facts.shards)] or [
            ShardState(0, None, facts.durable)]
        self.run = RunState(
            run_id=facts.run_id, spec=facts.spec, epoch=facts.epoch, shards=shards,
            restarts=facts.restarts,
            gpus={g.index: GpuState(g, ThermalLadder(thermal, g.thresholds),
                                    MemoryWatch(resources), PowerWatch(resources))
                  for g in gpus},
            workers={wid: WorkerSlot(wid, gpu_index=gpu,
                                     policy=RestartPolicy(self._restart_settings, self._rng))
                     for wid, gpu in slots},
            crash_alarm=CrashLoopAlarm(window=self._restart_settings.restart_window),
            backends=facts.backends, backend=facts.backend)
        self._out: list[Effect] = []

    # The one entry point ------------------------------------------------------------------
    def handle(self, event: Input) -> list[Effect]:
        """The effects of one input, in the order the shell must perform them."""
        self._out = []
        mono = getattr(event, "mono", None)
        if isinstance(mono, float | int) and mono >= self.run.mono:
            self.run.mono = float(mono)
        if isinstance(event, Tick):
            self.run.wall = event.wall
            self._on_tick(event)
        elif isinstance(event, WorkerMessage):
            self._on_message(event)
        elif isinstance(event, MalformedMessage):
            self._protocol_error(event.reason, self._peer(event.routing_id))
        elif isinstance(event, Appended):
            self._on_appended(event)
        elif isinstance(event, ControlRequest):
            self._emit(Reply(event.ref, self._on_control(event.op)))
        elif isinstance(event, SignalReceived):
            self._on_signal(event.signal)
        elif isinstance(event, HealthReading):
            self._on_health(event)
        elif isinstance(event, WorkerSpawned):
            self._on_spawned(event)
        elif isinstance(event, SpawnFailed):
            self.run.workers[event.worker].spawning = False
            self._log("critical", "worker.spawn_failed", epoch=event.epoch, error=event.error)
            self._give_up(f"cannot start the worker: {event.error}")
        elif isinstance(event, CheckpointLoaded):
            self._on_checkpoint_loaded(event)
        elif isinstance(event, PreemptionNoticed):
            self._on_preemption(event)
        elif isinstance(event, ShardsMerged):
            self._on_merged(event)
        elif isinstance(event, Start):
            self.run.started = True
            for gpu in self.run.gpus.values():
                self._log("info", "gpu.opened", source=gpu.info.source, index=gpu.info.index,
                          limits=dataclasses.asdict(gpu.ladder.limits))
            first = SpawnReason.START if self.run.epoch == 0 else SpawnReason.RESUME
            for slot in self.run.workers.values():
                self._assign(slot, first)
            self._maybe_merge()
        return self._out

    @property
    def finished(self) -> bool:
        return self.run.outcome is not None

    # Effects helpers --------------------------------------------------------------------
    def _emit(self, effect: Effect) -> None:
        self._out.append(effect)

    def _log(self, level: str, event: str, **fields: Any) -> None:
        self._emit(Log(level, event, fields))

    def _send(self, slot: WorkerSlot, msg: m.Message) -> None:
        self._emit(Send(slot.id, msg))

    def _set_state(self, slot: WorkerSlot, new: WorkerState) -> None:
        check_transition(slot.state, new)
        slot.state = new

    def _finish(self, kind: str, code: ExitCode, reason: str | None = None) -> None:
        if self.run.outcome is None:
            self.run.outcome = Outcome(kind, code, reason)
            self._emit(WriteStatus(self.status()))
            self._emit(Finish(code, kind, reason))

    def _append(self, record: Epoch | Event | Done | Stop, then: Any = None) -> None:
        """Make ``record`` durable; nothing is appended once an append has failed."""
        if not self.run.wal_failed:
            self._emit(Append(record, then))

    # Ticks ----------------------------------------------------------------------------------
    def _on_tick(self, tick: Tick) -> None:
        if self.finished:
            return  # the shell ends the loop; whatever is left, it kills on the way out
        now = self.run.mono
        for slot in list(self.run.workers.values()):
            view = tick.processes.get(slot.id)
            if view is not None and slot.state.has_process:
                self._check_exit(slot, view, now)
            if slot.state in (WorkerState.STARTING, WorkerState.RUNNING, WorkerState.PAUSED):
                self._check_watchdog(slot, now)
            if view is not None and slot.kill is not None and slot.state.has_process:
                self._advance_kill(slot, now, view)
            self._maybe_restart(slot, now)
        if now >= self.run.next_status and not self.finished:
            self.run.next_status = now + STATUS_EVERY_S
            self._emit(WriteStatus(self.status()))

    # Worker messages --------------------------------------------------------------------
    def _slot_for(self, routing_id: bytes) -> WorkerSlot | None:
        for slot in self.run.workers.values():
            if slot.token and slot.state.has_process and slot.routing_id == routing_id:
                return slot
        return None

    def _peer(self, routing_id: bytes) -> str:
        """How the log names a peer: the worker slot, or a fingerprint (never the id)."""
        slot = self._slot_for(routing_id)
        if slot is not None:
            return f"{slot.id} (epoch {slot.epoch})"
        return "unknown peer " + hashlib.sha256(routing_id).hexdigest()[:12]

    def _on_message(self, event: WorkerMessage) -> None:
        msg, now = event.msg, self.run.mono
        slot = self._slot_for(event.routing_id)
        if slot is None or msg.epoch != slot.epoch:
            # Another incarnation, or a connection that never authenticated as this one.
            self.run.foreign_dropped += 1
            self._log("warning", "protocol.foreign_epoch", msg_type=msg.TYPE,
                      msg_epoch=msg.epoch, epoch=slot.epoch if slot else self.run.epoch,
                      peer=self._peer(event.routing_id))
            return
        if isinstance(msg, m.Hello):
            self._on_hello(slot, msg)
            return
        if slot.state is WorkerState.STARTING:
            self._protocol_error(f"{msg.TYPE} before hello", self._peer(event.routing_id))
            return
        assert slot.watchdog is not None
        slot.watchdog.on_message(now)
        if isinstance(msg, m.Beat):
            self._on_beat(slot, msg, now)
        elif isinstance(msg, m.Ckpt):
            self._on_ckpt(slot, msg)
        elif isinstance(msg, m.Done):
            self._on_done(slot, msg)
        elif isinstance(msg, m.Fail):
            slot.last_fail = msg
            self._log("error", "worker.failed", epoch=msg.epoch, kind=msg.kind, fatal=msg.fatal,
                      message=msg.message, traceback=msg.traceback)
        elif isinstance(msg, m.Log):
            level = msg.level if msg.level in _LEVELS else "info"
            fields = {k: v for k, v in msg.fields.items() if k not in _RESERVED}
            self._log(level, msg.event, component="worker", epoch=msg.epoch, **fields)
        elif isinstance(msg, m.Extend):
            slot.watchdog.on_extend(now, msg.seconds)
            self._log("info", "watchdog.extended", epoch=msg.epoch, seconds=msg.seconds,
                      reason=msg.reason)
        else:
            self._protocol_error(f"{msg.TYPE} is not a worker message", self._peer(
                event.routing_id))

    def _protocol_error(self, why: str, peer: str) -> None:
        self.run.protocol_errors += 1
        self._emit(Count(Metric.PROTOCOL_ERROR))
        self._log("warning", "protocol.error", reason=why, peer=peer,
                  count=self.run.protocol_errors)

    def _violation(self, slot: WorkerSlot, why: str) -> None:
        """The authenticated worker broke the protocol: nothing of it is stored, it is
        ended, and the restart policy counts it as a crash."""
        self._protocol_error(why, self._peer(slot.routing_id))
        self._begin_kill(slot, KillReason.PROTOCOL_VIOLATION, detail=why)

    def _on_hello(self, slot: WorkerSlot, msg: m.Hello) -> None:
        peer = self._peer(slot.routing_id)
        if msg.token != slot.token or msg.pid != slot.pid:
            self._protocol_error("hello with a wrong token or pid", peer)
            return
        if msg.proto != m.PROTOCOL_VERSION:
            self._protocol_error(f"worker speaks protocol {msg.proto}", peer)
            return
        if slot.state is not WorkerState.STARTING or slot.kill is not None:
            # A second hello, or one that arrives after we began ending this worker.
            self._protocol_error("hello out of turn", peer)
            return
        slot.backend, slot.device = msg.backend, msg.device
        self._emit(LoadCheckpoint(slot.id, slot.epoch, slot.shard if self.sharded else None))

    def _pin(self, slot: WorkerSlot) -> None:
        """A worker computes on a backend the run has not used last: the first worker
        resolving ``auto``, or an operator's switch. The run is pinned to it from now on,
        durably, and the result's provenance will list it."""
        backend = str(slot.backend)
        if backend not in PINNABLE or self.run.backends[-1:] == (backend,):
            return
        was = self.run.backends[-1] if self.run.backends else None
        self.run.backends = (*self.run.backends, backend)
        self.run.backend = backend
        why = f"switched from {was} to {backend}" if was else \
            f"backend {self.config['backend']} resolved to {backend} at the first start"
        self._append(Event(EventKind.BACKEND, why, epoch=slot.epoch,
                           fields={"backend": backend, "was": was}))
        self._emit(PinBackend(backend))
        self._log("info", "run.backend_pinned", backend=backend, was=was, epoch=slot.epoch)

    def _on_checkpoint_loaded(self, event: CheckpointLoaded) -> None:
        slot = self.run.workers[event.worker]
        if slot.epoch != event.epoch or slot.state is not WorkerState.STARTING:
            return
        if event.error is not None:
            self._log("critical", "wal.checkpoint_unreadable", error=event.error)
            self._begin_kill(slot, KillReason.WAL_FAILED)
            self._give_up(f"the newest checkpoint cannot be read ({event.error}); inspect it "
                          "with `nkat-supervise verify`, or start again with --salvage")
            return
        settings = self.config.role(Role.WORKER)
        settings.pop("backend", None)  # the worker learns its backend from its environment
        self._pin(slot)
        settings["provenance"] = {"epochs": slot.epoch, "restarts": self.run.restarts,
                                  "backends": list(self.run.backends)}
        span = self._shard(slot).span
        if span is not None:
            settings["unit_range"] = list(span)
        self._send(slot, m.Welcome(epoch=slot.epoch, run_id=self.run.run_id,
                                   spec=dict(self.run.spec), settings=settings,
                                   resume=event.resume))
        gpu = self.run.gpus.get(slot.gpu_index)
        if gpu is not None and gpu.ladder.duty < 1.0:
            # The GPU was already hot: the new worker starts at the ladder's duty.
            self._send(slot, m.Cmd(epoch=slot.epoch, op="throttle",
                                   args={"duty": gpu.ladder.duty}))
        self._set_state(slot, WorkerState.RUNNING)
        assert slot.watchdog is not None
        slot.watchdog.on_message(self.run.mono)
        self._log("info", "worker.welcomed", epoch=slot.epoch, backend=slot.backend,
                  device=slot.device,
                  resume_ckpt_seq=event.resume.ckpt_seq if event.resume else None)

    def _on_beat(self, slot: WorkerSlot, msg: m.Beat, now: float) -> None:
        batch_seconds = msg.metrics.get("batch_seconds")
        assert slot.watchdog is not None
        slot.watchdog.on_beat(now, msg.progress_seq, msg.stage,
                              batch_seconds if isinstance(batch_seconds, int | float)
                              and not isinstance(batch_seconds, bool) else None)
        slot.last_beat = msg
        self._emit(Count(Metric.BEAT))
        slot.last_beats.append({"seq": msg.seq, "progress_seq": msg.progress_seq,
                                "units_done": msg.units_done, "stage": msg.stage})
        if slot.state is WorkerState.RUNNING and msg.stage == "paused":
            self._set_state(slot, WorkerState.PAUSED)
        elif slot.state is WorkerState.PAUSED and msg.stage != "paused":
            self._set_state(slot, WorkerState.RUNNING)
        self._emit(Publish({"t": "beat", "units_done": msg.units_done,
                            "units_total": msg.units_total}))

    def _on_ckpt(self, slot: WorkerSlot, msg: m.Ckpt) -> None:
        if slot.kill_reason in (KillReason.GPU_RESET, KillReason.XID_RESTART):
            # After an Xid the device memory behind this state is suspect: never resume it.
            self._log("warning", "checkpoint.refused", epoch=msg.epoch, ckpt_seq=msg.ckpt_seq,
                      reason=slot.kill_reason.value)
            return
        shard = self._shard(slot)
        durable = shard.durable.ckpt_seq
        if msg.ckpt_seq == durable:
            self._send(slot, m.Ack(epoch=msg.epoch, ckpt_seq=msg.ckpt_seq))  # a resend
            return
        if msg.ckpt_seq != durable + 1:
            self._violation(slot, f"checkpoint {msg.ckpt_seq} does not follow the durable "
                                  f"checkpoint {durable}")
            return
        if m.state_digest(msg.state) != msg.digest:
            self._violation(slot, f"checkpoint {msg.ckpt_seq} digest mismatch")
            return
        if msg.units_done < shard.durable.units_done:
            self._violation(slot, f"checkpoint {msg.ckpt_seq} goes back from "
                                  f"{shard.durable.units_done} to {msg.units_done} units")
            return
        if shard.size is not None and msg.units_done > shard.size:
            self._violation(slot, f"checkpoint {msg.ckpt_seq} claims {msg.units_done} units "
                                  f"of a shard of {shard.size}")
            return
        meta = CheckpointMeta(ckpt_seq=msg.ckpt_seq, epoch=msg.epoch,
                              units_done=msg.units_done, digest=msg.digest,
                              restarts=self.run.restarts,
                              shard=shard.index if self.sharded else None)
        if not self.run.wal_failed:
            self._emit(AppendCheckpoint(meta, msg.state, _CheckpointDurable(
                slot.id, msg.epoch, msg.ckpt_seq, msg.units_done, len(msg.state),
                shard.index)))

    def _on_done(self, slot: WorkerSlot, msg: m.Done) -> None:
        if m.result_digest(msg.result) != msg.digest:
            self._violation(slot, "result digest mismatch")
            return
        shard = self._shard(slot)
        if self.sharded:
            self._on_shard_done(slot, shard, msg)
            return
        if self.run.done_recorded:
            self._send(slot, m.Ack(epoch=msg.epoch, ckpt_seq=m.DONE_ACK_SEQ))
            return
        self._append(Done(result=msg.result, digest=msg.digest),
                     _DoneDurable(slot.id, msg.epoch, msg.result))

    def _on_shard_done(self, slot: WorkerSlot, shard: ShardState, msg: m.Done) -> None:
        """A shard's worker finished its range: its final checkpoint (acked before it says
        done) is the shard's state. The run's result is made from every shard's."""
        assert shard.span is not None
        expected = {"shard": list(shard.span), "units_done": shard.size}
        if msg.result != expected or shard.durable.units_done != shard.size:
            self._violation(slot, f"done for shard {shard.index} {shard.span} without its "
                                  f"final checkpoint ({shard.durable.units_done} of "
                                  f"{shard.size} units durable)")
            return
        if shard.done:
            self._send(slot, m.Ack(epoch=msg.epoch, ckpt_seq=m.DONE_ACK_SEQ))
            return
        self._append(Event(EventKind.SHARD_DONE, f"shard {shard.index} done", epoch=slot.epoch,
                           fields={"shard": shard.index, "range": list(shard.span),
                                   "ckpt_seq": shard.durable.ckpt_seq}),
                     _ShardDurable(slot.id, msg.epoch, shard.index))

    # Appends ------------------------------------------------------------------------------
    def _on_appended(self, event: Appended) -> None:
        if not event.ok:
            self._wal_failed(event.error or "unknown error", event.advice)
            return
        then = event.then
        if isinstance(then, _SpawnAfterEpoch):
            slot = self.run.workers[then.worker]
            self._emit(Spawn(slot.id, then.epoch, self.run.backend,
                             str(self.run.spec["job"]), slot.gpu_index))
        elif isinstance(then, _CheckpointDurable):
            self.run.shards[then.shard].durable = Durable(then.ckpt_seq, then.units_done,
                                                          event.t_wall)
            self.run.ack_seconds.append(event.seconds)
            assert self.run.crash_alarm is not None
            self.run.crash_alarm.progressed()
            slot = self.run.workers[then.worker]
            if slot.epoch == then.epoch:
                slot.policy.on_durable_checkpoint(then.ckpt_seq)
            self._emit(Send(then.worker, m.Ack(epoch=then.epoch, ckpt_seq=then.ckpt_seq)))
            self._emit(Count(Metric.CHECKPOINT_ACKED, event.seconds))
            self._log("info", "checkpoint.durable", epoch=then.epoch, ckpt_seq=then.ckpt_seq,
                      units_done=then.units_done, bytes=then.size,
                      ack_ms=round(event.seconds * 1000, 3),
                      **({"shard": then.shard} if self.sharded else {}))
        elif isinstance(then, _DoneDurable):
            self.run.done_recorded = True
            self._emit(WriteResult(then.result))
            self._log("info", "run.completed", epoch=then.epoch, result=self.facts.result_path)
            self._emit(Notify("run.completed", {"result": self.facts.result_path,
                                                "epochs": then.epoch,
                                                "restarts": self.run.restarts}))
            if then.worker is not None:
                self._emit(Send(then.worker, m.Ack(epoch=then.epoch,
                                                   ckpt_seq=m.DONE_ACK_SEQ)))
            if self.sharded:  # no worker is left to exit: the merge completes the run
                for slot in self.run.workers.values():
                    if can_transition(slot.state, WorkerState.COMPLETED):
                        self._set_state(slot, WorkerState.COMPLETED)
                self._finish("completed", ExitCode.COMPLETED)
        elif isinstance(then, _ShardDurable):
            shard = self.run.shards[then.shard]
            shard.done = True
            done = sum(1 for s in self.run.shards if s.done)
            self._log("info", "shard.completed", shard=shard.index, range=list(shard.span or ()),
                      epoch=then.epoch, done=done, shards=len(self.run.shards))
            self._emit(Send(then.worker, m.Ack(epoch=then.epoch, ckpt_seq=m.DONE_ACK_SEQ)))
        elif isinstance(then, _StopDurable):
            self._log("info", "run.stopped", reason=then.reason, desired=then.desired.value,
                      ckpt_seq=self.durable_seq())
            for slot in self.run.workers.values():
                if can_transition(slot.state, WorkerState.STOPPED):
                    self._set_state(slot, WorkerState.STOPPED)
            self._finish("stopped", ExitCode.STOPPED)

    def _on_merged(self, event: ShardsMerged) -> None:
        if self.finished:
            return
        if event.error is not None:
            self._give_up(f"the shards' states could not be merged: {event.error}")
            return
        self._append(Done(result=event.result, digest=m.result_digest(event.result)),
                     _DoneDurable(None, self.run.epoch, event.result))

    def _wal_failed(self, error: str, advice: str | None) -> None:
        """Fail-stop: no ack, no retry, nothing more appended; every worker is ended and
        the run exits 3, resumable from what was durable before."""
        if self.run.wal_failed:
            return
        self.run.wal_failed = True
        self.run.wal_error = f"the write-ahead log could not be written: {error}"
        advice = advice or "free disk space or fix the device, then run start again"
        self._log("critical", "wal.write_failed", error=error, advice=advice)
        self._emit(Notify("wal.write_failed", {"error": error, "advice": advice}))
        alive = [s for s in self.run.workers.values() if s.state.has_process]
        for slot in alive:
            self._begin_kill(slot, KillReason.WAL_FAILED)
        if not alive:
            self._finish("wal_failed", ExitCode.GAVE_UP, self.run.wal_error)

    # Control requests -------------------------------------------------------------------
    def _on_control(self, op: str) -> dict[str, Any]:
        if op == "status":
            return {"ok": True, "status": self.status()}
        if op == "stop":
            self._request_stop("operator", Desired.STOPPED)
            return {"ok": True, "message": "stopping: final checkpoint, then exit"}
        live = [s for s in self.run.workers.values()
                if s.state in (WorkerState.RUNNING, WorkerState.PAUSED)]
        if not live:
            states = ", ".join(s.state.value for s in self.run.workers.values())
            return {"ok": False, "error": f"worker is {states}, cannot {op}"}
        for slot in live:
            self._send(slot, m.Cmd(epoch=slot.epoch, op=op))
            self._log("info", f"operator.{op}", epoch=slot.epoch)
        return {"ok": True, "message": f"{op} sent"}

    # Signals to the supervisor -----------------------------------------------------------
    def _on_signal(self, sig: RunSignal) -> None:
        if sig is RunSignal.HUP:
            # The terminal went away: go on without the progress line.
            self._log("info", "supervisor.sighup_ignored")
            self._emit(QuietDisplay())
            return
        if self.run.stop is not None and sig is RunSignal.INT:
            self._log("warning", "supervisor.stop_now", signal=sig.value)
            for slot in self.run.workers.values():
                self._begin_kill(slot, KillReason.OPERATOR_NOW)
            return
        # SIGTERM is also how a machine shuts down: a boot resumes the run.
        desired = Desired.RUNNING if sig is RunSignal.TERM else Desired.STOPPED
        self._request_stop(f"signal {sig.value}", desired)

    def _request_stop(self, why: str, desired: Desired, deadline: float | None = None) -> None:
        """Stop the run: each worker gets ``cmd stop`` (a final checkpoint), within
        ``stop_deadline`` or the ``deadline`` (s) if sooner, then the stop is recorded."""
        if self.run.stop is not None:
            return
        self.run.stop = StopRequest(why, desired, deadline)
        self._log("info", "run.stopping", reason=why, epoch=self.run.epoch)
        waiting = True
        for slot in self.run.workers.values():
            # The reason is a requested stop; the detail says who asked (an operator,
            # SIGTERM at a shutdown, a cloud's preemption notice).
            if slot.state in (WorkerState.RUNNING, WorkerState.PAUSED):
                self._begin_kill(slot, KillReason.OPERATOR, detail=why)
                waiting = False
            elif slot.state is WorkerState.STARTING:
                # Nothing to save before the handshake, and a worker not yet welcomed
                # cannot obey cmd stop: end it at once.
                self._begin_kill(slot, KillReason.OPERATOR_NOW, detail=why)
                waiting = False
            elif slot.state.has_process:
                waiting = False  # already being ended: its exit records the stop
        if waiting:
            self._stop_when_quiet()

    def _record_stop(self, why: str, desired: Desired) -> None:
        """The durable ``stop`` record. ``desired`` is "stopped" when an operator asked
        (``stop``, Ctrl-C): it stays stopped; "running" for SIGTERM, which is also how
        a machine shuts down, so ``start --boot`` resumes it after the reboot."""
        if self.run.wal_failed:
            self._finish("wal_failed", ExitCode.GAVE_UP, self.run.wal_error)
            return
        if self.run.stop_recorded:
            return
        self.run.stop_recorded = True
        self._append(Stop(reason=why, desired=desired, ckpt_seq=self.durable_seq()),
                     _StopDurable(why, desired))

    def _stop_when_quiet(self) -> None:
        """The stop is recorded once no worker process is left."""
        stop = self.run.stop
        if stop is not None and not any(s.state.has_process for s in self.run.workers.values()):
            self._record_stop(stop.why, stop.desired)

    def _on_preemption(self, event: PreemptionNoticed) -> None:
        """The instance is going away: a final checkpoint at once (a graceful stop, within
        the notice's deadline), then a stop record a boot resumes (``interrupted``)."""
        if self.run.preempted is not None:
            return
        self.run.preempted = event
        left = None if event.deadline_wall is None else event.deadline_wall - event.wall
        self._append(Event(EventKind.PREEMPTED, event.detail, fields={
            "cloud": event.cloud, "deadline_wall": event.deadline_wall}))
        self._log("warning", "run.preempted", cloud=event.cloud, detail=event.detail,
                  seconds_left=None if left is None else round(left, 1))
        self._request_stop(f"preemption notice from {event.cloud}", Desired.RUNNING,
                           deadline=left)

    # Spawning ---------------------------------------------------------------------------
    # Shards ----------------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        return self.run.shards[0].span is not None

    def _shard(self, slot: WorkerSlot) -> ShardState:
        return self.run.shards[slot.shard or 0]

    def _assign(self, slot: WorkerSlot, reason: SpawnReason | None = None) -> None:
        """Give ``slot`` the next shard no slot computes, and start a worker on it; with
        none left, the slot waits (IDLE) for one another slot lets go of."""
        if self.finished or self.run.stop is not None or slot.spawning:
            return
        free = [s for s in self.run.shards if not s.done and s.owner in (None, slot.id)]
        if not free:
            slot.shard = None
            if slot.state is not WorkerState.IDLE and can_transition(slot.state,
                                                                      WorkerState.IDLE):
                self._set_state(slot, WorkerState.IDLE)
            return
        # Its own shard first, then one with progress: nearer its end, its state warm.
        shard = max(free, key=lambda s: (s.owner == slot.id, s.durable.units_done, -s.index))
        shard.owner, slot.shard = slot.id, shard.index
        if reason is None:
            reason = SpawnReason.RESUME if shard.durable.ckpt_seq else SpawnReason.START
        self._start_worker(slot, reason)

    def _release(self, slot: WorkerSlot) -> None:
        """``slot`` stops computing its shard for now (heat, a retired GPU): another slot
        may take it. A crashed worker's slot keeps its shard: it restarts on it."""
        if slot.shard is not None and self.run.shards[slot.shard].owner == slot.id:
            self.run.shards[slot.shard].owner = None
        slot.shard = None

    def _maybe_merge(self) -> None:
        """Every shard of a sharded run done: merge their states into the result."""
        if self.sharded and not self.finished and not self.run.merging and \
                all(s.done for s in self.run.shards) and not self.run.done_recorded:
            if not self.facts.merge_when_done:  # a Ray node: the driver merges
                for slot in self.run.workers.values():
                    if can_transition(slot.state, WorkerState.COMPLETED):
                        self._set_state(slot, WorkerState.COMPLETED)
                self._finish("completed", ExitCode.COMPLETED)
                return
            self.run.merging = True
            self._log("info", "shards.merging", shards=len(self.run.shards))
            devices = sorted({s.device for s in self.run.workers.values() if s.device})
            self._emit(MergeShards(tuple((s.index, s.span) for s in self.run.shards
                                         if s.span is not None), {
                "epochs": self.run.epoch, "restarts": self.run.restarts,
                "backend": self.run.backends[-1] if self.run.backends else self.run.backend,
                "backends": list(self.run.backends), "device": ", ".join(devices)}))

    def _start_worker(self, slot: WorkerSlot, reason: SpawnReason) -> None:
        if self.run.wal_failed or self.finished:
            return
        self.run.epoch += 1
        slot.epoch = self.run.epoch
        slot.pid = None
        slot.token = ""
        self._append(Epoch(epoch=slot.epoch, reason=reason,
                           resume_ckpt_seq=self._shard(slot).durable.ckpt_seq,
                           worker=slot.id if len(self.run.workers) > 1 else None,
                           shard=slot.shard if self.sharded else None,
                           restarts=self.run.restarts),
                     _SpawnAfterEpoch(slot.id, slot.epoch))
        slot.spawn_reason = reason
        # Until WorkerSpawned the slot keeps its state: this turn must not start it twice.
        slot.spawning = True

    def _on_spawned(self, event: WorkerSpawned) -> None:
        slot = self.run.workers[event.worker]
        now = self.run.mono
        slot.pid, slot.token, slot.spawning = event.pid, event.token, False
        slot.watchdog = Watchdog(self._watchdog_settings, now)
        slot.policy.on_spawn(now, self._shard(slot).durable.ckpt_seq)
        slot.kill = None
        slot.kill_reason = None
        slot.last_fail = None
        slot.last_beat = None  # the dead worker's numbers must not show as this one's
        slot.last_beats.clear()
        self._set_state(slot, WorkerState.STARTING)
        self._log("info", "worker.spawned", epoch=event.epoch, pid=event.pid,
                  reason=slot.spawn_reason.value)

    def _maybe_restart(self, slot: WorkerSlot, now: float) -> None:
        if slot.spawning:
            return
        gpu = self.run.gpus.get(slot.gpu_index)
        may_run = gpu is None or gpu.ladder.may_run
        if slot.state is WorkerState.BACKOFF and not may_run:
            slot.resume_at = None  # too hot to start: wait for the ladder
            self._set_state(slot, WorkerState.COOLING)
        elif slot.state is WorkerState.BACKOFF and slot.resume_at is not None \
                and now >= slot.resume_at:
            slot.resume_at = None
            self._start_worker(slot, SpawnReason.RESTART)
        elif slot.state is WorkerState.COOLING and may_run:
            self._log("info", "worker.respawn_after_cooling", epoch=slot.epoch)
            self._emit(Count(Metric.RESTART, label="thermal"))
            self._assign(slot, SpawnReason.THERMAL_RESUME)
        elif slot.state is WorkerState.IDLE and may_run and self.run.started:
            self._assign(slot)  # a shard another slot let go of

    # Watchdog and kills --------------------------------------------------------------------
    def _check_watchdog(self, slot: WorkerSlot, now: float) -> None:
        assert slot.watchdog is not None
        verdict = slot.watchdog.check(now)
        if verdict is None:
            return
        budget = verdict.details.get("heartbeat_timeout") or verdict.details.get(
            "stall_seconds") or verdict.details.get("startup_timeout")
        self._log("error", f"watchdog.{verdict.kind}", epoch=slot.epoch, deadline_s=budget,
                  overdue_s=round(verdict.overdue_by, 3), details=verdict.details,
                  last_beats=list(slot.last_beats))
        self._begin_kill(slot, verdict.kill_reason, detail=str(verdict.details))

    def _begin_kill(self, slot: WorkerSlot, reason: KillReason, detail: str = "") -> None:
        """End the worker: the reason is made durable first, then the kill sequence runs
        (cmd stop, faulthandler dump, SIGTERM, SIGKILL — where it starts depends on why)."""
        if not slot.state.has_process:
            return
        if slot.kill is not None:
            current = _SEVERITY.get(slot.kill_reason, 0) if slot.kill_reason else 0
            if _SEVERITY.get(reason, 0) > current:
                slot.kill_reason = reason  # the exit is classified by the gravest reason
            if slot.kill.escalate(reason):
                self._log("warning", "worker.kill_escalated", epoch=slot.epoch,
                          reason=reason.value, detail=detail)
                self._advance_kill(slot, self.run.mono, None)
            return
        slot.kill_reason = reason
        slot.kill = KillSequence(self._kill_settings, reason)
        self._append(Event(EventKind.KILL, reason.value, epoch=slot.epoch,
                           fields={"detail": detail}))
        # An operator's stop is routine; every other reason is worth a warning.
        level = "info" if reason in (KillReason.OPERATOR, KillReason.OPERATOR_NOW) else "warning"
        self._log(level, "worker.killing", epoch=slot.epoch, reason=reason.value, detail=detail)
        self._advance_kill(slot, self.run.mono, None)

    def _advance_kill(self, slot: WorkerSlot, now: float, view: ProcessView | None) -> None:
        seq = slot.kill
        if seq is None or not slot.state.has_process:
            return
        left = self._left_behind(slot, view)
        action = seq.next_action(now, alive=left is not None)
        if action is Action.SEND_STOP:
            self._send(slot, m.Cmd(epoch=slot.epoch, op="stop",
                                   args={"deadline_s": self._stop_deadline()}))
        elif action is Action.SEND_DUMP:
            self._log("warning", "worker.dump_requested", epoch=slot.epoch, pid=slot.pid,
                      last_beats=list(slot.last_beats))
            self._emit(SignalWorker(slot.id, Sig.DUMP))
        elif action is Action.SEND_SIGTERM:
            self._log("warning", "worker.sigterm", epoch=slot.epoch, pid=slot.pid)
            self._emit(SignalWorker(slot.id, Sig.TERM))
        elif action is Action.SEND_SIGKILL:
            self._log("warning", "worker.sigkill", epoch=slot.epoch, pid=slot.pid)
            self._emit(SignalWorker(slot.id, Sig.KILL))
        elif action is Action.KILL_FAILED:
            self._kill_failed(slot, left or "")
            return
        if action in (Action.SEND_STOP, Action.WAIT) and not seq.signalled:
            target = WorkerState.STOPPING
        elif action is not Action.DONE:
            target = WorkerState.KILLING
        else:
            return
        if slot.state is not target and slot.state.has_process:
            self._set_state(slot, target)

    def _stop_deadline(self) -> float:
        """How long a worker has for its final checkpoint: ``stop_deadline``, or less when
        a stop came with a deadline of its own (a preemption notice), keeping a margin."""
        wanted = self._kill_settings.stop_deadline
        stop = self.run.stop
        if stop is not None and stop.deadline is not None:
            wanted = min(wanted, max(0.5, stop.deadline * 0.5))
        return wanted

    def _kill_failed(self, slot: WorkerSlot, left: str) -> None:
        confirm = self._kill_settings.kill_confirm
        reason = (f"worker pid {slot.pid} (epoch {slot.epoch}) is not gone {confirm:g} s "
                  f"after SIGKILL: {left}; nothing is started over it")
        self._log("critical", "worker.kill_failed", epoch=slot.epoch, pid=slot.pid,
                  reason=reason,
                  advice="a process survived SIGKILL or still holds the GPU (stuck in the "
                         "driver?); reboot or reset the GPU, then run start again")
        self._append(Event(EventKind.KILL_FAILED, reason, epoch=slot.epoch,
                           fields={"pid": slot.pid}))
        self._emit(Notify("worker.kill_failed", {"pid": slot.pid, "epoch": slot.epoch,
                                                 "reason": reason}))
        self._set_state(slot, WorkerState.KILL_FAILED)
        self._finish("kill_failed", ExitCode.GAVE_UP,
                     f"{reason}. Reset the GPU or reboot, then run start again")

    def _left_behind(self, slot: WorkerSlot, view: ProcessView | None) -> str | None:
        """What of the worker is not gone yet, in words; None once nothing is: the
        process, its group, or a GPU context still listed under its pid. Without a view
        this turn, the worker is taken to be alive."""
        if view is None or view.group_alive:
            if view is None or view.returncode is None:
                return "the process is still alive"
            return f"its process group {slot.pid} lives on"
        if view.gpu_holds:
            return f"the GPU still lists pid {slot.pid} as holding a context"
        return None

    def _check_exit(self, slot: WorkerSlot, view: ProcessView, now: float) -> None:
        if view.returncode is None:
            return
        if self.run.done_recorded and slot.kill is None and not view.group_alive:
            # The result is durable and no process is left: nothing will run over a GPU
            # context the driver keeps, so the run is complete; the operator is told.
            lingering = None
            if view.gpu_holds:
                self._log("warning", "worker.context_lingers", epoch=slot.epoch, pid=slot.pid,
                          detail=self._left_behind(slot, view),
                          advice="the result is durable; check nvidia-smi before the GPU's "
                                 "next job, and reset it if the pid stays")
        else:
            lingering = self._left_behind(slot, view)
        if lingering is not None:
            # The leader is gone but its group or GPU context is not: end them first,
            # never relaunch over them.
            self._begin_kill(slot, KillReason.LINGERING, detail=lingering)
            return
        if slot.kill is not None:
            self._advance_kill(slot, now, view)  # lets the sequence see the worker gone
        self._emit(ReleaseWorker(slot.id))
        if self.run.wal_failed:
            self._set_state(slot, WorkerState.EXITED)
            slot.kill = None
            if not any(s.state.has_process for s in self.run.workers.values()):
                self._finish("wal_failed", ExitCode.GAVE_UP, self.run.wal_error)
            return
        fail = slot.last_fail
        info = ExitInfo(returncode=view.returncode, killed_for=slot.kill_reason,
                        fatal=bool(fail and fail.fatal), fail_kind=fail.kind if fail else None,
                        completed=self._shard(slot).done if self.sharded
                        else self.run.done_recorded)
        decision = slot.policy.decide(now, info)
        reason = decision.reason
        if decision.exit_class is ExitClass.STOPPED and self.run.stop is not None:
            reason = _STOP_WORDS.get(self.run.stop.why, f"stopped: {self.run.stop.why}")
        self._log("info", "worker.exited", epoch=slot.epoch, pid=slot.pid, how=view.how,
                  exit_class=decision.exit_class.value, action=decision.action.value,
                  reason=reason)
        slot.kill = None
        self._set_state(slot, WorkerState.EXITED)
        if not self.finished:
            self._decide(slot, now, decision)

    def _decide(self, slot: WorkerSlot, now: float, decision: Decision) -> None:
        action = decision.action
        if action is RestartAction.COMPLETE and not self.sharded:
            self._set_state(slot, WorkerState.COMPLETED)
            self._finish("completed", ExitCode.COMPLETED)
        elif action is RestartAction.COMPLETE:  # its shard is done: the next, or wait
            self._release(slot)
            self._set_state(slot, WorkerState.IDLE)
            if self.run.stop is not None:
                self._stop_when_quiet()
            else:
                self._maybe_merge()
                self._assign(slot)
        elif self.run.stop is not None:
            self._stop_when_quiet()
        elif action is RestartAction.GIVE_UP:
            fail = slot.last_fail
            reason = decision.reason + (f"; the last worker said: {fail.kind}: "
                                        f"{fail.message}" if fail else "")
            if decision.exit_class is ExitClass.FATAL:
                self._give_up(reason)  # the job itself fails: every GPU would
            else:
                self._retire(slot, reason)
        elif action is RestartAction.WAIT_COOLDOWN:
            self._release(slot)  # another GPU may go on with its shard meanwhile
            self._set_state(slot, WorkerState.COOLING)
            self._log("warning", "thermal.cooling", epoch=slot.epoch)
        elif action is RestartAction.STOP:
            self.run.stop = StopRequest(decision.reason, Desired.STOPPED)
            self._stop_when_quiet()
        else:
            self.run.restarts += 1  # counted when decided, so a supervisor kill keeps it
            self._append(Event(EventKind.RESTART_SCHEDULED, decision.reason, epoch=slot.epoch,
                               fields={"exit_class": decision.exit_class.value,
                                       "delay_s": decision.delay,
                                       "restarts": self.run.restarts}))
            slot.resume_at = now + decision.delay
            self._set_state(slot, WorkerState.BACKOFF)
            self._emit(Count(Metric.RESTART, label=decision.exit_class.value))
            self._log("warning", "worker.restart_scheduled", reason=decision.reason,
                      delay_s=round(decision.delay, 3), exit_class=decision.exit_class.value)
            assert self.run.crash_alarm is not None
            crashes = self.run.crash_alarm.crashed(now) if decision.exit_class.is_crash \
                else None
            if crashes is not None:
                self._emit(Notify("worker.crash_loop", {
                    "crashes": crashes, "window_s": self._restart_settings.restart_window,
                    "max_restarts": self._restart_settings.max_restarts,
                    "exit_class": decision.exit_class.value, "reason": decision.reason}))

    def _retire(self, slot: WorkerSlot, reason: str) -> None:
        """A worker slot gives up (crash loop, poison checkpoint, its GPU needs a reset):
        its shard goes to the other slots; the run gives up only when none is left."""
        others = [s for s in self.run.workers.values() if s is not slot and s.state not in (
            WorkerState.GAVE_UP, WorkerState.KILL_FAILED)]
        if not others:
            self._give_up(reason)
            return
        shard = slot.shard
        self._release(slot)
        self._append(Event(EventKind.RETIRED, reason, epoch=slot.epoch,
                           fields={"worker": slot.id, "gpu": slot.gpu_index, "shard": shard}))
        self._log("error", "worker.retired", worker=slot.id, gpu=slot.gpu_index, shard=shard,
                  reason=reason, left=len(others))
        if can_transition(slot.state, WorkerState.GAVE_UP):
            self._set_state(slot, WorkerState.GAVE_UP)
        for other in others:  # one of them takes the shard as soon as it is free
            if other.state is WorkerState.IDLE:
                self._assign(other)

    def durable_seq(self) -> int:
        """The newest durable checkpoint seq (of any shard), for the operator's messages."""
        return max(s.durable.ckpt_seq for s in self.run.shards)

    def _give_up(self, reason: str) -> None:
        self._append(Event.gave_up(reason))
        advice = "fix the cause, then run start again to resume"
        self._log("error", "run.gave_up", reason=reason, ckpt_seq=self.durable_seq(),
                  advice=advice)
        self._emit(Notify("run.gave_up", {"reason": reason, "advice": advice,
                                          "ckpt_seq": self.durable_seq()}))
        for slot in self.run.workers.values():
            if can_transition(slot.state, WorkerState.GAVE_UP):
                self._set_state(slot, WorkerState.GAVE_UP)
        self._finish("gave_up", ExitCode.GAVE_UP, reason)

    # GPU health -------------------------------------------------------------------------
    def _on_health(self, event: HealthReading) -> None:
        gpu = self.run.gpus.get(event.gpu)
        if gpu is None:
            return
        actions = self._health_actions(gpu, event)
        for slot in self.run.workers.values():
            if slot.gpu_index == event.gpu:
                for action in actions:
                    self._apply_health(slot, action)

    def _health_actions(self, gpu: GpuState, event: HealthReading) -> list[HealthAction]:
        """Feed one reading to the GPU's policies (Xid rules, thermal ladder, memory,
        power, leak) and say what they ask for."""
        now, reading = self.run.mono, event.reading
        actions: list[HealthAction] = []
        for note in event.notes:
            self._log("info", "gpu.note", note=note)
        for xid in event.events:
            verdict = classify_event(xid.kind, xid.xid)
            self._log("error", "gpu.xid", xid=xid.xid, kind=xid.kind, device=xid.index,
                      action=verdict.action.value, message=verdict.message)
            if verdict.action is XidAction.RESTART_WORKER:
                actions.append(HealthAction(HealthActionKind.XID_RESTART, verdict.message))
            elif verdict.action is XidAction.GPU_RESET:
                actions.append(HealthAction(HealthActionKind.GPU_RESET, verdict.message))
        gpu.last = reading
        if reading.lost:
            if not gpu.lost_reported:
                gpu.lost_reported = True
                message = classify_gpu_lost().message
                self._log("critical", "gpu.lost", message=message)
                actions.append(HealthAction(HealthActionKind.GPU_RESET, message))
            return actions
        if now >= gpu.next_log:
            gpu.next_log = now + float(self.config["gpu_log_interval"])
            self._log("info", "gpu.reading", **{k: v for k, v in gpu.snapshot().items()
                                                if k not in ("source", "lost", "index")})
        thermal = gpu.ladder.update(now, reading.temperature, margin=reading.thermal_margin,
                                    reasons=reading.clock_event_reasons)
        if thermal is not None:
            self._log("warning", f"thermal.{thermal.kind.value}",
                      temperature=reading.temperature, reason=thermal.reason, duty=thermal.duty,
                      state=gpu.ladder.state.value)
            if thermal.kind in (ThermalActionKind.THROTTLE, ThermalActionKind.UNTHROTTLE):
                actions.append(HealthAction(HealthActionKind.THROTTLE, thermal.reason,
                                            thermal.duty or 1.0))
            elif thermal.kind is ThermalActionKind.STOP:
                actions.append(HealthAction(HealthActionKind.THERMAL_STOP, thermal.reason))
            elif thermal.kind is ThermalActionKind.KILL_NOW:
                actions.append(HealthAction(HealthActionKind.THERMAL_KILL, thermal.reason))
                self._emit(Notify("thermal.kill_now", {"temperature": reading.temperature,
                                                       "reason": thermal.reason,
                                                       "gpu": gpu.info.index}))
        memory = gpu.memory.update(now, reading.memory_used, reading.memory_total)
        if memory is not None:
            self._log("warning", "gpu.memory_high", reason=memory.reason, **memory.fields)
            actions.append(HealthAction(HealthActionKind.FREE_MEMORY, memory.reason))
        power = gpu.power.update(now, reading.power_w, gpu.info.thresholds.enforced_power_limit_w)
        if power is not None:
            self._log("warning", "gpu.power_high", reason=power.reason, **power.fields)
        # One watch per worker pid on this GPU; a new worker starts over.
        gpu.leaks = {pid: gpu.leaks.get(pid) or LeakWatch(self._resources, now)
                     for pid in event.worker_rss}
        for pid, rss in event.worker_rss.items():
            leak = gpu.leaks[pid].update(now, rss)
            if leak is not None:
                self._log("warning", "worker.leak_suspected", reason=leak.reason, **leak.fields)
                actions.append(HealthAction(HealthActionKind.LEAK, leak.reason))
        return actions

    def _apply_health(self, slot: WorkerSlot, action: HealthAction) -> None:
        if action.kind is HealthActionKind.THROTTLE:
            if slot.state in (WorkerState.RUNNING, WorkerState.PAUSED):
                self._send(slot, m.Cmd(epoch=slot.epoch, op="throttle",
                                       args={"duty": action.duty}))
            return
        if action.kind is HealthActionKind.FREE_MEMORY:
            if slot.state is WorkerState.RUNNING:
                self._send(slot, m.Cmd(epoch=slot.epoch, op="free_memory"))
            return
        event_kind, kill_reason = _HEALTH_KILL[action.kind]
        self._append(Event(event_kind, action.reason, epoch=slot.epoch))
        if slot.state.has_process:
            self._begin_kill(slot, kill_reason, detail=action.reason)
        elif action.kind is HealthActionKind.GPU_RESET:
            self._give_up(action.reason)
        elif action.kind in (HealthActionKind.THERMAL_STOP, HealthActionKind.THERMAL_KILL) \
                and slot.state is WorkerState.BACKOFF:
            slot.resume_at = None
            self._set_state(slot, WorkerState.COOLING)

    # Status -------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The run's status (``status --json``, ``status.json``); a sharded run adds one
        row per GPU (``gpus``) and its shards' count."""
        run = self.run
        slots = list(run.workers.values())
        live = [s for s in slots if s.last_beat is not None and s.state.has_process]
        lead = live[0] if live else slots[0]
        metrics = lead.last_beat.metrics if lead.last_beat else {}
        newest = max(run.shards, key=lambda s: s.durable.t_wall or 0.0)
        if self.sharded:
            total: int | None = sum(s.size or 0 for s in run.shards)
            done = sum(self._units_of(s) for s in run.shards)
            rates = [v for v in (s.last_beat.metrics.get("units_per_s") for s in live
                                 if s.last_beat) if isinstance(v, int | float)]
            units_per_s: Any = sum(rates) if rates else None
        else:
            beat = slots[0].last_beat
            total = beat.units_total if beat else None
            done = beat.units_done if beat else run.shards[0].durable.units_done
            units_per_s = metrics.get("units_per_s")
        if run.outcome is not None and run.outcome.kind == "completed" and total:
            done = total  # the last beat predates the final units
        lat = sorted(run.ack_seconds)
        gpu = run.gpus.get(lead.gpu_index)
        status = {
            "run_id": run.run_id,
            "state": self._run_state(slots).value,
            "outcome": run.outcome.kind if run.outcome else None,
            "supervisor_pid": self.facts.supervisor_pid,
            "supervisor_started_wall": self.facts.supervisor_started_wall,
            "epoch": run.epoch,
            "worker_pid": lead.pid if lead.state.has_process else None,
            "restarts": run.restarts,
            "units_done": done,
            "units_total": total,
            "progress": (done / total) if total else None,
            "units_per_s": units_per_s,
            "dims_per_s": dims_per_s_of(run.spec, units_per_s),
            "duty": metrics.get("duty"),
            "durable_ckpt_seq": self.durable_seq(),
            "durable_units": sum(self._units_of(s, durable=True) for s in run.shards),
            "last_checkpoint_wall": newest.durable.t_wall,
            "ckpt_ack_ms_p50": round(lat[len(lat) // 2] * 1000, 3) if lat else None,
            "protocol_errors": run.protocol_errors,
            "foreign_dropped": run.foreign_dropped,
            "gpu": {k: v for k, v in gpu.snapshot().items() if k != "index"} if gpu else None,
            "updated_wall": run.wall,
        }
        several = self.sharded or len(slots) > 1  # else both null: the run is one piece
        status["shards"] = {"total": len(run.shards),
                            "done": sum(1 for s in run.shards if s.done)} if several else None
        status["gpus"] = [self._gpu_row(slot) for slot in slots] if several else None
        return status

    def _units_of(self, shard: ShardState, durable: bool = False) -> int:
        """Units of ``shard`` done: all once it is done, else what is durable or (unless
        ``durable``) what its worker's last beat says, whichever is more."""
        if shard.done and shard.size is not None:
            return shard.size
        units = shard.durable.units_done
        owner = self.run.workers.get(shard.owner or "")
        if not durable and owner is not None and owner.last_beat is not None \
                and owner.state.has_process:
            units = max(units, owner.last_beat.units_done)
        return units

    def _run_state(self, slots: list[WorkerSlot]) -> WorkerState:
        """One state for the run: its one worker's, or the busiest of several."""
        for state in (WorkerState.RUNNING, WorkerState.PAUSED, WorkerState.STARTING,
                      WorkerState.STOPPING, WorkerState.KILLING, WorkerState.BACKOFF,
                      WorkerState.COOLING):
            if any(s.state is state for s in slots):
                return state
        return slots[0].state

    def _gpu_row(self, slot: WorkerSlot) -> dict[str, Any]:
        """One GPU's row: its worker, the shard it computes, how far, how fast, how hot."""
        gpu = self.run.gpus.get(slot.gpu_index)
        shard = self.run.shards[slot.shard] if slot.shard is not None else None
        beat = slot.last_beat if slot.state.has_process else None
        ups = beat.metrics.get("units_per_s") if beat else None
        row: dict[str, Any] = {
            "index": slot.gpu_index, "worker": slot.id, "state": slot.state.value,
            "pid": slot.pid if slot.state.has_process else None,
            "shard": shard.index if shard else None,
            "shard_range": list(shard.span) if shard and shard.span else None,
            "progress": (self._units_of(shard) / shard.size) if shard and shard.size else None,
            "units_per_s": ups, "dims_per_s": dims_per_s_of(self.run.spec, ups),
            "temperature": None, "duty": None, "thermal_state": None, "name": None}
        if gpu is not None:
            snap = gpu.snapshot()
            row.update(temperature=snap["temperature"], duty=snap["duty"],
                       thermal_state=snap["thermal_state"], name=gpu.info.name)
        return row


def dims_per_s_of(spec: Mapping[str, Any], units_per_s: Any) -> float | None:
    """The NKAT job's units are blocks of ``unit_dims`` dimensions: show dims/s."""
    if spec.get("job") != NKAT_JOB:
        return None
    unit_dims = spec.get("params", {}).get("unit_dims")
    if isinstance(units_per_s, int | float) and isinstance(unit_dims, int):
        return float(units_per_s) * unit_dims
    return None
