"""Exact, order-independent sums of floating-point partials, in integer fixed point.

A job that splits its work (batches, shards, threads, GPU blocks) ends up adding
floating-point partials, and floating-point addition depends on its order. Here every
term is turned into an integer count of 2^-SCALE, truncated toward zero at that grain,
and integers add exactly in any order: the total depends on the terms only, never on
how they were grouped. The CUDA kernel (``nkat_cuda``) computes the very same integers
in 32-bit limbs held in int64 (:func:`from_limbs` turns them back).

    total = 0
    total += fixed(0.1)                    # 0.1·2^SCALE, truncated toward zero
    total += fixed(0.1, 3, -2)             # 3·0.1·2^(SCALE−2): an exact product first
    total += scaled(False, 7, 9, SCALE)    # the integer 63
    as_fraction(total)                     # the exact rational value

Every term is ``±a·b·2^pos`` for non-negative integers a, b: :func:`scaled` is the one
place where rounding happens (a right shift, toward zero), and the kernel mirrors it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

#: Bits below the binary point. q(N)² at N = 10^15 is about 2^-200; 2^-288 keeps such
#: sums to some 80 bits.
SCALE = 288
#: The kernel's limbs: LIMBS × 32 bits cover magnitudes below 2^(352 − SCALE) = 2^64.
LIMB_BITS = 32
LIMBS = 11


def split(x: float) -> tuple[bool, int, int]:
    """``(negative, m, e)`` with ``x == ±m·2^e`` exactly, m < 2^53 (0 for zero)."""
    if not math.isfinite(x):
        raise ValueError(f"non-finite partial {x!r}: a kernel produced NaN or infinity")
    if x == 0.0:
        return False, 0, 0
    fraction, exponent = math.frexp(abs(x))
    return x < 0.0, int(fraction * 2**53), exponent - 53


def scaled(negative: bool, a: int, b: int, pos: int) -> int:
    """``±a·b·2^pos`` truncated toward zero (a, b ≥ 0)."""
    value = a * b
    value = value << pos if pos >= 0 else value >> -pos
    return -value if negative else value


def fixed(x: float, mult: int = 1, shift: int = 0) -> int:
    """``mult·x·2^(SCALE + shift)`` truncated toward zero (mult ≥ 0): exact unless x has
    bits below the grain."""
    negative, mantissa, exponent = split(x)
    return scaled(negative, mantissa, mult, exponent + SCALE + shift)


_SHIFTS = tuple(LIMB_BITS * index for index in range(LIMBS))


def from_limbs(limbs: Sequence[int]) -> int:
    """The integer whose 32-bit limbs (least significant first, each a signed sum of
    chunks) are ``limbs``."""
    return sum(int(limb) << shift for limb, shift in zip(limbs, _SHIFTS, strict=True))


def as_fraction(value: int) -> Fraction:
    """The rational number a fixed-point integer stands for."""
    return Fraction(value, 1 << SCALE)


def to_bytes(value: int) -> bytes:
    """Canonical signed big-endian bytes (the shortest that hold the value)."""
    return value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True)


def from_bytes(data: bytes) -> int:
    return int.from_bytes(data, "big", signed=True)


def sqrt_fraction(value: Fraction) -> float:
    """√value rounded to a float (0 for value ≤ 0), through an integer square root with
    64 spare bits, so it is as good as the exact value allows."""
    if value <= 0:
        return 0.0
    num, den = value.numerator, value.denominator
    bits = max(0, 64 + 53 - (num.bit_length() - den.bit_length()) // 2)
    root = math.isqrt((num << (2 * bits)) // den)
    return float(Fraction(root, 1 << bits))
