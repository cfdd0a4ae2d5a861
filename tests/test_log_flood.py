"""A flood of repeated events leaves a bounded log with an exact account of what was held
back: the real logger of ``open_run_log`` on real files, its windows on a clock the test
moves; then a real worker that prints 100,000 lines under a real supervisor."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from nkat.supervisor.jsonlog import open_run_log
from nkat.supervisor.log_rate import NEVER_LIMITED, LogRateSettings
from nkat.supervisor.ops.logview import read_log
from tests.test_ops_support import REPO, ops_env

RATE = LogRateSettings(log_rate_window=10.0, log_rate_burst=20, log_output_burst=200)


class Clock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


def records(path: Path) -> list[dict[str, Any]]:
    return [record for _line, record in read_log(path)]


def accounted(recs: list[dict[str, Any]], event: str) -> tuple[int, int]:
    """(lines of ``event`` written, occurrences its summaries say were held back)."""
    written = sum(1 for r in recs if r["event"] == event)
    held = sum(r["count"] for r in recs
               if r["event"] == "log.suppressed" and r["suppressed_event"] == event)
    return written, held


def wait_for(predicate: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def test_a_flood_of_100k_protocol_errors_writes_a_burst_and_one_exact_summary(
        tmp_path: Path) -> None:
    path = tmp_path / "supervisor.jsonl"
    clock = Clock()
    log, sink = open_run_log(path, run_id="r1", max_bytes=1 << 30, backups=2, rate=RATE,
                             clock=clock)
    log.info("run.started", spec={"job": "toy"})
    for i in range(100_000):
        log.warning("protocol.error", reason="garbage", peer="x", count=i + 1)
    log.info("run.completed", epoch=1)
    sink.close()
    recs = records(path)
    assert len(recs) == 1 + 20 + 1 + 1  # the burst, the summary at close, and the run
    assert accounted(recs, "protocol.error") == (20, 100_000 - 20)
    (summary,) = [r for r in recs if r["event"] == "log.suppressed"]
    assert summary["level"] == "warning" and summary["suppressed_component"] == "supervisor"
    assert summary["window_s"] == 10.0
    assert summary["first_ts"] <= summary["last_ts"] <= summary["ts"]
    # The first held back is the 21st, the last the 100,000th: their stamps bound the flood.
    written = [r for r in recs if r["event"] == "protocol.error"]
    assert written[-1]["ts"] <= summary["first_ts"]
    assert [r["count"] for r in written] == list(range(1, 21))


def test_each_window_writes_its_burst_and_the_count_comes_before_the_next_burst(
        tmp_path: Path) -> None:
    path = tmp_path / "supervisor.jsonl"
    clock = Clock()
    log, sink = open_run_log(path, run_id="r1", max_bytes=1 << 30, backups=2, rate=RATE,
                             clock=clock)
    emitted = 0
    for _window in range(5):
        for _ in range(1000):
            log.info("worker.stdout", epoch=3, line="spam")
            emitted += 1
        clock.advance(RATE.log_rate_window)
    sink.close()
    recs = records(path)
    assert accounted(recs, "worker.stdout") == (5 * 200, emitted - 5 * 200)
    kinds = [r["event"] for r in recs]
    summaries = [i for i, k in enumerate(kinds) if k == "log.suppressed"]
    assert len(summaries) == 5
    # Each window: 200 lines, then its count (the next window's first line, or close).
    assert summaries == [200 * (w + 1) + w for w in range(5)]
    assert all(recs[i]["epoch"] == 3 and recs[i]["level"] == "info" for i in summaries)


def test_a_quiet_log_gets_the_count_once_the_window_has_ended(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.jsonl"
    clock = Clock()
    log, sink = open_run_log(path, run_id="r1", max_bytes=1 << 30, backups=2, rate=RATE,
                             clock=clock)
    try:
        for _ in range(50):
            log.warning("socket.flooded", socket="control", connections=33)
        clock.advance(RATE.log_rate_window)
        # No further line: the sync thread, awake every couple of seconds, writes it.
        assert wait_for(lambda: accounted(records(path), "socket.flooded") == (20, 30))
    finally:
        sink.close()
    assert accounted(records(path), "socket.flooded") == (20, 30)  # once, not again at close


def test_every_never_limited_event_is_written_in_full_during_a_flood(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.jsonl"
    clock = Clock()
    log, sink = open_run_log(path, run_id="r1", max_bytes=1 << 30, backups=2, rate=RATE,
                             clock=clock)
    for round_ in range(3 * RATE.log_rate_burst):
        for event in sorted(NEVER_LIMITED):
            log.warning(event, round=round_)
            log.warning("protocol.error", reason="noise")
    sink.close()
    recs = records(path)
    counts = Counter(r["event"] for r in recs)
    assert {event: counts[event] for event in NEVER_LIMITED} == \
        dict.fromkeys(NEVER_LIMITED, 3 * RATE.log_rate_burst)
    assert not any(r["event"] == "log.suppressed" and r["suppressed_event"] in NEVER_LIMITED
                   for r in recs)
    assert accounted(recs, "protocol.error") == (
        RATE.log_rate_burst, 3 * RATE.log_rate_burst * len(NEVER_LIMITED) - RATE.log_rate_burst)


def test_forwarded_worker_events_are_limited_per_epoch_and_each_start_is_written(
        tmp_path: Path) -> None:
    path = tmp_path / "supervisor.jsonl"
    clock = Clock()
    log, sink = open_run_log(path, run_id="r1", max_bytes=1 << 30, backups=2, rate=RATE,
                             clock=clock)
    for epoch in (1, 2):
        log.info("worker.started", component="worker", epoch=epoch, units_total=46)
        for _ in range(500):
            log.warning("channel.bad_message", component="worker", epoch=epoch, error="x")
    sink.close()
    recs = records(path)
    assert [r["epoch"] for r in recs if r["event"] == "worker.started"] == [1, 2]
    summaries = [r for r in recs if r["event"] == "log.suppressed"]
    assert {(s["suppressed_component"], s["epoch"], s["count"]) for s in summaries} == {
        ("worker", 1, 480), ("worker", 2, 480)}
    assert all(s["component"] == "supervisor" for s in summaries)


# A real worker, a real supervisor --------------------------------------------------------
FLOOD_JOB = '''
import sys
from nkat.worker.job import Job


class Flood(Job):
    name = "flood"
    default_batch_units = 1

    def __init__(self, params):
        self.lines = params["lines"]
        self.done = 0

    def units_total(self):
        return 2

    def compute(self, xp, first, count):
        if first == 0:
            for i in range(self.lines):
                print(f"flood {i}")
            sys.stdout.flush()
        return [1] * count

    def merge(self, partial):
        self.done += partial

    def snapshot(self):
        return self.done.to_bytes(8, "little")

    def restore(self, data):
        self.done = int.from_bytes(data, "little")

    def finalize(self, context):
        return {"done": self.done}
'''


def test_a_worker_printing_100k_lines_leaves_a_bounded_log_and_an_exact_count(
        tmp_path: Path) -> None:
    (tmp_path / "floodjob.py").write_text(FLOOD_JOB)
    env = ops_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO), env["PYTHONPATH"]])
    state = tmp_path / "state"
    done = subprocess.run(
        [sys.executable, "-m", "nkat.supervisor", "start", "--state-dir", str(state),
         "--quiet", "--run-id", "flood", "--backend", "numpy", "--set", "job=floodjob:Flood",
         "--set", "params.lines=100000", "--set", "segment_size=1048576"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    logs = state / "runs" / "flood" / "logs"
    recs = records(logs / "supervisor.jsonl")
    written, held = accounted(recs, "worker.stdout")
    assert written + held == 100_000
    assert held > 0
    # Bounded by the windows the output lasted (a last one may have held nothing back),
    # not by what the worker printed.
    windows = sum(1 for r in recs if r["event"] == "log.suppressed") + 1
    assert written <= LogRateSettings().log_output_burst * windows
    assert sum(p.stat().st_size for p in logs.iterdir()) < 1 << 20
    assert {"run.started", "worker.started", "run.completed"} <= {r["event"] for r in recs}
    lines = [int(r["line"].split()[1]) for r in recs if r["event"] == "worker.stdout"]
    assert lines[:200] == list(range(200))  # the start of the flood is what is kept
