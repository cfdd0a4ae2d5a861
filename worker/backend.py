"""Array backends: NumPy or CuPy, chosen once at start (docs/architecture.md).

CuPy is imported only when it is chosen. Everything the runtime needs from the device
(the memory pool limit, freeing pools, telling OOM and sticky CUDA errors apart, memory
figures) goes through :class:`Backend`, so the compute loop never names cupy.

    backend = select_backend("auto")      # CupyBackend if usable, else NumpyBackend
    backend.fallback                      # why auto did not get CuPy ("" if it did)
    backend.set_memory_limit(10240, 512)  # MB; no-op on NumPy
    pending = job.compute_batch(backend.xp, first, count)
"""

from __future__ import annotations

import importlib
import resource
import sys
from typing import Any

#: CUDA runtime/driver statuses after which the context is unusable (same numbers in
#: both APIs): ECC and NVLink uncorrectable, illegal address, launch timeout, device
#: assert, hardware stack, illegal instruction, misaligned address, invalid address
#: space, invalid PC, launch failure. Only a new process recovers from these.
STICKY_CUDA_STATUSES = frozenset({214, 220, 700, 702, 710, 714, 715, 716, 717, 718, 719})

BACKENDS = ("auto", "numpy", "cupy")


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot be used here."""


class StickyDeviceError(RuntimeError):
    """A CUDA error that leaves this process's context unusable (also the failpoint's)."""


class Backend:
    """NumPy on the host: the default, and the behaviour every backend starts from."""

    name = "numpy"
    device = "cpu"
    #: Seconds the first batch may take beyond a normal one (kernel compilation); 0 = none.
    warmup_seconds = 0.0
    oom_errors: tuple[type[BaseException], ...] = (MemoryError,)
    #: Why ``auto`` settled for this backend ("" when it was asked for by name).
    fallback = ""

    def __init__(self) -> None:
        import numpy

        self.xp: Any = numpy

    def set_memory_limit(self, limit_mb: float, reserve_mb: float) -> None:
        """Host memory is not pooled: nothing to limit."""

    def free_pools(self) -> None:
        """Host memory is returned by the allocator itself."""

    def is_sticky(self, exc: BaseException) -> bool:
        return isinstance(exc, StickyDeviceError)

    def device_bytes(self) -> int:
        """Device memory held now (0 on the host)."""
        return 0

    def peak_memory_bytes(self) -> int:
        """Peak resident memory of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024

    def has_headroom(self, factor: float) -> bool:
        """Whether memory now in use could grow ``factor``-fold; the host cannot tell
        cheaply, so growth is allowed and an OOM shrinks it back."""
        return True

    def sample(self) -> None:
        """Called after each batch to track peaks the device does not keep itself."""


class CupyBackend(Backend):
    """CuPy on the current CUDA device, its memory pool limited and freed on request."""

    name = "cupy"
    warmup_seconds = 120.0

    def __init__(self) -> None:
        try:
            cupy = importlib.import_module("cupy")
        except Exception as exc:  # a broken CUDA install fails in many ways at import
            raise BackendUnavailable(f"cupy does not import: {exc}") from exc
        try:
            available = bool(cupy.cuda.is_available())
        except Exception as exc:
            raise BackendUnavailable(f"cupy cannot query CUDA: {exc}") from exc
        if not available:
            raise BackendUnavailable("cupy imports but no CUDA device is available")
        self.xp = cupy
        self._pool = cupy.get_default_memory_pool()
        self._pinned = cupy.get_default_pinned_memory_pool()
        device_id = cupy.cuda.Device().id
        name = cupy.cuda.runtime.getDeviceProperties(device_id)["name"]
        self.device = name.decode() if isinstance(name, bytes) else str(name)
        self.oom_errors = (cupy.cuda.memory.OutOfMemoryError, MemoryError)
        self._cuda_errors = (cupy.cuda.runtime.CUDARuntimeError, cupy.cuda.driver.CUDADriverError)
        self._peak = 0

    def set_memory_limit(self, limit_mb: float, reserve_mb: float) -> None:
        """Limit the pool to ``limit_mb`` less ``reserve_mb``, or to the device total less
        the reserve when no limit is set."""
        if limit_mb <= 0 and reserve_mb <= 0:
            return
        mib = 1024 * 1024
        if limit_mb > 0:
            limit = int((limit_mb - reserve_mb) * mib)
        else:
            _, total = self.xp.cuda.runtime.memGetInfo()
            limit = int(total - reserve_mb * mib)
        self._pool.set_limit(size=max(limit, mib))

    def free_pools(self) -> None:
        self._pool.free_all_blocks()
        self._pinned.free_all_blocks()

    def is_sticky(self, exc: BaseException) -> bool:
        if isinstance(exc, StickyDeviceError):
            return True
        return isinstance(exc, self._cuda_errors) and \
            getattr(exc, "status", None) in STICKY_CUDA_STATUSES

    def device_bytes(self) -> int:
        return int(self._pool.total_bytes())

    def peak_memory_bytes(self) -> int:
        return max(self._peak, self.device_bytes())

    def has_headroom(self, factor: float) -> bool:
        held = self._pool.total_bytes()
        limit = self._pool.get_limit()
        if limit:
            return bool(held * factor <= limit)
        free, _ = self.xp.cuda.runtime.memGetInfo()
        return bool(held * (factor - 1) <= free + self._pool.free_bytes())

    def sample(self) -> None:
        # The pool keeps freed blocks, so its size right after a batch is that batch's peak.
        self._peak = max(self._peak, self.device_bytes())


def select_backend(requested: str) -> Backend:
    """``numpy``, ``cupy`` (or BackendUnavailable: never another backend instead), or
    ``auto``: CuPy when usable, else NumPy with ``fallback`` saying why."""
    if requested == "numpy":
        return Backend()
    if requested == "cupy":
        return CupyBackend()
    if requested == "auto":
        try:
            return CupyBackend()
        except BackendUnavailable as exc:
            host = Backend()
            host.fallback = str(exc)
            return host
    raise BackendUnavailable(f"unknown backend {requested!r}: use one of {', '.join(BACKENDS)}")
