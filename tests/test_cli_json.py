"""Every ``--json`` output parses and has its documented keys, with the supervisor up and
down; the metrics endpoint of a live run parses with prometheus-client's own parser."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e import (  # noqa: F401 - reap_processes is an autouse fixture
    REPO,
    SupervisedRun,
    env_with,
    reap_processes,
    wait_for,
)

JOB = ["max_dimension=30000000", "unit_dims=65536", "checkpoint_interval=0.2",
       "segment_size=1048576"]

#: The documented keys of each command's --json output (README, "JSON outputs").
STATUS_KEYS = {"run_id", "state", "source", "epoch", "restarts", "progress", "units_done",
               "units_total", "units_per_s", "dims_per_s", "durable_ckpt_seq", "worker_pid",
               "supervisor_pid"}
RUNS_KEYS = {"run_id", "created", "state", "job", "spec_hash", "progress"}
CHECKPOINT_KEYS = {"ckpt_seq", "epoch", "units_done", "t_wall", "size", "inline", "digest",
                   "verified"}
VERIFY_KEYS = {"run_id", "ok", "segments", "records", "checkpoints", "problem", "notes"}


def _cli(run: SupervisedRun, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "nkat.supervisor", *args, "--state-dir", str(run.state)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env_with())


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
                        failpoints="stall@unit=200:seconds=4")
    run.start()
    run.wait_welcomed(1)
    wait_for(lambda: run.status().get("units_done"), 30, "progress")

    live = _json(run, "status", "json")
    assert STATUS_KEYS <= set(live) and live["source"] == "supervisor"
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
    assert STATUS_KEYS <= set(down) and down["source"] == "disk"
    assert down["state"] == "completed" and down["progress"] == 1.0

    (row,) = _json(run, "runs")
    assert RUNS_KEYS <= set(row) and row["state"] == "completed"
    checkpoints = _json(run, "checkpoints", "json")
    assert checkpoints and all(CHECKPOINT_KEYS <= set(c) for c in checkpoints)
    report = _json(run, "verify", "json")
    assert VERIFY_KEYS <= set(report) and report["ok"] is True
    config = _json(run, "config", "--set", "max_temperature=80")
    assert config["max_temperature"] == {"value": 80.0, "source": "--set", "role": "supervisor"}
    result = _cli(run, "results", "json")
    assert json.loads(result.stdout)["summary"]["total_dimensions"] == 30000000


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
