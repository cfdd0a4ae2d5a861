"""A real HTTP webhook receiver on 127.0.0.1 for the notification tests and benchmarks.

    with WebhookReceiver(fail_first=2) as hook:     # answers 503 twice, then 200
        notifier = Notifier(NotifySettings(notify_url=hook.url), log)
        ...
        hook.wait_for(1)                            # the received requests
        hook.received[0].json["event"]

Behaviours: ``fail_first`` (5xx the first n requests), ``status`` (answer every request
with it, e.g. 400), ``hang`` (hold every request open until the receiver closes),
``require_text`` (answer 400 to a body without a string ``text``, as a Slack incoming
webhook does).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclasses.dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    t_mono: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    def __init__(self, *, fail_first: int = 0, status: int = 200, hang: bool = False,
                 require_text: bool = False) -> None:
        self.fail_first = fail_first
        self.status = status
        self.hang = hang
        self.require_text = require_text
        self.received: list[Received] = []
        self.attempts = 0
        self._cond = threading.Condition()
        self._released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver._answer(self, body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # Polls for shutdown every 50 ms, not the default 0.5 s: closing waits 50 ms at most.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/hook"

    def _answer(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        with self._cond:
            self.attempts += 1
            attempt = self.attempts
        if self.hang:
            self._released.wait()
            return
        status = self.status
        if attempt <= self.fail_first:
            status = 503
        elif self.require_text:
            try:
                ok = isinstance(json.loads(body).get("text"), str)
            except ValueError:
                ok = False
            status = status if ok else 400
        if 200 <= status < 300:
            with self._cond:
                self.received.append(Received(handler.path, dict(handler.headers.items()),
                                              body, time.monotonic()))
                self._cond.notify_all()
        reply = b"ok" if status < 300 else b"invalid_payload" if status == 400 else b"busy"
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(reply)))
        handler.end_headers()
        handler.wfile.write(reply)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.received)} of {count} requests arrived")
                self._cond.wait(left)
            return list(self.received)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()


class RecordingLog:
    """Stands in for the run's structlog logger: keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def _add(self, level: str, event: str, **fields: Any) -> None:
        with self._lock:
            self.lines.append((level, event, fields))

    def debug(self, event: str, **fields: Any) -> None:
        self._add("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._add("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._add("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._add("error", event, **fields)

    def critical(self, event: str, **fields: Any) -> None:
        self._add("critical", event, **fields)

    def events(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [fields for _, event, fields in self.lines if event == name]
