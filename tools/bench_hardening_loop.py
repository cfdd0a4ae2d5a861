"""Hardening figures of the run loop for ``python tools/bench.py hardening`` (issue 10),
each from real processes unless said otherwise:

- ``spoof_accepted`` (must be 0): forged ``done``, ``ckpt`` and ``beat`` messages sent to
  a live run's worker socket by clients other than the spawned worker (under the old
  guessable routing id, and under the worker's real one read from its environment);
  counted: forged checkpoints stored, a forged result, the genuine worker disturbed.
- ``gap_ckpt_acked`` (must be 0): checkpoints whose seq is not the durable one + 1 (or a
  resend of it), fed by a buggy worker to the run controller, the product's decision
  code, driven input by input here; counted: acks of them.
- ``metrics_flood_survived`` (1): 500 idle connections from another process to a run's
  ``metrics_addr``; the run completes with the uninterrupted result, and the
  supervisor's file handles stay bounded.
- ``config_tracebacks`` (must be 0) over ``config_cases`` malformed configs, each given to
  ``config`` and to ``start``: outputs that hold a traceback; ``config_start_not_refused``
  (must be 0): starts that did not exit 2 (a config error); ``config_runs_left_behind``
  (must be 0): run directories those refused starts left.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import zmq
from benchlib import SupervisedRun, deterministic, standalone

from nkat.protocol import messages as m
from nkat.supervisor import controller as c
from nkat.supervisor.config import defaults
from nkat.supervisor.wal import RecordType
from nkat.supervisor.wal.readonly import read_records

JOB = {"max_dimension": 60_000_000, "unit_dims": 65536}
QUICK = {"restart_delay": 0.05, "checkpoint_interval": 0.2, "segment_size": 1 << 20}
CRAWL = ";".join(f"stall@unit={k}:seconds=0.01:epoch=1" for k in range(100, 700))


def forged_messages(args: argparse.Namespace) -> dict[str, object]:
    expected = deterministic(standalone(JOB, backend="numpy")[0])
    with tempfile.TemporaryDirectory(prefix="nkat-bench-spoof-") as tmp:
        run = SupervisedRun(Path(tmp), "spoof", {**JOB, **QUICK}, backend="numpy",
                            env={"NKAT_FAILPOINTS": CRAWL})
        run.start()
        worker = run.wait_worker(60)
        assert worker is not None, "no worker started"
        time.sleep(0.5)
        token = worker.environ()["NKAT_TOKEN"].encode()
        forged = {"forged": True}
        messages = [m.Done(epoch=1, result=forged, digest=m.result_digest(forged)),
                    m.Ckpt(epoch=1, ckpt_seq=100000, units_done=10**6, state=b"evil",
                           digest=m.state_digest(b"evil")),
                    m.Beat(epoch=1, seq=1, progress_seq=10**9, units_done=10**6,
                           units_total=10**6, stage="compute", t_mono=0.0, metrics={})]
        ctx = zmq.Context()
        sent = 0
        for identity in (f"1:{worker.pid}".encode(), token, b"stranger"):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IDENTITY, identity)
            sock.connect(run.endpoint("worker"))
            for msg in messages * 10:
                sock.send(m.encode(msg))
                sent += 1
            time.sleep(0.2)
            sock.close()
        ctx.term()
        code = run.wait(240)
        result = run.result() or {}
        seqs = [r.payload["ckpt_seq"] for r in read_records(run.run_dir / "wal")
                if r.type in (RecordType.CKPT, RecordType.CKPT_REF)]
        epochs = sum(1 for r in read_records(run.run_dir / "wal") if r.type is RecordType.EPOCH)
    accepted = (sum(1 for s in seqs if s >= 100000) + ("forged" in result)
                + (epochs != 1) + (code != 0) + (deterministic(result) != expected))
    return {"spoof_sent": sent, "spoof_accepted": accepted}


class _Loop:
    """The run controller with a minimal shell: appends succeed, one worker spawns."""

    def __init__(self, trial: int) -> None:
        self.ctl = c.RunController(defaults(), c.RunFacts("r", {"job": "x", "params": {}}),
                                   rng=random.Random(trial))
        self.token = f"t{trial}"
        self.acks: list[int] = []
        self.feed(c.Start(0.0))
        self.send(m.Hello(epoch=1, token=self.token, pid=7, job="x", proto=m.PROTOCOL_VERSION,
                          backend="numpy", device="cpu"))

    def send(self, msg: m.Message) -> None:
        self.feed(c.WorkerMessage(self.token.encode(), msg, 0.1))

    def feed(self, event: c.Input) -> None:
        queue = list(self.ctl.handle(event))
        while queue:
            effect = queue.pop(0)
            answer: c.Input | None = None
            if isinstance(effect, c.Append | c.AppendCheckpoint):
                answer = c.Appended(effect.then, True, 0.0)
            elif isinstance(effect, c.Spawn):
                answer = c.WorkerSpawned(effect.worker, effect.epoch, 7, self.token, 0.0)
            elif isinstance(effect, c.LoadCheckpoint):
                answer = c.CheckpointLoaded(effect.worker, effect.epoch, None)
            elif isinstance(effect, c.Send) and isinstance(effect.msg, m.Ack):
                self.acks.append(effect.msg.ckpt_seq)
            if answer is not None:
                queue[:0] = self.ctl.handle(answer)


def gap_checkpoints(args: argparse.Namespace) -> dict[str, object]:
    """A worker whose checkpoint seqs jump, repeat or go back, against the controller."""
    rng = random.Random(10)
    acked_gaps = cases = 0
    for trial in range(50 if args.quick else 500):
        loop, durable = _Loop(trial), 0
        for _ in range(20):
            seq = rng.choice([durable + 1, durable + 1, durable, durable + 2,
                              durable + rng.randint(3, 10**6), max(0, durable - 1)])
            before = len(loop.acks)
            state = b"s%d" % seq
            loop.send(m.Ckpt(epoch=1, ckpt_seq=seq, units_done=seq * 10, state=state,
                             digest=m.state_digest(state)))
            cases += 1
            acked = len(loop.acks) > before
            if seq == durable + 1 and acked:
                durable = seq
            elif seq not in (durable, durable + 1) and acked:
                acked_gaps += 1
            if loop.ctl.run.workers["w0"].kill is not None:
                break  # the worker broke the protocol and is being ended
    return {"gap_ckpt_cases": cases, "gap_ckpt_acked": acked_gaps}


FLOOD = """
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for _ in range(n):
    s = socket.socket()
    try:
        s.connect((host, port))
        held.append(s)
    except OSError:
        s.close()
print(len(held), flush=True)
time.sleep(float(sys.argv[4]))
"""


def metrics_flood(args: argparse.Namespace) -> dict[str, object]:
    expected = deterministic(standalone(JOB, backend="numpy")[0])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="nkat-bench-flood-") as tmp:
        run = SupervisedRun(Path(tmp), "flood", {**JOB, **QUICK,
                                                 "metrics_addr": f"127.0.0.1:{port}"},
                            backend="numpy", env={"NKAT_FAILPOINTS": CRAWL})
        run.start()
        assert run.wait_worker(60) is not None
        time.sleep(0.5)
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, "127.0.0.1", str(port), "500",
                                  "8"], stdout=subprocess.PIPE, text=True)
        time.sleep(2.0)
        assert run.proc is not None
        fds = psutil.Process(run.proc.pid).num_fds()
        code = run.wait(240)
        flood.kill()
        flood.communicate()
        result = run.result() or {}
    survived = code == 0 and deterministic(result) == expected
    return {"metrics_flood_survived": int(survived), "metrics_flood_supervisor_fds": fds}


def config_corpus(args: argparse.Namespace) -> dict[str, object]:
    cases: list[bytes] = [
        b"a = " + b"[" * 100_000 + b"]" * 100_000 + b"\n",
        b"max_dimension = " + b"9" * 5000 + b"\n",
        b"max_dimension = 5\n\xff\xfe\xfd\n",
        os.urandom(4096),
        b"[params]\n" + b"".join(b"k%d = %d\n" % (i, i) for i in range(300_000)),
        b"max_dimension = 'many'\n",
        b"max_dimension = -1\n",
        b"max_dimension = 1e400\n",
        b"checkpoint_interval = nan\n",
        b"checkpoint_interval = inf\n",
        b"no_such_key = 1\n",
        b"backend = 3\n",
        b"target_temperature = 90\nthermal_throttle_temp = 80\n",
        b"metrics_addr = '0.0.0.0:9'\n",
        b"http_addr = '0.0.0.0:9'\n",
        b"notify_url = 'ftp://x'\n",
        b"[params]\nn = { a = { b = { c = 1 } } }\njob = 'x:Y'\n",
        b"job = 'no.such.module:Job'\n",
        b"\x00" * 1024,
        b"max_dimension = 100\nmax_dimension = 200\n",
        b"precision_mode = 'fastest'\n",
        b"heartbeat_timeout = 0.5\nheartbeat_interval = 1\n",
    ]
    tracebacks = not_refused = 0
    with tempfile.TemporaryDirectory(prefix="nkat-bench-config-") as tmp:
        for n, body in enumerate(cases):
            path = Path(tmp) / f"c{n}.toml"
            path.write_bytes(body)
            for command in (["config", "--config", str(path)],
                            ["start", "--config", str(path), "--quiet"]):
                out = subprocess.run([sys.executable, "-m", "nkat.supervisor", *command,
                                      "--state-dir", str(Path(tmp) / "state")],
                                     capture_output=True, text=True, timeout=120)
                traceback = "Traceback" in out.stderr + out.stdout
                refused = command[0] == "config" or out.returncode == 2
                tracebacks += traceback
                not_refused += not refused
                if traceback or not refused:
                    print(f"config case {n} ({command[0]}): exit {out.returncode}: "
                          f"{out.stderr[-300:]}", file=sys.stderr)
        runs = list((Path(tmp) / "state" / "runs").glob("*")) if (
            Path(tmp) / "state" / "runs").exists() else []
    return {"config_cases": len(cases) * 2, "config_tracebacks": tracebacks,
            "config_start_not_refused": not_refused, "config_runs_left_behind": len(runs)}


PARTS = (forged_messages, gap_checkpoints, metrics_flood, config_corpus)


def run(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for part in PARTS:
        figures.update(part(args))
    return figures
