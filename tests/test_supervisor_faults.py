"""Real supervisor, real worker, injected faults, for what lives in the shell: a hang with
the GIL held (its faulthandler dump reaches the log), SIGTERM to the supervisor, --detach
and private sockets, a second supervisor, and malformed or foreign messages on the real
worker socket. The decisions behind each (and every other fault) are scripted against the
controller in test_controller_*.py."""

from __future__ import annotations

import signal
import subprocess
import time

import msgpack
import pytest
import zmq

from nkat.protocol import messages as m
from nkat.supervisor import journal
from nkat.supervisor.wal import RecordType
from tests.e2e import (  # noqa: F401 - reap_processes is an autouse fixture
    IDLING,
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


# The operator -------------------------------------------------------------------------------
def test_sigterm_checkpoints_records_stop_and_exits_4(tmp_path, expected):
    run = SupervisedRun(tmp_path, "term", JOB + QUICK, failpoints=IDLING)
    run.start()
    run.wait_welcomed(1)
    time.sleep(0.3)
    run.proc.send_signal(signal.SIGHUP)  # ignored
    time.sleep(0.2)
    assert run.proc.poll() is None
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 4
    records = [r for r in run.records() if r.type is not RecordType.RUN]
    last = records[-1]
    # SIGTERM is also how a machine shuts down: the run wants to run again at boot.
    assert last.type is RecordType.STOP and last.payload["desired"] == "running"
    # The worker's final checkpoint was acknowledged, and the stop names it.
    (stopped,) = run.events("worker.stopped")
    assert stopped["final_ckpt_acked"] is True
    final = [e for e in map(journal.read, records) if isinstance(e, journal.CheckpointMeta)][-1]
    assert last.payload["ckpt_seq"] == final.ckpt_seq > 0
    assert final.units_done == stopped["units_done"]
    resumed = SupervisedRun(tmp_path, "term", JOB + QUICK)
    resumed.start()
    _finish(resumed, expected)
    assert resumed.resumed_seqs()[-1] == final.ckpt_seq


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
    run = SupervisedRun(tmp_path, "ctl", JOB + QUICK, failpoints=IDLING)
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


def test_a_client_posing_as_the_worker_is_not_believed(tmp_path, expected):
    # The old routing id ("<epoch>:<pid>", printed by status) and even the real one (the
    # token, read here from the worker's environment as only its own user can) get a
    # forger nowhere: the first is a stranger, the second is refused a handover.
    run = SupervisedRun(tmp_path, "poser", JOB + QUICK,
                        failpoints="stall@unit=300:seconds=2:epoch=1")
    run.start()
    run.wait_welcomed(1)
    worker = wait_for(run.worker, 30, "the worker")
    token = worker.environ()["NKAT_TOKEN"].encode()
    forged_result = {"forged": True}
    forgeries = [m.Done(epoch=1, result=forged_result, digest=m.result_digest(forged_result)),
                 m.Ckpt(epoch=1, ckpt_seq=100000, units_done=916, state=b"evil",
                        digest=m.state_digest(b"evil"))]
    ctx = zmq.Context()
    for identity in (f"1:{worker.pid}".encode(), token):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(f"ipc://{run.path / 'sock' / 'worker'}")
        for msg in forgeries:
            sock.send(m.encode(msg))
        time.sleep(0.3)
        sock.close()
    ctx.term()
    _finish(run, expected)
    assert "forged" not in run.result()
    seqs = [r.payload["ckpt_seq"] for r in run.records()
            if r.type in (RecordType.CKPT, RecordType.CKPT_REF)]
    assert 100000 not in seqs and seqs == list(range(1, len(seqs) + 1))
    assert len(run.resumed_seqs()) == 1  # the genuine worker was never disturbed
