"""The NKAT result does not depend on how its range is split: batches, interruptions,
CPU threads and shards computed apart and merged give byte-identical deterministic
blocks. Also the exact fixed-point sums underneath, and the merge of shard states."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from fractions import Fraction

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nkat.worker import state
from nkat.worker.job import RunContext
from nkat.worker.jobs import fixedpoint as fp
from nkat.worker.jobs.nkat_highdim import NkatHighDim
from nkat.worker.jobs.nkat_sums import Partial, better_max, better_min
from nkat.worker.shards import Shard, ShardMergeError, finalize_shards, merge_shards
from nkat.worker.unitset import UnitSet
from tests.fake_supervisor import REPO, worker_env

CONTEXT = RunContext("numpy", "cpu", 1, 0, 1.0, 0, "x")

PARAMS = st.fixed_dictionaries({
    "min_dimension": st.integers(1, 20_000),
    "max_dimension": st.integers(0, 20_000),
    "unit_dims": st.sampled_from([1, 7, 100, 4096, 9000, 70_000]),
    "precision_mode": st.sampled_from(["speed", "balanced", "precision"]),
    "curve_points": st.integers(2, 40),
    "mpmath_samples": st.integers(1, 4),
}).map(lambda p: {**p, "max_dimension": p["min_dimension"] + p["max_dimension"],
                  "unit_dims": max(p["unit_dims"], (p["max_dimension"] + 1) // 400)})


def compute(params: dict, first: int, stop: int, batches: list[int], threads: int = 1,
            job: NkatHighDim | None = None) -> NkatHighDim:
    job = job or NkatHighDim(params)
    job.set_cpu_threads(threads)
    at, i = first, 0
    while at < stop:
        count = min(batches[i % len(batches)], stop - at)
        job.merge_batch(at, count, job.compute_batch(np, at, count).wait())
        at, i = at + count, i + 1
    return job


def blocks(job: NkatHighDim) -> bytes:
    return json.dumps(job.deterministic_result(job.finalize(CONTEXT)), sort_keys=True,
                      allow_nan=False).encode()


def cuts(data: st.DataObject, total: int, label: str) -> list[int]:
    inner = data.draw(st.lists(st.integers(1, max(total - 1, 1)), max_size=5), label=label)
    return sorted({0, total, *(c for c in inner if 0 < c < total)})


@settings(max_examples=25, deadline=None)
@given(params=PARAMS, data=st.data())
def test_shards_merged_in_any_order_give_the_one_run_bytes(params, data):
    whole = compute(params, 0, NkatHighDim(params).units_total(), [10**9])
    total = whole.units_total()
    bounds = cuts(data, total, "shard bounds")
    shards = []
    for first, stop in zip(bounds, bounds[1:], strict=False):
        batches = data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=3),
                            label="batches")
        threads = data.draw(st.integers(1, 3), label="threads")
        shards.append(compute(params, first, stop, batches, threads).snapshot())
    order = data.draw(st.permutations(shards), label="merge order")
    merged = NkatHighDim(params)
    for snapshot in order:
        merged.merge_state(snapshot)
    assert merged.snapshot() == whole.snapshot()
    assert blocks(merged) == blocks(whole)


@settings(max_examples=20, deadline=None)
@given(params=PARAMS, data=st.data())
def test_interruptions_and_threads_change_no_byte(params, data):
    whole = compute(params, 0, NkatHighDim(params).units_total(), [3])
    total = whole.units_total()
    stops = cuts(data, total, "interruptions")
    job = NkatHighDim(params)
    for first, stop in zip(stops, stops[1:], strict=False):
        batches = data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=4),
                            label="batches")
        compute(params, first, stop, batches, data.draw(st.integers(1, 4)), job)
        blob = job.snapshot()
        job = NkatHighDim(params)  # a new worker: nothing survives but the snapshot
        job.restore(blob)
    assert blocks(job) == blocks(whole)


def test_threads_split_one_batch_into_the_same_bytes():
    params = {"max_dimension": 700_000, "unit_dims": 30_000, "curve_points": 300}
    one = compute(params, 0, 24, [24], threads=1)
    many = compute(params, 0, 24, [24], threads=3)
    assert len(many._kernels) == 3
    assert many.snapshot() == one.snapshot()


def test_a_state_merged_twice_is_refused():
    params = {"max_dimension": 5000, "unit_dims": 100}
    a = compute(params, 0, 20, [7]).snapshot()
    job = NkatHighDim(params)
    job.merge_state(a)
    with pytest.raises(ValueError, match="overlap"):
        job.merge_state(a)
    with pytest.raises(ValueError, match="params"):
        NkatHighDim({"max_dimension": 5001, "unit_dims": 100}).merge_state(a)


# The shard functions and --merge-shards ---------------------------------------------------

SPEC = {"job": "nkat-highdim", "params": {"max_dimension": 40_000, "unit_dims": 1000,
                                          "curve_points": 50}}


def shard(first: int, stop: int, seconds: float = 1.0) -> Shard:
    job = compute(SPEC["params"], first, stop, [3])
    counters = dict(state.COUNTERS, compute_seconds=seconds, batches=stop - first)
    return Shard((first, stop), state.wrap(job.snapshot(), stop - first, counters,
                                           compress=first % 2 == 1))


def one_run_blocks() -> str:
    job = compute(SPEC["params"], 0, 40, [40])
    return json.dumps(job.deterministic_result(job.finalize(CONTEXT)), sort_keys=True)


def deterministic(result: dict) -> str:
    return json.dumps({k: v for k, v in result.items()
                       if k not in ("performance", "provenance")}, sort_keys=True)


def test_finalize_shards_in_any_order_matches_one_run():
    parts = [shard(0, 13), shard(13, 14), shard(14, 40)]
    random.Random(4).shuffle(parts)
    result = finalize_shards(SPEC, parts, {"backend": "numpy", "device": "cpu",
                                           "epochs": 5, "restarts": 2})
    assert deterministic(result) == one_run_blocks()
    assert result["provenance"]["epochs"] == 5 and result["provenance"]["restarts"] == 2
    assert result["performance"]["total_gpu_time"] == 3.0


def test_merge_of_two_shard_states_is_itself_a_shard():
    ab = merge_shards(SPEC, shard(10, 40), shard(0, 10))
    assert ab.range == (0, 40)
    job_state, counters = state.unwrap(ab.state, 40)
    assert counters["compute_seconds"] == 2.0
    assert deterministic(finalize_shards(SPEC, [ab], {})) == one_run_blocks()
    with pytest.raises(ShardMergeError, match="not adjacent"):
        merge_shards(SPEC, shard(0, 10), shard(20, 40))


@pytest.mark.parametrize(("ranges", "text"), [
    ([(0, 20), (15, 40)], "overlap"),
    ([(0, 20), (21, 40)], "leave units out"),
    ([(0, 20)], "end at 20"),
])
def test_shards_that_do_not_tile_the_job_are_refused(ranges, text):
    with pytest.raises(ShardMergeError, match=text):
        finalize_shards(SPEC, [shard(a, b) for a, b in ranges], {})


def test_a_shard_whose_state_does_not_match_its_range_is_refused():
    bad = Shard((0, 20), shard(0, 19).state)
    with pytest.raises(ShardMergeError, match="covers 19 units"):
        finalize_shards(SPEC, [bad, shard(20, 40)], {})


def test_jobs_that_merge_in_unit_order_cannot_merge_shards():
    with pytest.raises(ShardMergeError, match="cannot merge shards"):
        finalize_shards({"job": "tests.jobs.toy:Toy", "params": {"units": 4}}, [], {})


def test_merge_shards_command_prints_the_one_run_result():
    request = msgpack.packb({
        "spec": SPEC,
        "states": [{"range": list(s.range), "state": s.state}
                   for s in (shard(30, 40), shard(0, 30))],
        "provenance": {"backend": "numpy", "device": "cpu", "epochs": 2, "restarts": 0},
    }, use_bin_type=True)
    run = subprocess.run([sys.executable, "-m", "nkat.worker", "--merge-shards"],
                         input=request, cwd=REPO, env=worker_env(), capture_output=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert deterministic(result) == one_run_blocks()
    assert run.stdout.decode() == json.dumps(result, sort_keys=True,
                                             separators=(",", ":")) + "\n"
    broken = subprocess.run([sys.executable, "-m", "nkat.worker", "--merge-shards"],
                            input=b"\xc1", cwd=REPO, env=worker_env(), capture_output=True,
                            timeout=60)
    assert broken.returncode == 2 and b"not msgpack" in broken.stderr


# The pieces underneath ---------------------------------------------------------------------

FLOATS = st.floats(allow_nan=False, allow_infinity=False, min_value=-2.0**60,
                   max_value=2.0**60)


@settings(max_examples=200, deadline=None)
@given(x=FLOATS, mult=st.integers(0, 2**52), shift=st.integers(-60, 60))
def test_fixed_is_the_exact_product_truncated_toward_zero(x, mult, shift):
    exact = Fraction(x) * mult * Fraction(2) ** (fp.SCALE + shift)
    assert fp.fixed(x, mult, shift) == math.trunc(exact)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(FLOATS, max_size=30), seed=st.integers(0, 2**32))
def test_fixed_point_sums_do_not_depend_on_order(values, seed):
    shuffled = values[:]
    random.Random(seed).shuffle(shuffled)
    assert sum(map(fp.fixed, values)) == sum(map(fp.fixed, shuffled))


@given(value=st.integers(-(2**351), 2**351))
def test_limbs_and_bytes_round_trip(value):
    chunks, rest = [], value
    for _ in range(fp.LIMBS):
        chunks.append(rest & 0xFFFFFFFF)
        rest >>= 32
    chunks[-1] += rest << 32  # the sign and what is left stay in the top limb
    assert fp.from_limbs(chunks) == value
    assert fp.from_bytes(fp.to_bytes(value)) == value


def test_square_root_of_an_exact_variance_is_correctly_rounded():
    for value in (Fraction(2), Fraction(1, 3), Fraction(10**40 + 1, 7), Fraction(1, 10**60)):
        root = fp.sqrt_fraction(value)
        below, above = math.nextafter(root, 0), math.nextafter(root, math.inf)
        assert abs(Fraction(root) ** 2 - value) <= min(abs(Fraction(below) ** 2 - value),
                                                       abs(Fraction(above) ** 2 - value))
    assert fp.sqrt_fraction(Fraction(0)) == 0.0


def test_extremes_keep_the_first_dimension_on_ties_in_any_order():
    a, b, c = (2.0, 10), (2.0, 7), (1.0, 3)
    for x, y in ((a, b), (b, a)):
        assert better_max(x, y) == (2.0, 7)
    assert better_min(better_min(a, c), b) == better_min(a, better_min(c, b)) == (1.0, 3)


def test_partials_refuse_a_probe_computed_twice():
    p, q = Partial.empty(), Partial.empty()
    p.curve[3] = q.curve[3] = 1.0
    with pytest.raises(ValueError, match="probe 3"):
        p.add(q)


def test_unit_set_merges_neighbours_and_refuses_overlap():
    done = UnitSet()
    for first, stop in ((10, 20), (0, 5), (5, 10), (30, 31)):
        done.add(first, stop)
    assert done.ranges == [(0, 20), (30, 31)] and done.count() == 21
    with pytest.raises(ValueError, match="overlap"):
        done.add(19, 25)
    assert UnitSet([(0, 3), (3, 9)]).covers(0, 9)
