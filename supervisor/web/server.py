"""The one HTTP serving layer: aiohttp on a single background event-loop thread, with a bound
on connections and an idle timeout, so that no client can pin threads or file handles.

    server = HttpServer("127.0.0.1:0", [web.get("/metrics", handler)],
                        max_connections=32, idle_timeout=15.0)
    server.start()          # binds now (OSError if it cannot); serves from the loop thread
    server.url              # http://127.0.0.1:PORT/
    server.close()

Every HttpServer of a process shares one thread, ``nkat-http``, started with the first and
stopped with the last: no thread per connection, none per endpoint. Handlers run on that
loop, so anything that may block (files, ZeroMQ) goes to an executor of the caller's.

Connections (the policy is :class:`ConnectionLimiter`, pure over an injected clock):

- *idle* means no request in progress: before the first request's header is complete (a
  client trickling a header is idle), and between keep-alive requests;
- a connection idle for ``idle_timeout`` seconds is closed;
- at ``max_connections`` a newcomer evicts the longest-idle connection, so idle sockets
  cannot lock out a real request; it is closed at once only when every connection is
  mid-request.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nkat.supervisor.web.access import parse_addr

if TYPE_CHECKING:  # aiohttp is imported when a server starts, never by the supervisor's import
    from aiohttp import web

DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_IDLE_TIMEOUT = 15.0
MAX_REQUEST_BODY = 64 * 1024  # every route is a GET; a body is never needed
_BACKLOG = 128
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0
_SHUTDOWN_GRACE_S = 1.0  # an in-flight request gets this long when the server closes


@dataclass
class _Connection:
    close: Callable[[], None]
    idle_since: float | None  # None while a request is in progress
    in_flight: int = 0


class ConnectionLimiter:
    """Which connections to keep. Pure bookkeeping: the caller passes each connection's
    ``close`` and calls :meth:`expire` now and then; nothing here sleeps or touches a socket.

    Invariant: at most ``max_connections`` keys are held; a busy one is never closed here.
    """

    def __init__(self, max_connections: int, idle_timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_connections < 1 or idle_timeout <= 0:
            raise ValueError("max_connections must be >= 1 and idle_timeout > 0")
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.clock = clock
        self._held: dict[Hashable, _Connection] = {}
        self.evicted = 0
        self.refused = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._held)

    def admit(self, key: Hashable, close: Callable[[], None]) -> bool:
        """Hold a new connection, evicting the longest-idle one when full; False (the caller
        closes it) when every held connection is mid-request."""
        if len(self._held) >= self.max_connections:
            idle = [(c.idle_since, k) for k, c in self._held.items() if c.idle_since is not None]
            if not idle:
                self.refused += 1
                return False
            _since, victim = min(idle, key=lambda pair: pair[0])
            self._drop(victim)
            self.evicted += 1
        self._held[key] = _Connection(close, idle_since=self.clock())
        return True

    def busy(self, key: Hashable) -> None:
        """A request's header is complete and its handler runs."""
        conn = self._held.get(key)
        if conn is not None:
            conn.in_flight += 1
            conn.idle_since = None

    def idle(self, key: Hashable) -> None:
        """A request's handler returned."""
        conn = self._held.get(key)
        if conn is not None:
            conn.in_flight = max(0, conn.in_flight - 1)
            if conn.in_flight == 0:
                conn.idle_since = self.clock()

    def forget(self, key: Hashable) -> None:
        """The connection is gone (closed by either side)."""
        self._held.pop(key, None)

    def expire(self) -> int:
        """Close every connection idle for ``idle_timeout`` or longer; how many."""
        now = self.clock()
        stale = [k for k, c in self._held.items()
                 if c.idle_since is not None and now - c.idle_since >= self.idle_timeout]
        for key in stale:
            self._drop(key)
        self.expired += len(stale)
        return len(stale)

    def close_all(self) -> None:
        for key in list(self._held):
            self._drop(key)

    def _drop(self, key: Hashable) -> None:
        conn = self._held.pop(key)
        conn.close()


class _Guarded(asyncio.Protocol):
    """Puts the limiter in front of aiohttp's protocol for one connection, so a refused
    connection costs an accept and a close and never reaches aiohttp."""

    def __init__(self, inner: asyncio.Protocol, limiter: ConnectionLimiter) -> None:
        self._inner = inner
        self._limiter = limiter
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._limiter.admit(transport, transport.close):
            transport.abort()  # type: ignore[attr-defined]  # a socket transport can abort
            return
        self._transport = transport
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._transport is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._transport is not None else None

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._limiter.forget(self._transport)
            self._transport = None
            self._inner.connection_lost(exc)


class _SharedLoop:
    """One event loop on one daemon thread for every server of the process, reference
    counted: started by the first :meth:`acquire`, stopped by the last :meth:`release`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._users = 0

    def acquire(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="nkat-http",
                                                daemon=True)
                self._thread.start()
            self._users += 1
            return self._loop

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0 or self._loop is None:
                return
            loop, thread = self._loop, self._thread
            self._loop, self._thread = None, None
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(_STOP_TIMEOUT_S)
            if thread.is_alive():
                return  # a stuck handler: leave the daemon thread, never close a running loop
        loop.close()


_SHARED = _SharedLoop()


def loop_thread_alive() -> bool:
    """Whether the shared serving thread runs (tests check it stops with the last server)."""
    return any(t.name == "nkat-http" and t.is_alive() for t in threading.enumerate())


class HttpServer:
    """GET routes on ``addr``, served from the shared loop thread within the limits above."""

    def __init__(self, addr: str, routes: Iterable[web.RouteDef], *,
                 middlewares: Iterable[Any] = (),
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT, what: str = "address") -> None:
        self.addr = addr
        self.host, self._asked_port = parse_addr(addr, what)
        self.routes = list(routes)
        self.middlewares = list(middlewares)
        self.limiter = ConnectionLimiter(max_connections, idle_timeout)
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._reaper: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> None:
        """Bind now, in the caller's thread (OSError names the problem), then serve."""
        sock = _listen(self.host, self._asked_port)
        loop = _SHARED.acquire()
        try:
            asyncio.run_coroutine_threadsafe(self._serve(sock), loop).result(_START_TIMEOUT_S)
        except BaseException:
            sock.close()
            _SHARED.release()
            raise
        self._loop = loop
        self.port = int(sock.getsockname()[1])

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), loop).result(_STOP_TIMEOUT_S)
        finally:
            _SHARED.release()

    async def _serve(self, sock: socket.socket) -> None:
        from aiohttp import web

        limiter = self.limiter

        @web.middleware
        async def track(request: web.Request, handler: Any) -> web.StreamResponse:
            transport = request.transport
            limiter.busy(transport)
            try:
                response: web.StreamResponse = await handler(request)
                return response
            finally:
                limiter.idle(transport)

        app = web.Application(middlewares=[track, *self.middlewares],
                              client_max_size=MAX_REQUEST_BODY)
        app.add_routes(self.routes)
        # aiohttp's own keep-alive timer agrees with ours; the access log stays off (the
        # supervisor's log is JSON, and a scraper every few seconds is not news).
        runner = web.AppRunner(app, handle_signals=False, access_log=None,
                               keepalive_timeout=limiter.idle_timeout,
                               shutdown_timeout=_SHUTDOWN_GRACE_S)
        await runner.setup()
        protocol_factory = runner.server
        assert protocol_factory is not None  # set by setup()
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            lambda: _Guarded(protocol_factory(), limiter), sock=sock)
        self._runner = runner
        self._reaper = loop.create_task(self._reap())

    async def _reap(self) -> None:
        period = max(0.05, min(1.0, self.limiter.idle_timeout / 4))
        while True:
            await asyncio.sleep(period)
            self.limiter.expire()

    async def _stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
        self.limiter.close_all()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on the first address ``host`` names (IPv4 preferred)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    family, _type, _proto, _name, where = infos[0]
    sock = socket.create_server(where[:2], family=family, backlog=_BACKLOG)
    sock.setblocking(False)
    return sock
