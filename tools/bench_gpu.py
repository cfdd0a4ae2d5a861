"""GPU sensor benchmark (`python tools/bench.py gpu`): what one sensor poll costs.

sensor_poll_ms_p50/p99: NvmlSensor.read of one GPU on the fake pynvml from tests/, so the
sensor's own overhead (gate, conversions, bookkeeping) without driver time.
sensor_poll_ms_p99_real: the same on the real GPU 0 when a driver is present, else null.
nvml_calls_per_poll: NVML calls per read (the process list is asked every 5th poll).
scripted_poll_ms_p99: ScriptedSensor.read of the heat_wave profile.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from nkat.supervisor.gpu.nvml import NvmlSensor
from nkat.supervisor.gpu.scripted import ScriptedSensor
from nkat.supervisor.gpu.sensor import GpuUnavailable


def _poll_ms(read: Callable[[float], object], polls: int) -> list[float]:
    for n in range(min(100, polls)):  # warm caches and the pids cadence
        read(float(n))
    times = []
    for n in range(polls):
        start = time.perf_counter_ns()
        read(float(n))
        times.append((time.perf_counter_ns() - start) / 1e6)
    return sorted(times)


def _pct(sorted_ms: list[float], q: float) -> float:
    return round(sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))], 4)


def run(args: argparse.Namespace) -> dict[str, object]:
    # The fake lives with the tests, which are not installed: import it from the checkout.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.fake_pynvml import FakePynvml

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
            real_p99 = _pct(_poll_ms(lambda now: real_sensor.read(0, now), polls // 20), 0.99)
        finally:
            real_sensor.close()

    return {
        "sensor_poll_ms_p50": _pct(mocked, 0.50),
        "sensor_poll_ms_p99": _pct(mocked, 0.99),
        "sensor_poll_ms_p99_real": real_p99,
        "nvml_calls_per_poll": round(calls_per_poll, 2),
        "scripted_poll_ms_p99": _pct(scripted_ms, 0.99),
        "sensor_polls": polls,
    }
