"""A tiny deterministic job for the worker's tests (``tests.jobs.toy:Toy``).

Unit i yields an integer; the state is a running sum and an order-sensitive hash chain,
so a lost, doubled or reordered unit changes the result. ``unit_seconds`` makes units
slow with a GIL-releasing sleep, as a GPU kernel would be; ``fail_at`` makes ``compute``
raise at that unit, as a buggy job would.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from nkat.worker.job import Job, JobParamsError, RunContext

PARAMS = frozenset({"units", "unit_seconds", "fail_at"})


class Toy(Job):
    name = "toy"
    default_batch_units = 8

    def __init__(self, params: Mapping[str, Any]) -> None:
        unknown = set(params) - PARAMS
        if unknown:
            raise JobParamsError(f"unknown params {sorted(unknown)} (known: {sorted(PARAMS)})")
        self.units = params.get("units", 200)
        self.unit_seconds = params.get("unit_seconds", 0.0)
        self.fail_at = params.get("fail_at")
        if not isinstance(self.units, int) or isinstance(self.units, bool) or self.units < 1:
            raise JobParamsError(f"units must be a positive integer, got {self.units!r}")
        if not isinstance(self.unit_seconds, (int, float)) or self.unit_seconds < 0:
            raise JobParamsError(f"unit_seconds must be >= 0, got {self.unit_seconds!r}")
        self.total = 0
        self.chain = b""
        self.merged = 0

    def units_total(self) -> int:
        return self.units

    def compute(self, xp: Any, first: int, count: int) -> Sequence[int]:
        if self.fail_at is not None and first <= self.fail_at < first + count:
            raise RuntimeError(f"toy job bug at unit {self.fail_at}")
        if self.unit_seconds:
            time.sleep(self.unit_seconds * count)
        i = xp.arange(first, first + count, dtype=xp.int64)
        return [int(v) for v in ((i * i * 2654435761 + 12345) % 1000003).tolist()]

    def merge(self, partial: int) -> None:
        self.total += partial
        self.chain = hashlib.sha256(self.chain + partial.to_bytes(8, "little")).digest()
        self.merged += 1

    def snapshot(self) -> bytes:
        data: bytes = msgpack.packb([self.total, self.chain, self.merged], use_bin_type=True)
        return data

    def restore(self, data: bytes) -> None:
        self.total, self.chain, self.merged = msgpack.unpackb(data)

    def finalize(self, context: RunContext) -> dict[str, Any]:
        return {
            "units": self.units,
            "total": self.total,
            "chain": self.chain.hex(),
            "merged": self.merged,
            "performance": {
                "compute_seconds": context.compute_seconds,
                "peak_memory_bytes": context.peak_memory_bytes,
                "batches": context.extra.get("batches"),
            },
            "provenance": {
                "backend": context.backend,
                "device": context.device,
                "epochs": context.epochs,
                "restarts": context.restarts,
                "spec_hash": context.spec_hash,
            },
        }
