"""Streaming moments for jobs: Chan's parallel combination, plain or compensated.

A job folds per-unit statistics into O(1) state. Combining (count, mean, M2) pairs with
Chan, Golub and LeVeque's update is numerically sound where the textbook running sums
Σx, Σx² are not (they cancel catastrophically when the spread is small next to the mean).

    total = Moments()
    for part in parts:                      # each a Moments of one block, in order
        total.add(part, compensated=False)
    total.mean, total.variance()

With ``compensated=True`` every running quantity carries a low-order word: each update's
rounding error (found exactly with Knuth's TwoSum) is accumulated instead of dropped, so
the error no longer grows with the number of blocks merged.
"""

from __future__ import annotations

from typing import Any


def two_sum(a: float, b: float) -> tuple[float, float]:
    """``(s, e)`` with ``s = fl(a + b)`` and ``a + b == s + e`` exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _accumulate(hi: float, lo: float, x: float) -> tuple[float, float]:
    """Add ``x`` to the double-word ``hi + lo``, keeping the rounding error in ``lo``."""
    hi, err = two_sum(hi, x)
    lo += err
    # Renormalise so hi keeps holding the value rounded to one word.
    return two_sum(hi, lo)


class Moments:
    """Count, mean and second central moment (M2 = Σ(x − mean)²) of a stream."""

    __slots__ = ("n", "mean", "mean_lo", "m2", "m2_lo")

    def __init__(self, n: int = 0, mean: float = 0.0, mean_lo: float = 0.0,
                 m2: float = 0.0, m2_lo: float = 0.0) -> None:
        self.n = n
        self.mean = mean
        self.mean_lo = mean_lo
        self.m2 = m2
        self.m2_lo = m2_lo

    def add(self, other: Moments, compensated: bool) -> None:
        """Fold ``other`` (the next block of the stream) into this one."""
        if other.n == 0:
            return
        if self.n == 0:
            self.n, self.mean, self.mean_lo = other.n, other.mean, other.mean_lo
            self.m2, self.m2_lo = other.m2, other.m2_lo
            return
        na, nb = self.n, other.n
        n = na + nb
        delta = (other.mean - self.mean) + (other.mean_lo - self.mean_lo)
        share = nb / n
        spread = delta * delta * na * share
        if compensated:
            self.mean, self.mean_lo = _accumulate(self.mean, self.mean_lo, delta * share)
            self.m2, self.m2_lo = _accumulate(self.m2, self.m2_lo, other.m2)
            self.m2, self.m2_lo = _accumulate(self.m2, self.m2_lo, spread + other.m2_lo)
        else:
            self.mean += delta * share
            self.m2 += other.m2 + spread
        self.n = n

    def variance(self) -> float | None:
        """Population variance, or None for an empty stream."""
        if self.n == 0:
            return None
        return max(self.m2 + self.m2_lo, 0.0) / self.n

    def value(self) -> float | None:
        """The mean rounded to one float, or None for an empty stream."""
        return self.mean + self.mean_lo if self.n else None

    def to_list(self) -> list[Any]:
        return [self.n, self.mean, self.mean_lo, self.m2, self.m2_lo]

    @classmethod
    def from_list(cls, data: list[Any]) -> Moments:
        n, mean, mean_lo, m2, m2_lo = data
        return cls(int(n), float(mean), float(mean_lo), float(m2), float(m2_lo))


class RangeMoments:
    """Moments of y over a contiguous integer range of x, with the co-moment Σ(x − x̄)(y − ȳ).

    x is a coordinate such as the dimension N, each value once: a block is known by its
    first and last x, so its mean and its spread (n(n² − 1)/12) are exact, and blocks
    must arrive in order and adjacent, which ``add`` checks.
    """

    __slots__ = ("first", "last", "y", "c", "c_lo")

    def __init__(self, first: int = 0, last: int = -1, y: Moments | None = None,
                 c: float = 0.0, c_lo: float = 0.0) -> None:
        self.first = first
        self.last = last
        self.y = y if y is not None else Moments()
        self.c = c
        self.c_lo = c_lo

    @property
    def n(self) -> int:
        return self.y.n

    def add(self, other: RangeMoments, compensated: bool) -> None:
        """Fold ``other``, the block that starts right after this one, into it."""
        if other.n == 0:
            return
        if self.n == 0:
            self.first, self.last = other.first, other.last
            self.y = Moments(*other.y.to_list())
            self.c, self.c_lo = other.c, other.c_lo
            return
        if other.first != self.last + 1:
            raise ValueError(f"block {other.first}..{other.last} does not follow "
                             f"{self.first}..{self.last}")
        na, nb = self.n, other.n
        # Twice each mean is an integer, so the difference of means is exact.
        dx = ((other.first + other.last) - (self.first + self.last)) / 2
        dy = (other.y.mean - self.y.mean) + (other.y.mean_lo - self.y.mean_lo)
        cross = dx * dy * na * (nb / (na + nb))
        if compensated:
            self.c, self.c_lo = _accumulate(self.c, self.c_lo, other.c)
            self.c, self.c_lo = _accumulate(self.c, self.c_lo, cross + other.c_lo)
        else:
            self.c += other.c + cross
        self.last = other.last
        self.y.add(other.y, compensated)

    def slope(self) -> float | None:
        """Least-squares slope of y over x, or None with fewer than two points."""
        n = self.n
        if n < 2:
            return None
        return (self.c + self.c_lo) / (n * (n * n - 1) / 12)

    def to_list(self) -> list[Any]:
        return [self.first, self.last, self.y.to_list(), self.c, self.c_lo]

    @classmethod
    def from_list(cls, data: list[Any]) -> RangeMoments:
        first, last, y, c, c_lo = data
        return cls(int(first), int(last), Moments.from_list(y), float(c), float(c_lo))
