"""The worker's one ZeroMQ socket and the I/O thread that owns it
(docs/architecture.md, "Conversation").

ZeroMQ sockets are not thread-safe, so one background thread owns the DEALER. It sends
what the main loop posts, beats on its own clock (liveness survives a main loop stuck in
a C call that releases the GIL), keeps each unacknowledged checkpoint and ``done`` and
resends them, watches for a vanished or silent supervisor, and hands acks, commands and
``welcome`` to the main loop through ``inbox``.

    channel = Channel(endpoint, epoch=1, heartbeat=hb, supervisor_pid=ppid,
                      routing_id=token.encode())
    channel.start(hello)                              # connect and say hello
    welcome = channel.inbox.get(timeout=30)
    channel.start_beats(settings)                     # beats, resends, silence watch
    channel.post_ckpt(seq, units_done, snapshot, counters)
    channel.close(flush_s=1.0)                        # send what is queued, bounded
"""

from __future__ import annotations

import dataclasses
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from typing import Any

import zmq

from nkat.protocol import exitcodes
from nkat.protocol.messages import (
    DONE_ACK_SEQ,
    MAX_MESSAGE_BYTES,
    Ack,
    Ckpt,
    Cmd,
    Done,
    Extend,
    Fail,
    Hello,
    Log,
    Message,
    ProtocolError,
    Welcome,
    decode,
    encode,
    state_digest,
)
from nkat.protocol.monitor_events import decode_monitor_event
from nkat.worker import guards, state
from nkat.worker.heartbeat import Heartbeat
from nkat.worker.settings import Settings

#: Messages queued per direction before sends fail (beats are dropped, checkpoints resent).
HWM = 1000
#: How often the parent is checked when nothing else wakes the thread.
PARENT_CHECK_S = 1.0
#: Exit code when the I/O thread itself fails: not a protocol code, the supervisor sees a
#: crash and restarts.
IO_FAILURE_EXIT = 1


@dataclasses.dataclass
class _Pending:
    """A checkpoint or ``done`` sent and not yet acknowledged."""

    what: str
    raw: bytes
    first_sent: float
    last_sent: float


class Channel:
    """Main-thread side: post messages, read ``inbox``. Everything else is the I/O thread's."""

    def __init__(self, endpoint: str, *, epoch: int, heartbeat: Heartbeat,
                 supervisor_pid: int, routing_id: bytes) -> None:
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._endpoint = endpoint
        # The epoch's secret token: the supervisor accepts a message only under it, and a
        # second connection claiming it is refused (no ROUTER handover).
        self._routing_id = routing_id
        self._epoch = epoch
        self._heartbeat = heartbeat
        self._supervisor_pid = supervisor_pid
        self._outbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        # The pipe wakes the thread's zmq poll from any thread. It is never closed: a post
        # racing the exit must not write into a reused descriptor.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._main, name="nkat-worker-io", daemon=True)
        # Owned by the I/O thread from here on.
        self._beat_interval: float | None = None
        self._next_beat = 0.0
        self._ack_resend = 5.0
        self._silence = 60.0
        self._compress = False  # checkpoint_compression, set with the beats
        self._pending: dict[int, _Pending] = {}
        self._connects = 0
        self._linger_ms = 0

    # Main thread ---------------------------------------------------------------------

    def start(self, hello: Hello) -> None:
        self._post(("send", hello))
        self._thread.start()

    def start_beats(self, settings: Settings) -> None:
        self._post(("beats", settings.heartbeat_interval, settings.ack_resend,
                    settings.supervisor_timeout, settings.checkpoint_compression))

    def log(self, level: str, event: str, fields: Mapping[str, Any]) -> None:
        self._post(("send", Log(epoch=self._epoch, level=level, event=event,
                                fields=dict(fields))))

    def beat_now(self) -> None:
        """Send the next beat at once (once beats have started), then keep the cadence."""
        self._post(("beat_now",))

    def extend(self, seconds: float, reason: str) -> None:
        self._post(("send", Extend(epoch=self._epoch, seconds=seconds, reason=reason)))

    def fail(self, kind: str, message: str, tb: str, fatal: bool) -> None:
        self._post(("send", Fail(epoch=self._epoch, kind=kind, message=message, traceback=tb,
                                 fatal=fatal)))

    def post_ckpt(self, ckpt_seq: int, units_done: int, job_state: bytes,
                  runtime: Mapping[str, Any]) -> None:
        """Hand a snapshot over; wrapping, digest and sending happen on the I/O thread."""
        self._post(("ckpt", ckpt_seq, units_done, job_state, dict(runtime)))

    def post_done(self, result: dict[str, Any], digest: str) -> None:
        """Encoded here, so a result msgpack cannot carry (an integer beyond 64 bits, over
        the size limit) raises in the caller rather than killing the I/O thread."""
        self._post(("done", encode(Done(epoch=self._epoch, result=result, digest=digest))))

    def close(self, flush_s: float = 1.0) -> None:
        """Send what is queued (waiting at most ``flush_s`` for the peer), then stop."""
        self._post(("close", flush_s))
        self._thread.join(flush_s + 2.0)

    def _post(self, item: tuple[Any, ...]) -> None:
        self._outbox.put(item)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so the thread is already due to wake

    # I/O thread ----------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._serve()
        except Exception:
            # Without this thread there are no beats and no acks: die loudly instead.
            traceback.print_exc()
            print("nkat.worker: the I/O thread failed", file=sys.stderr, flush=True)
            os._exit(IO_FAILURE_EXIT)

    def _serve(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self._routing_id)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED)
        sock.connect(self._endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while True:
                timeout = self._timeout(time.monotonic())
                events = dict(poller.poll(int(timeout * 1000) + 1))
                if self._wake_r in events:
                    self._drain_wake()
                if self._drain_outbox(sock):
                    return
                if sock in events:
                    self._receive(sock)
                if monitor in events:
                    self._on_monitor(monitor, sock)
                self._tick(sock, time.monotonic())
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=self._linger_ms)
            ctx.term()

    def _timeout(self, now: float) -> float:
        deadline = now + PARENT_CHECK_S
        if self._beat_interval is not None:
            deadline = min(deadline, self._next_beat)
        for p in self._pending.values():
            deadline = min(deadline, p.last_sent + self._ack_resend, p.first_sent + self._silence)
        return max(0.0, deadline - now)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _drain_outbox(self, sock: zmq.Socket[bytes]) -> bool:
        """Send everything posted; True once ``close`` is reached (all before it is sent)."""
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                return False
            op = item[0]
            if op == "send":
                self._send(sock, encode(item[1]))
            elif op == "beats":
                self._beat_interval, self._ack_resend, self._silence, self._compress = \
                    item[1:]
                self._next_beat = time.monotonic()
            elif op == "beat_now":
                self._next_beat = time.monotonic()
            elif op == "ckpt":
                _, seq, units_done, job_state, runtime = item
                wrapped = state.wrap(job_state, units_done, runtime, compress=self._compress)
                msg = Ckpt(epoch=self._epoch, ckpt_seq=seq, units_done=units_done,
                           state=wrapped, digest=state_digest(wrapped))
                self._track(sock, seq, f"checkpoint {seq}", encode(msg))
            elif op == "done":
                self._track(sock, DONE_ACK_SEQ, "done", item[1])
            elif op == "close":
                self._linger_ms = int(item[1] * 1000)
                return True

    def _track(self, sock: zmq.Socket[bytes], seq: int, what: str, raw: bytes) -> None:
        now = time.monotonic()
        self._pending[seq] = _Pending(what, raw, now, now)
        self._send(sock, raw)

    def _send(self, sock: zmq.Socket[bytes], raw: bytes) -> bool:
        try:
            sock.send(raw, zmq.NOBLOCK)
        except zmq.Again:
            return False  # queue full while disconnected: beats are stale anyway
        return True

    def _receive(self, sock: zmq.Socket[bytes]) -> None:
        while True:
            try:
                raw = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(raw)
            except ProtocolError as exc:
                self._log_here(sock, "channel.bad_message", {"error": str(exc)})
                continue
            if msg.epoch != self._epoch:
                # Fencing: a message for another incarnation never acts on this one.
                self._log_here(sock, "channel.stale_message",
                               {"type": msg.TYPE, "msg_epoch": msg.epoch})
            elif isinstance(msg, Ack):
                if self._pending.pop(msg.ckpt_seq, None) is not None:
                    self.inbox.put(msg)
            elif isinstance(msg, (Cmd, Welcome)):
                self.inbox.put(msg)
            else:
                self._log_here(sock, "channel.unexpected_message", {"type": msg.TYPE})

    def _on_monitor(self, monitor: zmq.Socket[bytes], sock: zmq.Socket[bytes]) -> None:
        while True:
            try:
                event = decode_monitor_event(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event.event != zmq.EVENT_CONNECTED:
                continue
            self._connects += 1
            if self._connects > 1 and self._pending:
                # A new connection may be a new socket that never saw what we sent.
                now = time.monotonic()
                for p in self._pending.values():
                    self._send(sock, p.raw)
                    p.last_sent = now
                self._log_here(sock, "channel.resent_after_reconnect",
                               {"pending": [p.what for p in self._pending.values()]})

    def _tick(self, sock: zmq.Socket[bytes], now: float) -> None:
        if not guards.parent_is(self._supervisor_pid):
            _orphan(f"the supervisor (pid {self._supervisor_pid}) is gone")
        if self._beat_interval is not None and now >= self._next_beat:
            self._send(sock, encode(self._heartbeat.beat()))
            self._next_beat += self._beat_interval
            if self._next_beat <= now:
                self._next_beat = now + self._beat_interval
        for p in self._pending.values():
            if now - p.first_sent >= self._silence:
                _orphan(f"{p.what} unacknowledged for {now - p.first_sent:.1f} s")
            if now - p.last_sent >= self._ack_resend:
                self._send(sock, p.raw)
                p.last_sent = now

    def _log_here(self, sock: zmq.Socket[bytes], event: str, fields: dict[str, Any]) -> None:
        self._send(sock, encode(Log(epoch=self._epoch, level="warning", event=event,
                                    fields=fields)))


def _orphan(reason: str) -> None:
    """No supervisor to report to or to keep our checkpoints: leave at once."""
    print(f"nkat.worker: exiting orphaned: {reason}", file=sys.stderr, flush=True)
    os._exit(exitcodes.ORPHANED)
