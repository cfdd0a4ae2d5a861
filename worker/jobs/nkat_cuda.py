"""The NKAT kernel on CuPy: S(N) and per-unit statistics fused in CUDA, one transfer a batch.

Imported only when the runtime hands the job CuPy as its array module, and even then it
imports nothing: CuPy arrives as ``xp``, so a NumPy-only machine never loads it.

Each batch is ``count`` units, launched as ``count × segs`` blocks of 256 threads, one
block per segment of 4096 consecutive N of a unit (the last ones shorter). Threads make
N from their index (no N array exists), evaluate S, and accumulate; a fixed shared-memory
tree reduces the block; a second kernel folds each unit's segments in order. Segments are
laid out from the unit's start and the trees have a fixed shape, so a unit's figures do
not depend on the batch around it: a hand-written RawModule rather than ReductionKernel,
whose block shape CuPy derives from the whole array's size and strides. Probes (the curve
and mpmath samples) are evaluated by a third kernel with the same device function, into
the same output array, so the batch comes back in one copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from nkat.worker.jobs import nkat_kernels as nk

THREADS = 256
SEGMENT = THREADS * 16
FIELDS = 12  # per block and per unit: see the layout in _SOURCE

_SOURCE = r"""
#define THREADS %(threads)d
#define SEGMENT %(segment)d
#define FIELDS %(fields)d
#define GAMMA %(gamma).17g
#define DELTA %(delta).17g
#define NC %(nc).17g
#define C2 %(c2).17g
#define C3 %(c3).17g

typedef %(real)s real;

// S(x) in double for any real x, as written (nkat_kernels.model): the units' shift.
__device__ double nkat_model_double(double x) {
    const double lg = log(x / NC);
    return 1.0 + GAMMA * lg * (1.0 - exp(-DELTA * (x - NC)))
        + C2 * lg * lg / (x * x) + C3 * lg * lg * lg / (x * x * x);
}

// S(N) and q(N) = |S - S_inf| / S_inf, as nkat_kernels.NumpyKernel computes them.
__device__ __forceinline__ void nkat_model(long long n_int, long long exp_from,
                                           real* s, real* q) {
    const real n = (real)n_int;
    const real lg = log(n / (real)NC);
    const real u = lg / n;
    real d = (real)C3 * u;
    d += (real)C2;
    d *= u;
    d *= u;
    // From exp_from on exp() is exactly 0 and the term vanishes without a bit of change.
    if (n_int < exp_from) {
        const real e = exp((n - (real)NC) * -(real)DELTA);
        d -= e * lg * (real)GAMMA;
    }
    const real s_inf = lg * (real)GAMMA + (real)1;
    *s = s_inf + d;
    *q = fabs(d) / s_inf;
}

// Output layout of a block (one segment) and of a unit, FIELDS doubles:
//  0 shift K   1 sum d (lower half)   2 sum d^2 (lower)   3 sum d (upper)   4 sum d^2 (upper)
//  5 sum q     6 sum q^2              7 sum w*q           8 max S           9 its offset
// 10 min S    11 its offset            (d = S - K; offsets from the unit's first N, -1: none)
// With centered != 0 (second pass of precision mode) d and q are taken less their unit's
// first-pass means (centers: 3 per unit), which gives the corrected two-pass sums.
extern "C" __global__ void nkat_segments(
        const long long first_n, const long long unit_dims, const long long last_n,
        const long long half_n, const long long exp_from, const int segs,
        const int centered, const double* __restrict__ centers,
        double* __restrict__ out) {
    __shared__ real sums[7][THREADS];
    __shared__ real best[THREADS], worst[THREADS];
    __shared__ long long best_at[THREADS], worst_at[THREADS];
    const int tid = threadIdx.x;
    const long long unit = blockIdx.x / segs;
    const long long seg = blockIdx.x %% segs;
    const long long row_a = first_n + unit * unit_dims;
    const long long row_b = min(row_a + unit_dims - 1, last_n);
    const long long seg_a = row_a + seg * SEGMENT;
    const long long seg_b = min(seg_a + SEGMENT - 1, row_b);
    const double middle = (double)(row_b - row_a) * 0.5;
    // The shift K: S at the unit's middle N, in double as the host computes it.
    const real shift = (real)nkat_model_double((double)row_a + middle);
    real c_lo = 0, c_hi = 0, c_q = 0;
    if (centered) {
        c_lo = (real)centers[3 * unit];
        c_hi = (real)centers[3 * unit + 1];
        c_q = (real)centers[3 * unit + 2];
    }
    real acc[7] = {0, 0, 0, 0, 0, 0, 0};
    real hi = 0, lo = 0;
    long long hi_at = -1, lo_at = -1;
    for (long long n = seg_a + tid; n <= seg_b; n += THREADS) {
        real s, q;
        nkat_model(n, exp_from, &s, &q);
        real d = s - shift;
        if (n < half_n) {
            d -= c_lo;
            acc[0] += d;
            acc[1] += d * d;
        } else {
            d -= c_hi;
            acc[2] += d;
            acc[3] += d * d;
        }
        q -= c_q;
        const real w = (real)((double)(n - row_a) - middle);
        acc[4] += q;
        acc[5] += q * q;
        acc[6] += w * q;
        // A thread sees its N in increasing order: strict comparisons keep the first.
        if (hi_at < 0 || s > hi) { hi = s; hi_at = n - row_a; }
        if (lo_at < 0 || s < lo) { lo = s; lo_at = n - row_a; }
    }
    for (int f = 0; f < 7; ++f) sums[f][tid] = acc[f];
    best[tid] = hi; best_at[tid] = hi_at;
    worst[tid] = lo; worst_at[tid] = lo_at;
    __syncthreads();
    for (int stride = THREADS / 2; stride > 0; stride >>= 1) {
        if (tid < stride) {
            const int o = tid + stride;
            for (int f = 0; f < 7; ++f) sums[f][tid] += sums[f][o];
            // Ties go to the smaller offset, the first occurrence, as on the host.
            if (best_at[o] >= 0 && (best_at[tid] < 0 || best[o] > best[tid]
                    || (best[o] == best[tid] && best_at[o] < best_at[tid]))) {
                best[tid] = best[o]; best_at[tid] = best_at[o];
            }
            if (worst_at[o] >= 0 && (worst_at[tid] < 0 || worst[o] < worst[tid]
                    || (worst[o] == worst[tid] && worst_at[o] < worst_at[tid]))) {
                worst[tid] = worst[o]; worst_at[tid] = worst_at[o];
            }
        }
        __syncthreads();
    }
    if (tid == 0) {
        double* o = out + (long long)blockIdx.x * FIELDS;
        o[0] = (double)shift;
        for (int f = 0; f < 7; ++f) o[1 + f] = (double)sums[f][0];
        o[8] = (double)best[0];
        o[9] = (double)best_at[0];
        o[10] = (double)worst[0];
        o[11] = (double)worst_at[0];
    }
}

// Folds each unit's segments, in order, into its FIELDS; with centers_out != 0 also
// writes the unit's means of d (lower, upper half) and of q for a centred second pass.
extern "C" __global__ void nkat_units(
        const int units, const int segs, const double* __restrict__ seg_out,
        double* __restrict__ out, const long long first_n, const long long unit_dims,
        const long long last_n, const long long half_n, const int centers_out,
        double* __restrict__ centers) {
    const int unit = blockIdx.x * blockDim.x + threadIdx.x;
    if (unit >= units) return;
    const double* s = seg_out + (long long)unit * segs * FIELDS;
    double acc[FIELDS];
    for (int f = 0; f < FIELDS; ++f) acc[f] = s[f];
    for (int k = 1; k < segs; ++k) {
        const double* t = s + (long long)k * FIELDS;
        for (int f = 1; f < 8; ++f) acc[f] += t[f];
        // Later segments hold later N: strict comparisons keep the first occurrence.
        if (t[9] >= 0 && (acc[9] < 0 || t[8] > acc[8])) { acc[8] = t[8]; acc[9] = t[9]; }
        if (t[11] >= 0 && (acc[11] < 0 || t[10] < acc[10])) { acc[10] = t[10]; acc[11] = t[11]; }
    }
    double* o = out + (long long)unit * FIELDS;
    for (int f = 0; f < FIELDS; ++f) o[f] = acc[f];
    if (centers_out) {
        const long long row_a = first_n + (long long)unit * unit_dims;
        const long long n = min(row_a + unit_dims - 1, last_n) - row_a + 1;
        const long long n_lo = max(min(half_n - row_a, n), 0LL);
        const long long n_hi = n - n_lo;
        centers[3 * unit] = n_lo ? (double)(real)(acc[1] / (double)n_lo) : 0.0;
        centers[3 * unit + 1] = n_hi ? (double)(real)(acc[3] / (double)n_hi) : 0.0;
        centers[3 * unit + 2] = (double)(real)(acc[5] / (double)n);
    }
}

extern "C" __global__ void nkat_probes(const long long* __restrict__ ns, const int count,
                                       const long long exp_from, double* __restrict__ out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) return;
    real s, q;
    nkat_model(ns[i], exp_from, &s, &q);
    out[i] = (double)s;
}
"""


def source(dtype: str) -> str:
    """The CUDA source for ``dtype`` ("float64" or "float32")."""
    return _SOURCE % {
        "threads": THREADS, "segment": SEGMENT, "fields": FIELDS,
        "gamma": nk.GAMMA, "delta": nk.DELTA, "nc": nk.NC, "c2": nk.C2, "c3": nk.C3,
        "real": "double" if dtype == "float64" else "float",
    }


@dataclass(frozen=True, slots=True)
class UnitRows:
    """Per-unit figures of a batch (lists, one entry per unit), both halves separately."""

    shift: list[float]
    mean_lo: list[float]
    m2_lo: list[float]
    mean_hi: list[float]
    m2_hi: list[float]
    mean_q: list[float]
    m2_q: list[float]
    co_q: list[float]
    arg_max: list[int]
    max_s: list[float]
    arg_min: list[int]
    min_s: list[float]
    probes: list[float]


class CudaKernel:
    """Compiles the module once per job and runs batches of units on the current device."""

    def __init__(self, xp: Any, dtype: str, precision: bool) -> None:
        self.xp = xp
        self.precision = precision
        self.exp_from = nk.exp_zero_from(dtype)
        module = xp.RawModule(code=source(dtype), options=("--std=c++14",))
        self._segments = module.get_function("nkat_segments")
        self._units = module.get_function("nkat_units")
        self._probes = module.get_function("nkat_probes")

    def rows(self, first_n: int, count: int, unit_dims: int, last_n: int, half_n: int,
             probe_ns: list[int]) -> UnitRows:
        """Units of ``unit_dims`` N from ``first_n`` (the last may end at ``last_n``)."""
        xp, i64, i32 = self.xp, np.int64, np.int32
        segs = -(-unit_dims // SEGMENT)
        passes = 2 if self.precision else 1
        seg_out = xp.empty(count * segs * FIELDS, dtype=xp.float64)
        out = xp.empty(passes * count * FIELDS + len(probe_ns), dtype=xp.float64)
        centers = xp.zeros(3 * count, dtype=xp.float64)
        geometry = (i64(first_n), i64(unit_dims), i64(last_n), i64(half_n))
        unit_grid = ((count + 127) // 128,)
        for p in range(passes):
            self._segments((count * segs,), (THREADS,),
                           geometry + (i64(self.exp_from), i32(segs), i32(p), centers,
                                       seg_out))
            view = out[p * count * FIELDS:(p + 1) * count * FIELDS]
            self._units(unit_grid, (128,),
                        (i32(count), i32(segs), seg_out, view) + geometry
                        + (i32(passes - 1 - p), centers))
        if probe_ns:
            ns = xp.asarray(np.asarray(probe_ns, dtype=np.int64))
            self._probes(((len(probe_ns) + 127) // 128,), (128,),
                         (ns, i32(len(probe_ns)), i64(self.exp_from),
                          out[passes * count * FIELDS:]))
        host = out.get()  # the batch's one device-to-host copy
        first = host[:count * FIELDS].reshape(count, FIELDS)
        second = host[count * FIELDS:passes * count * FIELDS].reshape(-1, FIELDS)
        return self._decode(first, second if self.precision else None, first_n, count,
                            unit_dims, last_n, half_n, host[passes * count * FIELDS:])

    def _decode(self, first: np.ndarray, second: np.ndarray | None, first_n: int,
                count: int, unit_dims: int, last_n: int, half_n: int,
                probes: np.ndarray) -> UnitRows:
        starts = first_n + unit_dims * np.arange(count, dtype=np.int64)
        n = np.minimum(starts + unit_dims - 1, last_n) - starts + 1
        n_lo = np.clip(half_n - starts, 0, n)
        n_hi = n - n_lo
        # Sides without any N get n = 1 here; the job leaves them out by their count.
        safe_lo, safe_hi = np.maximum(n_lo, 1), np.maximum(n_hi, 1)
        if second is None:
            mean_lo, m2_lo = nk.center(safe_lo, first[:, 1], first[:, 2])
            mean_hi, m2_hi = nk.center(safe_hi, first[:, 3], first[:, 4])
            mean_q, m2_q = nk.center(n, first[:, 5], first[:, 6])
            co_q = first[:, 7]
        else:
            # Precision: first-pass sums give the first means; the centred pass's Σe
            # and Σe² correct them (nkat_kernels.center).
            mean_lo, m2_lo = nk.center(safe_lo, first[:, 1], second[:, 2], second[:, 1])
            mean_hi, m2_hi = nk.center(safe_hi, first[:, 3], second[:, 4], second[:, 3])
            mean_q, m2_q = nk.center(n, first[:, 5], second[:, 6], second[:, 5])
            co_q = second[:, 7]
        return UnitRows(
            shift=first[:, 0].tolist(), mean_lo=mean_lo.tolist(), m2_lo=m2_lo.tolist(),
            mean_hi=mean_hi.tolist(), m2_hi=m2_hi.tolist(), mean_q=mean_q.tolist(),
            m2_q=m2_q.tolist(), co_q=co_q.tolist(),
            arg_max=first[:, 9].astype(np.int64).tolist(), max_s=first[:, 8].tolist(),
            arg_min=first[:, 11].astype(np.int64).tolist(), min_s=first[:, 10].tolist(),
            probes=probes.tolist(),
        )
