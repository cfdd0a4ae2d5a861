"""The host side of the NKAT CuPy path, measured without a GPU (``bench.py nkat``).

:class:`NullCupy` stands in for the few CuPy calls the job makes: kernels return at once,
buffers are NumPy arrays of the real shapes and dtypes, the record copy writes the pinned
buffer. What is left is everything the host does per batch: probes, launches, the copy,
the wait, decoding the record into exact sums, the merge, and the runner's own work.

    figures = host_cap()   # {"gpu_host_cap_dims_per_s": ..., ...}

Batches are sized as the adaptive policy sizes them on a GPU: each batch takes
max(host time, device time) with the device at MODEL_DEVICE_DIMS_PER_S, and
``BatchSizer`` grows the batch until doubling stops paying; the figure is the dims of
such a batch over the host seconds per batch of the whole runner loop driving them.
"""

from __future__ import annotations

import queue
import time
import types
from typing import Any

import numpy as np

from nkat.worker.backend import Backend
from nkat.worker.batching import BatchSizer
from nkat.worker.failpoints import Failpoints
from nkat.worker.heartbeat import Board
from nkat.worker.jobs.nkat_highdim import NkatHighDim
from nkat.worker.runtime import Runner
from nkat.worker.settings import Settings

#: A guess at an H200's float64 rate for this kernel (a log, two divisions and a few
#: multiply-adds per N): only the batch size depends on it.
MODEL_DEVICE_DIMS_PER_S = 5e11
#: A default checkpoint interval: batches stay under a quarter of it (and 1 s).
CHECKPOINT_INTERVAL = 30.0


class _Array:
    def __init__(self, host: np.ndarray) -> None:
        self.host = host
        self.size = host.size

    def __getitem__(self, key: Any) -> _Array:
        return _Array(self.host[key])

    def get(self, stream: Any = None, out: np.ndarray | None = None,
            blocking: bool = True) -> np.ndarray:
        if out is None:
            return self.host.copy()
        out[...] = self.host
        return out


class _Stream:
    def __init__(self, non_blocking: bool = False) -> None:
        pass

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Event:
    def record(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _Module:
    def __init__(self, code: str, options: tuple[str, ...]) -> None:
        pass

    def get_function(self, name: str) -> Any:
        def kernel(grid: tuple[int], block: tuple[int], args: tuple[Any, ...]) -> None:
            pass
        return kernel


def null_cupy() -> Any:
    """A module with the CuPy calls ``nkat_cuda`` makes, doing no device work."""
    xp = types.ModuleType("null_cupy")
    xp.int64, xp.float64 = np.int64, np.float64  # type: ignore[attr-defined]
    xp.empty = lambda n, dtype: _Array(np.zeros(n, dtype=dtype))  # type: ignore[attr-defined]
    xp.asarray = lambda a: _Array(np.asarray(a))  # type: ignore[attr-defined]
    xp.RawModule = _Module  # type: ignore[attr-defined]
    xp.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        Stream=_Stream, Event=_Event, alloc_pinned_memory=lambda n: bytearray(n))
    return xp


class _NullBackend(Backend):
    name = "null"
    device = "null device"

    def __init__(self, xp: Any) -> None:
        self.xp = xp


class _QuietLink:
    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def log(self, level: str, event: str, fields: Any) -> None:
        pass

    def extend(self, seconds: float, reason: str) -> None:
        pass

    def beat_now(self) -> None:
        pass

    def post_ckpt(self, *args: Any) -> None:
        raise AssertionError("no checkpoints here")


class _LoopOnly(Runner):
    """The runner's batch loop; finalize, once a run, is not per-batch host work."""

    def _finalize(self, wall_seconds: float) -> dict[str, Any]:
        return {}


def _runner_seconds(xp: Any, size: int, batches: int) -> float:
    """Host seconds per batch of the whole runner loop: launch, prefetch, wait, decode,
    merge, bookkeeping."""
    unit_dims = 1 << 16
    job = NkatHighDim({"max_dimension": size * batches * unit_dims, "unit_dims": unit_dims})
    runner = _LoopOnly(job, _NullBackend(xp), Settings(batch_size=size, batch_size_adaptive=False),
                    _QuietLink(), Board(), Failpoints([], 1), epoch=1, spec_hash="bench",
                    checkpoints=False)
    start = time.perf_counter()
    runner.run()
    return (time.perf_counter() - start) / batches


def host_cap(quick: bool = False) -> dict[str, Any]:
    xp = null_cupy()
    params = {"max_dimension": 10**15, "unit_dims": 1 << 16, "curve_points": 512}
    job = NkatHighDim(params)
    sizer = BatchSizer(NkatHighDim.default_batch_units, adaptive=True,
                       units_total=job.units_total(),
                       max_seconds=min(1.0, CHECKPOINT_INTERVAL / 4))
    # The host's time per batch hardly depends on the batch (no per-unit host work): one
    # steady figure keeps the simulated policy from chasing this shared machine's noise.
    host = _runner_seconds(xp, 1024, 30 if quick else 100)
    for _ in range(64):  # more than enough doublings to settle (the first is warm-up)
        device = sizer.size * job.unit_dims / MODEL_DEVICE_DIMS_PER_S
        sizer.observe(sizer.size, max(host, device), headroom=True)
    size = sizer.size
    host = _runner_seconds(xp, size, 50 if quick else 300)
    dims = size * job.unit_dims
    return {
        "gpu_host_cap_dims_per_s": round(dims / host),
        "gpu_host_batch_units": size,
        "gpu_host_batch_seconds": round(host, 6),
        "gpu_host_model_device_dims_per_s": MODEL_DEVICE_DIMS_PER_S,
    }
