"""The exit codes of ``nkat-supervise``, one enum for every command (README lists them).

The worker's own exit codes, which only the supervisor reads, are the wire's business:
``nkat.protocol.exitcodes``.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    #: The command did what it was asked; ``start``: the run completed.
    COMPLETED = 0
    #: A check failed (``verify`` found damage) or there is nothing to show.
    CHECK_FAILED = 1
    #: A usage or config error; nothing was started or changed.
    USAGE = 2
    #: The run gave up (crash loop, fatal job error, GPU needs a reset, corrupt WAL, a
    #: failed write); it stays resumable.
    GAVE_UP = 3
    #: Stopped by the operator (or a signal); resumable.
    STOPPED = 4

    OK = 0  # an alias of COMPLETED for commands that are not runs
