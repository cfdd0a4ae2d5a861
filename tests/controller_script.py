"""A scripted shell for the run controller: fake clock, fake workers, an in-memory journal.

Tests drive the controller as the real shell would, input by input, and read what it
did: the records it made durable, the messages and signals it sent, the events it logged.
Nothing sleeps: time moves only by :meth:`Script.advance`.

    s = Script(heartbeat_timeout=2.0)
    s.start()                          # Start -> epoch record -> Spawn -> worker pid 101
    s.hello()                          # hello -> checkpoint load -> welcome
    s.beat(progress_seq=1)
    s.ckpt(1, units_done=10)           # durable, acked
    s.advance(3.0)                     # silence: watchdog.unresponsive, SIGUSR1, SIGTERM …
    assert s.events("watchdog.unresponsive")

Workers obey signals the usual way (SIGTERM and SIGKILL end them; a worker can be told to
ignore SIGTERM or to survive SIGKILL), and ``cmd stop`` the way the real worker does when
``obeys_stop``: it exits STOPPED on the next turn.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from typing import Any

from nkat.protocol import exitcodes
from nkat.protocol import messages as m
from nkat.supervisor import controller as c
from nkat.supervisor import journal
from nkat.supervisor.config import defaults
from nkat.supervisor.gpu.sensor import Reading, Thresholds, XidEvent

SPEC = {"job": "nkat-highdim", "params": {"max_dimension": 1000, "unit_dims": 10}}


@dataclasses.dataclass
class FakeWorker:
    pid: int
    epoch: int
    token: str
    returncode: int | None = None
    group_lingers: bool = False  # stragglers of its group outlive the leader
    gpu_holds: bool = False  # the GPU keeps listing its pid
    ignores_term: bool = False
    survives_kill: bool = False
    obeys_stop: bool = True
    stop_pending: bool = False
    signals: list[str] = dataclasses.field(default_factory=list)

    def view(self) -> c.ProcessView:
        if self.returncode is None:
            return c.ProcessView(None)
        how = f"killed by signal {-self.returncode}" if self.returncode < 0 \
            else f"exit code {self.returncode}"
        return c.ProcessView(self.returncode, how, self.group_lingers, self.gpu_holds)


class Script:
    """The controller and everything around it, in memory."""

    def __init__(self, *, gpus: int = 0, facts: c.RunFacts | None = None,
                 fail_appends_after: int | None = None, seed: int = 7,
                 slots: list[tuple[str, int]] | None = None,
                 shards: list[tuple[int, int]] | None = None, **config: Any) -> None:
        overrides = {"restart_delay": 0.1, "restart_delay_max": 0.4, **config}
        self.config = defaults().with_overrides(overrides, "test")
        self.facts = facts or c.RunFacts(
            "r1", SPEC, shards=tuple(c.ShardPlan(span) for span in shards or ()))
        infos = [c.GpuInfo(i, "test", Thresholds()) for i in range(gpus)]
        self.ctl = c.RunController(self.config, self.facts, gpus=infos,
                                   rng=random.Random(seed), slots=slots)
        self.merges: list[c.MergeShards] = []
        self.merge_error: str | None = None
        self.now = 0.0
        self.wall = 1_700_000_000.0
        self.records: list[Any] = []
        self.states: dict[tuple[int | None, int], bytes] = {}  # (shard, seq) -> state
        self.sent: list[tuple[str, m.Message]] = []
        self.logs: list[tuple[str, str, dict[str, Any]]] = []
        self.replies: list[tuple[Any, dict[str, Any]]] = []
        self.statuses: list[dict[str, Any]] = []
        self.results: list[Any] = []
        self.notified: list[c.Notify] = []
        self.spawns: list[c.Spawn] = []
        self.pinned: list[str] = []
        self.finish: c.Finish | None = None
        self.workers: dict[str, FakeWorker] = {}
        self.history: list[FakeWorker] = []
        self.fail_appends_after = fail_appends_after
        self.load_error: str | None = None
        self.spawn_error: str | None = None
        self._pid = 100
        self.last_progress = 0

    # Driving -----------------------------------------------------------------------------
    def feed(self, event: c.Input) -> None:
        queue = collections.deque(self.ctl.handle(event))
        while queue:
            answer = self._perform(queue.popleft())
            if answer is not None:
                queue.extendleft(reversed(self.ctl.handle(answer)))

    def start(self) -> None:
        self.feed(c.Start(self.now))

    def tick(self) -> None:
        for worker in self.workers.values():
            if worker.stop_pending and worker.returncode is None:
                worker.returncode = exitcodes.STOPPED
        self.feed(c.Tick(self.now, self.wall, {w: p.view() for w, p in self.workers.items()}))

    def advance(self, seconds: float, step: float = 0.1, beats: bool = False) -> None:
        """Let time pass in loop turns of ``step``; with ``beats``, a live worker beats
        (without progress) every turn."""
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now = min(end, self.now + step)
            self.wall += step
            if beats and self.worker is not None and self.worker.returncode is None:
                self.beat(self.last_progress, stage="compute")
            self.tick()

    @property
    def worker(self) -> FakeWorker | None:
        return self.workers.get(c.SOLE_WORKER)

    def send(self, msg: m.Message, wid: str = c.SOLE_WORKER, token: str | None = None) -> None:
        worker = self.workers[wid]
        self.feed(c.WorkerMessage((token or worker.token).encode(), msg, self.now))

    def hello(self, wid: str = c.SOLE_WORKER, **kw: Any) -> None:
        w = self.workers[wid]
        fields = {"token": w.token, "pid": w.pid, "job": SPEC["job"],
                  "proto": m.PROTOCOL_VERSION, "backend": "numpy", "device": "cpu", **kw}
        self.send(m.Hello(epoch=w.epoch, **fields), wid)

    def beat(self, progress_seq: int | None = None, units_done: int = 0,
             stage: str = "compute", batch_seconds: float | None = 0.1,
             wid: str = c.SOLE_WORKER) -> None:
        if progress_seq is None:
            progress_seq = self.last_progress + 1
        self.last_progress = progress_seq
        metrics: dict[str, Any] = {"units_per_s": 10.0}
        if batch_seconds is not None:
            metrics["batch_seconds"] = batch_seconds
        self.send(m.Beat(epoch=self.workers[wid].epoch, seq=progress_seq,
                         progress_seq=progress_seq, units_done=units_done, units_total=100,
                         stage=stage, t_mono=self.now, metrics=metrics), wid)

    def ckpt(self, seq: int, units_done: int, state: bytes = b"state",
             digest: str | None = None, wid: str = c.SOLE_WORKER) -> None:
        self.send(m.Ckpt(epoch=self.workers[wid].epoch, ckpt_seq=seq, units_done=units_done,
                         state=state, digest=digest or m.state_digest(state)), wid)

    def done(self, result: Any = None, wid: str = c.SOLE_WORKER) -> None:
        if result is None and self.ctl.sharded:
            shard = self.ctl.run.shards[self.ctl.run.workers[wid].shard or 0]
            assert shard.span is not None
            result = {"shard": list(shard.span), "units_done": shard.size}
        result = {"answer": 42} if result is None else result
        self.send(m.Done(epoch=self.workers[wid].epoch, result=result,
                         digest=m.result_digest(result)), wid)

    def fail(self, kind: str = "job_error", fatal: bool = False) -> None:
        self.send(m.Fail(epoch=self.worker.epoch if self.worker else 0, kind=kind,
                         message="boom", traceback="", fatal=fatal))

    def exit(self, code: int, wid: str = c.SOLE_WORKER) -> None:
        self.workers[wid].returncode = code

    def signal(self, sig: c.RunSignal) -> None:
        self.feed(c.SignalReceived(sig, self.now))

    def control(self, op: str) -> dict[str, Any]:
        ref = object()
        self.feed(c.ControlRequest(ref, op, self.now))
        return next(reply for r, reply in self.replies if r is ref)

    def reading(self, temperature: float | None = None, gpu: int = 0,
                events: tuple[XidEvent, ...] = (), rss: dict[int, int] | None = None,
                **fields: Any) -> None:
        self.feed(c.HealthReading(gpu, Reading(self.now, gpu, temperature=temperature,
                                               **fields), events=events,
                                  worker_rss=rss or {}, mono=self.now))

    def shard_of(self, wid: str) -> c.ShardState:
        return self.ctl.run.shards[self.ctl.run.workers[wid].shard or 0]

    def finish_shard(self, wid: str) -> None:
        """The worker of ``wid`` computes the rest of its shard: final checkpoint (acked),
        done, exit."""
        shard = self.shard_of(wid)
        self.ckpt(shard.durable.ckpt_seq + 1, shard.size or 0, wid=wid)
        self.done(wid=wid)
        self.exit(exitcodes.DONE, wid)
        self.tick()

    def run_worker(self) -> None:
        """Start, handshake and first progress: a RUNNING worker."""
        if self.worker is None or self.worker.returncode is not None:
            self.start()
        self.hello()
        self.beat()

    # Reading what happened ---------------------------------------------------------------
    def events(self, name: str) -> list[dict[str, Any]]:
        return [fields for _, event, fields in self.logs if event == name]

    def levels(self, name: str) -> list[str]:
        return [level for level, event, _ in self.logs if event == name]

    def kinds(self) -> list[str]:
        return [r.kind.value for r in self.records if isinstance(r, journal.Event)]

    def of_type(self, kind: type) -> list[Any]:
        return [r for r in self.records if isinstance(r, kind)]

    def messages(self, kind: type[m.Message], wid: str = c.SOLE_WORKER) -> list[Any]:
        return [msg for w, msg in self.sent if w == wid and isinstance(msg, kind)]

    def cmds(self, op: str) -> list[m.Cmd]:
        return [msg for msg in self.messages(m.Cmd) if msg.op == op]

    @property
    def state(self) -> str:
        return self.ctl.run.workers[c.SOLE_WORKER].state.value

    # The shell's side of each effect -----------------------------------------------------
    def _perform(self, effect: c.Effect) -> c.Input | None:  # noqa: C901
        if isinstance(effect, c.Log):
            self.logs.append((effect.level, effect.event, effect.fields))
        elif isinstance(effect, c.Append | c.AppendCheckpoint):
            if self.fail_appends_after is not None and \
                    len(self.records) >= self.fail_appends_after:
                return c.Appended(effect.then, False, self.wall, error="[Errno 28] No space")
            record = effect.meta if isinstance(effect, c.AppendCheckpoint) else effect.record
            self.records.append(dataclasses.replace(record, t_wall=self.wall))
            if isinstance(effect, c.AppendCheckpoint):
                self.states[(effect.meta.shard, effect.meta.ckpt_seq)] = effect.state
            return c.Appended(effect.then, True, self.wall, 0.002)
        elif isinstance(effect, c.Send):
            self.sent.append((effect.worker, effect.msg))
            self._worker_reacts(effect.worker, effect.msg)
        elif isinstance(effect, c.SignalWorker):
            self._signal(effect.worker, effect.signal)
        elif isinstance(effect, c.PinBackend):
            self.pinned.append(effect.backend)
        elif isinstance(effect, c.Spawn):
            self.spawns.append(effect)
            if self.spawn_error:
                return c.SpawnFailed(effect.worker, effect.epoch, self.spawn_error, self.now)
            self._pid += 1
            worker = FakeWorker(self._pid, effect.epoch, f"token-{effect.epoch}")
            self.workers[effect.worker] = worker
            self.history.append(worker)
            return c.WorkerSpawned(effect.worker, effect.epoch, worker.pid, worker.token,
                                   self.now)
        elif isinstance(effect, c.LoadCheckpoint):
            if self.load_error:
                return c.CheckpointLoaded(effect.worker, effect.epoch, None, self.load_error)
            ckpts = [r for r in self.of_type(journal.CheckpointMeta) if r.shard == effect.shard]
            resume = None
            if ckpts:
                last = ckpts[-1]
                resume = m.Resume(last.ckpt_seq, last.units_done,
                                  self.states[(last.shard, last.ckpt_seq)])
            return c.CheckpointLoaded(effect.worker, effect.epoch, resume)
        elif isinstance(effect, c.MergeShards):
            self.merges.append(effect)
            if self.merge_error:
                return c.ShardsMerged(None, self.merge_error)
            return c.ShardsMerged({"merged": [list(span) for _, span in effect.shards]})
        elif isinstance(effect, c.ReleaseWorker):
            self.workers.pop(effect.worker, None)
        elif isinstance(effect, c.Reply):
            self.replies.append((effect.ref, effect.reply))
        elif isinstance(effect, c.WriteStatus):
            self.statuses.append(effect.status)
        elif isinstance(effect, c.WriteResult):
            self.results.append(effect.result)
        elif isinstance(effect, c.Notify):
            self.notified.append(effect)
        elif isinstance(effect, c.Finish):
            assert self.finish is None, "Finish twice"
            self.finish = effect
        return None

    def _worker_reacts(self, wid: str, msg: m.Message) -> None:
        worker = self.workers.get(wid)
        if worker is not None and isinstance(msg, m.Cmd) and msg.op == "stop" \
                and worker.obeys_stop:
            worker.stop_pending = True

    def _signal(self, wid: str, sig: c.Sig) -> None:
        worker = self.workers.get(wid)
        if worker is None:
            return
        worker.signals.append(sig.value)
        if worker.returncode is not None:
            return
        if sig is c.Sig.TERM and not worker.ignores_term:
            worker.returncode = -15
        elif sig is c.Sig.KILL and not worker.survives_kill:
            worker.returncode = -9
