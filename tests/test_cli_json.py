"""Every ``--json`` output parses and has its documented keys, with the supervisor up and
down; the metrics endpoint of a live run parses with prometheus-client's own parser; a
run done before any beat counted its units still shows them; a reader that closes the
pipe early ends every command quietly.

The documented keys are read from the README's sections "JSON outputs" and "Log events",
so the README and this test cannot drift apart."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from nkat.supervisor.config import KEYS
from tests.e2e import (  # noqa: F401 - reap_processes is an autouse fixture
    REPO,
    SupervisedRun,
    env_with,
    reap_processes,
    wait_for,
)

JOB = ["max_dimension=30000000", "unit_dims=65536", "checkpoint_interval=0.2",
       "segment_size=1048576"]
SHORT_JOB = ["max_dimension=3000000", "segment_size=1048576"]  # 46 units, done in a second
SHORT_UNITS = -(-3000000 // 65536)

README = (REPO / "README.md").read_text()


# The documented keys ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shape:
    """A documented JSON value: an object's keys, each with the shape of its value (None
    where the document does not give one), or an array of such objects; either may be
    null. An object whose one key is upper case (``{KEY: …}``) maps every key so."""

    keys: dict[str, Shape | None]
    array: bool = False
    nullable: bool = False


def _section(title: str) -> str:
    section = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert section, f'README lost its section "## {title}"'
    return section.group(1)


def _json_outputs_cell(command: str) -> str:
    """The keys cell of ``command``'s row in the README's "JSON outputs" table."""
    row = re.search(rf"^\| `{re.escape(command)}` \| (.+?) \|$", _section("JSON outputs"),
                    re.M)
    assert row, f'README\'s "JSON outputs" table lost its row for `{command}`'
    return row.group(1)


def documented(command: str) -> Shape:
    """The shape README gives ``command``'s output: ``{a, b: null or {c}, d: [{e}]}``,
    optionally after "an array of", or a list of `key` (note) items."""
    cell = _json_outputs_cell(command)
    braces = re.fullmatch(r"(an array of )?`(\{.*\})`.*", cell)
    if braces:
        shape = _Braces(braces.group(2)).parse()
        return dataclasses.replace(shape, array=bool(braces.group(1)))
    return _listed_keys(cell, f"README's `{command}` row")


def documented_log_line() -> Shape:
    """The keys every log line has, from the first paragraph of README's "Log events"."""
    sentence = re.search(r"one JSON\s+object with (.*?), plus", _section("Log events"), re.S)
    assert sentence, 'README\'s "Log events" no longer says which keys every line has'
    return _listed_keys(sentence.group(1), 'README\'s "Log events"')


def _listed_keys(text: str, where: str) -> Shape:
    """``a`, `b` (a note), `c` (`x`, `y`, …, or null)``: a note that ends in "or null" lists
    the keys of an object value that may be null; other notes only explain."""
    keys: dict[str, Shape | None] = {}
    for item in re.finditer(r"`(\w+)`(?: \(([^()]*)\))?", " ".join(text.split())):
        name, note = item.groups()
        sub = None
        if note and note.endswith(", or null"):
            sub = Shape(dict.fromkeys(re.findall(r"`(\w+)`", note)), nullable=True)
        keys[name] = sub
    assert keys, f"{where} names no keys"
    return Shape(keys)


class _Braces:
    """The README's brace notation: object := { name [: value] , … };
    value := [null or] ( object | [object] )."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = re.findall(r"null or|\w+|\S", text)
        self.pos = 0

    def parse(self) -> Shape:
        shape = self._object()
        assert self.pos == len(self.tokens), f"{self.text!r}: trailing {self.tokens[self.pos:]}"
        return shape

    def _object(self) -> Shape:
        self._take("{")
        keys: dict[str, Shape | None] = {}
        while True:
            name = self._take()
            assert re.fullmatch(r"\w+", name), f"{self.text!r}: a key expected, not {name!r}"
            keys[name] = None
            if self._peek() == ":":
                self._take(":")
                keys[name] = self._value()
            end = self._take()
            if end == "}":
                return Shape(keys)
            assert end == ",", f"{self.text!r}: ',' or '}}' expected, not {end!r}"

    def _value(self) -> Shape:
        nullable = self._peek() == "null or"
        if nullable:
            self._take()
        if self._peek() == "[":
            self._take("[")
            item = self._object()
            self._take("]")
            return dataclasses.replace(item, array=True, nullable=nullable)
        return dataclasses.replace(self._object(), nullable=nullable)

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self, expected: str | None = None) -> str:
        token = self._peek()
        assert token is not None, f"{self.text!r} ends early"
        assert expected in (None, token), f"{self.text!r}: {expected!r} expected, not {token!r}"
        self.pos += 1
        return token


def check(value: object, shape: Shape | None, where: str) -> None:
    """``value`` has every key ``shape`` documents, at every depth."""
    if shape is None or (value is None and shape.nullable):
        return
    if shape.array:
        assert isinstance(value, list), f"{where} is not an array: {value!r}"
        for n, item in enumerate(value):
            check(item, dataclasses.replace(shape, array=False, nullable=False), f"{where}[{n}]")
        return
    assert isinstance(value, dict), f"{where} is not an object: {value!r}"
    if len(shape.keys) == 1 and next(iter(shape.keys)).isupper():
        (inner,) = shape.keys.values()
        for key, item in value.items():
            check(item, inner, f"{where}.{key}")
        return
    missing = set(shape.keys) - set(value)
    assert not missing, f"{where} lacks its documented keys {sorted(missing)}"
    for key, inner in shape.keys.items():
        check(value[key], inner, f"{where}.{key}")


def test_the_documented_keys_are_read_from_the_documents():
    status = documented("status --json")
    assert {"durable_units", "last_checkpoint_wall", "outcome", "foreign_dropped"} <= set(
        status.keys)
    gpu = status.keys["gpu"]
    assert gpu is not None and gpu.nullable and {"temperature", "duty"} <= set(gpu.keys)
    assert status.keys["source"] is None  # a note on values, not keys
    problem = documented("verify --json").keys["problem"]
    assert problem == Shape(dict.fromkeys(["file", "offset", "reason", "needed"]), nullable=True)
    devices = documented("gpu --json").keys["devices"]
    assert devices is not None and devices.array and "reading" in devices.keys
    assert documented("checkpoints --json").array
    assert set(documented_log_line().keys) == {"ts", "level", "event", "run_id", "component"}


# Running the commands ---------------------------------------------------------------------
def _argv(run: SupervisedRun, *args: str) -> list[str]:
    return [sys.executable, "-m", "nkat.supervisor", *args, "--state-dir", str(run.state)]


def _cli(run: SupervisedRun, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_argv(run, *args), capture_output=True, text=True, timeout=60,
                          env=env_with())


def _json(run: SupervisedRun, *args: str) -> object:
    out = _cli(run, *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_json_outputs_and_metrics_with_the_supervisor_up_then_down(tmp_path):
    port = _free_port()
    run = SupervisedRun(tmp_path, "json", JOB + [f"metrics_addr=127.0.0.1:{port}"],
                        failpoints="stall@unit=200:seconds=4",
                        extra_args=["--sim-gpu", "calm"])  # a GPU reading in the status
    run.start()
    run.wait_welcomed(1)
    wait_for(lambda: run.status().get("units_done"), 30, "progress")

    live = _json(run, "status", "json")
    check(live, documented("status --json"), "live status")
    assert live["source"] == "supervisor" and live["gpu"] is not None
    assert live["state"] == "running" and live["worker_pid"]

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("nkat_up", "nkat_progress_ratio", "nkat_dims_per_second",
                 "nkat_checkpoint_ack_seconds", "nkat_heartbeat_age_seconds",
                 "nkat_protocol_errors", "nkat_restarts", "nkat_worker_epoch"):
        assert name in families, sorted(families)
    up = families["nkat_up"].samples[0]
    assert up.value == 1 and up.labels["run_id"] == "json"

    assert run.wait() == 0, run.err
    down = _json(run, "status", "json")
    check(down, documented("status --json"), "status from disk")
    assert down["source"] == "disk" and down["gpu"] is not None
    assert down["state"] == "completed" and down["outcome"] == "completed"
    assert down["progress"] == 1.0 and down["units_done"] == down["units_total"] == 458

    rows = _json(run, "runs")
    check(rows, documented("runs --json"), "runs")
    assert [row["state"] for row in rows] == ["completed"]
    checkpoints = _json(run, "checkpoints", "json")
    check(checkpoints, documented("checkpoints --json"), "checkpoints")
    assert checkpoints
    report = _json(run, "verify", "json")
    check(report, documented("verify --json"), "verify")
    assert report["ok"] is True
    config = _json(run, "config", "--set", "max_temperature=80")
    check(config, documented("config --json"), "config")
    assert set(config) == {key.name for key in KEYS}  # "for every key"
    assert config["max_temperature"] == {"value": 80.0, "source": "--set", "role": "supervisor"}
    gpu = _json(run, "gpu", "--sim-gpu", "calm")
    check(gpu, documented("gpu --json"), "gpu")
    assert gpu["devices"]

    _json_outputs_cell("results")  # "the result itself"
    result = _cli(run, "results", "json")
    assert result.returncode == 0 and json.loads(result.stdout) == run.result()
    assert run.result()["summary"]["total_dimensions"] == 30000000

    logs = _cli(run, "logs", "json", "--json")
    assert logs.returncode == 0, logs.stderr
    lines = logs.stdout.splitlines()
    assert len(lines) > 5
    for n, line in enumerate(lines):
        check(json.loads(line), documented_log_line(), f"log line {n + 1}")


def test_verify_exits_1_and_names_the_offset_of_corruption(tmp_path):
    run = SupervisedRun(tmp_path, "bad", JOB)
    run.start()
    assert run.wait() == 0, run.err
    segment = sorted((run.path / "wal").glob("*.wal"))[0]
    data = bytearray(segment.read_bytes())
    data[200] ^= 0xFF  # inside an acknowledged record, early in the log
    segment.write_bytes(bytes(data))
    out = _cli(run, "verify", "bad", "--json")
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert report["ok"] is False and report["problem"]["offset"] <= 200
    assert str(segment) == report["problem"]["file"]
    assert REPO.exists()


def test_a_run_done_before_any_beat_counted_its_units_shows_them_from_disk(tmp_path):
    # The first beat comes before the job is set up and says 0 units; at 30 s between
    # beats no other comes in the second the 46 units take, and no checkpoint either.
    run = SupervisedRun(tmp_path, "short", SHORT_JOB + ["heartbeat_interval=30",
                                                        "heartbeat_timeout=60"])
    run.start()
    assert run.wait() == 0, run.err
    status = _json(run, "status", "short")
    assert status["state"] == "completed" and status["durable_ckpt_seq"] == 0
    assert (status["units_done"], status["units_total"], status["progress"]) == (
        SHORT_UNITS, SHORT_UNITS, 1.0)

    (run.path / "status.json").unlink()  # never written or lost: the WAL and log still tell
    status = _json(run, "status", "short")
    check(status, documented("status --json"), "status without status.json")
    assert (status["units_done"], status["units_total"], status["progress"]) == (
        SHORT_UNITS, SHORT_UNITS, 1.0)
    assert status["epoch"] == 1 and status["outcome"] == "completed"
    (row,) = _json(run, "runs")
    assert row["progress"] == 1.0


def test_a_reader_that_closes_the_pipe_early_ends_each_command_quietly(tmp_path):
    run = SupervisedRun(tmp_path, "pipe", SHORT_JOB)
    run.start()
    assert run.wait() == 0, run.err

    # --watch writes until its reader goes: read one status, then close the pipe.
    watch = subprocess.Popen(_argv(run, "status", "pipe", "--watch", "--json", "--interval",
                                   "0.05"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env_with())
    assert watch.stdout is not None and watch.stderr is not None
    assert json.loads(watch.stdout.readline())["run_id"] == "pipe"
    watch.stdout.close()
    assert watch.wait(timeout=60) == 0
    assert watch.stderr.read() == ""

    # A reader that is gone before the command writes a byte.
    for args in (["checkpoints", "pipe", "--json"], ["results", "pipe"], ["runs", "--json"],
                 ["verify", "pipe", "--json"], ["config", "--json"], ["status", "pipe"],
                 ["logs", "pipe", "--json"]):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            out = subprocess.run(_argv(run, *args), stdout=write_end, stderr=subprocess.PIPE,
                                 text=True, timeout=60, env=env_with())
        finally:
            os.close(write_end)
        assert (out.returncode, out.stderr) == (0, ""), args
