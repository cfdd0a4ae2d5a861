"""The worker's side of the conversation, against a fake supervisor over real ipc sockets:
handshake, beats, checkpoints and their acks, resends, commands, done."""

from __future__ import annotations

import hashlib
import json
import os

import msgpack
import pytest

from nkat.protocol import exitcodes
from nkat.protocol.messages import (
    DONE_ACK_SEQ,
    PROTOCOL_VERSION,
    Beat,
    Ckpt,
    Cmd,
    Done,
    Extend,
    Log,
    Resume,
    state_digest,
)
from nkat.worker import state
from nkat.worker.heartbeat import STAGES
from tests.fake_supervisor import TOY, FakeSupervisor, toy_expected

REQUIRED_METRICS = {"batch_seconds", "batch_units", "units_per_s", "duty", "rss_bytes"}
SLOW = {"units": 100_000, "unit_seconds": 0.002}  # runs until the test ends it


@pytest.fixture
def sup():
    fake = FakeSupervisor()
    yield fake
    fake.close()


def test_hello_welcome_beats_done(sup):
    hello = sup.start({"units": 150, "unit_seconds": 0.002}, NKAT_JOB=TOY)
    assert (hello.token, hello.pid, hello.epoch) == (sup.token, sup.proc.pid, 1)
    assert (hello.job, hello.proto, hello.backend, hello.device) == \
        (TOY, PROTOCOL_VERSION, "numpy", "cpu")
    assert sup.routing_id == sup.token.encode()  # the epoch's secret, not a guessable id

    done = sup.expect(Done)
    canonical = json.dumps(done.result, sort_keys=True, separators=(",", ":"))
    assert done.digest == hashlib.sha256(canonical.encode()).hexdigest()
    assert {k: done.result[k] for k in ("units", "total", "chain", "merged")} == \
        toy_expected(150)
    assert done.result["provenance"]["backend"] == "numpy"
    # Until the ack, the worker keeps beating in its last stage.
    sup.expect(Beat, where=lambda b: b.stage == "finalize" and b.units_done == 150)
    sup.ack(DONE_ACK_SEQ)
    assert sup.wait_exit() == exitcodes.DONE
    assert sup.stdout() == ""
    (extend,) = [m for m in sup.received if isinstance(m, Extend)]
    assert extend.reason == "finalize" and extend.seconds > 0
    assert sup.received.index(extend) < sup.received.index(done)

    beats = sup.beats()
    assert len(beats) >= 3
    assert [b.seq for b in beats] == sorted({b.seq for b in beats})
    assert all(b.stage in STAGES for b in beats)
    assert all(b.units_total == 150 for b in beats if b.stage != "startup")
    assert all(REQUIRED_METRICS <= set(b.metrics) for b in beats)
    seqs = [b.progress_seq for b in beats]
    assert seqs == sorted(seqs) and seqs[-1] > seqs[0]


def test_the_first_progress_of_an_epoch_is_beaten_at_once(sup):
    # Beats every 30 s: after the one that starts them, only the first batch's own beat
    # can show progress within the 5 s the test waits.
    sup.start({"units": 100_000, "unit_seconds": 0.002}, settings={"heartbeat_interval": 30})
    first = sup.expect(Beat, timeout=5, where=lambda b: b.units_done > 0)
    assert first.progress_seq == 1 and first.stage == "compute"
    later = sup.beats(sup.collect(1.0))
    assert later == []  # then the 30 s cadence again


def test_checkpoints_keep_one_in_flight_and_resend_until_acked(sup):
    sup.auto_ack = False
    sup.start(SLOW, settings={"checkpoint_interval": 0.05, "ack_resend": 0.3})
    first = sup.expect(Ckpt)
    assert first.ckpt_seq == 1 and first.digest == state_digest(first.state)
    job_state, counters = state.unwrap(first.state, first.units_done)
    assert first.units_done > 0 and counters["batches"] > 0

    later = [m for m in sup.collect(1.0) if isinstance(m, Ckpt)]
    assert len(later) >= 2, "an unacknowledged checkpoint must be resent"
    assert all(m == first for m in later), "nothing new while one is in flight"

    sup.ack(1)
    second = sup.expect(Ckpt, timeout=3)
    assert second.ckpt_seq == 2 and second.units_done > first.units_done


def test_compressed_checkpoints_resume_to_the_same_result(sup):
    params = {"units": 300, "unit_seconds": 0.002}
    sup.start(params, settings={"checkpoint_interval": 0.05, "checkpoint_compression": True},
              failpoints="crash@unit=150:epoch=1")
    assert sup.wait_exit() == 1
    last = sup.acked[-1]
    assert msgpack.unpackb(last.state)["codec"] == "zlib" and last.units_done > 0
    resumed = FakeSupervisor(epoch=2)
    try:
        # Compression off now: the resumed worker still reads the compressed state.
        resumed.start(params, resume=Resume(last.ckpt_seq, last.units_done, last.state))
        done = resumed.expect(Done)
        resumed.ack(DONE_ACK_SEQ)
        assert resumed.wait_exit() == exitcodes.DONE
        assert {k: done.result[k] for k in ("units", "total", "chain", "merged")} == \
            toy_expected(300)
    finally:
        resumed.close()


def test_checkpoint_resent_at_once_after_the_socket_is_rebound(sup):
    sup.auto_ack = False
    sup.start(SLOW, settings={"checkpoint_interval": 0.05, "ack_resend": 60.0})
    first = sup.expect(Ckpt)
    sup.rebind()
    again = sup.expect(Ckpt, timeout=3)
    assert again == first
    sup.ack(first.ckpt_seq)
    assert sup.expect(Ckpt, timeout=3).ckpt_seq == 2


def test_checkpoint_now(sup):
    sup.start(SLOW)
    sup.expect(Beat, where=lambda b: b.units_done > 0)
    sup.cmd("checkpoint_now")
    ckpt = sup.expect(Ckpt, timeout=3)
    assert ckpt.ckpt_seq == 1
    sup.expect(Beat, where=lambda b: b.metrics["ckpt_seq"] == 1, timeout=3)


@pytest.mark.parametrize("acks", [True, False])
def test_stop_sends_a_final_checkpoint_and_exits_stopped(sup, acks):
    sup.auto_ack = acks
    sup.start(SLOW)
    sup.expect(Beat, where=lambda b: b.units_done > 0)
    sup.cmd("stop", deadline_s=0.5)
    ckpt = sup.expect(Ckpt, timeout=3)
    assert ckpt.units_done > 0
    assert sup.wait_exit(5) == exitcodes.STOPPED
    stopping = [b for b in sup.beats() if b.stage == "stopping"]
    assert all(b.units_done == ckpt.units_done for b in stopping)


def test_pause_freezes_progress_while_beats_continue(sup):
    sup.start(SLOW)
    sup.expect(Beat, where=lambda b: b.units_done > 0)
    sup.cmd("pause")
    paused = sup.expect(Beat, where=lambda b: b.stage == "paused", timeout=3)
    beats = sup.beats(sup.collect(0.8))
    assert len(beats) >= 4
    assert {(b.stage, b.progress_seq, b.units_done) for b in beats} == \
        {("paused", paused.progress_seq, paused.units_done)}
    sup.cmd("resume")
    sup.expect(Beat, where=lambda b: b.stage == "compute"
               and b.progress_seq > paused.progress_seq, timeout=3)


def _rate(beats: list[Beat]) -> float:
    return (beats[-1].units_done - beats[0].units_done) / (beats[-1].t_mono - beats[0].t_mono)


def test_throttle_at_half_duty_roughly_halves_throughput(sup):
    # 50 ms batches of sleeping units: the rate is set by the clock, not the noisy CPU.
    sup.start({"units": 100_000, "unit_seconds": 0.002}, settings={"batch_size": 25})
    sup.expect(Beat, where=lambda b: b.progress_seq > 2)
    full = _rate(sup.beats(sup.collect(1.2)))
    sup.cmd("throttle", duty=0.5)
    sup.expect(Beat, where=lambda b: b.metrics["duty"] == 0.5, timeout=3)
    half = _rate(sup.beats(sup.collect(1.5)))
    assert abs(half / full - 0.5) < 0.3, (full, half)


def test_commands_of_another_epoch_are_ignored(sup):
    sup.start(SLOW)
    sup.expect(Beat, where=lambda b: b.units_done > 0)
    sup.send(Cmd(epoch=sup.epoch + 1, op="pause"))
    sup.expect(Log, where=lambda m: m.event == "channel.stale_message", timeout=3)
    assert all(b.stage != "paused" for b in sup.beats(sup.collect(0.4)))


def test_free_memory_halves_the_batch(sup):
    sup.start(SLOW, settings={"batch_size": 16})
    sup.expect(Beat, where=lambda b: b.metrics["batch_units"] == 16)
    sup.cmd("free_memory")
    halved = sup.expect(Beat, where=lambda b: b.metrics["batch_units"] < 16, timeout=3)
    assert halved.metrics["batch_units"] == 8


def test_unacknowledged_done_is_resent_then_the_worker_leaves_orphaned(sup):
    sup.start({"units": 20}, settings={"ack_resend": 0.2, "supervisor_timeout": 1.0})
    assert sup.wait_exit(5) == exitcodes.ORPHANED
    dones = [m for m in sup.received if isinstance(m, Done)]
    assert len(dones) >= 3 and all(d == dones[0] for d in dones)
    assert "unacknowledged" in sup.stderr()


def test_worker_exits_orphaned_when_its_parent_is_not_the_supervisor(sup):
    sup.spawn(supervisor_pid=os.getppid())
    assert sup.wait_exit(5) == exitcodes.ORPHANED
    assert sup.collect(0.1) == []


def test_no_welcome_means_startup_failure(sup):
    sup.spawn(NKAT_WELCOME_TIMEOUT="0.5")
    assert sup.wait_exit(5) == exitcodes.STARTUP
    assert "no welcome" in sup.stderr()
