"""The NKAT model S(N) and its NumPy kernel; the CUDA kernel is in ``nkat_cuda``.

    S(N)  = 1 + γ·L·(1 − e^(−δ(N − Nc))) + c2·L²/N² + c3·L³/N³,   L = ln(N/Nc)
    S∞(N) = 1 + γ·L                      (the leading asymptote)
    D(N)  = S(N) − S∞(N) = u²·(c2 + c3·u) − γ·L·e^(−δ(N − Nc)),   u = L/N
    q(N)  = |D(N)| / S∞(N)               (so the consistency c(N) = 1 − q(N))

``NumpyKernel.rows`` evaluates a chunk of consecutive N, laid out as rows of equal
length, and returns per-row statistics: the rows are independent of each other (NumPy
reduces each row of a C-contiguous 2-D array along axis 1 exactly as it reduces that row
alone), so a row's figures do not depend on which chunk it was computed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nkat.worker.jobs.nkat_sums import SHIFT_BITS

GAMMA = 0.23422
DELTA = 0.03511
NC = 17.2644
C2 = 0.0089
C3 = 0.0034

#: Arguments at or below which exp() is exactly 0.0: about one unit past the underflow
#: thresholds (exp(x) rounds to 0 below −745.13 in float64 and −103.97 in float32), so
#: any faithful exp implementation, CUDA's included, returns 0.0 there.
EXP_ZERO_ARGUMENT = {"float64": -746.0, "float32": -105.0}

#: Elements per chunk: 512 KiB per float64 buffer. Measured on a Zen 4 core: 16 Ki-element
#: chunks lose ~7% to per-call overhead, 128 Ki gain nothing. Part of the result's
#: definition (a unit longer than this is split here), so never tune it per run.
CHUNK = 1 << 16


def exp_zero_from(dtype: str) -> int:
    """The smallest N from which e^(−δ(N − Nc)) evaluates to exactly 0.0 in ``dtype``.

    One more than the exact bound, so that rounding in N − Nc and in the product with δ
    cannot bring the argument back above EXP_ZERO_ARGUMENT.
    """
    return math.ceil(NC - EXP_ZERO_ARGUMENT[dtype] / DELTA) + 1


def model(n: np.ndarray) -> np.ndarray:
    """S(n) in float64, written as the formula reads (n need not be an integer)."""
    lg = np.log(n / NC)
    with np.errstate(under="ignore"):
        fade = np.exp(-DELTA * (n - NC))
    s: np.ndarray = 1.0 + GAMMA * lg * (1.0 - fade) + C2 * lg**2 / n**2 + C3 * lg**3 / n**3
    return s


def shift_k(first: np.ndarray, length: float | np.ndarray, kb: int) -> np.ndarray:
    """The shift of each row as k (K = k·2^-kb): S at the row's middle N on that grid.

    Any K gives the same sums in exact arithmetic; one near the row's mean keeps
    Σ(S − K)² from cancelling against (Σ(S − K))²/n, which float32 sums (speed mode)
    would feel first. On a grid of 2^-kb, n·K and n·K² are exact integer products.
    """
    k: np.ndarray = np.rint(np.ldexp(model(first + (length - 1) / 2), kb)).astype(np.int64)
    return k


@dataclass(frozen=True, slots=True)
class RowStats:
    """Per-row figures of one chunk, each a list with one entry per row.

    S is summed around the row's shift K = k·2^-kb: sum_d = Σ(S − K), sum_dd = Σ(S − K)².
    q around Q = q_m·2^q_e (0 but in precision mode): sum_e = Σ(q − Q), sum_ee = Σ(q − Q)²,
    sum_w2e = Σ w2·(q − Q), w2 = 2·offset − (cols − 1) twice the offset from the row's
    middle. ``nkat_sums.fold_s``/``fold_q`` add them up exactly.
    """

    k: list[int]
    sum_d: list[float]
    sum_dd: list[float]
    q_m: list[int]
    q_e: list[int]
    sum_e: list[float]
    sum_ee: list[float]
    sum_w2e: list[float]
    arg_max: list[int]
    max_s: list[float]
    arg_min: list[int]
    min_s: list[float]
    probes: list[float]


def short_mantissa(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x rounded to 24 significant bits, as integers (m, e) with value m·2^e: the centre
    of q in precision mode, short so that n·Q² is an exact integer product."""
    rounded = x.astype(np.float32).astype(np.float64)
    fraction, exponent = np.frexp(rounded)
    return (np.ldexp(fraction, 24).astype(np.int64), (exponent - 24).astype(np.int64))


def _aligned(size: int, dtype: np.dtype) -> np.ndarray:
    """An empty array whose data starts on a 64-byte boundary.

    NumPy does not promise that its SIMD loops ignore alignment, and buffers of another
    process (a restarted worker) can land anywhere; fixing it keeps results bit-stable.
    """
    extra = 64 // dtype.itemsize
    raw = np.empty(size + extra, dtype=dtype)
    skip = (-raw.ctypes.data % 64) // dtype.itemsize
    return raw[skip:skip + size]


class NumpyKernel:
    """S(N) and per-row statistics on the CPU, in preallocated buffers."""

    def __init__(self, dtype: str, precision: bool) -> None:
        dt = np.dtype(dtype)
        self.dtype = dt
        self.precision = precision
        self.exp_from = exp_zero_from(dt.name)
        self.shift_bits = SHIFT_BITS[dt.name]
        self._offsets = np.arange(CHUNK, dtype=dt)
        self._bufs = tuple(_aligned(CHUNK, dt) for _ in range(5))
        self._weights: dict[int, np.ndarray] = {}
        self._gamma, self._delta, self._nc = dt.type(GAMMA), dt.type(DELTA), dt.type(NC)
        self._c2, self._c3, self._one = dt.type(C2), dt.type(C3), dt.type(1.0)

    def weights(self, cols: int) -> np.ndarray:
        """w2 = 2·offset − (cols − 1): twice the offset from the row's middle, an integer,
        exact in float32 too (|w2| < 2^17)."""
        w = self._weights.get(cols)
        if w is None:
            # Row lengths seen in a run: the unit length, CHUNK, and the few remainders
            # of the last unit and the half split; the cache stays that small.
            w = 2 * self._offsets[:cols] - self.dtype.type(cols - 1)
            self._weights[cols] = w
        return w

    def rows(self, first: int, rows: int, cols: int, probes: list[int]) -> RowStats:
        """Evaluate N = first … first + rows·cols − 1 as ``rows`` rows of ``cols``.

        ``probes`` are offsets (from ``first``) whose S values are returned as they were
        computed here, so a curve drawn from them agrees with the statistics bit for bit.
        """
        m = rows * cols
        if not 0 < m <= CHUNK:
            raise ValueError(f"chunk of {rows}x{cols} does not fit {CHUNK} elements")
        n, lg, u, s, q = (b[:m] for b in self._bufs)
        np.add(self._offsets[:m], first, out=n)
        np.divide(n, self._nc, out=lg)
        np.log(lg, out=lg)
        np.divide(lg, n, out=u)
        # The tail c2·L²/N² + c3·L³/N³ as u²(c2 + c3·u): L is taken once, no powers.
        np.multiply(u, self._c3, out=q)
        q += self._c2
        q *= u
        q *= u
        # e^(−δ(N − Nc)) is exactly 0.0 from exp_from on (see exp_zero_from); there
        # γ·L·0 = 0 and tail − 0 == tail, so leaving the term out changes no bit.
        p = min(max(self.exp_from - first, 0), m)
        if p:
            e = u[:p]
            np.subtract(n[:p], self._nc, out=e)
            e *= -self._delta
            np.exp(e, out=e)
            e *= lg[:p]
            e *= self._gamma
            q[:p] -= e
        np.multiply(lg, self._gamma, out=u)
        u += self._one
        np.add(u, q, out=s)
        # Past exp_from (> Nc) D is the tail alone, and u > 0 there makes it positive.
        if p:
            np.abs(q[:p], out=q[:p])
        q /= u
        # S∞ is no longer needed: u and lg become scratch.
        s2, q2 = s.reshape(rows, cols), q.reshape(rows, cols)
        d2, t2 = u.reshape(rows, cols), lg.reshape(rows, cols)
        starts = first + cols * np.arange(rows, dtype=np.float64)
        kb = self.shift_bits
        k = shift_k(starts, float(cols), kb)
        reduce = np.add.reduce
        np.subtract(s2, np.ldexp(k, -kb).astype(self.dtype)[:, None], out=d2)
        sum_d = reduce(d2, axis=1)
        if self.precision:
            # Second pass around the first pass's mean, put on the shift grid: the
            # corrected two-pass form, in the shape every mode folds exactly.
            k = k + np.rint(np.ldexp(sum_d.astype(np.float64) / cols, kb)).astype(np.int64)
            np.subtract(s2, np.ldexp(k, -kb).astype(self.dtype)[:, None], out=d2)
            sum_d = reduce(d2, axis=1)
        np.multiply(d2, d2, out=t2)
        sum_dd = reduce(t2, axis=1)
        if self.precision:
            q_m, q_e = short_mantissa(reduce(q2, axis=1).astype(np.float64) / cols)
            np.subtract(q2, np.ldexp(q_m, q_e).astype(self.dtype)[:, None], out=d2)
            e2 = d2
        else:
            q_m = q_e = np.zeros(rows, dtype=np.int64)
            e2 = q2
        sum_e = reduce(e2, axis=1)
        np.multiply(e2, self.weights(cols), out=t2)
        sum_w2e = reduce(t2, axis=1)
        np.multiply(e2, e2, out=t2)
        sum_ee = reduce(t2, axis=1)
        arg_max = np.argmax(s2, axis=1)
        arg_min = np.argmin(s2, axis=1)
        index = np.arange(rows)
        f64 = np.float64
        return RowStats(
            k=k.tolist(), sum_d=sum_d.astype(f64).tolist(), sum_dd=sum_dd.astype(f64).tolist(),
            q_m=q_m.tolist(), q_e=q_e.tolist(), sum_e=sum_e.astype(f64).tolist(),
            sum_ee=sum_ee.astype(f64).tolist(), sum_w2e=sum_w2e.astype(f64).tolist(),
            arg_max=arg_max.tolist(), max_s=s2[index, arg_max].astype(f64).tolist(),
            arg_min=arg_min.tolist(), min_s=s2[index, arg_min].astype(f64).tolist(),
            probes=s[probes].astype(f64).tolist() if probes else [],
        )
