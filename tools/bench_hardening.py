"""Hardening figures for ``python tools/bench.py hardening`` (issue 10): each part runs
one family of attacks or damage and reports how many cases ran and how many ended in a
wrong state. PARTS lists them; a part is ``(args) -> dict`` of figures. The run loop's
parts (forged messages, checkpoint gaps, a metrics flood, malformed configs) are in
``bench_hardening_loop``.

WAL damage (``corruption_cases``, ``corruption_wrong_state``: must be 0): the damage
campaign of ``nkat.supervisor.wal.testing.corruption`` on a stopped run's log of two
segments and 40 checkpoints, a bit flip in every frame of every record type, in every
segment header byte and in every blob chunk, blobs missing, the newest segment deleted
or truncated, stray files, another run's log. Each case must end in a correct resume,
a clear refusal naming the damage, or a salvage that keeps the newest intact checkpoint.

A start without fallocate (``first_append_s_no_fallocate``): a new log's first append
on a file system that cannot preallocate and writes zeros at ``SLOW_MB_S``, against
the seconds the segment's zeros take in the background (``segment_prepare_s_no_fallocate``).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import bench_hardening_loop  # run as a script: tools/ is on the path

from nkat.supervisor.wal import RealIO, RecordType, Wal
from nkat.supervisor.wal.testing.corruption import run_damage_campaign
from nkat.supervisor.wal.testing.crashcheck import RUN

#: Zero-writing speed of the simulated file system without fallocate (a FUSE mount).
SLOW_MB_S = 20.0


def wal_damage(args: argparse.Namespace) -> dict[str, object]:
    start = time.perf_counter()
    result = run_damage_campaign(sample=150 if args.quick else None)
    for wrong in result.wrong[:20]:
        print(f"wrong state: {wrong}", file=sys.stderr)
    return {
        "corruption_cases": result.cases,
        "corruption_wrong_state": len(result.wrong),
        "corruption_campaign_s": round(time.perf_counter() - start, 2),
    }


class _SlowNoFallocateIO(RealIO):
    """No fallocate, and zeros written at SLOW_MB_S; ``prepared`` is set when a whole
    segment's zeros are written."""

    def __init__(self, segment: int) -> None:
        self.segment = segment
        self.zeros = 0
        self.prepared = threading.Event()

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        if len(data) > 4096 and not any(data):
            time.sleep(len(data) / (SLOW_MB_S * 1e6))
            self.zeros += len(data)
            if self.zeros >= self.segment:
                self.prepared.set()
        super().pwrite(fd, data, offset)


def start_without_fallocate(args: argparse.Namespace) -> dict[str, object]:
    segment = (16 if args.quick else 64) << 20
    with tempfile.TemporaryDirectory(prefix="nkat-bench-hardening-") as tmp:
        io = _SlowNoFallocateIO(segment)
        start = time.perf_counter()
        wal = Wal.open(Path(tmp) / "wal", Path(tmp) / "blobs", run=RUN, io=io,
                       segment_size=segment)
        wal.append(RecordType.EVENT, {"kind": "first"})
        first = time.perf_counter() - start
        io.prepared.wait(segment / (SLOW_MB_S * 1e6) * 4 + 30)
        prepared = time.perf_counter() - start
        wal.close()
    return {"first_append_s_no_fallocate": round(first, 3),
            "segment_prepare_s_no_fallocate": round(prepared, 3),
            "segment_mib_no_fallocate": segment >> 20}


PARTS: tuple[Callable[[argparse.Namespace], dict[str, object]], ...] = (
    wal_damage, start_without_fallocate, *bench_hardening_loop.PARTS)


def run(args: argparse.Namespace) -> dict[str, object]:
    figures: dict[str, object] = {}
    for part in PARTS:
        figures.update(part(args))
    return figures
