"""Real supervisor, real worker, injected faults: hangs of each kind, crash loops, fatal
job errors, a worker that ignores SIGTERM, operator signals, a second supervisor, and
malformed or foreign messages on the worker socket."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import msgpack
import pytest
import zmq

from nkat.protocol import messages as m
from nkat.supervisor.wal import RecordType
from tests.e2e import (  # noqa: F401 - reap_processes is an autouse fixture
    SupervisedRun,
    deterministic,
    reap_processes,
    reference,
    wait_for,
)

JOB = ["max_dimension=60000000", "unit_dims=65536"]  # ~916 units, well under a second
QUICK = ["restart_delay=0.05", "restart_delay_max=0.2", "checkpoint_interval=0.2",
         "stop_deadline=0.5", "term_grace=0.5", "segment_size=1048576"]


@pytest.fixture(scope="module")
def expected() -> str:
    return deterministic(reference(JOB))


def _finish(run: SupervisedRun, expected: str, code: int = 0) -> None:
    assert run.wait() == code, run.err
    assert deterministic(run.result()) == expected


# Hangs --------------------------------------------------------------------------------
def test_hang_with_gil_held_is_unresponsive_and_recovered(tmp_path, expected):
    run = SupervisedRun(tmp_path, "gil", JOB + QUICK + ["heartbeat_timeout=1.5",
                                                       "heartbeat_interval=0.25"],
                        failpoints="hang_gil@unit=300:epoch=1")
    run.start()
    _finish(run, expected)
    (verdict,) = run.events("watchdog.unresponsive")
    assert verdict["deadline_s"] == 1.5 and verdict["overdue_s"] <= 1.0
    assert run.events("worker.sigterm") or run.events("worker.sigkill")
    assert len(run.resumed_seqs()) == 2
    # The faulthandler dump (SIGUSR1) reached the log through the worker's stderr.
    stderr = "\n".join(e["line"] for e in run.events("worker.stderr"))
    assert "most recent call first" in stderr and "failpoints.py" in stderr


def test_hang_with_gil_released_is_stalled_while_beats_flow(tmp_path, expected):
    run = SupervisedRun(tmp_path, "nogil", JOB + QUICK + [
        "stall_timeout_min=1.5", "stall_timeout_max=1.5", "heartbeat_timeout=30"],
        failpoints="hang_nogil@unit=300:epoch=1")
    run.start()
    _finish(run, expected)
    (verdict,) = run.events("watchdog.stalled")
    assert verdict["deadline_s"] == 1.5 and verdict["overdue_s"] <= 1.0
    assert not run.events("watchdog.unresponsive")  # beats kept coming
    assert len(run.resumed_seqs()) == 2


def test_sigstopped_worker_is_unresponsive_and_replaced(tmp_path, expected):
    run = SupervisedRun(tmp_path, "sigstop", JOB + QUICK + ["heartbeat_timeout=1.5",
                                                           "heartbeat_interval=0.25"],
                        failpoints="stall@unit=200:seconds=2:epoch=1")
    run.start()
    run.wait_welcomed(1)
    worker = wait_for(run.worker, 30, "the worker")
    os.kill(worker.pid, signal.SIGSTOP)
    _finish(run, expected)
    (verdict,) = run.events("watchdog.unresponsive")
    assert verdict["overdue_s"] <= 1.0
    assert run.events("worker.sigkill")  # SIGTERM does not reach a stopped process


def test_slow_but_progressing_worker_is_never_killed(tmp_path, expected):
    stalls = ";".join(f"stall@unit={u}:seconds=1.2" for u in (100, 300, 500, 700))
    run = SupervisedRun(tmp_path, "slow", JOB + QUICK + [
        "stall_timeout_min=2.5", "stall_timeout_max=2.5", "heartbeat_timeout=2"],
        failpoints=stalls)
    run.start()
    _finish(run, expected)
    assert not run.events("watchdog.stalled") and not run.events("watchdog.unresponsive")
    assert len(run.resumed_seqs()) == 1


# Exits ----------------------------------------------------------------------------------
def test_crash_loop_gives_up_with_exit_3_and_stays_resumable(tmp_path, expected):
    run = SupervisedRun(tmp_path, "loop", JOB + QUICK + ["max_restarts=3"],
                        failpoints="crash@start:code=1")
    run.start()
    assert run.wait() == 3
    (gave_up,) = run.events("run.gave_up")
    assert "crash loop" in gave_up["reason"]
    assert len(run.resumed_seqs()) == 4  # the first worker and three restarts
    again = SupervisedRun(tmp_path, "loop", JOB + QUICK)
    again.start()
    _finish(again, expected)
    # Not an unclean shutdown: the last supervisor ended the run itself, and said so.
    assert [e["after"] for e in again.events("run.resumed")] == ["gave_up"]
    assert again.events("run.recovered_unclean") == []


def test_fatal_job_error_is_not_restarted(tmp_path):
    run = SupervisedRun(tmp_path, "fatal", JOB + QUICK, failpoints="error@unit=10")
    run.start()
    assert run.wait() == 3
    assert len(run.resumed_seqs()) == 1
    (failed,) = run.events("worker.failed")
    assert failed["fatal"] is True
    assert "fatal job error" in run.events("run.gave_up")[0]["reason"]


def test_worker_ignoring_sigterm_is_sigkilled(tmp_path, expected):
    run = SupervisedRun(tmp_path, "noterm", JOB + QUICK + [
        "stall_timeout_min=1", "stall_timeout_max=1"],
        failpoints="ignore_sigterm;hang_nogil@unit=300:epoch=1")
    run.start()
    _finish(run, expected)
    names = [e["event"] for e in run.events()]
    assert names.index("worker.sigterm") < names.index("worker.sigkill")


# The operator -------------------------------------------------------------------------------
def test_sigterm_checkpoints_records_stop_and_exits_4(tmp_path, expected):
    run = SupervisedRun(tmp_path, "term", JOB + QUICK,
                        failpoints="stall@unit=400:seconds=3:epoch=1")
    run.start()
    run.wait_welcomed(1)
    time.sleep(0.3)
    run.proc.send_signal(signal.SIGHUP)  # ignored
    time.sleep(0.2)
    assert run.proc.poll() is None
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 4
    last = [r for r in run.records() if r.type is not RecordType.RUN][-1]
    # SIGTERM is also how a machine shuts down: the run wants to run again at boot.
    assert last.type is RecordType.STOP and last.payload["desired"] == "running"
    resumed = SupervisedRun(tmp_path, "term", JOB + QUICK)
    resumed.start()
    _finish(resumed, expected)


def test_second_sigint_stops_at_once_and_still_records_stop(tmp_path, expected):
    run = SupervisedRun(tmp_path, "int2", JOB + QUICK + ["stop_deadline=30"],
                        failpoints="hang_nogil@unit=100:epoch=1")
    run.start()
    run.wait_welcomed(1)
    time.sleep(0.3)
    run.proc.send_signal(signal.SIGINT)  # the hung worker cannot obey cmd stop ...
    time.sleep(0.5)
    run.proc.send_signal(signal.SIGINT)  # ... so the operator insists
    started = time.monotonic()
    assert run.wait() == 4
    assert time.monotonic() - started < 10  # well before stop_deadline
    last = [r for r in run.records() if r.type is not RecordType.RUN][-1]
    assert last.type is RecordType.STOP
    assert run.events("worker.kill_escalated")
    resumed = SupervisedRun(tmp_path, "int2", JOB + QUICK)
    resumed.start()
    _finish(resumed, expected)


def test_detach_returns_the_run_id_and_sockets_are_private(tmp_path, expected):
    run = SupervisedRun(tmp_path, "bg", JOB + QUICK, failpoints="stall@unit=300:seconds=2",
                        extra_args=["--detach"])
    out = subprocess.run(run.argv(), capture_output=True, text=True, timeout=60,
                         env=__import__("tests.e2e", fromlist=["env_with"]).env_with(
                             run.failpoints))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "bg"
    for name in ("worker", "control", "events"):
        mode = (run.path / "sock" / name).stat().st_mode & 0o777
        assert mode & 0o077 == 0, oct(mode)
    wait_for(lambda: (run.path / "results" / "result.json").exists(), 60, "the result")
    assert deterministic(run.result()) == expected


def test_stop_command_and_second_supervisor(tmp_path):
    run = SupervisedRun(tmp_path, "ctl", JOB + QUICK,
                        failpoints="stall@unit=100:seconds=20:epoch=1")
    run.start()
    run.wait_welcomed(1)
    second = subprocess.run(run.argv(), capture_output=True, text=True, timeout=60)
    assert second.returncode == 2
    assert f"already supervised by supervisor pid {run.proc.pid}" in second.stderr
    stop = subprocess.run(run.argv("stop")[:6] + [run.run_id], capture_output=True, text=True,
                          timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert run.wait() == 4


# Bad input on the worker socket ---------------------------------------------------------------
def test_malformed_and_foreign_messages_change_nothing(tmp_path, expected):
    run = SupervisedRun(tmp_path, "intruder", JOB + QUICK,
                        failpoints="stall@unit=300:seconds=2:epoch=1")
    run.start()
    run.wait_welcomed(1)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"1:999999")
    sock.connect(f"ipc://{run.path / 'sock' / 'worker'}")
    forged = m.Ckpt(epoch=1, ckpt_seq=10**6, units_done=916, state=b"evil",
                    digest=m.state_digest(b"evil"))
    for payload in (b"\xc1garbage", msgpack.packb({"v": 1, "t": "nope"}), m.encode(forged),
                    m.encode(m.Beat(epoch=99, seq=1, progress_seq=10**6, units_done=916,
                                    units_total=916, stage="compute", t_mono=0.0, metrics={}))):
        sock.send(payload)
    time.sleep(0.5)
    sock.close()
    ctx.term()
    _finish(run, expected)
    status = run.status()
    assert status["protocol_errors"] >= 2 and status["foreign_dropped"] >= 2
    seqs = [r.payload["ckpt_seq"] for r in run.records()
            if r.type in (RecordType.CKPT, RecordType.CKPT_REF)]
    assert 10**6 not in seqs and seqs == sorted(seqs)
