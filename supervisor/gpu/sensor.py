"""What a GPU sensor is: the interface the supervisor polls and the values it returns.

Two sensors implement it: `NvmlSensor` (a real GPU through NVML) and `ScriptedSensor`
(a TOML profile played against the injected clock). Policies only ever see these types.

    sensor = NvmlSensor()              # or ScriptedSensor.from_profile("heat_wave")
    sensor.open()                      # GpuUnavailable: run with GPU checks off, say so once
    for device in sensor.devices():
        limits = sensor.thresholds(device.index)     # read once, at open
        reading = sensor.read(device.index, clock())  # about 1 Hz
    for event in sensor.events():      # Xid events seen since the last call
        ...
    for note in sensor.take_notes():   # API fallbacks, fields not reported, GPU lost
        log(note)
    sensor.close()

A value the GPU does not report is None and its field is named in `Reading.unsupported`
(it is not asked again); a value that failed this time only is None and named in
`Reading.errors` with the NVML message.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

# Field names used in `Reading.unsupported` and `Reading.errors`: the attribute names.
FIELDS = (
    "temperature",
    "thermal_margin",
    "power_w",
    "utilization_pct",
    "memory_used",
    "memory_total",
    "memory_reserved",
    "clock_event_reasons",
    "ecc_uncorrected_volatile",
    "pids",
)


class GpuUnavailable(RuntimeError):
    """No GPU can be watched: no pynvml, no driver library, driver not loaded, no device.

    The message says which, in words for the operator; the supervisor then runs with GPU
    checks off and says so once.
    """


class ClockEventReason(enum.IntFlag):
    """Why the clocks are held down: NVML's clocks-event (formerly throttle) reason bits."""

    GPU_IDLE = 0x1
    APPLICATIONS_CLOCKS_SETTING = 0x2
    SW_POWER_CAP = 0x4
    HW_SLOWDOWN = 0x8
    SYNC_BOOST = 0x10
    SW_THERMAL_SLOWDOWN = 0x20
    HW_THERMAL_SLOWDOWN = 0x40
    HW_POWER_BRAKE_SLOWDOWN = 0x80
    DISPLAY_CLOCK_SETTING = 0x100


def reason_names(bits: int) -> list[str]:
    """Lower-case names of the known reason bits set in `bits`, lowest bit first."""
    return [r.name.lower() for r in ClockEventReason if r.name and bits & r.value]


@dataclass(frozen=True, slots=True)
class Device:
    """One GPU as NVML numbers it (CUDA_VISIBLE_DEVICES does not renumber NVML)."""

    index: int
    uuid: str
    name: str


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The GPU's own limits in °C (and W), read once at open; None where not reported.

    shutdown: the GPU may power off to protect itself. slowdown: hardware slowdown starts.
    gpu_max: clocks may drop below base. mem_max: memory temperature slowdown starts.
    """

    shutdown: float | None = None
    slowdown: float | None = None
    gpu_max: float | None = None
    mem_max: float | None = None
    enforced_power_limit_w: float | None = None


@dataclass(frozen=True, slots=True)
class Reading:
    """One poll of one GPU.

    temperature and thermal_margin in °C (margin: degrees left before the nearest slowdown
    threshold, negative past it), power in W, memory in bytes. memory_used leaves out
    the driver's reserved memory when memory_reserved is reported (NVML memory v2) and
    includes it otherwise (v1). `pids` is None on polls that did not list processes (they
    are listed every few polls; `GpuSensor.processes` lists them at once). `lost` means
    the GPU fell off the bus or needs a reset: every value is None from then on.
    """

    t_mono: float
    index: int
    temperature: float | None = None
    thermal_margin: float | None = None
    power_w: float | None = None
    utilization_pct: float | None = None
    memory_used: int | None = None
    memory_total: int | None = None
    memory_reserved: int | None = None
    clock_event_reasons: int | None = None
    ecc_uncorrected_volatile: int | None = None
    pids: tuple[int, ...] | None = None
    lost: bool = False
    unsupported: frozenset[str] = frozenset()
    errors: Mapping[str, str] = field(default_factory=dict)

    @property
    def memory_fraction(self) -> float | None:
        """Used over total memory, 0..1, or None when either is unknown."""
        if self.memory_used is None or not self.memory_total:
            return None
        return self.memory_used / self.memory_total


@dataclass(frozen=True, slots=True)
class XidEvent:
    """A critical GPU event: an Xid error, a double-bit ECC error, the GPU gone.

    kind: "xid" (`xid` holds the code), "ecc_double_bit" or "gpu_unavailable" (`xid` is
    None). `index` is -1 when the event could not be tied to a device. What an event
    means for the run is `nkat.supervisor.policies.xid.classify_event`'s business.
    """

    t_mono: float
    index: int
    xid: int | None
    kind: str = "xid"


class GpuSensor(Protocol):
    """What the supervisor needs from a GPU sensor."""

    source: str  # "nvml" or "scripted": shown by `nkat-supervise gpu` and in the log

    def open(self) -> None: ...

    def close(self) -> None: ...

    def devices(self) -> list[Device]: ...

    def thresholds(self, index: int) -> Thresholds: ...

    def read(self, index: int, now: float) -> Reading: ...

    def processes(self, index: int) -> tuple[int, ...] | None: ...

    def events(self) -> list[XidEvent]: ...

    def take_notes(self) -> list[str]:
        """Notes for the operator since the last call (API fallbacks, fields not reported,
        GPU lost, simulated GPU): the supervisor logs each once."""
        ...
