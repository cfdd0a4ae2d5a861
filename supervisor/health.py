"""GPU health for the run loop: one sensor, read at ``gpu_poll_interval``, fed to the
thermal ladder, the memory/leak/power watches and the Xid rules, turned into actions.

    health = open_health(config, sim_gpu, log, say)   # None when no GPU can be read
    for action in health.poll(now, worker_pid):        # throttle, thermal_stop, ...
        ...
    health.may_resume(); health.pid_released(pid); health.snapshot()

The policies stay pure; this module only reads the sensor and logs what it sees.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import psutil

from nkat.supervisor.config import Config, ConfigError
from nkat.supervisor.gpu import GpuSensor, GpuUnavailable, NvmlSensor, ProfileError, ScriptedSensor
from nkat.supervisor.gpu.scripted import load_profile
from nkat.supervisor.gpu.sensor import Reading
from nkat.supervisor.policies.resources import LeakWatch, MemoryWatch, PowerWatch, ResourceSettings
from nkat.supervisor.policies.thermal import ThermalActionKind, ThermalLadder, ThermalSettings
from nkat.supervisor.policies.xid import XidAction, classify_event, classify_gpu_lost


@dataclasses.dataclass(frozen=True)
class HealthAction:
    """What the run loop should do. Kinds: ``throttle`` (with duty), ``free_memory``,
    ``thermal_stop``, ``thermal_kill``, ``restart`` (Xid), ``gpu_reset``, ``leak``."""

    kind: str
    reason: str
    duty: float | None = None


class GpuHealth:
    def __init__(self, sensor: GpuSensor, config: Config, log: Any,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sensor = sensor
        self.index = config["gpu_index"]
        self.log = log
        self.interval = config["gpu_poll_interval"]
        self.log_interval = config["gpu_log_interval"]
        self._next_log = clock()
        thresholds = sensor.thresholds(self.index)
        self.ladder = ThermalLadder(ThermalSettings.from_config(config), thresholds)
        self.resource_settings = ResourceSettings.from_config(config)
        self.memory = MemoryWatch(self.resource_settings)
        self.power = PowerWatch(self.resource_settings)
        self.enforced_power = thresholds.enforced_power_limit_w
        self.leak: LeakWatch | None = None
        self.leak_pid: int | None = None
        self.last: Reading | None = None
        self.lost_reported = False
        self._next_poll = clock()
        self.log.info("gpu.opened", source=getattr(sensor, "source", "?"), index=self.index,
                      limits=dataclasses.asdict(self.ladder.limits))

    def poll(self, now: float, worker_pid: int | None) -> list[HealthAction]:
        if now < self._next_poll:
            return []
        self._next_poll = now + self.interval
        actions: list[HealthAction] = []
        for note in self.sensor.take_notes():
            self.log.info("gpu.note", note=note)
        for event in self.sensor.events():
            verdict = classify_event(event.kind, event.xid)
            self.log.error("gpu.xid", xid=event.xid, kind=event.kind, device=event.index,
                           action=verdict.action.value, message=verdict.message)
            if verdict.action is XidAction.RESTART_WORKER:
                actions.append(HealthAction("restart", verdict.message))
            elif verdict.action is XidAction.GPU_RESET:
                actions.append(HealthAction("gpu_reset", verdict.message))
        reading = self.sensor.read(self.index, now)
        self.last = reading
        if reading.lost:
            if not self.lost_reported:
                self.lost_reported = True
                message = classify_gpu_lost().message
                self.log.critical("gpu.lost", message=message)
                actions.append(HealthAction("gpu_reset", message))
            return actions
        if now >= self._next_log:
            self._next_log = now + self.log_interval
            self.log.info("gpu.reading", **{k: v for k, v in self.snapshot().items()
                                            if k not in ("source", "lost")})
        thermal = self.ladder.update(now, reading.temperature, margin=reading.thermal_margin,
                                     reasons=reading.clock_event_reasons)
        if thermal is not None:
            self.log.warning(f"thermal.{thermal.kind.value}", temperature=reading.temperature,
                             reason=thermal.reason, duty=thermal.duty,
                             state=self.ladder.state.value)
            if thermal.kind in (ThermalActionKind.THROTTLE, ThermalActionKind.UNTHROTTLE):
                actions.append(HealthAction("throttle", thermal.reason, thermal.duty or 1.0))
            elif thermal.kind is ThermalActionKind.STOP:
                actions.append(HealthAction("thermal_stop", thermal.reason))
            elif thermal.kind is ThermalActionKind.KILL_NOW:
                actions.append(HealthAction("thermal_kill", thermal.reason))
        mem = self.memory.update(now, reading.memory_used, reading.memory_total)
        if mem is not None:
            self.log.warning("gpu.memory_high", reason=mem.reason, **mem.fields)
            actions.append(HealthAction("free_memory", mem.reason))
        power = self.power.update(now, reading.power_w, self.enforced_power)
        if power is not None:
            self.log.warning("gpu.power_high", reason=power.reason, **power.fields)
        leak = self._leak(now, worker_pid)
        if leak is not None:
            actions.append(leak)
        return actions

    def _leak(self, now: float, worker_pid: int | None) -> HealthAction | None:
        if worker_pid is None:
            return None
        if worker_pid != self.leak_pid:
            self.leak_pid = worker_pid
            self.leak = LeakWatch(self.resource_settings, now)
        try:
            rss = psutil.Process(worker_pid).memory_info().rss
        except psutil.Error:
            return None
        assert self.leak is not None
        action = self.leak.update(now, rss)
        if action is None:
            return None
        self.log.warning("worker.leak_suspected", reason=action.reason, **action.fields)
        return HealthAction("leak", action.reason)

    def may_resume(self) -> bool:
        return self.ladder.may_run

    def pid_released(self, pid: int) -> bool:
        """True unless the GPU still lists ``pid`` among the processes holding a context."""
        holders = self.sensor.processes(self.index)
        return holders is None or pid not in holders

    def snapshot(self) -> dict[str, Any]:
        r = self.last
        return {
            "source": getattr(self.sensor, "source", None),
            "thermal_state": self.ladder.state.value,
            "duty": self.ladder.duty,
            "temperature": r.temperature if r else None,
            "memory_fraction": r.memory_fraction if r else None,
            "power_w": r.power_w if r else None,
            "utilization_pct": r.utilization_pct if r else None,
            "lost": r.lost if r else None,
        }

    def close(self) -> None:
        self.sensor.close()


def check_profile(spec: str) -> None:
    """Fail early, with a usage error, on a ``--sim-gpu`` profile that cannot be used."""
    try:
        load_profile(spec)
    except ProfileError as exc:
        raise GpuProfileError(f"--sim-gpu: {exc}") from None


def open_health(config: Config, sim_gpu: str | None, log: Any,
                say: Callable[[str], None]) -> GpuHealth | None:
    """The scripted sensor for ``--sim-gpu``, else NVML; None (said once) without a GPU."""
    sensor: GpuSensor
    try:
        sensor = ScriptedSensor.from_profile(sim_gpu) if sim_gpu else NvmlSensor()
        sensor.open()
    except ProfileError as exc:
        raise GpuProfileError(str(exc)) from None
    except GpuUnavailable as exc:
        log.warning("gpu.unavailable", reason=str(exc))
        say(f"GPU checks off: {exc}")
        return None
    return GpuHealth(sensor, config, log)


class GpuProfileError(ConfigError):
    """A ``--sim-gpu`` profile that cannot be used (a usage error: exit 2)."""
