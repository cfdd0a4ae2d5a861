"""The log's head: a rotation storm does not push ``run.started`` and the first worker start
out of what ``logs``, ``report`` and ``status`` read, no line is read twice or lost between
the head and the rotated files, and a reader following the log meanwhile sees every line
once. Real files, the real writer; the CLI as a real process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nkat.supervisor import loghead
from nkat.supervisor.jsonlog import RotatingLineFile, open_run_log
from nkat.supervisor.ops import inspect, report
from nkat.supervisor.ops.logview import LogReader, line_time, parse_line, read_log
from nkat.supervisor.rundir import RunDir
from tests.test_ops_support import run_ops


def numbered(n: int) -> str:
    return json.dumps({"event": "test.line", "level": "info", "n": n, "pad": "x" * 60})


def n_of(raw: bytes) -> int:
    entry = parse_line(raw)
    assert entry is not None, raw
    number: int = entry[1]["n"]
    return number


def numbers(path: Path) -> list[int]:
    return [record["n"] for _line, record in read_log(path) if "n" in record]


def storm(log: Any, lines: int) -> None:
    for n in range(lines):
        log.info("test.line", n=n, pad="x" * 60)


def start_of_run(log: Any) -> None:
    log.info("run.started", spec={"job": "toy", "params": {"units": 46}})
    log.info("worker.spawned", epoch=1, pid=4242, reason="start")
    log.info("worker.started", component="worker", epoch=1, units_total=46, units_done=0)


def test_a_rotation_storm_leaves_run_started_where_logs_report_and_status_read(
        tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, "r1", {"job": "toy", "params": {}}, {})
    log, sink = open_run_log(run.log_file, run_id="r1", max_bytes=4096, backups=2)
    start_of_run(log)
    storm(log, 20_000)
    sink.close()

    recs = [record for _line, record in read_log(run.log_file)]
    assert [r["event"] for r in recs[:3]] == ["run.started", "worker.spawned", "worker.started"]
    shown = [r["n"] for r in recs if "n" in r]
    assert shown == sorted(set(shown)) and shown[-1] == 19_999  # once each, in order
    head = loghead.head_files(run.log_file)
    assert head and head[0].name == "supervisor.head-000.jsonl"
    kept = sum(p.stat().st_size for p in run.log_dir.iterdir())
    assert kept <= (2 + 1) * 4096 + loghead.HEAD_BYTES + 4096  # rotated files, then the head

    found = run_ops("logs", "r1", "--state-dir", str(tmp_path), "--json", "--event",
                    "run.started")
    assert found.returncode == 0, found.stderr
    (line,) = found.stdout.splitlines()
    assert json.loads(line)["spec"]["params"]["units"] == 46
    timeline = report.read_timeline(run, 1.0)
    assert timeline.start == line_time(recs[0])  # the run's first line, not the oldest kept
    assert inspect._logged_units_total(run) == 46


def test_the_head_stops_growing_at_its_limit_and_holds_the_first_lines(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.jsonl"
    sink = RotatingLineFile(path, 300, 1, sync_interval=3600)
    for n in range(5000):
        sink.write_line(numbered(n))
    sink.close()
    head = loghead.head_files(path)
    assert len(head) == loghead.HEAD_FILES
    in_head = [n_of(raw) for p in head for raw in p.read_bytes().splitlines()]
    assert in_head == list(range(len(in_head)))  # the start of the log, nothing skipped
    shown = numbers(path)
    assert shown[:len(in_head)] == in_head and shown[-1] == 4999
    assert len(shown) == len(set(shown))


def test_without_backups_the_first_file_goes_to_the_head_instead_of_away(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.jsonl"
    log, sink = open_run_log(path, run_id="r1", max_bytes=4096, backups=0)
    start_of_run(log)
    storm(log, 5000)
    sink.close()
    recs = [record for _line, record in read_log(path)]
    assert recs[0]["event"] == "run.started"
    assert "worker.started" in {r["event"] for r in recs}
    assert not list(tmp_path.glob("supervisor.jsonl.*"))


def test_a_restarted_writer_goes_on_filling_the_head_after_the_last_file(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.jsonl"
    first = RotatingLineFile(path, 300, 1, sync_interval=3600, head_files=4)
    n = 0
    while len(loghead.head_files(path)) < 2:
        first.write_line(numbered(n))
        n += 1
    first.close()
    second = RotatingLineFile(path, 300, 1, sync_interval=3600, head_files=4)
    last = n + 199
    for k in range(n, last + 1):
        second.write_line(numbered(k))
    second.close()
    head = loghead.head_files(path)
    assert [p.name for p in head] == [f"supervisor.head-{i:03d}.jsonl" for i in range(4)]
    shown = numbers(path)
    in_head = [n_of(raw) for p in head for raw in p.read_bytes().splitlines()]
    assert in_head == list(range(len(in_head)))
    assert shown[:len(in_head)] == in_head and shown[-1] == last
    assert len(shown) == len(set(shown))


def test_a_head_file_removed_by_hand_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.jsonl"
    loghead.head_path(path, 3).write_text(numbered(-1) + "\n")
    sink = RotatingLineFile(path, 300, 0, sync_interval=3600)
    for n in range(20):
        sink.write_line(numbered(n))
    sink.close()
    names = [p.name for p in loghead.head_files(path)]
    assert names[0] == "supervisor.head-003.jsonl" and "supervisor.head-004.jsonl" in names
    assert loghead.head_path(path, 3).read_text() == numbered(-1) + "\n"


def follow_while_writing(path: Path, backups: int, lines: int, every: int,
                         head_files: int) -> list[int]:
    """Write ``lines`` lines, reading what is available after every ``every`` of them."""
    sink = RotatingLineFile(path, 300, backups, sync_interval=3600, head_files=head_files)
    reader = LogReader(path)
    seen: list[int] = []
    try:
        for n in range(lines):
            sink.write_line(numbered(n))
            if n % every == 0:
                seen += [n_of(raw) for raw in reader.read_available()]
        seen += [n_of(raw) for raw in reader.read_available()]
    finally:
        reader.close()
        sink.close()
    return seen


def test_a_follower_sees_every_line_once_while_files_move_to_the_head(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.jsonl"
    assert follow_while_writing(path, 0, 400, 1, head_files=6) == list(range(400))
    assert len(loghead.head_files(path)) == 6


def test_a_follower_that_fell_behind_reads_on_through_the_head(tmp_path: Path) -> None:
    # Two lines a file, one backup, a read every 7 lines: the file the reader holds has
    # gone to the head by its next read, and files after it have followed.
    path = tmp_path / "supervisor.jsonl"
    seen = follow_while_writing(path, 1, 60, 7, head_files=100)
    assert len(loghead.head_files(path)) > 20
    assert seen == list(range(60))


def test_a_new_reader_reads_the_head_first_and_once(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.jsonl"
    sink = RotatingLineFile(path, 300, 2, sync_interval=3600, head_files=3)
    for n in range(300):
        sink.write_line(numbered(n))
    sink.close()
    reader = LogReader(path)
    try:
        first = [n_of(raw) for raw in reader.read_available()]
        again = list(reader.read_available())
    finally:
        reader.close()
    assert first[0] == 0 and first == sorted(set(first)) and first[-1] == 299
    assert again == []
