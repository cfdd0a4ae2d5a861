"""The nkat-highdim job: its numbers, its counting, its params, its state and its result."""

import dataclasses
import json
import math
import tracemalloc

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nkat.worker.job import JobParamsError, RunContext, resolve_job
from nkat.worker.jobs import nkat_kernels as nk
from nkat.worker.jobs.nkat_highdim import EvenGrid, NkatHighDim, reference_s

CONTEXT = RunContext(backend="numpy", device="cpu", epochs=2, restarts=1,
                     compute_seconds=1.5, peak_memory_bytes=3 * 2**30, spec_hash="f00d")


def advance(job: NkatHighDim, until: int, schedule: list[int], start: int = 0) -> int:
    """Compute and merge units up to ``until`` with batch sizes cycling ``schedule``."""
    done, i = job.done.count(), start
    while done < until:
        count = min(schedule[i % len(schedule)], until - done)
        job.merge_batch(done, count, job.compute_batch(np, done, count).wait())
        done += count
        i += 1
    return i


def run(params: dict, schedule: list[int] | None = None) -> tuple[NkatHighDim, dict]:
    job = NkatHighDim(params)
    advance(job, job.units_total(), schedule or [NkatHighDim.default_batch_units])
    return job, job.finalize(CONTEXT)


def canonical(job: NkatHighDim, result: dict) -> bytes:
    return json.dumps(job.deterministic_result(result), sort_keys=True,
                      allow_nan=False).encode()


def reference(lo: int, hi: int):
    """S, c and q over [lo, hi] in plain float64, the whole range at once."""
    n = np.arange(lo, hi + 1, dtype=np.float64)
    lg = np.log(n / nk.NC)
    fade = np.exp(-nk.DELTA * (n - nk.NC))
    tail = nk.C2 * lg**2 / n**2 + nk.C3 * lg**3 / n**3
    s = 1 + nk.GAMMA * lg * (1 - fade) + tail
    s_inf = 1 + nk.GAMMA * lg
    c = 1 - np.abs(s - s_inf) / s_inf
    # q from the difference itself: S − S∞ as a subtraction loses the digits the
    # trend is made of once S∞ is large.
    q = np.abs(tail - nk.GAMMA * lg * fade) / s_inf
    return n, s, c, q


RANGES = [(1, 100_000, 1 << 16), (1, 250_000, 4096), (17, 40, 3), (20_000, 23_000, 100),
          (3, 70_000, 70_000)]


@pytest.mark.parametrize("mode", ["balanced", "precision"])
@pytest.mark.parametrize(("lo", "hi", "unit"), RANGES)
def test_matches_plain_float64_reference(lo, hi, unit, mode):
    _, r = run({"min_dimension": lo, "max_dimension": hi, "unit_dims": unit,
                "precision_mode": mode})
    n, s, c, q = reference(lo, hi)
    summary, stats = r["summary"], r["statistics"]
    pattern = r["theoretical_validation"]["convergence_pattern"]
    assert summary["total_dimensions"] == n.size
    assert summary["average_convergence"] == pytest.approx(s.mean(), rel=1e-12)
    assert stats["std"] == pytest.approx(s.std(), rel=1e-12)
    assert summary["average_consistency"] == pytest.approx(c.mean(), rel=1e-14)
    assert summary["average_relative_deviation"] == pytest.approx(q.mean(), rel=1e-12)
    assert stats["consistency_std"] == pytest.approx(c.std(), rel=1e-9)
    # The kernel arranges the formula differently (tail by Horner, D added to S∞), so
    # single values may differ from the reference in the last bit or two.
    assert pattern["peak_dimension"] == int(n[np.argmax(s)])
    assert stats["minimum"]["dimension"] == int(n[np.argmin(s)])
    assert pattern["peak_value"] == pytest.approx(s.max(), rel=4e-16)
    assert stats["minimum"]["value"] == pytest.approx(s.min(), rel=4e-16)
    upper = s[n.size // 2:]
    assert stats["upper_half"]["count"] == upper.size
    assert stats["upper_half"]["std"] == pytest.approx(upper.std(), rel=1e-12, abs=1e-16)
    assert stats["lower_half"]["std"] == pytest.approx(s[:n.size // 2].std(), rel=1e-12)
    dn = n - n.mean()
    slope = -(dn * (q - q.mean())).sum() / (dn * dn).sum()
    trend = r["theoretical_validation"]["consistency_trend"]
    assert trend["slope"] == pytest.approx(slope, rel=1e-9)
    assert trend["improving"] == (slope > 0)


def test_speed_mode_is_float32_close():
    job, r = run({"max_dimension": 200_000, "precision_mode": "speed", "unit_dims": 5000})
    _, s, c, _ = reference(1, 200_000)
    assert r["precision"] == {"mode": "speed", "dtype": "float32"}
    assert r["summary"]["average_convergence"] == pytest.approx(s.mean(), rel=1e-6)
    assert r["statistics"]["std"] == pytest.approx(s.std(), rel=1e-5)
    assert r["summary"]["average_consistency"] == pytest.approx(c.mean(), rel=1e-6)
    assert r["theoretical_validation"]["convergence_pattern"]["peak_dimension"] == 200_000


def test_large_dimensions_stay_accurate():
    lo, hi = 10**12, 10**12 + 40_000
    _, r = run({"min_dimension": lo, "max_dimension": hi, "unit_dims": 8192})
    n, s, _, _ = reference(lo, hi)
    assert r["summary"]["average_convergence"] == pytest.approx(s.mean(), rel=1e-15)
    # S moves by only ~1e-8 here: its last bit is a noticeable part of the spread.
    assert r["statistics"]["std"] == pytest.approx(s.std(), rel=1e-6)
    assert r["theoretical_validation"]["convergence_pattern"]["peak_dimension"] == hi


@pytest.mark.parametrize("mode", ["speed", "balanced", "precision"])
def test_curve_values_agree_with_mpmath(mode):
    _, r = run({"min_dimension": 2, "max_dimension": 90_000, "curve_points": 40,
                "precision_mode": mode, "unit_dims": 10_000})
    curve = r["curve"]
    assert len(curve["N"]) == len(curve["S"]) == 40
    assert curve["N"][0] == 2 and curve["N"][-1] == 90_000
    assert curve["N"] == sorted(set(curve["N"]))
    tol = 3e-7 if mode == "speed" else 1e-15
    for n, s in zip(curve["N"], curve["S"], strict=True):
        exact = reference_s(n)
        assert float(abs(mpmath.mpf(s) - exact) / exact) < tol, n


def test_precision_mode_reports_mpmath_check():
    _, r = run({"max_dimension": 50_000, "precision_mode": "precision",
                "mpmath_samples": 33, "unit_dims": 4096})
    check = r["precision"]["mpmath"]
    assert r["precision"]["dtype"] == "float64"
    assert check["bits"] == 256
    assert check["samples"] == EvenGrid(1, 50_000, 33).values()
    assert 0 <= check["max_relative_error"] < 1e-15
    assert check["worst_dimension"] in check["samples"]


def test_asymptote_is_positive_for_every_integer_dimension():
    # The consistency divides by S∞; its root lies below N = 1, the smallest valid N.
    with mpmath.workprec(256):
        root = mpmath.mpf("17.2644") * mpmath.exp(-1 / mpmath.mpf("0.23422"))
        s_inf_1 = 1 + mpmath.mpf("0.23422") * mpmath.log(1 / mpmath.mpf("17.2644"))
    assert root < 1
    assert s_inf_1 > mpmath.mpf("0.33")


def test_consistency_is_defined_where_the_seed_gave_nan():
    job, r = run({"max_dimension": 5000, "unit_dims": 700})

    def leaves(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from leaves(v)
        elif isinstance(x, list):
            for v in x:
                yield from leaves(v)
        else:
            yield x

    floats = [v for v in leaves(job.deterministic_result(r)) if isinstance(v, float)]
    assert floats and all(math.isfinite(v) for v in floats)
    assert r["summary"]["average_consistency"] is not None


AWKWARD = [(5, 5, 7), (1, 1, 1), (1, 65_537, 1 << 16), (3, 10, 1), (7, 100, 7),
           (1, 1000, 999), (40, 41, 1 << 16), (1, 140_000, 1 << 17)]


@pytest.mark.parametrize(("lo", "hi", "unit"), AWKWARD)
def test_every_dimension_counted_once(lo, hi, unit):
    job = NkatHighDim({"min_dimension": lo, "max_dimension": hi, "unit_dims": unit})
    covered = [n for _, a, length in job._pieces(0, job.units_total())
               for n in range(a, a + length)]
    assert covered == list(range(lo, hi + 1))
    advance(job, job.units_total(), [3])
    r = job.finalize(CONTEXT)
    count = hi - lo + 1
    assert r["summary"]["total_dimensions"] == count
    assert r["statistics"]["upper_half"]["count"] == (count + 1) // 2
    assert r["statistics"]["lower_half"]["count"] == count // 2
    assert job.done.ranges == [(0, job.units_total())]


def test_single_dimension_has_no_trend():
    _, r = run({"min_dimension": 9, "max_dimension": 9})
    assert r["theoretical_validation"]["consistency_trend"]["slope"] is None
    assert r["theoretical_validation"]["consistency_trend"]["improving"] is None
    assert r["theoretical_validation"]["scaling_behavior"]["maintains_convergence"] is None
    assert r["theoretical_validation"]["scaling_behavior"]["high_dimension_stability"] == 1.0
    assert r["curve"] == {"N": [9], "S": [r["summary"]["peak_convergence"]]}


PARAMS = st.fixed_dictionaries({
    "min_dimension": st.integers(1, 30_000),
    "max_dimension": st.integers(0, 30_000),
    "unit_dims": st.sampled_from([1, 7, 512, 4096, 9000, 1 << 16, 70_000]),
    "precision_mode": st.sampled_from(["speed", "balanced", "precision"]),
    "curve_points": st.integers(2, 50),
    "mpmath_samples": st.integers(1, 5),
}).map(lambda p: {**p, "max_dimension": p["min_dimension"] + p["max_dimension"],
                  "unit_dims": max(p["unit_dims"], (p["max_dimension"] + 1) // 3000)})


@settings(max_examples=30, deadline=None)
@given(params=PARAMS, schedule=st.lists(st.integers(1, 40), min_size=1, max_size=5))
def test_batch_sizes_do_not_change_a_byte(params, schedule):
    whole, r1 = run(params, [10**9])
    batched, r2 = run(params, schedule)
    assert canonical(whole, r1) == canonical(batched, r2)
    assert whole.snapshot() == batched.snapshot()


@settings(max_examples=30, deadline=None)
@given(params=PARAMS, data=st.data())
def test_resume_from_snapshots_is_byte_identical(params, data):
    straight, r1 = run(params)
    total = straight.units_total()
    stops = sorted(data.draw(st.lists(st.integers(0, total), max_size=4), label="stops"))
    schedule = data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=4), label="batches")
    job, step = NkatHighDim(params), 0
    for stop in stops + [total]:
        step = advance(job, stop, schedule, step)
        blob = job.snapshot()
        job = NkatHighDim(params)  # a new worker: nothing survives but the snapshot
        job.restore(blob)
        assert job.snapshot() == blob
    assert canonical(job, job.finalize(CONTEXT)) == canonical(straight, r1)


def test_state_does_not_grow_with_the_range():
    sizes = {}
    for top in (10**5, 10**7):
        job = NkatHighDim({"max_dimension": top, "curve_points": 64})
        advance(job, 1, [1])
        first = len(job.snapshot())
        advance(job, job.units_total(), [32])
        sizes[top] = (first, len(job.snapshot()))
        assert all(b.size == nk.CHUNK for k in job._kernels for b in k._bufs)
    # Only the integer counters' encodings may widen: a few bytes, never per dimension.
    assert abs(sizes[10**7][1] - sizes[10**5][1]) <= 16
    assert sizes[10**7][1] < 64 * 9 + 1024


def test_peak_memory_is_flat_in_the_range():
    peaks = []
    for top in (10**6, 2 * 10**7):
        job = NkatHighDim({"max_dimension": top})
        tracemalloc.start()
        advance(job, job.units_total(), [NkatHighDim.default_batch_units])
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.1 * peaks[0] + 64 * 1024


def test_exp_left_out_where_it_is_zero_changes_no_bit(monkeypatch):
    params = {"min_dimension": 15_000, "max_dimension": 40_000, "unit_dims": 3000,
              "curve_points": 300}
    for mode in ("balanced", "speed"):
        skipping, r1 = run({**params, "precision_mode": mode})
        with monkeypatch.context() as m:
            m.setattr(nk, "exp_zero_from", lambda dtype: 10**18)
            computing, r2 = run({**params, "precision_mode": mode})
        assert computing._kernels[0].exp_from == 10**18
        assert canonical(skipping, r1) == canonical(computing, r2)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_exp_is_exactly_zero_from_the_cutoff(dtype):
    dt = np.dtype(dtype)
    start = nk.exp_zero_from(dtype)
    n = np.concatenate([np.arange(start, start + 100_000), [10**9, 10**15]]).astype(dt)
    e = np.exp((n - dt.type(nk.NC)) * -dt.type(nk.DELTA))
    assert not e.any()
    just_before = np.exp(dt.type(nk.EXP_ZERO_ARGUMENT[dtype] + 2))
    assert just_before > 0


def test_numpy_reduces_rows_independently_of_their_neighbours():
    # What makes a unit's partial independent of its batch on NumPy.
    rng = np.random.default_rng(3)
    for dtype in (np.float64, np.float32):
        for _ in range(150):
            rows, cols = int(rng.integers(1, 9)), int(rng.integers(1, 9000))
            a = rng.normal(2.0, 1.0, (rows, cols)).astype(dtype)
            sums = np.add.reduce(a, axis=1)
            for r in range(rows):
                assert sums[r].tobytes() == np.add.reduce(a[r]).tobytes()
            assert np.array_equal(np.argmax(a, axis=1), [np.argmax(row) for row in a])


@pytest.mark.parametrize(("params", "key"), [
    ({"max_dimension": 0}, "max_dimension"),
    ({"max_dimension": 10**15 + 1}, "max_dimension"),
    ({"max_dimension": 2.5}, "max_dimension"),
    ({"max_dimension": "100"}, "max_dimension"),
    ({"max_dimension": True}, "max_dimension"),
    ({"min_dimension": 0}, "min_dimension"),
    ({"min_dimension": 11, "max_dimension": 10}, "min_dimension"),
    ({"precision_mode": "fast"}, "precision_mode"),
    ({"precision_mode": ["speed"]}, "precision_mode"),
    ({"unit_dims": 0}, "unit_dims"),
    ({"unit_dims": 2**24 + 1}, "unit_dims"),
    ({"curve_points": 1}, "curve_points"),
    ({"mpmath_samples": 5000}, "mpmath_samples"),
    ({"max_dim": 5}, "max_dim"),
])
def test_bad_params_name_the_key(params, key):
    with pytest.raises(JobParamsError, match=key):
        NkatHighDim(params)


def test_integral_floats_are_accepted():
    assert NkatHighDim({"max_dimension": 1e6}).max_n == 10**6


def test_result_has_the_seeds_keys_and_is_plain_json():
    job, r = run({"max_dimension": 3000})
    assert set(r) >= {"summary", "performance", "theoretical_validation", "provenance",
                      "curve", "precision"}
    assert set(r["summary"]) == {"total_dimensions", "min_dimension", "max_dimension",
                                 "average_convergence", "average_consistency",
                                 "average_relative_deviation", "peak_convergence",
                                 "convergence_stability"}
    # No GPU utilisation: the worker cannot see the supervisor's NVML readings.
    assert set(r["performance"]) == {"total_gpu_time", "average_throughput",
                                     "max_memory_usage", "fast_batch_throughput",
                                     "epoch_throughput"}
    tv = r["theoretical_validation"]
    assert set(tv["consistency_trend"]) == {"slope", "improving", "stability"}
    assert set(tv["convergence_pattern"]) == {"peak_dimension", "peak_value",
                                              "theoretical_peak", "peak_accuracy"}
    assert set(tv["scaling_behavior"]) == {"high_dimension_stability", "maintains_convergence"}
    assert r["provenance"] == {"backend": "numpy", "backends": ["numpy"], "device": "cpu",
                               "precision_mode": "balanced", "spec_hash": "f00d",
                               "epochs": 2, "restarts": 1}
    assert r["performance"]["total_gpu_time"] == 1.5
    assert r["performance"]["average_throughput"] == 2000.0
    assert r["performance"]["max_memory_usage"] == 3.0
    assert r["performance"]["fast_batch_throughput"] is None  # no batch times in the context
    assert r["performance"]["epoch_throughput"] is None  # nor the epoch's wall time
    peak = tv["convergence_pattern"]
    assert peak["theoretical_peak"] == nk.NC
    assert peak["peak_accuracy"] == pytest.approx(1 - abs(3000 - nk.NC) / nk.NC)
    json.dumps(r, allow_nan=False)
    assert set(job.deterministic_result(r)) == set(r) - {"performance", "provenance"}


def test_epoch_throughput_counts_the_last_process_dims_over_its_wall_time():
    job = NkatHighDim({"max_dimension": 300_000, "unit_dims": 65536})  # 5 units
    advance(job, job.units_total(), [2])
    context = dataclasses.replace(CONTEXT, extra={"epoch_first_unit": 2,
                                                  "epoch_wall_seconds": 0.5})
    # Resumed after units 0 and 1: this process computed N = min_n + 131072 .. 300000.
    expected = (300_000 - (job.min_n + 2 * 65536) + 1) / 0.5
    assert job.finalize(context)["performance"]["epoch_throughput"] == expected
    for bad in ({"epoch_first_unit": 5, "epoch_wall_seconds": 0.5},
                {"epoch_first_unit": 0, "epoch_wall_seconds": 0.0}):
        assert job.finalize(dataclasses.replace(CONTEXT, extra=bad))[
            "performance"]["epoch_throughput"] is None


def test_zero_compute_time_gives_no_throughput():
    job, _ = run({"max_dimension": 10})
    ctx = RunContext("numpy", "cpu", 1, 0, 0.0, 0, "x")
    perf = job.finalize(ctx)["performance"]
    assert perf["average_throughput"] is None


def test_restore_refuses_a_snapshot_of_other_params():
    job, _ = run({"max_dimension": 100})
    with pytest.raises(ValueError, match="params"):
        NkatHighDim({"max_dimension": 101}).restore(job.snapshot())


def test_a_unit_merged_twice_or_missing_is_refused():
    job = NkatHighDim({"max_dimension": 100, "unit_dims": 10})
    job.merge_batch(0, 3, job.compute_batch(np, 0, 3).wait())
    with pytest.raises(ValueError, match="overlap"):
        job.merge_batch(2, 1, job.compute_batch(np, 2, 1).wait())
    with pytest.raises(ValueError, match="outside"):
        job.compute_batch(np, 9, 2)
    job.merge_batch(4, 6, job.compute_batch(np, 4, 6).wait())
    with pytest.raises(ValueError, match=r"\[\[0, 3\], \[4, 10\]\]"):
        job.finalize(CONTEXT)


def test_the_builtin_name_resolves_to_this_job():
    assert resolve_job("nkat-highdim") is NkatHighDim


def test_even_grid_finds_its_points_in_any_interval():
    rng = np.random.default_rng(5)
    for _ in range(200):
        first = int(rng.integers(1, 50))
        last = first + int(rng.integers(0, 300))
        grid = EvenGrid(first, last, int(rng.integers(1, 80)))
        points = grid.values()
        assert points[0] == first and points[-1] == last or grid.points == 1
        assert len(set(points)) == len(points)
        a = int(rng.integers(first - 5, last + 5))
        b = a + int(rng.integers(0, 60))
        assert [grid.at(k) for k in grid.between(a, b)] == [p for p in points if a <= p <= b]
