"""Writing to stdout when its reader may go away (``| head``, a hung-up terminal).

A closed pipe is not an error for a command-line tool: the command stops writing, says
nothing on stderr, and keeps its exit code. ``silence_stdout`` points stdout at /dev/null
so that what is still buffered, and Python's flush at exit, go nowhere instead of failing.
Used by the CLI's entry point, by ``start``'s lines and by ``logs``.
"""

from __future__ import annotations

import contextlib
import os
import sys


def silence_stdout() -> None:
    """From now on, stdout writes go to /dev/null."""
    with contextlib.suppress(OSError):  # no file behind stdout (a test's capture): nothing to do
        target = sys.stdout.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, target)
        os.close(devnull)


def say(text: str) -> None:
    """One line on stdout, flushed; silence once the reader went away."""
    try:
        print(text, flush=True)
    except OSError:
        silence_stdout()
