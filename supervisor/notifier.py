"""Delivers notifications without ever holding up the run: a bounded queue, one
background thread, retries with backoff, and a flush at exit for the final event.

    notifier = Notifier(NotifySettings.from_config(config), log)   # thread starts here
    notifier.submit(NotifyEvent("run.gave_up", run_id, {"reason": why}, time.time()))
    ...
    notifier.close(timeout=10.0)    # before the supervisor exits: flushes what it can

``submit`` returns at once and never raises. A full queue drops the oldest event (and
counts it) rather than block. Each event goes to ``notify_url`` (a POST of
``notify.payload``) and to ``notify_command`` (the same JSON on stdin), each retried with
exponential backoff and jitter (tenacity) while the receiver fails or times out, for
``retry_for`` seconds at most. A receiver that rejects the document (HTTP 4xx other than
408 and 429, or a command that cannot be started) is not retried. Every outcome is logged
(``notify.delivered``, ``notify.retrying``, ``notify.failed``, ``notify.dropped``,
``notify.unsent``); nothing here raises into the caller.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import tenacity

from nkat.supervisor.notify import NotifyEvent, NotifySettings, http_headers, payload

# HTTP answers worth another try: the receiver is busy or timed out, not refusing us.
_RETRY_STATUS = frozenset({408, 425, 429})


class DeliveryFailed(Exception):
    """One attempt failed; ``retry`` says whether another attempt can help."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


@dataclasses.dataclass
class NotifyStats:
    """Counts since start: events submitted, and per target the deliveries and failures."""

    submitted: int = 0
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    unsent: int = 0


@dataclasses.dataclass(frozen=True)
class _Target:
    name: str  # "url" or "command"
    send: Callable[[NotifyEvent, bytes], None]


@dataclasses.dataclass
class _Queued:
    event: NotifyEvent
    submitted_mono: float


class Notifier:
    """The notification shell. ``log`` is the run's structlog logger (thread-safe).

    queue_size: events held while the receiver is slow (the oldest is dropped past it).
    retry_for: seconds one event is retried before it is given up.
    backoff_initial, backoff_max: the exponential backoff between attempts, in seconds.
    host: the name the document gives for this machine (default: the hostname).
    """

    def __init__(
        self,
        settings: NotifySettings,
        log: Any,
        *,
        queue_size: int = 64,
        retry_for: float = 600.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        host: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, not {queue_size}")
        self.settings = settings
        self.log = log
        self.stats = NotifyStats()
        self._host = host or socket.gethostname()
        self._clock = clock
        self._retry_for = retry_for
        self._backoff = tenacity.wait_exponential(
            multiplier=backoff_initial, max=backoff_max
        ) + tenacity.wait_random(0, backoff_initial)
        self._targets = self._make_targets(settings)
        self._queue: collections.deque[_Queued] = collections.deque()
        self._queue_size = queue_size
        self._cond = threading.Condition()
        self._closing_at: float | None = None  # monotonic deadline once close() began
        self._idle = True
        self._thread: threading.Thread | None = None
        if self._targets:
            self._thread = threading.Thread(target=self._run, name="notifier", daemon=True)
            self._thread.start()

    # -- the caller's side ---------------------------------------------------------------

    def submit(self, event: NotifyEvent) -> None:
        """Queue ``event`` for delivery; returns at once, never raises."""
        if self._thread is None:
            return
        with self._cond:
            if self._closing_at is not None:
                return
            self.stats.submitted += 1
            dropped = None
            if len(self._queue) >= self._queue_size:
                dropped = self._queue.popleft()
                self.stats.dropped += 1
            self._queue.append(_Queued(event, self._clock()))
            self._cond.notify()
        if dropped is not None:
            self._log("warning", "notify.dropped", kind=dropped.event.kind,
                      dropped=self.stats.dropped, queue_size=self._queue_size)

    def close(self, timeout: float) -> NotifyStats:
        """Deliver what can be delivered within ``timeout`` seconds, then stop.

        Final events (``run.completed``, ``run.gave_up``) go first. Retries are cut short
        at the deadline; what is still queued then is logged as ``notify.unsent``.
        """
        thread = self._thread
        if thread is None:
            return self.stats
        with self._cond:
            if self._closing_at is None:
                self._closing_at = self._clock() + max(0.0, timeout)
            self._cond.notify_all()
        thread.join(timeout=max(0.0, timeout) + 1.0)
        with self._cond:
            left = [q.event.kind for q in self._queue]
            self._queue.clear()
        if left:
            self.stats.unsent += len(left)
            self._log("error", "notify.unsent", kinds=left, count=len(left),
                      reason=f"not delivered within the {timeout:g} s given at exit")
        return self.stats

    def wait_idle(self, timeout: float) -> bool:
        """True once the queue is empty and no delivery is under way (for tests and
        benchmarks; the run loop never waits)."""
        deadline = self._clock() + timeout
        with self._cond:
            while self._queue or not self._idle:
                left = deadline - self._clock()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            try:
                self._deliver(item)
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any bug
                self.stats.failed += 1
                self._log("error", "notify.failed", kind=item.event.kind, target="all",
                          attempts=0, error=f"{type(exc).__name__}: {exc}")
            finally:
                with self._cond:
                    self._idle = True
                    self._cond.notify_all()

    def _next(self) -> _Queued | None:
        with self._cond:
            while not self._queue:
                if self._closing_at is not None:
                    return None
                self._cond.wait()
            if self._closing_at is not None and self._clock() >= self._closing_at:
                return None
            item = self._queue[0]
            if self._closing_at is not None:
                # At exit the final event is what the operator waits for: it goes first.
                item = next((q for q in self._queue if q.event.final), item)
            self._queue.remove(item)
            self._idle = False
            return item

    def _deliver(self, item: _Queued) -> None:
        event = item.event
        body = json.dumps(payload(event, self._host), separators=(",", ":"),
                          default=str).encode()
        for target in self._targets:
            attempts = 0

            def attempt(target: _Target = target) -> None:
                nonlocal attempts
                attempts += 1
                target.send(event, body)

            retrying = tenacity.Retrying(
                retry=tenacity.retry_if_exception(_worth_retrying),
                wait=self._backoff,
                stop=tenacity.stop_any(tenacity.stop_after_delay(self._retry_for),
                                       _StopAtDeadline(lambda: self._closing_at, self._clock)),
                sleep=self._sleep,
                before_sleep=functools.partial(self._retrying, event, target),
                reraise=True,
            )
            try:
                retrying(attempt)
            except DeliveryFailed as exc:
                self.stats.failed += 1
                why = "rejected" if not exc.retry else (
                    "out of time at exit" if self._closing() else
                    f"gave up after {attempts} attempts")
                self._log("error", "notify.failed", kind=event.kind, target=target.name,
                          attempts=attempts, error=str(exc), reason=why)
            else:
                self.stats.delivered += 1
                self._log("info", "notify.delivered", kind=event.kind, target=target.name,
                          attempts=attempts,
                          ms=round((self._clock() - item.submitted_mono) * 1000, 1))

    def _retrying(self, event: NotifyEvent, target: _Target,
                  state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        self._log("warning", "notify.retrying", kind=event.kind, target=target.name,
                  attempt=state.attempt_number, error=str(error), retry_in_s=round(delay, 2))

    def _closing(self) -> bool:
        return self._closing_at is not None

    def _sleep(self, seconds: float) -> None:
        """Backoff sleep that close() cuts short at its deadline."""
        end = self._clock() + seconds
        with self._cond:
            while True:
                now = self._clock()
                limit = end if self._closing_at is None else min(end, self._closing_at)
                if now >= limit:
                    return
                self._cond.wait(limit - now)

    def _log(self, level: str, name: str, **fields: Any) -> None:
        with contextlib.suppress(Exception):  # a broken log must not stop deliveries
            getattr(self.log, level)(name, **fields)

    # -- targets ---------------------------------------------------------------------------

    def _make_targets(self, settings: NotifySettings) -> list[_Target]:
        targets = []
        if settings.notify_url is not None:
            targets.append(_Target("url", self._post))
        if settings.notify_command is not None:
            argv = shlex.split(settings.notify_command)
            targets.append(_Target("command", lambda event, body: run_command(
                argv, body, settings.notify_timeout, event)))
        return targets

    def _post(self, event: NotifyEvent, body: bytes) -> None:
        assert self.settings.notify_url is not None
        post_json(self.settings.notify_url, body, http_headers(event),
                  self.settings.notify_timeout)


class _StopAtDeadline(tenacity.stop.stop_base):
    """Stop retrying once close() has begun and its deadline has passed."""

    def __init__(self, deadline: Callable[[], float | None], clock: Callable[[], float]) -> None:
        self._deadline = deadline
        self._clock = clock

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        deadline = self._deadline()
        return deadline is not None and self._clock() >= deadline


def _worth_retrying(exc: BaseException) -> bool:
    return isinstance(exc, DeliveryFailed) and exc.retry


def post_json(url: str, body: bytes, headers: dict[str, str], timeout: float) -> None:
    """One POST; DeliveryFailed unless the receiver answers 2xx. ``timeout`` bounds each
    socket operation (connect, send, each read)."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(65536)
    except urllib.error.HTTPError as exc:
        detail = exc.read(300).decode(errors="replace").strip()
        retry = exc.code >= 500 or exc.code in _RETRY_STATUS
        raise DeliveryFailed(f"HTTP {exc.code} {exc.reason}: {detail}".rstrip(": "),
                             retry=retry) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise DeliveryFailed(f"{url}: {reason}", retry=True) from None


def run_command(argv: list[str], body: bytes, timeout: float, event: NotifyEvent) -> None:
    """Run ``argv`` with ``body`` on stdin; DeliveryFailed unless it exits 0 in time.
    It runs in its own process group, all of which is killed at the timeout."""
    env = {**os.environ, "NKAT_NOTIFY_EVENT": event.kind, "NKAT_RUN_ID": event.run_id}
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=env, start_new_session=True)
    except OSError as exc:
        raise DeliveryFailed(f"cannot run {argv[0]!r}: {exc.strerror or exc}",
                             retry=False) from None
    try:
        _, err = proc.communicate(body, timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=1.0)  # the group is dead: its pipes close
        raise DeliveryFailed(f"{argv[0]} did not finish within {timeout:g} s",
                             retry=True) from None
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip()[-300:]
        raise DeliveryFailed(f"{argv[0]} exited {proc.returncode}: {tail}".rstrip(": "),
                             retry=True)
