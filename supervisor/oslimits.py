"""The supervisor's process against the OS's limits: what a failed write means for the
operator (:func:`io_advice`), and the file-handle limit checked before a run starts.

    advice = io_advice(exc)        # "the disk is full: free space, then run start again"
"""

from __future__ import annotations

import errno


def io_advice(exc: BaseException) -> str:
    """What to do about a failed write or open, by its cause (an error that knows its
    own advice, such as a Ray node's unreachable journal, says it)."""
    own = getattr(exc, "advice", None)
    if isinstance(own, str):
        return own
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


#: File handles a supervisor needs at least: its sockets and their bounded connections
#: (``MAX_PEERS`` each on sock/worker and sock/control), the HTTP servers' bounded
#: connections, the WAL, the log, the worker's pipes, and room to spare.
MIN_NOFILE = 256
#: What the soft limit is raised to when the hard limit allows: far above anything the
#: supervisor holds, so that libzmq (which aborts when accept() meets EMFILE) never gets
#: near the limit even while its sockets are being flooded.
WANT_NOFILE = 1 << 16


class FdLimitError(RuntimeError):
    """The process may not open enough files; the message says how to raise the limit."""


def ensure_nofile(minimum: int = MIN_NOFILE, want: int = WANT_NOFILE) -> int:
    """Raise the soft limit on open files toward the hard one (up to ``want``); the limit
    now in force. FdLimitError when even the hard limit is below ``minimum``."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = want if hard == resource.RLIM_INFINITY else min(hard, want)
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
        soft = ceiling
    if soft != resource.RLIM_INFINITY and soft < minimum:
        raise FdLimitError(
            f"this process may open only {soft} files (ulimit -n; hard limit {hard}); the "
            f"supervisor needs at least {minimum}: raise it (ulimit -n 4096, or "
            f"LimitNOFILE=4096 in a systemd unit) and run start again")
    return int(soft)
