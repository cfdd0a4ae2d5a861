"""Process guards: never outlive the supervisor, and dump every stack when asked.

A supervised worker asks the kernel to SIGKILL it when its parent dies (Linux prctl),
then checks that its parent is still the supervisor, since the parent may have died
before the request took effect. SIGUSR1 dumps all threads' stacks to stderr, which the
supervisor captures before it kills a hung worker (docs/architecture.md, "Spawning a worker").
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def install_faulthandler() -> None:
    """Stacks on fatal signals, and on SIGUSR1 without dying."""
    faulthandler.enable(all_threads=True)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)


def die_with_parent() -> bool:
    """Have the kernel SIGKILL us when the parent exits; False where unsupported.

    Linux ties this to the parent *thread* that forked us: the supervisor must spawn
    workers from a thread that lives as long as it does.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)) == 0


def parent_is(pid: int) -> bool:
    return os.getppid() == pid
