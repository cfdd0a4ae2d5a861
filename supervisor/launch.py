"""Choosing which run ``start`` supervises, and setting it up: lock, log, WAL, GPU health.

    plan = pick_run(state, config, run_id=None, fresh=False, boot=False)
    run = plan.run or plan.create(state)        # a new run, once its spec was checked
    code = launch_run(run, plan.config, how=plan.how, quiet=False, sim_gpu=None,
                      salvage=False)

An unfinished run of the same spec is resumed unless ``--fresh``; ``--boot`` resumes
only runs that were running when the machine went down (never ones an operator stopped).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nkat.protocol.messages import spec_hash
from nkat.supervisor import journal
from nkat.supervisor.config import (
    KEY_BY_NAME,
    NKAT_JOB,
    PARAM_PREFIX,
    Config,
    ConfigError,
    check_relations,
    coerce,
)
from nkat.supervisor.controller import Durable, RunController, RunFacts, ShardPlan
from nkat.supervisor.exitcode import ExitCode
from nkat.supervisor.gpu.host import detect as detect_host
from nkat.supervisor.gpu.host import state_dir_advice
from nkat.supervisor.health import open_probe, resolve_gpus
from nkat.supervisor.jsonlog import open_run_log
from nkat.supervisor.notify import NotifySettings
from nkat.supervisor.ops.inspect import History, run_state_from_disk, summarize
from nkat.supervisor.ops.progress import ProgressDisplay
from nkat.supervisor.ops.stdout import say as print_line
from nkat.supervisor.oslimits import io_advice
from nkat.supervisor.preemption import PreemptionSettings
from nkat.supervisor.rundir import (
    WAL_LOCK_WAIT_S,
    RunDir,
    RunDirError,
    RunExists,
    RunLocked,
    WalLock,
    list_runs,
    new_run_id,
)
from nkat.supervisor.spawn import JobFacts
from nkat.supervisor.supervise import Shell
from nkat.supervisor.wal import (
    CheckpointInfo,
    Wal,
    WalCorrupted,
    WalError,
    WalForeign,
    WalTruncated,
)

if TYPE_CHECKING:
    from nkat.supervisor.notifier import Notifier
    from nkat.supervisor.ops.metrics import RunMetrics
    from nkat.supervisor.preemption_watch import PreemptionWatch
    from nkat.supervisor.web.page import StatusPage

#: How long the supervisor waits, on its way out, for the last notifications to go out.
NOTIFY_FLUSH_S = 10.0


#: Runs of one spec started within one second that get distinct ids (.2, .3 ...).
MAX_ID_ATTEMPTS = 1000


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``start`` will do: ``how`` is ``new`` (``run`` is None until :meth:`create`),
    ``resume``, ``completed`` (the run of this spec is done: nothing is computed again) or
    ``none`` (a boot with nothing to resume)."""

    how: str
    config: Config
    run: RunDir | None = None
    run_id: str | None = None
    shards: tuple[tuple[int, int], ...] = ()

    def create(self, state: Path) -> RunDir:
        """Make the run's directory: under ``run_id`` (RunExists if taken), or under a new
        id that no run has (creating the directory is what claims an id)."""
        spec = self.config.job_spec()

        def make(run_id: str) -> RunDir:
            return RunDir.create(state, run_id, spec, dict(self.config), job_env(spec),
                                 self.shards)

        if self.run_id:
            return make(self.run_id)
        for attempt in range(1, MAX_ID_ATTEMPTS + 1):
            with contextlib.suppress(RunExists):
                return make(new_run_id(spec, attempt))
        raise RunExists(f"no free run id after {MAX_ID_ATTEMPTS} tries in {state / 'runs'}; "
                        "name one with --run-id")


#: Shards per GPU: enough that a slow or throttled GPU does not hold back the run's end
#: (a GPU that finishes takes the next shard), few enough that each is worth a worker.
SHARDS_PER_GPU = 4


def plan_shards(plan: Plan, facts: JobFacts, sim_gpu: str | None) -> Plan:
    """For a new run on several GPUs (``gpus``): the GPUs resolved to NVML indices (kept
    in its config, so a resume needs no sensor to find them), and its unit range cut into
    shards, ``SHARDS_PER_GPU`` per GPU. One GPU: the run stays one piece."""
    config = plan.config
    if config["engine"] == "ray":
        if config["gpus"]:
            raise ConfigError("gpus is for the local engine: with --engine ray, each node "
                              "agent takes one GPU the cluster offers")
        if not facts.shardable:
            raise ConfigError(f"job {config['job']!r} cannot be cut into shards (its partials "
                              "merge in unit order only): run it with --engine local")
        return plan  # cut at the first start, once the cluster's size is known
    gpus = resolve_gpus(config["gpus"], config["gpu_index"], sim_gpu)
    if len(gpus) == 1:
        return dataclasses.replace(plan, config=config.with_overrides(
            {"gpus": None, "gpu_index": gpus[0]}, config.source("gpus")))
    if not facts.shardable:
        raise ConfigError(f"job {config['job']!r} cannot be cut into shards (its partials "
                          "merge in unit order only): run it on one GPU")
    shards = cut_shards(facts.units_total, SHARDS_PER_GPU * len(gpus))
    config = config.with_overrides({"gpus": ",".join(map(str, gpus))}, config.source("gpus"))
    return dataclasses.replace(plan, config=config, shards=shards)


def cut_shards(units_total: int, count: int) -> tuple[tuple[int, int], ...]:
    """``units_total`` units cut into ``count`` contiguous [first, stop) pieces (fewer
    when there are fewer units), sizes differing by one at most."""
    count = max(1, min(units_total, count))
    edges = [units_total * k // count for k in range(count + 1)]
    return tuple((a, b) for a, b in itertools.pairwise(edges) if b > a)


def run_gpus(run: RunDir, config: Config, sim_gpu: str | None) -> list[int]:
    """The GPUs a run's workers compute on: for a sharded run, those this start names
    (``--gpus``) or else those it was started on (kept in its config, as indices);
    otherwise the one ``gpu_index``."""
    if not run.info.shards or not config["gpus"]:
        return [int(config["gpu_index"])]
    if config.source("gpus") not in ("default", "run.toml"):
        return resolve_gpus(config["gpus"], config["gpu_index"], sim_gpu)
    return sorted({int(part) for part in str(config["gpus"]).split(",")})


def pick_run(state: Path, config: Config, *, run_id: str | None, fresh: bool,
             boot: bool) -> Plan:
    """The run to supervise and the config it runs with; a new one is only planned (the
    caller creates it once the spec has been checked)."""
    spec = config.job_spec()
    if boot:
        interrupted = [r for r in list_runs(state)
                       if run_state_from_disk(r) == "interrupted" and not r.holder_pid()]
        if not interrupted:
            return Plan("none", config)
        run = interrupted[-1]
        return Plan("resume", _resumed_config(run, config), run)
    if run_id:
        if (state / "runs" / run_id / "run.toml").exists():
            if fresh:
                raise ConfigError(f"--fresh with --run-id {run_id}: that run already exists")
            run = RunDir.open(state, run_id)
            _check_same_spec(run, config)
            return Plan("resume", _resumed_config(run, config), run)
        return Plan("new", config, run_id=run_id)
    if not fresh:
        wanted = spec_hash(spec)
        for run in reversed(list_runs(state)):
            if run.info.spec_hash != wanted:
                continue
            if run_state_from_disk(run) == "completed":
                # This spec's newest run is done: say so rather than compute it again.
                return Plan("completed", _resumed_config(run, config), run)
            holder = run.holder_pid()
            if holder:
                # Starting the same spec again is almost always a mistake: say so.
                raise RunLocked(run.run_id, holder)
            return Plan("resume", _resumed_config(run, config), run)
    return Plan("new", config)


def check_gpu_free(state: Path, config: Config) -> None:
    """ConfigError when a live run of this state dir already computes on the GPU this one
    would use (two runs on one GPU slow each other and can run out of its memory)."""
    if config["backend"] == "numpy" or config["engine"] == "ray":
        return
    for run in list_runs(state):
        other = run.info.config
        pid = run.holder_pid()
        if pid and other.get("gpu_index", 0) == config["gpu_index"] \
                and other.get("backend") != "numpy":
            raise ConfigError(
                f"run {run.run_id} (supervisor pid {pid}) already computes on GPU "
                f"{config['gpu_index']}; two runs on one GPU slow each other down and may run "
                "out of memory. Use another GPU (--set gpu_index=N), stop that run first, or "
                "pass --share-gpu to run both anyway")


def job_env(spec: dict[str, Any]) -> dict[str, str]:
    """What a custom job's import needs, recorded with the run so that a resume from
    anywhere (systemd at boot starts in / with no PYTHONPATH) imports it as this start did:
    the PYTHONPATH and the working directory. The built-in job needs neither."""
    if spec.get("job") == NKAT_JOB:
        return {}
    return {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "cwd": os.getcwd()}


def _check_same_spec(run: RunDir, config: Config) -> None:
    """Resuming a named run with explicitly different job params is an error, not a guess."""
    stored = {"job": run.info.spec.get("job"), **run.info.spec.get("params", {})}
    wanted = config.job_spec()
    asked = {"job": wanted["job"], **wanted["params"]}
    for name, value in asked.items():
        key = name if name in config.sources else PARAM_PREFIX + name
        if config.sources.get(key, "default") != "default" and stored.get(name) != value:
            raise ConfigError(f"run {run.run_id} was started with {name}={stored.get(name)!r}; "
                              f"it cannot resume with {name}={value!r} (use --fresh or "
                              "another --run-id)")


def _resumed_config(run: RunDir, current: Config) -> Config:
    """The run's stored config, with this invocation's explicit non-job settings on top."""
    values = dict(current.settings)
    sources = dict(current.sources)
    for name, value in run.info.config.items():
        if name in KEY_BY_NAME and current.source(name) == "default":
            try:
                values[name] = coerce(name, value)
                sources[name] = "run.toml"
            except ConfigError:
                continue
    params = run.info.spec.get("params", {})
    values["job"] = run.info.spec.get("job", values["job"])
    for name, value in params.items():
        if name in KEY_BY_NAME:
            values[name] = value
            sources[name] = "run.toml"
    # Absent in run.toml means null (TOML has no null) for the nullable keys.
    for key in KEY_BY_NAME.values():
        if key.nullable and key.name not in run.info.config and sources[key.name] == "default":
            values[key.name] = None
    check_relations(values)  # this invocation's settings must fit the stored ones
    return Config(values, sources)


def launch_run(run: RunDir, config: Config, *, how: str, quiet: bool,
               sim_gpu: str | None, salvage: bool) -> int:
    """Supervise ``run`` in this process until it ends; returns the exit code."""
    try:
        with run.lock():
            return _supervise_locked(run, config, how=how, quiet=quiet, sim_gpu=sim_gpu,
                                     salvage=salvage)
    except RunLocked as exc:
        print(f"nkat-supervise: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE


def _supervise_locked(run: RunDir, config: Config, *, how: str, quiet: bool,
                      sim_gpu: str | None, salvage: bool) -> int:
    log, sink = open_run_log(run.log_file, run_id=run.run_id,
                             max_bytes=config["log_max_bytes"], backups=config["log_backups"])
    # A reader that went away silences start's lines; it must not end the run.
    say = (lambda text: None) if quiet else print_line
    try:
        try:  # a killed Ray driver's journal actor may hold the WAL for a moment longer
            writer = run.take_wal_lock(WAL_LOCK_WAIT_S, on_wait=lambda text: (
                log.warning("wal.lock_wait", detail=text), say(text)))
        except RunLocked as exc:
            log.error("wal.locked", error=str(exc))
            print(f"nkat-supervise: error: {exc}", file=sys.stderr)
            return ExitCode.USAGE
        try:  # released on every path (hand_over lets go earlier, for the journal)
            return _open_and_run(run, config, log, say, writer, how=how, quiet=quiet,
                                 sim_gpu=sim_gpu, salvage=salvage)
        finally:
            writer.release()
    finally:
        sink.close()


def _open_and_run(run: RunDir, config: Config, log: Any, say: Any, writer: WalLock, *,
                  how: str, quiet: bool, sim_gpu: str | None, salvage: bool) -> ExitCode:
    """Open and recover the WAL (each damage said as such), then run on it."""
    run_payload = {"run_id": run.run_id, "spec": run.info.spec,
                   "spec_hash": run.info.spec_hash, "created": run.info.created}
    try:
        wal = Wal.open(run.wal_dir, run.blob_dir, run=run_payload, salvage=salvage,
                       backup_checkpoints=config["backup_checkpoints"],
                       segment_size=config["segment_size"], create=not run.info.wal_started)
    except WalForeign as exc:
        log.critical("wal.foreign", error=str(exc))
        print(f"nkat-supervise: error: the write-ahead log in {run.wal_dir} is not this "
              f"run's: {exc}\n  The run will not start; move that log back to its own run "
              "directory.", file=sys.stderr)
        return ExitCode.GAVE_UP
    except WalTruncated as exc:
        log.critical("wal.truncated", error=str(exc))
        print(f"nkat-supervise: error: the write-ahead log of run {run.run_id} has lost its "
              f"newest part: {exc}\n  Acknowledged records, an operator's stop among them, "
              f"may be gone, so the run will not start. Inspect it with `nkat-supervise "
              f"verify {run.run_id}`; to resume from the newest checkpoint left, start "
              "again with --salvage.", file=sys.stderr)
        return ExitCode.GAVE_UP
    except WalCorrupted as exc:
        log.critical("wal.corrupt", error=str(exc))
        print(f"nkat-supervise: error: the write-ahead log of run {run.run_id} is corrupt: "
              f"{exc}\n  Acknowledged data is damaged, so the run will not start. "
              f"Inspect it with `nkat-supervise verify {run.run_id}`; to fall back to the "
              f"newest intact checkpoint, start again with --salvage.", file=sys.stderr)
        return ExitCode.GAVE_UP
    except (WalError, OSError) as exc:
        log.critical("wal.open_failed", error=str(exc))
        print(f"nkat-supervise: error: cannot open the write-ahead log: {exc}",
              file=sys.stderr)
        return ExitCode.GAVE_UP

    try:
        run.mark_wal_started()
    except OSError as exc:
        wal.close()
        log.critical("wal.open_failed", error=f"run.toml: {exc}")
        print(f"nkat-supervise: error: cannot record in run.toml that the log of run "
              f"{run.run_id} exists: {exc}", file=sys.stderr)
        return ExitCode.GAVE_UP

    def hand_over() -> None:
        wal.close()
        writer.release()

    try:
        return _run_with_wal(run, config, wal, log, how=how, say=say, quiet=quiet,
                             sim_gpu=sim_gpu, hand_over=hand_over)
    finally:
        hand_over()


def _run_with_wal(run: RunDir, config: Config, wal: Wal, log: Any, *, how: str, say: Any,
                  quiet: bool, sim_gpu: str | None, hand_over: Any) -> ExitCode:
    recovery = wal.recovery
    log.info("wal.recovered", records=recovery.records,
             torn_tail_repaired=recovery.torn_tail_repaired, salvaged=recovery.salvaged,
             problem=recovery.problem)
    for path in run.removed_temp_files:
        log.info("rundir.temp_removed", path=str(path))
    for warning in recovery.warnings:  # damage older than what the run resumes from
        print(f"nkat-supervise: warning: write-ahead log: {warning}", file=sys.stderr)
        log.warning("wal.damage", detail=warning)
    if recovery.salvaged:
        log.warning("wal.salvaged", problem=recovery.problem,
                    reappended=list(recovery.reappended))
    history = summarize(wal.records())
    if history.done is not None:
        if run.read_result() is None:
            run.write_result(history.done.result)
        say(f"run {run.run_id} already completed: {run.result_file} "
            "(start --fresh computes it again)")
        return ExitCode.COMPLETED
    infos = wal.checkpoints()
    latest = infos[-1] if infos else None
    if how == "resume":
        _say_resumed(run, history, latest, log, say)
    else:
        say(f"started run {run.run_id} (state in {run.path})")
        log.info("run.started", spec=run.info.spec)
    advice = state_dir_advice(run.path, detect_host())
    if advice:
        log.warning("run.state_dir_on_windows", advice=advice)
        say(advice)
    if config["engine"] == "ray":
        return _run_on_ray(run, config, wal, log, say=say, quiet=quiet, sim_gpu=sim_gpu,
                           hand_over=hand_over)
    gpus = run_gpus(run, config, sim_gpu)
    probe = open_probe(config, sim_gpu, log, say, time.monotonic(), gpus)
    metrics = _start_metrics(run, config, log, say)
    page = _start_page(run, config, log, say)
    display = None if quiet else ProgressDisplay(sys.stdout)
    notifier, preemption = _remote_watchers(config, log)
    durable = Durable(latest.ckpt_seq, latest.units_done, latest.t_wall) if latest else Durable()
    facts = RunFacts(run.run_id, run.info.spec, epoch=history.epoch, durable=durable,
                     restarts=history.restarts, result_path=str(run.result_file),
                     supervisor_pid=os.getpid(), supervisor_started_wall=time.time(),
                     backends=run.info.backends, backend=_backend(run, config),
                     shards=_shard_plans(run, infos))
    controller = RunController(config, facts, gpus=probe.gpus if probe else (),
                               rng=random.Random(),
                               slots=[(f"gpu{i}", i) for i in gpus] if run.info.shards
                               else None)
    shell = Shell(run, wal, log, controller, probe=probe, metrics=metrics,
                  on_status=display.update if display else None, notifier=notifier,
                  preemption=preemption)
    try:
        code = ExitCode(shell.run())
    except RunDirError:
        raise  # a socket path too long for this state dir: a usage error, said as such
    except Exception as exc:  # noqa: BLE001 - whatever failed the loop is recorded, exit 3
        code = _record_failure(run, wal, log, exc)
    finally:
        if display:
            display.close()
        if probe:
            probe.close()
        if metrics:
            metrics.close()
        if preemption:
            preemption.close()
        if notifier:
            notifier.close(timeout=NOTIFY_FLUSH_S)  # the final event reaches its receiver
        if page:
            page.close()
    _say_outcome(say, run, controller)
    return code


def _run_on_ray(run: RunDir, config: Config, wal: Wal, log: Any, *, say: Any, quiet: bool,
                sim_gpu: str | None, hand_over: Any) -> ExitCode:
    """The run's shards on a Ray cluster (docs/architecture.md, "Many machines")."""
    from nkat.supervisor.cluster.engine import run_on_ray

    metrics = _start_metrics(run, config, log, say)
    page = _start_page(run, config, log, say)
    display = None if quiet else ProgressDisplay(sys.stdout)
    try:
        code = run_on_ray(run, config, wal, log, say=say, backend=_backend(run, config),
                          hand_over=hand_over,
                          sim_gpu=sim_gpu, on_status=display.update if display else None,
                          metrics=metrics)
    except RunDirError:
        raise
    except Exception as exc:  # noqa: BLE001 - as the local loop: recorded, exit 3
        code = _record_failure(run, wal, log, exc)
    finally:
        for part in (display, metrics, page):
            if part is not None:
                part.close()
    if code == ExitCode.COMPLETED:
        say(f"run {run.run_id} completed: {run.result_file}")
    elif code == ExitCode.STOPPED:
        say(f"run {run.run_id} stopped; `nkat-supervise start` resumes it")
    return code


def _record_failure(run: RunDir, wal: Wal, log: Any, exc: BaseException) -> ExitCode:
    """The loop itself failed (a bug, or the OS refusing what it needs): say why, record a
    give-up if the log can still take it, and exit 3; the run stays resumable."""
    reason = f"the supervisor failed: {type(exc).__name__}: {exc}"
    advice = io_advice(exc) if getattr(exc, "errno", None) else \
        "a bug: please report it with this run's log"
    log.critical("supervisor.failed", error=reason, advice=advice,
                 traceback=traceback.format_exc())
    with contextlib.suppress(WalError, OSError):
        journal.write(wal, journal.Event.gave_up(reason), time.time)
    print(f"nkat-supervise: run {run.run_id} gave up: {reason}\n  Advice: {advice}. The run "
          f"is resumable: see `nkat-supervise logs {run.run_id}`.", file=sys.stderr)
    return ExitCode.GAVE_UP


def _say_resumed(run: RunDir, history: History, latest: CheckpointInfo | None, log: Any,
                 say: Any) -> None:
    """Tell the operator how the run is resumed: after a clean stop, after the supervisor
    gave up (and why), or after an unclean shutdown."""
    last = history.last
    where = (f"checkpoint {latest.ckpt_seq} ({latest.units_done} units done)"
             if latest else "the beginning (no checkpoint yet)")
    ckpt_seq = latest.ckpt_seq if latest else None
    ended = last if isinstance(last, journal.Event) and last.kind in (
        journal.EventKind.GAVE_UP, journal.EventKind.KILL_FAILED) else None
    if ended is not None:
        # The supervisor ended the run itself last time, and said why: no unclean shutdown.
        say(f"resuming run {run.run_id} from {where}; last time it ended in "
            f"{ended.kind.value}" + (f": {ended.reason}" if ended.reason else ""))
        log.info("run.resumed", ckpt_seq=ckpt_seq, after=ended.kind.value)
    elif history.state in ("stopped", "new") or last is None or isinstance(last, journal.Stop):
        say(f"resuming run {run.run_id} from {where}")
        log.info("run.resumed", ckpt_seq=ckpt_seq, after=None)
    else:
        say(f"run {run.run_id} recovered after an unclean shutdown (power loss or kill -9); "
            f"resuming from {where}")
        log.warning("run.recovered_unclean", ckpt_seq=ckpt_seq,
                    units_done=latest.units_done if latest else 0,
                    last_record=journal.describe(last))


def _shard_plans(run: RunDir, infos: list[CheckpointInfo]) -> tuple[ShardPlan, ...]:
    """A sharded run's shards as its WAL leaves them: each one's newest checkpoint, and
    done when that checkpoint covers the whole shard (its final one)."""
    plans = []
    for index, (first, stop) in enumerate(run.info.shards):
        mine = [i for i in infos if i.shard == index]
        latest = mine[-1] if mine else None
        durable = Durable(latest.ckpt_seq, latest.units_done, latest.t_wall) if latest \
            else Durable()
        plans.append(ShardPlan((first, stop), durable, durable.units_done == stop - first))
    return tuple(plans)


def _backend(run: RunDir, config: Config) -> str:
    """What the run's workers are asked to compute on: the backend the run is pinned to,
    unless this start names another (--backend, or --set backend=), which switches it
    (said here, even with --quiet; recorded once a worker computes on it)."""
    pinned = run.info.backends[-1] if run.info.backends else "auto"
    if config.source("backend") in ("default", "run.toml"):
        return pinned
    asked = str(config["backend"])
    if pinned != "auto" and asked not in ("auto", pinned):
        print(f"nkat-supervise: run {run.run_id}: switching its backend from {pinned} to "
              f"{asked}, as asked; the result's provenance will list both", file=sys.stderr)
    return pinned if asked == "auto" else asked


def _remote_watchers(config: Config, log: Any) -> tuple[Notifier | None,
                                                        PreemptionWatch | None]:
    """The notifier and the preemption watch, when configured (each imports its HTTP
    client only then: the supervisor starts light)."""
    notify, preempt = NotifySettings.from_config(config), PreemptionSettings.from_config(config)
    notifier: Notifier | None = None
    preemption: PreemptionWatch | None = None
    if notify.enabled:
        from nkat.supervisor.notifier import Notifier

        notifier = Notifier(notify, log)
    if preempt.enabled:
        from nkat.supervisor.preemption_watch import PreemptionWatch

        preemption = PreemptionWatch(preempt, log)
    return notifier, preemption


def _start_page(run: RunDir, config: Config, log: Any, say: Any) -> StatusPage | None:
    """The run's status page at ``http_addr``, or None. A port that cannot be bound is
    logged and the run goes on without the page, as without metrics."""
    addr = config["http_addr"]
    if not addr:
        return None
    from nkat.supervisor.web.access import AccessError  # no aiohttp: always importable

    try:
        from nkat.supervisor.web.page import StatusPage

        page = StatusPage.for_run(run, addr, token_file=config["http_token_file"])
        page.start()
    except (ImportError, OSError, AccessError) as exc:
        log.warning("http.unavailable", addr=addr, error=str(exc))
        say(f"status page {addr} unavailable: {exc}; the run goes on without it")
        return None
    log.info("http.serving", addr=addr, url=page.url)
    say(f"status page on {page.url}")
    return page


def _start_metrics(run: RunDir, config: Config, log: Any, say: Any) -> RunMetrics | None:
    addr = config["metrics_addr"]
    if not addr:
        return None
    from nkat.supervisor.ops.metrics import RunMetrics
    metrics = RunMetrics.for_run(run)
    try:
        metrics.serve(addr)
    except OSError as exc:
        log.warning("metrics.unavailable", addr=addr, error=str(exc))
        say(f"metrics endpoint {addr} unavailable: {exc}; the run goes on without it")
        return None
    log.info("metrics.serving", addr=addr)
    say(f"metrics on http://{addr}/metrics")
    return metrics


def _say_outcome(say: Any, run: RunDir, controller: RunController) -> None:
    outcome = controller.run.outcome
    if outcome is None:
        return
    if outcome.kind == "completed":
        say(f"run {run.run_id} completed: {run.result_file}")
    elif outcome.kind == "stopped":
        say(f"run {run.run_id} stopped at checkpoint {controller.durable_seq()}; "
            "`nkat-supervise start` resumes it")
    else:
        # Said even with --quiet: the operator must learn why the run ended.
        why = f": {outcome.reason}" if outcome.reason else ""
        print(f"nkat-supervise: run {run.run_id} {outcome.kind}{why}\n  The run is "
              f"resumable: see `nkat-supervise logs {run.run_id}` and start it again once "
              "fixed.", file=sys.stderr)
