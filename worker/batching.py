"""How many units the next batch gets: a small policy, pure and clock-free.

Start from the configured size. When adaptive, double while batches are shorter than
``MIN_BATCH_SECONDS`` and throughput does not fall (a GPU that is already saturated still
gains from longer batches: fewer launches, and the host's per-batch work hidden behind
the device's), then while throughput improves by more than ``GROWTH_GAIN``, as long as
batches stay short (``max_seconds``: at most MAX_BATCH_SECONDS
and a quarter of the checkpoint interval, so commands, checkpoints and the watchdog never
wait long for a batch); halve on OOM or memory pressure and never grow back to a size
that ran out of memory. A GPU folds a batch on the device and hands back one small
record, so its batches may grow to millions of units. The unit, not the batch, defines the result,
so every size is correct: this only trades speed against memory and responsiveness.
"""

from __future__ import annotations

import math

#: A doubling must raise units/s by more than this factor to be kept growing ...
GROWTH_GAIN = 1.05
#: ... unless batches are shorter than this: then it only must not lower units/s by more
#: than SHORT_TOLERANCE.
MIN_BATCH_SECONDS = 0.1
SHORT_TOLERANCE = 0.05
#: Commands and checkpoints wait for the batch in progress, so batches stay this short.
MAX_BATCH_SECONDS = 1.0
#: Hard cap on a batch, whatever the timings say (a GPU kernel takes one block a unit).
MAX_BATCH_UNITS = 1 << 24


class BatchSizer:
    """The batch size and the evidence for changing it (fed by the compute loop)."""

    def __init__(self, initial: int, *, adaptive: bool, units_total: int,
                 max_seconds: float = MAX_BATCH_SECONDS) -> None:
        self.size = max(1, initial)
        self.max_seconds = max_seconds
        #: Growth stops here; an OOM lowers it below the size that failed.
        self.cap = max(self.size, min(MAX_BATCH_UNITS, units_total))
        self._growing = adaptive
        self._warm = False
        self._best: tuple[int, float] | None = None  # (size, units/s) before the last doubling

    def observe(self, units: int, seconds: float, *, headroom: bool) -> bool:
        """Record a finished batch; True when the size changed."""
        if not self._growing or units != self.size or seconds <= 0:
            return False
        if not self._warm:
            # The first batch pays one-off costs (imports, kernel compilation): not evidence.
            self._warm = True
            return False
        rate = units / seconds
        short = seconds < MIN_BATCH_SECONDS
        if self._best is not None:
            best = self._best[1]
            worse = rate < best * (1 - SHORT_TOLERANCE) if short else rate <= best * GROWTH_GAIN
            if worse:
                # The last doubling did not pay: settle on the better of the sizes.
                self._growing = False
                if rate < best:
                    self.size = self._best[0]
                    return True
                return False
        if not short or self._best is None or rate > self._best[1]:
            self._best = (self.size, rate)
        if self.size * 2 > self.cap or seconds * 2 > self.max_seconds or not headroom:
            self._growing = False
            return False
        self.size *= 2
        return True

    def shrink(self, failed_size: int) -> int:
        """A batch of ``failed_size`` ran out of memory (or memory is short): halve, and
        keep every later batch below it. Returns the new size."""
        self.size = max(1, failed_size // 2)
        self.cap = max(1, min(self.cap, failed_size - 1))
        return self.size


class UnitTimes:
    """Quantiles of seconds per unit over a process's batches, in O(1) memory.

    A log-spaced histogram (0.37 % per bin) of each batch's time divided by its units,
    weighted by the units. Its low quantiles give the rate of the fastest batches, which
    a host that switches between speeds (shared cores, frequency scaling) moves far less
    than it moves a whole run's average.
    """

    _LOW, _HIGH, _BINS = 1e-9, 1e4, 8192

    def __init__(self) -> None:
        self._counts = [0] * self._BINS
        self._total = 0
        self._scale = (self._BINS - 1) / math.log(self._HIGH / self._LOW)

    def add(self, seconds: float, units: int) -> None:
        if units <= 0 or seconds <= 0:
            return
        per_unit = min(max(seconds / units, self._LOW), self._HIGH)
        self._counts[int(math.log(per_unit / self._LOW) * self._scale)] += units
        self._total += units

    def quantile(self, q: float) -> float | None:
        """Seconds per unit at quantile ``q`` (bin centre), or None before any batch."""
        if not self._total:
            return None
        target, seen = q * self._total, 0
        for index, count in enumerate(self._counts):
            seen += count
            if seen >= target and count:
                return self._LOW * math.exp((index + 0.5) / self._scale)
        return self._HIGH
