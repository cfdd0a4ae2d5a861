"""``BoundedRouter`` on real ZeroMQ sockets: each message comes with the file descriptor
of its connection, the monitor tells when that connection ends, and whatever a peer sent
before its end can still be read after it (what the shell's last-words wait relies on)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq

from nkat.supervisor.bounded_router import BoundedRouter
from tests.e2e import wait_for


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:  # type: ignore[type-arg]
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _dealer(ctx: zmq.Context, endpoint: str, ident: bytes) -> zmq.Socket:  # type: ignore[type-arg]
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, ident)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(endpoint)
    return sock


def test_a_peers_messages_outlive_its_connection_and_name_it(ctx, tmp_path):
    endpoint = f"ipc://{tmp_path}/r"
    router = BoundedRouter(ctx, endpoint, max_peers=8, max_bytes=1 << 20, refuse=False)
    first, second = _dealer(ctx, endpoint, b"one"), _dealer(ctx, endpoint, b"two")
    first.send(b"hello")
    second.send(b"hello")
    got: list[tuple[list[bytes], int]] = []
    wait_for(lambda: got.extend(router.frames_with_fd(10)) or len(got) == 2, 10,
             "both hellos", 0.005)
    fds = {frames[0]: fd for frames, fd in got}
    assert set(fds) == {b"one", b"two"} and fds[b"one"] != fds[b"two"]
    router.on_monitor()
    assert set(fds.values()) <= router.open_fds

    # The first peer sends a burst and goes: once its end is seen, all of it is readable.
    for n in range(200):
        first.send(b"%d" % n)
    first.close()
    wait_for(lambda: router.on_monitor() is None and fds[b"one"] not in router.open_fds,
             10, "the first connection's end", 0.005)
    assert fds[b"two"] in router.open_fds
    burst = router.frames_with_fd(1000)
    assert [frames[1] for frames, _ in burst] == [b"%d" % n for n in range(200)]
    assert {fd for _, fd in burst} == {fds[b"one"]}
    second.close()


def test_the_bound_counts_open_connections_and_refuse_drops_them(ctx, tmp_path):
    endpoint = f"ipc://{tmp_path}/c"
    router = BoundedRouter(ctx, endpoint, max_peers=3, max_bytes=1 << 20, refuse=True)
    peers = [_dealer(ctx, endpoint, b"p%d" % i) for i in range(2)]
    wait_for(lambda: router.on_monitor() is None and len(router.open_fds) == 2, 10,
             "two connections", 0.005)
    peers.append(_dealer(ctx, endpoint, b"p2"))
    flood = wait_for(router.on_monitor, 10, "the flood", 0.005)
    assert flood["connections"] == 3 and flood["action"] == "dropped them all"
    assert router.open_fds == set()
    for peer in peers:
        peer.close(linger=0)
