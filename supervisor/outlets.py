"""Where a run's news goes, for the shell: status.json, the events socket, the progress
line, the Prometheus metrics and the notifications (docs/architecture.md). Each outlet
is optional; none of them can stop the run.

    outlets = Outlets(run_dir, log, esock, on_status=display.update, metrics=metrics,
                      notifier=notifier)
    outlets.write_status(status); outlets.publish({"t": "beat", ...})
    outlets.count(effect); outlets.notify(effect, t_wall); outlets.quiet()
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from nkat.supervisor import controller as c
from nkat.supervisor.notify import NotifyEvent
from nkat.supervisor.oslimits import io_advice
from nkat.supervisor.rundir import RunDir

if TYPE_CHECKING:  # each is imported only when it is asked for
    from nkat.supervisor.notifier import Notifier
    from nkat.supervisor.ops.metrics import RunMetrics


class Outlets:
    def __init__(self, run_dir: RunDir, log: Any, esock: zmq.Socket[bytes], *,
                 on_status: Callable[[dict[str, Any]], None] | None = None,
                 metrics: RunMetrics | None = None, notifier: Notifier | None = None) -> None:
        self.run_dir, self.log, self.esock = run_dir, log, esock
        self.on_status, self.metrics, self.notifier = on_status, metrics, notifier

    def write_status(self, status: dict[str, Any]) -> None:
        try:
            self.run_dir.write_status(status)
        except OSError as exc:
            self.log.warning("status.write_failed", error=str(exc), advice=io_advice(exc))
        self.publish({"t": "status", **status})
        if self.on_status:
            self.on_status(status)
        if self.metrics:
            self.metrics.update_from_status(status)

    def publish(self, payload: dict[str, Any]) -> None:
        """A line for ``sock/events`` subscribers; nobody listening costs nothing."""
        with contextlib.suppress(zmq.ZMQError):
            self.esock.send(json.dumps(payload).encode(), zmq.NOBLOCK)

    def count(self, effect: c.Count) -> None:
        if self.metrics is not None:
            self.metrics.count(effect.metric.value, effect.value, effect.label)

    def notify(self, effect: c.Notify, t_wall: float) -> None:
        if self.notifier is not None:
            self.notifier.submit(NotifyEvent(effect.kind, self.run_dir.run_id, effect.fields,
                                             t_wall))

    def quiet(self) -> None:
        """The terminal went away: no more progress line."""
        self.on_status = None
