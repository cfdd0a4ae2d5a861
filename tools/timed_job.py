"""The NKAT job with a stopwatch on its checkpoints, for ``bench.py supervisor``.

A real worker runs it as a custom job (``--set job=timed_job:CheckpointTimedNkat``, with
tools/ on the ``PYTHONPATH`` the supervisor passes on to its worker). For each
checkpoint the runtime calls ``snapshot()``, hands the state to its I/O thread and goes
on to launch the next batch: the time from entering ``snapshot`` to that next
``compute_batch`` is what the checkpoint cost the compute loop. ``finalize`` adds the
times to the result as ``performance.checkpoint_stalls_s``; the computation and the
rest of the result are the NKAT job's own.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from nkat.worker.job import Pending, RunContext
from nkat.worker.jobs.nkat_highdim import NkatHighDim


class CheckpointTimedNkat(NkatHighDim):
    def __init__(self, params: Mapping[str, Any]) -> None:
        super().__init__(params)
        self._snapshot_at: float | None = None
        self.stalls: list[float] = []

    def snapshot(self) -> bytes:
        self._snapshot_at = time.perf_counter()
        return super().snapshot()

    def compute_batch(self, xp: Any, first: int, count: int) -> Pending:
        if self._snapshot_at is not None:
            self.stalls.append(time.perf_counter() - self._snapshot_at)
            self._snapshot_at = None
        return super().compute_batch(xp, first, count)

    def finalize(self, context: RunContext) -> dict[str, Any]:
        result = super().finalize(context)
        result["performance"]["checkpoint_stalls_s"] = self.stalls
        return result
