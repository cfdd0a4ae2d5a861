"""A stand-in for CuPy whose device does no work, for measuring the host side of the
CUDA path without a GPU (``bench_nkat_gpu``).

It is never imported by name: the bench copies this file as ``cupy.py`` into a
temporary folder and puts that folder on the ``PYTHONPATH`` of a
``python -m nkat.worker --standalone --backend cupy`` run, so the worker's real
``CupyBackend``, runner and the job's CUDA path run against it unchanged.

What it provides is what they call: ``cuda.is_available``, the memory pools, device
properties, ``RawModule`` kernels, streams, events, pinned memory, ``empty`` and
``asarray``. Buffers are NumPy arrays of the real shapes and dtypes (zeros: the record
of a batch decodes as all-zero sums). Kernels return at once; with
``NULL_CUPY_DEVICE_DIMS_PER_S`` set, each ``nkat_units`` launch also occupies its
stream for (units × unit_dims) / that rate, and waiting on an event recorded after it
sleeps until then: a device of that speed, queued like a real one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np

__version__ = "0.0.0+null"

int64 = np.int64
float64 = np.float64

#: Dims per second of the modelled device; 0 = kernels take no time at all.
DEVICE_DIMS_PER_S = float(os.environ.get("NULL_CUPY_DEVICE_DIMS_PER_S", "0") or 0)


class ndarray:  # noqa: N801 - CuPy's name
    """A device array: a NumPy array that ``get`` copies to the host."""

    def __init__(self, host: np.ndarray) -> None:
        self.host = host
        self.size = host.size

    def __getitem__(self, key: Any) -> ndarray:
        return ndarray(self.host[key])

    def get(self, stream: Any = None, out: np.ndarray | None = None,
            blocking: bool = True) -> np.ndarray:
        if out is None:
            return self.host.copy()
        out[...] = self.host
        return out


def empty(n: int, dtype: Any) -> ndarray:
    return ndarray(np.zeros(n, dtype=dtype))


def asarray(a: Any) -> ndarray:
    return ndarray(np.asarray(a))


class _Stream:
    """A queue on the modelled device: ``busy_until`` is when its last kernel ends."""

    def __init__(self, non_blocking: bool = False) -> None:
        self.busy_until = 0.0

    def __enter__(self) -> _Stream:
        _current.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _current.pop()


_default_stream = _Stream()
_current: list[_Stream] = [_default_stream]


_SPIN_S = 0.002


class _Event:
    def __init__(self) -> None:
        self.done_at = 0.0

    def record(self, stream: _Stream | None = None) -> None:
        self.done_at = (stream or _current[-1]).busy_until

    def synchronize(self) -> None:
        # Sleep, then spin the last stretch: a sleep overshoots by up to a scheduler tick,
        # which would swamp the timing of a short batch (CUDA's own wait spins as well).
        left = self.done_at - time.monotonic()
        if left > _SPIN_S:
            time.sleep(left - _SPIN_S)
        while time.monotonic() < self.done_at:
            pass


def _kernel(name: str) -> Callable[[tuple[int, ...], tuple[int, ...], tuple[Any, ...]], None]:
    def launch(grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
        if name == "nkat_units" and DEVICE_DIMS_PER_S > 0:
            unit_dims, units = int(args[1]), int(args[5])
            stream = _current[-1]
            start = max(time.monotonic(), stream.busy_until)
            stream.busy_until = start + units * unit_dims / DEVICE_DIMS_PER_S
    return launch


class RawModule:
    def __init__(self, code: str = "", options: tuple[str, ...] = ()) -> None:
        pass

    def get_function(self, name: str) -> Callable[..., None]:
        return _kernel(name)


class _MemoryPool:
    def __init__(self) -> None:
        self.limit = 0

    def set_limit(self, size: int = 0) -> None:
        self.limit = size

    def get_limit(self) -> int:
        return self.limit

    def total_bytes(self) -> int:
        return 0

    def free_bytes(self) -> int:
        return 0

    def free_all_blocks(self) -> None:
        pass


_pool, _pinned_pool = _MemoryPool(), _MemoryPool()
_TOTAL_BYTES = 141 * 2**30  # an H200's memory, for the pool limit the worker sets


def get_default_memory_pool() -> _MemoryPool:
    return _pool


def get_default_pinned_memory_pool() -> _MemoryPool:
    return _pinned_pool


class _CudaError(RuntimeError):
    status = 0


cuda = SimpleNamespace(
    is_available=lambda: True,
    Device=lambda index=0: SimpleNamespace(id=index),
    Stream=_Stream,
    Event=_Event,
    alloc_pinned_memory=lambda n: bytearray(n),
    runtime=SimpleNamespace(
        getDeviceProperties=lambda index: {"name": b"null device"},
        memGetInfo=lambda: (_TOTAL_BYTES, _TOTAL_BYTES),
        CUDARuntimeError=type("CUDARuntimeError", (_CudaError,), {})),
    driver=SimpleNamespace(CUDADriverError=type("CUDADriverError", (_CudaError,), {})),
    memory=SimpleNamespace(OutOfMemoryError=type("OutOfMemoryError", (MemoryError,), {})),
)
