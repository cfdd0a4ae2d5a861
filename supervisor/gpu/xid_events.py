"""The NVML event thread: waits for Xid and double-bit ECC events and queues them.

NVML delivers critical events through an event set that one thread blocks on. The wait
has a timeout (`nvmlEventSetWait_v2`, NVMLError_Timeout when nothing came) so the thread
notices `stop()` within `timeout_ms`; the supervisor drains the queue from its own loop.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping

from nkat.supervisor.gpu.gate import Failure, Gate
from nkat.supervisor.gpu.sensor import XidEvent

# Event types asked for, newest last; bindings that lack a name simply do not ask for it.
_EVENT_KINDS = (
    ("nvmlEventTypeXidCriticalError", "xid"),
    ("nvmlEventTypeDoubleBitEccError", "ecc_double_bit"),
    ("nvmlEventTypeGpuUnavailableError", "gpu_unavailable"),
)

# After an unexpected wait error, pause before waiting again rather than spin on it.
ERROR_BACKOFF_S = 1.0


class XidWatcher:
    """Registers devices on one NVML event set and waits on it in a daemon thread."""

    def __init__(
        self,
        gate: Gate,
        handles: Mapping[int, object],
        clock: Callable[[], float],
        timeout_ms: int = 500,
    ) -> None:
        self._gate = gate
        self._handles = handles
        self._clock = clock
        self._timeout_ms = timeout_ms
        self._kinds = {gate.const(name): kind for name, kind in _EVENT_KINDS if gate.has(name)}
        # Older bindings only have the unversioned wait; newer ones alias it to _v2.
        self._wait = (
            "nvmlEventSetWait_v2" if gate.has("nvmlEventSetWait_v2") else "nvmlEventSetWait"
        )
        self._queue: deque[XidEvent] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._event_set: object = None
        self.last_error: str | None = None

    def start(self) -> list[str]:
        """Create the event set, register every device, start the thread.

        Returns notes for the operator: devices that report no events, or why there is no
        event thread at all. Starts no thread when no device could be registered.
        """
        event_set = self._gate("nvmlEventSetCreate")
        if isinstance(event_set, Failure):
            return [f"Xid events off: {event_set.message}"]
        wanted = 0
        for bit in self._kinds:
            wanted |= bit
        notes = []
        registered = 0
        for index, handle in self._handles.items():
            supported = self._gate("nvmlDeviceGetSupportedEventTypes", handle)
            mask = wanted if isinstance(supported, Failure) else wanted & supported
            if not mask:
                notes.append(f"GPU {index}: reports no Xid or ECC events")
                continue
            result = self._gate("nvmlDeviceRegisterEvents", handle, mask, event_set)
            if isinstance(result, Failure):
                notes.append(f"GPU {index}: Xid events off: {result.message}")
                continue
            registered += 1
        if not registered:
            self._gate("nvmlEventSetFree", event_set)
            return notes
        self._event_set = event_set
        self._thread = threading.Thread(target=self._run, name="nvml-xid-events", daemon=True)
        self._thread.start()
        return notes

    def drain(self) -> list[XidEvent]:
        """Events received since the last call, oldest first."""
        with self._lock:
            events = list(self._queue)
            self._queue.clear()
        return events

    def stop(self) -> None:
        """Stop the thread (within about one wait timeout) and free the event set."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._timeout_ms / 1000 + 1.0)
            # Freeing a set that a hung wait still holds is undefined: leak it instead.
            if self._thread.is_alive():
                return
            self._thread = None
        if self._event_set is not None:
            self._gate("nvmlEventSetFree", self._event_set)
            self._event_set = None

    def _run(self) -> None:
        while not self._stop.is_set():
            data = self._gate(self._wait, self._event_set, self._timeout_ms)
            if isinstance(data, Failure):
                if data.kind != "timeout":
                    self.last_error = data.message
                    self._stop.wait(ERROR_BACKOFF_S)
                continue
            kind = self._kinds.get(int(data.eventType))
            if kind is None:
                continue
            index = self._gate("nvmlDeviceGetIndex", data.device)
            event = XidEvent(
                t_mono=self._clock(),
                index=-1 if isinstance(index, Failure) else int(index),
                xid=int(data.eventData) if kind == "xid" else None,
                kind=kind,
            )
            with self._lock:
                self._queue.append(event)
