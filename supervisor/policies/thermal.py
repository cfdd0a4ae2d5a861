"""The thermal ladder: from GPU readings to throttle, unthrottle, stop, kill and resume.

    ladder = ThermalLadder(ThermalSettings.from_config(config), sensor.thresholds(index))
    action = ladder.update(reading.t_mono, reading.temperature,
                           margin=reading.thermal_margin, reasons=reading.clock_event_reasons)
    # None, or THROTTLE(duty) / UNTHROTTLE / STOP / KILL_NOW / RESUME

One call per sensor reading (1 Hz). Pure: times are passed in. A lost GPU is not handled
here but by the Xid policy (``xid.classify_gpu_lost``).

Levels of a reading (limits after NVML tightening, see :func:`effective_limits`):

- emergency: temperature ≥ emergency_temp → ``kill_now`` after ONE reading.
- stop: temperature ≥ max_temperature, the hardware thermal slowdown bit, the hardware
  slowdown bit (unless the power-brake bit explains it), or thermal margin ≤ 0.
- throttle: temperature ≥ thermal_throttle_temp, or the software thermal slowdown bit.
- normal: anything else with a temperature. A reading with no temperature and no bits
  set is missing: it counts neither way.

States and moves:

- NORMAL → THROTTLED after ``thermal_samples`` consecutive readings at throttle level or
  above (``throttle{duty}``); NORMAL/THROTTLED → COOLING after ``thermal_samples``
  consecutive stop-level readings (``stop``: checkpoint, stop, cool down).
- THROTTLED → NORMAL after ``thermal_samples`` consecutive cool readings (``unthrottle``,
  duty 1.0). Cool: a normal-level reading at or below target_temperature.
  Because the target is below the throttle threshold, a temperature hovering at the
  throttle threshold cannot flap between the two.
- any → EMERGENCY on one emergency reading (``kill_now``; from COOLING too, in case the
  stopping worker is still alive; with no worker it is a no-op for the shell).
- COOLING/EMERGENCY → NORMAL once readings have been cool for ``thermal_dwell`` seconds
  without a known warmer reading in between (``resume``).

Duty while throttled falls linearly from 1.0 at the throttle threshold to ``duty_floor``
at max_temperature, capped at 1 − ``duty_step`` so throttling always lowers it. It follows
the hottest of the last ``thermal_samples`` readings, so it drops at once when heat rises
and rises only after the heat has stayed lower for that many readings, and it changes only
by at least ``duty_step``: a sawtooth does not make it chatter.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from collections.abc import Iterable
from typing import Protocol

from nkat.protocol.settings import Role, setting
from nkat.supervisor.policies.settings import FromConfig

_S = Role.SUPERVISOR

# NVML clocks event (throttle) reason bits, as in nvml.h.
HW_SLOWDOWN = 0x8
SW_THERMAL_SLOWDOWN = 0x20
HW_THERMAL_SLOWDOWN = 0x40
HW_POWER_BRAKE_SLOWDOWN = 0x80


@dataclasses.dataclass(frozen=True)
class ThermalSettings(FromConfig):
    """Thermal ladder knobs (°C, seconds, readings).

    target_temperature: at or below it counts as cool (unthrottle, resume).
    thermal_throttle_temp: at or above it, throttle.
    max_temperature: at or above it, checkpoint, stop and cool down.
    emergency_temp: at or above it, kill at once.
    thermal_samples: consecutive readings needed to escalate or unthrottle.
    thermal_dwell: seconds cool before a stopped worker resumes.
    duty_floor: the lowest duty asked of the worker (reached at max_temperature).
    duty_step: the smallest duty change sent, and the gap below 1.0 of the mildest
        throttle.
    nvml_margin: degrees kept below the GPU's own slowdown and shutdown thresholds.
    """

    target_temperature: float = setting(75.0, "resume/unthrottle at or below (C)", role=_S,
                                        low=20, high=120, seed="target_temperature")
    thermal_throttle_temp: float = setting(80.0, "throttle at or above (C)", role=_S, low=20,
                                           high=120, seed="thermal_throttle_temp")
    max_temperature: float = setting(83.0, "checkpoint, stop and cool down at (C)", role=_S,
                                     low=20, high=120, seed="max_temperature")
    emergency_temp: float = setting(85.0, "kill at once at (C)", role=_S, low=20, high=130,
                                    seed="emergency_temp")
    thermal_samples: int = setting(3, "consecutive readings before escalating", role=_S, low=1,
                                   high=100)
    thermal_dwell: float = setting(60.0, "seconds at or below target before resuming", role=_S,
                                   low=0, high=86400)
    duty_floor: float = 0.25
    duty_step: float = 0.1
    nvml_margin: float = 2.0

    def __post_init__(self) -> None:
        if not (self.target_temperature < self.thermal_throttle_temp
                <= self.max_temperature <= self.emergency_temp):
            raise ValueError("need target_temperature < thermal_throttle_temp"
                             " <= max_temperature <= emergency_temp")
        if self.thermal_samples < 1:
            raise ValueError("thermal_samples must be >= 1")
        if self.thermal_dwell < 0:
            raise ValueError("thermal_dwell must be >= 0")
        if not 0 < self.duty_floor < 1 or not 0 < self.duty_step < 1:
            raise ValueError("duty_floor and duty_step must be in (0, 1)")
        if self.nvml_margin < 0:
            raise ValueError("nvml_margin must be >= 0")


class GpuThresholds(Protocol):
    """The GPU's own temperature thresholds (°C), None where it does not report one;
    ``nkat.supervisor.gpu.sensor.Thresholds`` is one."""

    @property
    def slowdown(self) -> float | None: ...

    @property
    def shutdown(self) -> float | None: ...

    @property
    def gpu_max(self) -> float | None: ...


@dataclasses.dataclass(frozen=True)
class ThermalLimits:
    """The thresholds in force; ``tightened`` names those NVML lowered (for the log)."""

    target: float
    throttle: float
    maximum: float
    emergency: float
    tightened: tuple[str, ...] = ()


def effective_limits(settings: ThermalSettings, nvml: GpuThresholds | None) -> ThermalLimits:
    """Configured limits, tightened (never loosened) by the GPU's thresholds.

    emergency = min(emergency_temp, shutdown − nvml_margin)
    maximum   = min(max_temperature, gpu_max, slowdown − nvml_margin, emergency)
    throttle  = min(thermal_throttle_temp, maximum)
    target    = min(target_temperature, throttle − configured (throttle − target) gap)

    Missing thresholds drop out of the min. Keeping the configured gap below the throttle
    threshold keeps the hysteresis when NVML lowers it.
    """
    s = settings
    m = s.nvml_margin
    shutdown = slowdown = gpu_max = None
    if nvml is not None:
        shutdown, slowdown, gpu_max = nvml.shutdown, nvml.slowdown, nvml.gpu_max

    def lowest(configured: float, *others: float | None) -> float:
        return min([configured, *(o for o in others if o is not None)])

    emergency = lowest(s.emergency_temp, None if shutdown is None else shutdown - m)
    maximum = lowest(s.max_temperature, gpu_max,
                     None if slowdown is None else slowdown - m, emergency)
    throttle = min(s.thermal_throttle_temp, maximum)
    target = min(s.target_temperature,
                 throttle - (s.thermal_throttle_temp - s.target_temperature))
    tightened = tuple(name for name, eff, conf in (
        ("target_temperature", target, s.target_temperature),
        ("thermal_throttle_temp", throttle, s.thermal_throttle_temp),
        ("max_temperature", maximum, s.max_temperature),
        ("emergency_temp", emergency, s.emergency_temp),
    ) if eff < conf)
    return ThermalLimits(target, throttle, maximum, emergency, tightened)


class ThermalState(enum.StrEnum):
    NORMAL = "normal"
    THROTTLED = "throttled"
    COOLING = "cooling"  # stopped; waiting for the dwell
    EMERGENCY = "emergency"  # killed; waiting for the dwell


class ThermalActionKind(enum.StrEnum):
    THROTTLE = "throttle"  # cmd throttle{duty}
    UNTHROTTLE = "unthrottle"  # cmd throttle{duty: 1.0}
    STOP = "stop"  # checkpoint, stop (KillReason.THERMAL_STOP), start no worker
    KILL_NOW = "kill_now"  # KillReason.THERMAL_EMERGENCY
    RESUME = "resume"  # a worker may start again


@dataclasses.dataclass(frozen=True)
class ThermalAction:
    kind: ThermalActionKind
    reason: str
    duty: float | None = None  # for THROTTLE and UNTHROTTLE


class _Level(enum.IntEnum):
    NORMAL = 0
    THROTTLE = 1
    STOP = 2
    EMERGENCY = 3


@dataclasses.dataclass(frozen=True)
class _Sample:
    """One graded reading: its level, what its temperature alone reaches, the strongest
    other signal (a clock event bit or no margin) and the level that signal reaches."""

    temperature: float | None
    level: _Level
    by_temperature: _Level
    signal: str  # "" when no bit or margin says anything
    duty: float  # the duty this reading alone would ask for


class ThermalLadder:
    """The thermal state of one GPU across worker epochs.

    Every action's ``reason`` states the rule that fired and the readings that made it
    fire, e.g. "3 readings at or above the throttle threshold 80 °C (81.3, 82.7, 83.2 °C):
    duty 0.25, the floor, for 83.2 °C at or above the max temperature 83 °C".
    """

    def __init__(self, settings: ThermalSettings, nvml: GpuThresholds | None = None) -> None:
        self._s = settings
        self.limits = effective_limits(settings, nvml)
        self.state = ThermalState.NORMAL
        self.duty = 1.0
        self._hot_throttle = 0  # consecutive readings at throttle level or above
        self._hot_stop = 0  # consecutive readings at stop level or above
        self._cool = 0  # consecutive cool readings
        self._cool_since: float | None = None
        self._dwell_count, self._dwell_hottest = 0, 0.0  # cool readings since _cool_since
        # The last thermal_samples graded readings. Invariant: whenever a counter above
        # reaches thermal_samples, these are exactly the readings it counted (missing
        # readings are not graded, and _enter clears both).
        self._window: deque[_Sample] = deque(maxlen=settings.thermal_samples)

    @property
    def may_run(self) -> bool:
        """Whether a worker may run now (False while cooling down)."""
        return self.state in (ThermalState.NORMAL, ThermalState.THROTTLED)

    def update(
        self,
        now: float,
        temperature: float | None,
        *,
        margin: float | None = None,
        reasons: int | None = None,
    ) -> ThermalAction | None:
        """Feed one reading; ``margin`` and ``reasons`` are None where unsupported."""
        sample = self._grade(temperature, margin, reasons)
        if sample is None:
            return None
        level, lim = sample.level, self.limits
        cool = (level is _Level.NORMAL and temperature is not None
                and temperature <= lim.target)
        if level is _Level.EMERGENCY:
            if self.state is ThermalState.EMERGENCY:
                return None
            self._enter(ThermalState.EMERGENCY)
            return ThermalAction(
                ThermalActionKind.KILL_NOW,
                f"{temperature:g} °C at or above the emergency temperature "
                f"{lim.emergency:g} °C: one reading is enough")
        if self.state in (ThermalState.COOLING, ThermalState.EMERGENCY):
            return self._while_stopped(now, cool, temperature)
        self._hot_throttle = self._hot_throttle + 1 if level >= _Level.THROTTLE else 0
        self._hot_stop = self._hot_stop + 1 if level >= _Level.STOP else 0
        self._cool = self._cool + 1 if cool else 0
        self._window.append(sample)
        n = self._s.thermal_samples
        if self._hot_stop >= n:
            reason = self._counted(_Level.STOP)
            self._enter(ThermalState.COOLING)
            return ThermalAction(ThermalActionKind.STOP, reason)
        if self.state is ThermalState.NORMAL:
            if self._hot_throttle < n:
                return None
            self.state = ThermalState.THROTTLED
            self.duty = self._wanted_duty()
            return ThermalAction(
                ThermalActionKind.THROTTLE,
                f"{self._counted(_Level.THROTTLE)}: duty {self.duty:g}, {self._duty_basis()}",
                self.duty)
        if self._cool >= n:
            temps = _temperatures(self._window)
            self._enter(ThermalState.NORMAL)
            return ThermalAction(
                ThermalActionKind.UNTHROTTLE,
                f"{n} readings at or below the target {lim.target:g} °C{temps}: duty 1",
                1.0)
        wanted = self._wanted_duty()
        # The epsilon keeps a change of exactly one step (in float) a change.
        if abs(wanted - self.duty) < self._s.duty_step - 1e-9:
            return None
        trend = "hotter" if wanted < self.duty else "cooler"
        reason = f"{trend}: duty {self.duty:g} → {wanted:g}, {self._duty_basis()}"
        self.duty = wanted
        return ThermalAction(ThermalActionKind.THROTTLE, reason, wanted)

    def _grade(
        self, temperature: float | None, margin: float | None, reasons: int | None
    ) -> _Sample | None:
        lim, r, t = self.limits, reasons or 0, temperature
        by_temperature = _Level.NORMAL
        if t is not None:
            for threshold, at_level in ((lim.emergency, _Level.EMERGENCY),
                                        (lim.maximum, _Level.STOP),
                                        (lim.throttle, _Level.THROTTLE)):
                if t >= threshold:
                    by_temperature = at_level
                    break
        signal, by_signal = "", _Level.NORMAL
        if r & HW_THERMAL_SLOWDOWN:
            signal, by_signal = "hardware thermal slowdown", _Level.STOP
        # HW_SLOWDOWN alone may be heat; with only the power brake behind it, it is power.
        elif r & HW_SLOWDOWN and not r & HW_POWER_BRAKE_SLOWDOWN:
            signal, by_signal = "hardware slowdown", _Level.STOP
        elif margin is not None and margin <= 0:
            signal, by_signal = "no thermal margin left", _Level.STOP
        elif r & SW_THERMAL_SLOWDOWN:
            signal, by_signal = "software thermal slowdown", _Level.THROTTLE
        if t is None and not signal:
            return None
        level = max(by_temperature, by_signal)
        return _Sample(t, level, by_temperature, signal, self._raw_duty(level, t))

    def _counted(self, level: _Level) -> str:
        """The rule that ``thermal_samples`` readings at ``level`` or above fulfilled,
        with those readings (the window holds exactly them, see its invariant)."""
        lim, samples = self.limits, list(self._window)
        n = len(samples)
        name = (f"the max temperature {lim.maximum:g} °C" if level >= _Level.STOP
                else f"the throttle threshold {lim.throttle:g} °C")
        if all(s.by_temperature >= level for s in samples):
            return f"{n} readings at or above {name}{_temperatures(samples)}"
        signals = {s.signal for s in samples}
        if len(signals) == 1 and all(s.by_temperature < level for s in samples):
            return f"{signals.pop()} in {n} readings{_temperatures(samples)}"
        each = ", ".join(_describe(s, level) for s in samples)
        return f"{n} readings at or above {name}, or with a thermal signal ({each})"

    def _raw_duty(self, level: _Level, temperature: float | None) -> float:
        s, lim = self._s, self.limits
        cap = 1.0 - s.duty_step
        if level >= _Level.STOP:
            return s.duty_floor
        if temperature is None or temperature < lim.throttle:
            return cap
        span = lim.maximum - lim.throttle
        if span <= 0:
            return s.duty_floor
        linear = 1.0 - (1.0 - s.duty_floor) * (temperature - lim.throttle) / span
        return min(max(linear, s.duty_floor), cap)

    def _wanted_duty(self) -> float:
        return round(min(s.duty for s in self._window), 2)

    def _duty_basis(self) -> str:
        """Why the duty is what :meth:`_wanted_duty` says: the reading that sets it."""
        lim, k = self.limits, len(self._window)
        # The most recent of the readings asking for the lowest duty.
        hottest = min(reversed(self._window), key=lambda s: s.duty)
        if hottest.by_temperature >= _Level.STOP:
            return (f"the floor, for {hottest.temperature:g} °C at or above the max temperature "
                    f"{lim.maximum:g} °C")
        if hottest.level >= _Level.STOP:
            return f"the floor, for {_describe(hottest, _Level.STOP)}"
        if hottest.temperature is None or hottest.temperature < lim.throttle:
            return f"the mildest: none of the last {k} readings reached {lim.throttle:g} °C"
        return (f"for {hottest.temperature:g} °C, the hottest of the last {k} readings, "
                f"in the band {lim.throttle:g}–{lim.maximum:g} °C")

    def _while_stopped(
        self, now: float, cool: bool, temperature: float | None
    ) -> ThermalAction | None:
        if not cool:
            # A known warmer reading breaks the dwell; bits without a temperature too.
            self._cool_since = None
            return None
        assert temperature is not None  # a cool reading has one
        if self._cool_since is None:
            self._cool_since, self._dwell_count, self._dwell_hottest = now, 0, temperature
        self._dwell_count += 1
        self._dwell_hottest = max(self._dwell_hottest, temperature)
        if now - self._cool_since < self._s.thermal_dwell:
            return None
        dwelt, count, hottest = now - self._cool_since, self._dwell_count, self._dwell_hottest
        self._enter(ThermalState.NORMAL)
        return ThermalAction(
            ThermalActionKind.RESUME,
            f"{count} readings over {round(dwelt, 1):g} s, none above the target "
            f"{self.limits.target:g} °C (hottest {hottest:g} °C, last {temperature:g} °C): "
            f"the dwell of {self._s.thermal_dwell:g} s is over")

    def _enter(self, state: ThermalState) -> None:
        self.state = state
        self.duty = 1.0
        self._hot_throttle = self._hot_stop = self._cool = 0
        self._cool_since = None
        self._window.clear()


def _temperatures(samples: Iterable[_Sample]) -> str:
    """" (81.3, 82.7, 83.2 °C)", "?" for a reading without one; "" if none has one."""
    temps = [s.temperature for s in samples]
    if all(t is None for t in temps):
        return ""
    return " (" + ", ".join("?" if t is None else f"{t:g}" for t in temps) + " °C)"


def _describe(sample: _Sample, level: _Level) -> str:
    """What put one reading at ``level``: its temperature, else its signal."""
    t = sample.temperature
    if sample.by_temperature >= level:
        return f"{t:g} °C"
    return sample.signal if t is None else f"{sample.signal} at {t:g} °C"
