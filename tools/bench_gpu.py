"""GPU sensor benchmark (`python tools/bench.py gpu`): what one sensor poll costs.

sensor_poll_ms_p50/p99: NvmlSensor.read of one GPU on the fake pynvml from tests/, so the
sensor's own overhead (gate, conversions, bookkeeping) without driver time.
sensor_poll_ms_p99_real: the same on the real GPU 0 when a driver is present, else null.
nvml_calls_per_poll: NVML calls per read (the process list is asked every 5th poll).
scripted_poll_ms_p99: ScriptedSensor.read of the heat_wave profile.

The thermal figures come from one real supervised run (`python -m nkat.supervisor start
--sim-gpu`, the NKAT job on NumPy) under a profile written for the bench (PROFILE below):
70 °C, then from COOL_UNTIL the throttle band at 82 °C (the ladder's duty there is 0.5),
then from HOT_FROM 84 °C, past max_temperature, for good. The policy keys that set the
reaction keep their defaults (thermal_samples 3, gpu_poll_interval 1 s, stop_deadline).
Batches are fixed at BATCH units, and each batch is paced by a `stall` failpoint of
STALL_S (a sleep that releases the GIL) standing in for a GPU kernel's wall time, as
the worker's tests do: the duty cycle sleeps in proportion to each batch's measured time,
and on a shared CPU NumPy's own speed drifts by tens of percent from one second to the
next, which would measure the neighbours rather than the throttle. Once the worker has
stopped for the heat the bench sends the supervisor SIGTERM (it is cooling down, so it
records an operator stop and exits), then reads the run's JSON log:

thermal_reaction_s: from the first reading at or above max_temperature to the worker
    stopped with a durable checkpoint. The first such reading is the one the ladder logs
    as a thermal.* event with its temperature (while throttled at duty 0.5 the first 84 °C
    reading lowers the duty to duty_floor, a logged thermal.throttle); the end is the
    worker.exited that follows thermal.stop. thermal_stop_durable says whether the worker
    acknowledged its final checkpoint (worker.stopped final_ckpt_acked, its units_done that
    of the last checkpoint.durable before the exit). The span covers the readings the
    ladder waits for (thermal_samples - 1 poll intervals), the batch the worker finishes,
    the final checkpoint's fdatasync and ack, and the exit. Goal: <= 5 s.
thermal_reaction_from_crossing_s: the same span, started where the profile crosses
    max_temperature (gpu.opened, logged as the scripted sensor opens, plus HOT_FROM):
    the above plus the wait for the next poll (< gpu_poll_interval).
throttle_duty_error: |dims/s throttled / dims/s unthrottled - requested duty| at duty 0.5.
    Both rates are from checkpoint.durable events (units_done over log time) of the same
    worker: unthrottled from its second checkpoint to the first thermal.throttle,
    throttled from the worker's cmd.throttle log (duty 0.5) to the ladder's next thermal
    event. Goal: <= 0.1. throttle_dims_per_s_ratio is the measured ratio.
throttle_duty_error_compute: the same from a second run under the same profile whose
    batches are real NKAT compute (COMPUTE_BATCH units, no stall): what the duty does to
    real dims/s, with the host's own speed drift in it (_ratio_compute: the ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from benchlib import percentile  # run as a script: tools/ is on the path

from nkat.supervisor.gpu.nvml import NvmlSensor
from nkat.supervisor.gpu.scripted import ScriptedSensor
from nkat.supervisor.gpu.sensor import GpuUnavailable

#: Profile seconds: cool until COOL_UNTIL, throttle band (duty 0.5) until HOT_FROM.
COOL_UNTIL = 4.0
HOT_FROM = 13.0
DUTY = 0.5
UNIT_DIMS = 1 << 16
BATCH = 8
STALL_S = 0.05
#: Batches paced by a stall: more than the run gets through before it stops.
PACED_BATCHES = 1000
PROFILE = f"""\
description = "bench: 70 C, 82 C from {COOL_UNTIL:g} s, 84 C from {HOT_FROM:g} s on (steps)"

[[device]]
name = "Simulated GPU (thermal bench)"
memory_total_mib = 24576
pids = []

[device.thresholds]
shutdown = 96
slowdown = 93
gpu_max = 90

[device.trace]
temperature = {{ step = true, points = [[0, 70], [{COOL_UNTIL}, 82], [{HOT_FROM}, 84]] }}
memory_used_pct = [[0, 50]]
"""
#: Settings of the bench run. Checkpoints every 0.25 s sample the rate; the run never
#: completes (the bench stops it) and never resumes (the dwell outlasts it).
SETTINGS = ("max_dimension=10000000000000", f"unit_dims={UNIT_DIMS}",
            "batch_size_adaptive=false", "checkpoint_interval=0.25", "thermal_dwell=3600")
#: Units per batch of the unpaced run: about 15 ms of NumPy compute on this machine.
COMPUTE_BATCH = 32
RUN_TIMEOUT_S = 120.0


def _poll_ms(read: Callable[[float], object], polls: int) -> list[float]:
    for n in range(min(100, polls)):  # warm caches and the pids cadence
        read(float(n))
    times = []
    for n in range(polls):
        start = time.perf_counter_ns()
        read(float(n))
        times.append((time.perf_counter_ns() - start) / 1e6)
    return sorted(times)




def _pct_ms(sorted_ms: list[float], q: float) -> float:
    return round(percentile(sorted_ms, q) or 0.0, 4)


def run(args: argparse.Namespace) -> dict[str, object]:
    from nkat.supervisor.testing.fake_nvml import FakePynvml

    polls = 2_000 if getattr(args, "quick", False) else 20_000
    fake = FakePynvml()
    sensor = NvmlSensor(nvml=fake, xid_events=False)
    sensor.open()
    opened_calls = sum(fake.calls.values())
    mocked = _poll_ms(lambda now: sensor.read(0, now), polls)
    calls_per_poll = (sum(fake.calls.values()) - opened_calls) / (polls + min(100, polls))
    sensor.close()

    scripted = ScriptedSensor.from_profile("heat_wave")
    scripted.open()
    scripted_ms = _poll_ms(lambda now: scripted.read(0, time.monotonic()), polls)

    real_p99 = None
    real_sensor = NvmlSensor(xid_events=False)
    try:
        real_sensor.open()
    except GpuUnavailable:
        pass
    else:
        try:
            real_p99 = _pct_ms(_poll_ms(lambda now: real_sensor.read(0, now), polls // 20), 0.99)
        finally:
            real_sensor.close()

    return {
        **_thermal_figures(),
        "sensor_poll_ms_p50": _pct_ms(mocked, 0.50),
        "sensor_poll_ms_p99": _pct_ms(mocked, 0.99),
        "sensor_poll_ms_p99_real": real_p99,
        "nvml_calls_per_poll": round(calls_per_poll, 2),
        "scripted_poll_ms_p99": _pct_ms(scripted_ms, 0.99),
        "sensor_polls": polls,
    }


# -- thermal reaction and throttle duty, from one supervised run ------------------------


def _thermal_figures() -> dict[str, Any]:
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="nkat-bench-gpu-") as tmp:
        profile = Path(tmp) / "thermal_bench.toml"
        profile.write_text(PROFILE)
        paced = _supervised_run(Path(tmp) / "paced", profile, paced=True)
        computed = _supervised_run(Path(tmp) / "computed", profile, paced=False)
    try:
        figures.update(_reaction(paced))
        figures.update(_duty(paced))
    except LookupError as exc:
        figures.update({"thermal_reaction_s": None, "throttle_duty_error": None,
                        "thermal_bench_error": str(exc)})
    try:
        duty = _duty(computed)
        figures.update({"throttle_duty_error_compute": duty["throttle_duty_error"],
                        "throttle_dims_per_s_ratio_compute": duty["throttle_dims_per_s_ratio"]})
    except LookupError as exc:
        figures.update({"throttle_duty_error_compute": None,
                        "thermal_bench_compute_error": str(exc)})
    return figures


def _supervised_run(state: Path, profile: Path, *, paced: bool) -> list[dict[str, Any]]:
    """The JSON log of a run that ran until its worker stopped for the heat: batches of
    BATCH units paced by stalls, or (not paced) real NKAT batches of COMPUTE_BATCH."""
    argv = [sys.executable, "-m", "nkat.supervisor", "start", "--state-dir", str(state),
            "--run-id", "bench", "--quiet", "--backend", "numpy", "--sim-gpu", str(profile)]
    for setting in SETTINGS:
        argv += ["--set", setting]
    argv += ["--set", f"batch_size={BATCH if paced else COMPUTE_BATCH}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NKAT_")}
    if paced:
        env["NKAT_FAILPOINTS"] = ";".join(f"stall@unit={k * BATCH}:seconds={STALL_S}"
                                          for k in range(PACED_BATCHES))
    log = state / "runs" / "bench" / "logs" / "supervisor.jsonl"
    sup = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline and sup.poll() is None:
            if _stopped_for_heat(_read_log(log)):
                break
            time.sleep(0.2)
        if sup.poll() is None:
            sup.send_signal(signal.SIGTERM)  # cooling down: it records a stop and exits
            sup.wait(timeout=30)
    finally:
        if sup.poll() is None:
            sup.kill()  # its worker goes with it (PR_SET_PDEATHSIG)
            sup.wait()
    return _read_log(log)


def _read_log(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # a line still being written
    return events


def _stopped_for_heat(events: list[dict[str, Any]]) -> bool:
    try:
        _find(events, "worker.exited", _find(events, "thermal.stop"))
    except LookupError:
        return False
    return True


def _find(events: list[dict[str, Any]], name: str, after: int = -1, **where: Any) -> int:
    for i in range(after + 1, len(events)):
        e = events[i]
        if e["event"] == name and all(e.get(k) == v for k, v in where.items()):
            return i
    raise LookupError(f"no {name} {where or ''} in the bench run's log")


def _t(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["ts"]).timestamp()


def _reaction(events: list[dict[str, Any]]) -> dict[str, Any]:
    opened = events[_find(events, "gpu.opened")]
    maximum = opened["limits"]["maximum"]
    stop = _find(events, "thermal.stop")
    first_hot = next((i for i, e in enumerate(events[:stop + 1])
                      if e["event"].startswith("thermal.")
                      and (e.get("temperature") or 0) >= maximum), None)
    if first_hot is None:
        raise LookupError(f"no thermal event at or above {maximum} before thermal.stop")
    exited = _find(events, "worker.exited", stop)
    stopped = [e for e in events[stop:exited] if e["event"] == "worker.stopped"]
    ckpts = [e for e in events[:exited] if e["event"] == "checkpoint.durable"]
    durable = bool(stopped and stopped[-1].get("final_ckpt_acked") and ckpts
                   and ckpts[-1]["units_done"] == stopped[-1]["units_done"])
    end = _t(events[exited])
    return {
        "thermal_reaction_s": round(end - _t(events[first_hot]), 3),
        "thermal_reaction_from_crossing_s": round(end - (_t(opened) + HOT_FROM), 3),
        "thermal_stop_durable": durable,
    }


def _rate(events: list[dict[str, Any]]) -> float:
    """Units per second between the first and last checkpoint.durable of ``events``."""
    ckpts = [e for e in events if e["event"] == "checkpoint.durable"]
    if len(ckpts) < 3:
        raise LookupError(f"only {len(ckpts)} checkpoints in a rate window")
    return (ckpts[-1]["units_done"] - ckpts[0]["units_done"]) / (_t(ckpts[-1]) - _t(ckpts[0]))


def _duty(events: list[dict[str, Any]]) -> dict[str, Any]:
    throttle = _find(events, "thermal.throttle", duty=DUTY)
    requested = events[throttle]["duty"]
    obeyed = _find(events, "cmd.throttle", throttle, component="worker", duty=requested)
    changed = next((i for i in range(obeyed + 1, len(events))
                    if events[i]["event"].startswith("thermal.")), len(events))
    # The first checkpoint follows the first batch, which pays one-off start-up costs.
    first_ckpt = _find(events, "checkpoint.durable")
    full = _rate(events[first_ckpt + 1:throttle]) * UNIT_DIMS
    throttled = _rate(events[obeyed + 1:changed]) * UNIT_DIMS
    ratio = throttled / full
    return {
        "throttle_duty_requested": requested,
        "throttle_dims_per_s_ratio": round(ratio, 4),
        "throttle_duty_error": round(abs(ratio - requested), 4),
        "dims_per_s_unthrottled": round(full),
        "dims_per_s_throttled": round(throttled),
    }
