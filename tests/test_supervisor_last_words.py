"""A worker's last words reach the give-up reason even when they arrive after its exit.

A worker that fails fatally sends ``fail`` and exits with a code that announces it. ZeroMQ
may hand the supervisor that message only after the exit was seen: the shell then waits
for it (``Shell._await_last_words``) before the controller decides. Here a real run's
worker socket sits behind a slow link, a Unix-socket relay that delivers what workers
send 0.2 s late, so the exit always comes first; the reason must still quote the worker.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from nkat.supervisor import journal
from tests.e2e import (  # noqa: F401 - reap_processes is an autouse fixture
    SupervisedRun,
    reap_processes,
    wait_for,
)

#: How late the relay delivers what a worker sends (the shell waits up to 0.5 s).
DELAY_S = 0.2
JOB = ["max_dimension=60000000", "unit_dims=65536"]
QUICK = ["restart_delay=0.05", "checkpoint_interval=0.2", "segment_size=1048576"]
#: Epoch 1 runs until the relay is in place and crashes (exit 1); epoch 2 connects through
#: the relay and meets a job error: ``fail{job_error}``, then exit 11 (fatal).
FAILPOINTS = "crawl@seconds=0.02;crash@unit=20:epoch=1:code=1;error@unit=30:epoch=2"


@dataclass
class Link:
    """One worker connection through the relay, and when its bytes moved."""

    eof_at: float | None = None  # when the worker closed its side
    last_delivered_at: float | None = None  # when its last bytes reached the supervisor
    held_at_eof: int = 0  # bytes still held back when the worker closed its side


@dataclass
class SlowLink:
    """A relay listening at ``listen`` and connecting each client to ``target``: bytes
    from the client are delivered ``delay`` seconds late, bytes to it at once."""

    listen: Path
    target: Path
    delay: float
    links: list[Link] = field(default_factory=list)

    def start(self) -> None:
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.listen))
        self._server.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(str(self.target))
            except OSError:  # the supervisor has gone
                client.close()
                upstream.close()
                continue
            link = Link()
            self.links.append(link)
            threading.Thread(target=self._late, args=(client, upstream, link),
                             daemon=True).start()
            threading.Thread(target=self._straight, args=(upstream, client),
                             daemon=True).start()

    def _late(self, client: socket.socket, upstream: socket.socket, link: Link) -> None:
        held: deque[tuple[float, bytes]] = deque()
        open_ = True
        while open_ or held:
            wait = max(0.0, held[0][0] - time.monotonic()) if held else None
            client.settimeout(wait if open_ else None)
            if open_:
                try:
                    chunk = client.recv(65536)
                except TimeoutError:
                    chunk = None
                except OSError:
                    chunk = b""
                if chunk == b"":
                    open_ = False
                    link.eof_at = time.monotonic()
                    link.held_at_eof = sum(len(b) for _, b in held)
                elif chunk:
                    held.append((time.monotonic() + self.delay, chunk))
            elif held:
                time.sleep(wait or 0.0)
            while held and held[0][0] <= time.monotonic():
                try:
                    upstream.sendall(held.popleft()[1])
                except OSError:  # the supervisor has gone: the rest is never delivered
                    held.clear()
                    break
                link.last_delivered_at = time.monotonic()
        for sock in (upstream, client):  # shutdown wakes the other thread's recv
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    @staticmethod
    def _straight(upstream: socket.socket, client: socket.socket) -> None:
        try:
            while chunk := upstream.recv(65536):
                client.sendall(chunk)
        except OSError:
            pass


def test_a_fail_that_arrives_after_the_exit_is_still_in_the_give_up_reason(tmp_path):
    run = SupervisedRun(tmp_path, "words", JOB + QUICK, failpoints=FAILPOINTS)
    run.start()
    worker_socket = run.path / "sock" / "worker"
    wait_for(worker_socket.exists, 60, "the supervisor's worker socket", 0.005)
    # The bound socket lives on under another name; workers that connect from now on
    # (epoch 2 at least) reach it through the relay at the old name.
    real = worker_socket.with_name("w1")
    os.rename(worker_socket, real)
    relay = SlowLink(worker_socket, real, DELAY_S)
    relay.start()
    try:
        assert run.wait(timeout=120) == 3, run.err
    finally:
        relay.close()
    said = "the last worker said: job_error: RuntimeError: failpoint error at unit 30"
    assert said in run.err
    gave_up = [e for e in map(journal.read, run.records()) if isinstance(e, journal.Event)
               and e.kind is journal.EventKind.GAVE_UP]
    assert gave_up and said in gave_up[-1].reason, gave_up
    # And the race was real: the worker had closed its socket, on its way out, while its
    # fail was still held back; the fail reached the supervisor after that.
    assert relay.links, "no worker connected through the relay"
    last = relay.links[-1]
    assert last.eof_at is not None and last.held_at_eof > 0
    assert last.last_delivered_at is not None and last.last_delivered_at > last.eof_at
