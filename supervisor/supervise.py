"""The supervisor's run loop: the thin imperative shell around the policies.

One thread, one ZeroMQ poll loop. Each turn it reads what arrived (worker messages,
control requests, worker output), then asks the policies what to do — watchdog,
kill sequence, restart policy, thermal ladder, resource and Xid rules — and does it:
append to the WAL, answer, signal, spawn. It reads like DESIGN.md §6.

    sup = Supervisor(run, config, wal, log)
    code = sup.run()        # 0 completed, 3 gave up, 4 stopped by the operator
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psutil
import zmq

from nkat.protocol import messages as m
from nkat.supervisor import control
from nkat.supervisor.config import NKAT_JOB, Config
from nkat.supervisor.health import GpuHealth
from nkat.supervisor.policies.kill_sequence import Action, KillReason, KillSequence, KillSettings
from nkat.supervisor.policies.lifecycle import WorkerState, can_transition, check_transition
from nkat.supervisor.policies.restart_policy import (
    Decision,
    ExitInfo,
    RestartPolicy,
    RestartSettings,
)
from nkat.supervisor.policies.watchdog import Watchdog, WatchdogSettings
from nkat.supervisor.rundir import RunDir, RunDirError
from nkat.supervisor.spawn import WorkerProcess
from nkat.supervisor.wal import RecordType, Wal, WalError

if TYPE_CHECKING:  # prometheus-client is imported only when metrics are asked for
    from nkat.supervisor.ops.metrics import RunMetrics

EXIT_COMPLETED = 0
EXIT_GAVE_UP = 3
EXIT_STOPPED = 4

POLL_MS = 100
MAX_IPC_PATH = 107  # sun_path is 108 bytes on Linux, with its terminating NUL
STATUS_EVERY_S = 1.0


class Supervisor:
    """Supervises one run until it completes, gives up or is stopped."""

    def __init__(self, run: RunDir, config: Config, wal: Wal, log: Any, *,
                 health: GpuHealth | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_status: Callable[[dict[str, Any]], None] | None = None,
                 metrics: RunMetrics | None = None, last_epoch: int = 0) -> None:
        self.run_dir = run
        self.config = config
        self.wal = wal
        self.log = log
        self.clock = clock
        self.health = health
        self.on_status = on_status
        self.metrics = metrics
        self.ctx = zmq.Context()
        self.state = WorkerState.IDLE
        self.worker: WorkerProcess | None = None
        self.epoch = last_epoch  # the newest worker incarnation the WAL knows of
        self.restarts = 0
        self.exit_code: int | None = None
        self.outcome: str | None = None
        self.outcome_reason: str | None = None  # why it gave up, for the operator
        self.kill: KillSequence | None = None
        self.kill_reason: KillReason | None = None  # why the supervisor ended the worker
        self.pending_resume_at: float | None = None
        self.stop_requested: str | None = None  # why the operator asked to stop
        self.stop_desired = "stopped"  # or "running": resume at boot (SIGTERM)
        self.signals: collections.deque[int] = collections.deque()
        self.last_beats: collections.deque[dict[str, Any]] = collections.deque(maxlen=5)
        self.last_beat: m.Beat | None = None
        self.last_fail: m.Fail | None = None
        self.done_recorded = False
        self.wal_failed = False
        self.protocol_errors = 0
        self.dropped_foreign = 0
        self.ckpt_latency: collections.deque[float] = collections.deque(maxlen=256)
        infos = wal.checkpoints()
        latest = infos[-1] if infos else None
        self.durable_ckpt_seq = latest.ckpt_seq if latest else 0
        self.durable_units = latest.units_done if latest else 0
        self.last_ckpt_wall: float | None = latest.t_wall if latest else None
        self.watchdog = Watchdog(WatchdogSettings.from_config(config), clock())
        self.policy = RestartPolicy(RestartSettings.from_config(config), random.Random())
        self._last_status = 0.0
        self._me = psutil.Process()
        self._polled_fds: set[int] | None = None  # None: no poller built yet
        self._poller = zmq.Poller()

    # Life ---------------------------------------------------------------------------
    def run(self) -> int:
        self._bind()
        previous = self._install_signals()
        try:
            self._start_worker("start" if self.epoch == 0 else "resume")
            while self.exit_code is None:
                self._turn()
        finally:
            self._shutdown_worker_now()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._write_status()
            self.ctx.destroy(linger=0)
        return self.exit_code

    def _turn(self) -> None:
        self._poll(POLL_MS)
        now = self.clock()
        self._handle_signals(now)
        self._check_worker_exit(now)
        self._check_watchdog(now)
        self._advance_kill(now)
        if self.health:
            self._apply_health(now)
        self._maybe_restart(now)
        if now - self._last_status >= STATUS_EVERY_S:
            self._write_status()

    def _bind(self) -> None:
        sock_dir = self.run_dir.sock_dir
        for name in ("worker", "control", "events"):
            path = sock_dir / name
            if len(str(path).encode()) > MAX_IPC_PATH:
                raise RunDirError(f"socket path {path} is longer than the {MAX_IPC_PATH} bytes "
                                  "a Unix socket allows; use a shorter --state-dir")
            if path.exists():
                path.unlink()  # a stale socket from a dead supervisor (we hold the lock)
        old_umask = os.umask(0o177)  # sockets are created 0600
        try:
            self.wsock = self.ctx.socket(zmq.ROUTER)
            self.wsock.setsockopt(zmq.MAXMSGSIZE, m.MAX_MESSAGE_BYTES)
            self.wsock.setsockopt(zmq.LINGER, 0)
            self.wsock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self.wsock.bind(self.run_dir.endpoint("worker"))
            self.csock = self.ctx.socket(zmq.ROUTER)
            self.csock.setsockopt(zmq.MAXMSGSIZE, control.MAX_REQUEST_BYTES)
            self.csock.setsockopt(zmq.LINGER, 0)
            self.csock.bind(self.run_dir.endpoint("control"))
            self.esock = self.ctx.socket(zmq.PUB)
            self.esock.setsockopt(zmq.LINGER, 0)
            self.esock.bind(self.run_dir.endpoint("events"))
        finally:
            os.umask(old_umask)

    def _install_signals(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            previous[sig] = signal.signal(sig, lambda s, _f: self.signals.append(s))
        return previous

    # Polling ------------------------------------------------------------------------------
    def _poll(self, timeout_ms: int) -> None:
        fds = self.worker.output_fds if self.worker else {}
        if set(fds) != self._polled_fds:
            # Rebuilt only when the worker's pipes change: the loop turns ten times a second.
            self._poller = zmq.Poller()
            self._poller.register(self.wsock, zmq.POLLIN)
            self._poller.register(self.csock, zmq.POLLIN)
            for fd in fds:
                self._poller.register(fd, zmq.POLLIN)
            self._polled_fds = set(fds)
        try:
            ready = dict(self._poller.poll(timeout_ms))
        except zmq.ZMQError:
            return  # interrupted by a signal: handled next turn
        if self.wsock in ready:
            self._drain_worker_socket()
        if self.csock in ready:
            self._drain_control()
        for fd, stream in fds.items():
            if fd in ready and self.worker:
                for line in self.worker.read_lines(fd):
                    self.log.info(f"worker.{stream}", epoch=self.worker.epoch, line=line)

    def _drain_worker_socket(self) -> None:
        for _ in range(1000):
            try:
                frames = self.wsock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self._protocol_error("expected [routing id, payload]", frames[0] if frames else b"")
                continue
            ident, payload = frames
            try:
                msg = m.decode(payload)
            except m.ProtocolError as exc:
                self._protocol_error(str(exc), ident)
                continue
            self._on_worker_message(ident, msg)

    def _protocol_error(self, why: str, ident: bytes) -> None:
        self.protocol_errors += 1
        if self.metrics:
            self.metrics.protocol_error()
        self.log.warning("protocol.error", reason=why, peer=ident.decode("latin-1")[:64],
                         count=self.protocol_errors)

    # Worker messages ------------------------------------------------------------------
    def _on_worker_message(self, ident: bytes, msg: m.Message) -> None:
        worker = self.worker
        if worker is None or msg.epoch != worker.epoch or \
                ident != f"{worker.epoch}:{worker.pid}".encode():
            self.dropped_foreign += 1
            self.log.warning("protocol.foreign_epoch", msg_type=msg.TYPE, msg_epoch=msg.epoch,
                             epoch=worker.epoch if worker else None)
            return
        now = self.clock()
        if isinstance(msg, m.Hello):
            self._on_hello(msg, now)
            return
        if self.state is WorkerState.STARTING:
            self._protocol_error(f"{msg.TYPE} before hello", ident)
            return
        self.watchdog.on_message(now)
        if isinstance(msg, m.Beat):
            self._on_beat(msg, now)
        elif isinstance(msg, m.Ckpt):
            self._on_ckpt(msg, now)
        elif isinstance(msg, m.Done):
            self._on_done(msg)
        elif isinstance(msg, m.Fail):
            self.last_fail = msg
            self.log.error("worker.failed", epoch=msg.epoch, kind=msg.kind, fatal=msg.fatal,
                           message=msg.message, traceback=msg.traceback)
        elif isinstance(msg, m.Log):
            method = getattr(self.log, msg.level if msg.level in _LEVELS else "info")
            fields = {k: v for k, v in msg.fields.items() if k not in _RESERVED}
            method(msg.event, component="worker", epoch=msg.epoch, **fields)
        elif isinstance(msg, m.Extend):
            self.watchdog.on_extend(now, msg.seconds)
            self.log.info("watchdog.extended", epoch=msg.epoch, seconds=msg.seconds,
                          reason=msg.reason)
        else:
            self._protocol_error(f"{msg.TYPE} is not a worker message", ident)

    def _send(self, msg: m.Message) -> None:
        if self.worker is None:
            return
        ident = f"{self.worker.epoch}:{self.worker.pid}".encode()
        try:
            self.wsock.send_multipart([ident, m.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.log.warning("protocol.send_failed", msg_type=msg.TYPE, error=str(exc))

    def _on_hello(self, msg: m.Hello, now: float) -> None:
        worker = self.worker
        assert worker is not None
        if msg.token != worker.token or msg.pid != worker.pid:
            self._protocol_error("hello with a wrong token or pid", f"{msg.epoch}".encode())
            return
        if msg.proto != m.PROTOCOL_VERSION:
            self._protocol_error(f"worker speaks protocol {msg.proto}", b"")
            return
        if self.state is not WorkerState.STARTING or self.kill is not None:
            # A second hello, or one that arrives after we began ending this worker.
            self._protocol_error("hello out of turn", b"")
            return
        try:
            latest = self.wal.latest_checkpoint()
        except (WalError, OSError) as exc:
            self.log.critical("wal.checkpoint_unreadable", error=str(exc))
            self._begin_kill(now, KillReason.WAL_FAILED)
            self._give_up(f"the newest checkpoint cannot be read ({exc}); inspect it with "
                          "`nkat-supervise verify`, or start again with --salvage")
            return
        resume = None if latest is None else m.Resume(
            ckpt_seq=latest.ckpt_seq, units_done=latest.units_done, state=latest.state)
        settings = self.config.role("worker")
        settings.pop("backend", None)
        settings["provenance"] = {"epochs": worker.epoch, "restarts": self.restarts}
        self._send(m.Welcome(epoch=worker.epoch, run_id=self.run_dir.run_id,
                             spec=self.run_dir.info.spec, settings=settings, resume=resume))
        resumed_from = latest.ckpt_seq if latest else 0
        if self.health is not None and self.health.ladder.duty < 1.0:
            # The GPU was already hot: the new worker starts at the ladder's duty.
            self._send(m.Cmd(epoch=worker.epoch, op="throttle",
                             args={"duty": self.health.ladder.duty}))
        self._set_state(WorkerState.RUNNING)
        self.watchdog.on_message(now)
        self.log.info("worker.welcomed", epoch=worker.epoch, backend=msg.backend,
                      device=msg.device, resume_ckpt_seq=resumed_from or None)

    def _on_beat(self, msg: m.Beat, now: float) -> None:
        batch_seconds = msg.metrics.get("batch_seconds")
        self.watchdog.on_beat(now, msg.progress_seq, msg.stage,
                              batch_seconds if isinstance(batch_seconds, (int, float)) else None)
        self.last_beat = msg
        if self.metrics:
            self.metrics.beat(now)
        self.last_beats.append({"seq": msg.seq, "progress_seq": msg.progress_seq,
                                "units_done": msg.units_done, "stage": msg.stage})
        if self.state is WorkerState.RUNNING and msg.stage == "paused":
            self._set_state(WorkerState.PAUSED)
        elif self.state is WorkerState.PAUSED and msg.stage != "paused":
            self._set_state(WorkerState.RUNNING)
        self.esock.send(json.dumps({"t": "beat", "units_done": msg.units_done,
                                    "units_total": msg.units_total}).encode(), zmq.NOBLOCK)

    def _on_ckpt(self, msg: m.Ckpt, now: float) -> None:
        if self.kill_reason in (KillReason.GPU_RESET, KillReason.XID_RESTART):
            # After an Xid the device memory behind this state is suspect: never resume it.
            self.log.warning("checkpoint.refused", epoch=msg.epoch, ckpt_seq=msg.ckpt_seq,
                             reason=self.kill_reason.value)
            return
        if msg.ckpt_seq <= self.durable_ckpt_seq:
            self._send(m.Ack(epoch=msg.epoch, ckpt_seq=msg.ckpt_seq))  # a resend: ack again
            return
        if m.state_digest(msg.state) != msg.digest:
            self._protocol_error(f"checkpoint {msg.ckpt_seq} digest mismatch", b"")
            return
        started = time.perf_counter()
        t_wall = time.time()
        payload = {"ckpt_seq": msg.ckpt_seq, "epoch": msg.epoch, "units_done": msg.units_done,
                   "digest": msg.digest, "t_wall": t_wall}
        if not self._durable(self.wal.append_checkpoint, payload, msg.state):
            return
        latency = time.perf_counter() - started
        self.ckpt_latency.append(latency)
        self.durable_ckpt_seq = msg.ckpt_seq
        self.durable_units = msg.units_done
        self.last_ckpt_wall = t_wall
        self.policy.on_durable_checkpoint(msg.ckpt_seq)
        self._send(m.Ack(epoch=msg.epoch, ckpt_seq=msg.ckpt_seq))
        if self.metrics:
            self.metrics.checkpoint_acked(latency)
        self.log.info("checkpoint.durable", epoch=msg.epoch, ckpt_seq=msg.ckpt_seq,
                      units_done=msg.units_done, bytes=len(msg.state),
                      ack_ms=round(latency * 1000, 3))

    def _on_done(self, msg: m.Done) -> None:
        if m.result_digest(msg.result) != msg.digest:
            self._protocol_error("result digest mismatch", b"")
            return
        if not self.done_recorded:
            if not self._durable(self.wal.append,
                    RecordType.DONE, {"result": msg.result, "digest": msg.digest,
                                      "t_wall": time.time()}):
                return
            self.done_recorded = True
            try:
                self.run_dir.write_result(msg.result)
            except OSError as exc:
                # The done record is durable: the next start writes the file from it.
                self.log.error("result.write_failed", error=str(exc))
            self.log.info("run.completed", epoch=msg.epoch, result=str(self.run_dir.result_file))
        self._send(m.Ack(epoch=msg.epoch, ckpt_seq=m.DONE_ACK_SEQ))

    def _durable(self, append: Callable[..., Any], *args: Any) -> bool:
        """Run a WAL append; on failure stop everything (fail-stop: no ack, no retry).

        After a failure nothing more is written: the worker is ended without a further
        record, and the run exits 3, resumable from what was durable before.
        """
        if self.wal_failed:
            return False
        try:
            append(*args)
            return True
        except (WalError, OSError) as exc:
            self.wal_failed = True
            self.outcome_reason = f"the write-ahead log could not be written: {exc}"
            self.log.critical("wal.write_failed", error=str(exc),
                              advice="free disk space or fix the device, then run start again")
            if self.worker is not None:
                self._begin_kill(self.clock(), KillReason.WAL_FAILED)
            else:
                self._finish("wal_failed", EXIT_GAVE_UP)
            return False

    # Control requests ------------------------------------------------------------------
    def _drain_control(self) -> None:
        for _ in range(100):
            try:
                frames = self.csock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue
            ident, payload = frames
            try:
                req = control.decode_request(payload)
                reply = self._on_control(req)
            except ValueError as exc:
                reply = {"ok": False, "error": str(exc)}
            self.csock.send_multipart([ident, control.encode_reply(reply)])

    def _on_control(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        if op == "status":
            return {"ok": True, "status": self.status()}
        if op == "stop":
            self._request_stop(self.clock(), "operator")
            return {"ok": True, "message": "stopping: final checkpoint, then exit"}
        if self.state not in (WorkerState.RUNNING, WorkerState.PAUSED):
            return {"ok": False, "error": f"worker is {self.state.value}, cannot {op}"}
        self._send(m.Cmd(epoch=self.worker.epoch if self.worker else 0, op=op))
        self.log.info(f"operator.{op}", epoch=self.epoch)
        return {"ok": True, "message": f"{op} sent"}

    # Signals to the supervisor -----------------------------------------------------------
    def _handle_signals(self, now: float) -> None:
        while self.signals:
            sig = self.signals.popleft()
            if sig == signal.SIGHUP:
                # The terminal went away: go on without the progress line.
                self.log.info("supervisor.sighup_ignored")
                self.on_status = None
                continue
            name = signal.Signals(sig).name
            if self.stop_requested and sig == signal.SIGINT:
                self.log.warning("supervisor.stop_now", signal=name)
                self._begin_kill(now, KillReason.OPERATOR_NOW)
            else:
                desired = "running" if sig == signal.SIGTERM else "stopped"
                self._request_stop(now, f"signal {name}", desired)

    def _request_stop(self, now: float, why: str, desired: str = "stopped") -> None:
        if self.stop_requested:
            return
        self.stop_requested = why
        self.stop_desired = desired
        self.log.info("run.stopping", reason=why, epoch=self.epoch)
        if self.state in (WorkerState.RUNNING, WorkerState.PAUSED):
            self._begin_kill(now, KillReason.OPERATOR)
        elif self.state is WorkerState.STARTING:
            # Nothing to save before the handshake, and a worker not yet welcomed cannot
            # obey cmd stop: end it at once.
            self._begin_kill(now, KillReason.OPERATOR_NOW)
        elif self.state in (WorkerState.BACKOFF, WorkerState.COOLING, WorkerState.IDLE):
            self._record_stop(why, desired)

    def _record_stop(self, why: str, desired: str) -> None:
        """The durable ``stop`` record. ``desired`` is "stopped" when an operator asked
        (``stop``, Ctrl-C): it stays stopped; "running" for SIGTERM, which is also how
        a machine shuts down, so ``start --boot`` resumes it after the reboot."""
        self._durable(self.wal.append, RecordType.STOP, {
            "reason": why, "desired": desired, "t_wall": time.time(),
            "ckpt_seq": self.durable_ckpt_seq})
        self.log.info("run.stopped", reason=why, desired=desired,
                      ckpt_seq=self.durable_ckpt_seq)
        if can_transition(self.state, WorkerState.STOPPED):
            self._set_state(WorkerState.STOPPED)
        self._finish("stopped", EXIT_STOPPED)

    # Spawning ---------------------------------------------------------------------------
    def _start_worker(self, reason: str) -> None:
        self.epoch += 1
        if not self._durable(self.wal.append, RecordType.EPOCH, {
                "epoch": self.epoch, "reason": reason, "t_wall": time.time(),
                "resume_ckpt_seq": self.durable_ckpt_seq}):
            return
        try:
            self.worker = WorkerProcess(self.epoch, self.run_dir.endpoint("worker"),
                                        self.config["backend"], job=self.run_dir.info.spec["job"],
                                        gpu_index=self.config["gpu_index"])
        except OSError as exc:
            self.log.critical("worker.spawn_failed", epoch=self.epoch, error=str(exc))
            self._give_up(f"cannot start the worker: {exc}")
            return
        now = self.clock()
        self.watchdog = Watchdog(WatchdogSettings.from_config(self.config), now)
        self.policy.on_spawn(now, self.durable_ckpt_seq)
        self.kill = None
        self.kill_reason = None
        self.last_fail = None
        self.last_beat = None  # the dead worker's numbers must not show as this one's
        self.last_beats.clear()
        self._set_state(WorkerState.STARTING)
        self.log.info("worker.spawned", epoch=self.epoch, pid=self.worker.pid, reason=reason)

    def _maybe_restart(self, now: float) -> None:
        if self.state is WorkerState.BACKOFF and self.health and \
                not self.health.may_resume():
            self.pending_resume_at = None  # too hot to start: wait for the ladder
            self._set_state(WorkerState.COOLING)
        elif self.state is WorkerState.BACKOFF and self.pending_resume_at is not None \
                and now >= self.pending_resume_at:
            self.pending_resume_at = None
            self.restarts += 1
            self._start_worker("restart")
        elif self.state is WorkerState.COOLING and (self.health is None
                                                     or self.health.may_resume()):
            self.log.info("worker.respawn_after_cooling", epoch=self.epoch)
            if self.metrics:
                self.metrics.restart("thermal")
            self._start_worker("thermal_resume")

    # Watchdog and kills --------------------------------------------------------------------
    def _check_watchdog(self, now: float) -> None:
        if self.state not in (WorkerState.STARTING, WorkerState.RUNNING, WorkerState.PAUSED):
            return
        verdict = self.watchdog.check(now)
        if verdict is None:
            return
        budget = verdict.details.get("heartbeat_timeout") or verdict.details.get(
            "stall_seconds") or verdict.details.get("startup_timeout")
        self.log.error(f"watchdog.{verdict.kind}", epoch=self.epoch, deadline_s=budget,
                       overdue_s=round(verdict.overdue_by, 3), details=verdict.details,
                       last_beats=list(self.last_beats))
        self._begin_kill(now, verdict.kill_reason, detail=str(verdict.details))

    def _begin_kill(self, now: float, reason: KillReason, detail: str = "") -> None:
        """End the worker: the reason is made durable first, then the kill sequence runs
        (cmd stop, faulthandler dump, SIGTERM, SIGKILL — where it starts depends on why)."""
        if self.worker is None:
            return
        if self.kill is not None:
            current = _SEVERITY.get(self.kill_reason, 0) if self.kill_reason else 0
            if _SEVERITY.get(reason, 0) > current:
                self.kill_reason = reason  # the exit is classified by the gravest reason
            if self.kill.escalate(reason):
                self.log.warning("worker.kill_escalated", epoch=self.epoch, reason=reason.value,
                                 detail=detail)
            return
        self.kill_reason = reason
        self.kill = KillSequence(KillSettings.from_config(self.config), reason)
        self._durable(self.wal.append, RecordType.EVENT, {
            "kind": "kill", "reason": reason.value, "detail": detail, "epoch": self.epoch,
            "t_wall": time.time()})
        self.log.warning("worker.killing", epoch=self.epoch, reason=reason.value, detail=detail)
        self._advance_kill(now)

    def _advance_kill(self, now: float) -> None:
        worker, seq = self.worker, self.kill
        if seq is None or worker is None:
            return
        left = self._left_behind(worker)
        action = seq.next_action(now, alive=left is not None)
        if action is Action.SEND_STOP:
            self._send(m.Cmd(epoch=worker.epoch, op="stop",
                             args={"deadline_s": self.config["stop_deadline"]}))
        elif action is Action.SEND_DUMP:
            self.log.warning("worker.dump_requested", epoch=self.epoch, pid=worker.pid,
                             last_beats=list(self.last_beats))
            with _suppress_lookup():
                os.kill(worker.pid, signal.SIGUSR1)  # faulthandler: every thread's stack
        elif action is Action.SEND_SIGTERM:
            self.log.warning("worker.sigterm", epoch=self.epoch, pid=worker.pid)
            worker.signal_group(signal.SIGTERM)
        elif action is Action.SEND_SIGKILL:
            self.log.warning("worker.sigkill", epoch=self.epoch, pid=worker.pid)
            worker.signal_group(signal.SIGKILL)
        elif action is Action.KILL_FAILED:
            confirm = KillSettings.from_config(self.config).kill_confirm
            reason = (f"worker pid {worker.pid} (epoch {worker.epoch}) is not gone {confirm:g} s "
                      f"after SIGKILL: {left}; nothing is started over it")
            self.outcome_reason = f"{reason}. Reset the GPU or reboot, then run start again"
            self.log.critical("worker.kill_failed", epoch=self.epoch, pid=worker.pid,
                              reason=reason,
                              advice="a process survived SIGKILL or still holds the GPU "
                                     "(stuck in the driver?); reboot or reset the GPU, then "
                                     "run start again")
            self._durable(self.wal.append, RecordType.EVENT, {
                "kind": "kill_failed", "epoch": self.epoch, "pid": worker.pid,
                "reason": reason, "t_wall": time.time()})
            self._set_state(WorkerState.KILL_FAILED)
            self._finish("kill_failed", EXIT_GAVE_UP)
            return
        if action in (Action.SEND_STOP, Action.WAIT) and not seq.signalled:
            target = WorkerState.STOPPING
        elif action is not Action.DONE:
            target = WorkerState.KILLING
        else:
            return
        if self.state is not target and self.state.has_process:
            self._set_state(target)

    def _left_behind(self, worker: WorkerProcess) -> str | None:
        """What of the worker is not gone yet, in words; None once nothing is: the
        process, its group, or (with NVML) a GPU context still listed under its pid."""
        if worker.group_alive():
            if worker.returncode is None:
                return "the process is still alive"
            return f"its process group {worker.pgid} lives on"
        if self.health is not None and not self.health.pid_released(worker.pid):
            return f"the GPU still lists pid {worker.pid} as holding a context"
        return None

    def _check_worker_exit(self, now: float) -> None:
        worker = self.worker
        if worker is None or worker.poll() is None:
            return
        if self.done_recorded and self.kill is None and not worker.group_alive():
            # The result is durable and no process is left: nothing will run over a GPU
            # context the driver keeps, so the run is complete; the operator is told.
            lingering = None
            if context := self._left_behind(worker):
                self.log.warning("worker.context_lingers", epoch=worker.epoch, pid=worker.pid,
                                 detail=context,
                                 advice="the result is durable; check nvidia-smi before the "
                                        "GPU's next job, and reset it if the pid stays")
        else:
            lingering = self._left_behind(worker)
        if lingering is not None:
            # The leader is gone but its group or GPU context is not: end them first,
            # never relaunch over them.
            self._begin_kill(now, KillReason.LINGERING, detail=lingering)
            return
        if self.kill is not None:
            self._advance_kill(now)  # lets the sequence see the worker gone
        for fd, stream in list(worker.output_fds.items()):
            # Drain to EOF: the tail of a faulthandler dump is what explains a hang.
            while fd in worker.output_fds:
                lines = worker.read_lines(fd)
                for line in lines:
                    self.log.info(f"worker.{stream}", epoch=worker.epoch, line=line)
                if not lines and fd in worker.output_fds:
                    break
        worker.close()
        if self.wal_failed:
            self.worker = None
            self.kill = None
            self._set_state(WorkerState.EXITED)
            self._finish("wal_failed", EXIT_GAVE_UP)
            return
        assert worker.returncode is not None
        info = ExitInfo(returncode=worker.returncode, killed_for=self.kill_reason,
                        fatal=bool(self.last_fail and self.last_fail.fatal),
                        fail_kind=self.last_fail.kind if self.last_fail else None,
                        completed=self.done_recorded)
        decision = self.policy.decide(now, info)
        self.log.info("worker.exited", epoch=worker.epoch, pid=worker.pid,
                      how=worker.describe_exit(), exit_class=decision.exit_class.value,
                      action=decision.action.value, reason=decision.reason)
        self.worker = None
        self.kill = None
        self._set_state(WorkerState.EXITED)
        if self.exit_code is None:
            self._decide(now, decision)

    def _decide(self, now: float, decision: Decision) -> None:
        action = decision.action.value
        if action == "complete":
            self._set_state(WorkerState.COMPLETED)
            self._finish("completed", EXIT_COMPLETED)
        elif self.stop_requested:
            self._record_stop(self.stop_requested, self.stop_desired)
        elif action == "give_up":
            self._give_up(decision.reason)
        elif action == "wait_cooldown":
            self._set_state(WorkerState.COOLING)
            self.log.warning("thermal.cooling", epoch=self.epoch)
        elif action == "stop":
            self._record_stop(decision.reason, "stopped")
        else:
            self._durable(self.wal.append, RecordType.EVENT, {
                "kind": "restart", "reason": decision.reason,
                "exit_class": decision.exit_class.value, "delay_s": decision.delay,
                "t_wall": time.time()})
            self.pending_resume_at = now + decision.delay
            self._set_state(WorkerState.BACKOFF)
            if self.metrics:
                self.metrics.restart(decision.exit_class.value)
            self.log.warning("worker.restart_scheduled", reason=decision.reason,
                             delay_s=round(decision.delay, 3),
                             exit_class=decision.exit_class.value)

    def _give_up(self, reason: str) -> None:
        self._durable(self.wal.append, RecordType.EVENT, {
            "kind": "gave_up", "reason": reason, "t_wall": time.time()})
        self.log.error("run.gave_up", reason=reason, ckpt_seq=self.durable_ckpt_seq,
                       advice="fix the cause, then run start again to resume")
        self.outcome_reason = reason
        if can_transition(self.state, WorkerState.GAVE_UP):
            self._set_state(WorkerState.GAVE_UP)
        self._finish("gave_up", EXIT_GAVE_UP)

    def _shutdown_worker_now(self) -> None:
        """On the way out, never leave a worker behind."""
        worker = self.worker
        if worker is None:
            return
        worker.signal_group(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while worker.group_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        worker.close()

    def _finish(self, outcome: str, code: int) -> None:
        if self.exit_code is None:
            self.outcome = outcome
            self.exit_code = code

    # GPU health -------------------------------------------------------------------------
    def _apply_health(self, now: float) -> None:
        assert self.health is not None
        for action in self.health.poll(now, self.worker.pid if self.worker else None):
            kind = action.kind
            if kind == "throttle":
                if self.state in (WorkerState.RUNNING, WorkerState.PAUSED):
                    self._send(m.Cmd(epoch=self.epoch, op="throttle",
                                     args={"duty": action.duty or 1.0}))
                continue
            if kind == "free_memory":
                if self.state is WorkerState.RUNNING:
                    self._send(m.Cmd(epoch=self.epoch, op="free_memory"))
                continue
            self._durable(self.wal.append, RecordType.EVENT, {
                "kind": kind, "reason": action.reason, "epoch": self.epoch,
                "t_wall": time.time()})
            if self.worker is not None:
                self._begin_kill(now, _KILL_REASON[kind], detail=action.reason)
            elif kind == "gpu_reset":
                self._give_up(action.reason)
            elif kind in ("thermal_stop", "thermal_kill") and self.state is WorkerState.BACKOFF:
                self.pending_resume_at = None
                self._set_state(WorkerState.COOLING)

    # Status -------------------------------------------------------------------------------
    def _set_state(self, new: WorkerState) -> None:
        check_transition(self.state, new)
        self.state = new

    def status(self) -> dict[str, Any]:
        beat = self.last_beat
        total = beat.units_total if beat else None
        done = beat.units_done if beat else self.durable_units
        metrics = beat.metrics if beat else {}
        lat = sorted(self.ckpt_latency)
        if self.outcome == "completed" and total:
            done = total  # the last beat predates the final units
        return {
            "run_id": self.run_dir.run_id,
            "state": self.state.value,
            "outcome": self.outcome,
            "supervisor_pid": os.getpid(),
            "epoch": self.epoch,
            "worker_pid": self.worker.pid if self.worker else None,
            "restarts": self.restarts,
            "units_done": done,
            "units_total": total,
            "progress": (done / total) if total else None,
            "units_per_s": metrics.get("units_per_s"),
            "dims_per_s": self._dims_per_s(metrics.get("units_per_s")),
            "duty": metrics.get("duty"),
            "durable_ckpt_seq": self.durable_ckpt_seq,
            "durable_units": self.durable_units,
            "last_checkpoint_wall": self.last_ckpt_wall,
            "ckpt_ack_ms_p50": round(lat[len(lat) // 2] * 1000, 3) if lat else None,
            "protocol_errors": self.protocol_errors,
            "foreign_dropped": self.dropped_foreign,
            "gpu": self.health.snapshot() if self.health else None,
            "supervisor_rss_bytes": self._me.memory_info().rss,
            "updated_wall": time.time(),
        }

    def _dims_per_s(self, units_per_s: Any) -> float | None:
        """The NKAT job's units are blocks of ``unit_dims`` dimensions: show dims/s."""
        spec = self.run_dir.info.spec
        if spec.get("job") != NKAT_JOB:
            return None
        unit_dims = spec.get("params", {}).get("unit_dims")
        if isinstance(units_per_s, (int, float)) and isinstance(unit_dims, int):
            return float(units_per_s) * unit_dims
        return None

    def _write_status(self) -> None:
        self._last_status = self.clock()
        status = self.status()
        try:
            self.run_dir.write_status(status)
        except OSError as exc:
            self.log.warning("status.write_failed", error=str(exc))
        try:
            self.esock.send(json.dumps({"t": "status", **status}).encode(), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        if self.on_status:
            self.on_status(status)
        if self.metrics:
            self.metrics.update_from_status(status)


_LEVELS = {"debug", "info", "warning", "error", "critical"}
_RESERVED = {"event", "level", "ts", "run_id", "component", "epoch"}
#: Which kill reason wins when a second one arrives during a kill: the exit is classified
#: by the gravest (a GPU needing a reset must not be restarted as a mere hang).
_SEVERITY = {KillReason.GPU_RESET: 5, KillReason.WAL_FAILED: 4, KillReason.XID_RESTART: 3,
             KillReason.THERMAL_EMERGENCY: 2, KillReason.THERMAL_STOP: 1}

_KILL_REASON = {"thermal_stop": KillReason.THERMAL_STOP,
                "thermal_kill": KillReason.THERMAL_EMERGENCY,
                "restart": KillReason.XID_RESTART, "gpu_reset": KillReason.GPU_RESET,
                "leak": KillReason.LEAK}


def _suppress_lookup() -> contextlib.AbstractContextManager[None]:
    return contextlib.suppress(ProcessLookupError)
