"""Benchmark suite ``nkat``: the nkat-highdim job's CPU kernel against two baselines.

``python tools/bench.py nkat --json`` prints, all measured in this run on one range
(N = 1 … 10^7; 2·10^6 with --quick), best of a few interleaved repeats:

    nkat_dims_per_s            the job on NumPy, driven like the runtime drives it:
                               compute(default batch) + merge, in order, then finalize
    seed_style_dims_per_s      the seed's approach: per batch of 10 000 an np.linspace of N,
                               one array op per term, .tolist() of every value, batch
                               statistics from the lists
    numexpr_dims_per_s         one numexpr expression for S and one for the consistency per
                               64 Ki chunk, NumPy for the same statistics; one thread, like
                               the job (numexpr_all_threads_dims_per_s: all cores)
    nkat_vs_seed_style, nkat_vs_numexpr, nkat_vs_numexpr_all_threads   the ratios
    nkat_peak_rss_ratio_1e9_vs_1e6   peak RSS of a 10^9-dimension run (10^8 with --quick)
                               over a 10^6 one, each in a fresh subprocess
    nkat_big_run_seconds       wall time of that big run

and, for issue 11 (``bench_nkat_gpu``, ``bench_nkat_exact``):

    gpu_host_cap_dims_per_s    the host side of the CuPy path: ``python -m nkat.worker
                               --standalone --backend cupy`` on a stand-in CuPy whose
                               kernels do nothing (tools/null_cupy.py): dims per batch
                               over host seconds per batch, batches sized by the runner's
                               adaptive policy for a modelled GPU (bench_nkat_gpu)
    nkat_cpu_vs_native         the CPU backend on every core over a single-pass native C
                               loop of the same formula and sums, compiled here with the
                               system compiler (-O3 -march=native -fopenmp), every core
    nkat_rel_error_1e8         largest relative error of the deterministic figures of a
                               balanced run over [1000, 10^8] (10^7 with --quick) against
                               an exact reference (math.fsum over chunks)
    split_invariance           1 when batch sizes 1, 7 and adaptive (``python -m
                               nkat.worker --standalone``) and 1, 2 and 5 shards merged
                               (the job API's merge_state) give byte-identical
                               deterministic blocks
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

from nkat.worker.job import RunContext
from nkat.worker.jobs.nkat_highdim import NkatHighDim
from nkat.worker.jobs.nkat_kernels import C2, C3, DELTA, GAMMA, NC

REPEATS = 3


def run_job(params: dict[str, Any], threads: int = 1) -> dict[str, Any]:
    """Run the job in-process the way the runtime does, with its default batch."""
    job = NkatHighDim(params)
    job.set_cpu_threads(threads)
    total, batch = job.units_total(), NkatHighDim.default_batch_units
    start = time.perf_counter()
    for first in range(0, total, batch):
        count = min(batch, total - first)
        job.merge_batch(first, count, job.compute_batch(np, first, count).wait())
    seconds = time.perf_counter() - start
    context = RunContext(backend="numpy", device="cpu", epochs=1, restarts=0,
                         compute_seconds=seconds, peak_memory_bytes=0, spec_hash="bench")
    return job.finalize(context)


def seed_style(max_n: int) -> float:
    """The seed's loop, reimplemented: returns a checksum so nothing is optimised away."""
    batch = 10_000
    means, stds, peaks, consistencies = [], [], [], []
    for start in range(1, max_n + 1, batch):
        end = min(start + batch - 1, max_n)
        n = np.linspace(start, end, end - start + 1)
        log_term = np.log(n / NC)
        exp_term = np.exp(-DELTA * (n - NC))
        term1 = GAMMA * log_term * (1 - exp_term)
        term2 = C2 * log_term**2 / n**2
        term3 = C3 * log_term**3 / n**3
        s = 1 + term1 + term2 + term3
        s_inf = 1 + GAMMA * log_term
        consistency = 1 - np.abs(s - s_inf) / s_inf
        values, cons, dims = s.tolist(), consistency.tolist(), n.tolist()
        means.append(float(np.mean(values)))
        stds.append(float(np.std(values)))
        peaks.append(dims[values.index(max(values))])
        consistencies.append(float(np.mean(cons)))
    return float(np.mean(means) + np.mean(stds) + max(peaks) + np.mean(consistencies))


def numexpr_style(max_n: int) -> float:
    """S and c by numexpr per chunk, the job's statistics by NumPy; returns a checksum."""
    import numexpr as ne

    chunk = 1 << 16
    offsets = np.arange(chunk, dtype=np.float64)
    n, s, c, t = (np.empty(chunk) for _ in range(4))
    consts = {"g": GAMMA, "d": DELTA, "Nc": NC, "c2": C2, "c3": C3}
    s_expr = ("1 + g*log(N/Nc)*(1 - exp(-d*(N - Nc)))"
              " + c2*log(N/Nc)**2/N**2 + c3*log(N/Nc)**3/N**3")
    c_expr = "1 - abs(S - (1 + g*log(N/Nc)))/(1 + g*log(N/Nc))"
    total = sq = cs = cw = 0.0
    best = -np.inf
    worst = np.inf
    for start in range(1, max_n + 1, chunk):
        m = min(chunk, max_n - start + 1)
        nv, sv, cv, tv = n[:m], s[:m], c[:m], t[:m]
        np.add(offsets[:m], start, out=nv)
        ne.evaluate(s_expr, local_dict={"N": nv, **consts}, out=sv)
        ne.evaluate(c_expr, local_dict={"N": nv, "S": sv, **consts}, out=cv)
        total += sv.sum()
        np.subtract(sv, sv[m // 2], out=tv)
        sq += np.dot(tv, tv)
        cs += cv.sum()
        cw += np.dot(cv, nv)
        best = max(best, sv[np.argmax(sv)])
        worst = min(worst, sv[np.argmin(sv)])
    return float(total + sq + cs + cw + best + worst)


def _rss_run(max_n: int) -> dict[str, Any]:
    """Peak RSS and wall time of ``run_job`` over ``max_n`` dimensions in a fresh
    interpreter: this file run as a script (``--rss-child N``)."""
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(max_n)], check=True,
                         capture_output=True, text=True)
    figures: dict[str, Any] = json.loads(out.stdout)
    if figures["count"] != max_n:
        raise RuntimeError(f"run of {max_n} dimensions counted {figures['count']}")
    return figures


def _rss_child(max_n: int) -> None:
    started = time.perf_counter()
    result = run_job({"max_dimension": max_n})
    print(json.dumps({"rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "seconds": time.perf_counter() - started,
                      "count": result["summary"]["total_dimensions"]}))


def _best_rate(fn: Any, dims: int) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return dims / best


def run(args: Any) -> dict[str, Any]:
    import numexpr as ne

    max_n = 2 * 10**6 if args.quick else 10**7
    big = 10**8 if args.quick else 10**9

    rates: dict[str, float] = {}
    threads = ne.detect_number_of_cores()
    # Interleave the contenders so a noisy neighbour hurts all of them alike.
    for _ in range(2):
        rates["nkat"] = max(rates.get("nkat", 0.0),
                            _best_rate(lambda: run_job({"max_dimension": max_n}), max_n))
        rates["seed"] = max(rates.get("seed", 0.0),
                            _best_rate(lambda: seed_style(max_n), max_n))
        ne.set_num_threads(1)
        rates["numexpr"] = max(rates.get("numexpr", 0.0),
                               _best_rate(lambda: numexpr_style(max_n), max_n))
        ne.set_num_threads(threads)
        rates["numexpr_all"] = max(rates.get("numexpr_all", 0.0),
                                   _best_rate(lambda: numexpr_style(max_n), max_n))

    small_run, big_run = _rss_run(10**6), _rss_run(big)
    from bench_nkat_exact import cpu_vs_native, rel_error, split_invariance
    from bench_nkat_gpu import host_cap

    return {
        **host_cap(quick=args.quick),
        **cpu_vs_native(quick=args.quick),
        **rel_error(10**7 if args.quick else 10**8),
        **split_invariance(),
        "range_dimensions": max_n,
        "nkat_dims_per_s": round(rates["nkat"]),
        "seed_style_dims_per_s": round(rates["seed"]),
        "numexpr_dims_per_s": round(rates["numexpr"]),
        "numexpr_all_threads_dims_per_s": round(rates["numexpr_all"]),
        "numexpr_threads_all": threads,
        "nkat_vs_seed_style": round(rates["nkat"] / rates["seed"], 2),
        "nkat_vs_numexpr": round(rates["nkat"] / rates["numexpr"], 2),
        "nkat_vs_numexpr_all_threads": round(rates["nkat"] / rates["numexpr_all"], 2),
        "nkat_big_run_dimensions": big,
        "nkat_big_run_seconds": round(big_run["seconds"], 2),
        "nkat_peak_rss_ratio_1e9_vs_1e6": round(big_run["rss_kb"] / small_run["rss_kb"], 3),
    }


if __name__ == "__main__":
    # Only the fresh interpreter of _rss_run runs this file directly.
    if len(sys.argv) != 3 or sys.argv[1] != "--rss-child":
        sys.exit("usage: python tools/bench.py nkat [--json] [--quick]")
    _rss_child(int(sys.argv[2]))
