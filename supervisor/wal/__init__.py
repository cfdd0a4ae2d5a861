"""The write-ahead log of a run: segments of checksummed msgpack records, checkpoint
states inline or in blob files, crash recovery, retention and a read-only verify.

    wal = Wal.open(run_dir / "wal", run_dir / "blobs", run=run_payload, create=False)
    wal.recovery                        # what open repaired or salvaged
    for warning in wal.recovery.warnings: ...   # damage the open went on despite
    for record in wal.records(): ...    # every retained record, in seq order
    resume = wal.latest_checkpoint()    # newest durable checkpoint, state verified
    wal.append(RecordType.EPOCH, {"epoch": 2, "reason": "restart", "t_wall": now})
    seq = wal.append_checkpoint({"ckpt_seq": 7, "epoch": 2, "units_done": 700,
                                 "digest": state_digest(state), "t_wall": now}, state)
    # seq returned: the checkpoint is durable; acknowledge it to the worker
    wal.close()
    report = verify(run_dir / "wal", run_dir / "blobs", identity=RunIdentity(run_id, spec_hash))

Every append returns only after write and fdatasync. Any I/O error raises WalIOError
and stops the log (fail-stop, no retry). Damage to what a resume needs (each shard's
newest checkpoint that verifies, and everything after it) raises WalCorrupted at open,
a deleted or truncated newest segment WalTruncated, unless ``salvage=True``; older
damage is a warning. Another run's log raises WalForeign. All file operations go
through a FileIO (``RealIO``, or ``RecordingIO`` to record them and rebuild crash
states in tests).

Modules: format (byte layout, docs/wal.md), reader, writer, prepare (segment files
ahead, in a thread), recovery, blobs, checkpoints, wal, verify, readonly (records
without opening for writing), errors, fileio; testing/: recording, crashcheck (the
crash campaign), corruption (the damage campaign).
"""

from .checkpoints import Checkpoint, CheckpointInfo
from .errors import WalCorrupted, WalError, WalForeign, WalIOError, WalTruncated
from .fileio import FileIO, RealIO
from .format import RecordType, RunIdentity
from .recovery import Recovery
from .verify import Problem, SegmentInfo, VerifyReport, verify
from .wal import Record, Wal

__all__ = [
    "Checkpoint",
    "CheckpointInfo",
    "FileIO",
    "Problem",
    "RealIO",
    "Record",
    "RecordType",
    "Recovery",
    "RunIdentity",
    "SegmentInfo",
    "VerifyReport",
    "Wal",
    "WalCorrupted",
    "WalError",
    "WalForeign",
    "WalIOError",
    "WalTruncated",
    "verify",
]
