"""Command-line figures for ``python tools/bench.py cli [--json] [--quick]``: how quickly an
operator gets answers from a live run. All from real processes in this one run.

    status_latency_ms_p50          ``nkat-supervise status --json RUN`` as a subprocess,
                                   launch to exit, while the supervisor is up (the primary
                                   figure: what an operator waits); _inprocess: one
                                   ``control.request(..., "status")`` round trip.
    logs_follow_lag_ms_p50         a log line's ``ts`` -> that line read from the stdout of
                                   ``nkat-supervise logs -f --json RUN``; null, with
                                   logs_follow_note, where the CLI has no ``logs`` command.
    start_to_first_progress_s      launching ``nkat-supervise start`` for a fresh run -> the
                                   first beat with units done (default heartbeat settings:
                                   the worker beats at once after its first batch; read
                                   from the run's events socket); the median of a few fresh runs.
                                   _ckpt: -> the first ``checkpoint.durable`` (checkpoints
                                   every 0.1 s), an upper bound by another road.
                                   start_breakdown_p50: launch -> ``wal.recovered`` (the
                                   supervisor is up), -> ``worker.spawned``,
                                   -> ``worker.welcomed``, -> that first beat.

The CLI is the ``nkat-supervise`` script beside this interpreter when installed (else
``python -m nkat.supervisor``); cli_command says which.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import (
    EventStream,
    LogTail,
    SupervisedRun,
    cli_command,
    percentile,
    rounded,
    ts_wall,
)

from nkat.supervisor import control

ENDLESS = 10**12


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(getattr(args, "quick", False))
    command = cli_command()
    figures: dict[str, Any] = {"cli_command": " ".join(Path(c).name for c in command[:3])}
    with tempfile.TemporaryDirectory(prefix="nkat-bench-cli-") as tmp:
        base = Path(tmp)
        figures.update(start_to_first_progress(base, command, runs=1 if quick else 3))
        live = SupervisedRun(base, "live", {"max_dimension": ENDLESS, "checkpoint_interval": 0.1,
                                            "log_max_bytes": 1 << 30}, command=command)
        try:
            live.start()
            tail = LogTail(live.log_file)
            if tail.follow(lambda e: e.get("event") == "checkpoint.durable", 60,
                           live.running) is None:
                raise RuntimeError(f"bench: the live run never checkpointed: "
                                   f"{live.stderr_tail(500)}")
            figures.update(status_latency(live, command, runs=5 if quick else 20,
                                          calls=50 if quick else 300))
            figures.update(logs_follow_lag(live, command, lines=20 if quick else 60))
        finally:
            live.cleanup()
    return figures


def status_latency(live: SupervisedRun, command: list[str], runs: int,
                   calls: int) -> dict[str, Any]:
    argv = [*command, "status", "--json", "--state-dir", str(live.state_dir), live.run_id]
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        walls.append(time.perf_counter() - started)
        if out.returncode != 0 or json.loads(out.stdout).get("source") != "supervisor":
            raise RuntimeError(f"bench: status did not reach the live supervisor: "
                               f"{out.stdout[-300:]} {out.stderr[-300:]}")
    inproc = []
    endpoint = live.endpoint("control")
    for _ in range(calls):
        started = time.perf_counter()
        reply = control.request(endpoint, "status", timeout=5.0)
        inproc.append(time.perf_counter() - started)
        if not reply.get("ok"):
            raise RuntimeError(f"bench: status request failed: {reply}")
    return {"status_latency_ms_p50": rounded(statistics.median(walls) * 1000, 1),
            "status_latency_ms_p50_inprocess": rounded(statistics.median(inproc) * 1000, 3),
            "status_latency_ms_p99_inprocess": rounded(
                percentile([t * 1000 for t in inproc], 0.99), 3),
            "status_latency_runs": runs}


def logs_follow_lag(live: SupervisedRun, command: list[str], lines: int) -> dict[str, Any]:
    probe = subprocess.run([*command, "logs", "--help"], capture_output=True,
                           stdin=subprocess.DEVNULL)
    if probe.returncode != 0:
        return {"logs_follow_lag_ms_p50": None,
                "logs_follow_note": "this nkat-supervise has no logs command yet"}
    argv = [*command, "logs", "-f", "--json", "--state-dir", str(live.state_dir), live.run_id]
    follower = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL)
    started = time.time()
    lags: list[float] = []
    done = threading.Event()

    def read() -> None:
        assert follower.stdout is not None
        for raw in follower.stdout:
            seen = time.time()
            try:
                written = ts_wall(json.loads(raw)["ts"])
            except (ValueError, KeyError, TypeError):
                continue
            if written >= started:  # the backlog -f prints first is not a lag
                lags.append(seen - written)
            if len(lags) >= lines:
                break
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    done.wait(30 + lines)
    follower.kill()
    follower.wait()
    if not lags:
        return {"logs_follow_lag_ms_p50": None,
                "logs_follow_note": "logs -f printed no new line within the wait"}
    return {"logs_follow_lag_ms_p50": rounded(statistics.median(lags) * 1000, 1),
            "logs_follow_lag_ms_p99": rounded(percentile([t * 1000 for t in lags], 0.99), 1),
            "logs_follow_lines": len(lags)}


def start_to_first_progress(base: Path, command: list[str], runs: int) -> dict[str, Any]:
    samples = [_first_progress(base, command, f"fresh-{n}") for n in range(runs)]
    return {
        "start_to_first_progress_s": rounded(statistics.median(s["beat"] for s in samples)),
        "start_to_first_progress_s_ckpt": rounded(statistics.median(s["ckpt"]
                                                                    for s in samples)),
        "start_breakdown_p50": {
            part: rounded(statistics.median(s[part] for s in samples))
            for part in ("supervisor_up", "spawned", "welcomed", "first_beat")},
        "start_runs": runs,
    }


def _first_progress(base: Path, command: list[str], run_id: str) -> dict[str, float]:
    run = SupervisedRun(base, run_id, {"max_dimension": ENDLESS, "checkpoint_interval": 0.1,
                                       "log_max_bytes": 1 << 30},
                        command=command)
    # Listening before the launch: the socket connects once the supervisor binds it.
    stream = EventStream(run.endpoint("events"))
    tail = LogTail(run.log_file)
    events: dict[str, float] = {}
    first_beat = None
    try:
        launched = time.time()
        run.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and run.running():
            for t, body in stream.read(0.005):
                if first_beat is None and body.get("t") == "beat" and body.get("units_done"):
                    first_beat = t
            for event in tail.read():
                events.setdefault(event.get("event", ""), event.get("_t", 0.0))
            if first_beat is not None and "checkpoint.durable" in events:
                break
    finally:
        stream.close()
        run.cleanup()
    if first_beat is None or "checkpoint.durable" not in events:
        raise RuntimeError(f"bench: run {run_id} made no progress: {run.stderr_tail(500)}")
    return {"beat": first_beat - launched, "ckpt": events["checkpoint.durable"] - launched,
            "supervisor_up": events["wal.recovered"] - launched,
            "spawned": events["worker.spawned"] - events["wal.recovered"],
            "welcomed": events["worker.welcomed"] - events["worker.spawned"],
            "first_beat": first_beat - events["worker.welcomed"]}
