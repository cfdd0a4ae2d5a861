"""The read-only status page, on the shared HTTP layer: every run of a state directory
(``nkat-supervise serve``) or one live run beside its supervisor (``http_addr``).

    page = StatusPage(Board(state), "127.0.0.1:8765")
    page.start(); print(page.url); ...; page.close()
    page = StatusPage.for_run(run, config["http_addr"], token_file=config["http_token_file"])

Routes, GET only: ``/`` is the page, its CSS and JS inline (one request to the first paint;
a Content-Security-Policy allows exactly those two by hash, and no other origin);
``/api/runs?open=ID:VERSION,…`` is the board's snapshot as JSON, which the page polls.

Access: without a token (loopback only), a request must name a loopback host, so a page
elsewhere cannot read this one through DNS rebinding. With a token, a request presents it
as ``Authorization: Bearer …``, as ``?token=…``, or in the cookie that ``/?token=…`` sets
before redirecting to the bare address (the token leaves the address bar and history).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import html
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

from aiohttp import web

from nkat.supervisor.rundir import RUN_ID_RE, RunDir
from nkat.supervisor.web.access import is_loopback, listen_token, token_matches
from nkat.supervisor.web.board import MAX_OPEN, Board
from nkat.supervisor.web.server import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, HttpServer

COOKIE = "nkat_token"
COOKIE_MAX_AGE_S = 30 * 86400
SNAPSHOT_TIMEOUT_S = 15.0
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the address may carry ?token=
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
_UNAUTHORIZED = """<!doctype html><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>token needed</title><p>This status page needs its token. Open it as
<code>http://HOST:PORT/?token=…</code> with the token from the file given to
<code>--token-file</code> (or the config key <code>http_token_file</code>).</p>"""


def _hash_source(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


@functools.cache
def page_html(title: str) -> tuple[bytes, str]:
    """The page with its CSS and JS inline, and the Content-Security-Policy allowing them."""
    here = resources.files("nkat.supervisor.web")
    css = (here / "page.css").read_text(encoding="utf-8")
    js = (here / "page.js").read_text(encoding="utf-8")
    template = (here / "page.html").read_text(encoding="utf-8")
    body = (template.replace("{{TITLE}}", html.escape(title))
            .replace("{{STYLE}}", css).replace("{{SCRIPT}}", js))
    csp = (f"default-src 'none'; script-src {_hash_source(js)}; style-src {_hash_source(css)}; "
           "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'")
    return body.encode("utf-8"), csp


def parse_open(text: str) -> dict[str, int]:
    """``ID:VERSION,…`` (the runs open on the page) as {run id: version}; junk is skipped."""
    wanted: dict[str, int] = {}
    for item in text.split(",")[:MAX_OPEN]:
        run_id, _, version = item.partition(":")
        if RUN_ID_RE.fullmatch(run_id) and run_id not in (".", ".."):
            wanted[run_id] = int(version) if version.isdigit() else 0
    return wanted


def _host_name(host: str) -> str:
    """The name in a Host header, without its port (``[::1]:8765`` -> ``::1``)."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class StatusPage:
    """The page of ``board`` on ``addr``. ``token``: what readers must present (required,
    AccessError, unless ``addr`` is loopback)."""

    def __init__(self, board: Board, addr: str, *, token: str | None = None,
                 title: str | None = None, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT, what: str = "address") -> None:
        if token is None:
            listen_token(addr, None, what)  # AccessError off loopback
        self.board = board
        self.token = token
        self.title = title or f"{socket.gethostname()} · nkat-supervise"
        self._html, self._csp = page_html(self.title)
        self._executor: ThreadPoolExecutor | None = None
        self.server = HttpServer(addr, [web.get("/", self._index),
                                        web.get("/api/runs", self._runs)],
                                 middlewares=[self._guard], max_connections=max_connections,
                                 idle_timeout=idle_timeout, what=what)

    @classmethod
    def for_run(cls, run: RunDir, addr: str, *, token_file: str | None = None,
                **options: Any) -> StatusPage:
        """The page of one run, for its supervisor's ``http_addr`` / ``http_token_file``."""
        token = listen_token(addr, token_file, "http_addr")
        return cls(Board.for_run(run), addr, token=token, what="http_addr",
                   title=f"{run.run_id} · nkat-supervise", **options)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> None:
        """Bind and serve; OSError if the address cannot be bound."""
        # One thread reads the state directory for every request, in turn: the board is
        # not shared between threads, and a slow disk costs one thread, not one per reader.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nkat-http-board")
        try:
            self.server.start()
        except BaseException:
            self._executor.shutdown()
            self._executor = None
            raise

    def close(self) -> None:
        self.server.close()
        if self._executor is not None:
            self._executor.submit(self.board.close)
            self._executor.shutdown(wait=True)
            self._executor = None

    # Middleware and handlers (on the loop thread) -------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        refusal = self._refusal(request)
        if refusal is not None:
            refusal.headers.update(SECURITY_HEADERS)
            return refusal
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:  # the router's 404 and 405
            exc.headers.update(SECURITY_HEADERS)
            raise
        response.headers.update(SECURITY_HEADERS)
        return response

    def _refusal(self, request: web.Request) -> web.Response | None:
        if self.token is None:
            if is_loopback(_host_name(request.host)):
                return None
            return web.Response(status=403, text="this page answers to loopback names only "
                                "(127.0.0.1, localhost, [::1])\n")
        bearer = request.headers.get("Authorization", "")
        presented = [bearer[7:].strip() if bearer.startswith("Bearer ") else None,
                     request.query.get("token"), request.cookies.get(COOKIE)]
        if any(token_matches(self.token, p) for p in presented if p):
            return None
        return web.Response(status=401, text=_UNAUTHORIZED, content_type="text/html",
                            headers={"WWW-Authenticate": 'Bearer realm="nkat-supervise"'})

    async def _index(self, request: web.Request) -> web.Response:
        if self.token is not None and "token" in request.query:
            # Trade the token in the address for a cookie, and drop it from the address.
            response = web.Response(status=303, headers={"Location": request.path})
            response.set_cookie(COOKIE, self.token, max_age=COOKIE_MAX_AGE_S, path="/",
                                httponly=True, samesite="Strict")
            return response
        return web.Response(body=self._html, content_type="text/html", charset="utf-8",
                            headers={"Content-Security-Policy": self._csp})

    async def _runs(self, request: web.Request) -> web.Response:
        wanted = parse_open(request.query.get("open", ""))
        executor = self._executor
        if executor is None:
            raise web.HTTPServiceUnavailable(text="the status page is closing\n")
        loop = asyncio.get_running_loop()
        try:
            snapshot = await asyncio.wait_for(
                loop.run_in_executor(executor, self.board.snapshot, wanted), SNAPSHOT_TIMEOUT_S)
        except TimeoutError:
            return web.json_response({"error": "the state directory did not answer in time"},
                                     status=503, headers={"Retry-After": "2"})
        return web.json_response(snapshot, dumps=_compact)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)
