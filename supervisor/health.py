"""Reading the GPUs for the run loop: one sensor, polled every ``gpu_poll_interval``, each
poll of each GPU turned into a ``HealthReading`` for the run controller, which owns every
policy (thermal ladder, memory, power, leak and Xid rules; docs/architecture.md).

    probe = open_probe(config, sim_gpu, log, say)     # None when no GPU can be read
    probe.gpus                                         # [GpuInfo(index, source, thresholds)]
    for reading in probe.poll(now, {0: [worker_pid]}): # at most once per interval
        controller.handle(reading)
    probe.holds(0, pid); probe.close()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psutil

from nkat.supervisor.config import Config, ConfigError
from nkat.supervisor.controller import GpuInfo, HealthReading
from nkat.supervisor.gpu import GpuSensor, GpuUnavailable, NvmlSensor, ProfileError, ScriptedSensor
from nkat.supervisor.gpu.scripted import load_profile


class GpuProbe:
    """The shell's side of GPU health: it reads, the controller decides."""

    def __init__(self, sensor: GpuSensor, indices: Sequence[int], interval: float,
                 now: float) -> None:
        self.sensor = sensor
        source = str(getattr(sensor, "source", "?"))
        named = {d.index: d for d in sensor.devices()}
        self.gpus = [GpuInfo(i, source, sensor.thresholds(i),
                             named[i].name if i in named else None,
                             named[i].uuid if i in named else None) for i in indices]
        self.interval = interval
        self._next_poll = now

    def poll(self, now: float, pids: Mapping[int, Sequence[int]]) -> list[HealthReading]:
        """One reading per GPU once the interval has passed (else nothing), with the
        Xid events and notes since the last poll and the RSS of each worker pid."""
        if now < self._next_poll:
            return []
        self._next_poll = now + self.interval
        notes = list(self.sensor.take_notes())
        events = list(self.sensor.events())
        out = []
        for n, gpu in enumerate(self.gpus):
            mine = [e for e in events if e.index in (gpu.index, -1)]
            out.append(HealthReading(
                gpu=gpu.index, reading=self.sensor.read(gpu.index, now), events=mine,
                notes=notes if n == 0 else (), worker_rss=_rss(pids.get(gpu.index, ())),
                mono=now))
        return out

    def holds(self, gpu: int, pid: int) -> bool:
        """True while the GPU lists ``pid`` among the processes holding a context."""
        holders = self.sensor.processes(gpu)
        return holders is not None and pid in holders

    def close(self) -> None:
        self.sensor.close()


def _rss(pids: Sequence[int]) -> dict[int, int]:
    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            continue
    return out


def check_profile(spec: str) -> None:
    """Fail early, with a usage error, on a ``--sim-gpu`` profile that cannot be used."""
    try:
        load_profile(spec)
    except ProfileError as exc:
        raise GpuProfileError(f"--sim-gpu: {exc}") from None


def open_probe(config: Config, sim_gpu: str | None, log: Any, say: Callable[[str], None],
               now: float, indices: Sequence[int]) -> GpuProbe | None:
    """The scripted sensor for ``--sim-gpu``, else NVML, watching ``indices``; None (said
    once) without a GPU."""
    try:
        sensor = _open_sensor(sim_gpu)
    except GpuUnavailable as exc:
        log.warning("gpu.unavailable", reason=str(exc))
        say(f"GPU checks off: {exc}")
        return None
    missing = sorted(set(indices) - {d.index for d in sensor.devices()})
    if missing:
        sensor.close()
        raise GpuProfileError(f"no GPU {missing[0]} here (the sensor lists "
                              f"{sorted(d.index for d in sensor.devices())})")
    return GpuProbe(sensor, indices, config["gpu_poll_interval"], now)


def _open_sensor(sim_gpu: str | None) -> GpuSensor:
    sensor: GpuSensor
    try:
        sensor = ScriptedSensor.from_profile(sim_gpu) if sim_gpu else NvmlSensor()
        sensor.open()
    except ProfileError as exc:
        raise GpuProfileError(str(exc)) from None
    return sensor


def resolve_gpus(asked: str | None, gpu_index: int, sim_gpu: str | None) -> list[int]:
    """The NVML indices ``--gpus`` names: ``all``, a count (the first N), or a list such
    as ``0,2,3``; None means the one ``gpu_index``. Counting or listing the GPUs needs a
    sensor: NVML, or a ``--sim-gpu`` profile of several devices."""
    if asked is None:
        return [gpu_index]
    text = asked.strip().lower()
    try:
        sensor = _open_sensor(sim_gpu)
    except GpuUnavailable as exc:
        raise GpuProfileError(f"--gpus {asked}: no GPU can be read here ({exc}); on a "
                              "machine without GPUs, --sim-gpu two_gpus plays two") from None
    try:
        present = sorted(d.index for d in sensor.devices())
    finally:
        sensor.close()
    if text == "all":
        return present
    if text.isdigit():
        count = int(text)
        if not 1 <= count <= len(present):
            raise GpuProfileError(f"--gpus {asked}: this machine has {len(present)} GPU(s)")
        return present[:count]
    try:
        wanted = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise GpuProfileError(f"--gpus {asked!r}: give all, a count, or indices such as "
                              "0,2,3") from None
    absent = [i for i in wanted if i not in present]
    if not wanted or absent:
        raise GpuProfileError(f"--gpus {asked}: no GPU {absent[0] if absent else ''} here "
                              f"(there are {present})")
    return wanted


class GpuProfileError(ConfigError):
    """A ``--sim-gpu`` profile that cannot be used (a usage error: exit 2)."""
