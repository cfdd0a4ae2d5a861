"""Failpoints: faults a test can plant in a worker through ``NKAT_FAILPOINTS`` (like gofail).

Never active unless that variable is set. Its value is a ``;``-separated list of entries
``KIND[@ITEM[:ITEM]...]``, each ITEM ``key=value`` or the word ``start``:

    crash@unit=50:code=1          exit at once with that code (default 1)
    crash@unit=50:signal=SIGKILL  kill itself with that signal (name or number)
    hang_gil@unit=30              block forever in a C call that keeps the GIL: beats stop
    hang_nogil@unit=30            block forever in a C call that releases the GIL: beats
                                  go on, progress_seq stays frozen
    stall@unit=10:seconds=5       like hang_nogil for that long (default 5), then go on
    oom@unit=20:times=1           raise MemoryError, as an out-of-memory allocation would
    cuda_sticky@unit=40           raise a CUDA-style sticky error (illegal address)
    error@unit=40                 raise RuntimeError, as a buggy job would
    ignore_sigterm                ignore SIGTERM from the start (no trigger)
    crawl@seconds=0.002           every batch takes that much longer per unit in it, as on
                                  a slower device (no trigger; beats go on)

A trigger is ``unit=K``: the failpoint fires when a batch containing unit K is about to
be computed (before it is merged), or ``start``: before ``hello`` (crash, hang_*, stall
only). ``epoch=E`` limits it to epoch E (a standalone run counts as epoch 1); without
it, it fires in every epoch that computes unit K, so not after a resume past K.
``times=N`` (default 1) is how often it may fire in one process, e.g. so an OOM repeats
at smaller batches. ``crawl`` takes ``seconds`` and ``epoch`` only: it paces a run in wall
time without spending CPU on a bigger job.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import signal
import sys
import time

from nkat.worker.backend import StickyDeviceError

ENV = "NKAT_FAILPOINTS"

KINDS = frozenset({"crash", "hang_gil", "hang_nogil", "stall", "oom", "cuda_sticky", "error",
                   "ignore_sigterm", "crawl"})
_AT_START = frozenset({"crash", "hang_gil", "hang_nogil", "stall"})
_KEYS = {
    "crash": {"code", "signal"},
    "stall": {"seconds"},
    "crawl": {"seconds"},
}
_COMMON_KEYS = {"unit", "epoch", "times"}


class FailpointError(ValueError):
    """NKAT_FAILPOINTS does not parse."""


@dataclasses.dataclass
class Failpoint:
    kind: str
    unit: int | None = None  # None: fires at start
    epoch: int | None = None
    times: int = 1
    code: int = 1
    signal: int | None = None
    seconds: float = 5.0


class Failpoints:
    """The failpoints planted in this process, for its epoch."""

    def __init__(self, points: list[Failpoint], epoch: int) -> None:
        self._points = [p for p in points if p.epoch is None or p.epoch == epoch]

    @property
    def points(self) -> tuple[Failpoint, ...]:
        """The failpoints of this epoch, in the order given."""
        return tuple(self._points)

    @classmethod
    def parse(cls, text: str, epoch: int) -> Failpoints:
        return cls([_parse_entry(e.strip()) for e in text.split(";") if e.strip()], epoch)

    def install(self) -> None:
        """Apply the process-wide ones (ignore_sigterm), then fire the ``start`` ones."""
        for point in self._points:
            if point.kind == "ignore_sigterm":
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for point in self._points:
            if point.kind in _AT_START and point.unit is None and point.times > 0:
                point.times -= 1
                _fire(point, "start")

    def before_batch(self, first: int, count: int) -> None:
        """Fire the failpoints whose unit is in [first, first + count)."""
        for point in self._points:
            if point.unit is not None and first <= point.unit < first + count \
                    and point.times > 0:
                point.times -= 1
                _fire(point, f"unit {point.unit}")

    def crawl(self, count: int) -> None:
        """Sleep as a slower device would over ``count`` units: called inside the batch's
        timing, so the batch sizer sees the device as that slow."""
        for point in self._points:
            if point.kind == "crawl":
                time.sleep(point.seconds * count)


def _parse_entry(entry: str) -> Failpoint:
    kind, _, rest = entry.partition("@")
    kind = kind.strip()
    if kind not in KINDS:
        raise FailpointError(f"failpoint {entry!r}: unknown kind {kind!r} "
                             f"(one of {', '.join(sorted(KINDS))})")
    point = Failpoint(kind)
    items = [i.strip() for i in rest.split(":")] if rest else []
    if kind == "ignore_sigterm":
        if items:
            raise FailpointError(f"failpoint {entry!r}: ignore_sigterm takes no trigger")
        return point
    at_start = False
    for item in items:
        if item == "start":
            at_start = True
            continue
        key, eq, value = item.partition("=")
        if not eq or key not in _COMMON_KEYS | _KEYS.get(kind, set()):
            raise FailpointError(f"failpoint {entry!r}: unexpected {item!r}")
        try:
            if key == "signal":
                point.signal = _parse_signal(value)
            elif key == "seconds":
                point.seconds = float(value)
            else:
                setattr(point, key, int(value))
        except ValueError:
            raise FailpointError(f"failpoint {entry!r}: bad value in {item!r}") from None
    if kind == "crawl":
        given = {item.partition("=")[0] for item in items}
        if at_start or not given <= {"seconds", "epoch"} or "seconds" not in given:
            raise FailpointError(f"failpoint {entry!r}: crawl takes seconds=S (per unit) "
                                 "and epoch=E only")
    elif at_start == (point.unit is not None):
        raise FailpointError(f"failpoint {entry!r}: needs exactly one trigger, "
                             "unit=K or start")
    if at_start and kind not in _AT_START:
        raise FailpointError(f"failpoint {entry!r}: {kind} cannot fire at start")
    if (point.unit or 0) < 0 or point.times < 1 or not 0 <= point.seconds < math.inf:
        raise FailpointError(f"failpoint {entry!r}: values out of range")
    return point


def _parse_signal(value: str) -> int:
    if value.isdigit():
        return int(value)
    name = value.upper() if value.upper().startswith("SIG") else "SIG" + value.upper()
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ValueError(value) from None


def _fire(point: Failpoint, where: str) -> None:
    # stderr, not a log message: the supervisor captures it even if we die at once.
    print(f"nkat.worker: failpoint {point.kind} fired at {where}", file=sys.stderr, flush=True)
    if point.kind == "crash":
        if point.signal is not None:
            os.kill(os.getpid(), point.signal)
            time.sleep(1.0)  # a caught or ignored signal falls through to the exit code
        os._exit(point.code)
    elif point.kind == "hang_gil":
        # A PyDLL call keeps the GIL for its whole duration, as a C extension stuck in a
        # loop without releasing it would: no other Python thread runs, so no beats.
        holding = ctypes.PyDLL(None)
        while True:
            holding.sleep(3600)
    elif point.kind == "hang_nogil":
        # The same call through CDLL releases the GIL: the I/O thread keeps beating.
        releasing = ctypes.CDLL(None)
        while True:
            releasing.sleep(3600)
    elif point.kind == "stall":
        time.sleep(point.seconds)
    elif point.kind == "oom":
        raise MemoryError(f"failpoint oom at {where}")
    elif point.kind == "cuda_sticky":
        raise StickyDeviceError(
            f"failpoint cuda_sticky at {where}: cudaErrorIllegalAddress (700): "
            "an illegal memory access was encountered")
    elif point.kind == "error":
        raise RuntimeError(f"failpoint error at {where}")
