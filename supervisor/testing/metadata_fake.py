"""A stand-in for a cloud's instance metadata service on 127.0.0.1, speaking each cloud's
documented format, for the preemption tests and the preemption benchmark.

    with FakeMetadataServer("aws") as imds:           # also "gcp", "azure"
        config = {"preemption": "aws", "metadata_url": imds.url}
        ...
        t_notice = imds.announce(in_s=120)             # time.monotonic() of the notice
        ...
        imds.expire_tokens()                           # AWS: every session token now 401s

What it enforces, as the real services do (docs/preemption.md has the sources):
aws — ``PUT /latest/api/token`` needs ``X-aws-ec2-metadata-token-ttl-seconds`` in
[1, 21600] (else 400); a GET without a valid, unexpired token is 401;
``spot/instance-action`` is 404 until announced. gcp — every request needs
``Metadata-Flavor: Google`` (else 403); ``instance/preempted`` is ``FALSE``/``TRUE`` with
an ETag, and ``?wait_for_change=true`` holds the request until the value differs from
``last_etag`` or ``timeout_sec`` passes. azure — every request needs ``Metadata: true``
and an ``api-version`` (else 400); ``scheduledevents`` lists the events with a
``DocumentIncarnation`` that grows on every change; ``instance/compute/name`` is the VM.
"""

from __future__ import annotations

import email.utils
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from nkat.supervisor.preemption import AWS_MAX_TTL_S, AZURE_API_VERSION

H = TypeVar("H")


class FakeMetadataServer:
    """One cloud's metadata service. ``vm_name`` is the Azure VM's name."""

    def __init__(self, cloud: str, *, vm_name: str = "nkat-vm-0") -> None:
        if cloud not in ("aws", "gcp", "azure"):
            raise ValueError(f"no fake for cloud {cloud!r}")
        self.cloud = cloud
        self.vm_name = vm_name
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self._cond = threading.Condition()
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self._notice: dict[str, Any] | None = None  # AWS instance-action
        self._preempted = False  # GCP
        self._etag = 1
        self._events: list[dict[str, Any]] = []  # Azure
        self._incarnation = 1
        self._closing = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_PUT(self) -> None:
                fake._handle(self, "PUT")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # Polls for shutdown every 50 ms, not the default 0.5 s: closing waits 50 ms at most.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    # -- what a test does ------------------------------------------------------------------

    def announce(self, in_s: float = 120.0, *, action: str = "terminate",
                 vm: str | None = None, event_type: str = "Preempt") -> float:
        """Publish a notice due ``in_s`` seconds from now; returns time.monotonic() at the
        moment it became visible. ``vm``: the Azure VM it names (default: this one)."""
        due = time.time() + in_s
        with self._cond:
            if self.cloud == "aws":
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(due))
                self._notice = {"action": action, "time": stamp}
            elif self.cloud == "gcp":
                self._preempted = True
                self._etag += 1
            else:
                self._events.append({
                    "EventId": secrets.token_hex(8), "EventType": event_type,
                    "ResourceType": "VirtualMachine", "Resources": [vm or self.vm_name],
                    "EventStatus": "Scheduled",
                    "NotBefore": email.utils.formatdate(due, usegmt=True),
                    "Description": "fake event", "EventSource": "Platform",
                    "DurationInSeconds": -1})
                self._incarnation += 1
            self._cond.notify_all()
            return time.monotonic()

    def clear(self) -> None:
        """Withdraw every notice."""
        with self._cond:
            self._notice, self._preempted = None, False
            self._events.clear()
            self._etag += 1
            self._incarnation += 1
            self._cond.notify_all()

    def expire_tokens(self) -> None:
        """AWS: every session token handed out so far expires now."""
        with self._cond:
            self._tokens.clear()

    def count(self, method: str, path_prefix: str) -> int:
        with self._cond:
            return sum(1 for m, p in self.requests if m == method and p.startswith(path_prefix))

    # -- the service -----------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        with self._cond:
            self.requests.append((method, handler.path))
        route = getattr(self, f"_{self.cloud}")
        status, body, headers = route(method, handler)
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _aws(self, method: str, h: BaseHTTPRequestHandler) -> tuple[int, bytes, dict[str, str]]:
        path = urllib.parse.urlsplit(h.path).path
        if method == "PUT" and path == "/latest/api/token":
            ttl = h.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= AWS_MAX_TTL_S:
                return 400, b"Missing or Invalid Parameters", {}
            token = secrets.token_urlsafe(24)
            with self._cond:
                self._tokens[token] = time.monotonic() + int(ttl)
            return 200, token.encode(), {"X-aws-ec2-metadata-token-ttl-seconds": ttl}
        if method != "GET":
            return 405, b"Method Not Allowed", {}
        token = h.headers.get("X-aws-ec2-metadata-token", "")
        with self._cond:
            expiry = self._tokens.get(token)
            if expiry is None or expiry <= time.monotonic():
                return 401, b"Unauthorized", {}
            notice = self._notice
        if path != "/latest/meta-data/spot/instance-action" or notice is None:
            return 404, b"Not Found", {}
        return 200, json.dumps(notice).encode(), {"Content-Type": "text/plain"}

    def _gcp(self, method: str, h: BaseHTTPRequestHandler) -> tuple[int, bytes, dict[str, str]]:
        if h.headers.get("Metadata-Flavor") != "Google":
            return 403, b"Missing Metadata-Flavor:Google header.", {}
        url = urllib.parse.urlsplit(h.path)
        if method != "GET" or url.path != "/computeMetadata/v1/instance/preempted":
            return 404, b"Not Found", {}
        query = urllib.parse.parse_qs(url.query)
        with self._cond:
            if query.get("wait_for_change") == ["true"]:
                last = query.get("last_etag", [""])[0]
                limit = time.monotonic() + float(query.get("timeout_sec", ["3600"])[0])
                while str(self._etag) == last and not self._closing:
                    left = limit - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            value, etag = ("TRUE" if self._preempted else "FALSE"), str(self._etag)
        return 200, value.encode(), {"ETag": etag, "Content-Type": "application/text"}

    def _azure(self, method: str, h: BaseHTTPRequestHandler) -> tuple[int, bytes, dict[str, str]]:
        url = urllib.parse.urlsplit(h.path)
        query = urllib.parse.parse_qs(url.query)
        if h.headers.get("Metadata") != "true" or "api-version" not in query:
            return 400, json.dumps({"error": "Bad request"}).encode(), {}
        if method != "GET":
            return 405, b"", {}
        if url.path == "/metadata/instance/compute/name":
            return 200, self.vm_name.encode(), {"Content-Type": "text/plain"}
        if url.path != "/metadata/scheduledevents":
            return 404, b"", {}
        if query["api-version"] != [AZURE_API_VERSION]:
            return 400, json.dumps({"error": "Bad api-version"}).encode(), {}
        with self._cond:
            document = {"DocumentIncarnation": self._incarnation,
                        "Events": [dict(e) for e in self._events]}
        return 200, json.dumps(document).encode(), {"Content-Type": "application/json"}

    def __enter__(self) -> FakeMetadataServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()


def measure_notice_latency_ms(
    cloud: str,
    start: Callable[[str], H],
    reached: Callable[[H, float], float],
    stop: Callable[[H], None],
    *,
    trials: int = 10,
    settle_s: float | Callable[[], float] = 0.0,
) -> list[float]:
    """Milliseconds from a published notice to what ``reached`` waits for, per trial.

    Each trial starts a fresh FakeMetadataServer for ``cloud`` and calls ``start(url)``,
    which starts the system under test against it and returns a handle once it is ready
    (a PreemptionWatch; a supervised run with ``preemption`` and ``metadata_url`` set).
    After ``settle_s`` seconds (a callable: drawn per trial, e.g. a random phase of the
    poll cycle) the notice is published; ``reached(handle, t_notice)`` blocks until
    the outcome (a notice seen; a durable checkpoint) and returns its time.monotonic();
    ``stop(handle)`` cleans up. The benchmarks take its p50 with tools/benchlib.py's one
    percentile definition.
    """
    samples = []
    for _ in range(trials):
        with FakeMetadataServer(cloud) as service:
            handle = start(service.url)
            try:
                time.sleep(settle_s() if callable(settle_s) else settle_s)
                t_notice = service.announce()
                samples.append((reached(handle, t_notice) - t_notice) * 1000.0)
            finally:
                stop(handle)
    return samples
