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
from pathlib import Path
from typing import Any

import pytest

from nkat.supervisor import journal
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

    def event_records(self, kind: str) -> list[journal.Event]:
        return [e for e in map(journal.read, self.records)
                if isinstance(e, journal.Event) and e.kind.value == kind]

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
    assert run.event_records("restart_scheduled") == [] and run.event_records("gave_up") == []
    assert run.status()["restarts"] == 0
