"""A killed worker's pid the GPU keeps listing: nothing is relaunched over its context.

After a kill, confirm the pid is gone and, with NVML, no longer holds the GPU
before relaunching; otherwise ``kill_failed``. The simulated GPU lists the supervisor's
workers as holding a context, and keeps a dead one listed for a while
(tests/profiles/context_lingers.toml) or for good. The first tests check that
simulation against real child processes; the last runs the real supervisor over a worker
that hangs, so that the watchdog kills it and the shell must wait for the GPU to let go.
What the run does with a pid the GPU never lets go (kill_failed) is scripted in
test_controller_faults.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psutil
import pytest

from nkat.supervisor.gpu.scripted import ProfileError, ScriptedSensor, parse_profile
from tests.e2e import reference
from tests.test_gpu_supervised import JOB, at, deterministic, last_checkpoint, supervise

#: The watchdog's budget for a worker that stops talking, and the kill sequence's for a
#: killed worker to be gone (kill_confirm, its default).
HEARTBEAT_TIMEOUT, KILL_CONFIRM = 1.0, 5.0
#: Epoch 1 makes a few checkpoints durable, then hangs with the GIL held: no more beats.
HANG = ";".join([*(f"stall@unit={k}:seconds=0.15:epoch=1" for k in range(8)),
                 "hang_gil@unit=8:epoch=1"])


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sensor_for(linger: str, clock: Clock) -> ScriptedSensor:
    text = f"[[device]]\npids = [7]\n[device.worker_contexts]\nlinger = {linger}\n"
    sensor = ScriptedSensor(parse_profile(text, source="test.toml"), clock=clock)
    sensor.open()
    return sensor


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def listed(sensor: ScriptedSensor) -> tuple[int, ...]:
    pids = sensor.processes(0)
    assert pids is not None
    return pids


# -- the simulation ----------------------------------------------------------------


def test_a_dead_workers_pid_stays_listed_for_the_linger(child) -> None:
    clock = Clock()
    sensor = sensor_for("2.0", clock)
    assert child.pid in listed(sensor) and 7 in listed(sensor)
    child.kill()
    child.wait()
    clock.now += 0.5  # the first listing that finds it gone starts the linger
    assert child.pid in listed(sensor)
    clock.now += 1.9
    assert child.pid in listed(sensor)
    clock.now += 0.1
    assert listed(sensor) == (7,)


def test_with_linger_inf_a_dead_workers_pid_is_listed_for_good(child) -> None:
    clock = Clock()
    sensor = sensor_for("inf", clock)
    assert child.pid in listed(sensor)
    child.kill()
    child.wait()
    for _ in range(3):
        clock.now += 1e6
        assert child.pid in listed(sensor)


def test_an_unreaped_worker_has_let_go_of_its_context(child) -> None:
    clock = Clock()
    sensor = sensor_for("0", clock)  # the default: listed exactly while it runs
    assert child.pid in listed(sensor)
    child.kill()
    deadline = time.monotonic() + 10
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert listed(sensor) == (7,)


def test_workers_are_listed_on_the_polling_cadence(child) -> None:
    clock = Clock()
    text = "[[device]]\n[device.worker_contexts]\n"  # no static pids, default linger
    sensor = ScriptedSensor(parse_profile(text), clock=clock, pids_every=2)
    sensor.open()
    pids = [sensor.read(0, clock.now).pids for _ in range(3)]
    assert pids[1] is None and pids[0] == pids[2] and child.pid in (pids[0] or ())
    assert "pids" not in sensor.read(0, clock.now).unsupported


@pytest.mark.parametrize(("body", "key"), [
    ("linger = -1", "device[0].worker_contexts.linger"),
    ("linger = 'forever'", "device[0].worker_contexts.linger"),
    ("lingers = 2", "device[0].worker_contexts.lingers"),
])
def test_bad_worker_contexts_name_the_key(body: str, key: str) -> None:
    with pytest.raises(ProfileError) as err:
        parse_profile(f"[[device]]\n[device.worker_contexts]\n{body}\n", source="t.toml")
    assert err.value.key == key


# -- the supervisor ----------------------------------------------------------------
@pytest.fixture(scope="module")
def undisturbed() -> str:
    """The deterministic blocks of one plain standalone run of the tests' job."""
    return deterministic(reference(JOB))


def seconds_between(a: dict[str, Any], b: dict[str, Any]) -> float:
    return (datetime.fromisoformat(b["ts"]) - datetime.fromisoformat(a["ts"])).total_seconds()


def test_relaunch_waits_until_the_gpu_no_longer_lists_the_killed_pid(tmp_path, undisturbed):
    run = supervise(tmp_path, "context_lingers.toml", f"heartbeat_timeout={HEARTBEAT_TIMEOUT}",
                    failpoints=HANG)
    assert run.rc == 0, run.err
    assert deterministic(run.result()) == undisturbed

    ev = run.log
    pid = ev[at(ev, "worker.spawned", epoch=1)]["pid"]
    hung = at(ev, "watchdog.unresponsive", epoch=1)
    sigterm = at(ev, "worker.sigterm", hung, epoch=1, pid=pid)
    # SIGTERM ended the process, but the GPU still lists it: straight to SIGKILL, then wait.
    held = at(ev, "worker.kill_escalated", sigterm, epoch=1, reason="lingering",
              detail=f"the GPU still lists pid {pid} as holding a context")
    at(ev, "worker.sigkill", held, epoch=1, pid=pid)
    exited = at(ev, "worker.exited", held, epoch=1, pid=pid, exit_class="hung",
                action="restart")
    waited = seconds_between(ev[held], ev[exited])
    assert 2.0 - 0.3 <= waited < KILL_CONFIRM, waited  # the profile's 2 s linger
    spawned = at(ev, "worker.spawned", exited, epoch=2, reason="restart")
    assert [e["epoch"] for e in run.events("worker.spawned")] == [1, 2]
    assert run.events("worker.kill_failed") == []

    # Epoch 2 went on from the last checkpoint epoch 1 made durable.
    resumed = at(ev, "worker.welcomed", spawned, epoch=2)
    assert ev[resumed]["resume_ckpt_seq"] == last_checkpoint(run, 1)["ckpt_seq"]
    assert len(run.event_records("restart_scheduled")) == 1
