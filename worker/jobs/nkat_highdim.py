"""The NKAT high-dimension analysis, job ``nkat-highdim`` (README, "The NKAT job").

For every integer N in [min_dimension, max_dimension], each once,

    S(N) = 1 + γ·ln(N/Nc)·(1 − e^(−δ(N−Nc))) + c2·ln(N/Nc)²/N² + c3·ln(N/Nc)³/N³
    γ = 0.23422, δ = 0.03511, Nc = 17.2644, c2 = 0.0089, c3 = 0.0034

streamed in O(1) state. Units of ``unit_dims`` consecutive N are evaluated by a kernel
(``nkat_kernels`` on NumPy, on every core; ``nkat_cuda`` on CuPy, folded on the device)
into floating-point sums over fixed pieces of each unit (rows of at most a chunk, cut at
the half), and those sums are added exactly, in integer fixed point (``nkat_sums``).
A batch hands back one small partial: exact sums, extremes, probes. Partials add in any
order, so the deterministic blocks of the result are byte-identical however the range
is split: any batch size, any interruptions, any number of CPU threads, any shards
computed apart and merged (``merge_state``). Statistics are taken from the exact sums
and rounded once.

    job = NkatHighDim({"max_dimension": 10**6})
    for first in range(0, job.units_total(), 32):
        count = min(32, job.units_total() - first)
        job.merge_batch(first, count, job.compute_batch(numpy, first, count).wait())
    result = job.finalize(context)

Params (anything else is an error that names the key):

    min_dimension   1 … max_dimension         default 1
    max_dimension   1 … 10^15                 default 100000 (the seed's)
    precision_mode  speed | balanced | precision   default balanced
    unit_dims       1 … 2^24                  default 65536
    curve_points    2 … 65536                 default 512
    mpmath_samples  1 … 4096                  default 64 (used by precision mode)

Precision modes: ``speed`` evaluates and sums each piece in float32 (N above 2^24 is
rounded to float32 first; the CUDA kernel does no double-precision operation per N);
``balanced`` in float64; ``precision`` in float64 with a second pass over each piece
around the first pass's means (the corrected two-pass form), and checks S at
``mpmath_samples`` evenly spaced N against a 256-bit mpmath evaluation. In every mode
the pieces' sums are added exactly, so the error does not grow with the range.

What the result reports (the seed's key names; "convergence" is its word for S):

summary
    total_dimensions      how many N were evaluated: max − min + 1.
    average_convergence   mean of S(N).
    average_consistency   mean of the consistency c(N) = 1 − q(N), q(N) = |S(N) −
                          S∞(N)|/S∞(N), with S∞(N) = 1 + γ·ln(N/Nc) the leading
                          asymptote. S∞ is zero at N = Nc·e^(−1/γ) ≈ 0.241 and negative
                          below, but for every integer N ≥ 1 it is at least S∞(1) ≈ 0.333,
                          so c(N) is always defined here; it is negative where S strays
                          from S∞ by more than S∞ itself (N of a few units).
    average_relative_deviation   mean of q(N) itself: 1 − mean q keeps only the leading
                          digits of a mean q of 1e-13, this keeps all of them.
    peak_convergence      the largest S(N).
    convergence_stability 1/(1 + σ_S), σ_S the population standard deviation of S over
                          the whole range: 1 for a constant S, falling as S spreads.
performance               from the runtime, not deterministic: total_gpu_time (compute
                          seconds, on whichever backend), average_throughput (dimensions
                          per compute second), max_memory_usage (peak memory, GiB),
                          fast_batch_throughput (dimensions per second of the fastest
                          tenth of the last worker process's batches: what a host that
                          switches between speeds moves least), epoch_throughput
                          (dimensions the last worker process computed per second of its
                          whole run loop: checkpoints, pauses and throttling included).
                          No GPU utilisation: the worker cannot see the supervisor's NVML
                          readings (docs/nkat.md).
theoretical_validation
    consistency_trend     slope: least-squares slope of c(N) over N (per dimension);
                          improving: slope > 0; stability: 1/(1 + σ_c).
    convergence_pattern   peak_dimension: the N of the largest S (the first such N);
                          peak_value: that S; theoretical_peak: Nc; peak_accuracy: the
                          seed's 1 − |N_peak − Nc|/Nc, reported as it falls. S grows like
                          γ·ln N, so its peak is at the top of the range (or at N = 1 for
                          short ranges) and this figure is far below zero for long ones.
    scaling_behavior      high_dimension_stability: 1/(1 + σ of S over the upper half);
                          maintains_convergence: S spreads no more over the upper half
                          than over the lower half (σ_upper ≤ σ_lower), None when the
                          lower half is empty. The upper half is the last ⌈count/2⌉
                          dimensions, N ≥ min + ⌊count/2⌋.
statistics                σ_S, the minimum and maximum with their N, each half's range,
                          count, mean and σ, and σ_c.
provenance                backend, every backend the run used, device, precision mode,
                          spec hash, epochs, restarts.
curve                     {"N": [...], "S": [...]}: S at min(curve_points, count) evenly
                          spaced N (both ends included), as the kernel computed them.
precision                 mode and dtype; in precision mode also the mpmath check: the
                          sampled N, the largest relative error |S − S_mp|/|S_mp| and the
                          N where it occurs.

Every value is plain JSON (None where undefined, never NaN or infinity). Everything but
``performance`` and ``provenance`` is deterministic.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import msgpack

from nkat.protocol.settings import NkatParams, SettingError, build
from nkat.worker.job import Job, JobParamsError, Pending, Ready, RunContext
from nkat.worker.jobs.fixedpoint import as_fraction, sqrt_fraction
from nkat.worker.jobs.nkat_sums import (
    NQ,
    Q1,
    Q2,
    S1_HI,
    S1_LO,
    S2_HI,
    S2_LO,
    SHIFT_BITS,
    Partial,
    better_max,
    better_min,
    fold_q,
    fold_s,
)
from nkat.worker.unitset import UnitSet

# The NumPy kernels (and NumPy) are imported where a batch or the result needs them: a spec
# check (``--check-spec``) builds the job without computing, and NumPy's import would be
# most of its cost.
if TYPE_CHECKING:
    from nkat.worker.jobs.nkat_kernels import NumpyKernel

PRECISION_MODES = {"speed": "float32", "balanced": "float64", "precision": "float64"}
MPMATH_BITS = 256
_SNAPSHOT_VERSION = 2

#: (unit, first N, length) of a row: part of one unit, within one half, ≤ CHUNK long.
Piece = tuple[int, int, int]


class EvenGrid:
    """``points`` integers spread evenly over [first, last], both ends included."""

    def __init__(self, first: int, last: int, points: int) -> None:
        self.first, self.span = first, last - first
        self.points = min(points, self.span + 1)

    def at(self, k: int) -> int:
        if self.points == 1:
            return self.first
        steps = self.points - 1
        return self.first + (k * self.span + steps // 2) // steps

    def between(self, a: int, b: int) -> range:
        """The indices k with a ≤ at(k) ≤ b."""
        if self.points == 1:
            return range(0, 1 if a <= self.first <= b else 0)
        steps, half = self.points - 1, (self.points - 1) // 2
        # at(k) ≥ a  ⟺  k·span + half ≥ (a − first)·steps
        lo = -((half - (a - self.first) * steps) // self.span)
        # at(k) ≤ b  ⟺  k·span + half < (b − first + 1)·steps
        hi = ((b - self.first + 1) * steps - half - 1) // self.span
        return range(max(lo, 0), min(hi, self.points - 1) + 1)

    def values(self) -> list[int]:
        return [self.at(k) for k in range(self.points)]


class _Moments:
    """Count, mean and variance of a set of values from its exact sums (n, ΣS·2^SCALE,
    ΣS²·2^SCALE), each rounded once."""

    def __init__(self, n: int, s1: int, s2: int) -> None:
        self.n = n
        if n:
            self.mean: Fraction | None = as_fraction(s1) / n
            self.var: Fraction | None = max(as_fraction(s2) / n - self.mean**2, Fraction(0))
        else:
            self.mean = self.var = None

    def mean_value(self) -> float | None:
        return None if self.mean is None else _finite(float(self.mean))

    def std(self) -> float | None:
        return None if self.var is None else _finite(sqrt_fraction(self.var))


def _fast_throughput(unit_seconds: Any, unit_dims: int) -> float | None:
    """Dims/s of the fastest tenth of this process's batches (see ``UnitTimes``)."""
    if not isinstance(unit_seconds, float) or unit_seconds <= 0:
        return None
    return _finite(unit_dims / unit_seconds)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _stability(std: float | None) -> float | None:
    return None if std is None else 1.0 / (1.0 + std)


class NkatHighDim(Job):
    """S(N) over a range of dimensions: moments, extremes, consistency, curve."""

    name = "nkat-highdim"
    default_batch_units = 32
    shardable = True

    def __init__(self, params: Mapping[str, Any]) -> None:
        # The params, their defaults and ranges are declared once, on the wire's side
        # (nkat.protocol.settings.NkatParams), so the supervisor's config says the same.
        try:
            p: NkatParams = build(NkatParams, params, strict=True)
        except SettingError as exc:
            raise JobParamsError(str(exc)) from None
        self.max_n, self.min_n = p.max_dimension, p.min_dimension
        mode = p.precision_mode
        self.mode: str = mode
        self.unit_dims, self.curve_points = p.unit_dims, p.curve_points
        self.mpmath_samples = p.mpmath_samples
        self.precision = mode == "precision"
        self.dtype = PRECISION_MODES[mode]
        self.shift_bits = SHIFT_BITS[self.dtype]
        if self.precision:
            try:
                import mpmath  # noqa: F401
            except ImportError as exc:
                raise JobParamsError("precision_mode 'precision' needs mpmath "
                                     "(pip install mpmath)") from exc

        self.count = self.max_n - self.min_n + 1
        # The upper half: the last ⌈count/2⌉ dimensions, never empty.
        self.half_n = self.min_n + self.count // 2
        self.curve_grid = EvenGrid(self.min_n, self.max_n, self.curve_points)
        self.sample_grid = (EvenGrid(self.min_n, self.max_n, self.mpmath_samples)
                            if self.precision else None)
        self._fingerprint = [self.min_n, self.max_n, mode, self.unit_dims,
                             self.curve_points, self.mpmath_samples]
        self._threads = 1
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._kernels: list[NumpyKernel] = []
        self._cuda: Any = None
        self.done = UnitSet()
        self.part = Partial.empty()

    # -- geometry ---------------------------------------------------------------------

    def units_total(self) -> int:
        return -(-self.count // self.unit_dims)

    def unit_range(self, unit: int) -> tuple[int, int]:
        """First and last N of a unit."""
        a = self.min_n + unit * self.unit_dims
        return a, min(a + self.unit_dims - 1, self.max_n)

    def _epoch_throughput(self, extra: Mapping[str, Any]) -> float | None:
        """Dims/s of the last worker process over the wall time of its whole run loop:
        batches, merges, checkpoints, pauses and throttling all count."""
        first, wall = extra.get("epoch_first_unit"), extra.get("epoch_wall_seconds")
        total = self.units_total()
        if not isinstance(first, int) or not isinstance(wall, float) or wall <= 0 \
                or not 0 <= first < total:
            return None
        dims = self.unit_range(total - 1)[1] - self.unit_range(first)[0] + 1
        return _finite(dims / wall)

    def _pieces(self, first: int, count: int) -> list[Piece]:
        """(unit, first N, length) of each row: units cut at CHUNK from their start and at
        the half, so no row is longer than a chunk or straddles the two halves."""
        from nkat.worker.jobs.nkat_kernels import CHUNK

        out: list[Piece] = []
        for unit in range(first, first + count):
            a, b = self.unit_range(unit)
            cuts = list(range(a, b + 1, CHUNK))
            if a < self.half_n <= b and self.half_n not in cuts:
                cuts.append(self.half_n)
                cuts.sort()
            cuts.append(b + 1)
            out.extend((unit, x, y - x) for x, y in zip(cuts, cuts[1:], strict=False))
        return out

    def _chunks(self, first: int, count: int) -> list[list[Piece]]:
        """The batch's rows grouped into kernel calls: consecutive rows of one length
        (consecutive N) filling at most CHUNK elements."""
        from nkat.worker.jobs.nkat_kernels import CHUNK

        pieces = self._pieces(first, count)
        chunks: list[list[Piece]] = []
        i = 0
        while i < len(pieces):
            cols = pieces[i][2]
            j, limit = i + 1, i + max(CHUNK // cols, 1)
            while j < len(pieces) and j < limit and pieces[j][2] == cols:
                j += 1
            chunks.append(pieces[i:j])
            i = j
        return chunks

    def _probes_in(self, a: int, b: int) -> list[tuple[int, int, int]]:
        """(N, kind, grid index) of every probe in [a, b]: kind 0 a curve point, 1 an
        mpmath sample."""
        grids = [self.curve_grid] + ([self.sample_grid] if self.sample_grid else [])
        return [(grid.at(k), kind, k) for kind, grid in enumerate(grids)
                for k in grid.between(a, b)]

    # -- compute ----------------------------------------------------------------------

    def set_cpu_threads(self, threads: int) -> None:
        self._threads = max(1, threads)

    def compute_batch(self, xp: Any, first: int, count: int) -> Pending:
        if count < 1 or first < 0 or first + count > self.units_total():
            raise ValueError(f"units {first}+{count} outside 0..{self.units_total()}")
        if getattr(xp, "__name__", "") == "numpy":
            return Ready(self._compute_cpu(first, count))
        return self._compute_cuda(xp, first, count)

    def _compute_cpu(self, first: int, count: int) -> Partial:
        from nkat.worker.jobs.nkat_kernels import NumpyKernel

        chunks = self._chunks(first, count)
        groups = _split_even(chunks, self._threads)
        while len(self._kernels) < len(groups):
            self._kernels.append(NumpyKernel(self.dtype, self.precision))
        if len(groups) == 1:
            return self._cpu_group(0, groups[0])
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self._threads, thread_name_prefix="nkat-cpu")
        total = Partial.empty()
        # Exact sums: the groups' partials add up to the same bytes in any grouping.
        for part in self._pool.map(self._cpu_group, range(len(groups)), groups):
            total.add(part)
        return total

    def _cpu_group(self, index: int, chunks: list[list[Piece]]) -> Partial:
        """Rows of consecutive chunks on this thread's own kernel (NumPy frees the GIL)."""
        kernel, kb, half_n = self._kernels[index], self.shift_bits, self.half_n
        part = Partial.empty()
        sums, sinks = part.sums, (part.curve, part.samples)
        for rows in chunks:
            n0, cols = rows[0][1], rows[0][2]
            probes = [(n - n0, kind, k) for _, a, length in rows
                      for n, kind, k in self._probes_in(a, a + length - 1)]
            st = kernel.rows(n0, len(rows), cols, [off for off, _, _ in probes])
            for (_, kind, k), value in zip(probes, st.probes, strict=True):
                sinks[kind][k] = value
            for r, (_, a, length) in enumerate(rows):
                fold_s(sums, a >= half_n, length, st.k[r], kb, st.sum_d[r], st.sum_dd[r])
                fold_q(sums, length, 2 * a + length - 1, st.q_m[r], st.q_e[r], st.sum_e[r],
                       st.sum_ee[r], st.sum_w2e[r])
                part.max = better_max(part.max, (st.max_s[r], a + st.arg_max[r]))
                part.min = better_min(part.min, (st.min_s[r], a + st.arg_min[r]))
        return part

    def _compute_cuda(self, xp: Any, first: int, count: int) -> Pending:
        from nkat.worker.jobs import nkat_cuda

        if self._cuda is None:
            self._cuda = nkat_cuda.CudaKernel(xp, self.dtype, self.precision)
        a, _ = self.unit_range(first)
        _, b = self.unit_range(first + count - 1)
        probes = self._probes_in(a, b)
        batch = self._cuda.launch(a, count, self.unit_dims, self.max_n, self.half_n,
                                  [n for n, _, _ in probes])
        return _CudaPending(batch, [(kind, k) for _, kind, k in probes])

    # -- state ------------------------------------------------------------------------

    def merge_batch(self, first: int, count: int, partial: Partial) -> None:
        self.done.add(first, first + count)
        self.part.add(partial)

    def snapshot(self) -> bytes:
        packed: bytes = msgpack.packb({
            "v": _SNAPSHOT_VERSION,
            "params": self._fingerprint,
            "units": self.done.to_list(),
            "partial": self.part.to_wire(),
        }, use_bin_type=True)
        return packed

    def _unpack(self, data: bytes) -> tuple[UnitSet, Partial]:
        state = msgpack.unpackb(data, raw=False, strict_map_key=True)
        if not isinstance(state, dict) or state.get("v") != _SNAPSHOT_VERSION:
            version = state.get("v") if isinstance(state, dict) else None
            raise ValueError(f"snapshot version {version!r}, expected {_SNAPSHOT_VERSION}")
        if state["params"] != self._fingerprint:
            raise ValueError(f"snapshot of params {state['params']}, "
                             f"this job has {self._fingerprint}")
        return UnitSet(state["units"]), Partial.from_wire(state["partial"])

    def restore(self, data: bytes) -> None:
        self.done, self.part = self._unpack(data)

    def merge_state(self, snapshot: bytes) -> None:
        done, part = self._unpack(snapshot)
        self.done.update(done)
        self.part.add(part)

    # -- result -----------------------------------------------------------------------

    def finalize(self, context: RunContext) -> dict[str, Any]:
        from nkat.worker.jobs.nkat_kernels import NC

        if not self.done.covers(0, self.units_total()):
            raise ValueError(f"finalize with units {self.done.to_list()} merged, "
                             f"not [0, {self.units_total()})")
        sums = self.part.sums
        n_lo, n = self.half_n - self.min_n, self.count
        lower = _Moments(n_lo, sums[S1_LO], sums[S2_LO])
        upper = _Moments(n - n_lo, sums[S1_HI], sums[S2_HI])
        total = _Moments(n, sums[S1_LO] + sums[S1_HI], sums[S2_LO] + sums[S2_HI])
        q = _Moments(n, sums[Q1], sums[Q2])
        std_s, std_hi, std_lo, std_c = total.std(), upper.std(), lower.std(), q.std()
        slope = None
        if n >= 2:
            # cov(N, q) = ΣN·q − ΣN·Σq/n with ΣN = n·(min + max)/2; Σ(N − N̄)² = n(n²−1)/12.
            cov = as_fraction(sums[NQ]) - Fraction(self.min_n + self.max_n, 2) \
                * as_fraction(sums[Q1])
            slope = _finite(float(-cov / Fraction(n * (n * n - 1), 12)))
        mean_q = q.mean
        best, worst = self.part.max, self.part.min
        peak_n = best[1] if best else None
        seconds = context.compute_seconds
        halves = {}
        for name, m, first, last in (("lower_half", lower, self.min_n, self.half_n - 1),
                                     ("upper_half", upper, self.half_n, self.max_n)):
            halves[name] = {"first_dimension": first if first <= last else None,
                            "last_dimension": last if first <= last else None,
                            "count": m.n, "mean": m.mean_value(), "std": m.std()}
        return {
            "summary": {
                "total_dimensions": n,
                "min_dimension": self.min_n,
                "max_dimension": self.max_n,
                "average_convergence": total.mean_value(),
                "average_consistency": None if mean_q is None else _finite(float(1 - mean_q)),
                "average_relative_deviation": q.mean_value(),
                "peak_convergence": _finite(best[0]) if best else None,
                "convergence_stability": _finite(_stability(std_s)),
            },
            "performance": {
                "total_gpu_time": _finite(seconds),
                "average_throughput": _finite(n / seconds) if seconds > 0 else None,
                "max_memory_usage": _finite(context.peak_memory_bytes / 2**30),
                "fast_batch_throughput": _fast_throughput(
                    context.extra.get("unit_seconds_p10"), self.unit_dims),
                "epoch_throughput": self._epoch_throughput(context.extra),
            },
            "theoretical_validation": {
                "consistency_trend": {
                    "slope": slope,
                    "improving": None if slope is None else slope > 0,
                    "stability": _finite(_stability(std_c)),
                },
                "convergence_pattern": {
                    "peak_dimension": peak_n,
                    "peak_value": _finite(best[0]) if best else None,
                    "theoretical_peak": NC,
                    "peak_accuracy": (None if peak_n is None
                                      else _finite(1.0 - abs(peak_n - NC) / NC)),
                },
                "scaling_behavior": {
                    "high_dimension_stability": _finite(_stability(std_hi)),
                    "maintains_convergence": (None if std_lo is None or std_hi is None
                                              else std_hi <= std_lo),
                },
            },
            "statistics": {
                "std": std_s,
                "minimum": {"value": _finite(worst[0]) if worst else None,
                            "dimension": worst[1] if worst else None},
                "maximum": {"value": _finite(best[0]) if best else None,
                            "dimension": peak_n},
                **halves,
                "consistency_std": std_c,
            },
            "provenance": {
                "backend": context.backend,
                "backends": list(context.backends or (context.backend,)),
                "device": context.device,
                "precision_mode": self.mode,
                "spec_hash": context.spec_hash,
                "epochs": context.epochs,
                "restarts": context.restarts,
            },
            "curve": self._probe_block(self.curve_grid, self.part.curve),
            "precision": self._precision_block(),
        }

    @staticmethod
    def _probe_block(grid: EvenGrid, values: Mapping[int, float]) -> dict[str, Any]:
        ks = sorted(values)
        return {"N": [grid.at(k) for k in ks], "S": [_finite(values[k]) for k in ks]}

    def _precision_block(self) -> dict[str, Any]:
        block: dict[str, Any] = {"mode": self.mode, "dtype": self.dtype}
        if self.sample_grid is None:
            return block
        probes = self._probe_block(self.sample_grid, self.part.samples)
        worst, worst_n = mpmath_check(probes["N"], probes["S"])
        block["mpmath"] = {"bits": MPMATH_BITS, "samples": probes["N"],
                           "max_relative_error": _finite(worst), "worst_dimension": worst_n}
        return block


class _CudaPending:
    """A batch queued on the GPU; ``wait`` turns its one record into a Partial."""

    pending = True

    def __init__(self, batch: Any, probes: list[tuple[int, int]]) -> None:
        self._batch, self._probes = batch, probes

    def wait(self) -> Partial:
        record = self._batch.wait()
        part = Partial(record.sums, record.max, record.min)
        sinks = (part.curve, part.samples)
        for (kind, k), value in zip(self._probes, record.probes, strict=True):
            sinks[kind][k] = value
        return part


def _split_even(chunks: list[list[Piece]], parts: int) -> list[list[list[Piece]]]:
    """Consecutive chunks in at most ``parts`` groups of about equal element counts."""
    if parts <= 1 or len(chunks) <= 1:
        return [chunks]
    sizes = [rows[0][2] * len(rows) for rows in chunks]
    total, target = sum(sizes), sum(sizes) / min(parts, len(chunks))
    groups: list[list[list[Piece]]] = [[]]
    filled = 0
    for rows, size in zip(chunks, sizes, strict=True):
        if groups[-1] and filled + size / 2 > target * len(groups) and len(groups) < parts:
            groups.append([])
        groups[-1].append(rows)
        filled += size
    assert filled == total
    return groups


def reference_s(n: int, bits: int = MPMATH_BITS) -> Any:
    """S(n) in ``bits``-bit arithmetic, with the constants exact as decimals."""
    import mpmath

    with mpmath.workprec(bits):
        x = mpmath.mpf(n)
        nc = mpmath.mpf("17.2644")
        lg = mpmath.log(x / nc)
        return (1 + mpmath.mpf("0.23422") * lg
                * (1 - mpmath.exp(-mpmath.mpf("0.03511") * (x - nc)))
                + mpmath.mpf("0.0089") * lg**2 / x**2 + mpmath.mpf("0.0034") * lg**3 / x**3)


def mpmath_check(ns: Sequence[int], values: Sequence[float]) -> tuple[float | None, int | None]:
    """The largest relative error of ``values`` against S at ``ns``, and where."""
    import mpmath

    worst: float | None = None
    worst_n: int | None = None
    with mpmath.workprec(MPMATH_BITS):
        for n, v in zip(ns, values, strict=True):
            exact = reference_s(n)
            err = float(abs(mpmath.mpf(v) - exact) / abs(exact))
            if worst is None or err > worst:
                worst, worst_n = err, n
    return worst, worst_n
