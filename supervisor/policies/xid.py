"""Xid events (NVIDIA driver error reports) and a lost GPU: what each means for the run.

    verdict = classify_xid(79)     # XidVerdict(XidAction.GPU_RESET, "Xid 79: ...")
    verdict = classify_gpu_lost()  # the NVML gate reported the GPU gone
    verdict = classify_event(event.kind, event.xid)   # a sensor XidEvent

``restart_worker`` → end the worker (KillReason.XID_RESTART) and let the restart policy
restart it; ``gpu_reset`` → end it (KillReason.GPU_RESET) and give up, because nothing
started on this GPU will work until it is reset or the machine rebooted; ``log`` → record.

NVML's Xid events are per device, not per process: an Xid 13/31/43 raised by another
program on the same GPU also restarts our worker, which costs at most the work since the
last checkpoint. Errors that only poison a context (e.g. Xid 94, contained ECC) are logged
here; the worker then exits with ``GPU_STICKY`` and is restarted as a crash.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

#: What to tell the operator when the GPU must be reset.
GPU_RESET_ADVICE = "the GPU needs a reset (nvidia-smi --gpu-reset) or the machine a reboot"

_RESTART = {
    13: "graphics engine exception (a kernel faulted)",
    31: "GPU memory page fault",
    43: "GPU stopped processing (the context was torn down)",
}
_RESET = {
    48: "double-bit ECC error",
    79: "GPU has fallen off the bus",
    95: "uncontained ECC error",
}


class XidAction(enum.StrEnum):
    RESTART_WORKER = "restart_worker"
    GPU_RESET = "gpu_reset"
    LOG = "log"


class XidVerdict(NamedTuple):
    action: XidAction
    message: str


def classify_xid(xid: int) -> XidVerdict:
    if xid in _RESTART:
        return XidVerdict(XidAction.RESTART_WORKER,
                          f"Xid {xid}: {_RESTART[xid]}; restarting the worker")
    if xid in _RESET:
        return XidVerdict(XidAction.GPU_RESET,
                          f"Xid {xid}: {_RESET[xid]}; {GPU_RESET_ADVICE}")
    return XidVerdict(XidAction.LOG, f"Xid {xid}: logged, no action")


def classify_gpu_lost() -> XidVerdict:
    return XidVerdict(XidAction.GPU_RESET, f"GPU lost; {GPU_RESET_ADVICE}")


def classify_event(kind: str, xid: int | None) -> XidVerdict:
    """A sensor event: ``xid`` (with its code), ``ecc_double_bit`` or ``gpu_unavailable``."""
    if kind == "xid" and xid is not None:
        return classify_xid(xid)
    if kind == "ecc_double_bit":
        return XidVerdict(XidAction.GPU_RESET, f"double-bit ECC error; {GPU_RESET_ADVICE}")
    return classify_gpu_lost()
