"""GPU health: sensors (NVML, scripted) the supervisor polls.

`sensor` defines the interface and the values; `nvml` is the real sensor (every NVML call
through `gate`, Xid events from `xid_events`); `scripted` plays a simulated GPU from a
TOML profile; `show` is the `nkat-supervise gpu` command.
"""

from nkat.supervisor.gpu.nvml import NvmlSensor
from nkat.supervisor.gpu.scripted import ProfileError, ScriptedSensor, shipped_profiles
from nkat.supervisor.gpu.sensor import (
    FIELDS,
    ClockEventReason,
    Device,
    GpuSensor,
    GpuUnavailable,
    Reading,
    Thresholds,
    XidEvent,
    reason_names,
)

__all__ = [
    "FIELDS",
    "ClockEventReason",
    "Device",
    "GpuSensor",
    "GpuUnavailable",
    "NvmlSensor",
    "ProfileError",
    "Reading",
    "ScriptedSensor",
    "Thresholds",
    "XidEvent",
    "reason_names",
    "shipped_profiles",
]
