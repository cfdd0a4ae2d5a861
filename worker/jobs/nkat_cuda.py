"""The NKAT kernel on CuPy: S(N), per-unit sums and their exact fold, all on the device.

Imported only when the runtime hands the job CuPy as its array module, and even then it
imports nothing: CuPy arrives as ``xp``, so a NumPy-only machine never loads it.

A batch of ``count`` units runs as at most MAX_BLOCKS blocks of THREADS threads, each
block taking units blockIdx.x, blockIdx.x + gridDim.x, … in turn. For a unit, every
thread evaluates its N (a + tid, a + tid + THREADS, …; N is made from the index, no
array of N exists), sums them in runs of RUN, and a fixed shared-memory tree reduces
the block: the unit's sums depend on the unit alone. Then five threads fold them into the
block's exact fixed-point sums (``fixedpoint``, ``nkat_sums``: the same integers the
host computes, in 32-bit limbs held in int64), so adding blocks in any order changes no
bit. ``nkat_finish`` adds the blocks' limbs and extremes into one record, ``nkat_probes``
appends the curve and mpmath samples, and the record (about 700 bytes plus the probes)
is the batch's one device-to-host copy, queued on the kernel's stream into pinned
memory: ``launch`` returns at once and ``wait`` blocks on the batch's event, so the
runner can queue batch k+1 while the host folds batch k. Two slots of buffers
alternate.

In ``speed`` mode (``real`` = float) no double-precision operation runs per N: the
weight is an integer, shifts are integers, extremes and probes travel as float bits.
``precision`` runs a first pass for each unit's means (the shifts, put on their grids)
and sums around them in a second pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from nkat.worker.jobs import nkat_kernels as nk
from nkat.worker.jobs.fixedpoint import LIMBS, SCALE, from_limbs
from nkat.worker.jobs.nkat_sums import FIELDS, SHIFT_BITS

THREADS = 256
#: N a thread sums into a run before adding the run to its total (a shallower error).
RUN = 16
#: Blocks a batch uses at most; each takes many units when the batch is larger.
MAX_BLOCKS = 4096
FINISH_THREADS = 256
N_FIELDS = len(FIELDS)
#: The record: N_FIELDS × LIMBS limbs, max S bits, its N, min S bits, its N, flags.
RECORD = N_FIELDS * LIMBS + 5
#: Flag bits: a limb overflowed, a partial was not finite.
FLAG_OVERFLOW, FLAG_NONFINITE = 1, 2

#: (dtype, precision) of every variant ``source`` can make: what CI compiles.
VARIANTS = (("float64", False), ("float64", True), ("float32", False))

_SOURCE = r"""
#define THREADS %(threads)d
#define RUN %(run)d
#define FINISH_THREADS %(finish_threads)d
#define NF %(fields)d
#define LIMBS %(limbs)d
#define SCALE %(scale)d
#define KB %(kb)d
#define PASSES %(passes)d
#define GAMMA %(gamma).17g
#define DELTA %(delta).17g
#define NC %(nc).17g
#define C2 %(c2).17g
#define C3 %(c3).17g
#define FLAG_OVERFLOW %(flag_overflow)d
#define FLAG_NONFINITE %(flag_nonfinite)d
#define REAL_IS_DOUBLE %(real_is_double)d

typedef %(real)s real;
typedef unsigned long long u64;

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

// S at a unit's middle (a half-integer) in real: the unit's shift, before the grid.
__device__ real nkat_middle(long long a, long long len) {
    const real x = (real)a + (real)(len - 1) * (real)0.5;
    const real lg = log(x / (real)NC);
    return (real)1 + (real)GAMMA * lg * ((real)1 - exp(-(real)DELTA * (x - (real)NC)))
        + (real)C2 * lg * lg / (x * x) + (real)C3 * lg * lg * lg / (x * x * x);
}

__device__ __forceinline__ long long to_grid(real x) {
    // x * 2^KB is exact; llrint rounds half to even like numpy.rint.
#if REAL_IS_DOUBLE
    return llrint(x * (real)(1LL << KB));
#else
    return llrintf(x * (real)(1LL << KB));
#endif
}

__device__ __forceinline__ long long bits_of(real x) {
#if REAL_IS_DOUBLE
    return __double_as_longlong(x);
#else
    return (long long)(unsigned int)__float_as_int(x);
#endif
}

// x = (-1)^neg * m * 2^e exactly; returns 0 for NaN or infinity.
__device__ int split_real(real x, int* neg, u64* m, int* e) {
#if REAL_IS_DOUBLE
    const long long b = __double_as_longlong(x);
    const int ex = (int)((b >> 52) & 0x7ff);
    const u64 frac = (u64)b & ((1ULL << 52) - 1);
    *neg = b < 0;
    if (ex == 0x7ff) return 0;
    *m = ex ? (frac | (1ULL << 52)) : frac;
    *e = ex ? ex - 1075 : -1074;
#else
    const int b = __float_as_int(x);
    const int ex = (b >> 23) & 0xff;
    const u64 frac = (u64)(b & 0x7fffff);
    *neg = b < 0;
    if (ex == 0xff) return 0;
    *m = ex ? (frac | (1ULL << 23)) : frac;
    *e = ex ? ex - 150 : -149;
#endif
    return 1;
}

// limbs += (-1)^neg * floor(a * b * 2^pos): fixedpoint.scaled, in 32-bit limbs.
__device__ void add_scaled(long long* limbs, int neg, u64 a, u64 b, int pos, int* flags) {
    u64 lo = a * b, hi = __umul64hi(a, b);
    if (pos < 0) {
        const int s = -pos;
        if (s >= 128) return;
        if (s >= 64) { lo = hi >> (s - 64); hi = 0; }
        else { lo = (lo >> s) | (hi << (64 - s)); hi >>= s; }
        pos = 0;
    }
    const int j = pos >> 5, r = pos & 31;
    const u64 words[4] = {lo & 0xffffffffULL, lo >> 32, hi & 0xffffffffULL, hi >> 32};
    for (int t = 0; t < 4; ++t) {
        if (!words[t]) continue;
        const u64 v = words[t] << r;
        const u64 parts[2] = {v & 0xffffffffULL, v >> 32};
        for (int h = 0; h < 2; ++h) {
            if (!parts[h]) continue;
            const int at = j + t + h;
            if (at >= LIMBS) { *flags |= FLAG_OVERFLOW; continue; }
            limbs[at] += neg ? -(long long)parts[h] : (long long)parts[h];
        }
    }
}

// limbs += mult * x * 2^(SCALE + shift), truncated toward zero: fixedpoint.fixed.
__device__ void add_fixed(long long* limbs, real x, u64 mult, int shift, int* flags) {
    int neg, e;
    u64 m;
    if (!split_real(x, &neg, &m, &e)) { *flags |= FLAG_NONFINITE; return; }
    if (m) add_scaled(limbs, neg, m, mult, e + SCALE + shift, flags);
}

// nkat_sums.fold_s: n values of S around K = k * 2^-KB into (sum S, sum S^2).
__device__ void fold_s(long long* s1, long long* s2, long long n, long long k, real sum_d,
                       real sum_dd, int* flags) {
    const u64 nk = (u64)n * (u64)k;
    add_scaled(s1, 0, nk, 1, SCALE - KB, flags);
    add_fixed(s1, sum_d, 1, 0, flags);
    add_scaled(s2, 0, nk, (u64)k, SCALE - 2 * KB, flags);
    add_fixed(s2, sum_d, 2 * (u64)k, -KB, flags);
    add_fixed(s2, sum_dd, 1, 0, flags);
}

// nkat_sums.fold_q, one output field per call (which: 0 sum q, 1 sum q^2, 2 sum N*q).
__device__ void fold_q(long long* out, int which, long long n, long long c2, long long q_m,
                       int q_e, real sum_e, real sum_ee, real sum_w2e, int* flags) {
    const u64 nq = (u64)n * (u64)q_m;
    if (which == 0) {
        add_scaled(out, 0, (u64)n, (u64)q_m, q_e + SCALE, flags);
        add_fixed(out, sum_e, 1, 0, flags);
    } else if (which == 1) {
        add_scaled(out, 0, nq, (u64)q_m, 2 * q_e + SCALE, flags);
        add_fixed(out, sum_e, 2 * (u64)q_m, q_e, flags);
        add_fixed(out, sum_ee, 1, 0, flags);
    } else {
        add_scaled(out, 0, nq, (u64)c2, q_e + SCALE - 1, flags);
        add_fixed(out, sum_e, (u64)c2, -1, flags);
        add_fixed(out, sum_w2e, 1, -1, flags);
    }
}

// The larger (S, N), ties to the smaller N; N < 0 means none.
__device__ __forceinline__ int better_max(real s, long long n, real best, long long at) {
    return n >= 0 && (at < 0 || s > best || (s == best && n < at));
}
__device__ __forceinline__ int better_min(real s, long long n, real best, long long at) {
    return n >= 0 && (at < 0 || s < best || (s == best && n < at));
}

// Sums over one unit around the given shifts (reduced over the block into red[f][0]):
// 0 sum d lo, 1 sum d^2 lo, 2 sum d hi, 3 sum d^2 hi, 4 sum e, 5 sum e^2, 6 sum w2*e,
// with d = S - K (K of the N's half) and e = q - Q.
__device__ void unit_sums(long long a, long long len, long long half_n, long long exp_from,
                          real k_lo, real k_hi, real q_c, real red[7][THREADS],
                          real* best, long long* best_at, real* worst, long long* worst_at) {
    const int tid = threadIdx.x;
    real total[7] = {0, 0, 0, 0, 0, 0, 0};
    real run[7] = {0, 0, 0, 0, 0, 0, 0};
    real hi = 0, lo = 0;
    long long hi_at = -1, lo_at = -1;
    int in_run = 0;
    for (long long i = tid; i < len; i += THREADS) {
        const long long n = a + i;
        real s, q;
        nkat_model(n, exp_from, &s, &q);
        const int upper = n >= half_n;
        const real d = s - (upper ? k_hi : k_lo);
        run[upper ? 2 : 0] += d;
        run[upper ? 3 : 1] += d * d;
        const real e = q - q_c;
        run[4] += e;
        run[5] += e * e;
        // w2 = 2 (N - a) - (len - 1): an integer, exact in float for len <= 2^24.
        run[6] += (real)(2 * i - (len - 1)) * e;
        // A thread sees its N in increasing order: strict comparisons keep the first.
        if (hi_at < 0 || s > hi) { hi = s; hi_at = n; }
        if (lo_at < 0 || s < lo) { lo = s; lo_at = n; }
        if (++in_run == RUN) {
            for (int f = 0; f < 7; ++f) { total[f] += run[f]; run[f] = 0; }
            in_run = 0;
        }
    }
    for (int f = 0; f < 7; ++f) red[f][tid] = total[f] + run[f];
    best[tid] = hi; best_at[tid] = hi_at;
    worst[tid] = lo; worst_at[tid] = lo_at;
    __syncthreads();
    for (int stride = THREADS / 2; stride > 0; stride >>= 1) {
        if (tid < stride) {
            const int o = tid + stride;
            for (int f = 0; f < 7; ++f) red[f][tid] += red[f][o];
            if (better_max(best[o], best_at[o], best[tid], best_at[tid])) {
                best[tid] = best[o]; best_at[tid] = best_at[o];
            }
            if (better_min(worst[o], worst_at[o], worst[tid], worst_at[tid])) {
                worst[tid] = worst[o]; worst_at[tid] = worst_at[o];
            }
        }
        __syncthreads();
    }
}

// Units blockIdx.x, blockIdx.x + gridDim.x, ... of the batch; each block writes its exact
// sums (NF x LIMBS limbs) and extremes (max bits, N, min bits, N, flags).
extern "C" __global__ void nkat_units(
        const long long first_n, const long long unit_dims, const long long last_n,
        const long long half_n, const long long exp_from, const long long count,
        long long* __restrict__ block_limbs, long long* __restrict__ block_ext) {
    __shared__ real red[7][THREADS];
    __shared__ real best[THREADS], worst[THREADS];
    __shared__ long long best_at[THREADS], worst_at[THREADS];
    __shared__ long long limbs[NF * LIMBS];
    __shared__ real k_lo_s, k_hi_s, q_s;
    __shared__ long long k_lo, k_hi, q_m;
    __shared__ int q_e;
    __shared__ real top, bottom;
    __shared__ long long top_at, bottom_at;
    __shared__ int flags[5];
    const int tid = threadIdx.x;
    for (int i = tid; i < NF * LIMBS; i += THREADS) limbs[i] = 0;
    if (tid < 5) flags[tid] = 0;
    if (tid == 0) { top_at = -1; bottom_at = -1; top = 0; bottom = 0; }
    __syncthreads();
    for (long long u = blockIdx.x; u < count; u += gridDim.x) {
        const long long a = first_n + u * unit_dims;
        const long long b = min(a + unit_dims - 1, last_n);
        const long long len = b - a + 1;
        const long long n_lo = max(min(half_n - a, len), 0LL);
        if (tid == 0) {
            k_lo = k_hi = to_grid(nkat_middle(a, len));
            q_m = 0; q_e = 0;
            k_lo_s = k_hi_s = (real)k_lo / (real)(1LL << KB);
            q_s = 0;
        }
        __syncthreads();
#if PASSES == 2
        // First pass: the unit's means around the shift, put on the shift grids.
        unit_sums(a, len, half_n, exp_from, k_lo_s, k_hi_s, q_s, red, best, best_at, worst,
                  worst_at);
        if (tid == 0) {
            if (n_lo) k_lo += to_grid(red[0][0] / (real)n_lo);
            if (len - n_lo) k_hi += to_grid(red[2][0] / (real)(len - n_lo));
            k_lo_s = (real)k_lo / (real)(1LL << KB);
            k_hi_s = (real)k_hi / (real)(1LL << KB);
            // Q: the mean q to 24 significant bits (nkat_kernels.short_mantissa).
            int e;
            const float mean_q = (float)(red[4][0] / (real)len);
            const float frac = frexpf(mean_q, &e);
            q_m = (long long)ldexpf(frac, 24);
            q_e = e - 24;
            q_s = (real)mean_q;
        }
        __syncthreads();
#endif
        unit_sums(a, len, half_n, exp_from, k_lo_s, k_hi_s, q_s, red, best, best_at, worst,
                  worst_at);
        // Five threads fold the unit's sums into this block's limbs, one field pair each.
        const long long c2 = 2 * a + len - 1;
        if (tid == 0 && n_lo) {
            fold_s(limbs, limbs + LIMBS, n_lo, k_lo, red[0][0], red[1][0], &flags[0]);
        } else if (tid == 1 && len - n_lo) {
            fold_s(limbs + 2 * LIMBS, limbs + 3 * LIMBS, len - n_lo, k_hi, red[2][0],
                   red[3][0], &flags[1]);
        } else if (tid >= 2 && tid < 5) {
            fold_q(limbs + (2 + tid) * LIMBS, tid - 2, len, c2, q_m, q_e, red[4][0], red[5][0],
                   red[6][0], &flags[tid]);
        } else if (tid == 5) {
            if (better_max(best[0], best_at[0], top, top_at)) {
                top = best[0]; top_at = best_at[0];
            }
            if (better_min(worst[0], worst_at[0], bottom, bottom_at)) {
                bottom = worst[0]; bottom_at = worst_at[0];
            }
        }
        __syncthreads();
    }
    long long* out = block_limbs + (long long)blockIdx.x * NF * LIMBS;
    for (int i = tid; i < NF * LIMBS; i += THREADS) out[i] = limbs[i];
    if (tid == 0) {
        long long* ext = block_ext + (long long)blockIdx.x * 5;
        ext[0] = bits_of(top); ext[1] = top_at;
        ext[2] = bits_of(bottom); ext[3] = bottom_at;
        ext[4] = flags[0] | flags[1] | flags[2] | flags[3] | flags[4];
    }
}

// One block: the blocks' limbs added (integers: any order gives the same sums) and their
// extremes reduced, into the batch record.
extern "C" __global__ void nkat_finish(const int blocks,
                                       const long long* __restrict__ block_limbs,
                                       const long long* __restrict__ block_ext,
                                       long long* __restrict__ record) {
    __shared__ real best[FINISH_THREADS], worst[FINISH_THREADS];
    __shared__ long long best_at[FINISH_THREADS], worst_at[FINISH_THREADS];
    __shared__ long long flag[FINISH_THREADS];
    const int tid = threadIdx.x;
    for (int i = tid; i < NF * LIMBS; i += FINISH_THREADS) {
        long long sum = 0;
        for (int g = 0; g < blocks; ++g) sum += block_limbs[(long long)g * NF * LIMBS + i];
        record[i] = sum;
    }
    real hi = 0, lo = 0;
    long long hi_at = -1, lo_at = -1, f = 0;
    for (int g = tid; g < blocks; g += FINISH_THREADS) {
        const long long* ext = block_ext + (long long)g * 5;
        real s;
#if REAL_IS_DOUBLE
        s = __longlong_as_double(ext[0]);
#else
        s = __int_as_float((int)ext[0]);
#endif
        if (better_max(s, ext[1], hi, hi_at)) { hi = s; hi_at = ext[1]; }
#if REAL_IS_DOUBLE
        s = __longlong_as_double(ext[2]);
#else
        s = __int_as_float((int)ext[2]);
#endif
        if (better_min(s, ext[3], lo, lo_at)) { lo = s; lo_at = ext[3]; }
        f |= ext[4];
    }
    best[tid] = hi; best_at[tid] = hi_at; worst[tid] = lo; worst_at[tid] = lo_at;
    flag[tid] = f;
    __syncthreads();
    for (int stride = FINISH_THREADS / 2; stride > 0; stride >>= 1) {
        if (tid < stride) {
            const int o = tid + stride;
            if (better_max(best[o], best_at[o], best[tid], best_at[tid])) {
                best[tid] = best[o]; best_at[tid] = best_at[o];
            }
            if (better_min(worst[o], worst_at[o], worst[tid], worst_at[tid])) {
                worst[tid] = worst[o]; worst_at[tid] = worst_at[o];
            }
            flag[tid] |= flag[o];
        }
        __syncthreads();
    }
    if (tid == 0) {
        long long* ext = record + NF * LIMBS;
        ext[0] = bits_of(best[0]); ext[1] = best_at[0];
        ext[2] = bits_of(worst[0]); ext[3] = worst_at[0];
        ext[4] = flag[0];
    }
}

// The probes' S values, as bits, after the record (the same device function as the sums).
extern "C" __global__ void nkat_probes(const long long* __restrict__ ns, const int count,
                                       const long long exp_from, long long* __restrict__ out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) return;
    real s, q;
    nkat_model(ns[i], exp_from, &s, &q);
    out[i] = bits_of(s);
}
"""


def source(dtype: str, precision: bool = False) -> str:
    """The CUDA source for ``dtype`` ("float64" or "float32") and mode."""
    return _SOURCE % {
        "threads": THREADS, "run": RUN, "finish_threads": FINISH_THREADS,
        "fields": N_FIELDS, "limbs": LIMBS, "scale": SCALE, "kb": SHIFT_BITS[dtype],
        "passes": 2 if precision else 1,
        "gamma": nk.GAMMA, "delta": nk.DELTA, "nc": nk.NC, "c2": nk.C2, "c3": nk.C3,
        "flag_overflow": FLAG_OVERFLOW, "flag_nonfinite": FLAG_NONFINITE,
        "real_is_double": 1 if dtype == "float64" else 0,
        "real": "double" if dtype == "float64" else "float",
    }


@dataclass(frozen=True, slots=True)
class Record:
    """A batch's exact sums (``nkat_sums.FIELDS`` order), extremes and probe values."""

    sums: list[int]
    max: tuple[float, int] | None
    min: tuple[float, int] | None
    probes: list[float]


class KernelFault(RuntimeError):
    """The kernel reported a partial it cannot fold (NaN, or beyond the limbs)."""


class _Slot:
    """One batch's device buffers, pinned host record and completion event."""

    def __init__(self, xp: Any) -> None:
        self.xp = xp
        self.event = xp.cuda.Event()
        self.blocks = self.probes = -1
        self.busy = False

    def fit(self, blocks: int, probes: int) -> None:
        xp = self.xp
        if blocks > self.blocks:
            self.block_limbs = xp.empty(blocks * N_FIELDS * LIMBS, dtype=xp.int64)
            self.block_ext = xp.empty(blocks * 5, dtype=xp.int64)
            self.blocks = blocks
        if probes > self.probes:
            size = RECORD + max(probes, 1)
            self.record = xp.empty(size, dtype=xp.int64)
            self._pinned = xp.cuda.alloc_pinned_memory(size * 8)
            self.host = np.frombuffer(self._pinned, dtype=np.int64, count=size)
            self.probes = probes


class CudaKernel:
    """Compiles the module once per job and queues batches of units on its own stream."""

    def __init__(self, xp: Any, dtype: str, precision: bool) -> None:
        self.xp = xp
        self.dtype = np.dtype(dtype)
        self.exp_from = nk.exp_zero_from(dtype)
        module = xp.RawModule(code=source(dtype, precision), options=("--std=c++14",))
        self._units = module.get_function("nkat_units")
        self._finish = module.get_function("nkat_finish")
        self._probes = module.get_function("nkat_probes")
        self.stream = xp.cuda.Stream(non_blocking=True)
        self._slots = [_Slot(xp), _Slot(xp)]
        self._launched = 0

    def launch(self, first_n: int, count: int, unit_dims: int, last_n: int, half_n: int,
               probe_ns: list[int]) -> CudaBatch:
        """Queue units of ``unit_dims`` N from ``first_n`` (the last may end at ``last_n``);
        returns at once."""
        slot = self._slots[self._launched % 2]
        if slot.busy:
            raise RuntimeError("a third batch launched before the first was waited for")
        xp, i64 = self.xp, np.int64
        blocks = min(count, MAX_BLOCKS)
        slot.fit(blocks, len(probe_ns))
        out = slot.record[:RECORD + len(probe_ns)]
        with self.stream:
            self._units((blocks,), (THREADS,),
                        (i64(first_n), i64(unit_dims), i64(last_n), i64(half_n),
                         i64(self.exp_from), i64(count), slot.block_limbs, slot.block_ext))
            self._finish((1,), (FINISH_THREADS,),
                         (np.int32(blocks), slot.block_limbs, slot.block_ext, out))
            if probe_ns:
                ns = xp.asarray(np.asarray(probe_ns, dtype=np.int64))
                self._probes(((len(probe_ns) + 127) // 128,), (128,),
                             (ns, np.int32(len(probe_ns)), i64(self.exp_from),
                              out[RECORD:]))
            out.get(stream=self.stream, out=slot.host[:out.size], blocking=False)
            slot.event.record(self.stream)
        slot.busy = True
        self._launched += 1
        return CudaBatch(self, slot, len(probe_ns))

    def decode(self, raw: np.ndarray, probes: int) -> Record:
        at = N_FIELDS * LIMBS
        flags = int(raw[at + 4])
        if flags & FLAG_NONFINITE:
            raise KernelFault("the kernel produced a NaN or infinite partial")
        if flags & FLAG_OVERFLOW:
            raise KernelFault("a fixed-point sum overflowed its limbs")
        if self.dtype == np.float64:
            reals = raw.view(np.float64)
            top_s, bottom_s = float(reals[at]), float(reals[at + 2])
            values = reals[RECORD:RECORD + probes].tolist()
        else:
            bits = raw[[at, at + 2]].astype(np.uint32).view(np.float32)
            top_s, bottom_s = float(bits[0]), float(bits[1])
            values = raw[RECORD:RECORD + probes].astype(np.uint32).view(np.float32) \
                .astype(np.float64).tolist()
        top_n, bottom_n = int(raw[at + 1]), int(raw[at + 3])
        limbs = raw[:at].tolist()
        return Record([from_limbs(limbs[f * LIMBS:(f + 1) * LIMBS]) for f in range(N_FIELDS)],
                      (top_s, top_n) if top_n >= 0 else None,
                      (bottom_s, bottom_n) if bottom_n >= 0 else None, values)


class CudaBatch:
    """A queued batch: ``wait`` blocks on its event and decodes its record."""

    def __init__(self, kernel: CudaKernel, slot: _Slot, probes: int) -> None:
        self._kernel, self._slot, self._probes = kernel, slot, probes

    def wait(self) -> Record:
        try:
            self._slot.event.synchronize()
            return self._kernel.decode(self._slot.host[:RECORD + self._probes].copy(),
                                       self._probes)
        finally:
            self._slot.busy = False
