"""The write-ahead log of a run: segments of checksummed msgpack records, checkpoint
states inline or in blob files, crash recovery, retention and a read-only verify.

    wal = Wal.open(run_dir / "wal", run_dir / "blobs", run=run_payload)
    wal.recovery                        # what open repaired or salvaged
    for record in wal.records(): ...    # every retained record, in seq order
    resume = wal.latest_checkpoint()    # newest durable checkpoint, state verified
    wal.append(RecordType.EPOCH, {"epoch": 2, "reason": "restart", "t_wall": now})
    seq = wal.append_checkpoint({"ckpt_seq": 7, "epoch": 2, "units_done": 700,
                                 "digest": state_digest(state), "t_wall": now}, state)
    # seq returned: the checkpoint is durable; acknowledge it to the worker
    wal.close()
    report = verify(run_dir / "wal", run_dir / "blobs")   # fsck, changes nothing

Every append returns only after write and fdatasync. Any I/O error raises WalIOError
and stops the log (fail-stop, no retry); damaged sealed or acknowledged data raises
WalCorrupted at open unless ``salvage=True``. All file operations go through a FileIO
(``RealIO``, or ``RecordingIO`` to record them and rebuild crash states in tests).

Modules: format (byte layout, docs/wal.md), reader, writer, recovery, blobs,
checkpoints, wal, verify, readonly (records without opening for writing), errors,
fileio, recording, crashcheck (the crash campaign).
"""

from .checkpoints import Checkpoint, CheckpointInfo
from .errors import WalCorrupted, WalError, WalIOError
from .fileio import FileIO, RealIO
from .format import RecordType
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
    "SegmentInfo",
    "VerifyReport",
    "Wal",
    "WalCorrupted",
    "WalError",
    "WalIOError",
    "verify",
]
