"""The supervisor's process against the OS's limits: what a failed write means for the
operator (:func:`io_advice`), and the file-handle limit checked before a run starts.

    advice = io_advice(exc)        # "the disk is full: free space, then run start again"
"""

from __future__ import annotations

import errno


def io_advice(exc: BaseException) -> str:
    """What to do about a failed write or open, by its cause."""
    code = getattr(exc, "errno", None) or getattr(exc.__cause__, "errno", None)
    if code in (errno.EMFILE, errno.ENFILE):
        return ("the supervisor ran out of file handles: raise the limit (ulimit -n, or "
                "LimitNOFILE= in the systemd unit) or find what holds them, then run start "
                "again")
    if code == errno.EROFS:
        return "the state directory is read-only: remount it read-write, then run start again"
    if code == errno.EIO:
        return "the device reported an I/O error: check it (dmesg), then run start again"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full: free space, then run start again"
    return "free disk space or fix the device, then run start again"
