"""The NKAT high-dimension analysis, job ``nkat-highdim`` (README, "The NKAT job").

For every integer N in [min_dimension, max_dimension], each once,

    S(N) = 1 + γ·ln(N/Nc)·(1 − e^(−δ(N−Nc))) + c2·ln(N/Nc)²/N² + c3·ln(N/Nc)³/N³
    γ = 0.23422, δ = 0.03511, Nc = 17.2644, c2 = 0.0089, c3 = 0.0034

streamed in O(1) state: units of ``unit_dims`` consecutive N are evaluated by a kernel
(``nkat_kernels`` on NumPy, ``nkat_cuda`` on CuPy) into one small partial each, and the
partials are folded in unit order with Chan's combination (``streaming``).

    job = NkatHighDim({"max_dimension": 10**6})
    for first in range(0, job.units_total(), 32):
        for part in job.compute(numpy, first, min(32, job.units_total() - first)):
            job.merge(part)
    result = job.finalize(context)

Params (anything else is an error that names the key):

    min_dimension   1 … max_dimension         default 1
    max_dimension   1 … 10^15                 default 100000 (the seed's)
    precision_mode  speed | balanced | precision   default balanced
    unit_dims       1 … 2^24                  default 65536
    curve_points    2 … 65536                 default 512
    mpmath_samples  1 … 4096                  default 64 (used by precision mode)

Precision modes: ``speed`` evaluates and sums each unit in float32 (N above 2^24 is
rounded to float32 first); ``balanced`` in float64; ``precision`` in float64 with the
corrected two-pass form inside each row and compensated (TwoSum) accumulation across rows
and units, and checks S at ``mpmath_samples`` evenly spaced N against a 256-bit mpmath
evaluation. Host-side folding is float64 in every mode. A unit's partial depends only on
the unit (never on the batch it was computed in), so any batching and any number of
interruptions give a byte-identical result on the same backend.

What the result reports (the seed's key names; "convergence" is its word for S):

summary
    total_dimensions      how many N were evaluated: max − min + 1.
    average_convergence   mean of S(N).
    average_consistency   mean of the consistency c(N) = 1 − |S(N) − S∞(N)|/S∞(N), with
                          S∞(N) = 1 + γ·ln(N/Nc) the leading asymptote. S∞ is zero at
                          N = Nc·e^(−1/γ) ≈ 0.241 and negative below, but for every
                          integer N ≥ 1 it is at least S∞(1) ≈ 0.333, so c(N) is always
                          defined here; it is negative where S strays from S∞ by more than
                          S∞ itself (N of a few units, where the e^(−δ(N−Nc)) term is big).
    peak_convergence      the largest S(N).
    convergence_stability 1/(1 + σ_S), σ_S the population standard deviation of S over
                          the whole range: 1 for a constant S, falling as S spreads.
performance               from the runtime, not deterministic: total_gpu_time (compute
                          seconds, on whichever backend), average_throughput (dimensions
                          per compute second), peak_gpu_utilization (percent, None where
                          no GPU reports it), max_memory_usage (peak memory, GiB),
                          fast_batch_throughput (dimensions per second of the fastest
                          tenth of the last worker process's batches: what a host that
                          switches between speeds moves least), epoch_throughput
                          (dimensions the last worker process computed per second of its
                          whole run loop: checkpoints, pauses and throttling included).
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
provenance                backend, device, precision mode, spec hash, epochs, restarts.
curve                     {"N": [...], "S": [...]}: S at min(curve_points, count) evenly
                          spaced N (both ends included), as the kernel computed them.
precision                 mode and dtype; in precision mode also the mpmath check: the
                          sampled N, the largest relative error |S − S_mp|/|S_mp| and the
                          N where it occurs.

Every value is plain JSON (None where undefined, never NaN or infinity). Everything but
``performance`` and ``provenance`` is deterministic.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import msgpack

from nkat.worker.job import Job, JobParamsError, RunContext
from nkat.worker.jobs import nkat_kernels as nk
from nkat.worker.jobs.streaming import Moments, RangeMoments, two_sum

MAX_DIMENSION = 10**15
PRECISION_MODES = {"speed": "float32", "balanced": "float64", "precision": "float64"}
MPMATH_BITS = 256
_SNAPSHOT_VERSION = 1

_DEFAULTS: dict[str, Any] = {
    "min_dimension": 1,
    "max_dimension": 100_000,
    "precision_mode": "balanced",
    "unit_dims": 1 << 16,
    "curve_points": 512,
    "mpmath_samples": 64,
}


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


class UnitPartial(NamedTuple):
    """What one unit contributes; depends on the unit alone."""

    unit: int
    lower: Moments             # S over the unit's N in the lower half (n == 0 if none)
    upper: Moments             # S over the unit's N in the upper half
    consistency: RangeMoments  # q = 1 − c over N
    max_s: float
    max_n: int
    min_s: float
    min_n: int
    curve: tuple[float, ...]   # S at the curve's N inside the unit, in order
    samples: tuple[float, ...]  # S at the mpmath samples' N inside the unit (precision)


class _UnitBuilder:
    """Folds a unit's rows (pieces) into its partial, in N order."""

    __slots__ = ("unit", "lower", "upper", "q", "best", "worst", "curve", "samples")

    def __init__(self, unit: int) -> None:
        self.unit = unit
        self.lower, self.upper, self.q = Moments(), Moments(), RangeMoments()
        self.best: tuple[float, int] | None = None
        self.worst: tuple[float, int] | None = None
        self.curve: list[float] = []
        self.samples: list[float] = []

    def extremes(self, max_s: float, max_n: int, min_s: float, min_n: int) -> None:
        # Strict comparisons: on a tie the earlier N stays, as argmax/argmin pick it.
        if self.best is None or max_s > self.best[0]:
            self.best = (max_s, max_n)
        if self.worst is None or min_s < self.worst[0]:
            self.worst = (min_s, min_n)

    def partial(self) -> UnitPartial:
        assert self.best is not None and self.worst is not None
        return UnitPartial(self.unit, self.lower, self.upper, self.q,
                           self.best[0], self.best[1], self.worst[0], self.worst[1],
                           tuple(self.curve), tuple(self.samples))


def _int_param(params: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    value = params.get(key, _DEFAULTS[key])
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
        ok, value = True, int(value)
    if not ok or not lo <= value <= hi:
        raise JobParamsError(f"{key} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def _fast_throughput(unit_seconds: Any, unit_dims: int) -> float | None:
    """Dims/s of the fastest tenth of this process's batches (see ``UnitTimes``)."""
    if not isinstance(unit_seconds, float) or unit_seconds <= 0:
        return None
    return _finite(unit_dims / unit_seconds)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _std(m: Moments) -> float | None:
    var = m.variance()
    return None if var is None else math.sqrt(var)


def _stability(std: float | None) -> float | None:
    return None if std is None else 1.0 / (1.0 + std)


class NkatHighDim(Job):
    """S(N) over a range of dimensions: moments, extremes, consistency, curve."""

    name = "nkat-highdim"
    default_batch_units = 32

    def __init__(self, params: Mapping[str, Any]) -> None:
        unknown = sorted(set(params) - set(_DEFAULTS))
        if unknown:
            raise JobParamsError(f"unknown param {unknown[0]!r}; "
                                 f"allowed: {', '.join(sorted(_DEFAULTS))}")
        self.max_n = _int_param(params, "max_dimension", 1, MAX_DIMENSION)
        self.min_n = _int_param(params, "min_dimension", 1, self.max_n)
        mode = params.get("precision_mode", _DEFAULTS["precision_mode"])
        if not isinstance(mode, str) or mode not in PRECISION_MODES:
            raise JobParamsError(f"precision_mode must be one of "
                                 f"{', '.join(PRECISION_MODES)}, got {mode!r}")
        self.mode: str = mode
        self.unit_dims = _int_param(params, "unit_dims", 1, 1 << 24)
        self.curve_points = _int_param(params, "curve_points", 2, 1 << 16)
        self.mpmath_samples = _int_param(params, "mpmath_samples", 1, 4096)
        self.precision = mode == "precision"
        self.dtype = PRECISION_MODES[mode]
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
        self._numpy: nk.NumpyKernel | None = None
        self._cuda: Any = None
        self._reset()

    def _reset(self) -> None:
        self.units_done = 0
        self.lower, self.upper, self.q = Moments(), Moments(), RangeMoments()
        self.best: tuple[float, int] | None = None
        self.worst: tuple[float, int] | None = None
        self.curve: list[float] = []
        self.samples: list[float] = []

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

    def _pieces(self, first: int, count: int) -> list[tuple[int, int, int]]:
        """(unit, first N, length) of each row: units cut at CHUNK from their start and at
        the half, so no row is longer than a chunk or straddles the two halves."""
        out: list[tuple[int, int, int]] = []
        for unit in range(first, first + count):
            a, b = self.unit_range(unit)
            cuts = list(range(a, b + 1, nk.CHUNK))
            if a < self.half_n <= b and self.half_n not in cuts:
                cuts.append(self.half_n)
                cuts.sort()
            cuts.append(b + 1)
            out.extend((unit, x, y - x) for x, y in zip(cuts, cuts[1:], strict=False))
        return out

    # -- compute ----------------------------------------------------------------------

    def compute(self, xp: Any, first: int, count: int) -> Sequence[UnitPartial]:
        if count < 1 or first < 0 or first + count > self.units_total():
            raise ValueError(f"units {first}+{count} outside 0..{self.units_total()}")
        if getattr(xp, "__name__", "") == "numpy":
            return self._compute_numpy(first, count)
        return self._compute_cuda(xp, first, count)

    def _probes_in(self, a: int, b: int) -> list[tuple[int, int]]:
        """(N, kind) of every probe in [a, b]: kind 0 a curve point, 1 an mpmath sample;
        in N order within each kind."""
        grids = [self.curve_grid] + ([self.sample_grid] if self.sample_grid else [])
        return [(grid.at(k), kind) for kind, grid in enumerate(grids)
                for k in grid.between(a, b)]

    def _compute_numpy(self, first: int, count: int) -> list[UnitPartial]:
        if self._numpy is None:
            self._numpy = nk.NumpyKernel(self.dtype, self.precision)
        kernel, comp = self._numpy, self.precision
        builders = {u: _UnitBuilder(u) for u in range(first, first + count)}
        pieces = self._pieces(first, count)
        i = 0
        while i < len(pieces):
            cols = pieces[i][2]
            # A chunk: consecutive rows of one length (consecutive N) filling CHUNK.
            j = i + 1
            limit = i + max(nk.CHUNK // cols, 1)
            while j < len(pieces) and j < limit and pieces[j][2] == cols:
                j += 1
            rows = pieces[i:j]
            n0 = rows[0][1]
            probes: list[tuple[int, list[float]]] = []  # (offset in chunk, destination)
            for unit, a, length in rows:
                b = builders[unit]
                probes += [(n - n0, b.samples if kind else b.curve)
                           for n, kind in self._probes_in(a, a + length - 1)]
            st = kernel.rows(n0, len(rows), cols, [off for off, _ in probes])
            for (_, sink), value in zip(probes, st.probes, strict=True):
                sink.append(value)
            for r, (unit, a, length) in enumerate(rows):
                b = builders[unit]
                mean, mean_lo = ((two_sum(st.shift[r], st.mean_d[r])) if comp
                                 else (st.shift[r] + st.mean_d[r], 0.0))
                side = b.upper if a >= self.half_n else b.lower
                side.add(Moments(length, mean, mean_lo, st.m2[r]), comp)
                b.q.add(RangeMoments(a, a + length - 1,
                                     Moments(length, st.mean_q[r], 0.0, st.m2_q[r]),
                                     st.co_q[r]), comp)
                b.extremes(st.max_s[r], a + st.arg_max[r], st.min_s[r], a + st.arg_min[r])
            i = j
        return [builders[u].partial() for u in range(first, first + count)]

    def _compute_cuda(self, xp: Any, first: int, count: int) -> list[UnitPartial]:
        from nkat.worker.jobs import nkat_cuda

        if self._cuda is None:
            self._cuda = nkat_cuda.CudaKernel(xp, self.dtype, self.precision)
        comp = self.precision
        probe_ns: list[int] = []
        owners: list[tuple[int, int]] = []  # (unit offset in the batch, kind)
        for u in range(count):
            for n, kind in self._probes_in(*self.unit_range(first + u)):
                probe_ns.append(n)
                owners.append((u, kind))
        a0, _ = self.unit_range(first)
        st = self._cuda.rows(a0, count, self.unit_dims, self.max_n, self.half_n, probe_ns)
        found: list[tuple[list[float], list[float]]] = [([], []) for _ in range(count)]
        for (u, kind), value in zip(owners, st.probes, strict=True):
            found[u][kind].append(value)
        out = []
        for u in range(count):
            a, b = self.unit_range(first + u)
            n_lo = min(max(self.half_n - a, 0), b - a + 1)
            n_hi = b - a + 1 - n_lo
            halves = []
            for n_side, mean_d, m2 in ((n_lo, st.mean_lo[u], st.m2_lo[u]),
                                       (n_hi, st.mean_hi[u], st.m2_hi[u])):
                if n_side == 0:
                    halves.append(Moments())
                    continue
                mean, mean_lo = ((two_sum(st.shift[u], mean_d)) if comp
                                 else (st.shift[u] + mean_d, 0.0))
                halves.append(Moments(n_side, mean, mean_lo, m2))
            q = RangeMoments(a, b, Moments(b - a + 1, st.mean_q[u], 0.0, st.m2_q[u]),
                             st.co_q[u])
            out.append(UnitPartial(first + u, halves[0], halves[1], q,
                                   st.max_s[u], a + st.arg_max[u],
                                   st.min_s[u], a + st.arg_min[u],
                                   tuple(found[u][0]), tuple(found[u][1])))
        return out

    # -- state ------------------------------------------------------------------------

    def merge(self, partial: UnitPartial) -> None:
        if partial.unit != self.units_done:
            raise ValueError(f"merge of unit {partial.unit}, expected {self.units_done}")
        comp = self.precision
        self.lower.add(partial.lower, comp)
        self.upper.add(partial.upper, comp)
        self.q.add(partial.consistency, comp)
        if self.best is None or partial.max_s > self.best[0]:
            self.best = (partial.max_s, partial.max_n)
        if self.worst is None or partial.min_s < self.worst[0]:
            self.worst = (partial.min_s, partial.min_n)
        self.curve.extend(partial.curve)
        self.samples.extend(partial.samples)
        self.units_done += 1

    def snapshot(self) -> bytes:
        packed: bytes = msgpack.packb({
            "v": _SNAPSHOT_VERSION,
            "params": self._fingerprint,
            "units_done": self.units_done,
            "lower": self.lower.to_list(),
            "upper": self.upper.to_list(),
            "q": self.q.to_list(),
            "max": list(self.best) if self.best else None,
            "min": list(self.worst) if self.worst else None,
            "curve": self.curve,
            "samples": self.samples,
        }, use_bin_type=True)
        return packed

    def restore(self, data: bytes) -> None:
        state = msgpack.unpackb(data, raw=False, strict_map_key=True)
        if state.get("v") != _SNAPSHOT_VERSION:
            raise ValueError(f"snapshot version {state.get('v')!r}, "
                             f"expected {_SNAPSHOT_VERSION}")
        if state["params"] != self._fingerprint:
            raise ValueError(f"snapshot of params {state['params']}, "
                             f"this job has {self._fingerprint}")
        self.units_done = int(state["units_done"])
        self.lower = Moments.from_list(state["lower"])
        self.upper = Moments.from_list(state["upper"])
        self.q = RangeMoments.from_list(state["q"])
        self.best = (float(state["max"][0]), int(state["max"][1])) if state["max"] else None
        self.worst = (float(state["min"][0]), int(state["min"][1])) if state["min"] else None
        self.curve = [float(v) for v in state["curve"]]
        self.samples = [float(v) for v in state["samples"]]

    # -- result -----------------------------------------------------------------------

    def finalize(self, context: RunContext) -> dict[str, Any]:
        total = Moments(*self.lower.to_list())
        total.add(self.upper, self.precision)
        std_s, std_hi, std_lo = _std(total), _std(self.upper), _std(self.lower)
        std_c = _std(self.q.y)
        mean_q = self.q.y.value()
        q_slope = self.q.slope()
        slope = None if q_slope is None else -q_slope
        peak_n = self.best[1] if self.best else None
        done = total.n
        seconds = context.compute_seconds
        halves = {}
        for name, m, first, last in (("lower_half", self.lower, self.min_n, self.half_n - 1),
                                     ("upper_half", self.upper, self.half_n, self.max_n)):
            halves[name] = {"first_dimension": first if first <= last else None,
                            "last_dimension": last if first <= last else None,
                            "count": m.n, "mean": _finite(m.value()), "std": _finite(_std(m))}
        return {
            "summary": {
                "total_dimensions": done,
                "min_dimension": self.min_n,
                "max_dimension": self.max_n,
                "average_convergence": _finite(total.value()),
                "average_consistency": None if mean_q is None else _finite(1.0 - mean_q),
                "peak_convergence": _finite(self.best[0]) if self.best else None,
                "convergence_stability": _finite(_stability(std_s)),
            },
            "performance": {
                "total_gpu_time": _finite(seconds),
                "average_throughput": _finite(done / seconds) if seconds > 0 else None,
                "peak_gpu_utilization": _finite(context.extra.get("peak_gpu_utilization")),
                "max_memory_usage": _finite(context.peak_memory_bytes / 2**30),
                "fast_batch_throughput": _fast_throughput(
                    context.extra.get("unit_seconds_p10"), self.unit_dims),
                "epoch_throughput": self._epoch_throughput(context.extra),
            },
            "theoretical_validation": {
                "consistency_trend": {
                    "slope": _finite(slope),
                    "improving": None if slope is None else slope > 0,
                    "stability": _finite(_stability(std_c)),
                },
                "convergence_pattern": {
                    "peak_dimension": peak_n,
                    "peak_value": _finite(self.best[0]) if self.best else None,
                    "theoretical_peak": nk.NC,
                    "peak_accuracy": (None if peak_n is None
                                      else _finite(1.0 - abs(peak_n - nk.NC) / nk.NC)),
                },
                "scaling_behavior": {
                    "high_dimension_stability": _finite(_stability(std_hi)),
                    "maintains_convergence": (None if std_lo is None or std_hi is None
                                              else std_hi <= std_lo),
                },
            },
            "statistics": {
                "std": _finite(std_s),
                "minimum": {"value": _finite(self.worst[0]) if self.worst else None,
                            "dimension": self.worst[1] if self.worst else None},
                "maximum": {"value": _finite(self.best[0]) if self.best else None,
                            "dimension": peak_n},
                **halves,
                "consistency_std": _finite(std_c),
            },
            "provenance": {
                "backend": context.backend,
                "device": context.device,
                "precision_mode": self.mode,
                "spec_hash": context.spec_hash,
                "epochs": context.epochs,
                "restarts": context.restarts,
            },
            "curve": {"N": self.curve_grid.values()[:len(self.curve)],
                      "S": [_finite(v) for v in self.curve]},
            "precision": self._precision_block(),
        }

    def _precision_block(self) -> dict[str, Any]:
        block: dict[str, Any] = {"mode": self.mode, "dtype": self.dtype}
        if self.sample_grid is None:
            return block
        ns = self.sample_grid.values()[:len(self.samples)]
        worst, worst_n = mpmath_check(ns, self.samples)
        block["mpmath"] = {"bits": MPMATH_BITS, "samples": ns,
                           "max_relative_error": _finite(worst), "worst_dimension": worst_n}
        return block


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
