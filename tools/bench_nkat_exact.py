"""NKAT figures of issue 11 for ``bench.py nkat``: the CPU backend against a native loop,
the error against an exact reference, and the split invariance.

    cpu_vs_native()     {"nkat_cpu_vs_native": ..., ...}
    rel_error(10**8)    {"nkat_rel_error_1e8": ..., "nkat_rel_errors": {...}}
    split_invariance()  {"split_invariance": 1, ...}
"""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import os
import shutil
import subprocess
import sysconfig
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import standalone  # run as a script: tools/ is on the path

from nkat.worker.job import RunContext
from nkat.worker.jobs import nkat_kernels as nk
from nkat.worker.jobs.nkat_highdim import NkatHighDim

# The job's formula and sums in one pass over N, a unit of 65536 N per OpenMP iteration:
# S and q as nkat_kernels computes them, Σ(S − K), Σ(S − K)², Σq, Σq², Σw2·q and the
# extremes, plain double sums.
NATIVE = r"""
#include <math.h>
#define GAMMA %(gamma).17g
#define DELTA %(delta).17g
#define NC %(nc).17g
#define C2 %(c2).17g
#define C3 %(c3).17g
double nkat_native(long long lo, long long hi, long long unit, long long exp_from) {
    long long units = (hi - lo + unit) / unit;
    double check = 0;
    #pragma omp parallel for schedule(dynamic, 1) reduction(+:check)
    for (long long u = 0; u < units; ++u) {
        long long a = lo + u * unit, b = a + unit - 1;
        if (b > hi) b = hi;
        long long len = b - a + 1;
        double x0 = (double)a + (double)(len - 1) * 0.5, l0 = log(x0 / NC);
        double k = 1 + GAMMA * l0 * (1 - exp(-DELTA * (x0 - NC)))
            + C2 * l0 * l0 / (x0 * x0) + C3 * l0 * l0 * l0 / (x0 * x0 * x0);
        double sd = 0, sdd = 0, sq = 0, sqq = 0, swq = 0, mx = -INFINITY, mn = INFINITY;
        long long mx_at = -1, mn_at = -1;
        for (long long i = 0; i < len; ++i) {
            long long n_int = a + i;
            double n = (double)n_int, lg = log(n / NC), w = lg / n;
            double d = (C3 * w + C2) * w * w;
            if (n_int < exp_from) d -= exp((n - NC) * -DELTA) * lg * GAMMA;
            double s_inf = lg * GAMMA + 1, s = s_inf + d, q = fabs(d) / s_inf, e = s - k;
            sd += e; sdd += e * e; sq += q; sqq += q * q;
            swq += (double)(2 * i - (len - 1)) * q;
            if (s > mx) { mx = s; mx_at = n_int; }
            if (s < mn) { mn = s; mn_at = n_int; }
        }
        check += sd + sdd + sq + sqq + swq + mx + mn + (double)(mx_at + mn_at);
    }
    return check;
}
"""


def _compile_native(tmp: Path) -> ctypes.CDLL:
    cc = shutil.which(os.environ.get("CC", "") or "") or shutil.which(
        (sysconfig.get_config_var("CC") or "cc").split()[0]) or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler")
    src, lib = tmp / "native.c", tmp / "native.so"
    src.write_text(NATIVE % {"gamma": nk.GAMMA, "delta": nk.DELTA, "nc": nk.NC, "c2": nk.C2,
                             "c3": nk.C3})
    subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(src),
                    "-o", str(lib), "-lm"], check=True, capture_output=True)
    native = ctypes.CDLL(str(lib))
    native.nkat_native.restype = ctypes.c_double
    native.nkat_native.argtypes = [ctypes.c_longlong] * 4
    return native


def _cores() -> int:
    """Every core this process may run on: what ``cpu_threads = 0`` (the default) gives
    the job in a worker."""
    return max(1, len(os.sched_getaffinity(0)))


def _cpu_run(max_n: int, threads: int) -> None:
    job = NkatHighDim({"max_dimension": max_n})
    job.set_cpu_threads(threads)
    total, batch = job.units_total(), 4 * threads
    for first in range(0, total, batch):
        count = min(batch, total - first)
        job.merge_batch(first, count, job.compute_batch(np, first, count).wait())


def cpu_vs_native(quick: bool = False) -> dict[str, Any]:
    max_n = 2 * 10**6 if quick else 2 * 10**7
    threads = _cores()
    exp_from = nk.exp_zero_from("float64")
    with tempfile.TemporaryDirectory(prefix="nkat-native-") as tmp:
        try:
            native = _compile_native(Path(tmp))
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            return {"nkat_cpu_vs_native": None, "nkat_native_error": str(exc)[:300]}
        best = {"cpu": math.inf, "native": math.inf}
        for _ in range(3):  # interleaved: a noisy neighbour hurts both alike
            start = time.perf_counter()
            _cpu_run(max_n, threads)
            best["cpu"] = min(best["cpu"], time.perf_counter() - start)
            start = time.perf_counter()
            native.nkat_native(1, max_n, 1 << 16, exp_from)
            best["native"] = min(best["native"], time.perf_counter() - start)
    return {
        "nkat_cpu_vs_native": round(best["native"] / best["cpu"], 3),
        "nkat_cpu_all_cores_dims_per_s": round(max_n / best["cpu"]),
        "nkat_native_all_cores_dims_per_s": round(max_n / best["native"]),
        "nkat_cpu_threads": threads,
    }


# The exact reference ------------------------------------------------------------------------


def _reference(lo: int, hi: int, chunk: int = 1 << 20) -> dict[str, float]:
    """The figures from S and q in plain float64 per N, summed with math.fsum over chunks
    around fixed centres (S at each half's middle N; N − the range's middle), and the
    moments taken from those sums in exact rational arithmetic."""
    count, half = hi - lo + 1, lo + (hi - lo + 1) // 2
    mid = Fraction(lo + hi, 2)

    def values(a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = np.arange(a, b + 1, dtype=np.float64)
        lg = np.log(n / nk.NC)
        fade = np.exp(-nk.DELTA * (n - nk.NC))
        tail = nk.C2 * lg**2 / n**2 + nk.C3 * lg**3 / n**3
        s_inf = 1 + nk.GAMMA * lg
        s = 1 + nk.GAMMA * lg * (1 - fade) + tail
        return n, s, np.abs(tail - nk.GAMMA * lg * fade) / s_inf

    sides = {"lo": (lo, half - 1), "hi": (half, hi)}
    centre = {k: float(values((a + b) // 2, (a + b) // 2)[1][0]) for k, (a, b) in sides.items()}
    parts: dict[str, list[float]] = {k: [] for k in (
        "e_lo", "ee_lo", "e_hi", "ee_hi", "q", "qq", "nq")}
    for a in range(lo, hi + 1, chunk):
        b = min(a + chunk - 1, hi)
        n, s, q = values(a, b)
        for side, (first, last) in sides.items():
            e = s[(n >= first) & (n <= last)] - centre[side]
            parts[f"e_{side}"].append(math.fsum(e.tolist()))
            parts[f"ee_{side}"].append(math.fsum((e * e).tolist()))
        parts["q"].append(math.fsum(q.tolist()))
        parts["qq"].append(math.fsum((q * q).tolist()))
        parts["nq"].append(math.fsum(((n - float(mid)) * q).tolist()))
    total = {k: Fraction(math.fsum(v)) for k, v in parts.items()}

    def moments(n: int, c: float, e: Fraction, ee: Fraction) -> tuple[Fraction, Fraction]:
        """(ΣS, ΣS²) exactly, from sums of e = S − c."""
        c_ = Fraction(c)
        return n * c_ + e, n * c_ * c_ + 2 * c_ * e + ee

    counts = {"lo": half - lo, "hi": hi - half + 1}
    raw = {k: moments(counts[k], centre[k], total[f"e_{k}"], total[f"ee_{k}"]) for k in sides}

    def mean_std(n: int, s1: Fraction, s2: Fraction) -> tuple[float, float]:
        mean = s1 / n
        var = s2 / n - mean * mean
        return float(mean), math.sqrt(float(var))

    mean, std = mean_std(count, raw["lo"][0] + raw["hi"][0], raw["lo"][1] + raw["hi"][1])
    mean_lo, std_lo = mean_std(counts["lo"], *raw["lo"])
    mean_hi, std_hi = mean_std(counts["hi"], *raw["hi"])
    mean_q = total["q"] / count
    std_q = math.sqrt(float(total["qq"] / count - mean_q * mean_q))
    # Σ(N − mid) = 0 over the range: Σ(N − mid)·q is the co-moment itself.
    slope = float(-total["nq"] / Fraction(count * (count * count - 1), 12))
    return {"average_convergence": mean, "std": std, "lower_half.mean": mean_lo,
            "lower_half.std": std_lo, "upper_half.mean": mean_hi, "upper_half.std": std_hi,
            "average_relative_deviation": float(mean_q), "consistency_std": std_q,
            "average_consistency": float(1 - mean_q), "slope": slope,
            "convergence_stability": 1 / (1 + std)}


def rel_error(max_n: int) -> dict[str, Any]:
    lo = 1000
    params = {"min_dimension": lo, "max_dimension": max_n, "precision_mode": "balanced"}
    job = NkatHighDim(params)
    job.set_cpu_threads(_cores())
    total = job.units_total()
    for first in range(0, total, 64):
        count = min(64, total - first)
        job.merge_batch(first, count, job.compute_batch(np, first, count).wait())
    r = job.finalize(RunContext("numpy", "cpu", 1, 0, 1.0, 0, "bench"))
    got = {
        "average_convergence": r["summary"]["average_convergence"],
        "std": r["statistics"]["std"],
        "lower_half.mean": r["statistics"]["lower_half"]["mean"],
        "lower_half.std": r["statistics"]["lower_half"]["std"],
        "upper_half.mean": r["statistics"]["upper_half"]["mean"],
        "upper_half.std": r["statistics"]["upper_half"]["std"],
        "average_relative_deviation": r["summary"]["average_relative_deviation"],
        "consistency_std": r["statistics"]["consistency_std"],
        "average_consistency": r["summary"]["average_consistency"],
        "slope": r["theoretical_validation"]["consistency_trend"]["slope"],
        "convergence_stability": r["summary"]["convergence_stability"],
    }
    want = _reference(lo, max_n)
    errors = {k: abs(got[k] - want[k]) / abs(want[k]) for k in want}
    label = "1e8" if max_n == 10**8 else f"{max_n:.0e}".replace("+0", "").replace("+", "")
    return {f"nkat_rel_error_{label}": float(f"{max(errors.values()):.3g}"),
            "nkat_rel_errors": {k: float(f"{v:.3g}") for k, v in errors.items()}}


# Split invariance ----------------------------------------------------------------------------

SPLIT_PARAMS = {"max_dimension": 3_000_000, "unit_dims": 10_000, "curve_points": 200}


def _blocks(result: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in result.items()
                       if k not in ("performance", "provenance")}, sort_keys=True)


def _runner_result(batch_size: int, adaptive: bool) -> str:
    """The job through the worker's own loop: ``python -m nkat.worker --standalone``."""
    result, _ = standalone({**SPLIT_PARAMS, "batch_size": batch_size,
                            "batch_size_adaptive": adaptive}, backend="numpy")
    return _blocks(result)


def _sharded_result(shards: int) -> str:
    """The units cut into ``shards`` ranges, each computed by a job of its own in batches
    of 13 units; the shards' snapshots merged into one job in reverse order (the job
    API's ``merge_state``, as ``python -m nkat.worker --merge-shards`` merges them)."""
    job = NkatHighDim(SPLIT_PARAMS)
    total = job.units_total()
    bounds = [round(total * i / shards) for i in range(shards + 1)]
    snapshots = []
    for first, stop in itertools.pairwise(bounds):
        part = NkatHighDim(SPLIT_PARAMS)
        part.set_cpu_threads(2)
        for at in range(first, stop, 13):
            count = min(13, stop - at)
            part.merge_batch(at, count, part.compute_batch(np, at, count).wait())
        snapshots.append(part.snapshot())
    for snapshot in reversed(snapshots):
        job.merge_state(snapshot)
    return _blocks(job.finalize(RunContext("numpy", "cpu", shards, 0, 1.0, 0, "bench")))


def split_invariance() -> dict[str, Any]:
    results = {f"batch_{b}": _runner_result(b, False) for b in (1, 7)}
    results["batch_adaptive"] = _runner_result(0, True)
    results.update({f"shards_{n}": _sharded_result(n) for n in (1, 2, 5)})
    distinct = len(set(results.values()))
    return {"split_invariance": 1 if distinct == 1 else 0,
            "split_invariance_variants": len(results)}
