"""The run controller against GPU readings, scripted with a fake clock: the thermal ladder
(throttle, stop, cool down, resume; emergency kill), Xid events, a lost GPU, memory,
power and worker-RSS watches. The ladder's own rules are in test_policy_thermal.py; this
is what the run does with its answers."""

from __future__ import annotations

from nkat.protocol import messages as m
from nkat.supervisor import journal
from nkat.supervisor.exitcode import ExitCode
from nkat.supervisor.gpu.sensor import XidEvent
from nkat.supervisor.policies.resources import ResourceSettings
from tests.controller_script import Script

QUICK = {"thermal_samples": 2, "thermal_dwell": 1.0}
GIB = 1 << 30
LEAK_WARMUP = ResourceSettings().leak_warmup


def hot(s: Script, temperature: float, readings: int, every: float = 0.2,
        turns: bool = True) -> None:
    """``readings`` readings ``every`` seconds apart; with ``turns``, loop turns between
    them (a worker told to stop exits on the next turn)."""
    for _ in range(readings):
        s.reading(temperature)
        if turns:
            s.advance(every)
        else:
            s.now += every


def test_heat_throttles_then_stops_cools_and_resumes_at_the_last_checkpoint():
    s = Script(gpus=1, **QUICK)
    s.run_worker()
    s.ckpt(1, units_done=10)
    hot(s, 81.0, 2)
    (throttle,) = s.cmds("throttle")
    assert 0.25 <= throttle.args["duty"] < 1.0 and s.events("thermal.throttle")
    hot(s, 83.5, 2, turns=False)
    assert s.events("thermal.stop") and "thermal_stop" in s.kinds()
    assert s.cmds("stop")  # checkpoint first: a thermal stop is graceful
    s.ckpt(2, units_done=20)
    s.tick()
    assert s.state == "cooling" and s.events("thermal.cooling")
    assert s.events("worker.exited")[0]["exit_class"] == "thermal"
    hot(s, 80.0, 5)  # not cool enough: no new worker
    assert len(s.history) == 1
    hot(s, 70.0, 10)
    assert len(s.history) == 2 and s.events("worker.respawn_after_cooling")
    assert s.of_type(journal.Epoch)[-1].reason is journal.SpawnReason.THERMAL_RESUME
    s.hello()
    assert s.messages(m.Welcome)[-1].resume.ckpt_seq == 2
    assert not s.events("worker.restart_scheduled")  # a thermal stop is not a crash


def test_an_emergency_temperature_kills_at_once():
    s = Script(gpus=1, **QUICK)
    s.run_worker()
    s.reading(90.0)
    assert s.events("thermal.kill_now") and "thermal_kill" in s.kinds()
    assert s.history[0].signals == ["SIGKILL"] and not s.cmds("stop")
    s.tick()
    assert s.state == "cooling"


def test_a_worker_starting_on_a_hot_gpu_runs_at_the_ladders_duty():
    s = Script(gpus=1, **QUICK)
    s.start()
    hot(s, 81.5, 2)
    s.hello()
    throttles = s.cmds("throttle")
    assert throttles and throttles[-1].args["duty"] < 1.0
    assert s.sent.index(("w0", s.messages(m.Welcome)[0])) < s.sent.index(("w0", throttles[-1]))


def test_too_hot_to_restart_waits_in_cooling():
    s = Script(gpus=1, restart_delay=0.5, restart_delay_max=0.5, **QUICK)
    s.run_worker()
    s.exit(-11)
    s.tick()
    assert s.state == "backoff"
    hot(s, 84.0, 3)
    assert s.state == "cooling" and len(s.history) == 1
    hot(s, 70.0, 10)
    assert len(s.history) == 2


def test_xid79_kills_refuses_later_checkpoints_and_gives_up_with_reset_advice():
    s = Script(gpus=1)
    s.run_worker()
    s.ckpt(1, units_done=10)
    s.reading(60.0, events=(XidEvent(s.now, 0, 79),))
    assert s.events("gpu.xid")[0]["xid"] == 79 and "gpu_reset" in s.kinds()
    s.ckpt(2, units_done=20)  # after an Xid the device memory is suspect
    assert s.events("checkpoint.refused") and len(s.of_type(journal.CheckpointMeta)) == 1
    s.advance(1.2)
    s.tick()
    assert s.finish.code is ExitCode.GAVE_UP and "reset" in s.finish.reason
    assert len(s.history) == 1


def test_an_xid_that_needs_a_new_worker_restarts_it():
    s = Script(gpus=1)
    s.run_worker()
    s.reading(60.0, events=(XidEvent(s.now, 0, 13),))
    assert "xid_restart" in s.kinds()
    s.advance(2.0)
    assert s.events("worker.exited")[0]["exit_class"] == "crashed"
    assert len(s.history) == 2


def test_a_lost_gpu_is_said_once_and_gives_up():
    s = Script(gpus=1)
    s.run_worker()
    s.reading(None, lost=True)
    s.reading(None, lost=True)
    assert len(s.events("gpu.lost")) == 1
    s.advance(1.2)
    s.tick()
    assert s.finish.code is ExitCode.GAVE_UP


def test_high_gpu_memory_tells_the_worker_to_free_memory():
    s = Script(gpus=1, memory_high_water=0.9)
    s.run_worker()
    s.reading(60.0, memory_used=int(7.8 * GIB), memory_total=8 * GIB)
    assert s.cmds("free_memory") and s.events("gpu.memory_high")


def test_power_near_the_limit_is_a_warning_only():
    s = Script(gpus=1, power_limit=300.0)
    s.run_worker()
    s.reading(60.0, power_w=295.0)
    assert s.events("gpu.power_high") and s.state == "running"


def test_worker_rss_growing_too_fast_is_a_planned_restart_without_backoff():
    s = Script(gpus=1, leak_rss_growth_mb=100, leak_window=60.0)
    s.run_worker()
    pid = s.worker.pid
    for k in range(int(LEAK_WARMUP) + 8):
        # Growth during the warm-up (imports, pools) is ignored; after it, it counts.
        grown = max(0, k - int(LEAK_WARMUP)) * 30
        s.reading(60.0, rss={pid: (200 + 5 * min(k, 10) + grown) << 20})
        s.advance(1.0)
        s.beat()
        if k == int(LEAK_WARMUP):
            assert not s.events("worker.leak_suspected")
    assert s.events("worker.leak_suspected") and "leak" in s.kinds()
    assert s.cmds("stop")
    s.tick()
    assert s.events("worker.exited")[0]["exit_class"] == "planned"
    s.tick()
    assert len(s.history) == 2


def test_gpu_readings_are_logged_at_their_own_interval():
    s = Script(gpus=1, gpu_log_interval=1.0)
    s.run_worker()
    for _ in range(25):
        s.reading(55.0)
        s.advance(0.2)
    assert 4 <= len(s.events("gpu.reading")) <= 6
    assert s.ctl.status()["gpu"]["temperature"] == 55.0
