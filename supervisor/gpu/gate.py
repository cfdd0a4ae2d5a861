"""The one gate every NVML call goes through (nvitop's libnvml pattern).

`Gate(pynvml)("nvmlDeviceGetPowerUsage", handle)` returns the result, or a `Failure` that
says what kind of failure it was; no NVML exception gets past it. Callers decide what a
kind means for them (a field unsupported, a device lost, GPU checks off).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

# Failure kinds, by the pynvml exception class suffix that produces them. A function the
# bindings have but the driver lacks raises FunctionNotFound; a struct version the driver
# does not know raises ArgumentVersionMismatch: both mean "use the older API".
_KINDS = (
    ("NotSupported", "unsupported"),
    ("FunctionNotFound", "missing"),
    ("ArgumentVersionMismatch", "missing"),
    ("GpuIsLost", "lost"),
    ("ResetRequired", "lost"),
    ("LibraryNotFound", "no_library"),
    ("DriverNotLoaded", "no_driver"),
    ("Timeout", "timeout"),
)


@dataclass(frozen=True, slots=True)
class Failure:
    """An NVML call that did not return a value.

    kind: "unsupported" (the GPU does not report it), "missing" (not in these bindings or
    this driver), "lost" (GPU fell off the bus or needs a reset), "no_library" (no
    libnvidia-ml), "no_driver" (driver not loaded), "timeout", or "error" (anything else;
    treated as transient). message: "function: NVML text".
    """

    kind: str
    message: str


class Gate:
    """Calls pynvml functions by name and turns every NVML error into a `Failure`."""

    def __init__(self, nvml: ModuleType) -> None:
        self._nvml = nvml
        self._base: type[BaseException] = nvml.NVMLError
        # Older bindings lack some classes (ArgumentVersionMismatch): skip those.
        self._kinds = tuple(
            (cls, kind)
            for suffix, kind in _KINDS
            if (cls := getattr(nvml, "NVMLError_" + suffix, None)) is not None
        )

    def has(self, name: str) -> bool:
        """Whether these bindings define `name` (a function or a constant)."""
        return hasattr(self._nvml, name)

    def const(self, name: str) -> Any:
        """A pynvml constant (raises AttributeError when these bindings lack it)."""
        return getattr(self._nvml, name)

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self._nvml, name, None)
        if fn is None:
            return Failure("missing", f"{name}: not in this nvidia-ml-py")
        try:
            return fn(*args, **kwargs)
        except self._base as err:
            for cls, kind in self._kinds:
                if isinstance(err, cls):
                    return Failure(kind, f"{name}: {err}")
            return Failure("error", f"{name}: {err}")
