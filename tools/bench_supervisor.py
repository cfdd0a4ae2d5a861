"""Supervision figures for ``python tools/bench.py supervisor [--json] [--quick]``: how fast
a crash is recovered and a hang detected, what supervision costs the job, and what the
supervisor costs itself. Every figure comes from real processes in this one run.

    recovery_s_p50                SIGKILL of the worker (here, wall clock) -> first beat of
                                  the next epoch showing units beyond its resumed checkpoint,
                                  with the default restart and heartbeat settings (the worker
                                  beats at once when an epoch's first batch is done). Each
                                  kill lands on a worker that made durable progress, with
                                  stable_after=0 standing for a long healthy stretch, so every
                                  kill is a "first" crash and waits restart_delay, not a
                                  crash loop's backoff.
                                  recovery_breakdown_p50: detect (kill -> worker.exited),
                                  backoff (-> worker.spawned), startup (-> worker.welcomed),
                                  first_batch (-> that beat). recovery_s_p50_no_backoff: the
                                  same with restart_delay=0 (skipped with --quick).
    hang_detect_over_deadline_s   the worst, over all hang trials, of (watchdog event's ts −
                                  the ts of the failpoint's "fired" line − the configured 2 s
                                  deadline): hang_nogil with stall_timeout_min = max = 2
                                  (watchdog.stalled) and hang_gil with heartbeat_timeout = 2
                                  (watchdog.unresponsive). The log's own overdue_s (time past
                                  the deadline as the watchdog counts it) is printed beside.
    supervised_vs_bare            NKAT throughput under the supervisor (checkpoint_interval
                                  30, the default) over the same job run by ``python -m
                                  nkat.worker --standalone``, in this one bench run: mean of
                                  2 rounds each (9e9 dimensions, about 70 s a run, so every
                                  supervised run takes checkpoints), run ABBA, both with a
                                  fixed batch of 32 units. A run's throughput is
                                  performance.epoch_throughput: dimensions over the wall time
                                  of the worker's whole run loop, so checkpoints, merges and
                                  the beat thread all count; process start-up does not.
                                  _compute: the same with compute seconds only
                                  (average_throughput); _fast_batches: the rate of each run's
                                  fastest tenth of batches, which the host's two speeds (see
                                  docs/benchmarks.md) move least; _wall: the whole command's
                                  wall time, start-up included (bare / supervised); _cpu: the
                                  job process's CPU seconds (bare / supervised worker, from
                                  the reaped children's rusage). overhead_checkpoints_per_run:
                                  the fewest checkpoints a supervised run took.
    checkpoint_stall_ms_p99       main-loop time per checkpoint: a supervised run (nkat-supervise
                                  start, its WAL and acks) of the NKAT job with a stopwatch
                                  (tools/timed_job.py: from the runtime's call of snapshot()
                                  to its next compute_batch, so the snapshot, the hand-off to
                                  the I/O thread and the loop's own bookkeeping),
                                  checkpoint_interval 0.05 s. _no_io_thread: the job's
                                  snapshot alone, timed in-process through the job API.
    supervisor_cpu_ratio          supervisor CPU s / worker CPU s over those supervised runs
                                  (psutil, sampled every 0.2 s, last sample before the worker
                                  exits), the supervisor's start-up included; the larger of
                                  the two. _steady: from the first sample with a worker to
                                  the last.
    supervisor_rss_mb             the supervisor's peak RSS (VmHWM) over those runs; _steady:
                                  its largest RSS sampled while a worker ran.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from benchlib import (
    EventStream,
    LogTail,
    SupervisedRun,
    children_cpu_seconds,
    cpu_seconds,
    events_of,
    p50,
    peak_rss_bytes,
    percentile,
    rounded,
    standalone,
)

from nkat.worker.jobs.nkat_highdim import NkatHighDim

#: A job that outlasts any recovery trial (it is ended by the bench).
ENDLESS = 10**12
UNIT_DIMS = 65536
HANG_DEADLINE_S = 2.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(getattr(args, "quick", False))
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="nkat-bench-sup-") as tmp:
        base = Path(tmp)
        figures.update(recovery(base, kills=3 if quick else 7))
        if not quick:
            figures.update(recovery(base, kills=5, restart_delay=0.0, suffix="_no_backoff"))
        figures.update(hangs(base, trials=1 if quick else 3))
        figures.update(overhead(base, dims=6 * 10**8 if quick else 9 * 10**9,
                                rounds=1 if quick else 2))
        figures.update(checkpoint_stall(base, dims=3 * 10**8 if quick else 10**9))
    return figures


# Recovery ----------------------------------------------------------------------------------

class Watcher:
    """The run's log and beat stream, read together; what the trials wait on."""

    def __init__(self, run: SupervisedRun) -> None:
        self.run = run
        self.tail = LogTail(run.log_file)
        self.stream = EventStream(run.endpoint("events"))
        self.events: list[dict[str, Any]] = []
        self.beats: list[tuple[float, int]] = []  # (wall time read, units_done)
        self.units_of: dict[int, int] = {}  # durable ckpt_seq -> units_done

    def pump(self) -> None:
        for t, body in self.stream.read(0.005):
            if body.get("t") == "beat":
                self.beats.append((t, int(body.get("units_done") or 0)))
        for event in self.tail.read():
            self.events.append(event)
            if event.get("event") == "checkpoint.durable":
                self.units_of[event["ckpt_seq"]] = event["units_done"]

    def find(self, name: str, **fields: Any) -> dict[str, Any] | None:
        for event in self.events:
            if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                return event
        return None

    def find_after(self, after: dict[str, Any], name: str, **fields: Any
                   ) -> dict[str, Any] | None:
        """The first such event logged after ``after``."""
        for event in self.events:
            if event["_pos"] > after["_pos"] and event.get("event") == name and \
                    all(event.get(k) == v for k, v in fields.items()):
                return event
        return None

    def wait(self, ready: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump()
            found = ready()
            if found:
                return found
            if not self.run.running():
                break
        raise RuntimeError(f"bench: gave up waiting for {what}; supervisor stderr: "
                           f"{self.run.stderr_tail(500)}")

    def close(self) -> None:
        self.stream.close()


def recovery(base: Path, kills: int, *, restart_delay: float | None = None,
             suffix: str = "") -> dict[str, Any]:
    sets: dict[str, Any] = {"max_dimension": ENDLESS, "checkpoint_interval": 0.2,
                            "stable_after": 0, "log_max_bytes": 1 << 30}
    if restart_delay is not None:
        sets["restart_delay"] = restart_delay
    run = SupervisedRun(base, f"recovery{suffix or '-default'}", sets)
    watch = Watcher(run)
    rng = random.Random(0)
    samples: list[dict[str, float]] = []
    try:
        run.start()
        epoch = 1
        for _ in range(kills):
            welcomed = watch.wait(partial(watch.find, "worker.welcomed", epoch=epoch), 60,
                                  f"epoch {epoch} to start")
            # Durable progress first, so the restart policy sees a healthy worker die.
            watch.wait(partial(watch.find_after, welcomed, "checkpoint.durable", epoch=epoch),
                       60, f"a checkpoint of epoch {epoch}")
            pause_until = time.monotonic() + rng.uniform(0.1, 0.4)
            while time.monotonic() < pause_until:
                watch.pump()
            worker = run.worker()
            if worker is None:
                raise RuntimeError("bench: no worker to kill")
            killed_at = time.time()
            worker.kill()
            samples.append(_recovered(watch, epoch, killed_at))
            epoch += 1
    finally:
        watch.close()
        run.cleanup()
    totals = [s["total"] for s in samples]
    key = f"recovery_s_p50{suffix}"
    out: dict[str, Any] = {key: rounded(p50(totals)),
                           f"recovery_s_max{suffix}": rounded(max(totals)),
                           f"recovery_kills{suffix}": len(samples)}
    if not suffix:
        out["recovery_breakdown_p50"] = {
            part: rounded(p50(s[part] for s in samples))
            for part in ("detect", "backoff", "startup", "first_batch")}
        out["recovery_restart_delay_s_p50"] = rounded(
            p50(s["delay"] for s in samples))
    return out


def _recovered(watch: Watcher, epoch: int, killed_at: float) -> dict[str, float]:
    """Wait for the epoch after ``epoch`` to progress; the timings of the recovery."""
    nxt = epoch + 1
    welcomed = watch.wait(lambda: watch.find("worker.welcomed", epoch=nxt), 60,
                          f"epoch {nxt} to be welcomed")
    seq = welcomed.get("resume_ckpt_seq")
    resumed_units = watch.units_of.get(seq, 0) if seq else 0
    # Beats read after the welcome was logged come from the new epoch (the old worker's
    # were read, or dropped as foreign, before its exit was noticed).
    first = watch.wait(lambda: next((t for t, units in watch.beats
                                     if t > welcomed["_t"] and units > resumed_units), None),
                       60, f"progress of epoch {nxt}")
    exited = watch.find("worker.exited", epoch=epoch)
    spawned = watch.find("worker.spawned", epoch=nxt)
    scheduled: dict[str, Any] = next((e for e in reversed(watch.events)
                                      if e.get("event") == "worker.restart_scheduled"), {})
    assert exited is not None and spawned is not None
    return {"total": first - killed_at, "detect": exited["_t"] - killed_at,
            "backoff": spawned["_t"] - exited["_t"], "startup": welcomed["_t"] - spawned["_t"],
            "first_batch": first - welcomed["_t"], "delay": scheduled.get("delay_s", 0.0)}


# Hangs ------------------------------------------------------------------------------------

def hangs(base: Path, trials: int) -> dict[str, Any]:
    found: dict[str, list[dict[str, float]]] = {"stalled": [], "unresponsive": []}
    for n in range(trials):
        for kind in found:
            found[kind].append(_hang_trial(base, kind, n))
    overs = [t["over"] for kind in found for t in found[kind]]
    out: dict[str, Any] = {"hang_detect_over_deadline_s": rounded(max(overs)),
                           "hang_trials": len(overs), "hang_deadline_s": HANG_DEADLINE_S}
    for kind, results in found.items():
        out[f"hang_{kind}_over_deadline_s_p50"] = rounded(
            p50(t["over"] for t in results))
        out[f"hang_{kind}_overdue_s_log_p50"] = rounded(
            p50(t["overdue"] for t in results))
    return out


def _hang_trial(base: Path, kind: str, n: int) -> dict[str, float]:
    failpoint = {"stalled": "hang_nogil", "unresponsive": "hang_gil"}[kind]
    hang_unit, units = 400, 600
    sets: dict[str, Any] = {"max_dimension": units * UNIT_DIMS, "unit_dims": UNIT_DIMS,
                            "restart_delay": 0.05, "stop_deadline": 1.0,
                            "log_max_bytes": 1 << 30}
    if kind == "stalled":
        sets.update(stall_timeout_min=HANG_DEADLINE_S, stall_timeout_max=HANG_DEADLINE_S)
    else:
        sets["heartbeat_timeout"] = HANG_DEADLINE_S
    # epoch=1: the restarted worker passes the unit and the run completes.
    env = {"NKAT_FAILPOINTS": f"{failpoint}@unit={hang_unit}:epoch=1"}
    run = SupervisedRun(base, f"hang-{kind}-{n}", sets, env=env)
    tail = LogTail(run.log_file)
    try:
        run.start()
        fired = tail.follow(lambda e: e.get("event") == "worker.stderr"
                            and f"failpoint {failpoint} fired" in e.get("line", ""),
                            60, run.running)
        detected = tail.follow(lambda e: e.get("event") == f"watchdog.{kind}", 60, run.running)
        if fired is None or detected is None:
            raise RuntimeError(f"bench: no {kind} hang detected; {run.stderr_tail(500)}")
        if run.wait(60) != 0:
            raise RuntimeError(f"bench: the {kind} hang run did not complete after the kill")
    finally:
        run.cleanup()
    return {"over": detected["_t"] - fired["_t"] - HANG_DEADLINE_S,
            "overdue": float(detected["overdue_s"])}


# Overhead, CPU and memory -----------------------------------------------------------------

def overhead(base: Path, dims: int, rounds: int) -> dict[str, Any]:
    # A fixed batch: both sides compute the very same batches, so their times compare.
    params = {"max_dimension": dims, "unit_dims": UNIT_DIMS, "batch_size": 32,
              "batch_size_adaptive": False}
    bare: list[dict[str, float]] = []
    supervised: list[dict[str, float]] = []
    for n in range(rounds):
        # ABBA: a drift in the machine's speed or load hits both sides alike.
        for which in (("bare", "supervised") if n % 2 == 0 else ("supervised", "bare")):
            if which == "bare":
                cpu = children_cpu_seconds()
                result, wall = standalone(params)
                bare.append({**_throughputs(result), "wall": wall,
                             "cpu": children_cpu_seconds() - cpu})
            else:
                supervised.append(_supervised_once(base, f"overhead-{n}", params))

    def ratio(key: str) -> float:
        return round(statistics.fmean(s[key] for s in supervised)
                     / statistics.fmean(b[key] for b in bare), 4)

    # CPU seconds of the job's process: what a neighbour's load hardly changes.
    bare_cpu = statistics.fmean(b["cpu"] for b in bare)
    sup_cpu = statistics.fmean(s["run_cpu"] - s["sup_cpu_end"] for s in supervised)
    return {
        "supervised_vs_bare": ratio("epoch"),
        "supervised_vs_bare_compute": ratio("compute"),
        "supervised_vs_bare_fast_batches": ratio("fast"),
        "supervised_vs_bare_wall": round(statistics.fmean(b["wall"] for b in bare)
                                         / statistics.fmean(s["wall"] for s in supervised), 4),
        "supervised_vs_bare_cpu": round(bare_cpu / sup_cpu, 4),
        "overhead_rounds": rounds,
        "overhead_dimensions": dims,
        "overhead_checkpoints_per_run": min(int(s["checkpoints"]) for s in supervised),
        "bare_dims_per_s": round(statistics.fmean(b["epoch"] for b in bare)),
        "supervised_dims_per_s": round(statistics.fmean(s["epoch"] for s in supervised)),
        "bare_wall_s": round(statistics.fmean(b["wall"] for b in bare), 2),
        "supervised_wall_s": round(statistics.fmean(s["wall"] for s in supervised), 2),
        "supervisor_cpu_ratio": round(max(s["cpu_ratio"] for s in supervised), 4),
        "supervisor_cpu_ratio_steady": round(max(s["cpu_ratio_steady"] for s in supervised), 4),
        "supervisor_cpu_s": round(max(s["sup_cpu"] for s in supervised), 3),
        "worker_cpu_s": round(min(s["worker_cpu"] for s in supervised), 1),
        "supervisor_rss_mb": round(max(s["rss"] for s in supervised) / 2**20, 1),
        "supervisor_rss_mb_steady": round(max(s["rss_now"] for s in supervised) / 2**20, 1),
    }


def _throughputs(result: dict[str, Any]) -> dict[str, float]:
    perf = result["performance"]
    return {"epoch": perf["epoch_throughput"], "compute": perf["average_throughput"],
            "fast": perf["fast_batch_throughput"]}


def _supervised_once(base: Path, run_id: str, params: dict[str, Any]) -> dict[str, float]:
    run = SupervisedRun(base, run_id, {**params, "checkpoint_interval": 30.0})
    first: tuple[float, float] | None = None  # (supervisor, worker) CPU at the first sample
    last: tuple[float, float] | None = None
    rss = rss_now = 0
    sup_cpu_end = 0.0
    run_cpu = children_cpu_seconds()
    started = time.perf_counter()
    try:
        run.start()
        assert run.pid is not None
        while True:
            code = run.wait(0.2)
            if code is not None:
                break
            sup, worker = run.process(), run.worker()
            rss = max(rss, peak_rss_bytes(run.pid) or 0)
            if sup is None:
                continue
            sup_cpu_end = cpu_seconds(sup) or sup_cpu_end
            if worker is None:
                continue
            sup_cpu, worker_cpu = cpu_seconds(sup), cpu_seconds(worker)
            if sup_cpu is not None and worker_cpu is not None:
                last = (sup_cpu, worker_cpu)
                first = first or last
                with contextlib.suppress(psutil.Error):
                    rss_now = max(rss_now, sup.memory_info().rss)
        wall = time.perf_counter() - started
        run_cpu = children_cpu_seconds() - run_cpu
    finally:
        run.cleanup()
    result = run.result()
    if code != 0 or result is None or first is None or last is None:
        raise RuntimeError(f"bench: supervised run {run_id} failed ({code}): "
                           f"{run.stderr_tail(500)}")
    steady_worker = last[1] - first[1]
    checkpoints = sum('"checkpoint.durable"' in line
                      for line in run.log_file.read_text().splitlines())
    return {**_throughputs(result), "wall": wall, "checkpoints": checkpoints,
            "cpu_ratio": last[0] / last[1], "sup_cpu": last[0], "worker_cpu": last[1],
            "cpu_ratio_steady": (last[0] - first[0]) / steady_worker if steady_worker > 0
            else float("nan"),
            "rss": rss, "rss_now": rss_now, "run_cpu": run_cpu, "sup_cpu_end": sup_cpu_end}


# Checkpoint stall -------------------------------------------------------------------------

def checkpoint_stall(base: Path, dims: int) -> dict[str, Any]:
    """A supervised run of the NKAT job with a stopwatch on its checkpoints (tools/
    timed_job.py), checkpointing every 0.05 s; the stalls come back in its result."""
    # A custom job takes its params as params.NAME.
    params = {"job": "timed_job:CheckpointTimedNkat", "params.max_dimension": dims,
              "params.unit_dims": UNIT_DIMS, "checkpoint_interval": 0.05,
              "log_max_bytes": 1 << 30}
    tools = str(Path(__file__).resolve().parent)
    run = SupervisedRun(base, "checkpoint-stall", params, env={"PYTHONPATH": os.pathsep.join(
        p for p in (tools, os.environ.get("PYTHONPATH")) if p)})
    try:
        run.start()
        code = run.wait(600)
    finally:
        run.cleanup()
    result = run.result()
    if code != 0 or result is None:
        raise RuntimeError(f"bench: the checkpoint-stall run failed ({code}): "
                           f"{run.stderr_tail(500)}")
    ms = [s * 1000 for s in result["performance"]["checkpoint_stalls_s"]]
    sizes = [int(e.get("bytes", 0)) for e in events_of(run.log_file)
             if e.get("event") == "checkpoint.durable"]
    alone = [s * 1000 for s in _snapshot_alone(dims // 3)]
    return {"checkpoint_stall_ms_p99": rounded(percentile(ms, 0.99)),
            "checkpoint_stall_ms_p50": rounded(percentile(ms, 0.50)),
            "checkpoint_stall_ms_max": rounded(max(ms) if ms else None),
            "checkpoint_stall_samples": len(ms),
            "checkpoint_state_bytes_max": max(sizes, default=0),
            "checkpoint_stall_ms_p99_no_io_thread": rounded(percentile(alone, 0.99))}


def _snapshot_alone(dims: int, interval: float = 0.05) -> list[float]:
    """The job's snapshot alone, timed in this process through the job API at the same
    cadence: no runtime, no I/O thread, no hand-off."""
    job = NkatHighDim({"max_dimension": dims, "unit_dims": UNIT_DIMS})
    job.set_cpu_threads(len(os.sched_getaffinity(0)))
    total, batch = job.units_total(), NkatHighDim.default_batch_units
    stalls: list[float] = []
    last = time.monotonic()
    for first in range(0, total, batch):
        count = min(batch, total - first)
        job.merge_batch(first, count, job.compute_batch(np, first, count).wait())
        if time.monotonic() - last >= interval:
            started = time.perf_counter()
            job.snapshot()
            stalls.append(time.perf_counter() - started)
            last = time.monotonic()
    return stalls
