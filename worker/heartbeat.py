"""What a beat says: the main loop's progress board, read on the I/O thread's clock.

The main loop publishes an immutable :class:`Progress` after each change (one attribute
store, atomic under the GIL); the I/O thread builds a beat from the latest one whenever
one is due. A beat therefore reports the main loop's progress as it last left it, so a
stuck main loop shows as a frozen ``progress_seq`` in beats that keep arriving.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import psutil

from nkat.protocol.messages import Beat

#: The ``stage`` values a beat carries (docs/architecture.md, "Conversation").
STAGES = ("startup", "compute", "paused", "checkpoint", "stopping", "finalize")


@dataclasses.dataclass(frozen=True)
class Progress:
    progress_seq: int = 0  # completed batches this epoch
    units_done: int = 0
    units_total: int = 0
    stage: str = "startup"
    batch_seconds: float = 0.0  # wall time of the last batch (compute and merge)
    batch_units: int = 0
    units_per_s: float = 0.0  # last batch's units over its time including throttle sleep
    duty: float = 1.0
    batch_size: int = 0  # units the next batch asks for
    ckpt_seq: int = 0  # newest acknowledged checkpoint
    device_bytes: int = 0  # device memory held after the last batch (0 on the host)


class Board:
    """Written by the main loop only; read by the I/O thread."""

    def __init__(self) -> None:
        self.current = Progress()

    def publish(self, **changes: Any) -> None:
        # Once or twice a batch: a plain constructor call costs a third of replace().
        self.current = Progress(**{**self.current.__dict__, **changes})


class Heartbeat:
    """Makes the next beat of this epoch (called from the I/O thread)."""

    def __init__(self, board: Board, epoch: int) -> None:
        self._board = board
        self._epoch = epoch
        self._seq = 0
        self._process = psutil.Process()

    def beat(self) -> Beat:
        p = self._board.current
        self._seq += 1
        metrics = {
            "batch_seconds": p.batch_seconds,
            "batch_units": p.batch_units,
            "units_per_s": p.units_per_s,
            "duty": p.duty,
            "rss_bytes": self._process.memory_info().rss,
            "batch_size": p.batch_size,
            "ckpt_seq": p.ckpt_seq,
            "device_bytes": p.device_bytes,
        }
        return Beat(epoch=self._epoch, seq=self._seq, progress_seq=p.progress_seq,
                    units_done=p.units_done, units_total=p.units_total, stage=p.stage,
                    t_mono=time.monotonic(), metrics=metrics)
