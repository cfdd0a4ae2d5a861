"""NvmlSensor: a real GPU through nvidia-ml-py (module `pynvml`).

Every NVML call goes through one `Gate`. Which API answers each field (the newer one, or
its older twin on older drivers and bindings) is decided once per device at `open()`; a
field the GPU does not support is never asked again; a lost GPU is never asked anything.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from nkat.supervisor.gpu.gate import Failure, Gate
from nkat.supervisor.gpu.host import WSL2_KNOWN_GAPS, Host, detect
from nkat.supervisor.gpu.proctable import gpu_device_holders
from nkat.supervisor.gpu.sensor import (
    FIELDS,
    Device,
    GpuUnavailable,
    Reading,
    Thresholds,
    XidEvent,
)
from nkat.supervisor.gpu.xid_events import XidWatcher

# Threshold fields (Ada and later) are offsets from T.Limit, not °C: T.Limit is the
# temperature plus the thermal margin, and a threshold is T.Limit minus its offset. A
# result outside this range means the driver meant something else: use the legacy call.
_PLAUSIBLE_C = (20.0, 150.0)

_THRESHOLDS = (
    # Thresholds attribute, field-value id, legacy nvmlDeviceGetTemperatureThreshold id
    ("shutdown", "NVML_FI_DEV_TEMPERATURE_SHUTDOWN_TLIMIT", "NVML_TEMPERATURE_THRESHOLD_SHUTDOWN"),
    ("slowdown", "NVML_FI_DEV_TEMPERATURE_SLOWDOWN_TLIMIT", "NVML_TEMPERATURE_THRESHOLD_SLOWDOWN"),
    ("gpu_max", "NVML_FI_DEV_TEMPERATURE_GPU_MAX_TLIMIT", "NVML_TEMPERATURE_THRESHOLD_GPU_MAX"),
    ("mem_max", "NVML_FI_DEV_TEMPERATURE_MEM_MAX_TLIMIT", "NVML_TEMPERATURE_THRESHOLD_MEM_MAX"),
)

# nvmlFieldValue_t.valueType -> the member of its value union that holds the number.
_VALUE_MEMBERS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")


@dataclass(frozen=True, slots=True)
class _Query:
    """One way to read some Reading fields: a pynvml function, its arguments, a converter."""

    fields: tuple[str, ...]
    func: str
    convert: Callable[[Any], tuple[Any, ...]]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.func


@dataclass(slots=True)
class _Gpu:
    device: Device
    handle: Any
    queries: dict[str, _Query]  # group name -> the API chosen at open
    unsupported: set[str]
    thresholds: Thresholds = Thresholds()
    lost: bool = False
    polls: int = 0


def _candidates(gate: Gate) -> dict[str, list[_Query]]:
    """For each group of fields, the APIs to try, newest first."""
    c = gate.const
    temp_gpu = c("NVML_TEMPERATURE_GPU")
    memory_v2 = []
    if gate.has("nvmlMemory_v2"):
        memory_v2.append(
            _Query(
                ("memory_used", "memory_total", "memory_reserved"),
                "nvmlDeviceGetMemoryInfo",
                kwargs={"version": c("nvmlMemory_v2")},
                convert=lambda m: (int(m.used), int(m.total), int(m.reserved)),
                label="nvmlDeviceGetMemoryInfo(v2)",
            )
        )
    return {
        "temperature": [
            _Query(("temperature",), "nvmlDeviceGetTemperatureV", _one_float, (temp_gpu,)),
            _Query(("temperature",), "nvmlDeviceGetTemperature", _one_float, (temp_gpu,)),
        ],
        "thermal_margin": [
            _Query(("thermal_margin",), "nvmlDeviceGetMarginTemperature", convert=_one_float),
        ],
        "power": [
            _Query(("power_w",), "nvmlDeviceGetPowerUsage", convert=lambda mw: (mw / 1000.0,)),
        ],
        "utilization": [
            _Query(
                ("utilization_pct",),
                "nvmlDeviceGetUtilizationRates",
                convert=lambda u: (float(u.gpu),),
            ),
        ],
        "memory": [
            *memory_v2,
            _Query(
                ("memory_used", "memory_total"),
                "nvmlDeviceGetMemoryInfo",
                convert=lambda m: (int(m.used), int(m.total)),
                label="nvmlDeviceGetMemoryInfo(v1)",
            ),
        ],
        "clocks": [
            _Query(("clock_event_reasons",), "nvmlDeviceGetCurrentClocksEventReasons", _one_int),
            _Query(
                ("clock_event_reasons",),
                "nvmlDeviceGetCurrentClocksThrottleReasons",
                convert=_one_int,
            ),
        ],
        "ecc": [
            _Query(
                ("ecc_uncorrected_volatile",),
                "nvmlDeviceGetTotalEccErrors",
                _one_int,
                (c("NVML_MEMORY_ERROR_TYPE_UNCORRECTED"), c("NVML_VOLATILE_ECC")),
            ),
        ],
        "pids": [
            # The unversioned name calls the _v3 symbol, which older drivers lack.
            _Query(("pids",), "nvmlDeviceGetComputeRunningProcesses", convert=_pids),
            _Query(("pids",), "nvmlDeviceGetComputeRunningProcesses_v2", convert=_pids),
        ],
    }


def _one_float(value: Any) -> tuple[float]:
    return (float(value),)


def _one_int(value: Any) -> tuple[int]:
    return (int(value),)


def _pids(processes: Any) -> tuple[tuple[int, ...]]:
    return (tuple(sorted({int(p.pid) for p in processes})),)


def _text(value: Any) -> str:
    # Bindings before 11.515 return bytes for names and UUIDs.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlSensor:
    """The GPU sensor for real hardware.

    nvml: the pynvml module to use (tests pass a fake); imported at open when None.
    clock: stamps Xid events. pids_every: list processes on every n-th poll of a device
    (the first poll included), since that call costs more than all the others together.
    xid_events: run the event thread. event_timeout_ms: how long one event wait blocks,
    which bounds how long close() takes. kernel_release: the kernel's release string
    (None: the running kernel's), which tells WSL2 apart. process_table: who holds a GPU
    when NVML cannot list processes (default: `proctable.gpu_device_holders`).

    Under WSL2, NVML's per-process query answers with no processes at all, which would
    pass any killed worker as gone: it is not asked, the field "pids" is unsupported, and
    `processes()` reads the process table instead; a note says so, and which fields and
    thresholds this GPU does not report there.
    """

    source = "nvml"

    def __init__(
        self,
        *,
        nvml: ModuleType | None = None,
        clock: Callable[[], float] = time.monotonic,
        pids_every: int = 5,
        xid_events: bool = True,
        event_timeout_ms: int = 500,
        kernel_release: str | None = None,
        process_table: Callable[[], tuple[int, ...] | None] = gpu_device_holders,
    ) -> None:
        if pids_every < 1:
            raise ValueError(f"pids_every must be at least 1, not {pids_every}")
        self._module = nvml
        self._clock = clock
        self._pids_every = pids_every
        self._xid_events = xid_events
        self._event_timeout_ms = event_timeout_ms
        self._gate: Gate | None = None
        self._gpus: dict[int, _Gpu] = {}
        self._watcher: XidWatcher | None = None
        self._notes: list[str] = []
        self._reported_watch_error: str | None = None
        self.host: Host = detect(kernel_release)
        self._process_table = process_table
        self._said_process_table: set[int] = set()

    # -- lifecycle -------------------------------------------------------------------

    def open(self) -> None:
        """Start NVML, find the GPUs, choose APIs, read thresholds, start the event thread.

        Raises GpuUnavailable, with the reason in words, when there is nothing to watch.
        """
        gate = Gate(self._module or _import_pynvml())
        started = gate("nvmlInit")
        if isinstance(started, Failure):
            raise GpuUnavailable(_unavailable_message(started))
        self._gate = gate
        count = gate("nvmlDeviceGetCount")
        if isinstance(count, Failure) or count == 0:
            self.close()
            why = count.message if isinstance(count, Failure) else "NVML sees no device"
            raise GpuUnavailable(f"no NVIDIA GPU found ({why})")
        candidates = _candidates(gate)
        for index in range(count):
            handle = gate("nvmlDeviceGetHandleByIndex", index)
            if isinstance(handle, Failure):
                self._notes.append(f"GPU {index}: skipped, {handle.message}")
                continue
            self._gpus[index] = self._open_gpu(gate, index, handle, candidates)
        if not self._gpus:
            self.close()
            raise GpuUnavailable("no NVIDIA GPU could be opened: " + "; ".join(self._notes))
        if self.host.wsl2:
            self._notes.append(self._wsl2_note())
        if self._xid_events:
            handles = {i: gpu.handle for i, gpu in self._gpus.items() if not gpu.lost}
            self._watcher = XidWatcher(gate, handles, self._clock, self._event_timeout_ms)
            self._notes.extend(self._watcher.start())

    def close(self) -> None:
        """Stop the event thread and shut NVML down. Safe to call twice."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self._gate is not None:
            self._gate("nvmlShutdown")
            self._gate = None
        self._gpus.clear()

    def _open_gpu(
        self, gate: Gate, index: int, handle: Any, candidates: dict[str, list[_Query]]
    ) -> _Gpu:
        name = gate("nvmlDeviceGetName", handle)
        uuid = gate("nvmlDeviceGetUUID", handle)
        device = Device(
            index=index,
            uuid="" if isinstance(uuid, Failure) else _text(uuid),
            name="unknown" if isinstance(name, Failure) else _text(name),
        )
        gpu = _Gpu(device=device, handle=handle, queries={}, unsupported=set())
        for group, queries in candidates.items():
            if group == "pids" and self.host.wsl2:
                continue  # an empty list here means "cannot tell", not "no process"
            chosen = self._choose(gpu, group, queries)
            if gpu.lost:
                break
            if chosen is not None:
                gpu.queries[group] = chosen
        covered = {f for query in gpu.queries.values() for f in query.fields}
        gpu.unsupported = set(FIELDS) - covered
        if not gpu.lost:
            gpu.thresholds = self._read_thresholds(gate, gpu)
        return gpu

    def _choose(self, gpu: _Gpu, group: str, queries: list[_Query]) -> _Query | None:
        """The first API in `queries` that this driver and GPU answer, or None.

        An API that fails otherwise (e.g. Unknown Error, as memory v2 does under WSL) is
        passed over for an older one that answers, and kept if none does: polls then
        report its errors.
        """
        passed_over: list[str] = []
        failing: _Query | None = None
        for query in queries:
            result = self._call(gpu, query)
            if not isinstance(result, Failure):
                if passed_over:
                    self._notes.append(
                        f"GPU {gpu.device.index}: {group} via {query.name} "
                        f"({'; '.join(passed_over)})"
                    )
                return query
            if result.kind == "lost":
                self._lose(gpu, result)
                return None
            passed_over.append(result.message)
            if result.kind not in ("missing", "unsupported"):
                failing = failing or query
        if failing is None:
            self._notes.append(
                f"GPU {gpu.device.index}: {group} not reported ({'; '.join(passed_over)})"
            )
        return failing

    def _read_thresholds(self, gate: Gate, gpu: _Gpu) -> Thresholds:
        values: dict[str, float | None] = dict.fromkeys(t[0] for t in _THRESHOLDS)
        t_limit = self._t_limit(gpu)
        if t_limit is not None and all(gate.has(t[1]) for t in _THRESHOLDS):
            ids = [gate.const(t[1]) for t in _THRESHOLDS]
            fields = gate("nvmlDeviceGetFieldValues", gpu.handle, ids)
            if not isinstance(fields, Failure):
                for (attr, _, _), fv in zip(_THRESHOLDS, fields, strict=True):
                    if fv.nvmlReturn == 0 and fv.valueType < len(_VALUE_MEMBERS):
                        offset = getattr(fv.value, _VALUE_MEMBERS[fv.valueType])
                        celsius = t_limit - float(offset)
                        if _PLAUSIBLE_C[0] <= celsius <= _PLAUSIBLE_C[1]:
                            values[attr] = celsius
        for attr, _, legacy in _THRESHOLDS:
            if values[attr] is None and gate.has(legacy):
                got = gate("nvmlDeviceGetTemperatureThreshold", gpu.handle, gate.const(legacy))
                if not isinstance(got, Failure):
                    values[attr] = float(got)
        if all(v is None for v in values.values()):
            self._notes.append(f"GPU {gpu.device.index}: reports no temperature thresholds")
        power = gate("nvmlDeviceGetEnforcedPowerLimit", gpu.handle)
        return Thresholds(
            **values,
            enforced_power_limit_w=None if isinstance(power, Failure) else power / 1000.0,
        )

    def _t_limit(self, gpu: _Gpu) -> float | None:
        """Temperature plus thermal margin now: the base of the threshold offsets."""
        total = 0.0
        for group in ("temperature", "thermal_margin"):
            query = gpu.queries.get(group)
            if query is None or isinstance(result := self._call(gpu, query), Failure):
                return None
            total += query.convert(result)[0]
        return total

    # -- polling ---------------------------------------------------------------------

    def devices(self) -> list[Device]:
        return [gpu.device for gpu in self._gpus.values()]

    def thresholds(self, index: int) -> Thresholds:
        return self._gpus[index].thresholds

    def read(self, index: int, now: float) -> Reading:
        """Poll one GPU; `now` is the caller's monotonic time, stamped on the reading."""
        gpu = self._gpus[index]
        if gpu.lost:
            return _lost_reading(gpu, now)
        values: dict[str, Any] = {}
        errors: dict[str, str] = {}
        list_pids = gpu.polls % self._pids_every == 0
        gpu.polls += 1
        for group, query in list(gpu.queries.items()):
            if group == "pids" and not list_pids:
                continue
            got = self._ask(gpu, group, query)
            if gpu.lost:
                return _lost_reading(gpu, now)
            if not isinstance(got, Failure):
                values.update(zip(query.fields, got, strict=True))
            elif got.kind not in ("unsupported", "missing"):
                errors.update(dict.fromkeys(query.fields, got.message))
        return Reading(
            t_mono=now, index=index, **values, unsupported=frozenset(gpu.unsupported), errors=errors
        )

    def processes(self, index: int) -> tuple[int, ...] | None:
        """The pids using the GPU now, off the every-few-polls cadence (to confirm that a
        killed worker let go of the GPU); None when that cannot be known.

        When NVML cannot list processes (WSL2, or the query is not supported), the
        process table answers instead: the pids holding a GPU device file (a note says so,
        once per GPU). A lost GPU answers None.
        """
        gpu = self._gpus[index]
        if gpu.lost:
            return None
        query = gpu.queries.get("pids")
        if query is not None:
            got = self._ask(gpu, "pids", query)
            if not isinstance(got, Failure):
                pids: tuple[int, ...] = got[0]
                return pids
            if "pids" not in gpu.unsupported:
                return None  # failed this time only
        if index not in self._said_process_table:
            self._said_process_table.add(index)
            why = ("NVML under WSL2 lists no processes" if self.host.wsl2
                   else "NVML does not list its processes")
            self._notes.append(
                f"GPU {index}: {why}; the killed-pid check uses the process table instead "
                "(a worker is gone once no process holds /dev/nvidia* or /dev/dxg under its "
                "pid; a context the driver keeps after its process is gone cannot be seen)")
        return self._process_table()

    def events(self) -> list[XidEvent]:
        return [] if self._watcher is None else self._watcher.drain()

    def take_notes(self) -> list[str]:
        """Fallbacks chosen, fields not reported, GPUs lost: each note once."""
        if self._watcher is not None and self._watcher.last_error != self._reported_watch_error:
            self._reported_watch_error = self._watcher.last_error
            self._notes.append(f"Xid event wait failed: {self._reported_watch_error}")
        notes, self._notes = self._notes, []
        return notes

    def _wsl2_note(self) -> str:
        """What NVML lacks here, in one line: the known gaps, then what these GPUs do not
        report (fields and thresholds)."""
        lacks = list(WSL2_KNOWN_GAPS)
        for index, gpu in self._gpus.items():
            fields = sorted(gpu.unsupported - {"pids"})
            limits = [name for name, value in dataclasses.asdict(gpu.thresholds).items()
                      if value is None]
            if fields:
                lacks.append(f"GPU {index} fields {', '.join(fields)}")
            if limits:
                lacks.append(f"GPU {index} thresholds {', '.join(limits)}")
        return (f"{self.host.describe()}: NVML here lacks {'; '.join(lacks)}. The "
                "killed-pid check uses the process table; checks on missing fields are off")

    def _call(self, gpu: _Gpu, query: _Query) -> Any:
        assert self._gate is not None, "NvmlSensor used before open()"
        return self._gate(query.func, gpu.handle, *query.args, **query.kwargs)

    def _ask(self, gpu: _Gpu, group: str, query: _Query) -> tuple[Any, ...] | Failure:
        """One poll of one query; a lost GPU or an unsupported field is remembered."""
        result = self._call(gpu, query)
        if not isinstance(result, Failure):
            return query.convert(result)
        if result.kind == "lost":
            self._lose(gpu, result)
        elif result.kind in ("unsupported", "missing"):
            del gpu.queries[group]
            gpu.unsupported.update(query.fields)
            self._notes.append(
                f"GPU {gpu.device.index}: {group} no longer reported ({result.message})"
            )
        return result

    def _lose(self, gpu: _Gpu, failure: Failure) -> None:
        gpu.lost = True
        self._notes.append(f"GPU {gpu.device.index}: lost ({failure.message})")


def _lost_reading(gpu: _Gpu, now: float) -> Reading:
    return Reading(
        t_mono=now, index=gpu.device.index, lost=True, unsupported=frozenset(gpu.unsupported)
    )


def _import_pynvml() -> ModuleType:
    try:
        return importlib.import_module("pynvml")
    except ImportError as err:
        raise GpuUnavailable(f"nvidia-ml-py (module pynvml) cannot be imported: {err}") from err


def _unavailable_message(failure: Failure) -> str:
    if failure.kind == "no_library":
        return "no NVIDIA driver is installed (libnvidia-ml not found)"
    if failure.kind == "no_driver":
        return "the NVIDIA driver is not loaded"
    return f"NVML did not start ({failure.message})"
