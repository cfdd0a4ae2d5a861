"""ScriptedSensor: a simulated GPU played from a TOML profile (`--sim-gpu PROFILE`).

It makes thermal, memory and Xid behaviour visible and testable on a machine without a
GPU. Times are seconds after `open()` on the injected clock, multiplied by the profile's
`time_scale` and by the one given to the sensor (0.1 plays a profile ten times faster).
PROFILE is a file path or the name of a shipped profile (`shipped_profiles()`).

Profile format (supervisor/profiles/README.md has the same with examples)::

    description = "what this profile shows"   # optional
    time_scale = 1.0                          # optional, > 0

    [[device]]                    # one table per GPU, index = order in the file
    name = "Simulated GPU"        # optional
    uuid = "GPU-sim-0"            # optional
    memory_total_mib = 24576      # needed by memory_used_pct
    memory_reserved_mib = 400     # optional
    pids = [4242]                 # optional; absent: processes are not reported

    [device.worker_contexts]      # optional: the supervisor's workers hold a context
    linger = 2.0                  # seconds a dead one stays listed; inf: for good

    [device.thresholds]           # optional, each key optional (None when absent)
    shutdown = 96                 # °C, as are slowdown, gpu_max, mem_max
    slowdown = 93
    gpu_max = 90
    mem_max = 95
    enforced_power_limit_w = 450

    [device.trace]                # keyframes [seconds, value]; absent trace: not reported
    temperature = [[0, 70], [5, 80], [8, 84]]     # °C, linear between keyframes
    thermal_margin = [[0, 20], [5, 10]]            # °C
    power_w = [[0, 200]]
    utilization_pct = [[0, 95]]
    memory_used_pct = [[0, 40], [8, 97]]           # percent of memory_total_mib
    clock_event_reasons = [[0, []], [5, ["sw_thermal_slowdown"]]]  # names or an int; steps
    ecc_uncorrected_volatile = [[0, 0]]            # steps
    # a trace may instead be a table to hold each value until the next keyframe:
    # temperature = { step = true, points = [[0, 70], [3, 90]] }

    [[device.xid]]                # an Xid event at a time
    at = 3.0
    xid = 79
    kind = "xid"                  # optional: "xid", "ecc_double_bit", "gpu_unavailable"

    [[device.error]]              # an NVML error from a time on
    at = 3.5
    error = "GpuIsLost"           # a pynvml NVMLError_* suffix (see ERRORS)
    until = 6.0                   # optional, transient errors only
    fields = ["temperature"]      # optional, default all fields; not for lost errors

Before the first keyframe the first value holds, after the last the last value holds.
GpuIsLost and ResetRequired make the GPU lost for good, NotSupported makes its fields
unsupported for good (as NVML would); any other error is transient, from `at` to `until`.

With `[device.worker_contexts]` the process list also names every running child of the
process reading the sensor (the supervisor's workers), from the first listing that sees
it, as NVML names the processes holding a context. A child that has exited (a zombie
counts as exited) stays listed for `linger` more seconds after a listing first finds it
gone (default 0; `inf`: for good), as when a driver is slow to tear down, or never tears
down, a dead process's context.
"""

from __future__ import annotations

import bisect
import importlib.resources
import math
import os
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from nkat.supervisor.gpu.sensor import (
    FIELDS,
    ClockEventReason,
    Device,
    Reading,
    Thresholds,
    XidEvent,
)

# Error names a profile may raise, with NVML's own text for each.
ERRORS = {
    "Uninitialized": "Uninitialized",
    "NotSupported": "Not Supported",
    "NoPermission": "Insufficient Permissions",
    "InsufficientPower": "Insufficient External Power",
    "Timeout": "Timeout",
    "IrqIssue": "Interrupt Request Issue",
    "CorruptedInforom": "Corrupted infoROM",
    "GpuIsLost": "GPU is lost",
    "ResetRequired": "GPU requires restart",
    "Memory": "Insufficient Memory",
    "Unknown": "Unknown Error",
}
LOST_ERRORS = frozenset({"GpuIsLost", "ResetRequired"})
XID_KINDS = ("xid", "ecc_double_bit", "gpu_unavailable")

_MIB = 1 << 20
# Trace name -> (Reading field it feeds, lowest value, highest value, always steps).
_TRACES: dict[str, tuple[str, float, float, bool]] = {
    "temperature": ("temperature", -50.0, 200.0, False),
    "thermal_margin": ("thermal_margin", -100.0, 200.0, False),
    "power_w": ("power_w", 0.0, 10_000.0, False),
    "utilization_pct": ("utilization_pct", 0.0, 100.0, False),
    "memory_used_pct": ("memory_used", 0.0, 100.0, False),
    "clock_event_reasons": ("clock_event_reasons", 0.0, float(2**64 - 1), True),
    "ecc_uncorrected_volatile": ("ecc_uncorrected_volatile", 0.0, float(2**63), True),
}
_DEVICE_KEYS = {
    "name", "uuid", "memory_total_mib", "memory_reserved_mib", "pids", "worker_contexts",
    "thresholds", "trace", "xid", "error",
}  # fmt: skip
_THRESHOLD_KEYS = ("shutdown", "slowdown", "gpu_max", "mem_max", "enforced_power_limit_w")
_REASON_BITS = {r.name.lower(): r.value for r in ClockEventReason if r.name}


class ProfileError(ValueError):
    """A profile that cannot be played; `source` is the file, `key` the bad key."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}")
        self.source = source
        self.key = key


@dataclass(frozen=True, slots=True)
class Trace:
    """Keyframes (time in profile seconds, value), linear between them or held (step)."""

    times: tuple[float, ...]
    values: tuple[float, ...]
    step: bool = False

    def at(self, t: float) -> float:
        i = bisect.bisect_right(self.times, t)
        if i == 0:
            return self.values[0]
        if i == len(self.times) or self.step:
            return self.values[i - 1]
        t0, t1 = self.times[i - 1], self.times[i]
        v0, v1 = self.values[i - 1], self.values[i]
        return v0 + (v1 - v0) * (t - t0) / (t1 - t0)


@dataclass(frozen=True, slots=True)
class ScriptedXid:
    at: float
    xid: int | None
    kind: str


@dataclass(frozen=True, slots=True)
class ScriptedError:
    at: float
    error: str
    until: float | None
    fields: frozenset[str]


@dataclass(frozen=True, slots=True)
class ScriptedDevice:
    device: Device
    thresholds: Thresholds
    traces: Mapping[str, Trace]  # keyed by trace name (see the module docstring)
    memory_total: int | None
    memory_reserved: int | None
    pids: tuple[int, ...] | None
    xids: tuple[ScriptedXid, ...]  # in time order
    errors: tuple[ScriptedError, ...]
    worker_linger: float | None = None  # None: workers are not listed

    @property
    def reported(self) -> frozenset[str]:
        """Reading fields this device reports before any scripted NotSupported."""
        fields = {_TRACES[name][0] for name in self.traces}
        for name, value in (
            ("memory_total", self.memory_total),
            ("memory_reserved", self.memory_reserved),
            ("pids", self.pids),
        ):
            if value is not None:
                fields.add(name)
        if self.worker_linger is not None:
            fields.add("pids")
        return frozenset(fields)


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    source: str  # where it was read from, for messages
    description: str
    time_scale: float
    devices: tuple[ScriptedDevice, ...]


# -- finding and parsing profiles ----------------------------------------------------


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped with nkat-supervise."""
    folder = importlib.resources.files("nkat.supervisor") / "profiles"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_profile(spec: str | Path) -> Profile:
    """Read a profile from a path or a shipped profile name; ProfileError if bad."""
    path = Path(spec)
    if path.is_file():
        text, source, name = path.read_text(encoding="utf-8"), str(path), path.stem
    else:
        name = path.name.removesuffix(".toml")
        shipped = importlib.resources.files("nkat.supervisor") / "profiles" / f"{name}.toml"
        if path.parent != Path(".") or not shipped.is_file():
            known = ", ".join(shipped_profiles())
            raise ProfileError(
                str(spec), "profile", f"no such file, nor a shipped profile (shipped: {known})"
            )
        text, source = shipped.read_text(encoding="utf-8"), f"{name} (shipped)"
    return parse_profile(text, source=source, name=name)


def parse_profile(text: str, *, source: str = "<profile>", name: str = "profile") -> Profile:
    """Parse profile TOML text; every error names `source` and the key at fault."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ProfileError(source, "toml", str(err)) from err
    p = _Parser(source)
    p.only(data, "", {"description", "time_scale", "device"})
    scale = p.number(data.get("time_scale", 1.0), "time_scale", 1e-6, 1e6)
    description = p.string(data.get("description", ""), "description")
    devices = p.array(data.get("device"), "device")
    if not devices:
        raise ProfileError(source, "device", "at least one [[device]] table is needed")
    return Profile(
        name=name,
        source=source,
        description=description,
        time_scale=scale,
        devices=tuple(p.device(d, i) for i, d in enumerate(devices)),
    )


class _Parser:
    """Checks one profile; every method raises ProfileError naming the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> ProfileError:
        return ProfileError(self.source, key, problem)

    def only(self, table: Mapping[str, Any], where: str, allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                raise self.fail(
                    f"{where}{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})"
                )

    def table(self, value: Any, key: str) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, "must be a table")
        return value

    def array(self, value: Any, key: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(key, "must be an array")
        return value

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.fail(key, "must be a string")
        return value

    def number(self, value: Any, key: str, low: float, high: float) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"must be a number, not {value!r}")
        if not low <= value <= high:
            raise self.fail(key, f"{value} is outside [{low:g}, {high:g}]")
        return float(value)

    def integer(self, value: Any, key: str, low: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self.fail(key, f"must be an integer of at least {low}, not {value!r}")
        return value

    def device(self, raw: Any, i: int) -> ScriptedDevice:
        where = f"device[{i}]."
        d = self.table(raw, f"device[{i}]")
        self.only(d, where, _DEVICE_KEYS)
        traces = self.traces(d.get("trace", {}), where + "trace")
        if "memory_used_pct" in traces and "memory_total_mib" not in d:
            raise self.fail(where + "trace.memory_used_pct", "needs device memory_total_mib")
        mib = {
            key: self.integer(d[key], where + key, low) * _MIB
            for key, low in (("memory_total_mib", 1), ("memory_reserved_mib", 0))
            if key in d
        }
        pids = None
        if "pids" in d:
            listed = self.array(d["pids"], where + "pids")
            pids = tuple(self.integer(p, f"{where}pids[{j}]", 1) for j, p in enumerate(listed))
        xids = [
            self.xid(x, f"{where}xid[{j}]")
            for j, x in enumerate(self.array(d.get("xid"), where + "xid"))
        ]
        errors = [
            self.error(e, f"{where}error[{j}]")
            for j, e in enumerate(self.array(d.get("error"), where + "error"))
        ]
        return ScriptedDevice(
            device=Device(
                index=i,
                uuid=self.string(d.get("uuid", f"GPU-sim-{i}"), where + "uuid"),
                name=self.string(d.get("name", f"Simulated GPU {i}"), where + "name"),
            ),
            thresholds=self.thresholds(d.get("thresholds", {}), where + "thresholds"),
            traces=traces,
            memory_total=mib.get("memory_total_mib"),
            memory_reserved=mib.get("memory_reserved_mib"),
            pids=pids,
            xids=tuple(sorted(xids, key=lambda x: x.at)),
            errors=tuple(errors),
            worker_linger=(
                self.worker_contexts(d["worker_contexts"], where + "worker_contexts")
                if "worker_contexts" in d
                else None
            ),
        )

    def worker_contexts(self, raw: Any, where: str) -> float:
        """The linger of `[device.worker_contexts]`: seconds, or inf for good."""
        t = self.table(raw, where)
        self.only(t, where + ".", {"linger"})
        linger = t.get("linger", 0.0)
        if isinstance(linger, float) and linger == math.inf:
            return linger
        return self.number(linger, where + ".linger", 0.0, 1e9)

    def thresholds(self, raw: Any, where: str) -> Thresholds:
        t = self.table(raw, where)
        self.only(t, where + ".", set(_THRESHOLD_KEYS))
        return Thresholds(
            **{
                key: self.number(t[key], f"{where}.{key}", 0.0, 10_000.0)
                for key in _THRESHOLD_KEYS
                if key in t
            }
        )

    def traces(self, raw: Any, where: str) -> dict[str, Trace]:
        t = self.table(raw, where)
        self.only(t, where + ".", set(_TRACES))
        return {name: self.trace(value, f"{where}.{name}", name) for name, value in t.items()}

    def trace(self, raw: Any, key: str, name: str) -> Trace:
        _, low, high, always_step = _TRACES[name]
        step = always_step
        points = raw
        if isinstance(raw, dict):
            self.only(raw, key + ".", {"step", "points"})
            step = raw.get("step", False)
            if not isinstance(step, bool):
                raise self.fail(key + ".step", "must be true or false")
            step = step or always_step
            points = raw.get("points")
        frames = self.array(points, key)
        if not frames:
            raise self.fail(key, "needs at least one keyframe [seconds, value]")
        times: list[float] = []
        values: list[float] = []
        for j, frame in enumerate(frames):
            fkey = f"{key}[{j}]"
            if not isinstance(frame, list) or len(frame) != 2:
                raise self.fail(fkey, "a keyframe is [seconds, value]")
            t = self.number(frame[0], fkey, 0.0, 1e9)
            if times and t < times[-1]:
                raise self.fail(fkey, f"time {t:g} goes back before {times[-1]:g}")
            value = frame[1]
            if name == "clock_event_reasons":
                value = self.reasons(value, fkey)
            times.append(t)
            values.append(self.number(value, fkey, low, high))
        return Trace(tuple(times), tuple(values), step)

    def reasons(self, value: Any, key: str) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        bits = 0
        for name in self.array(value, key):
            if name not in _REASON_BITS:
                raise self.fail(key, f"unknown reason {name!r} (known: {', '.join(_REASON_BITS)})")
            bits |= _REASON_BITS[name]
        return bits

    def xid(self, raw: Any, where: str) -> ScriptedXid:
        x = self.table(raw, where)
        self.only(x, where + ".", {"at", "xid", "kind"})
        kind = self.string(x.get("kind", "xid"), where + ".kind")
        if kind not in XID_KINDS:
            raise self.fail(where + ".kind", f"must be one of {', '.join(XID_KINDS)}")
        if kind == "xid" and "xid" not in x:
            raise self.fail(where + ".xid", "an Xid event needs its code")
        return ScriptedXid(
            at=self.number(x.get("at"), where + ".at", 0.0, 1e9),
            xid=self.integer(x["xid"], where + ".xid", 1) if "xid" in x else None,
            kind=kind,
        )

    def error(self, raw: Any, where: str) -> ScriptedError:
        e = self.table(raw, where)
        self.only(e, where + ".", {"at", "error", "until", "fields"})
        name = self.string(e.get("error"), where + ".error")
        if name not in ERRORS:
            raise self.fail(
                where + ".error", f"unknown error {name!r} (known: {', '.join(ERRORS)})"
            )
        at = self.number(e.get("at"), where + ".at", 0.0, 1e9)
        until = e.get("until")
        if until is not None:
            if name in LOST_ERRORS or name == "NotSupported":
                raise self.fail(where + ".until", f"{name} lasts: it takes no until")
            until = self.number(until, where + ".until", at, 1e9)
        fields = frozenset(FIELDS)
        if "fields" in e:
            if name in LOST_ERRORS:
                raise self.fail(where + ".fields", f"{name} loses the whole GPU: no fields")
            fields = frozenset(
                self.string(f, where + ".fields")
                for f in self.array(e["fields"], where + ".fields")
            )
            if unknown := fields - set(FIELDS):
                raise self.fail(where + ".fields", f"unknown field {sorted(unknown)[0]!r}")
        return ScriptedError(at=at, error=name, until=until, fields=fields)


# -- the sensor -----------------------------------------------------------------------


class ScriptedSensor:
    """Plays a `Profile`: readings, thresholds, Xid events and errors at their times.

    clock: the supervisor's monotonic clock (`open()` is profile time `start_at`);
    time_scale multiplies the profile's times; pids_every: list processes on every n-th
    poll, as NvmlSensor does.
    """

    source = "scripted"

    def __init__(
        self,
        profile: Profile,
        *,
        clock: Callable[[], float] = time.monotonic,
        time_scale: float = 1.0,
        start_at: float = 0.0,
        pids_every: int = 5,
    ) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be positive, not {time_scale}")
        if pids_every < 1:
            raise ValueError(f"pids_every must be at least 1, not {pids_every}")
        self.profile = profile
        self._clock = clock
        self._scale = profile.time_scale * time_scale
        self._start_at = start_at
        self._pids_every = pids_every
        self._t0 = 0.0
        self._opened = False
        self._polls = [0] * len(profile.devices)
        self._xids_sent = [0] * len(profile.devices)
        self._holders: list[dict[int, float | None]] = [{} for _ in profile.devices]
        self._notes: list[str] = []

    @classmethod
    def from_profile(cls, spec: str | Path, **kwargs: Any) -> ScriptedSensor:
        """A sensor for the profile at path `spec`, or the shipped profile named `spec`."""
        return cls(load_profile(spec), **kwargs)

    def open(self) -> None:
        self._t0 = self._clock()
        self._opened = True
        self._polls = [0] * len(self.profile.devices)
        self._holders = [{} for _ in self.profile.devices]
        # Xids before start_at happened before anyone watched: NVML would not report them.
        self._xids_sent = [sum(x.at < self._start_at for x in d.xids) for d in self.profile.devices]
        self._notes = [f"simulated GPU: profile {self.profile.source}, time scale {self._scale:g}"]

    def close(self) -> None:
        self._opened = False

    def devices(self) -> list[Device]:
        return [d.device for d in self.profile.devices]

    def thresholds(self, index: int) -> Thresholds:
        return self.profile.devices[index].thresholds

    def _elapsed(self, now: float) -> float:
        """Profile time at monotonic time `now`."""
        assert self._opened, "ScriptedSensor used before open()"
        return self._start_at + (now - self._t0) / self._scale

    def read(self, index: int, now: float) -> Reading:
        list_pids = self._polls[index] % self._pids_every == 0
        self._polls[index] += 1
        return self._reading(index, now, list_pids)

    def processes(self, index: int) -> tuple[int, ...] | None:
        """The profile's pids now, off the polling cadence; None when not reported."""
        return self._reading(index, self._clock(), list_pids=True).pids

    def _reading(self, index: int, now: float, list_pids: bool) -> Reading:
        dev = self.profile.devices[index]
        t = self._elapsed(now)
        active = [e for e in dev.errors if e.at <= t]
        unsupported = set(FIELDS) - dev.reported
        for e in active:
            if e.error == "NotSupported":
                unsupported |= e.fields
        if any(e.error in LOST_ERRORS for e in active):
            return Reading(t_mono=now, index=index, lost=True, unsupported=frozenset(unsupported))
        values: dict[str, Any] = {
            "memory_total": dev.memory_total,
            "memory_reserved": dev.memory_reserved,
        }
        for name, trace in dev.traces.items():
            field, _, _, step = _TRACES[name]
            v = trace.at(t)
            if name == "memory_used_pct":
                assert dev.memory_total is not None  # the parser demands it
                values[field] = round(dev.memory_total * v / 100)
            else:
                values[field] = int(v) if step else round(v, 2)
        asked = dev.reported - unsupported
        if list_pids:
            values["pids"] = dev.pids
            if dev.worker_linger is not None:
                workers = self._worker_contexts(index, dev.worker_linger, t)
                values["pids"] = (*(dev.pids or ()), *workers)
        else:
            asked -= {"pids"}
        errors: dict[str, str] = {}
        for e in active:
            if e.error != "NotSupported" and (e.until is None or t < e.until):
                errors.update(dict.fromkeys(e.fields & asked, f"{ERRORS[e.error]} (scripted)"))
        for field in unsupported | errors.keys():
            values[field] = None
        return Reading(
            t_mono=now, index=index, **values, unsupported=frozenset(unsupported), errors=errors
        )

    def _worker_contexts(self, index: int, linger: float, t: float) -> tuple[int, ...]:
        """This process's children that run, or stopped running less than `linger`
        profile seconds (from the listing that first found them gone) before `t`."""
        holders = self._holders[index]
        running = set()
        for child in psutil.Process(os.getpid()).children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    running.add(child.pid)
            except psutil.Error:
                continue  # gone since it was listed
        for pid in running:
            holders[pid] = None
        for pid, gone in list(holders.items()):
            if pid not in running and gone is None:
                holders[pid] = gone = t
            if gone is not None and t - gone >= linger:
                del holders[pid]
        return tuple(sorted(holders))

    def events(self) -> list[XidEvent]:
        """Xid events whose time has come since the last call."""
        t = self._elapsed(self._clock())
        out = []
        for index, dev in enumerate(self.profile.devices):
            sent = self._xids_sent[index]
            while sent < len(dev.xids) and dev.xids[sent].at <= t:
                x = dev.xids[sent]
                at = self._t0 + (x.at - self._start_at) * self._scale
                out.append(XidEvent(t_mono=at, index=index, xid=x.xid, kind=x.kind))
                sent += 1
            self._xids_sent[index] = sent
        return sorted(out, key=lambda e: e.t_mono)

    def take_notes(self) -> list[str]:
        notes, self._notes = self._notes, []
        return notes
