"""A ZeroMQ ROUTER on an ipc endpoint that watches how many connections it holds, so
that nobody can spend the supervisor's file handles through its sockets.

    router = BoundedRouter(ctx, "ipc://…/sock/control", max_peers=32, max_bytes=64 << 10,
                           refuse=True)
    poller.register(router.sock, zmq.POLLIN); poller.register(router.monitor, zmq.POLLIN)
    router.on_monitor()              # when the monitor is readable: count, (un)bind
    router.frames(100)               # what arrived, without waiting
    router.frames_with_fd(100)       # the same, each with the connection it came on
    fd in router.open_fds            # that connection's end not yet seen

libzmq has no bound on a listener's connections, and at the process's handle limit it
aborts. Every router drops a connection that does not complete the ZeroMQ handshake
within ``handshake_ms`` (a raw socket held open costs a handle only that long), and
counts its connections from its monitor. With ``refuse``, at the bound it drops every
connection it holds and listens afresh: ``unbind`` (which ends the listener's sessions,
without a word to the monitor) then ``bind``. That suits the control socket, where each
CLI request is a connection of its own (one cut short times out and says so), but not the
workers' socket, which only counts and reports.

The monitor names a connection by its file descriptor, as ``frames_with_fd`` does: libzmq
queues every message a connection carried before it reports that connection's end, so
once a peer's fd has left ``open_fds`` all it sent can be read. Used by the shell for
``sock/worker`` and ``sock/control`` (docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

import zmq

from nkat.protocol.monitor_events import decode_monitor_event

_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED


class BoundedRouter:
    def __init__(self, ctx: zmq.Context[Any], endpoint: str, *, max_peers: int,
                 max_bytes: int, refuse: bool, handshake_ms: int = 2000,
                 handover: bool = False) -> None:
        self.endpoint = endpoint
        self.max_peers = max_peers
        self.refuse = refuse
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        self.sock.setsockopt(zmq.HANDSHAKE_IVL, handshake_ms)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, int(handover))
        self.monitor = self.sock.get_monitor_socket(_EVENTS)
        self.sock.bind(endpoint)
        self.open_fds: set[int] = set()  # the connections held, by file descriptor
        self.floods = 0  # times the connections reached the bound

    def frames(self, limit: int) -> list[list[bytes]]:
        """What arrived, without waiting: up to ``limit`` multipart messages."""
        return [frames for frames, _ in self.frames_with_fd(limit)]

    def frames_with_fd(self, limit: int) -> list[tuple[list[bytes], int]]:
        """Like ``frames``, each message with the fd of the connection it came on."""
        out = []
        for _ in range(limit):
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            out.append(([p.bytes for p in parts], int(parts[-1].get(zmq.SRCFD))))
        return out

    def on_monitor(self) -> dict[str, Any] | None:
        """Count what the monitor reports, and drop the connections at the bound. Returns
        the fields of a ``socket.flooded`` warning when one is due: the first time the
        bound is passed, then at every power of two of the times (a flood is said, not
        logged line by line)."""
        while self.monitor.poll(0):
            event = decode_monitor_event(self.monitor.recv_multipart())
            if event.event == zmq.EVENT_ACCEPTED:
                self.open_fds.add(event.value)
            elif event.event == zmq.EVENT_DISCONNECTED:
                self.open_fds.discard(event.value)
        if len(self.open_fds) < self.max_peers:
            return None
        self.floods += 1
        held = len(self.open_fds)
        if self.refuse:
            self.sock.unbind(self.endpoint)
            self.sock.bind(self.endpoint)
            self.open_fds.clear()
        if self.floods & (self.floods - 1):
            return None
        return {"socket": self.endpoint.rsplit("/", 1)[-1], "connections": held,
                "bound": self.max_peers, "times": self.floods,
                "action": "dropped them all" if self.refuse else "kept them"}
