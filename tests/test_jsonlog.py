"""The run's JSON log survives a power cut: a line at warning or above is synced before
the call returns, every other line within a couple of seconds, and a flood of warnings
does not turn into a flood of syncs. Real files, real fdatasync, counted."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from nkat.supervisor.jsonlog import URGENT_GAP, RotatingLineFile, open_run_log


class Syncs:
    """os.fdatasync, recording the file's size at each call."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        os.fdatasync(fd)
        with self.lock:
            self.sizes.append(os.fstat(fd).st_size)


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_a_warning_is_synced_before_the_call_returns(tmp_path: Path) -> None:
    syncs = Syncs()
    path = tmp_path / "supervisor.jsonl"
    sink = RotatingLineFile(path, 1 << 20, 2, sync=syncs, sync_interval=3600)
    try:
        sink.write_line(json.dumps({"event": "worker.spawned", "level": "info"}))
        assert syncs.sizes == []
        sink.write_line(json.dumps({"event": "wal.corrupt", "level": "critical"}), urgent=True)
        assert syncs.sizes == [path.stat().st_size]  # everything so far, before returning
    finally:
        sink.close()


def test_the_logger_syncs_warning_and_above_and_not_info(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.jsonl"
    log, sink = open_run_log(path, run_id="r1", max_bytes=1 << 20, backups=2)
    try:
        log.info("worker.spawned", epoch=1)
        log.debug("worker.beat")
        assert sink.syncs == 0
        for method, expected in (("warning", 1), ("error", 2), ("critical", 3)):
            time.sleep(URGENT_GAP * 2)
            getattr(log, method)("run.recovered_unclean")
            assert sink.syncs == expected, method
    finally:
        sink.close()
    levels = [json.loads(line)["level"] for line in path.read_text().splitlines()]
    assert levels == ["info", "debug", "warning", "error", "critical"]


def test_other_lines_are_synced_within_the_interval(tmp_path: Path) -> None:
    syncs = Syncs()
    path = tmp_path / "supervisor.jsonl"
    sink = RotatingLineFile(path, 1 << 20, 2, sync=syncs, sync_interval=0.1)
    try:
        sink.write_line('{"event": "worker.spawned"}')
        assert wait_for(lambda: syncs.sizes == [path.stat().st_size])
        time.sleep(0.3)
        assert len(syncs.sizes) == 1  # nothing new written: nothing synced again
    finally:
        sink.close()


def test_a_flood_of_warnings_costs_at_most_one_sync_per_gap(tmp_path: Path) -> None:
    syncs = Syncs()
    path = tmp_path / "supervisor.jsonl"
    sink = RotatingLineFile(path, 1 << 30, 2, sync=syncs, sync_interval=3600,
                            clock=lambda: 0.0)  # every warning comes at the same moment
    try:
        for i in range(2000):
            sink.write_line(json.dumps({"event": "protocol.error", "i": i}), urgent=True)
        assert 1 <= len(syncs.sizes) <= 5
        # The ones the caller left are synced by the thread, promptly.
        assert wait_for(lambda: syncs.sizes[-1] == path.stat().st_size, timeout=5)
    finally:
        sink.close()


def test_close_syncs_what_is_left_and_stops_the_thread(tmp_path: Path) -> None:
    syncs = Syncs()
    path = tmp_path / "supervisor.jsonl"
    sink = RotatingLineFile(path, 1 << 20, 2, sync=syncs, sync_interval=3600)
    sink.write_line('{"event": "run.stopped"}')
    sink.close()
    sink.close()
    assert syncs.sizes == [path.stat().st_size]
    assert not any(t.name == "log-sync" and t.is_alive() and t is sink._syncer
                   for t in threading.enumerate())
    sink.write_line('{"event": "late"}')  # after close: dropped, never a crash
    assert sink.dropped == 1


def test_a_rotated_file_is_synced_before_it_is_closed(tmp_path: Path) -> None:
    syncs = Syncs()
    path = tmp_path / "supervisor.jsonl"
    sink = RotatingLineFile(path, 200, 2, sync=syncs, sync_interval=3600)
    try:
        for i in range(6):
            sink.write_line(json.dumps({"event": "worker.beat", "i": i, "pad": "x" * 40}))
        rotated = path.with_name(path.name + ".1")
        assert rotated.exists() and rotated.stat().st_size in syncs.sizes
    finally:
        sink.close()
