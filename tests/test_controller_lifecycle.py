"""The run controller's own rules, scripted with a fake clock: checkpoints and acks, the
fenced worker channel, completion, operator stops and signals, control requests, and
fail-stop on a WAL write failure."""

from __future__ import annotations

import pytest

from nkat.protocol import exitcodes
from nkat.protocol import messages as m
from nkat.supervisor import controller as c
from nkat.supervisor import journal
from nkat.supervisor.exitcode import ExitCode
from tests.controller_script import Script


# Checkpoints ---------------------------------------------------------------------------------
def test_a_checkpoint_is_acked_only_once_durable_and_a_resend_is_acked_again():
    s = Script()
    s.run_worker()
    s.ckpt(1, units_done=10)
    (meta,) = s.of_type(journal.CheckpointMeta)
    assert (meta.ckpt_seq, meta.epoch, meta.units_done) == (1, 1, 10)
    assert [a.ckpt_seq for a in s.messages(m.Ack)] == [1]
    s.ckpt(1, units_done=10)  # the ack was lost: a resend is acked again, not stored again
    assert [a.ckpt_seq for a in s.messages(m.Ack)] == [1, 1]
    assert len(s.of_type(journal.CheckpointMeta)) == 1
    assert s.ctl.status()["durable_ckpt_seq"] == 1
    assert s.events("checkpoint.durable")[0]["ack_ms"] == 2.0


@pytest.mark.parametrize("seq", [3, 100000, 0])
def test_a_checkpoint_out_of_sequence_ends_the_worker_and_is_never_stored(seq):
    s = Script()
    s.run_worker()
    s.ckpt(1, units_done=10)
    s.ckpt(seq, units_done=20)
    assert len(s.of_type(journal.CheckpointMeta)) == 1
    assert [a.ckpt_seq for a in s.messages(m.Ack)] == [1]
    (error,) = s.events("protocol.error")
    assert f"checkpoint {seq} does not follow the durable checkpoint 1" in error["reason"]
    assert s.events("worker.killing")[0]["reason"] == "protocol_violation"
    s.advance(1.1)
    s.tick()
    assert s.events("worker.exited")[0]["exit_class"] == "crashed"
    # The next worker picks up from the durable checkpoint 1 and goes on normally.
    s.advance(0.5)
    s.hello()
    assert s.messages(m.Welcome)[-1].resume.ckpt_seq == 1
    s.beat()
    s.ckpt(2, units_done=20)
    assert [r.ckpt_seq for r in s.of_type(journal.CheckpointMeta)] == [1, 2]


def test_a_checkpoint_whose_digest_does_not_match_is_a_violation():
    s = Script()
    s.run_worker()
    s.ckpt(1, units_done=10, digest="0" * 64)
    assert not s.of_type(journal.CheckpointMeta) and not s.messages(m.Ack)
    assert "digest mismatch" in s.events("protocol.error")[0]["reason"]
    assert s.events("worker.killing")[0]["reason"] == "protocol_violation"


def test_a_checkpoint_that_goes_back_in_units_is_a_violation():
    s = Script()
    s.run_worker()
    s.ckpt(1, units_done=50)
    s.ckpt(2, units_done=40)
    assert [r.ckpt_seq for r in s.of_type(journal.CheckpointMeta)] == [1]
    assert "goes back from 50 to 40 units" in s.events("protocol.error")[0]["reason"]


# The fenced channel ---------------------------------------------------------------------------
def test_messages_under_another_routing_id_change_nothing():
    s = Script()
    s.run_worker()
    forged = {"forged": True}
    for msg in (m.Ckpt(epoch=1, ckpt_seq=2, units_done=99, state=b"x",
                       digest=m.state_digest(b"x")),
                m.Done(epoch=1, result=forged, digest=m.result_digest(forged)),
                m.Beat(epoch=1, seq=9, progress_seq=99, units_done=99, units_total=100,
                       stage="compute", t_mono=0.0, metrics={})):
        s.send(msg, token=f"1:{s.worker.pid}")  # the old, guessable routing id
    assert not s.of_type(journal.CheckpointMeta) and not s.of_type(journal.Done)
    assert s.ctl.run.foreign_dropped == 3 and not s.messages(m.Ack)
    assert s.ctl.status()["units_done"] == 0
    # The log names the stranger by a fingerprint, never by the id it used.
    assert all(e["peer"].startswith("unknown peer ") for e in
               s.events("protocol.foreign_epoch"))


def test_a_message_of_an_older_epoch_is_fenced_off():
    s = Script()
    s.run_worker()
    s.exit(-9)
    s.tick()
    s.advance(0.5)
    s.hello()
    s.send(m.Ckpt(epoch=1, ckpt_seq=1, units_done=5, state=b"old",
                  digest=m.state_digest(b"old")))
    assert not s.of_type(journal.CheckpointMeta)
    assert s.events("protocol.foreign_epoch")[-1]["msg_epoch"] == 1


def test_a_hello_with_a_wrong_token_is_refused():
    s = Script()
    s.start()
    s.hello(token="guess")
    assert s.state == "starting" and not s.messages(m.Welcome)
    assert "wrong token" in s.events("protocol.error")[0]["reason"]


def test_a_message_before_hello_and_a_second_hello_are_protocol_errors():
    s = Script()
    s.start()
    s.beat()
    s.hello()
    s.hello()
    assert [e["reason"] for e in s.events("protocol.error")] == [
        "beat before hello", "hello out of turn"]
    assert len(s.messages(m.Welcome)) == 1


def test_a_malformed_frame_is_counted_and_dropped():
    s = Script()
    s.run_worker()
    s.feed(c.MalformedMessage(b"junk", "not msgpack", s.now))
    assert s.ctl.status()["protocol_errors"] == 1 and s.state == "running"


# Completion -----------------------------------------------------------------------------------
def test_done_is_made_durable_written_and_acked_then_the_run_completes():
    s = Script()
    s.run_worker()
    s.done({"answer": 42})
    (done,) = s.of_type(journal.Done)
    assert done.result == {"answer": 42} and s.results == [{"answer": 42}]
    assert s.messages(m.Ack)[-1].ckpt_seq == m.DONE_ACK_SEQ
    s.done({"answer": 42})  # resent: acked again, recorded once
    assert len(s.of_type(journal.Done)) == 1 and len(s.messages(m.Ack)) == 2
    s.exit(exitcodes.DONE)
    s.tick()
    assert s.finish == c.Finish(ExitCode.COMPLETED, "completed", None)
    assert s.statuses[-1]["outcome"] == "completed" and s.statuses[-1]["state"] == "completed"


def test_a_done_whose_digest_does_not_match_is_a_violation():
    s = Script()
    s.run_worker()
    s.send(m.Done(epoch=1, result={"a": 1}, digest="f" * 64))
    assert not s.of_type(journal.Done) and not s.results


def test_exit_done_without_a_durable_result_is_a_crash():
    s = Script()
    s.run_worker()
    s.exit(exitcodes.DONE)
    s.tick()
    assert s.events("worker.exited")[0]["exit_class"] == "crashed" and s.finish is None


# Operator stops and signals -----------------------------------------------------------------
def test_stop_asks_for_a_final_checkpoint_and_records_a_stop_the_boot_leaves_alone():
    s = Script()
    s.run_worker()
    reply = s.control("stop")
    assert reply["ok"] and s.cmds("stop")[0].args == {"deadline_s": 10.0}
    assert s.state == "stopping" and s.levels("worker.killing") == ["info"]
    s.ckpt(1, units_done=30)  # the final checkpoint
    s.tick()
    (stop,) = s.of_type(journal.Stop)
    assert stop.desired is journal.Desired.STOPPED and stop.ckpt_seq == 1
    assert s.finish.code is ExitCode.STOPPED and s.events("run.stopped")


def test_sigterm_records_a_stop_that_a_boot_resumes():
    s = Script()
    s.run_worker()
    s.signal(c.RunSignal.TERM)
    s.tick()
    (stop,) = s.of_type(journal.Stop)
    assert stop.desired is journal.Desired.RUNNING and stop.reason == "signal SIGTERM"
    assert s.finish.code is ExitCode.STOPPED


def test_a_second_sigint_stops_at_once_and_still_records_the_stop():
    s = Script()
    s.run_worker()
    s.worker.obeys_stop = False
    s.signal(c.RunSignal.INT)
    assert s.cmds("stop")
    s.signal(c.RunSignal.INT)
    assert s.events("supervisor.stop_now")
    assert s.history[0].signals == ["SIGUSR1"]
    s.advance(1.2)
    assert s.history[0].signals == ["SIGUSR1", "SIGTERM"]
    s.tick()
    assert s.of_type(journal.Stop)[0].desired is journal.Desired.STOPPED
    assert s.finish.code is ExitCode.STOPPED


def test_a_stop_while_starting_ends_the_worker_at_once():
    s = Script()
    s.start()
    s.control("stop")
    assert s.events("worker.killing")[0]["reason"] == "operator_now" and not s.cmds("stop")


def test_a_stop_during_backoff_is_recorded_without_a_new_worker():
    s = Script(restart_delay=5.0, restart_delay_max=5.0)
    s.run_worker()
    s.exit(-11)
    s.tick()
    s.control("stop")
    assert s.of_type(journal.Stop) and s.finish.code is ExitCode.STOPPED
    assert len(s.history) == 1


def test_sighup_is_ignored_but_quiets_the_progress_line():
    s = Script()
    s.run_worker()
    effects = s.ctl.handle(c.SignalReceived(c.RunSignal.HUP, s.now))
    assert any(isinstance(e, c.QuietDisplay) for e in effects)
    assert s.state == "running"


def test_pause_resume_and_checkpoint_now_reach_a_live_worker_only():
    s = Script()
    s.start()
    assert not s.control("pause")["ok"]  # not welcomed yet
    s.hello()
    for op in ("pause", "resume", "checkpoint_now"):
        assert s.control(op)["ok"]
    assert [c.op for c in s.messages(m.Cmd)] == ["pause", "resume", "checkpoint_now"]
    s.beat(stage="paused")
    assert s.state == "paused"
    s.beat(stage="compute")
    assert s.state == "running"


def test_status_over_control_says_what_the_run_is_doing():
    s = Script()
    s.run_worker()
    s.beat(units_done=40)
    s.ckpt(1, units_done=30)
    status = s.control("status")["status"]
    assert status["state"] == "running" and status["units_done"] == 40
    assert status["progress"] == 0.4 and status["durable_ckpt_seq"] == 1
    assert status["dims_per_s"] == 100.0  # 10 units/s of 10 dims


# WAL failure -------------------------------------------------------------------------------
def test_a_failed_checkpoint_write_is_never_acked_and_the_run_exits_3():
    s = Script(fail_appends_after=3)  # the epoch record, the backend pin, one checkpoint
    s.run_worker()
    s.ckpt(1, units_done=10)
    s.ckpt(2, units_done=20)
    assert [a.ckpt_seq for a in s.messages(m.Ack)] == [1]
    (failed,) = s.events("wal.write_failed")
    assert "No space" in failed["error"]
    assert s.events("worker.killing")[0]["reason"] == "wal_failed"
    s.advance(1.2)
    s.tick()
    assert s.finish.code is ExitCode.GAVE_UP and s.finish.outcome == "wal_failed"
    assert "could not be written" in s.finish.reason
    assert len(s.history) == 1


def test_nothing_is_appended_after_a_failed_write():
    s = Script(fail_appends_after=1)
    s.run_worker()
    s.ckpt(1, units_done=10)
    n = len(s.records)
    s.advance(3.0)
    assert len(s.records) == n and not s.events("worker.restart_scheduled")


def test_the_restart_count_is_kept_in_the_wal_records():
    s = Script()
    s.run_worker()
    s.exit(-11)
    s.tick()
    (event,) = [r for r in s.records if isinstance(r, journal.Event)
                and r.kind is journal.EventKind.RESTART_SCHEDULED]
    assert event.fields["restarts"] == 1 and event.fields["exit_class"] == "crashed"
    s.advance(0.5)
    s.hello()
    assert s.of_type(journal.Epoch)[-1].restarts == 1
    assert s.messages(m.Welcome)[-1].settings["provenance"]["restarts"] == 1
    s.beat()
    s.ckpt(1, 5)
    assert s.of_type(journal.CheckpointMeta)[-1].restarts == 1


def test_a_resumed_run_continues_its_epochs_and_restart_count():
    s = Script(facts=c.RunFacts("r1", {"job": "x", "params": {}}, epoch=7,
                                durable=c.Durable(3, 30, 1.0), restarts=2))
    s.start()
    assert s.of_type(journal.Epoch)[0].epoch == 8
    assert s.of_type(journal.Epoch)[0].reason is journal.SpawnReason.RESUME
    assert s.ctl.status()["restarts"] == 2


# The backend a run computes on ------------------------------------------------------------
def test_the_first_worker_resolves_auto_and_the_run_is_pinned_to_it():
    s = Script()  # backend auto
    s.start()
    s.hello(backend="numpy")
    (event,) = [r for r in s.records if isinstance(r, journal.Event)
                and r.kind is journal.EventKind.BACKEND]
    assert event.fields == {"backend": "numpy", "was": None}
    assert s.pinned == ["numpy"] and s.events("run.backend_pinned")
    assert s.messages(m.Welcome)[0].settings["provenance"]["backends"] == ["numpy"]
    s.exit(-9)
    s.tick()
    s.advance(0.5)
    s.hello(backend="numpy")
    # The next worker is asked for what the run is pinned to, not for auto; pinned once.
    assert [e.backend for e in s.spawns] == ["auto", "numpy"]
    assert s.pinned == ["numpy"]


def test_a_pinned_run_that_cannot_get_its_backend_gives_up_saying_why():
    s = Script(facts=c.RunFacts("r1", {"job": "x", "params": {}}, backends=("cupy",),
                                backend="cupy"), max_restarts=1)
    for _ in range(2):
        s.start() if s.worker is None else None
        s.hello(backend="none")
        s.fail(kind="backend_unavailable")
        s.exit(exitcodes.BACKEND_UNAVAILABLE)
        s.tick()
        s.advance(0.5)
    assert s.finish.code is ExitCode.GAVE_UP
    assert "backend_unavailable" in s.finish.reason and "crash loop" in s.finish.reason
    assert {e.backend for e in s.spawns} == {"cupy"}
    assert not any(isinstance(r, journal.Event) and r.kind is journal.EventKind.BACKEND
                   for r in s.records)


def test_an_operators_switch_is_recorded_once_a_worker_computes_on_it():
    s = Script(facts=c.RunFacts("r1", {"job": "x", "params": {}}, backends=("cupy",),
                                backend="numpy"))
    s.start()
    assert s.spawns[0].backend == "numpy"
    s.hello(backend="numpy")
    (event,) = [r for r in s.records if isinstance(r, journal.Event)
                and r.kind is journal.EventKind.BACKEND]
    assert event.fields == {"backend": "numpy", "was": "cupy"}
    assert s.messages(m.Welcome)[0].settings["provenance"]["backends"] == ["cupy", "numpy"]
