"""A scripted stand-in for the supervisor's worker socket, for the worker's tests.

A ROUTER bound on an ipc socket in a private temp dir; it spawns real
``python -m nkat.worker`` processes with the NKAT_* environment and speaks the protocol
by hand, so a test can withhold acks, rebind, send commands and check every message.

    sup = FakeSupervisor()
    sup.start(params={"units": 100})     # spawn, expect hello, send welcome
    done = sup.expect(Done)
    sup.ack(DONE_ACK_SEQ)
    assert sup.wait_exit() == exitcodes.DONE
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import zmq

from nkat.protocol.messages import (
    Ack,
    Beat,
    Ckpt,
    Cmd,
    Hello,
    Message,
    Resume,
    Welcome,
    decode,
    encode,
)

REPO = Path(__file__).resolve().parent.parent
TOY = "tests.jobs.toy:Toy"

#: Fast, quiet settings: beats every 0.1 s, no interval checkpoints, fixed batches of 4.
TEST_SETTINGS: dict[str, Any] = {
    "checkpoint_interval": 3600.0,
    "batch_size": 4,
    "batch_size_adaptive": False,
    "heartbeat_interval": 0.1,
    "supervisor_timeout": 30.0,
    "ack_resend": 5.0,
}

M = TypeVar("M", bound=Message)


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of a worker process: ours, with the repo importable (test jobs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NKAT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class FakeSupervisor:
    def __init__(self, epoch: int = 1) -> None:
        # A short private dir: ipc paths must fit in sun_path (about 100 bytes).
        self.dir = Path(tempfile.mkdtemp(prefix="nkw-"))
        self.endpoint = f"ipc://{self.dir}/worker"
        self.ctx = zmq.Context()
        self.sock = self._bind()
        self.epoch = epoch
        self.token = secrets.token_hex(8)
        self.proc: subprocess.Popen[bytes] | None = None
        self.routing_id: bytes | None = None
        #: Every message received, in order.
        self.received: list[Message] = []
        #: Acknowledge each new checkpoint as it arrives (tests that withhold acks clear it).
        self.auto_ack = True
        self.acked: list[Ckpt] = []

    # Process ---------------------------------------------------------------------------

    def spawn(self, *, failpoints: str = "", supervisor_pid: int | None = None,
              **env: str) -> subprocess.Popen[bytes]:
        self.routing_id = None
        extra = {
            "NKAT_ENDPOINT": self.endpoint,
            "NKAT_TOKEN": self.token,
            "NKAT_EPOCH": str(self.epoch),
            "NKAT_SUPERVISOR_PID": str(supervisor_pid or os.getpid()),
            "NKAT_BACKEND": "numpy",
            **env,
        }
        if failpoints:
            extra["NKAT_FAILPOINTS"] = failpoints
        with open(self.dir / "stdout", "wb") as out, open(self.dir / "stderr", "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "nkat.worker"], cwd=REPO,
                                         env=worker_env(**extra), stdout=out, stderr=err,
                                         start_new_session=True)
        return self.proc

    def start(self, params: Mapping[str, Any] | None = None, *, job: str = TOY,
              settings: Mapping[str, Any] | None = None, resume: Resume | None = None,
              failpoints: str = "", **env: str) -> Hello:
        """Spawn a worker, take its hello, welcome it."""
        self.spawn(failpoints=failpoints, **env)
        hello = self.expect(Hello)
        self.send(Welcome(epoch=self.epoch, run_id="test-run",
                          spec={"job": job, "params": dict(params or {})},
                          settings={**TEST_SETTINGS, **(settings or {})}, resume=resume))
        return hello

    def wait_exit(self, timeout: float = 10.0) -> int:
        """The worker's exit code; its messages are received (and acked) meanwhile."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while (code := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"worker still running after {timeout} s\n"
                                     f"{self.stderr()}")
            self.recv(0.02)
        self.collect(0.05)  # what it sent just before the end
        return code

    def stderr(self) -> str:
        return (self.dir / "stderr").read_text(errors="replace")

    def stdout(self) -> str:
        return (self.dir / "stdout").read_text(errors="replace")

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    # Socket ----------------------------------------------------------------------------

    def _bind(self) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # A worker that reconnects under the same routing id takes its old slot over.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.bind(self.endpoint)
        return sock

    def rebind(self) -> None:
        """Close the ROUTER and bind a fresh one, as a restarted socket would."""
        self.sock.close(linger=0)
        self.sock = self._bind()

    def send(self, msg: Message) -> None:
        assert self.routing_id is not None, "no worker has spoken yet"
        self.sock.send_multipart([self.routing_id, encode(msg)])

    def cmd(self, op: str, **args: Any) -> None:
        self.send(Cmd(epoch=self.epoch, op=op, args=args))

    def ack(self, ckpt_seq: int) -> None:
        self.send(Ack(epoch=self.epoch, ckpt_seq=ckpt_seq))

    def recv(self, timeout: float) -> Message | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        rid, raw = self.sock.recv_multipart()
        if self.routing_id is None:
            self.routing_id = rid
        assert rid == self.routing_id, f"message from {rid!r}, expected {self.routing_id!r}"
        msg = decode(raw)
        self.received.append(msg)
        if isinstance(msg, Ckpt) and self.auto_ack and \
                all(c.ckpt_seq != msg.ckpt_seq for c in self.acked):
            self.acked.append(msg)
            self.ack(msg.ckpt_seq)
        return msg

    def expect(self, mtype: type[M], timeout: float = 10.0,
               where: Callable[[M], bool] = lambda m: True) -> M:
        """The next message of ``mtype`` satisfying ``where`` (others are kept in received)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(left)
            if isinstance(msg, mtype) and where(msg):
                return msg
        raise AssertionError(f"no {mtype.__name__} within {timeout} s; got "
                             f"{[m.TYPE for m in self.received[-20:]]}\n{self.stderr()}")

    def collect(self, seconds: float) -> list[Message]:
        """Everything received in the next ``seconds``."""
        start = len(self.received)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.recv(left)
        return self.received[start:]

    def beats(self, messages: list[Message] | None = None) -> list[Beat]:
        return [m for m in (self.received if messages is None else messages)
                if isinstance(m, Beat)]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.sock.close(linger=0)
        self.ctx.term()
        shutil.rmtree(self.dir, ignore_errors=True)


def toy_expected(units: int) -> dict[str, Any]:
    """The toy job's deterministic result, computed one unit at a time in this process."""
    import numpy

    from tests.jobs.toy import Toy

    job = Toy({"units": units})
    for i in range(units):
        (partial,) = job.compute(numpy, i, 1)
        job.merge(partial)
    return {"units": units, "total": job.total, "chain": job.chain.hex(),
            "merged": job.merged}
