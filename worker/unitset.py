"""Which units a state covers: disjoint half-open ranges, kept sorted and merged.

A job whose partials merge in any order (batches, threads, shards) records the units it
has folded in, so that merging the same unit twice, or finalizing with one missing, is
an error that names the units rather than a silently wrong result.

    done = UnitSet()
    done.add(0, 32); done.add(64, 96); done.add(32, 64)
    done.ranges == [(0, 96)]; done.covers(0, 96)
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence


class UnitSet:
    def __init__(self, ranges: Iterable[Sequence[int]] = ()) -> None:
        self.ranges: list[tuple[int, int]] = []
        for first, stop in ranges:
            self.add(int(first), int(stop))

    def add(self, first: int, stop: int) -> None:
        """Add units [first, stop); raise ValueError if any is already in."""
        if first >= stop:
            return
        at = bisect.bisect_left(self.ranges, (first, stop))
        before = self.ranges[at - 1] if at else None
        after = self.ranges[at] if at < len(self.ranges) else None
        if (before and before[1] > first) or (after and after[0] < stop):
            clash = before if before and before[1] > first else after
            raise ValueError(f"units [{first}, {stop}) overlap units {list(clash or ())} "
                             "already merged")
        if before and before[1] == first:
            first = before[0]
            at -= 1
            del self.ranges[at]
        if after and after[0] == stop:
            stop = after[1]
            del self.ranges[at]
        self.ranges.insert(at, (first, stop))

    def update(self, other: UnitSet) -> None:
        for first, stop in other.ranges:
            self.add(first, stop)

    def count(self) -> int:
        return sum(stop - first for first, stop in self.ranges)

    def covers(self, first: int, stop: int) -> bool:
        """Whether exactly the units [first, stop) are in (an empty range: none at all)."""
        if first >= stop:
            return not self.ranges
        return self.ranges == [(first, stop)]

    def to_list(self) -> list[list[int]]:
        return [[first, stop] for first, stop in self.ranges]

    def __repr__(self) -> str:
        return f"UnitSet({self.to_list()})"
