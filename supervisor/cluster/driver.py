"""The Ray engine's driver: the run's shards onto node agents, and off the nodes Ray loses.

    code = Driver(ray, run, config, log, say=print, backend="numpy").run()   # ExitCode

The driver owns the run: its lock, its control and events sockets, status.json, and (via
the journal actor pinned to this machine) its WAL. It starts one node agent per unit of
the agent's resource the cluster offers (a GPU, a CPU with numpy, or ``ray_resource``),
gives each idle agent the next pending shard as a new attempt, and waits on the calls
with ``ray.wait``. Membership and failure detection are Ray's alone: a call that raises
``RayActorError`` means the agent's node or process is gone; the shard is journaled as
``retired`` from that node, goes back to the head of the queue, and a replacement agent is
asked for. An attempt that ends in failure on its node (restarts spent, the journal out of
reach) retires that agent the same way. A shard whose attempts fail ``MAX_FAILURES`` times
in a row without durable progress gives the run up (exit 3, resumable), and so does one
whose nodes vanish ``MAX_LOSSES`` times in a row without progress (a shard that kills its
node). A stop (``stop``, SIGINT, SIGTERM) reaches the nodes through the journal; each
stops its worker with a final checkpoint, and the driver records the stop once none runs
(a node that does not report its stop by the deadline is ended, its last durable
checkpoint kept). When every shard is done the journal merges them into the result.
Every call to the journal has a deadline: a journal that fails or stops answering gives
the run up. docs/architecture.md draws it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import signal
import sys
import time
from typing import Any

import zmq

from nkat.supervisor import control, journal
from nkat.supervisor.bounded_router import BoundedRouter
from nkat.supervisor.cluster.board import ray_status
from nkat.supervisor.cluster.journal import LOCK_WAIT_S, JournalRefused, RunJournal, ShardTask
from nkat.supervisor.cluster.node import NodeAgent, NodeJob, ShardOutcome
from nkat.supervisor.cluster.settings import RaySettings, agent_capacity, agent_resource
from nkat.supervisor.config import Config
from nkat.supervisor.exitcode import ExitCode
from nkat.supervisor.outlets import Outlets
from nkat.supervisor.rundir import RunDir
from nkat.supervisor.wal import WalError

#: Attempts at one shard that may fail on their nodes in a row, without durable progress,
#: before the run gives up (every node failing alike points at the job, not at a node).
MAX_FAILURES = 3
#: Attempts at one shard whose node or process may vanish in a row, without durable
#: progress, before the run gives up (nodes do go; a shard that takes each down is a bug).
MAX_LOSSES = 6
#: How often the driver writes status.json and re-counts the cluster's capacity.
STATUS_EVERY_S = 1.0
#: Beyond the stop deadline, how long nodes get to report their stop before they are
#: ended (their last durable checkpoint is kept either way).
STOP_GRACE_S = 10.0
#: How long the journal may take to merge the shards and write the result.
FINISH_WAIT_S = 300.0
#: How many ``ray_lease`` periods a status snapshot may stay unanswered before the run
#: gives up (the loop never waits for it: it asks again once the answer is in).
SLOW_SNAPSHOTS = 3
#: Node agents in a row that Ray may fail to create before the run gives up (a node
#: without this package, say): each is replaced at once otherwise.
MAX_PLACEMENT_FAILURES = 5
#: Beyond the journal's own wait for the WAL's lock, what its ``open`` may take.
OPEN_MARGIN_S = 60.0
#: The longest the driver waits for agents in one turn.
WAIT_S = 0.1
#: Stop outcomes of a node: the shard is not the node's fault.
_CLEAN = ("completed", "stopped")


class JournalFailed(Exception):
    """The journal refused, failed, or did not answer: the run cannot go on as it is."""

    def __init__(self, reason: str, kind: str = "gave_up",
                 code: ExitCode = ExitCode.GAVE_UP) -> None:
        super().__init__(reason)
        self.reason, self.kind, self.code = reason, kind, code

    @classmethod
    def of(cls, exc: Exception) -> JournalFailed:
        """From what ``ray.get`` raised for a journal call."""
        cause = getattr(exc, "cause", None)
        if isinstance(cause, JournalRefused):
            return cls(str(cause), code=ExitCode.USAGE if cause.locked else ExitCode.GAVE_UP)
        if isinstance(cause, WalError):
            return cls(str(cause), kind="wal_failed")
        if isinstance(cause, BaseException):
            return cls(f"the run's journal failed: {type(cause).__name__}: {cause}")
        return cls(f"the run's journal is gone: {_last_line(str(exc))}")


@dataclasses.dataclass
class Agent:
    """One node agent: the actor, where Ray placed it, and the attempt it runs."""

    id: str
    handle: Any
    ready: Any  # the where() call, until it answers
    where: dict[str, Any] | None = None
    task: ShardTask | None = None
    call: Any = None  # the run_shard call in flight


class Driver:
    """Runs one run's shards on the Ray cluster ``ray`` is connected to."""

    def __init__(self, ray: Any, run: RunDir, config: Config, log: Any, *, say: Any,
                 backend: str, sim_gpu: str | None = None, on_status: Any = None,
                 metrics: Any = None) -> None:
        self.ray, self.run_dir, self.config, self.log, self.say = ray, run, config, log, say
        self.settings = RaySettings.from_config(config)
        self.resource, self.agent_options = agent_resource(self.settings, backend)
        self.backend, self.sim_gpu = backend, sim_gpu
        self._outlet_parts = (on_status, metrics)
        self.agents: dict[str, Agent] = {}
        self.pending: collections.deque[int] = collections.deque()
        self.failures: collections.Counter[int] = collections.Counter()
        self.losses: collections.Counter[int] = collections.Counter()
        self.signals: collections.deque[int] = collections.deque()
        self.stop: tuple[str, journal.Desired] | None = None
        self.stop_by: float | None = None
        self.outcome: tuple[str, str] | None = None
        self.snapshot: dict[str, Any] = {}
        self.started_wall = time.time()
        self._next_status = self._next_scale = 0.0
        self._snapshot_call: Any = None  # the status snapshot in flight
        self._snapshot_sent = 0.0
        self._placement_failures = 0
        self._waiting_said = False
        self._numbers = iter(range(1 << 30))
        self.journal: Any = None  # the journal actor, once started
        self.ctx = zmq.Context()

    # Life -----------------------------------------------------------------------------
    def run(self) -> ExitCode:
        previous = {sig: signal.signal(sig, lambda s, _f: self.signals.append(s))
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            self._bind()
            self.journal = self._start_journal()
            # The agents start while the journal opens the WAL: both take a new process.
            self._scale(len(self.run_dir.info.shards))
            try:
                self._ask(self.journal.open.remote(), LOCK_WAIT_S + OPEN_MARGIN_S)
                self.snapshot = self._ask(self.journal.snapshot.remote())
            except JournalFailed as exc:
                return self._refused(exc)
            self.pending.extend(k for k, s in enumerate(self.snapshot["shards"])
                                if not s["done"])
            self.log.info("ray.driving", shards=len(self.snapshot["shards"]),
                          pending=len(self.pending), resource=self.resource,
                          capacity=self._capacity())
            try:
                return self._loop()
            except Exception as exc:  # noqa: BLE001 - recorded while the journal is there
                self.log.critical("supervisor.failed", error=f"{type(exc).__name__}: {exc}",
                                  engine="ray")
                self.outcome = ("gave_up", f"the driver failed: {type(exc).__name__}: {exc}")
                return self._give_up()
        finally:
            for agent in list(self.agents.values()):
                self._drop(agent)
            if self.journal is not None:
                with contextlib.suppress(Exception):
                    self.ray.get(self.journal.close.remote(), timeout=30)
                with contextlib.suppress(Exception):
                    self.ray.kill(self.journal, no_restart=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.ctx.destroy(linger=0)

    def _loop(self) -> ExitCode:
        while True:
            try:
                code = self._turn()
            except JournalFailed as exc:
                self.outcome = self.outcome or (exc.kind, exc.reason)
                code = None
            if code is not None:
                return code

    def _turn(self) -> ExitCode | None:
        """One turn: what the operator asked, how the run ends, the agents' news."""
        self._drain_control()
        self._take_signals()
        if self.outcome is not None:
            return self._give_up()
        busy = [a for a in self.agents.values() if a.call is not None]
        if self.stop is not None and not busy:
            return self._record_stop()
        if not self.pending and not busy:
            return self._finish()
        now = time.monotonic()
        if self.stop is None:
            if now >= self._next_scale:
                self._scale()
            self._assign()
        elif self.stop_by is not None and now > self.stop_by:
            for agent in busy:
                self._end_unstopped(agent)
        self._wait()
        self._poll_snapshot()
        if time.monotonic() >= self._next_status:
            self._write_status("stopping" if self.stop else "running")
        return None

    def _start_journal(self) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = self.ray.get_runtime_context().get_node_id()
        actor = self.ray.remote(RunJournal).options(
            num_cpus=0, max_restarts=0, max_concurrency=1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False))
        wal_options = {k: int(self.config[k]) for k in ("backup_checkpoints", "segment_size")}
        return actor.remote(str(self.run_dir.path.parent.parent), self.run_dir.run_id,
                            self.run_dir.info.created, self.backend, LOCK_WAIT_S, wal_options)

    def _ask(self, call: Any, wait_s: float | None = None) -> Any:
        """A journal call's answer, within ``wait_s`` (default ``ray_lease``)."""
        from ray.exceptions import GetTimeoutError, RayError

        wait = wait_s or self.settings.ray_lease
        try:
            return self.ray.get(call, timeout=wait)
        except GetTimeoutError:
            raise JournalFailed(f"the run's journal did not answer in {wait:g} s") from None
        except RayError as exc:
            raise JournalFailed.of(exc) from None

    def _refresh(self) -> None:
        """The journal's view, now (after an attempt ended, before the run ends)."""
        self._use(self._ask(self.journal.snapshot.remote()))

    def _poll_snapshot(self) -> None:
        """The status's view of the journal, without waiting: one call in flight, read
        when it is in; a journal silent for ``SLOW_SNAPSHOTS`` leases gives the run up."""
        now = time.monotonic()
        if self._snapshot_call is None:
            if now >= self._next_status:
                self._snapshot_call, self._snapshot_sent = self.journal.snapshot.remote(), now
            return
        ready, _ = self.ray.wait([self._snapshot_call], timeout=0)
        if ready:
            call, self._snapshot_call = self._snapshot_call, None
            self._use(self._ask(call))
        elif now - self._snapshot_sent > SLOW_SNAPSHOTS * self.settings.ray_lease:
            raise JournalFailed(f"the run's journal did not answer for "
                                f"{now - self._snapshot_sent:.0f} s")

    def _use(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot
        if snapshot.get("failed"):
            raise JournalFailed(str(snapshot["failed"]), kind="wal_failed")

    # Agents -----------------------------------------------------------------------------
    def _capacity(self) -> int:
        return agent_capacity(self.ray.cluster_resources(), self.resource, self.agent_options)

    def _scale(self, needed: int | None = None) -> None:
        """As many agents as the cluster has room for, and the shards need (``needed``:
        before the journal says how many shards are left)."""
        self._next_scale = time.monotonic() + STATUS_EVERY_S
        running = sum(1 for a in self.agents.values() if a.call is not None)
        if needed is None:
            needed = len(self.pending) + running
        capacity = self._capacity()
        want = min(capacity, needed)
        if capacity == 0 and needed and not self._waiting_said:
            self._waiting_said = True
            self.log.warning("ray.no_capacity", resource=self.resource, pending=needed)
            self.say(f"no {self.resource} left on the Ray cluster: waiting for a node that "
                     "offers it (the shards resume from their durable checkpoints)")
        elif capacity:
            self._waiting_said = False
        idle = [a for a in self.agents.values() if a.call is None]
        while len(self.agents) > want and idle:
            self._drop(idle.pop())
        job = NodeJob(self.run_dir.run_id, self.run_dir.info.spec, dict(self.config.settings),
                      dict(self.config.sources), self.run_dir.info.job_env, self.sim_gpu)
        while len(self.agents) < want:
            agent_id = f"a{next(self._numbers)}"
            handle = self.ray.remote(NodeAgent).options(
                max_restarts=0, max_concurrency=1, **self.agent_options).remote(job)
            self.agents[agent_id] = Agent(agent_id, handle, handle.where.remote())

    def _assign(self) -> None:
        for agent in list(self.agents.values()):
            if not self.pending:
                return
            if agent.where is None or agent.call is not None:
                continue
            shard = self.pending.popleft()
            node = str(agent.where["node"])[:8]
            task: ShardTask | None = self._ask(self.journal.begin.remote(shard, node))
            if task is None:  # its node finished it just before Ray lost the node
                self.log.info("shard.completed", shard=shard, node=node, seen="at assignment")
                continue
            agent.task = task
            agent.call = agent.handle.run_shard.remote(self.journal, task,
                                                       self.settings.ray_lease)
            self.log.info("shard.assigned", shard=shard, attempt=task.attempt,
                          node=node, host=agent.where.get("host"), agent=agent.id,
                          resume_units=task.units_done)

    def _wait(self) -> None:
        """The next agent placed or attempt ended, if one comes within ``WAIT_S``."""
        from ray.exceptions import RayActorError, RayError

        starting = {a.ready: a for a in self.agents.values() if a.where is None}
        calls = {a.call: a for a in self.agents.values() if a.call is not None}
        if not starting and not calls:  # nothing out (no capacity, or stopping)
            time.sleep(WAIT_S)
            return
        ready, _ = self.ray.wait([*starting, *calls], num_returns=1, timeout=WAIT_S)
        for ref in ready:
            if ref in starting:
                agent = starting[ref]
                try:
                    agent.where = self.ray.get(ref)
                except RayError as exc:
                    self._not_placed(agent, exc)
                else:
                    self._placement_failures = 0
                continue
            agent = calls[ref]
            try:
                outcome: ShardOutcome = self.ray.get(ref)
            except RayActorError as exc:
                self._lost(agent, f"its node or process is gone ({type(exc).__name__})")
                continue
            except RayError as exc:
                self._lost(agent, f"its call failed: {_last_line(str(exc))}")
                continue
            self._ended(agent, outcome)

    def _not_placed(self, agent: Agent, exc: Exception) -> None:
        """Ray could not create the agent (its node went, or it cannot start there): a
        replacement is asked for, unless that keeps failing."""
        self._drop(agent)
        self._placement_failures += 1
        why = _last_line(str(exc))
        self.log.warning("node.not_placed", agent=agent.id, error=why,
                         in_a_row=self._placement_failures)
        if self._placement_failures >= MAX_PLACEMENT_FAILURES:
            self.outcome = ("gave_up", f"Ray could not start a node agent "
                                       f"{MAX_PLACEMENT_FAILURES} times in a row; the last: "
                                       f"{why}")

    def _ended(self, agent: Agent, outcome: ShardOutcome) -> None:
        """An attempt ended on its node: its shard is done, stopped, or failed there."""
        task = agent.task
        assert task is not None
        agent.call, agent.task = None, None
        if outcome.kind in _CLEAN:
            self._refresh()
            if self._shard_done(task, outcome.node):
                return
            self.pending.appendleft(task.shard)  # stopped: resumed by the next start
            return
        reason = outcome.kind + (f": {outcome.reason}" if outcome.reason else "")
        self._retire(agent, task.shard, reason, kept=outcome.kept)
        self._requeue(task, reason, self.failures, MAX_FAILURES, "failed")

    def _lost(self, agent: Agent, why: str) -> None:
        """Ray says the agent is gone: its shard goes back to the queue, unless the shard
        finished just before."""
        task = agent.task
        if task is None:
            self._drop(agent)
            return
        finished = self._requeue(task, why, self.losses, MAX_LOSSES, "was lost with its node")
        self._retire(agent, task.shard, why, finished=finished)

    def _requeue(self, task: ShardTask, why: str, counter: collections.Counter[int],
                 limit: int, what: str) -> bool:
        """``task``'s shard back to the head of the queue, unless it is done (True); a
        shard that ends ``limit`` attempts in a row without durable progress gives the run
        up."""
        self._refresh()
        if self._shard_done(task, None):
            return True
        self.pending.appendleft(task.shard)
        if self.snapshot["shards"][task.shard]["units_done"] > task.units_done:
            self.failures.pop(task.shard, None)
            self.losses.pop(task.shard, None)
            return False
        counter[task.shard] += 1
        if counter[task.shard] >= limit:
            self.outcome = ("gave_up", f"shard {task.shard} {what} {limit} attempts in a row "
                                       f"without progress; the last: {why}")
        return False

    def _shard_done(self, task: ShardTask, node: str | None) -> bool:
        if not self.snapshot["shards"][task.shard]["done"]:
            return False
        self.failures.pop(task.shard, None)
        self.losses.pop(task.shard, None)
        self.log.info("shard.completed", shard=task.shard, node=node, attempt=task.attempt)
        return True

    def _retire(self, agent: Agent, shard: int, why: str, kept: str | None = None,
                finished: bool = False) -> None:
        node = str((agent.where or {}).get("node", "?"))[:8]
        self._drop(agent)
        self._ask(self.journal.record.remote(journal.Event(
            journal.EventKind.RETIRED, f"node {node}: {why}",
            fields={"worker": agent.id, "node": node, "shard": shard})))
        self.log.warning("node.retired", agent=agent.id, node=node, shard=shard, reason=why,
                         kept=kept)
        if finished:  # the shard's last checkpoint was durable before its node went
            self.say(f"node {node} left ({why}) just after shard {shard} finished there")
        else:
            self.say(f"shard {shard} left node {node} ({why}); it resumes elsewhere from its "
                     "last durable checkpoint")

    def _end_unstopped(self, agent: Agent) -> None:
        """Past the stop deadline: the agent is ended, its last durable checkpoint kept
        (the journal fences whatever it might still send)."""
        task = agent.task
        self._drop(agent)
        if task is not None:
            self.pending.appendleft(task.shard)
        self.log.warning("node.stop_forced", agent=agent.id,
                         shard=task.shard if task else None,
                         reason="it did not report its stop within the stop deadline")

    def _drop(self, agent: Agent) -> None:
        """Forget the agent and end its actor (its calls are not waited on again)."""
        self.agents.pop(agent.id, None)
        agent.call, agent.task = None, None
        self._next_scale = 0.0  # a replacement, if the cluster has room
        with contextlib.suppress(Exception):  # already gone with its node
            self.ray.kill(agent.handle, no_restart=True)

    # Ending -----------------------------------------------------------------------------
    def _finish(self) -> ExitCode:
        self._refresh()  # not a status snapshot sent before the last shard was done
        snap = self.snapshot
        self.log.info("shards.merging", shards=len(snap["shards"]))
        result, error = self._ask(self.journal.finish.remote({
            "epochs": snap["workers_started"], "restarts": snap["restarts"],
            "backend": snap["backends"][-1] if snap["backends"] else self.backend,
            "device": f"ray: {self.resource}"}), FINISH_WAIT_S)
        if error is not None:
            self.outcome = ("gave_up", f"the shards' states could not be merged: {error}")
            return self._give_up()
        self.log.info("run.completed", result=str(self.run_dir.result_file), engine="ray")
        with contextlib.suppress(JournalFailed):  # the result is durable: the run is done
            self._refresh()
        self._write_status("completed", "completed")
        return ExitCode.COMPLETED

    def _record_stop(self) -> ExitCode:
        assert self.stop is not None
        why, desired = self.stop
        self._refresh()  # the nodes' final checkpoints are durable by now
        seq = int(self.snapshot.get("durable_ckpt_seq", 0))
        self._ask(self.journal.record.remote(journal.Stop(why, desired, seq)))
        self.log.info("run.stopped", reason=why, desired=desired.value, engine="ray")
        self._write_status("stopped", "stopped")
        return ExitCode.STOPPED

    def _give_up(self) -> ExitCode:
        assert self.outcome is not None
        kind, reason = self.outcome
        with contextlib.suppress(JournalFailed):  # a failed WAL takes no more records
            self._ask(self.journal.record.remote(journal.Event.gave_up(reason)))
        self.log.error("run.gave_up", reason=reason, kind=kind, engine="ray")
        self._write_status("gave_up", "gave_up", reason)
        print(f"nkat-supervise: run {self.run_dir.run_id} gave up: {reason}\n  The run is "
              f"resumable: see `nkat-supervise logs {self.run_dir.run_id}` and start it again "
              "once fixed.", file=sys.stderr)
        return ExitCode.GAVE_UP

    def _refused(self, exc: JournalFailed) -> ExitCode:
        """The journal could not take the run: nothing was computed or recorded."""
        self.log.error("ray.journal_refused", reason=exc.reason)
        named = exc.reason.startswith(f"run {self.run_dir.run_id} ")
        print(f"nkat-supervise: error: "
              f"{exc.reason if named else f'run {self.run_dir.run_id}: {exc.reason}'}",
              file=sys.stderr)
        return exc.code

    # Operator ---------------------------------------------------------------------------
    def _request_stop(self, why: str, desired: journal.Desired) -> None:
        if self.stop is not None:
            return
        self.stop = (why, desired)
        deadline = float(self.config["stop_deadline"]) + STOP_GRACE_S + self.settings.ray_lease
        self.stop_by = time.monotonic() + deadline
        self.journal.request_stop.remote(desired.value)
        self.log.info("run.stopping", reason=why, engine="ray")

    def _take_signals(self) -> None:
        while self.signals:
            sig = self.signals.popleft()
            if sig == signal.SIGHUP:
                self.log.info("supervisor.sighup_ignored")
            elif sig == signal.SIGINT and self.stop is not None:
                self.stop_by = 0.0  # a second Ctrl-C: end the nodes now
            else:
                self._request_stop(f"signal {signal.Signals(sig).name}",
                                   journal.Desired.RUNNING if sig == signal.SIGTERM
                                   else journal.Desired.STOPPED)

    def _bind(self) -> None:
        for name in ("control", "events"):
            self.run_dir.clear_socket(name)
        old_umask = os.umask(0o177)
        try:
            self.crouter = BoundedRouter(self.ctx, self.run_dir.endpoint("control"),
                                         max_peers=32, refuse=True,
                                         max_bytes=control.MAX_REQUEST_BYTES)
            esock = self.ctx.socket(zmq.PUB)
            esock.setsockopt(zmq.LINGER, 0)
            esock.bind(self.run_dir.endpoint("events"))
            on_status, metrics = self._outlet_parts
            self.outlets = Outlets(self.run_dir, self.log, esock, on_status=on_status,
                                   metrics=metrics)
        finally:
            os.umask(old_umask)

    def _drain_control(self) -> None:
        for frames in self.crouter.frames(100):
            try:
                op = control.decode_request(frames[1])["op"] if len(frames) == 2 else None
            except ValueError as exc:
                reply: dict[str, Any] = {"ok": False, "error": str(exc)}
            else:
                if op is None:
                    continue
                reply = self._on_control(op)
            with contextlib.suppress(zmq.ZMQError):
                self.crouter.sock.send_multipart([frames[0], control.encode_reply(reply)],
                                                 zmq.NOBLOCK)

    def _on_control(self, op: str) -> dict[str, Any]:
        if op == "status":
            return {"ok": True, "status": self._status("stopping" if self.stop else "running")}
        if op == "stop":
            self._request_stop("operator", journal.Desired.STOPPED)
            return {"ok": True, "message": "stopping: each node makes a final checkpoint"}
        return {"ok": False, "error": f"{op} is not available with the ray engine (its "
                                      "workers run on other machines); status and stop are"}

    def _status(self, state: str, outcome: str | None = None) -> dict[str, Any]:
        return ray_status(self.run_dir.run_id, self.run_dir.info.spec, self.snapshot,
                          [(a.id, a.task, a.where) for a in self.agents.values()],
                          state=state, outcome=outcome, supervisor_pid=os.getpid(),
                          started_wall=self.started_wall)

    def _write_status(self, state: str, outcome: str | None = None,
                      reason: str | None = None) -> None:
        self._next_status = time.monotonic() + STATUS_EVERY_S
        status = self._status(state, outcome)
        if reason:
            status["reason"] = reason
        self.outlets.write_status(status)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _last_line(text: str) -> str:
    """The last line of a Ray error (its traceback ends with the exception itself)."""
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    return lines[-1] if lines else text
