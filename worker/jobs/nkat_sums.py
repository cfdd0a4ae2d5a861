"""What the NKAT job adds up, exactly: the partial of any piece of the range, and its merge.

A kernel (NumPy rows, or the CUDA kernel's units) hands each piece of consecutive N over
as a few floating-point sums taken around a short shift; :func:`fold_s` and
:func:`fold_q` turn them into exact fixed-point sums (``fixedpoint``) of S, S², q, q²
and N·q. A :class:`Partial` holds those sums, the extremes of S and the probes (curve
and mpmath samples) of any set of units; partials add in any order and grouping with a
byte-identical outcome, which is what makes the result independent of batches,
interruptions, threads and shards.

    part = Partial.empty()
    fold_s(part.sums, upper, n, k, kb, sum_d, sum_dd)        # S over a piece
    fold_q(part.sums, n, c2, q_m, q_e, sum_e, sum_ee, sum_w2e) # q over it
    part.add(other)                                          # any order
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nkat.worker.jobs.fixedpoint import SCALE, fixed, from_bytes, scaled, to_bytes

#: The exact sums, in this order: ΣS and ΣS² over the lower and the upper half, Σq, Σq²
#: and ΣN·q over the whole range (each × 2^SCALE).
FIELDS = ("s1_lo", "s2_lo", "s1_hi", "s2_hi", "q1", "q2", "nq")
S1_LO, S2_LO, S1_HI, S2_HI, Q1, Q2, NQ = range(len(FIELDS))

#: Shifts are k·2^-SHIFT_BITS with k < 2^32 (S < 16): short enough that n·k and n·k²
#: are exact integer products, fine enough that S − K stays near the piece's spread.
#: float32 needs K exact in 24 bits.
SHIFT_BITS = {"float64": 28, "float32": 20}


def fold_s(sums: list[int], upper: bool, n: int, k: int, kb: int, sum_d: float,
           sum_dd: float) -> None:
    """Add n values of S to a half: sum_d = Σ(S − K) and sum_dd = Σ(S − K)², K = k·2^-kb.

    ΣS = n·K + Σd and ΣS² = n·K² + 2K·Σd + Σd², each term exact but for the grain.
    """
    at = S1_HI if upper else S1_LO
    sums[at] += ((n * k) << (SCALE - kb)) + fixed(sum_d)
    sums[at + 1] += (((n * k) * k) << (SCALE - 2 * kb)) + fixed(sum_d, 2 * k, -kb) \
        + fixed(sum_dd)


def fold_q(sums: list[int], n: int, c2: int, q_m: int, q_e: int, sum_e: float,
           sum_ee: float, sum_w2e: float) -> None:
    """Add n values of q over consecutive N centred on c2/2, taken around Q = q_m·2^q_e
    (0 outside precision mode): sum_e = Σ(q − Q), sum_ee = Σ(q − Q)², sum_w2e = Σw2·(q − Q)
    with w2 = 2N − c2.

    Σq = n·Q + Σe, Σq² = n·Q² + 2Q·Σe + Σe², ΣN·q = (c2·n·Q + c2·Σe + Σw2·e)/2 (Σw2 = 0).
    """
    sums[Q1] += scaled(False, n, q_m, q_e + SCALE) + fixed(sum_e)
    sums[Q2] += scaled(False, n * q_m, q_m, 2 * q_e + SCALE) + fixed(sum_e, 2 * q_m, q_e) \
        + fixed(sum_ee)
    sums[NQ] += scaled(False, n * q_m, c2, q_e + SCALE - 1) + fixed(sum_e, c2, -1) \
        + fixed(sum_w2e, 1, -1)


def better_max(a: tuple[float, int] | None, b: tuple[float, int] | None
               ) -> tuple[float, int] | None:
    """The larger (S, N); on a tie the smaller N, whatever the order of the arguments."""
    if a is None or b is None:
        return a if b is None else b
    return b if b[0] > a[0] or (b[0] == a[0] and b[1] < a[1]) else a


def better_min(a: tuple[float, int] | None, b: tuple[float, int] | None
               ) -> tuple[float, int] | None:
    if a is None or b is None:
        return a if b is None else b
    return b if b[0] < a[0] or (b[0] == a[0] and b[1] < a[1]) else a


@dataclasses.dataclass
class Partial:
    """Exact sums, extremes and probes of some set of units (order-free)."""

    sums: list[int]
    max: tuple[float, int] | None = None
    min: tuple[float, int] | None = None
    #: Curve and mpmath-sample values by their index on the job's grid.
    curve: dict[int, float] = dataclasses.field(default_factory=dict)
    samples: dict[int, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def empty(cls) -> Partial:
        return cls([0] * len(FIELDS))

    def add(self, other: Partial) -> None:
        for i, value in enumerate(other.sums):
            self.sums[i] += value
        self.max = better_max(self.max, other.max)
        self.min = better_min(self.min, other.min)
        for mine, theirs in ((self.curve, other.curve), (self.samples, other.samples)):
            overlap = mine.keys() & theirs.keys()
            if overlap:
                raise ValueError(f"probe {min(overlap)} computed twice: overlapping units")
            mine.update(theirs)

    def to_wire(self) -> dict[str, Any]:
        """Plain msgpack data, canonical: equal partials give equal bytes."""
        return {
            "sums": [to_bytes(v) for v in self.sums],
            "max": list(self.max) if self.max else None,
            "min": list(self.min) if self.min else None,
            "curve": [sorted(self.curve), [self.curve[k] for k in sorted(self.curve)]],
            "samples": [sorted(self.samples), [self.samples[k] for k in sorted(self.samples)]],
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Partial:
        sums = [from_bytes(v) for v in data["sums"]]
        if len(sums) != len(FIELDS):
            raise ValueError(f"{len(sums)} sums, expected {len(FIELDS)}")
        ext = [(float(x[0]), int(x[1])) if x else None for x in (data["max"], data["min"])]
        probes = [dict(zip((int(k) for k in keys), (float(v) for v in values), strict=True))
                  for keys, values in (data["curve"], data["samples"])]
        return cls(sums, ext[0], ext[1], probes[0], probes[1])
