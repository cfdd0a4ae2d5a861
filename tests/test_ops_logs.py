"""``nkat-supervise logs`` and the JSON log it reads: required keys on every line of a real
run, the stored lines printed exactly, filters, torn lines, a closed pipe, and ``-f``
following across forced rotations without losing or repeating a line."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import select
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from nkat.protocol.messages import CMD_OPS
from nkat.supervisor.control import OPS
from nkat.supervisor.jsonlog import LEVELS, RotatingLineFile, open_run_log
from nkat.supervisor.ops import logview
from nkat.supervisor.ops.logview import LogReader, Printer, parse_line, parse_since
from nkat.supervisor.policies.thermal import ThermalActionKind
from nkat.supervisor.policies.watchdog import VerdictKind
from nkat.supervisor.rundir import RunDir
from tests.test_ops_support import nkat_run, ops_argv, ops_env, run_ops

__all__ = ["nkat_run"]  # a fixture, imported so pytest finds it here

REQUIRED = ("ts", "level", "event", "run_id", "component")


def stored_lines(state: Path, run_id: str) -> list[str]:
    return (state / "runs" / run_id / "logs" / "supervisor.jsonl").read_text().splitlines()


def make_run(state: Path, run_id: str = "r1") -> RunDir:
    return RunDir.create(state, run_id, {"job": "toy", "params": {}}, {})


def line(n: int, level: str = "info", event: str = "test.line", ts: str | None = None) -> str:
    return json.dumps({"run_id": "r1", "component": "supervisor", "n": n, "event": event,
                       "level": level,
                       "ts": ts or datetime.now(UTC).isoformat().replace("+00:00", "Z")})


# The log itself -------------------------------------------------------------------------
def test_every_line_of_a_real_run_has_the_required_keys(nkat_run):
    state, run_id = nkat_run
    lines = stored_lines(state, run_id)
    events = set()
    for text in lines:
        record = json.loads(text)
        assert all(key in record for key in REQUIRED), text
        assert record["run_id"] == run_id
        assert record["level"] in LEVELS
        assert record["component"] in ("supervisor", "worker")
        assert datetime.fromisoformat(record["ts"]).utcoffset().total_seconds() == 0
        events.add(record["event"])
    assert {"run.started", "worker.spawned", "worker.started", "run.completed",
            "worker.exited"} <= events


def test_json_output_is_the_stored_lines_exactly(nkat_run):
    state, run_id = nkat_run
    out = run_ops("logs", run_id, "--state-dir", str(state), "--json")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == stored_lines(state, run_id)
    for text in out.stdout.splitlines():
        assert isinstance(json.loads(text), dict)


def test_the_newest_run_is_the_default_and_rendering_is_plain_on_a_pipe(nkat_run):
    state, run_id = nkat_run
    out = run_ops("logs", "--state-dir", str(state))
    assert out.returncode == 0, out.stderr
    assert "\x1b[" not in out.stdout
    rows = out.stdout.splitlines()
    assert len(rows) == len(stored_lines(state, run_id))
    assert any(" run.completed " in row and "result=" in row for row in rows)
    assert any("[worker] worker.started" in row for row in rows)


def test_filters_level_event_glob_last_n_and_since(tmp_path):
    run = make_run(tmp_path)
    old = "2026-01-01T00:00:00.000000Z"
    levels = ["debug", "info", "warning", "error", "critical"]
    with open(run.log_file, "w") as fh:
        for n in range(10):
            event = "checkpoint.durable" if n % 2 else "worker.spawned"
            fh.write(line(n, levels[n % 5], event, ts=old if n < 5 else None) + "\n")

    def ns(*args: str) -> list[int]:
        out = run_ops("logs", "r1", "--state-dir", str(tmp_path), "--json", *args)
        assert out.returncode == 0, out.stderr
        return [json.loads(text)["n"] for text in out.stdout.splitlines()]

    assert ns() == list(range(10))
    assert ns("--level", "error") == [3, 4, 8, 9]
    assert ns("--event", "checkpoint.*") == [1, 3, 5, 7, 9]
    assert ns("--event", "worker.sp?wned", "--event", "nothing.*") == [0, 2, 4, 6, 8]
    assert ns("--event", "checkpoint.*", "-n", "2") == [7, 9]
    assert ns("-n", "0") == []
    assert ns("--since", "1h") == [5, 6, 7, 8, 9]
    assert ns("--since", "2025-12-31T23:59:59+00:00") == list(range(10))
    assert ns("--since", "2h", "--level", "warning", "-n", "1") == [9]
    bad = run_ops("logs", "r1", "--state-dir", str(tmp_path), "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_levels_match_the_writer():
    assert logview.LEVELS == LEVELS


def test_since_reads_durations_and_iso_times():
    now = 1_000_000.0
    assert parse_since("10m", now) == now - 600
    assert parse_since("1h30m", now) == now - 5400
    assert parse_since("500ms", now) == pytest.approx(now - 0.5)
    assert parse_since("2026-11-28T23:02:40Z") == datetime(
        2026, 11, 28, 23, 2, 40, tzinfo=UTC).timestamp()
    naive = parse_since("2026-11-28T23:02:40")
    assert naive == datetime(2026, 11, 28, 23, 2, 40).astimezone().timestamp()
    for bad in ("", "10x", "m10", "tomorrow"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_since(bad, now)


def test_torn_lines_are_skipped_and_an_appended_line_is_recovered(tmp_path):
    run = make_run(tmp_path)
    torn, appended = line(1)[:37], line(2)
    with open(run.log_file, "w") as fh:
        fh.write(line(0) + "\n")
        fh.write(torn + appended + "\n")  # a crash tore line 1; the next supervisor appended
        fh.write("not json at all\n[1, 2]\n" + json.dumps({"no": "event"}) + "\n")
        fh.write(line(3) + "\n")
        fh.write(line(4)[:20])  # torn tail, no newline
    out = run_ops("logs", "r1", "--state-dir", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    assert [json.loads(t)["n"] for t in out.stdout.splitlines()] == [0, 2, 3]
    assert out.stdout.splitlines()[1] == appended
    human = run_ops("logs", "r1", "--state-dir", str(tmp_path))
    assert human.returncode == 0 and human.stdout.count("test.line") == 3
    assert parse_line(b"") is None and parse_line(torn.encode()) is None


def test_a_run_without_a_log_says_so(tmp_path):
    make_run(tmp_path)
    out = run_ops("logs", "r1", "--state-dir", str(tmp_path))
    assert out.returncode == 1 and "no log yet" in out.stderr


def test_a_closed_pipe_ends_quietly(tmp_path):
    run = make_run(tmp_path)
    with open(run.log_file, "w") as fh:
        fh.writelines(line(n) + "\n" for n in range(3000))  # more than a pipe buffer
    proc = subprocess.Popen(ops_argv("logs", "r1", "--state-dir", str(tmp_path), "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ops_env())
    assert proc.stdout and proc.stderr
    assert json.loads(proc.stdout.readline())["n"] == 0
    proc.stdout.close()  # like `| head -1`
    assert proc.wait(timeout=30) == 0
    assert proc.stderr.read() == b""


# Following -----------------------------------------------------------------------------------
def test_reader_sees_each_line_once_across_rotations_between_reads(tmp_path):
    path = tmp_path / "supervisor.jsonl"
    sink = RotatingLineFile(path, max_bytes=400, backups=20)
    reader = LogReader(path)
    seen: list[int] = []
    n = 0
    for burst in (1, 3, 0, 17, 2, 40, 5):  # bursts of several rotations between reads
        for _ in range(burst):
            sink.write_line(line(n))
            n += 1
        seen += [json.loads(raw)["n"] for raw in reader.read_available()]
    sink.close()
    seen += [json.loads(raw)["n"] for raw in reader.read_available()]
    reader.close()
    assert seen == list(range(n))
    assert len(list(tmp_path.glob("supervisor.jsonl.*"))) > 5


def test_reader_keeps_order_when_the_file_it_read_was_pruned(tmp_path):
    path = tmp_path / "supervisor.jsonl"
    sink = RotatingLineFile(path, max_bytes=300, backups=2)
    reader = LogReader(path)
    for n in range(3):
        sink.write_line(line(n))
    first = [json.loads(raw)["n"] for raw in reader.read_available()]
    for n in range(3, 60):
        sink.write_line(line(n))
    later = [json.loads(raw)["n"] for raw in reader.read_available()]
    sink.close()
    reader.close()
    assert first == [0, 1, 2]
    # Lines in files the writer deleted before the reader came back are gone; the rest
    # arrive in order, none twice, ending with the newest.
    assert later == sorted(set(later)) and later[-1] == 59 and later[0] > 2


def test_reader_crosses_the_gap_a_rotation_leaves_while_it_shifts_names(tmp_path):
    path = tmp_path / "supervisor.jsonl"

    def write(name: str, *ns: int) -> None:
        with open(tmp_path / name, "a") as fh:
            fh.writelines(line(n) + "\n" for n in ns)

    write("supervisor.jsonl", 0, 1)
    reader = LogReader(path)
    assert [json.loads(r)["n"] for r in reader.read_available()] == [0, 1]
    # Two rotations the reader did not see (A -> .2, B -> .1, C live), then a third
    # caught half-way: .2 -> .3 and .1 -> .2 are done, C -> .1 is not.
    os.rename(path, tmp_path / "supervisor.jsonl.1")
    write("supervisor.jsonl", 2, 3)
    os.rename(tmp_path / "supervisor.jsonl.1", tmp_path / "supervisor.jsonl.2")
    os.rename(path, tmp_path / "supervisor.jsonl.1")
    write("supervisor.jsonl", 4)
    os.rename(tmp_path / "supervisor.jsonl.2", tmp_path / "supervisor.jsonl.3")
    os.rename(tmp_path / "supervisor.jsonl.1", tmp_path / "supervisor.jsonl.2")
    assert [json.loads(r)["n"] for r in reader.read_available()] == [2, 3, 4]
    # Moved out of the naming scheme by hand: the reader goes on with what is named.
    os.rename(path, tmp_path / "kept-aside.jsonl")
    write("supervisor.jsonl", 5)
    assert [json.loads(r)["n"] for r in reader.read_available()] == [5]
    reader.close()


def _read_until(proc: subprocess.Popen[bytes], done: str, timeout: float) -> list[dict]:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf, records = b"", []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([fd], [], [], 0.1)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break  # the follower exited
        buf += chunk
        *full, buf = buf.split(b"\n")
        records += [json.loads(raw) for raw in full]
        if records and records[-1]["event"] == done:
            return records
    raise AssertionError(f"no {done!r} line within {timeout}s; got {len(records)} lines")


def test_follow_across_forced_rotations_loses_and_repeats_nothing(tmp_path):
    run = make_run(tmp_path)
    # Started before the log exists: it waits, as it does while the supervisor is down.
    proc = subprocess.Popen(
        ops_argv("logs", "r1", "--state-dir", str(tmp_path), "-f", "--json", "-n", "100000"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ops_env())
    try:
        time.sleep(0.5)
        log, sink = open_run_log(run.log_file, run_id="r1", max_bytes=600, backups=200)
        total = 400
        for n in range(total):
            log.info("test.line", n=n)
            if n % 25 == 0:
                time.sleep(0.01)
        log.info("test.end")
        records = _read_until(proc, "test.end", timeout=30)
        sink.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [r["n"] for r in records[:-1]] == list(range(total))
    assert len(list(run.log_dir.glob("supervisor.jsonl.*"))) > 20
    assert proc.stderr is not None and proc.stderr.read() == b""


# The catalogue ------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent
_EMIT = re.compile(r'\.(?:debug|info|warning|error|critical)\(\s*(f?)"([^"]+)"')
_WORKER_EMIT = re.compile(r'(?:\._?log\(\s*(?:"\w+"|\w+),\s*|_log_here\(\s*sock,\s*)(f?)"([^"]+)"')


def emitted_events() -> set[str]:
    """Every event name the code can log: literals, and the f-string families expanded
    from the enums and op lists that fill them in."""
    families = {
        "worker.{stream}": {"worker.stdout", "worker.stderr"},
        "operator.{op}": {f"operator.{op}" for op in OPS if op not in ("status", "stop")},
        "watchdog.{verdict.kind}": {f"watchdog.{v}" for v in VerdictKind},
        "thermal.{thermal.kind.value}": {f"thermal.{k}" for k in ThermalActionKind},
        "cmd.{msg.op}": {f"cmd.{op}" for op in CMD_OPS},
    }
    found: set[str] = set()
    for path in [*REPO.glob("supervisor/**/*.py"), *REPO.glob("worker/**/*.py")]:
        text = path.read_text()
        if path.name == "jsonlog.py":
            text = text.split('"""', 2)[2]  # its docstring's example is no event
        for is_f, name in _EMIT.findall(text) + _WORKER_EMIT.findall(text):
            if is_f:
                assert name in families, f"{path.name}: new event family {name!r}"
                found |= families[name]
            elif "." in name:
                found.add(name)
    return found


def test_every_event_the_code_emits_is_in_the_catalogue_and_no_other():
    readme = (REPO / "README.md").read_text()
    section = re.search(r"^## Log events\n(.*?)^## ", readme, re.S | re.M)
    assert section is not None, "README.md has no '## Log events' section"
    table = [row for row in section.group(1).splitlines() if row.startswith("| `")]
    documented = {name for row in table for name in re.findall(r"`([a-z_]+\.[a-z_]+)`",
                                                                row.split(" | ")[0])}
    emitted = emitted_events()
    assert len(emitted) > 60
    assert emitted - documented == set(), "add these to README.md, Log events"
    assert documented - emitted == set(), "README.md's Log events lists events nothing emits"


def test_human_rendering_colours_levels_and_keeps_tracebacks_as_blocks():
    record = {"run_id": "r1", "component": "worker", "epoch": 2, "kind": "job_error",
              "message": "boom here", "traceback": "Traceback:\n  File x\nValueError",
              "event": "worker.failed", "level": "error", "ts": "2026-11-28T23:02:40.5Z"}
    plain = Printer(io.StringIO(), raw=False, colour=False).render(record)
    head, *block = plain.splitlines()
    assert head.endswith('[worker] worker.failed epoch=2 kind=job_error message="boom here"')
    assert "ERROR" in head and "run_id" not in head
    assert block == ["  traceback:", "    Traceback:", "      File x", "    ValueError"]
    coloured = Printer(io.StringIO(), raw=False, colour=True).render(record)
    assert "\x1b[31mERROR" in coloured and coloured.count("\n") == 5
