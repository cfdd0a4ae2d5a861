"""A stand-in for the `pynvml` module, for testing NvmlSensor without a GPU or a driver.

It carries the real package's constants, structures and exception classes, and raises
errors the way pynvml does (`NVMLError(code)`, which picks the NVMLError_* subclass), so
the sensor meets what it meets on hardware. GPUs are programmable `FakeGpu` values; every
call is counted in `calls`; `fail()` makes a function raise, `hide()` removes a function
as older bindings lack it. Failure and call keys are pynvml function names, except the
memory call with a struct version, counted as its C symbol `nvmlDeviceGetMemoryInfo_v2`.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, TypeVar

import pynvml as real

T = TypeVar("T")

GIB = 1 << 30
MIB = 1 << 20


@dataclass
class FakeGpu:
    """What one fake GPU reports; set a value to None to make its call NotSupported."""

    name: str = "NVIDIA Fake GPU"
    uuid: str = "GPU-fake-0"
    temperature: int | None = 60
    margin: int | None = 25  # T.Limit is temperature + margin = 85
    power_mw: int | None = 250_000
    utilization: int | None = 90
    memory_total: int = 24 * GIB
    memory_used: int = 8 * GIB
    memory_reserved: int = 400 * MIB
    reasons: int | None = 0
    ecc_uncorrected: int | None = 0
    pids: tuple[int, ...] | None = (4242,)
    enforced_power_mw: int | None = 450_000
    # Legacy nvmlDeviceGetTemperatureThreshold answers, absolute °C.
    legacy_thresholds: dict[int, int] = field(
        default_factory=lambda: {
            real.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: 96,
            real.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: 93,
            real.NVML_TEMPERATURE_THRESHOLD_GPU_MAX: 90,
        }
    )
    # Field-value answers: T.Limit offsets (negative = above T.Limit), as Ada GPUs report.
    field_values: dict[int, int] = field(
        default_factory=lambda: {
            real.NVML_FI_DEV_TEMPERATURE_SHUTDOWN_TLIMIT: -10,
            real.NVML_FI_DEV_TEMPERATURE_SLOWDOWN_TLIMIT: -7,
            real.NVML_FI_DEV_TEMPERATURE_GPU_MAX_TLIMIT: -4,
        }
    )
    supported_events: int = (
        real.nvmlEventTypeXidCriticalError
        | real.nvmlEventTypeDoubleBitEccError
        | real.nvmlEventTypeSingleBitEccError
    )


@dataclass(frozen=True)
class FakeHandle:
    index: int


class FakePynvml:
    """The fake module: the real one's exception classes and constants (NVML_*, struct
    versions such as nvmlMemory_v2, event types, reason bits), fake functions."""

    def __init__(self, gpus: list[FakeGpu] | None = None) -> None:
        for name in dir(real):
            value = getattr(real, name)
            if name.startswith("NVMLError") or (
                name.startswith(("NVML_", "nvml")) and not callable(value)
            ):
                setattr(self, name, value)
        self.gpus = gpus if gpus is not None else [FakeGpu()]
        self.calls: Counter[str] = Counter()
        self.hidden: set[str] = set()
        self.init_error: int | None = None
        self.initialized = False
        self.registered: dict[int, int] = {}
        self._failures: dict[tuple[str, int | None], list[Any]] = {}
        self._events: queue.Queue[SimpleNamespace] = queue.Queue()
        self._lock = threading.Lock()

    def __getattribute__(self, name: str) -> Any:
        if name.lower().startswith("nvml") and name in object.__getattribute__(self, "hidden"):
            raise AttributeError(name)
        return object.__getattribute__(self, name)

    # -- programming the fake -----------------------------------------------------

    def fail(self, func: str, code: int, *, index: int | None = None,
             times: int | None = None) -> None:
        """Make `func` raise NVMLError(code) on GPU `index` (any GPU when None), `times`
        times (for ever when None)."""
        self._failures[(func, index)] = [code, times]

    def heal(self, func: str, *, index: int | None = None) -> None:
        self._failures.pop((func, index), None)

    def hide(self, *names: str) -> None:
        """Remove functions or constants, as bindings older than them would lack them."""
        self.hidden.update(names)

    def push_event(self, index: int, event_type: int, data: int = 0) -> None:
        self._events.put(
            SimpleNamespace(
                device=FakeHandle(index),
                eventType=event_type,
                eventData=data,
                gpuInstanceId=0xFFFFFFFF,
                computeInstanceId=0xFFFFFFFF,
            )
        )

    def _enter(self, func: str, handle: FakeHandle | None = None) -> None:
        """Count the call; raise as pynvml would if uninitialised or told to fail."""
        with self._lock:
            self.calls[func] += 1
        if func not in ("nvmlInit", "nvmlInitWithFlags") and not self.initialized:
            raise real.NVMLError(real.NVML_ERROR_UNINITIALIZED)
        index = None if handle is None else handle.index
        for key in ((func, index), (func, None)):
            entry = self._failures.get(key)
            if entry is not None:
                code, times = entry
                if times is not None:
                    entry[1] = times - 1
                    if entry[1] <= 0:
                        del self._failures[key]
                raise real.NVMLError(code)

    def _gpu(self, func: str, handle: FakeHandle) -> FakeGpu:
        self._enter(func, handle)
        return self.gpus[handle.index]

    @staticmethod
    def _value(value: T | None) -> T:
        if value is None:
            raise real.NVMLError(real.NVML_ERROR_NOT_SUPPORTED)
        return value

    # -- library ------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        if self.init_error is not None:
            raise real.NVMLError(self.init_error)
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._enter("nvmlDeviceGetHandleByIndex", FakeHandle(index))
        return FakeHandle(index)

    def nvmlDeviceGetIndex(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetIndex", handle)
        return handle.index

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        return self._gpu("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        return self._gpu("nvmlDeviceGetUUID", handle).uuid

    # -- readings -----------------------------------------------------------------

    def nvmlDeviceGetTemperatureV(self, handle: FakeHandle, sensor: int, version: int = 0) -> int:
        return self._value(self._gpu("nvmlDeviceGetTemperatureV", handle).temperature)

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        return self._value(self._gpu("nvmlDeviceGetTemperature", handle).temperature)

    def nvmlDeviceGetMarginTemperature(self, handle: FakeHandle) -> int:
        return self._value(self._gpu("nvmlDeviceGetMarginTemperature", handle).margin)

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return self._value(self._gpu("nvmlDeviceGetPowerUsage", handle).power_mw)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        gpu = self._gpu("nvmlDeviceGetEnforcedPowerLimit", handle)
        return self._value(gpu.enforced_power_mw)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> Any:
        gpu = self._gpu("nvmlDeviceGetUtilizationRates", handle)
        return real.c_nvmlUtilization_t(gpu=self._value(gpu.utilization), memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> Any:
        if not version:
            gpu = self._gpu("nvmlDeviceGetMemoryInfo", handle)
            used = gpu.memory_used + gpu.memory_reserved  # v1 counts reserved as used
            return real.c_nvmlMemory_t(
                total=gpu.memory_total, free=gpu.memory_total - used, used=used
            )
        gpu = self._gpu("nvmlDeviceGetMemoryInfo_v2", handle)
        if version != real.nvmlMemory_v2:
            raise real.NVMLError(real.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        free = gpu.memory_total - gpu.memory_used - gpu.memory_reserved
        return real.c_nvmlMemory_v2_t(
            version=version,
            total=gpu.memory_total,
            reserved=gpu.memory_reserved,
            free=free,
            used=gpu.memory_used,
        )

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        gpu = self._gpu("nvmlDeviceGetCurrentClocksEventReasons", handle)
        return self._value(gpu.reasons)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        gpu = self._gpu("nvmlDeviceGetCurrentClocksThrottleReasons", handle)
        return self._value(gpu.reasons)

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeHandle, error_type: int, counter: int) -> int:
        gpu = self._gpu("nvmlDeviceGetTotalEccErrors", handle)
        assert (error_type, counter) == (
            real.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            real.NVML_VOLATILE_ECC,
        )
        return self._value(gpu.ecc_uncorrected)

    def _processes(self, func: str, handle: FakeHandle) -> list[SimpleNamespace]:
        pids = self._value(self._gpu(func, handle).pids)
        return [SimpleNamespace(pid=pid, usedGpuMemory=GIB) for pid in pids]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[SimpleNamespace]:
        return self._processes("nvmlDeviceGetComputeRunningProcesses", handle)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: FakeHandle) -> list[SimpleNamespace]:
        return self._processes("nvmlDeviceGetComputeRunningProcesses_v2", handle)

    # -- thresholds ---------------------------------------------------------------

    def nvmlDeviceGetTemperatureThreshold(self, handle: FakeHandle, threshold: int) -> int:
        gpu = self._gpu("nvmlDeviceGetTemperatureThreshold", handle)
        return self._value(gpu.legacy_thresholds.get(threshold))

    def nvmlDeviceGetFieldValues(self, handle: FakeHandle, field_ids: list[int]) -> Any:
        gpu = self._gpu("nvmlDeviceGetFieldValues", handle)
        values = (real.c_nvmlFieldValue_t * len(field_ids))()
        for slot, field_id in zip(values, field_ids, strict=True):
            slot.fieldId = field_id
            if field_id in gpu.field_values:
                slot.nvmlReturn = real.NVML_SUCCESS
                slot.valueType = real.NVML_VALUE_TYPE_SIGNED_INT
                slot.value.siVal = gpu.field_values[field_id]
            else:
                slot.nvmlReturn = real.NVML_ERROR_NOT_SUPPORTED
        return values

    # -- events -------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> object:
        self._enter("nvmlEventSetCreate")
        return object()

    def nvmlEventSetFree(self, event_set: object) -> None:
        self._enter("nvmlEventSetFree")

    def nvmlDeviceGetSupportedEventTypes(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetSupportedEventTypes", handle).supported_events

    def nvmlDeviceRegisterEvents(self, handle: FakeHandle, types: int, event_set: object) -> None:
        gpu = self._gpu("nvmlDeviceRegisterEvents", handle)
        if types & ~gpu.supported_events:
            raise real.NVMLError(real.NVML_ERROR_NOT_SUPPORTED)
        self.registered[handle.index] = types

    def _wait(self, func: str, timeout_ms: int) -> SimpleNamespace:
        self._enter(func)
        try:
            return self._events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise real.NVMLError(real.NVML_ERROR_TIMEOUT) from None

    def nvmlEventSetWait_v2(self, event_set: object, timeout_ms: int) -> SimpleNamespace:
        return self._wait("nvmlEventSetWait_v2", timeout_ms)

    def nvmlEventSetWait(self, event_set: object, timeout_ms: int) -> SimpleNamespace:
        return self._wait("nvmlEventSetWait", timeout_ms)
