"""Streaming moments: Chan's combination against direct numpy, compensated and plain."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nkat.worker.jobs.streaming import Moments, RangeMoments, two_sum


def _blocks(values: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    return [b for b in np.split(values, sorted(set(cuts))) if b.size]


def _moments(block: np.ndarray) -> Moments:
    mean = float(block.mean())
    return Moments(block.size, mean, 0.0, float(((block - mean) ** 2).sum()))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 400),
       cuts=st.lists(st.integers(0, 400), max_size=12), compensated=st.booleans())
def test_chan_combination_matches_direct_moments(seed, size, cuts, compensated):
    values = np.random.default_rng(seed).normal(3.0, 0.5, size)
    total = Moments()
    for block in _blocks(values, cuts):
        total.add(_moments(block), compensated)
    assert total.n == size
    assert total.value() == pytest.approx(values.mean(), rel=1e-14)
    assert total.variance() == pytest.approx(values.var(), rel=1e-10, abs=1e-15)


def test_compensated_mean_stays_exact_over_many_blocks():
    # A large offset with a small spread, split into many blocks: the plain running mean
    # rounds at every merge, the compensated one does not.
    rng = np.random.default_rng(7)
    values = 1e8 + rng.random(20000)
    exact = float(sum(Fraction(v) for v in values.tolist()) / len(values))
    plain, comp = Moments(), Moments()
    for block in np.split(values, 2000):
        plain.add(_moments(block), compensated=False)
        comp.add(_moments(block), compensated=True)
    assert abs(comp.value() - exact) <= abs(plain.value() - exact)
    assert abs(comp.value() - exact) <= 2 * np.spacing(exact)


def test_two_sum_is_exact():
    s, e = two_sum(1.0, 1e-17)
    assert (s, e) == (1.0, 1e-17)
    s, e = two_sum(0.1, 0.2)
    assert Fraction(s) + Fraction(e) == Fraction(0.1) + Fraction(0.2)


@pytest.mark.parametrize("compensated", [False, True])
def test_range_moments_slope_matches_least_squares(compensated):
    x = np.arange(5, 1205)
    y = 0.3 + 1e-3 * x + np.sin(x / 50.0)
    total = RangeMoments()
    for start in range(0, x.size, 97):
        xs, ys = x[start:start + 97], y[start:start + 97]
        c = float(((xs - xs.mean()) * (ys - ys.mean())).sum())
        total.add(RangeMoments(int(xs[0]), int(xs[-1]), _moments(ys), c), compensated)
    assert (total.first, total.last) == (5, 1204)
    assert total.slope() == pytest.approx(np.polyfit(x, y, 1)[0], rel=1e-12)


def test_range_moments_refuses_a_gap():
    total = RangeMoments(1, 10, Moments(10, 1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="does not follow"):
        total.add(RangeMoments(12, 20, Moments(9, 1.0, 0.0, 0.0)), compensated=False)


def test_single_point_has_no_slope():
    assert RangeMoments(3, 3, Moments(1, 2.0, 0.0, 0.0)).slope() is None


def test_round_trip_through_lists_is_exact():
    m = RangeMoments(1, 9, Moments(9, 0.1, 1e-18, 2.5, -3e-17), 0.7, 1e-17)
    again = RangeMoments.from_list(m.to_list())
    assert again.to_list() == m.to_list()
