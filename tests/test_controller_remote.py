"""What the controller tells people far away (notifications) and what it does on a cloud's
preemption notice, scripted with a fake clock. Delivery itself, against real local
receivers, is in test_notify_delivery.py; the metadata pollers in test_preemption_watch.py."""

from __future__ import annotations

from nkat.protocol import exitcodes
from nkat.protocol import messages as m
from nkat.supervisor import controller as c
from nkat.supervisor import journal
from nkat.supervisor.exitcode import ExitCode
from nkat.supervisor.notify import KINDS
from tests.controller_script import Script


def kinds(s: Script) -> list[str]:
    return [n.kind for n in s.notified]


def test_every_notification_kind_is_one_the_notifier_knows():
    s = Script(gpus=1, max_restarts=1, thermal_samples=1)
    s.run_worker()
    s.done()
    s.exit(exitcodes.DONE)
    s.tick()
    assert kinds(s) == ["run.completed"]
    assert s.notified[0].fields["restarts"] == 0 and set(kinds(s)) <= set(KINDS)


def test_a_crash_loop_is_told_while_the_run_still_runs_then_the_give_up():
    s = Script(max_restarts=3)
    for _ in range(4):
        s.run_worker()
        s.exit(-11)
        s.tick()
        s.advance(0.5)
    assert kinds(s) == ["worker.crash_loop", "run.gave_up"]
    loop = s.notified[0].fields
    assert loop["crashes"] == 2 and loop["exit_class"] == "crashed"
    assert "crash loop" in s.notified[1].fields["reason"]


def test_durable_progress_rearms_the_crash_loop_alarm():
    s = Script(max_restarts=100, poison_after=100)
    s.run_worker()

    def crash(progress: int | None = None) -> None:
        if progress is not None:
            s.ckpt(progress, progress * 10)
        s.exit(-11)
        s.tick()
        s.advance(0.5)  # the backoff; the next worker is spawned
        s.hello()
        s.beat()

    crash(progress=1)
    crash(progress=2)  # each crash follows durable progress: no alarm
    assert kinds(s) == []
    crash()
    crash()  # two crashes in a row without progress
    assert kinds(s) == ["worker.crash_loop"]
    crash()  # told once
    assert kinds(s) == ["worker.crash_loop"]
    crash(progress=3)
    crash()  # progress re-armed it: two more in a row alarm again
    assert kinds(s) == ["worker.crash_loop", "worker.crash_loop"]


def test_kill_failed_thermal_emergency_and_wal_failure_are_told():
    s = Script(gpus=1, kill_confirm=0.5)
    s.run_worker()
    s.worker.survives_kill = True
    s.reading(95.0)
    assert "thermal.kill_now" in kinds(s)
    s.advance(1.0)
    assert "worker.kill_failed" in kinds(s)
    w = Script(fail_appends_after=1)
    w.run_worker()
    w.ckpt(1, 10)
    assert kinds(w) == ["wal.write_failed"]
    assert "No space" in w.notified[0].fields["error"]


def test_a_preemption_notice_checkpoints_stops_and_leaves_the_run_for_the_next_boot():
    s = Script()
    s.run_worker()
    s.ckpt(1, 10)
    deadline = s.wall + 30.0
    s.feed(c.PreemptionNoticed("aws", deadline, "terminate at 12:00:30", s.now, s.wall))
    (event,) = [r for r in s.records if isinstance(r, journal.Event)
                and r.kind is journal.EventKind.PREEMPTED]
    assert event.fields["cloud"] == "aws"
    (stop,) = s.cmds("stop")
    assert stop.args["deadline_s"] == 10.0  # within the notice's 30 s, with a margin
    (killing,) = s.events("worker.killing")  # a requested stop, saying who asked
    assert killing["detail"] == "preemption notice from aws"
    assert s.levels("worker.killing") == ["info"]
    s.ckpt(2, 20)  # the final checkpoint
    assert [a.ckpt_seq for a in s.messages(m.Ack)] == [1, 2]
    s.tick()
    (rec,) = s.of_type(journal.Stop)
    assert rec.desired is journal.Desired.RUNNING and rec.ckpt_seq == 2
    assert s.finish.code is ExitCode.STOPPED
    assert s.events("run.preempted")[0]["seconds_left"] == 30.0


def test_a_short_notice_shortens_the_final_checkpoints_deadline():
    s = Script()
    s.run_worker()
    s.feed(c.PreemptionNoticed("gcp", s.wall + 6.0, "preempted", s.now, s.wall))
    assert s.cmds("stop")[0].args["deadline_s"] == 3.0
    s.feed(c.PreemptionNoticed("gcp", s.wall + 6.0, "preempted", s.now, s.wall))  # said once
    assert len(s.cmds("stop")) == 1
