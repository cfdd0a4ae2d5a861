"""GPU faults against real processes: `python -m nkat.supervisor start --sim-gpu PROFILE`
supervising a real worker, with the GPU played from a short test profile (tests/profiles).

Each test injects one GPU fault — a heat wave, an emergency spike, Xid 79, a memory
squeeze, a throttle band — and reads what the run left behind: the exit code, the WAL's
records, the JSON log's events, status.json and result.json. The NKAT job is fast, so
``stall`` failpoints (sleeps that release the GIL, one per unit) stretch each run over
the profile's events; they slow the worker, never change what it computes, so every
completed run must give the undisturbed run's deterministic blocks byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from nkat.supervisor.wal import RecordType
from nkat.supervisor.wal.readonly import read_records

PROFILES = Path(__file__).resolve().parent / "profiles"

UNIT_DIMS = 65536
UNITS = 24
JOB = (f"max_dimension={UNITS * UNIT_DIMS}", f"unit_dims={UNIT_DIMS}")
#: One unit per batch, so every unit boundary is a place to obey a command and every
#: stall failpoint fires in its own batch; readings, samples and dwell shrunk to fit the
#: few seconds of a test profile.
QUICK = ("batch_size=1", "batch_size_adaptive=false", "checkpoint_interval=0.3",
         "heartbeat_interval=0.2", "gpu_poll_interval=0.2", "thermal_samples=2",
         "thermal_dwell=1", "restart_delay=0.1")
#: The thermal limits the profiles are written against (the config defaults).
THROTTLE_TEMP, MAX_TEMP = 80.0, 83.0


def stalls(seconds: float, units: int = UNITS) -> str:
    """NKAT_FAILPOINTS making every unit last at least ``seconds`` (in every epoch)."""
    return ";".join(f"stall@unit={k}:seconds={seconds}" for k in range(units))


def deterministic(result: dict[str, Any]) -> str:
    """The blocks of a result that must not depend on interruptions or timing."""
    return json.dumps({k: v for k, v in result.items()
                       if k not in ("performance", "provenance")}, sort_keys=True)


@dataclass
class Run:
    """What one `start` left: its exit code and output, the run directory, and its JSON
    log and WAL as they were when it exited (a later `start` appends to both)."""

    path: Path
    rc: int
    out: str
    err: str
    log: list[dict[str, Any]] = field(repr=False)
    records: list[Any] = field(repr=False)

    def events(self, name: str | None = None, **where: Any) -> list[dict[str, Any]]:
        return [e for e in self.log if (name is None or e["event"] == name)
                and all(e.get(k) == v for k, v in where.items())]

    def event_records(self, kind: str) -> list[dict[str, Any]]:
        return [r.payload for r in self.records
                if r.type is RecordType.EVENT and r.payload["kind"] == kind]

    def result(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path / "results" / "result.json").read_text())
        return data

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path / "status.json").read_text())
        return data


def supervise(tmp: Path, profile: str, *settings: str, failpoints: str | None = None,
              job: tuple[str, ...] = JOB, quiet: bool = True, timeout: float = 60) -> Run:
    """Run `start` to its end on run ``r`` under ``tmp`` (a later call resumes it).
    ``profile``: a file in tests/profiles, or the name of a shipped profile."""
    sim = str(PROFILES / profile) if profile.endswith(".toml") else profile
    argv = [sys.executable, "-m", "nkat.supervisor", "start", "--state-dir", str(tmp),
            "--run-id", "r", "--backend", "numpy", "--sim-gpu", sim]
    if quiet:
        argv.append("--quiet")
    for setting in (*job, *QUICK, *settings):
        argv += ["--set", setting]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NKAT_")}
    if failpoints:
        env["NKAT_FAILPOINTS"] = failpoints
    # On a timeout the supervisor is SIGKILLed; its worker dies with it (PR_SET_PDEATHSIG).
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    path = tmp / "runs" / "r"
    log = [json.loads(line) for line in (path / "logs" / "supervisor.jsonl").read_text()
           .splitlines()]
    return Run(path, proc.returncode, proc.stdout, proc.stderr, log,
               list(read_records(path / "wal")))


def at(events: list[dict[str, Any]], name: str, after: int = -1, **where: Any) -> int:
    """Index of the first event ``name`` (with fields ``where``) after index ``after``."""
    for i in range(after + 1, len(events)):
        e = events[i]
        if e["event"] == name and all(e.get(k) == v for k, v in where.items()):
            return i
    raise AssertionError(f"no {name} {where} after event {after}: "
                         f"{[e['event'] for e in events[after + 1:]]}")


def last_checkpoint(run: Run, epoch: int) -> dict[str, Any]:
    ckpts = [r.payload for r in run.records
             if r.type in (RecordType.CKPT, RecordType.CKPT_REF) and r.payload["epoch"] == epoch]
    assert ckpts, f"epoch {epoch} made no checkpoint durable"
    return ckpts[-1]


@pytest.fixture(scope="module")
def undisturbed() -> str:
    """The deterministic blocks of one plain standalone run of the tests' job."""
    argv = [sys.executable, "-m", "nkat.worker", "--standalone", "--backend", "numpy"]
    for param in JOB:
        argv += ["--set", param]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60)
    return deterministic(json.loads(out.stdout))


def test_heat_wave_throttles_stops_cools_and_resumes_to_the_same_result(tmp_path, undisturbed):
    run = supervise(tmp_path, "heat_wave_short.toml", failpoints=stalls(0.3))
    assert run.rc == 0, run.err
    assert deterministic(run.result()) == undisturbed

    ev = run.log
    throttle = at(ev, "thermal.throttle")
    assert THROTTLE_TEMP <= ev[throttle]["temperature"] < MAX_TEMP
    duty = ev[throttle]["duty"]
    assert 0 < duty < 1
    at(ev, "cmd.throttle", throttle, component="worker", epoch=1, duty=duty)
    stop = at(ev, "thermal.stop", throttle)
    assert ev[stop]["temperature"] >= MAX_TEMP
    stopped = at(ev, "worker.stopped", stop, epoch=1, final_ckpt_acked=True)
    exited = at(ev, "worker.exited", stopped, epoch=1, exit_class="thermal")
    at(ev, "thermal.cooling", exited)
    resume = at(ev, "thermal.resume", exited)
    at(ev, "worker.spawned", resume, epoch=2, reason="thermal_resume")

    # The worker stopped with everything it had computed durable, and epoch 2 went on
    # from exactly there.
    final = last_checkpoint(run, 1)
    assert final["units_done"] == ev[stopped]["units_done"]
    epochs = [r.payload for r in run.records if r.type is RecordType.EPOCH]
    assert [(e["epoch"], e["reason"]) for e in epochs] == [(1, "start"), (2, "thermal_resume")]
    assert epochs[1]["resume_ckpt_seq"] == final["ckpt_seq"]

    # A thermal stop is a durable event, not a crash.
    assert len(run.event_records("thermal_stop")) == 1
    assert run.event_records("restart") == [] and run.event_records("gave_up") == []
    assert run.status()["restarts"] == 0


def test_emergency_spike_kills_at_once_and_resumes_from_the_last_durable_checkpoint(
        tmp_path, undisturbed):
    run = supervise(tmp_path, "emergency_short.toml", failpoints=stalls(0.25))
    assert run.rc == 0, run.err
    assert deterministic(run.result()) == undisturbed

    ev = run.log
    kill = at(ev, "thermal.kill_now")
    at(ev, "worker.killing", kill, epoch=1, reason="thermal_emergency")
    at(ev, "worker.sigkill", kill, epoch=1)
    exited = at(ev, "worker.exited", kill, epoch=1, exit_class="thermal")
    assert ev[exited]["how"] == "killed by SIGKILL"
    # At once: no cmd stop, no stack dump, no SIGTERM grace, so no final checkpoint.
    for name in ("cmd.stop", "worker.stopping", "worker.dump_requested", "worker.sigterm"):
        assert run.events(name, epoch=1) == [], name
    resume = at(ev, "thermal.resume", exited)
    at(ev, "worker.spawned", resume, epoch=2, reason="thermal_resume")

    records = run.records
    second = next(i for i, r in enumerate(records)
                  if r.type is RecordType.EPOCH and r.payload["epoch"] == 2)
    durable = [r.payload["ckpt_seq"] for r in records[:second]
               if r.type in (RecordType.CKPT, RecordType.CKPT_REF)]
    assert durable, "the spike came before any checkpoint: stretch the stalls"
    assert records[second].payload["resume_ckpt_seq"] == durable[-1]
    assert len(run.event_records("thermal_kill")) == 1
    assert run.event_records("restart") == []
    assert run.status()["restarts"] == 0


@pytest.fixture(scope="module")
def xid79(tmp_path_factory) -> tuple[Run, Run]:
    """A run that met Xid 79 (with its console output: not --quiet), then the same run
    started again on a calm GPU, without the stalls."""
    tmp = tmp_path_factory.mktemp("xid79")
    lost = supervise(tmp, "xid79_short.toml", failpoints=stalls(0.25), quiet=False)
    return lost, supervise(tmp, "calm")


def test_xid79_gives_up_with_gpu_reset_advice_and_the_run_resumes(xid79, undisturbed):
    lost, again = xid79
    assert lost.rc == 3, lost.err
    events = lost.log
    xid = at(events, "gpu.xid", xid=79)
    assert "reset" in events[xid]["message"] and "reboot" in events[xid]["message"]
    at(events, "worker.killing", xid, epoch=1, reason="gpu_reset")
    exited = at(events, "worker.exited", xid, epoch=1, exit_class="gpu_reset",
                action="give_up")
    gave_up = at(events, "run.gave_up", exited)
    assert "GPU needs a reset" in events[gave_up]["reason"]
    assert "reboot" in events[gave_up]["reason"]
    kinds = [r.payload["kind"] for r in lost.records
             if r.type is RecordType.EVENT]
    assert "gpu_reset" in kinds and kinds[-1] == "gave_up"
    assert "restart" not in kinds
    assert [e["epoch"] for e in events if e["event"] == "worker.spawned"] == [1]

    assert again.rc == 0, again.err
    assert deterministic(again.result()) == undisturbed
    resumed = again.events("worker.welcomed", epoch=2)
    assert resumed and resumed[0]["resume_ckpt_seq"] is not None


def test_xid79_tells_the_operator_the_gpu_needs_a_reset(xid79):
    lost, _ = xid79
    assert lost.rc == 3
    assert "needs a reset" in lost.out + lost.err


def test_xid79_no_checkpoint_after_the_xid_is_made_durable(xid79):
    lost, _ = xid79
    records = lost.records
    xid = next(i for i, r in enumerate(records)
               if r.type is RecordType.EVENT and r.payload["kind"] == "gpu_reset")
    late = [r.payload["ckpt_seq"] for r in records[xid:]
            if r.type in (RecordType.CKPT, RecordType.CKPT_REF)]
    assert late == []


def test_memory_squeeze_tells_the_worker_to_free_memory(tmp_path, undisturbed):
    # Batches of 4 so that the worker's answer, halving its batch, has room to act.
    run = supervise(tmp_path, "memory_squeeze_short.toml", "batch_size=4",
                    failpoints=stalls(0.2))
    assert run.rc == 0, run.err
    ev = run.log
    high = at(ev, "gpu.memory_high")
    assert ev[high]["used_fraction"] >= 0.95
    at(ev, "cmd.free_memory", high, component="worker", epoch=1)
    # Freeing memory is not a restart, and changes nothing the job computes.
    assert [e["epoch"] for e in run.events("worker.spawned")] == [1]
    assert deterministic(run.result()) == undisturbed


def rate(events: list[dict[str, Any]]) -> float:
    """Units per second between the first and the last checkpoint among ``events``."""
    ckpts = [e for e in events if e["event"] == "checkpoint.durable"]
    assert len(ckpts) >= 3, f"too few checkpoints to measure a rate: {ckpts}"
    first, last = ckpts[0], ckpts[-1]
    seconds = (datetime.fromisoformat(last["ts"]) - datetime.fromisoformat(first["ts"]))
    return (last["units_done"] - first["units_done"]) / seconds.total_seconds()


def test_throttle_band_slows_the_worker_to_its_duty(tmp_path):
    # 82 °C from 2.5 s asks for duty 0.5; 40 units of 0.1 s keep the worker busy past it.
    run = supervise(tmp_path, "throttle_half.toml",
                    job=(f"max_dimension={40 * UNIT_DIMS}", f"unit_dims={UNIT_DIMS}"),
                    failpoints=stalls(0.1, units=40))
    assert run.rc == 0, run.err
    ev = run.log
    throttle = at(ev, "thermal.throttle")
    assert ev[throttle]["duty"] == 0.5
    obeyed = at(ev, "cmd.throttle", throttle, component="worker", duty=0.5)
    done = at(ev, "run.completed", obeyed)
    full, throttled = rate(ev[:throttle]), rate(ev[obeyed + 1:done])
    # The duty cycle sleeps (1 - duty) / duty of each batch's compute time: half speed.
    assert 0.35 < throttled / full < 0.7, (full, throttled)


def test_worker_starting_on_a_hot_gpu_runs_throttled(tmp_path):
    # The worker says hello only after 1 s, long after the ladder's two hot readings.
    run = supervise(tmp_path, "hot_from_start.toml",
                    job=(f"max_dimension={8 * UNIT_DIMS}", f"unit_dims={UNIT_DIMS}"),
                    failpoints="stall@start:seconds=1;" + stalls(0.1, units=8))
    assert run.rc == 0, run.err
    assert run.events("thermal.throttle")[0]["duty"] == 0.5
    assert run.events("cmd.throttle", component="worker", epoch=1, duty=0.5)
