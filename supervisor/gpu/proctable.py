"""Which processes hold a GPU, read from the process table when NVML cannot list them
(WSL2, or a driver that does not support the per-process query).

    gpu_device_holders()     # pids with /dev/nvidia*, /dev/nvidiactl, /dev/nvidia-uvm or
                             # /dev/dxg (WSL2's GPU device) open, e.g. (4242, 4250)

A CUDA process keeps these device files open for as long as it has a context, so a
killed worker that is no longer among them has let go of the GPU, as far as the process
table can tell. What it cannot tell: a context the driver keeps after its process is
gone (NVML would still list that pid), and which GPU a pid uses (/dev/dxg serves all of
them). Processes of other users whose file descriptors cannot be read are skipped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

GPU_DEVICE = re.compile(r"^/dev/(dxg|nvidia(\d+|ctl|-uvm|-uvm-tools))$")


def gpu_device_holders(proc: Path = Path("/proc"),
                       device: re.Pattern[str] = GPU_DEVICE) -> tuple[int, ...] | None:
    """Sorted pids holding a file whose path matches ``device``; None when ``proc``
    cannot be read at all (no procfs: nothing can be said)."""
    try:
        entries = os.listdir(proc)
    except OSError:
        return None
    holders = []
    for name in entries:
        if not name.isdigit():
            continue
        fd_dir = proc / name / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if device.match(target):
                holders.append(int(name))
                break
    return tuple(sorted(holders))
