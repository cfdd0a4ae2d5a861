"""The run controller against worker faults, scripted with a fake clock: hangs of each
kind, slow workers, crash loops, fatal errors, a worker that ignores SIGTERM, one that
survives SIGKILL or keeps its GPU context, and start-up failures. These were subprocess
tests waiting in real time; the shell's side of each is in test_supervisor_e2e.py."""

from __future__ import annotations

from nkat.protocol import exitcodes
from nkat.protocol import messages as m
from nkat.supervisor import journal
from nkat.supervisor.exitcode import ExitCode
from tests.controller_script import Script


def test_a_worker_is_spawned_welcomed_and_resumes_from_the_newest_checkpoint():
    s = Script()
    s.start()
    assert [r.reason.value for r in s.of_type(journal.Epoch)] == ["start"]
    assert s.state == "starting" and s.events("worker.spawned")[0]["pid"] == s.worker.pid
    s.hello()
    (welcome,) = s.messages(m.Welcome)
    assert welcome.resume is None and welcome.spec == s.facts.spec
    assert "backend" not in welcome.settings and welcome.settings["provenance"] == {
        "epochs": 1, "restarts": 0, "backends": ["numpy"]}
    assert s.state == "running"
    s.ckpt(1, units_done=10, state=b"one")
    assert [a.ckpt_seq for a in s.messages(m.Ack)] == [1]
    s.exit(-9)
    s.tick()
    s.advance(0.5)
    assert s.worker.epoch == 2
    s.hello()
    resume = s.messages(m.Welcome)[-1].resume
    assert resume == m.Resume(1, 10, b"one")
    assert s.of_type(journal.Epoch)[-1].resume_ckpt_seq == 1


def test_hang_with_gil_held_is_unresponsive_dumped_and_killed():
    s = Script(heartbeat_timeout=1.5, heartbeat_interval=0.25)
    s.run_worker()
    s.advance(1.4)
    assert not s.events("watchdog.unresponsive")
    s.advance(0.2)
    (verdict,) = s.events("watchdog.unresponsive")
    assert verdict["deadline_s"] == 1.5 and 0 <= verdict["overdue_s"] <= 0.2
    assert verdict["last_beats"][-1]["progress_seq"] == 1
    # No cmd stop for a worker that reads no commands: dump the stacks, then SIGTERM.
    assert not s.cmds("stop")
    assert s.history[0].signals == ["SIGUSR1"]
    s.advance(1.0)
    assert s.history[0].signals == ["SIGUSR1", "SIGTERM"]
    s.tick()  # the next turn reaps it
    assert s.kinds()[:3] == ["backend", "kill", "restart_scheduled"]
    (exited,) = s.events("worker.exited")
    assert exited["exit_class"] == "hung" and exited["action"] == "restart"
    s.advance(0.5)
    assert s.worker.epoch == 2 and s.state == "starting"


def test_hang_with_gil_released_is_stalled_while_beats_flow():
    s = Script(stall_timeout_min=1.5, stall_timeout_max=1.5, heartbeat_timeout=30)
    s.run_worker()
    s.advance(1.6, beats=True)  # beats keep coming, progress does not
    (verdict,) = s.events("watchdog.stalled")
    assert verdict["deadline_s"] == 1.5
    assert not s.events("watchdog.unresponsive")
    # A stalled worker still reads its socket: it is asked to stop first.
    assert len(s.cmds("stop")) == 1
    assert s.events("worker.exited")[0]["exit_class"] == "hung"


def test_a_stopped_process_ignores_sigterm_and_is_sigkilled():
    # SIGSTOP makes a worker silent and deaf to SIGTERM; only SIGKILL ends it.
    s = Script(heartbeat_timeout=1.5, heartbeat_interval=0.25, term_grace=0.5)
    s.run_worker()
    s.worker.ignores_term = True
    s.advance(1.6)
    assert s.events("watchdog.unresponsive")
    s.advance(2.0)
    assert s.history[0].signals == ["SIGUSR1", "SIGTERM", "SIGKILL"]
    assert s.events("worker.sigkill") and s.events("worker.exited")[0]["how"].endswith("9")


def test_slow_but_progressing_worker_is_never_killed():
    s = Script(stall_timeout_min=1.0, stall_timeout_max=600, stall_factor=10)
    s.run_worker()
    for _ in range(60):
        s.advance(0.9)
        s.beat(batch_seconds=0.9)  # each batch takes 0.9 s: slow, never stalled
    assert not s.events("watchdog.stalled") and not s.events("watchdog.unresponsive")
    assert s.state == "running" and len(s.history) == 1


def test_a_long_step_announced_with_extend_is_not_a_stall():
    s = Script(stall_timeout_min=1.0, stall_timeout_max=20.0)
    s.run_worker()
    s.beat(batch_seconds=0.05)
    s.send(m.Extend(epoch=1, seconds=10.0, reason="finalize"))
    s.advance(9.5, beats=True)
    assert not s.events("watchdog.stalled")
    assert s.events("watchdog.extended")[0]["seconds"] == 10.0
    s.advance(1.0, beats=True)
    assert s.events("watchdog.stalled")


def test_crash_loop_gives_up_with_exit_3_and_says_why():
    s = Script(max_restarts=2, restart_window=600)
    for _ in range(3):
        s.run_worker()
        s.exit(-11)
        s.tick()
        s.advance(0.5)
    assert s.finish is not None and s.finish.code is ExitCode.GAVE_UP
    assert "crash loop: 3 crashes" in s.finish.reason
    assert s.kinds()[-1] == "gave_up" and s.events("run.gave_up")
    assert len(s.history) == 3 and s.state == "gave_up"


def test_durable_progress_forgives_crashes():
    s = Script(max_restarts=1, restart_window=600)
    for seq in range(1, 5):
        s.run_worker()
        s.ckpt(seq, units_done=seq * 10)
        s.exit(-11)
        s.tick()
        s.advance(0.5)
    assert s.finish is None and len(s.history) == 5


def test_poison_checkpoint_gives_up_naming_it():
    s = Script(poison_after=2, max_restarts=100)
    s.run_worker()
    s.ckpt(1, units_done=10)
    for _ in range(3):
        s.exit(-11)
        s.tick()
        s.advance(0.5)
        if s.finish:
            break
        s.hello()
    assert s.finish.code is ExitCode.GAVE_UP and "poison checkpoint: ckpt_seq 1" in s.finish.reason


def test_fatal_job_error_is_not_restarted():
    s = Script()
    s.run_worker()
    s.fail(kind="job_error", fatal=True)
    s.exit(exitcodes.FATAL)
    s.tick()
    assert s.finish.code is ExitCode.GAVE_UP and "fatal job error" in s.finish.reason
    assert len(s.history) == 1 and s.events("worker.failed")[0]["fatal"] is True


def test_backoff_grows_then_resets_after_stable_progress():
    s = Script(restart_delay=0.2, restart_delay_max=10, max_restarts=100, stable_after=5)
    delays = []
    for _ in range(4):
        s.run_worker()
        s.exit(-11)
        s.tick()
        delays.append(s.events("worker.restart_scheduled")[-1]["delay_s"])
        s.advance(delays[-1] + 0.2)
    assert delays == sorted(delays) and delays[-1] > delays[0] * 2
    s.hello()
    s.ckpt(1, 10)
    s.advance(6.0, beats=True)
    s.exit(-11)
    s.tick()
    assert s.events("worker.restart_scheduled")[-1]["delay_s"] <= 0.2


def test_the_worker_is_not_restarted_before_the_backoff_delay():
    s = Script(restart_delay=1.0, restart_delay_max=1.0)
    s.run_worker()
    s.exit(-11)
    s.tick()
    assert s.state == "backoff"
    s.advance(0.9)
    assert len(s.history) == 1
    s.advance(0.2)
    assert len(s.history) == 2 and s.of_type(journal.Epoch)[-1].reason.value == "restart"


def test_startup_timeout_ends_a_worker_that_never_says_hello():
    s = Script(startup_timeout=2.0)
    s.start()
    s.advance(2.1)
    assert s.events("watchdog.startup_timeout") and s.history[0].signals == ["SIGUSR1"]
    s.advance(1.2)
    assert s.events("worker.exited")[0]["exit_class"] == "hung"


def test_a_spawn_failure_gives_up_and_names_the_error():
    s = Script()
    s.spawn_error = "[Errno 12] Cannot allocate memory"
    s.start()
    assert s.events("worker.spawn_failed")[0]["error"] == s.spawn_error
    assert s.finish.code is ExitCode.GAVE_UP and "cannot start the worker" in s.finish.reason


def test_an_unreadable_checkpoint_gives_up_and_points_at_salvage():
    s = Script()
    s.start()
    s.load_error = "blob 0000000000000007.blob: CRC mismatch"
    s.hello()
    assert s.events("wal.checkpoint_unreadable")
    assert s.finish.code is ExitCode.GAVE_UP and "--salvage" in s.finish.reason
    assert not s.messages(m.Welcome)


# Ending workers ----------------------------------------------------------------------------
def test_worker_ignoring_sigterm_is_sigkilled_after_the_grace():
    s = Script(stall_timeout_min=1.0, stall_timeout_max=1.0, stop_deadline=0.5,
               term_grace=0.7)
    s.run_worker()
    s.worker.obeys_stop = False
    s.worker.ignores_term = True
    s.advance(1.1, beats=True)
    assert s.events("watchdog.stalled") and s.state == "stopping"
    s.advance(0.5)
    assert s.history[0].signals == ["SIGUSR1"]
    s.advance(1.0)
    assert s.history[0].signals[:2] == ["SIGUSR1", "SIGTERM"]
    s.advance(0.8)
    assert s.history[0].signals == ["SIGUSR1", "SIGTERM", "SIGKILL"]
    assert s.events("worker.exited")[0]["exit_class"] == "hung"


def test_a_worker_that_survives_sigkill_ends_the_run_in_kill_failed():
    s = Script(heartbeat_timeout=1.0, heartbeat_interval=0.25, term_grace=0.3,
               kill_confirm=0.5)
    s.run_worker()
    s.worker.ignores_term = s.worker.survives_kill = True
    s.advance(5.0)
    (failed,) = s.events("worker.kill_failed")
    assert "not gone 0.5 s after SIGKILL: the process is still alive" in failed["reason"]
    assert s.finish.code is ExitCode.GAVE_UP and s.finish.outcome == "kill_failed"
    assert s.kinds()[-1] == "kill_failed" and len(s.history) == 1


def test_relaunch_waits_until_the_gpu_lets_go_of_the_killed_pid():
    s = Script(gpus=1, kill_confirm=5.0)
    s.run_worker()
    s.worker.gpu_holds = True
    s.exit(-9)
    s.advance(1.0)
    # The leader is gone but its context is not: SIGKILL the group, then wait.
    assert s.events("worker.killing")[0]["reason"] == "lingering"
    assert len(s.history) == 1 and s.state == "killing"
    s.history[0].gpu_holds = False
    s.advance(0.6)
    assert len(s.history) == 2


def test_a_gpu_that_never_lets_go_ends_in_kill_failed():
    s = Script(gpus=1, kill_confirm=0.5)
    s.run_worker()
    s.worker.gpu_holds = True
    s.exit(-11)
    s.advance(2.0)
    (failed,) = s.events("worker.kill_failed")
    assert "the GPU still lists pid" in failed["reason"]
    assert s.finish.outcome == "kill_failed" and len(s.history) == 1


def test_a_completed_run_whose_context_lingers_completes_with_a_warning():
    s = Script(gpus=1)
    s.run_worker()
    s.done()
    s.worker.gpu_holds = True
    s.exit(exitcodes.DONE)
    s.tick()
    assert s.events("worker.context_lingers")
    assert s.finish.code is ExitCode.COMPLETED


def test_a_lingering_process_group_is_killed_before_a_restart():
    s = Script()
    s.run_worker()
    s.worker.group_lingers = True
    s.exit(-11)
    s.tick()
    assert s.events("worker.killing")[0]["detail"].startswith("its process group")
    assert s.history[0].signals == ["SIGKILL"] and len(s.history) == 1
    s.history[0].group_lingers = False
    s.advance(0.6)
    assert len(s.history) == 2
