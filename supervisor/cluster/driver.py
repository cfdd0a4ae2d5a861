"""The Ray engine's driver: the run's shards onto node agents, and off the nodes Ray loses.

    code = Driver(ray, run, config, log, say=print).run()   # after ray.init; ExitCode

The driver owns the run: its lock, its control and events sockets, status.json, and (via
the journal actor pinned to this machine) its WAL. It starts one node agent per unit of
the agent's resource the cluster offers (a GPU, a CPU with numpy, or ``ray_resource``),
gives each idle agent the next pending shard as a new attempt, and waits on the calls
with ``ray.wait``. Membership and failure detection are Ray's alone: a call that raises
``RayActorError`` means the agent's node or process is gone; the shard is journaled as
``retired`` from that node, goes back to the head of the queue, and a replacement agent is
asked for. An attempt that ends in failure on its node (restarts spent, the journal out of
reach) retires that agent the same way; a shard that fails ``MAX_FAILURES`` attempts in a
row without durable progress gives the run up (exit 3, resumable). A stop (``stop``,
SIGINT, SIGTERM) reaches the nodes through the journal; each stops its worker with a
final checkpoint, and the driver records the stop once none runs. When every shard is
done the journal merges them into the result. docs/architecture.md draws it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import signal
import sys
import time
from typing import Any

import zmq

from nkat.supervisor import control, journal
from nkat.supervisor.bounded_router import BoundedRouter
from nkat.supervisor.cluster.board import ray_status
from nkat.supervisor.cluster.journal import RunJournal, ShardTask
from nkat.supervisor.cluster.node import NodeAgent, NodeJob, ShardOutcome
from nkat.supervisor.cluster.settings import RaySettings, agent_resource
from nkat.supervisor.config import Config
from nkat.supervisor.exitcode import ExitCode
from nkat.supervisor.outlets import Outlets
from nkat.supervisor.rundir import RunDir

#: Attempts at one shard that may fail in a row, without durable progress, before the
#: run gives up (every node failing alike points at the job, not at a node).
MAX_FAILURES = 3
#: How often the driver writes status.json and re-counts the cluster's capacity.
STATUS_EVERY_S = 1.0
#: Beyond the stop deadline, how long nodes get to report their stop before they are
#: killed (their last durable checkpoint is kept either way).
STOP_GRACE_S = 10.0


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
        self.signals: collections.deque[int] = collections.deque()
        self.stop: tuple[str, journal.Desired] | None = None
        self.stop_by: float | None = None
        self.outcome: tuple[str, str | None] | None = None
        self.snapshot: dict[str, Any] = {}
        self.started_wall = time.time()
        self._next_status = 0.0
        self._numbers = iter(range(1 << 30))
        self.journal: Any = None  # the journal actor, once started
        self.ctx = zmq.Context()

    # Life -----------------------------------------------------------------------------
    def run(self) -> ExitCode:
        previous = {sig: signal.signal(sig, lambda s, _f: self.signals.append(s))
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            self._bind()
            self.journal = self._open_journal()
            # The agents start while the journal opens the WAL: both take a new process.
            self._scale(len(self.run_dir.info.shards))
            self.snapshot = self.ray.get(self.journal.snapshot.remote())
            self.pending.extend(k for k, s in enumerate(self.snapshot["shards"])
                                if not s["done"])
            self.log.info("ray.driving", shards=len(self.snapshot["shards"]),
                          pending=len(self.pending), resource=self.resource,
                          capacity=self._capacity())
            return self._loop()
        finally:
            for agent in self.agents.values():
                self.ray.kill(agent.handle, no_restart=True)
            if self.journal is not None:
                with contextlib.suppress(Exception):
                    self.ray.get(self.journal.close.remote(), timeout=30)
                self.ray.kill(self.journal, no_restart=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.ctx.destroy(linger=0)

    def _loop(self) -> ExitCode:
        from ray.exceptions import RayError

        while True:
            self._drain_control()
            self._take_signals()
            busy = [a for a in self.agents.values() if a.call is not None]
            if self.stop is not None and not busy:
                return self._record_stop()
            if self.outcome is not None:
                return self._give_up()
            if not self.pending and not busy:
                return self._finish()
            if self.stop is None:
                self._scale()
                self._assign()
            elif self.stop_by is not None and time.monotonic() > self.stop_by:
                for agent in busy:  # a node that cannot report its stop is ended
                    self._lost(agent, "it did not stop within the stop deadline")
            self._wait(busy)
            if time.monotonic() >= self._next_status:
                try:
                    self.snapshot = self.ray.get(self.journal.snapshot.remote(),
                                                 timeout=self.settings.ray_lease)
                except RayError as exc:
                    self.outcome = ("gave_up", f"the journal actor failed: {exc}")
                    continue
                if self.snapshot.get("failed"):
                    self.outcome = ("wal_failed", self.snapshot["failed"])
                    continue
                self._write_status("stopping" if self.stop else "running")

    def _open_journal(self) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = self.ray.get_runtime_context().get_node_id()
        actor = self.ray.remote(RunJournal).options(
            num_cpus=0, max_restarts=0, max_concurrency=1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False))
        return actor.remote(str(self.run_dir.path.parent.parent), self.run_dir.run_id,
                            self.run_dir.info.created, self.backend)

    # Agents -----------------------------------------------------------------------------
    def _capacity(self) -> int:
        return int(self.ray.cluster_resources().get(self.resource, 0))

    def _scale(self, needed: int | None = None) -> None:
        """As many agents as the cluster has room for, and the shards need (``needed``:
        before the journal says how many shards are left)."""
        running = sum(1 for a in self.agents.values() if a.call is not None)
        if needed is None:
            needed = len(self.pending) + running
        want = min(self._capacity(), needed)
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
        for agent in self.agents.values():
            if not self.pending:
                return
            if agent.where is None or agent.call is not None:
                continue
            shard = self.pending.popleft()
            node = str(agent.where["node"])[:8]
            agent.task = self.ray.get(self.journal.begin.remote(shard, node))
            agent.call = agent.handle.run_shard.remote(self.journal, agent.task,
                                                       self.settings.ray_lease)
            self.log.info("shard.assigned", shard=shard, attempt=agent.task.attempt,
                          node=node, host=agent.where.get("host"), agent=agent.id,
                          resume_units=agent.task.units_done)

    def _wait(self, busy: list[Agent]) -> None:
        from ray.exceptions import RayActorError, RayError

        starting = {a.ready: a for a in self.agents.values() if a.where is None}
        calls = {a.call: a for a in busy}
        ready, _ = self.ray.wait([*starting, *calls], num_returns=1, timeout=0.1)
        for ref in ready:
            if ref in starting:
                agent = starting[ref]
                try:
                    agent.where = self.ray.get(ref)
                except RayError:
                    self.agents.pop(agent.id, None)  # placed on a node that went: anew
                continue
            agent = calls[ref]
            try:
                outcome: ShardOutcome = self.ray.get(ref)
            except RayActorError as exc:
                self._lost(agent, f"its node or process is gone ({type(exc).__name__})")
                continue
            except RayError as exc:
                self._lost(agent, f"its call failed: {exc}")
                continue
            self._ended(agent, outcome)

    def _ended(self, agent: Agent, outcome: ShardOutcome) -> None:
        """An attempt ended on its node: its shard is done, stopped, or failed there."""
        task = agent.task
        assert task is not None
        agent.call, agent.task = None, None
        self.snapshot = self.ray.get(self.journal.snapshot.remote())
        shard = self.snapshot["shards"][task.shard]
        progressed = shard["units_done"] > task.units_done
        if outcome.kind == "completed" and shard["done"]:
            self.failures.pop(task.shard, None)
            self.log.info("shard.completed", shard=task.shard, node=outcome.node,
                          attempt=task.attempt)
            return
        self.pending.appendleft(task.shard)
        if outcome.kind in ("completed", "stopped"):
            return
        self.failures[task.shard] = 0 if progressed else self.failures[task.shard] + 1
        reason = f"{outcome.kind}" + (f": {outcome.reason}" if outcome.reason else "")
        self._retire(agent, task.shard, reason, kept=outcome.kept)
        if self.failures[task.shard] >= MAX_FAILURES:
            self.outcome = ("gave_up", f"shard {task.shard} failed {MAX_FAILURES} attempts in "
                                       f"a row on its nodes; the last: {reason}")

    def _lost(self, agent: Agent, why: str) -> None:
        """Ray says the agent is gone (or it would not stop): its shard goes back."""
        if agent.task is not None:
            self.pending.appendleft(agent.task.shard)
            self._retire(agent, agent.task.shard, why)
        else:
            self._drop(agent)

    def _retire(self, agent: Agent, shard: int, why: str, kept: str | None = None) -> None:
        node = str((agent.where or {}).get("node", "?"))[:8]
        self.journal.record.remote(journal.Event(
            journal.EventKind.RETIRED, f"node {node}: {why}",
            fields={"worker": agent.id, "node": node, "shard": shard}))
        self.log.warning("node.retired", agent=agent.id, node=node, shard=shard, reason=why,
                         kept=kept)
        self.say(f"shard {shard} left node {node} ({why}); it resumes elsewhere from its "
                 "last durable checkpoint")
        self._drop(agent)

    def _drop(self, agent: Agent) -> None:
        self.agents.pop(agent.id, None)
        self.ray.kill(agent.handle, no_restart=True)

    # Ending -----------------------------------------------------------------------------
    def _finish(self) -> ExitCode:
        snap = self.snapshot
        self.log.info("shards.merging", shards=len(snap["shards"]))
        result, error = self.ray.get(self.journal.finish.remote({
            "epochs": snap["workers_started"], "restarts": snap["restarts"],
            "backend": snap["backends"][-1] if snap["backends"] else self.backend,
            "device": f"ray: {self.resource}"}))
        if error is not None:
            self.outcome = ("gave_up", f"the shards' states could not be merged: {error}")
            return self._give_up()
        self.log.info("run.completed", result=str(self.run_dir.result_file), engine="ray")
        self.snapshot = self.ray.get(self.journal.snapshot.remote())
        self._write_status("completed", "completed")
        return ExitCode.COMPLETED

    def _record_stop(self) -> ExitCode:
        assert self.stop is not None
        why, desired = self.stop
        seq = int(self.snapshot.get("durable_ckpt_seq", 0))
        self.ray.get(self.journal.record.remote(journal.Stop(why, desired, seq)))
        self.log.info("run.stopped", reason=why, desired=desired.value, engine="ray")
        self._write_status("stopped", "stopped")
        return ExitCode.STOPPED

    def _give_up(self) -> ExitCode:
        assert self.outcome is not None
        reason = self.outcome[1] or "unknown"
        with contextlib.suppress(Exception):
            self.ray.get(self.journal.record.remote(journal.Event.gave_up(reason)),
                         timeout=self.settings.ray_lease)
        self.log.error("run.gave_up", reason=reason, engine="ray")
        self._write_status("gave_up", "gave_up", reason)
        print(f"nkat-supervise: run {self.run_dir.run_id} gave up: {reason}\n  The run is "
              f"resumable: see `nkat-supervise logs {self.run_dir.run_id}` and start it again "
              "once fixed.", file=sys.stderr)
        return ExitCode.GAVE_UP

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
        old_umask = os.umask(0o177)
        try:
            for name in ("control", "events"):
                (self.run_dir.sock_dir / name).unlink(missing_ok=True)
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
                                      "workers run on other machines): stop and status are"}

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
