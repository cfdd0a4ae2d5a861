"""UnitTimes: low quantiles of seconds per unit, in bounded memory, weighted by units."""

from __future__ import annotations

import random

import pytest

from nkat.worker.batching import UnitTimes


def test_quantiles_follow_the_batches_within_a_bin():
    times = UnitTimes()
    assert times.quantile(0.1) is None
    rng = random.Random(3)
    # A host with two speeds: 40 % of batches at 13 ms, the rest at 19 ms (32 units each).
    for _ in range(1000):
        times.add(0.013 if rng.random() < 0.4 else 0.019, 32)
    fast, median = times.quantile(0.10), times.quantile(0.50)
    assert fast == pytest.approx(0.013 / 32, rel=0.02)
    assert median == pytest.approx(0.019 / 32, rel=0.02)


def test_units_weigh_and_nonsense_is_ignored():
    times = UnitTimes()
    times.add(1.0, 1)       # one slow unit ...
    times.add(0.5, 99)      # ... and 99 fast ones in one batch
    times.add(0.0, 5)       # no time: ignored
    times.add(1.0, 0)       # no units: ignored
    assert times.quantile(0.5) == pytest.approx(0.5 / 99, rel=0.02)
    assert times.quantile(1.0) == pytest.approx(1.0, rel=0.02)
