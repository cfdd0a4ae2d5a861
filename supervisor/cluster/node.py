"""A Ray node agent: the supervisor's own loop, run on one node over one GPU's worker.

    agent = ray.remote(NodeAgent).options(num_gpus=1).remote(NodeJob(...))
    outcome = ray.get(agent.run_shard.remote(journal, task, lease_s))   # one shard, then
                                                                        # the next

Supervision stays on the node: the agent runs an unchanged ``RunController`` and ``Shell``
(heartbeats, the progress watchdog, restarts with backoff, kill escalation, the thermal
ladder and memory watch of its GPU) over a worker it spawns, with sockets and a log in a
scratch directory of the node. Only the log is remote: ``RemoteLog`` makes each record
durable in the driver's journal before the worker is acknowledged. The controller is told
that every other shard is done and that it must not merge, so it ends, completed, when its
shard is. Progress goes to the journal with each status (every second); the answer
carries the driver's stop request, which the agent turns into the signal a local
supervisor would get. A journal that leaves a report unanswered for ``lease_s`` stops the
node's worker too, as an unanswered append does: a node cut off from its driver does not
compute on. A sync actor runs methods on the process's main thread, so the
shell can take signals, and the worker's PR_SET_PDEATHSIG (tied to the forking thread)
ends the worker with the actor, whichever way the node goes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from nkat.supervisor.cluster.journal import ShardTask
from nkat.supervisor.cluster.remote_log import RemoteLog
from nkat.supervisor.config import Config
from nkat.supervisor.controller import Durable, RunController, RunFacts, ShardPlan
from nkat.supervisor.health import open_probe
from nkat.supervisor.jsonlog import open_run_log
from nkat.supervisor.rundir import RunDir
from nkat.supervisor.supervise import Shell

#: What of a node's status the driver shows in that node's row.
_ROW_KEYS = ("state", "epoch", "units_per_s", "dims_per_s", "worker_pid", "restarts")


@dataclasses.dataclass(frozen=True)
class NodeJob:
    """What every node agent of a run is given once: the run and how to supervise it."""

    run_id: str
    spec: dict[str, Any]
    config: dict[str, Any]
    sources: dict[str, str]
    job_env: dict[str, str]
    sim_gpu: str | None = None


@dataclasses.dataclass(frozen=True)
class ShardOutcome:
    """How one attempt ended on the node: the controller's outcome."""

    shard: int
    attempt: int
    kind: str  # completed | stopped | gave_up | wal_failed | kill_failed | failed
    #          | journal_silent
    reason: str | None
    node: str
    #: The node's scratch directory, kept when the attempt did not complete (its log).
    kept: str | None = None


class NodeAgent:
    """One node agent (see the module docstring); Ray makes it an actor."""

    def __init__(self, job: NodeJob) -> None:
        self.job = job
        self.host = socket.gethostname()

    def where(self) -> dict[str, Any]:
        """Where Ray placed the agent: its node id, host, pid and GPU."""
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "host": self.host,
                "pid": os.getpid(), "gpu": _gpu_index(ray.get_gpu_ids())}

    def run_shard(self, journal: Any, task: ShardTask, lease_s: float) -> ShardOutcome:
        """Supervise one attempt at ``task.shard`` until its shard is done, the driver
        stops it, or it cannot go on; the durable records are in the driver's journal."""
        import ray

        node = ray.get_runtime_context().get_node_id()[:8]
        scratch = Path(tempfile.mkdtemp(prefix="nkat-node-"))
        parts: list[Any] = []  # what to close, whatever happens
        try:
            controller, code, silent = self._supervise(ray, journal, task, lease_s, node,
                                                       scratch, parts)
        except Exception as exc:  # noqa: BLE001 - the driver is told; the node lives on
            if parts:
                parts[0].critical("node.failed", error=f"{type(exc).__name__}: {exc}")
            return ShardOutcome(task.shard, task.attempt, "failed",
                                f"the node's loop failed: {type(exc).__name__}: {exc}", node,
                                str(scratch))
        finally:
            for part in reversed(parts[1:]):
                with contextlib.suppress(Exception):
                    part.close()
        outcome = controller.run.outcome
        kind = outcome.kind if outcome else "failed"
        reason = outcome.reason if outcome else f"the node's loop ended ({code})"
        if silent and kind == "stopped":  # not the driver's stop: it counts as a failure
            kind, reason = "journal_silent", f"the journal did not answer in {lease_s:g} s"
        kept = None if kind in ("completed", "stopped") else str(scratch)
        if kept is None:
            shutil.rmtree(scratch, ignore_errors=True)
        return ShardOutcome(task.shard, task.attempt, kind, reason, node, kept)

    def _supervise(self, ray: Any, journal: Any, task: ShardTask, lease_s: float, node: str,
                   scratch: Path, parts: list[Any]) -> tuple[RunController, int, bool]:
        """Set up the node's shell over a scratch run directory and run it: its
        controller, exit code, and whether it stopped for a silent journal. ``parts``
        gets the log first, then what must be closed."""
        ids = ray.get_gpu_ids()
        gpu_index = _gpu_index(ids)
        if gpu_index is None:
            gpu_index = int(self.job.config["gpu_index"])
        config = _fit_threads(Config(self.job.config, self.job.sources), task.backend,
                              ray.get_runtime_context().get_assigned_resources())
        run = RunDir.create(scratch, f"s{task.shard}", self.job.spec, self.job.config,
                            self.job.job_env, task.spans)
        log, sink = open_run_log(run.log_file, run_id=self.job.run_id,
                                 max_bytes=config["log_max_bytes"],
                                 backups=config["log_backups"], component=f"node-{node}")
        parts += [log, sink]
        log.info("node.shard_started", shard=task.shard, attempt=task.attempt, host=self.host,
                 gpu=gpu_index, resume_units=task.units_done)
        if ids and _gpu_index(ids) is None:  # CUDA_VISIBLE_DEVICES by UUID on this node
            log.warning("node.gpu_not_indexed", ray_gpu=str(ids[0]), watched=gpu_index)
        probe = open_probe(config, self.job.sim_gpu, log, lambda _text: None,
                           time.monotonic(), [gpu_index])
        if probe:
            parts.append(probe)
        remote = RemoteLog(ray, journal, task, lease_s)
        controller = RunController(config, _facts(self.job, task),
                                   gpus=probe.gpus if probe else (),
                                   slots=[(f"{node}-gpu{gpu_index}", gpu_index)])
        reporter = _Reporter(ray, journal, task, {"node": node, "host": self.host,
                                                  "gpu": gpu_index}, lease_s, log)
        shell = Shell(run, remote, log, controller, probe=probe, on_status=reporter)
        reporter.shell = shell
        code = shell.run()
        log.info("node.shard_ended", shard=task.shard, attempt=task.attempt, code=code,
                 journal_round_trip_ms_p50=round(1000 * statistics.median(remote.round_trips),
                                                 3) if remote.round_trips else None)
        return controller, code, reporter.silent


def _gpu_index(ids: list[Any]) -> int | None:
    """The NVML index of the GPU Ray gave the agent (``ray.get_gpu_ids()`` gives ints or
    strings; a UUID, or none, is None: the configured ``gpu_index`` is used)."""
    if not ids:
        return None
    try:
        return int(ids[0])
    except (TypeError, ValueError):
        return None


def _fit_threads(config: Config, backend: str, assigned: dict[str, float]) -> Config:
    """A NumPy worker computes on the CPUs Ray gave its agent, not on every core of the
    node (agents share the node); an explicit ``cpu_threads`` is kept."""
    cpus = int(assigned.get("CPU", 0))
    if backend != "numpy" or config["cpu_threads"] or cpus < 1:
        return config
    return config.with_overrides({"cpu_threads": cpus}, "ray")


def _facts(job: NodeJob, task: ShardTask) -> RunFacts:
    """The node controller's run: every shard but ``task.shard`` done; epochs from the
    attempt's block; and no merge when its shard is done."""
    plans = tuple(
        ShardPlan(span, Durable(task.ckpt_seq, task.units_done) if k == task.shard
                  else Durable(), done=k != task.shard)
        for k, span in enumerate(task.spans))
    return RunFacts(job.run_id, job.spec, epoch=task.epoch_base, restarts=task.restarts,
                    supervisor_pid=os.getpid(), supervisor_started_wall=time.time(),
                    backends=task.backends, backend=task.backend, shards=plans,
                    merge_when_done=False)


class _Reporter:
    """The shell's status callback: sends the node's progress to the journal without
    waiting, and reads the previous answer: the driver's stop request, or a fence."""

    def __init__(self, ray: Any, journal: Any, task: ShardTask, where: dict[str, Any],
                 lease_s: float, log: Any) -> None:
        self.ray, self.journal, self.task, self.where = ray, journal, task, where
        self.lease_s, self.log = lease_s, log
        self.shell: Shell | None = None
        self.pending: Any = None
        self.sent_at = 0.0
        self.signalled = False
        self.silent = False  # it stopped the node for a journal that did not answer

    def __call__(self, status: dict[str, Any]) -> None:
        if self.pending is not None:
            ready, _ = self.ray.wait([self.pending], timeout=0)
            if not ready:
                if time.monotonic() - self.sent_at > self.lease_s and not self.signalled:
                    self.log.error("node.journal_silent", lease_s=self.lease_s)
                    self.silent = True
                    self._answer("unreachable")
                return  # the journal is busy: the next status asks again
            try:
                self._answer(self.ray.get(self.pending))
            except Exception as exc:  # noqa: BLE001 - the journal is gone: stop computing
                if not self.signalled:
                    self.log.error("node.journal_gone", error=type(exc).__name__)
                    self.silent = True
                self._answer("unreachable")
        rows = status.get("gpus") or [{}]
        row = {**rows[0], **{k: status.get(k) for k in _ROW_KEYS}, **self.where}
        self.pending = self.journal.report.remote(self.task.shard, self.task.attempt, row)
        self.sent_at = time.monotonic()

    def _answer(self, answer: str | None) -> None:
        if answer is None or self.signalled or self.shell is None:
            return
        self.signalled = True
        # What a local supervisor gets: SIGINT for an operator's stop (the run stays
        # stopped), SIGTERM for a shutdown, a fenced attempt or a silent journal (the
        # driver, or the next one, resumes the shard).
        self.shell.signals.append(signal.SIGINT if answer == "stopped" else signal.SIGTERM)
