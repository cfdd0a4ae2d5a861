"""WAL figures for ``python tools/bench.py wal``: append cost against a raw fdatasync loop,
recovery time of a full 64 MiB segment, time and peak memory of opening a 64 MiB segment
that holds little, and the crash campaign's count.

Runs in a fresh directory under the system temporary directory, whose file system is
printed too: on a tmpfs fdatasync is free and the ratio means nothing. The two sides
run in alternating rounds and the ratio is the median of the rounds' ratios, so drift
in a shared machine's load hits both sides alike.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

from benchlib import p50  # run as a script: tools/ is on the path

from nkat.supervisor.wal import RealIO, RecordType, Wal, verify
from nkat.supervisor.wal.format import frame_size, pack_payload
from nkat.supervisor.wal.testing.crashcheck import RUN, checkpoint_meta, run_campaign

RECORD_BYTES = 8192
SEGMENT_BYTES = 64 << 20


def run(args: argparse.Namespace) -> dict[str, object]:
    rounds, per_round = (5, 100) if args.quick else (15, 250)
    with tempfile.TemporaryDirectory(prefix="nkat-bench-wal-") as tmp:
        base = Path(tmp)
        ratio, wal_rate, raw_rate, new_segment = _append_rates(base, rounds, per_round)
        cold, warm, records = _recover_times(base / "recover")
        sparse_s, sparse_peak = _sparse_open(base / "sparse")
    start = time.perf_counter()
    campaign = (run_campaign(500, seed=0) if args.quick
                else run_campaign(None, seed=0, workloads=8, second_lives=16))
    return {
        "wal_append_vs_raw_fsync": round(ratio, 3),
        "wal_append_per_s": round(wal_rate, 1),
        "wal_raw_fdatasync_per_s": round(raw_rate, 1),
        "wal_record_bytes": RECORD_BYTES,
        "wal_new_segment_s": round(new_segment, 4),
        "wal_bench_fs": _fs_type(tempfile.gettempdir()),
        "wal_recover_s_64mib": round(cold, 4),
        "wal_recover_s_64mib_warm": round(warm, 4),
        "wal_recover_records": records,
        "wal_open_s_64mib_sparse": round(sparse_s, 4),
        "wal_open_peak_mib_64mib_sparse": round(sparse_peak / 2**20, 2),
        "wal_crash_states_checked": campaign.states_checked,
        "wal_crash_violations": len(campaign.violations),
        "wal_crash_campaign_s": round(time.perf_counter() - start, 2),
    }


def _event(pad: int) -> dict[str, object]:
    return {"kind": "bench", "data": b"\x5a" * pad}


def _pad_for_frame(size: int) -> int:
    """The data length that makes an event record's frame exactly ``size`` bytes."""
    pad = size - frame_size(len(pack_payload(_event(0))))
    while frame_size(len(pack_payload(_event(pad)))) > size:
        pad -= 1
    return pad


def _append_rates(base: Path, rounds: int, per_round: int) -> tuple[float, float, float,
                                                                     float]:
    """Records per second, one at a time, each durable before the next: through the
    Wal, and as raw write + fdatasync of the same bytes to a file in the same place.
    Rounds alternate which side goes first; the ratio is the median of the rounds'
    ratios. Also the seconds a new log's open takes, most of it preparing a segment:
    the pause one append in every segment's worth pays."""
    record = _event(_pad_for_frame(RECORD_BYTES))
    raw = os.urandom(RECORD_BYTES)
    start = time.perf_counter()
    wal = Wal.open(base / "wal", base / "blobs", run=RUN, segment_size=SEGMENT_BYTES)
    new_segment = time.perf_counter() - start
    fd = os.open(base / "raw.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def raw_round() -> float:
        start = time.perf_counter()
        for _ in range(per_round):
            os.write(fd, raw)
            os.fdatasync(fd)
        return per_round / (time.perf_counter() - start)

    def wal_round() -> float:
        start = time.perf_counter()
        for _ in range(per_round):
            wal.append(RecordType.EVENT, record)
        return per_round / (time.perf_counter() - start)

    wal_rates, raw_rates, ratios = [], [], []
    try:
        raw_round(), wal_round()  # warm up both
        for i in range(rounds):
            if i % 2:
                w, r = wal_round(), raw_round()
            else:
                r, w = raw_round(), wal_round()
            wal_rates.append(w)
            raw_rates.append(r)
            ratios.append(w / r)
    finally:
        os.close(fd)
        wal.close()
    return (p50(ratios), p50(wal_rates),
            p50(raw_rates), new_segment)


class _NoSyncIO(RealIO):
    """Builds the recovery fixture quickly; the bench syncs the result once at the end."""

    def fdatasync(self, fd: int) -> None:
        pass

    def fsync(self, fd: int) -> None:
        pass

    def fsync_dir(self, path: Path) -> None:
        pass


def _recover_times(base: Path) -> tuple[float, float, int]:
    """Seconds for Wal.open on an active segment filled to the brim with 8 KiB records:
    with its pages evicted from the page cache (cold), then with them cached (warm)."""
    wal_dir, blob_dir = base / "wal", base / "blobs"
    record = _event(_pad_for_frame(RECORD_BYTES))
    with Wal.open(wal_dir, blob_dir, run=RUN, segment_size=SEGMENT_BYTES, io=_NoSyncIO()) as wal:
        while wal.last_seq * RECORD_BYTES < SEGMENT_BYTES - 2 * RECORD_BYTES:
            wal.append(RecordType.EVENT, record)
    segment = wal_dir / "0000000000000000.wal"
    assert len(list(wal_dir.glob("*.wal"))) == 1  # one segment, full
    colds, warms = [], []
    for _ in range(3):
        _evict(segment)
        start = time.perf_counter()
        with Wal.open(wal_dir, blob_dir, segment_size=SEGMENT_BYTES) as wal:
            colds.append(time.perf_counter() - start)
            records = wal.recovery.records
        start = time.perf_counter()
        Wal.open(wal_dir, blob_dir, segment_size=SEGMENT_BYTES).close()
        warms.append(time.perf_counter() - start)
    return p50(colds), p50(warms), records


def _sparse_open(base: Path) -> tuple[float, int]:
    """A supervisor's restart: a 64 MiB segment holding 100 small checkpoints, opened
    and its records read. Seconds for Wal.open (page cache warm), and the peak bytes
    Python allocates (tracemalloc) for open, records, latest checkpoint and verify."""
    wal_dir, blob_dir = base / "wal", base / "blobs"
    with Wal.open(wal_dir, blob_dir, run=RUN, segment_size=SEGMENT_BYTES, io=_NoSyncIO()) as wal:
        for i in range(1, 101):
            state = os.urandom(2048)
            wal.append(RecordType.EVENT, {"kind": "progress", "t_wall": float(i)})
            wal.append_checkpoint(checkpoint_meta(i, state), state)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        Wal.open(wal_dir, blob_dir, segment_size=SEGMENT_BYTES).close()
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    try:
        with Wal.open(wal_dir, blob_dir, segment_size=SEGMENT_BYTES) as wal:
            for _ in wal.records():
                pass
            wal.latest_checkpoint()
        verify(wal_dir, blob_dir)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return p50(times), peak


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # only clean pages can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _fs_type(path: str) -> str:
    """The file system type of the mount holding ``path`` (from /proc/mounts)."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                point = fields[1]
                if (path == point or path.startswith(point.rstrip("/") + "/")) \
                        and len(point) > len(best):
                    best, kind = point, fields[2]
    except OSError:
        pass
    return kind
