"""``nkat.protocol.monitor_events`` decodes what real ZeroMQ monitor sockets send exactly as
pyzmq's own ``zmq.utils.monitor`` does (which the processes no longer import), and refuses
frames that are not a monitor event."""

from __future__ import annotations

import sys

import pytest
import zmq
from zmq.utils.monitor import parse_monitor_message

from nkat.protocol.monitor_events import decode_monitor_event


def test_every_event_of_a_connection_decodes_as_pyzmq_decodes_it(tmp_path) -> None:
    ctx = zmq.Context()
    try:
        server = ctx.socket(zmq.ROUTER)
        server_events = server.get_monitor_socket()
        endpoint = f"ipc://{tmp_path}/sock"
        server.bind(endpoint)
        client = ctx.socket(zmq.DEALER)
        client_events = client.get_monitor_socket()
        client.connect(endpoint)
        client.send(b"hello")
        assert server.poll(5000)
        server.recv_multipart()
        client.close(linger=0)  # the server sees it go
        seen = []
        for monitor in (server_events, client_events):
            while monitor.poll(1000):
                frames = monitor.recv_multipart()
                ours = decode_monitor_event(frames)
                theirs = parse_monitor_message(frames)
                assert (ours.event, ours.value, ours.endpoint) == (
                    theirs["event"], theirs["value"], theirs["endpoint"])
                seen.append(ours.event)
                if monitor is server_events and ours.event == zmq.EVENT_DISCONNECTED:
                    break
        # The events the supervisor and the worker act on were all among them.
        assert {zmq.EVENT_ACCEPTED, zmq.EVENT_DISCONNECTED, zmq.EVENT_CONNECTED} <= set(seen)
        accepted = [e for e in seen if e == zmq.EVENT_ACCEPTED]
        assert len(accepted) == 1
    finally:
        ctx.destroy(linger=0)  # every socket, also when a check above failed


@pytest.mark.parametrize("frames", [[], [b"\x01\x00\x05\x00\x00\x00"],
                                    [b"\x01\x00\x05\x00\x00", b"ipc://x"],
                                    [b"\x01\x00\x05\x00\x00\x00\x00", b"ipc://x"],
                                    [b"\x01\x00\x05\x00\x00\x00", b"ipc://x", b"more"]])
def test_frames_that_are_not_a_monitor_event_are_refused(frames: list[bytes]) -> None:
    with pytest.raises(ValueError, match="not a ZeroMQ monitor event"):
        decode_monitor_event(frames)


def test_the_value_is_signed_and_the_event_is_not() -> None:
    event = decode_monitor_event([(0x8000).to_bytes(2, sys.byteorder) + (-1).to_bytes(
        4, sys.byteorder, signed=True), b"tcp://127.0.0.1:1"])
    assert event == (0x8000, -1, b"tcp://127.0.0.1:1")
