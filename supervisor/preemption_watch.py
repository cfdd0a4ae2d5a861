"""Polls the cloud's instance metadata service for a preemption notice, in a background
thread, so the run loop only ever asks "is there one?" and never waits on the network.

    watch = PreemptionWatch(PreemptionSettings.from_config(config), log)  # None-safe: off
    ...
    notice = watch.notice()      # each turn of the loop: Notice or None, at once
    if notice:                   # durable checkpoint now, stop the worker, mark interrupted
        ...
    watch.close()

The first notice is kept (``notice()`` returns it from then on) and the thread stops.
Failures to reach the service are logged once per distinct error
(``preemption.poll_failed``, then ``preemption.poll_recovered``), never raised. The
answers are parsed by ``nkat.supervisor.preemption``; the HTTP here never uses a proxy
(the services live on link-local addresses that only this machine can reach).
"""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from nkat.supervisor.preemption import (
    AWS_ACTION_PATH,
    AWS_MAX_TTL_S,
    AWS_TOKEN_HEADER,
    AWS_TOKEN_PATH,
    AWS_TTL_HEADER,
    AZURE_EVENTS_PATH,
    AZURE_HEADERS,
    AZURE_NAME_PATH,
    GCP_HEADERS,
    GCP_PREEMPTED_PATH,
    MetadataError,
    Notice,
    PreemptionSettings,
    parse_aws,
    parse_azure,
    parse_gcp,
)

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _Answer:
    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status = status
        self.body = body
        self.headers = headers


class PreemptionWatch:
    """The preemption poller. ``log`` is the run's structlog logger (thread-safe).

    request_timeout: seconds one request may take. aws_token_ttl: the IMDSv2 session
    token's lifetime asked for (renewed a minute before it runs out, or on a 401).
    gcp_wait: seconds one GCP ``wait_for_change`` request may block (0: plain polling).
    """

    def __init__(
        self,
        settings: PreemptionSettings,
        log: Any,
        *,
        request_timeout: float = 2.0,
        aws_token_ttl: int = AWS_MAX_TTL_S,
        gcp_wait: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not 1 <= aws_token_ttl <= AWS_MAX_TTL_S:
            raise ValueError(f"aws_token_ttl must be in [1, {AWS_MAX_TTL_S}], not {aws_token_ttl}")
        self.settings = settings
        self.log = log
        self.polls = 0
        self.token_requests = 0
        self._timeout = request_timeout
        self._ttl = aws_token_ttl
        self._gcp_wait = gcp_wait
        self._clock = clock
        self._wall = wall
        self._notice: Notice | None = None
        self._found = threading.Event()
        self._stop = threading.Event()
        self._last_error: str | None = None
        self._token: str | None = None
        self._token_renew_at = 0.0
        self._thread: threading.Thread | None = None
        if settings.enabled:
            self._thread = threading.Thread(target=self._run, name="preemption", daemon=True)
            self._thread.start()

    # -- the shell's side ------------------------------------------------------------------

    def notice(self) -> Notice | None:
        """The notice, once one was seen; None until then (and when preemption is off)."""
        return self._notice

    def wait(self, timeout: float) -> Notice | None:
        """Block up to ``timeout`` seconds for a notice (tests and benchmarks)."""
        self._found.wait(timeout)
        return self._notice

    def close(self, timeout: float = 1.0) -> None:
        """Stop polling. A request under way is abandoned (the thread is a daemon)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        cloud = self.settings.preemption
        self._log("info", "preemption.watching", cloud=cloud, url=self.settings.base_url,
                  interval_s=self.settings.preemption_poll_interval)
        poll: Callable[[], Notice | None] = {
            "aws": self._poll_aws, "gcp": self._poll_gcp, "azure": self._poll_azure,
        }[cloud]
        while not self._stop.is_set():
            try:
                notice = poll()
            except (MetadataError, OSError, ValueError) as exc:
                self._failed(exc)
                self._stop.wait(self.settings.preemption_poll_interval)
                continue
            except Exception as exc:  # noqa: BLE001 - the poller must never die silently
                self._failed(exc)
                self._stop.wait(self.settings.preemption_poll_interval)
                continue
            if self._last_error is not None:
                self._log("info", "preemption.poll_recovered", cloud=cloud,
                          after=self._last_error)
                self._last_error = None
            if notice is not None:
                self._notice = notice
                self._found.set()
                left = notice.seconds_left(self._wall())
                self._log("warning", "preemption.notice", cloud=cloud, detail=notice.detail,
                          deadline_in_s=None if left is None else round(left, 1))
                return
            if not self._waits_for_change():
                self._stop.wait(self.settings.preemption_poll_interval)

    def _failed(self, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if error != self._last_error:
            self._last_error = error
            self._log("warning", "preemption.poll_failed", cloud=self.settings.preemption,
                      error=error, advice="the run goes on; a notice cannot be seen until "
                                          "the metadata service answers")

    # -- AWS: IMDSv2 -----------------------------------------------------------------------

    def _poll_aws(self) -> Notice | None:
        if self._token is None or self._clock() >= self._token_renew_at:
            self._renew_token()
        answer = self._get(AWS_ACTION_PATH, {AWS_TOKEN_HEADER: self._token or ""})
        if answer.status == 401:
            # The token expired or was revoked (a restarted IMDS): renew it and ask again.
            self._renew_token()
            answer = self._get(AWS_ACTION_PATH, {AWS_TOKEN_HEADER: self._token or ""})
        return parse_aws(answer.status, answer.body, self._wall(), self._clock())

    def _renew_token(self) -> None:
        asked_at = self._clock()
        answer = self._request("PUT", AWS_TOKEN_PATH, {AWS_TTL_HEADER: str(self._ttl)})
        self.token_requests += 1
        if answer.status != 200 or not answer.body.strip():
            self._token = None
            raise MetadataError(f"IMDSv2 token request answered HTTP {answer.status}")
        self._token = answer.body.decode().strip()
        # Renew a minute early (or at half the TTL for short ones), never at the edge.
        self._token_renew_at = asked_at + self._ttl - min(60.0, self._ttl / 2)

    # -- GCP -------------------------------------------------------------------------------

    _gcp_etag: str | None = None

    def _waits_for_change(self) -> bool:
        """The next poll is a hanging GET (GCP, with an ETag): no sleep before it."""
        return (self.settings.preemption == "gcp" and self._gcp_etag is not None
                and self._gcp_wait > 0)

    def _poll_gcp(self) -> Notice | None:
        path, timeout = GCP_PREEMPTED_PATH, self._timeout
        long_poll = self._waits_for_change()
        if long_poll:
            # Hanging GET: answers at once if the value changed since the ETag, else when
            # it changes or after timeout_sec (the value unchanged).
            path += (f"?wait_for_change=true&last_etag={self._gcp_etag}"
                     f"&timeout_sec={max(1, int(self._gcp_wait))}")
            timeout += self._gcp_wait
        answer = self._get(path, GCP_HEADERS, timeout=timeout)
        if long_poll and answer.status == 400:
            self._gcp_wait = 0  # no hanging GETs here: plain polling from now on
            self._log("info", "preemption.long_poll_refused", cloud="gcp",
                      detail=answer.body.decode(errors="replace")[:200])
            return None
        notice = parse_gcp(answer.status, answer.body, self._wall(), self._clock())
        self._gcp_etag = answer.headers.get("etag") or None
        return notice

    # -- Azure -----------------------------------------------------------------------------

    _azure_vm: str | None = None
    _azure_vm_asked = False

    def _poll_azure(self) -> Notice | None:
        if not self._azure_vm_asked:
            self._azure_vm_asked = True
            with contextlib.suppress(OSError):
                answer = self._get(AZURE_NAME_PATH, AZURE_HEADERS)
                if answer.status == 200 and answer.body.strip():
                    self._azure_vm = answer.body.decode().strip()
            if self._azure_vm is None:
                self._log("info", "preemption.vm_name_unknown", cloud="azure",
                          detail="acting on Preempt events for any VM in the set")
        answer = self._get(AZURE_EVENTS_PATH, AZURE_HEADERS)
        return parse_azure(answer.status, answer.body, self._wall(), self._clock(),
                           self._azure_vm)

    # -- HTTP ------------------------------------------------------------------------------

    def _get(self, path: str, headers: dict[str, str], *,
             timeout: float | None = None) -> _Answer:
        return self._request("GET", path, headers, timeout=timeout)

    def _request(self, method: str, path: str, headers: dict[str, str], *,
                 timeout: float | None = None) -> _Answer:
        """One request; HTTP error statuses are answers, not exceptions (404 and 401
        mean something here); a network failure raises OSError."""
        self.polls += 1
        request = urllib.request.Request(self.settings.base_url + path, headers=headers,
                                         method=method)
        try:
            with _NO_PROXY.open(request, timeout=timeout or self._timeout) as response:
                return _Answer(response.status, response.read(1 << 20),
                               {k.lower(): v for k, v in response.headers.items()})
        except urllib.error.HTTPError as exc:
            return _Answer(exc.code, exc.read(1 << 16),
                           {k.lower(): v for k, v in exc.headers.items()})
        except urllib.error.URLError as exc:
            reason = exc.reason
            raise OSError(f"{self.settings.base_url}: {reason}") from None

    def _log(self, level: str, name: str, **fields: Any) -> None:
        with contextlib.suppress(Exception):
            getattr(self.log, level)(name, **fields)
