"""ZeroMQ socket-monitor events, decoded from their frames.

Both sides watch their sockets through libzmq's monitor (``zmq_socket_monitor``): the
supervisor counts the connections its listeners hold, the worker resends what is unacked
after a reconnect. pyzmq decodes these frames in ``zmq.utils.monitor``, but that module
imports ``zmq.asyncio``, and with it asyncio and ssl: about 50 ms of CPU at the start of
every worker, which uses neither (the supervisor's log library imports asyncio anyway).
The layout is libzmq's and small: a 6-byte frame of the event (native uint16) and its
value (native int32: a file descriptor, an errno, an interval), then the endpoint.
``tests/test_protocol_monitor_events.py`` checks this decoder against pyzmq's own on real
monitor sockets. Pure bytes; no zmq import. Its place: docs/architecture.md.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

_EVENT_FRAME = struct.Struct("=Hi")


class MonitorEvent(NamedTuple):
    """One monitor event: ``event`` is a ``zmq.EVENT_*`` value."""

    event: int
    value: int
    endpoint: bytes


def decode_monitor_event(frames: Sequence[bytes]) -> MonitorEvent:
    """The event in a monitor socket's two frames; ValueError if they are not one."""
    if len(frames) != 2 or len(frames[0]) != _EVENT_FRAME.size:
        raise ValueError(f"not a ZeroMQ monitor event: {len(frames)} frame(s), the first of "
                         f"{len(frames[0]) if frames else 0} bytes")
    event, value = _EVENT_FRAME.unpack(frames[0])
    return MonitorEvent(event, value, bytes(frames[1]))
