"""The supervisor's shell: the I/O around the run controller, and nothing else.

One thread, one ZeroMQ poll loop. Each turn it reads what arrived (worker messages,
control requests, signals, worker output), the clocks, the worker processes and the GPU,
hands each to the controller as a typed input, and carries out the effects it returns:
WAL appends, sends, signals, spawns, replies, status. Every decision is the controller's
(``controller.py``); docs/architecture.md draws the loop.

    shell = Shell(run, wal, log, controller, probe=probe, metrics=metrics)
    code = shell.run()       # 0 completed, 3 gave up, 4 stopped by the operator
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from nkat.protocol import messages as m
from nkat.supervisor import control, journal, wal_effects
from nkat.supervisor import controller as c
from nkat.supervisor.bounded_router import BoundedRouter
from nkat.supervisor.health import GpuProbe
from nkat.supervisor.outlets import Outlets
from nkat.supervisor.rundir import RunDir
from nkat.supervisor.spawn import WorkerProcess, merge_shards

if TYPE_CHECKING:  # prometheus-client is imported only when metrics are asked for
    from nkat.supervisor.notifier import Notifier
    from nkat.supervisor.ops.metrics import RunMetrics
    from nkat.supervisor.preemption_watch import PreemptionWatch

POLL_MS = 100
#: How long an exited worker's connection may take to end (a lingering child holding it).
LAST_WORDS_S = 0.5
#: Connections sock/control may hold (each costs a file handle); sock/worker twice that.
MAX_PEERS = 32
_SIGNALS: dict[int, c.RunSignal] = {
    signal.SIGTERM: c.RunSignal.TERM, signal.SIGINT: c.RunSignal.INT,
    signal.SIGHUP: c.RunSignal.HUP}
_SIG = {c.Sig.DUMP: signal.SIGUSR1, c.Sig.TERM: signal.SIGTERM, c.Sig.KILL: signal.SIGKILL}


class Shell:
    """Runs one controller against real sockets, processes, files and clocks."""

    def __init__(self, run: RunDir, wal: journal.RunLog, log: Any, controller: c.RunController, *,
                 probe: GpuProbe | None = None, notifier: Notifier | None = None,
                 preemption: PreemptionWatch | None = None,
                 on_status: Callable[[dict[str, Any]], None] | None = None,
                 metrics: RunMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.run_dir, self.wal, self.log, self.controller = run, wal, log, controller
        self.probe, self.preemption, self.clock, self.wall = probe, preemption, clock, wall
        self._outlet_parts = (on_status, metrics, notifier)
        self.uuids = {g.index: g.uuid for g in probe.gpus if g.uuid} if probe else {}
        self.ctx = zmq.Context()
        self.workers: dict[str, WorkerProcess] = {}
        self.signals: collections.deque[int] = collections.deque()
        self.finish: c.Finish | None = None
        self._poller: tuple[frozenset[int], zmq.Poller] | None = None

    # Life ---------------------------------------------------------------------------------
    def run(self) -> int:
        self._bind()
        previous = {sig: signal.signal(sig, lambda s, _f: self.signals.append(s))
                    for sig in _SIGNALS}
        try:
            self._feed(c.Start(mono=self.clock()))
            while self.finish is None:
                self._turn()
        finally:
            for worker in list(self.workers.values()):
                worker.kill_now()  # on the way out, never leave a worker behind
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.ctx.destroy(linger=0)
        return int(self.finish.code)

    def _turn(self) -> None:
        fds = {fd: (wid, name) for wid, w in self.workers.items()
               for fd, name in w.output_fds.items()}
        if self._poller is None or self._poller[0] != set(fds):
            # Rebuilt only when the workers' pipes change: the loop turns ten times a second.
            poller = zmq.Poller()
            for item in (self.wsock, self.csock, self.wrouter.monitor, self.crouter.monitor,
                         *fds):
                poller.register(item, zmq.POLLIN)
            self._poller = (frozenset(fds), poller)
        try:
            ready = dict(self._poller[1].poll(POLL_MS))
        except zmq.ZMQError:
            ready = {}  # interrupted by a signal: handled below
        if self.wsock in ready:
            self._drain_worker_socket()
        if self.csock in ready:
            self._drain_control()
        for router in (self.wrouter, self.crouter):
            if router.monitor in ready:
                self._watch(router)
        for fd, (wid, stream) in fds.items():
            worker = self.workers.get(wid)
            if worker is not None and fd in ready:
                for line in worker.read_lines(fd):
                    self.log.info(f"worker.{stream}", epoch=worker.epoch, line=line)
        while self.signals:
            self._feed(c.SignalReceived(_SIGNALS[self.signals.popleft()], self.clock()))
        notice = self.preemption.notice() if self.preemption else None
        if notice is not None and self.controller.run.preempted is None:
            self._feed(c.PreemptionNoticed(notice.cloud, notice.deadline_wall, notice.detail,
                                           self.clock(), self.wall()))
        self._await_last_words()
        now = self.clock()
        self._feed(c.Tick(now, self.wall(), {wid: self._view(wid, w)
                                            for wid, w in self.workers.items()}))
        if self.probe is not None:
            pids = {self.controller.run.workers[wid].gpu_index: [w.pid]
                    for wid, w in self.workers.items()}
            for reading in self.probe.poll(now, pids):
                self._feed(reading)

    def _bind(self) -> None:
        for name in ("worker", "control", "events"):
            self.run_dir.clear_socket(name)
        old_umask = os.umask(0o177)  # sockets are created 0600
        try:
            # No handover: a second connection claiming a worker's routing id is refused.
            self.wrouter = BoundedRouter(self.ctx, self.run_dir.endpoint("worker"),
                                         max_peers=2 * MAX_PEERS, refuse=True,
                                         max_bytes=m.MAX_MESSAGE_BYTES)
            self.crouter = BoundedRouter(self.ctx, self.run_dir.endpoint("control"),
                                         max_peers=MAX_PEERS, refuse=True,
                                         max_bytes=control.MAX_REQUEST_BYTES)
            self.wsock, self.csock = self.wrouter.sock, self.crouter.sock
            esock = self.ctx.socket(zmq.PUB)
            esock.setsockopt(zmq.LINGER, 0)
            esock.bind(self.run_dir.endpoint("events"))
            on_status, metrics, notifier = self._outlet_parts
            self.outlets = Outlets(self.run_dir, self.log, esock, on_status=on_status,
                                   metrics=metrics, notifier=notifier)
        finally:
            os.umask(old_umask)

    # Turning what arrived into inputs ------------------------------------------------------
    def _drain_worker_socket(self) -> None:
        tokens = {w.token.encode(): w for w in self.workers.values()}
        for frames, fd in self.wrouter.frames_with_fd(1000):
            ident = frames[0] if frames else b""
            if ident in tokens:
                tokens[ident].connection_fd = fd
            try:
                if len(frames) != 2:
                    raise m.ProtocolError("expected [routing id, payload]")
                msg = m.decode(frames[1])
            except m.ProtocolError as exc:
                self._feed(c.MalformedMessage(ident, str(exc), self.clock()))
                continue
            self._feed(c.WorkerMessage(ident, msg, self.clock()))

    def _await_last_words(self) -> None:
        """Read all a just-exited worker sent (its ``fail``, its last log lines) before its
        exit is reported: ZeroMQ may hand them over after the exit is seen, never after the
        end of their connection is."""
        for w in list(self.workers.values()):  # what it reads may release or spawn one
            if w.poll() is None or w.last_words_awaited:
                continue
            w.last_words_awaited = True
            for _ in range(int(LAST_WORDS_S / 0.02)):  # waits of 20 ms at most
                self._watch(self.wrouter)
                self._drain_worker_socket()
                if w.connection_fd not in self.wrouter.open_fds:
                    break
                zmq.select([self.wsock, self.wrouter.monitor], [], [], 0.02)

    def _watch(self, router: BoundedRouter) -> None:
        if flood := router.on_monitor():  # connections come and go; or a flood
            self.log.warning("socket.flooded", **flood)

    def _drain_control(self) -> None:
        for frames in self.crouter.frames(100):
            try:
                op = control.decode_request(frames[1])["op"] if len(frames) == 2 else None
            except ValueError as exc:
                self._reply(frames[0], {"ok": False, "error": str(exc)})
                continue
            if op is not None:
                self._feed(c.ControlRequest(frames[0], op, self.clock()))

    def _view(self, wid: str, worker: WorkerProcess) -> c.ProcessView:
        code = worker.poll()
        if code is None:
            return c.ProcessView(None)
        group = worker.group_alive()
        holds = not group and self.probe is not None and self.probe.holds(
            self.controller.run.workers[wid].gpu_index, worker.pid)
        return c.ProcessView(code, worker.describe_exit(), group, holds)

    # Carrying out effects ------------------------------------------------------------------
    def _feed(self, event: c.Input) -> None:
        """Hand one input to the controller and perform its effects in order; an effect
        that answers with an input has that input's effects performed first."""
        queue = collections.deque(self.controller.handle(event))
        while queue:
            answer = self._perform(queue.popleft())
            if answer is not None:
                queue.extendleft(reversed(self.controller.handle(answer)))

    def _perform(self, effect: c.Effect) -> c.Input | None:  # noqa: C901 - one case each
        if isinstance(effect, c.Log):
            getattr(self.log, effect.level)(effect.event, **effect.fields)
        elif isinstance(effect, c.Append | c.AppendCheckpoint):
            return wal_effects.append(self.wal, effect, self.wall())
        elif isinstance(effect, c.Send):
            self._send(effect.worker, effect.msg)
        elif isinstance(effect, c.SignalWorker):
            worker = self.workers.get(effect.worker)
            if worker is not None and effect.signal is c.Sig.DUMP:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGUSR1)  # faulthandler: every thread's stack
            elif worker is not None:
                worker.signal_group(_SIG[effect.signal])
        elif isinstance(effect, c.Spawn):
            return self._spawn(effect)
        elif isinstance(effect, c.LoadCheckpoint):
            return wal_effects.load_checkpoint(self.wal, effect)
        elif isinstance(effect, c.ReleaseWorker) and effect.worker in self.workers:
            worker = self.workers.pop(effect.worker)
            for stream, line in worker.drain():  # the tail of a stack dump explains a hang
                self.log.info(f"worker.{stream}", epoch=worker.epoch, line=line)
        elif isinstance(effect, c.Reply):
            self._reply(effect.ref, effect.reply)
        elif isinstance(effect, c.WriteStatus):
            self.outlets.write_status(effect.status)
        elif isinstance(effect, c.WriteResult):
            try:
                self.run_dir.write_result(effect.result)
            except OSError as exc:
                # The done record is durable: the next start writes the file from it.
                self.log.error("result.write_failed", error=str(exc))
        elif isinstance(effect, c.Publish):
            self.outlets.publish(effect.payload)
        elif isinstance(effect, c.Count):
            self.outlets.count(effect)
        elif isinstance(effect, c.Notify):
            self.outlets.notify(effect, self.wall())
        elif isinstance(effect, c.MergeShards):
            return c.ShardsMerged(*merge_shards(self.wal, self.run_dir, effect.shards,
                                                effect.provenance))
        elif isinstance(effect, c.PinBackend):
            self.run_dir.pin_backend(effect.backend)
        elif isinstance(effect, c.QuietDisplay):
            self.outlets.quiet()
        elif isinstance(effect, c.Finish):
            self.finish = self.finish or effect
        return None

    def _spawn(self, effect: c.Spawn) -> c.Input:
        try:
            worker = WorkerProcess(effect.epoch, self.run_dir.endpoint("worker"), effect.backend,
                                   job=effect.job, gpu_index=effect.gpu_index,
                                   gpu_uuid=self.uuids.get(effect.gpu_index),
                                   job_env=self.run_dir.info.job_env)
        except OSError as exc:
            return c.SpawnFailed(effect.worker, effect.epoch, str(exc), self.clock())
        self.workers[effect.worker] = worker
        return c.WorkerSpawned(effect.worker, effect.epoch, worker.pid, worker.token,
                               self.clock())

    def _send(self, wid: str, msg: m.Message) -> None:
        if (worker := self.workers.get(wid)) is None:
            return
        try:
            self.wsock.send_multipart([worker.token.encode(), m.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.log.warning("protocol.send_failed", msg_type=msg.TYPE, error=str(exc))

    def _reply(self, ident: bytes, reply: dict[str, Any]) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.csock.send_multipart([ident, control.encode_reply(reply)], zmq.NOBLOCK)
