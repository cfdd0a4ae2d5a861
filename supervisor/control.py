"""The control socket: how CLI commands talk to a running supervisor.

The supervisor binds a ROUTER at ``<run>/sock/control``; a client sends one msgpack map
``{"op": "status" | "stop" | "pause" | "resume" | "checkpoint_now", ...}`` and gets one map
back (``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``).

    reply = request(run.endpoint("control"), "status", timeout=2.0)
"""

from __future__ import annotations

from typing import Any

import msgpack
import zmq

OPS = ("status", "stop", "pause", "resume", "checkpoint_now")
MAX_REQUEST_BYTES = 64 * 1024


class ControlUnavailable(RuntimeError):
    """No supervisor answered on the control socket."""


def request(endpoint: str, op: str, timeout: float = 2.0, **args: Any) -> dict[str, Any]:
    """Send one request and wait for its reply; ControlUnavailable if nobody answers."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 16 * 1024 * 1024)
    try:
        sock.connect(endpoint)
        sock.send(msgpack.packb({"op": op, **args}, use_bin_type=True))
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise ControlUnavailable(f"no supervisor answered on {endpoint} within {timeout:g}s")
        reply = msgpack.unpackb(sock.recv(), raw=False)
    finally:
        sock.close()
    if not isinstance(reply, dict):
        raise ControlUnavailable("malformed reply from the supervisor")
    return reply


def decode_request(data: bytes) -> dict[str, Any]:
    """A control request, validated; ValueError names what is wrong."""
    if len(data) > MAX_REQUEST_BYTES:
        raise ValueError("request too large")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=4096,
                               max_bin_len=0, max_array_len=64, max_map_len=64)
    except Exception as exc:
        raise ValueError(f"undecodable request: {type(exc).__name__}") from None
    if not isinstance(body, dict) or body.get("op") not in OPS:
        raise ValueError(f"unknown op; expected one of {', '.join(OPS)}")
    return body


def encode_reply(reply: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(reply, use_bin_type=True, default=str)
    return packed
