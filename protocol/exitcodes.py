"""Worker exit codes: how a worker tells the supervisor why it ended.

The supervisor's restart policy classifies an exit from these codes (and from the
signal that killed the worker, if any). Shared here so neither side imports the other.
``nkat-supervise``'s own exit codes are ``nkat.supervisor.exitcode.ExitCode``.
"""

from __future__ import annotations

import enum


class WorkerExit(enum.IntEnum):
    #: The job finished, ``done`` was acknowledged.
    DONE = 0
    #: ``cmd stop`` obeyed: final checkpoint sent and acknowledged (or the deadline passed).
    STOPPED = 10
    #: Bad params or a bug in the job: restarting would fail the same way.
    FATAL = 11
    #: Out of GPU memory even at the smallest batch: worth a restart.
    OOM = 12
    #: A CUDA sticky error (illegal address, ECC …): this process's context is unusable.
    GPU_STICKY = 13
    #: The supervisor died or went silent; the worker exits rather than run unsupervised.
    ORPHANED = 14
    #: The worker could not start (bad environment, handshake refused or timed out).
    STARTUP = 15
    #: The backend asked for (NKAT_BACKEND=cupy) cannot be had here: CuPy does not import,
    #: or no CUDA device answers. Preceded by ``fail{kind: "backend_unavailable",
    #: fatal: false}`` once welcomed. Not fatal: a GPU can come back (after a reset, say),
    #: so it is retried like any failed start; the worker never falls back to another
    #: backend, since a result must not change backend silently.
    BACKEND_UNAVAILABLE = 16


# The members by name, as the callers on both sides spell them (exitcodes.FATAL).
DONE = WorkerExit.DONE
STOPPED = WorkerExit.STOPPED
FATAL = WorkerExit.FATAL
OOM = WorkerExit.OOM
GPU_STICKY = WorkerExit.GPU_STICKY
ORPHANED = WorkerExit.ORPHANED
STARTUP = WorkerExit.STARTUP
BACKEND_UNAVAILABLE = WorkerExit.BACKEND_UNAVAILABLE

#: Each code's name, for logs and reasons ("exit 12 (oom)").
NAMES = {code.value: code.name.lower() for code in WorkerExit}
