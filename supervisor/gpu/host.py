"""Where the GPU is watched from: native Linux, or Linux inside WSL2 on a Windows machine,
whose NVML lacks some features. Detected once from the kernel's release string.

    host = detect()                      # or detect("5.15.153.1-microsoft-standard-WSL2")
    host.wsl2                            # True inside WSL2
    host.describe()                      # "WSL2 (kernel 5.15.153.1-microsoft-standard-WSL2)"

WSL2 kernels are Microsoft's builds and say so in their release: "…-microsoft-standard"
(older) or "…-microsoft-standard-WSL2". WSL1 ("…-Microsoft", no "standard") runs no Linux
kernel and has no GPU at all. docs/wsl2.md lists the sources.
"""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path

OSRELEASE = Path("/proc/sys/kernel/osrelease")

# What NVML is known to lack under WSL2 whatever the GPU: the per-process lists answer
# with no processes at all (nvidia-smi shows "No running processes found").
WSL2_KNOWN_GAPS = ("per-process lists (NVML lists no processes)",)


@dataclasses.dataclass(frozen=True)
class Host:
    kernel_release: str

    @property
    def wsl(self) -> int | None:
        """2 inside WSL2, 1 inside WSL1, None elsewhere."""
        release = self.kernel_release.lower()
        if "microsoft" not in release:
            return None
        return 2 if "wsl2" in release or "microsoft-standard" in release else 1

    @property
    def wsl2(self) -> bool:
        return self.wsl == 2

    def describe(self) -> str:
        if self.wsl is None:
            return f"Linux (kernel {self.kernel_release})"
        return f"WSL{self.wsl} (kernel {self.kernel_release})"


def kernel_release() -> str:
    """The running kernel's release string."""
    try:
        return OSRELEASE.read_text().strip()
    except OSError:
        return platform.uname().release


def detect(release: str | None = None) -> Host:
    """The host, from ``release`` when given (tests), else from the running kernel."""
    return Host(release if release is not None else kernel_release())


# File systems through which WSL2 reaches the Windows drives (/mnt/c …).
_WINDOWS_FS = ("9p", "drvfs", "v9fs")


def state_dir_advice(state_dir: Path, host: Host, mounts: str | None = None) -> str | None:
    """A warning when, under WSL2, ``state_dir`` lies on a Windows drive (/mnt/c …)
    rather than on the distribution's own ext4 disk; None otherwise. ``mounts``: the text
    of /proc/self/mounts (read when None)."""
    if not host.wsl2:
        return None
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return None
    path = str(state_dir.resolve() if state_dir.exists() else state_dir.absolute())
    best, fstype = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, fstype = point, fields[2]
    if fstype not in _WINDOWS_FS:
        return None
    return (f"the state dir {state_dir} is on a Windows drive ({best}, {fstype}): under WSL2 "
            "its writes and fsyncs cross a file server to NTFS, slowly and with guarantees "
            "this project has not tested; keep it on the Linux file system (the default "
            "~/.local/state/nkat-supervise is)")
